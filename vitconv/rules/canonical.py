"""The canonical layout itself: identity rows, so a canonical file is audited like any other."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from ..config import ViTConfig
from ..errors import MappingError
from . import google
from .base import Rule
from .layout import IDENTITY

#: The canonical tensor names, with the same scopes and conditions as Google's table.
TABLE: Tuple[Rule, ...] = tuple(Rule(r.canonical, (r.canonical,), IDENTITY, r.scope, r.when)
                                for r in google.TABLE) + tuple(
    Rule(n, (n,), IDENTITY, "model", "patch_norm")  # vit-pytorch's patch LayerNorms
    for n in ("patch_norm_pre.weight", "patch_norm_pre.bias", "patch_norm_post.weight", "patch_norm_post.bias")
) + (Rule("dist_token", ("dist_token",), IDENTITY, "model", "distilled"),  # DeiT
     Rule("head_dist.weight", ("head_dist.weight",), IDENTITY, "model", "distilled_head"),
     Rule("head_dist.bias", ("head_dist.bias",), IDENTITY, "model", "distilled_head"))


def detect(shapes: Dict[str, Tuple[int, ...]]) -> bool:
    return "patch_embed.weight" in shapes and "blocks.0.attn.qkv.weight" in shapes and "pos_embed" in shapes


def infer_config(shapes: Dict[str, Tuple[int, ...]], path: Optional[str] = None) -> ViTConfig:
    """A canonical state dict without its config: infer what shapes alone can tell.

    Heads cannot be read off a fused qkv weight; files vitconv writes always carry the
    config, so this path is only for bare state dicts and refuses to guess."""
    raise MappingError("canonical state dict without a vitconv config: the number of heads "
                       "cannot be read off a fused qkv weight; use a file written by vitconv", path)
