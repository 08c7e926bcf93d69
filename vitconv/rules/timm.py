"""timm ``VisionTransformer`` state dicts <-> canonical, and the timm-derived variant whose
position table sits in a ``PositionEmbs`` wrapper (``pos_embedding.pos_embedding``).

timm semantics (read direction): exact-erf GELU (``nn.GELU``), LayerNorm eps 1e-6, fused
``attn.qkv`` rows ``[q; k; v]`` head-major (the canonical order: identity rows). Pooling:
``global_pool='token'`` takes the class token after ``norm``; ``'avg'`` models without a
class token pool first and then apply ``fc_norm`` (canonical ``final_norm='pooled'``), or
apply ``norm`` to every token first when ``fc_norm=False``. timm < 0.9 (and the derived
variant) had ``pre_logits.fc`` (Linear + Tanh) = Google's ``pre_logits``; current timm has no
such layer, so such files load only into the old code.

Refused, naming the reason: DeiT's distillation token (``dist_token``/``head_dist``: the
canonical ViT has one class token and one head), class-token models that average-pool
(MAE-style ``fc_norm`` with a class token: timm excludes the class token from the mean),
position tables without the class token (``no_embed_class``), hybrid backbones, and
anything else the strict audit finds unused (layer scale, register tokens, ``attn_pool``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

from ..config import ViTConfig
from ..errors import MappingError
from .base import Rule
from .layout import IDENTITY
from .pytorch_infer import Shapes, count_blocks, grid_from_tokens, heads_from_attn_dim, need

POS_KEYS = {"timm": "pos_embed", "timm_posembs": "pos_embedding.pos_embedding"}
_B = "blocks.{i}."


@lru_cache(maxsize=None)
def _table(pos_key: str, norm_key: str) -> Tuple[Rule, ...]:
    """One table for both directions; ``norm_key`` is ``norm`` or timm's ``fc_norm``."""
    rows = [Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
            Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY),
            Rule("cls_token", ("cls_token",), IDENTITY, "model", "token"),
            Rule("pos_embed", (pos_key,), IDENTITY)]
    for canon, src, when in (("norm1.weight", "norm1.weight", "always"), ("norm1.bias", "norm1.bias", "always"),
                             ("attn.qkv.weight", "attn.qkv.weight", "always"),
                             ("attn.qkv.bias", "attn.qkv.bias", "qkv_bias"),
                             ("attn.proj.weight", "attn.proj.weight", "always"),
                             ("attn.proj.bias", "attn.proj.bias", "always"),
                             ("norm2.weight", "norm2.weight", "always"), ("norm2.bias", "norm2.bias", "always"),
                             ("mlp.fc1.weight", "mlp.fc1.weight", "always"), ("mlp.fc1.bias", "mlp.fc1.bias", "always"),
                             ("mlp.fc2.weight", "mlp.fc2.weight", "always"), ("mlp.fc2.bias", "mlp.fc2.bias", "always")):
        rows.append(Rule("blocks.{i}." + canon, (_B + src,), IDENTITY, "block", when))
    rows += [Rule("norm.weight", (f"{norm_key}.weight",), IDENTITY, "model", "final_norm"),
             Rule("norm.bias", (f"{norm_key}.bias",), IDENTITY, "model", "final_norm"),
             Rule("pre_logits.weight", ("pre_logits.fc.weight",), IDENTITY, "model", "pre_logits"),
             Rule("pre_logits.bias", ("pre_logits.fc.bias",), IDENTITY, "model", "pre_logits"),
             Rule("head.weight", ("head.weight",), IDENTITY, "model", "head"),
             Rule("head.bias", ("head.bias",), IDENTITY, "model", "head")]
    return tuple(rows)


def table_for(layout: str):
    def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
        # a class-token model's pooled norm is timm's `norm` (same values); only avg-pool uses fc_norm
        pooled = cfg.final_norm == "pooled" and cfg.classifier == "gap"
        return _table(POS_KEYS[layout], "fc_norm" if pooled else "norm")
    return table


def detect(layout: str):
    pos = POS_KEYS[layout]
    return lambda shapes: ("patch_embed.proj.weight" in shapes and "blocks.0.attn.qkv.weight" in shapes
                           and pos in shapes)


def infer(layout: str):
    def infer_config(shapes: Shapes, path: Optional[str] = None) -> ViTConfig:
        pos_key = POS_KEYS[layout]
        if "dist_token" in shapes or "head_dist.weight" in shapes:
            raise MappingError("DeiT distillation checkpoint (dist_token, head_dist): the canonical "
                               "ViT has one class token and one head; not supported", path)
        if any(k.startswith("patch_embed.backbone.") for k in shapes):
            raise MappingError("timm hybrid (patch_embed.backbone.*): timm's ResNet stem differs from "
                               "Google's; convert the Google .npz instead", path)
        depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
        emb = need(shapes, "patch_embed.proj.weight", layout, path)
        if len(emb) != 4 or emb[2] != emb[3]:
            raise MappingError(f"patch_embed.proj.weight must be a square (out, in, k, k) kernel, got {emb}", path)
        width, in_chans, patch = emb[0], emb[1], emb[2]
        qkv = need(shapes, _B.format(i=0) + "attn.qkv.weight", layout, path)
        if qkv[0] != 3 * width:
            raise MappingError(f"attn.qkv.weight {qkv}: timm's attention width must equal the "
                               f"embedding width {width}", path)
        heads, head_dim = heads_from_attn_dim(qkv[0] // 3, path)
        token = "cls_token" in shapes
        pooled = "fc_norm.weight" in shapes
        if token and pooled:
            raise MappingError("class token with fc_norm (timm global_pool='avg' over patch tokens "
                               "only, MAE-style): the canonical 'gap' pools models without a class "
                               "token; not supported", path)
        pos = need(shapes, pos_key, layout, path)
        n_grid = pos[1] - (1 if token else 0)
        if token and int(round(pos[1] ** 0.5)) ** 2 == pos[1] and int(round(n_grid ** 0.5)) ** 2 != n_grid:
            raise MappingError(f"{pos_key} {pos} has no row for the class token (timm "
                               "no_embed_class=True); not supported", path)
        g = grid_from_tokens(pos[1], 1 if token else 0, pos_key, path)
        rep = shapes["pre_logits.fc.weight"][0] if "pre_logits.fc.weight" in shapes else None
        head = shapes.get("head.weight")
        final = "pooled" if pooled else ("encoder" if "norm.weight" in shapes else "none")
        try:
            return ViTConfig(image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width,
                             depth=depth, num_heads=heads, head_dim=head_dim,
                             mlp_dim=need(shapes, _B.format(i=0) + "mlp.fc1.weight", layout, path)[0],
                             classifier="token" if token else "gap", representation_size=rep,
                             num_classes=head[0] if head else 0,
                             qkv_bias=(_B.format(i=0) + "attn.qkv.bias") in shapes,
                             norm_eps=1e-6, act="gelu", final_norm=final)
        except ValueError as e:
            raise MappingError(f"inconsistent architecture: {e}", path) from None
    return infer_config


def write_problems(cfg: ViTConfig) -> List[str]:
    """What a timm ``VisionTransformer`` cannot hold."""
    out = []
    if cfg.resnet_layers is not None:
        out.append("hybrid ResNet stem (timm's hybrid backbone uses other names and semantics)")
    if cfg.patch_norm:
        out.append("LayerNorms around the patch projection (vit-pytorch)")
    if cfg.attn_dim != cfg.width:
        out.append(f"attention width {cfg.attn_dim} != embedding width {cfg.width}")
    if cfg.final_norm == "none":
        out.append("no final LayerNorm (timm always has norm or fc_norm)")
    return out


def write_notes(cfg: ViTConfig) -> List[str]:
    """The timm constructor arguments under which timm computes what the canonical model does."""
    kw = [f"img_size={cfg.image_size}", f"patch_size={cfg.patch_size}", f"in_chans={cfg.in_chans}",
          f"num_classes={cfg.num_classes}", f"embed_dim={cfg.width}", f"depth={cfg.depth}",
          f"num_heads={cfg.num_heads}", f"mlp_ratio={cfg.mlp_dim / cfg.width:g}", f"qkv_bias={cfg.qkv_bias}"]
    if cfg.classifier == "gap":
        kw += ["class_token=False", "global_pool='avg'", f"fc_norm={cfg.final_norm == 'pooled'}"]
    if cfg.act != "gelu":
        kw.append({"gelu_tanh": "act_layer='gelu_tanh'", "quick_gelu": "act_layer='quick_gelu'",
                   "relu": "act_layer='relu'"}[cfg.act])
    if cfg.norm_eps != 1e-6:
        kw.append(f"norm_layer=partial(nn.LayerNorm, eps={cfg.norm_eps:g})")
    notes = ["timm: VisionTransformer(" + ", ".join(kw) + ") computes the same function"]
    if cfg.act == "gelu_tanh":
        notes.append("timm's default act is exact GELU; without act_layer='gelu_tanh' timm computes "
                     "something else (up to ~1e-3 per activation)")
    if cfg.representation_size:
        notes.append("pre_logits.fc (Linear + Tanh) written as in timm < 0.9; current timm has no "
                     "pre_logits layer and will refuse these keys")
    return notes
