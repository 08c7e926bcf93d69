"""The original DINOv2 torch-hub checkpoints (``dinov2_vits14`` … ``dinov2_vitg14``, with and
without registers) <-> canonical.

Keys (``dinov2/models/vision_transformer.py``, ``DinoVisionTransformer`` with the hub's
``block_chunks=0``): ``cls_token``, ``pos_embed`` (rows for the class token and the patches),
``register_tokens``, ``mask_token`` (masked training only), ``patch_embed.proj``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 | mlp.w12/w3, ls2.gamma}``,
``norm``; no head. ``w12`` holds [gate; up] with the gate SiLU'd (``SwiGLUFFNFused``, ViT-g).

Semantics: registers are inserted after the table is added ([class, registers, patches]);
exact GELU, LayerNorm eps 1e-6 (fixed by the code), LayerScale on both branches, the final
norm on every token; ``forward`` returns the class token after it. At another resolution the
register models resize like timm (bicubic, antialiased, ``size=``); the others with
``scale_factor=(g + 0.1) / M``, bicubic, no antialiasing: a different table, which the
converted model follows (``pos_resize='dinov2'``). Heads are not recorded: every released
model has 64-dim heads (ViT-S 6, B 12, L 16, g 24), as assumed.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import List, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import DINOV2
from vitconv.layouts.table import Carry, Rule, fill
from vitconv.layouts.inference import build, count_blocks, grid_from_tokens, heads_carry, heads_from_attn_dim, need
from vitconv.layouts.transforms import IDENTITY
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import ALWAYS, PLAIN_MLP, SWIGLU, When

_B = "blocks.{i}."


@lru_cache(maxsize=None)
def _table() -> Tuple[Rule, ...]:
    same = lambda name, scope="model", when=ALWAYS: Rule(name, (name,), IDENTITY, scope, when)  # noqa: E731
    return (
        Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
        Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY), same("cls_token"),
        Rule("reg_token", ("register_tokens",), IDENTITY, "model", When("num_reg_tokens")),
        same("mask_token", when=When("mask_token")), fill("mask_token", lambda c: (1, c.width), ~When("mask_token")),
        same("pos_embed"),
        *(same(_B + n, "block") for n in ("norm1.weight", "norm1.bias", "attn.qkv.weight")),
        same(_B + "attn.qkv.bias", "block", When("qkv_bias")),
        *(same(_B + n, "block") for n in ("attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight",
                                           "norm2.bias", "ls2.gamma")),
        *(same(_B + f"mlp.fc{n}.{w}", "block", PLAIN_MLP) for n in (1, 2) for w in ("weight", "bias")),
        *(Rule(_B + f"mlp.fc{n}.{w}", (_B + f"mlp.{k}.{w}",), IDENTITY, "block", SWIGLU)
          for n, k in ((1, "w12"), (2, "w3")) for w in ("weight", "bias")),
        same("norm.weight"), same("norm.bias"),
    )


CARRIES = (
    heads_carry("num_heads"),
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="DINOv2's attention width is the embedding width"),
    Carry("act", argument="act_layer", default=lambda c: "silu" if c.mlp == "swiglu" else "gelu",
          holds=lambda c: c.mlp != "swiglu" or c.act == "silu", why="DINOv2's SwiGLU gate is SiLU"),
    Carry("norm_eps", values=(1e-6,), why="DINOv2's LayerNorms have eps 1e-6"),
    Carry("qkv_bias"), Carry("mlp"), Carry("num_reg_tokens"),
    Carry("layer_scale", values=(True,), why="the released DINOv2 backbones always have LayerScale"),
    Carry("mask_token", hardcoded="DinoVisionTransformer always has a mask_token (masked training only): "
          "written as zeros", default=True),
    Carry("pos_embed_prefix", holds=lambda c: c.pos_embed_prefix == ("class" if c.num_reg_tokens else "all"),
          why="DINOv2's registers have no position rows"),
    Carry("pos_resize", hardcoded="DINOv2 resizes position tables its own way at other resolutions (interpolate_"
          "offset 0.1 without registers, antialiased bicubic with them): the native resolution is unaffected",
          default=lambda c: "bicubic_aa" if c.num_reg_tokens else "dinov2"),
)


def detect(probe: Probe) -> bool:
    s = probe.shapes
    return "mask_token" in s and "patch_embed.proj.weight" in s and "cls_token" in s and "pos_embed" in s


def infer_config(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in shapes):
        raise MappingError("blocks.{chunk}.{i}: a DINOv2 training checkpoint saved with block_chunks > 0; "
                           "the released hub backbones (block_chunks=0) are supported", path)
    depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
    emb = need(shapes, "patch_embed.proj.weight", "dinov2", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    heads, head_dim = heads_from_attn_dim(need(shapes, "blocks.0.attn.qkv.weight", "dinov2", path)[0] // 3, probe)
    swiglu = "blocks.0.mlp.w12.weight" in shapes
    fc2 = need(shapes, "blocks.0.mlp." + ("w3" if swiglu else "fc2") + ".weight", "dinov2", path)
    regs = shapes["register_tokens"][1] if "register_tokens" in shapes else 0
    g = grid_from_tokens(need(shapes, "pos_embed", "dinov2", path)[1], 1, "pos_embed", path)
    return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                 num_heads=heads, head_dim=head_dim, mlp_dim=fc2[1], num_classes=0,
                 qkv_bias="blocks.0.attn.qkv.bias" in shapes, act="silu" if swiglu else "gelu",
                 layer_scale=True, mask_token=True, num_reg_tokens=regs, pos_embed_prefix="class" if regs else "all",
                 mlp="swiglu" if swiglu else "mlp", pos_resize="bicubic_aa" if regs else "dinov2")


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    """A register model's resize at another resolution is the released ``*_reg`` backbones': the
    file cannot say it, and ``DinoVisionTransformer``'s own defaults resize otherwise."""
    if not cfg.num_reg_tokens:
        return []
    return ["pos_resize='bicubic_aa' assumed at other resolutions: the released *_reg backbones' "
            "interpolate_antialias=True, interpolate_offset=0.0 (DinoVisionTransformer's defaults, False and "
            "0.1, resize otherwise); the native resolution is unaffected"]


def write_notes(cfg: ViTConfig) -> List[str]:
    args = [f"img_size={cfg.image_size}", f"patch_size={cfg.patch_size}", f"embed_dim={cfg.width}",
            f"depth={cfg.depth}", f"num_heads={cfg.num_heads}",
            "ffn_layer='swiglufused'" if cfg.mlp == "swiglu" else f"mlp_ratio={cfg.mlp_dim / cfg.width:g}",
            f"qkv_bias={cfg.qkv_bias}", "init_values=1.0", "block_chunks=0",
            f"num_register_tokens={cfg.num_reg_tokens}",
            f"interpolate_antialias={bool(cfg.num_reg_tokens)}",
            f"interpolate_offset={0.0 if cfg.num_reg_tokens else 0.1}"]
    return ["dinov2: DinoVisionTransformer(" + ", ".join(args) + ") loads it strictly"]


register(Layout(name="dinov2", description="original DINOv2 torch-hub backbone (DinoVisionTransformer)",
                table=lambda cfg: _table(), detect=detect, infer=infer_config, carries=CARRIES,
                write_notes=write_notes, read_notes=read_notes, preprocessing=DINOV2))
