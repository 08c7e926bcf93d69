"""timm ``NaFlexVit`` state dicts (``timm/models/naflexvit.py``: ``naflexvit_base_patch16_siglip``,
``naflexvit_so150m2_patch16_reg1_gap`` ...) <-> canonical.

The blocks, final norm (``norm`` or, after avg pooling, ``fc_norm``), attention pool and head
have timm ``VisionTransformer``'s names and math (:mod:`vitconv.layouts.timm`); the embedding
lives in ``embeds``: ``proj``, an ``nn.Linear`` ``(D, p*p*C)`` over patches flattened
``(row, column, channel)`` (``batch_patchify(channels_last=True)``, the NaFlex data pipeline's
order) that the canonical ``Conv2d`` kernel holds with its axes moved; ``cls_token``,
``reg_token``; ``pos_embed`` ``(1, H, W, D)``, a learned grid that never covers the prefix
tokens (canonical ``pos_embed_prefix='none'``, prefix tokens before the patches).

At another grid (an image of other size or aspect ratio, or NaFlex patches with their
``patch_coord``), ``NaFlexEmbeds`` resizes the grid with ``F.interpolate(mode=
pos_embed_interp_mode, align_corners=False, antialias=True)`` in float32, rows then columns as
the patches run: ``'bicubic'`` by default (canonical ``bicubic_aa``), ``'bilinear'`` in the
SigLIP configurations (canonical ``bilinear``, what SigLIP 2 computes). Padding patches are
masked out of attention and pooling, so the canonical model on the image itself computes what
the NaFlex batch computes for it.

A bare state dict records none of the constructor's semantic arguments: the heads, the
activation (``act_layer``: exact GELU by default, ``gelu_tanh`` for SigLIP), the epsilon and
the interpolation are the carries' arguments. Refused by name: factorized (``pos_embed_y``/
``_x``) and rotary position embeddings, a convolutional projection, patch or embedding norms,
a non-square table. Not seen in a state dict, so not refused: the aspect-preserving resize
(``pos_embed_ar_preserving``, the ``*_par_*`` models), which the canonical model does not compute.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vitconv.config import ACTIVATIONS, ViTConfig
from vitconv.errors import MappingError
from vitconv.layouts.table import Carry, Rule
from vitconv.runtime.preprocess import Usage
from vitconv.layouts.inference import (TIMM_GLOBAL_POOL, TIMM_MAP_PREFIX, build, count_blocks, heads_carry,
                                       heads_from_attn_dim, need, patch_from_columns, timm_directory_config,
                                       timm_map_prefix, timm_model_args, timm_named_arch, timm_pool_carry,
                                       timm_pooling, timm_recorded_heads)
from vitconv.layouts.transforms import IDENTITY, PATCH_LINEAR, LayoutOp
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.timm import _table as _timm_table
from vitconv.layouts.table import When

_E = "embeds."
#: canonical tensors whose timm ViT rows the embedding rows here replace, and ViT's that NaFlexVit lacks
_REPLACED = {"patch_embed.weight", "patch_embed.bias", "cls_token", "reg_token", "pos_embed", "dist_token",
             "pre_logits.weight", "pre_logits.bias", "head_dist.weight", "head_dist.bias"}
#: interpolation NaFlexEmbeds applies (antialias=True, align_corners=False) -> canonical pos_resize
INTERP = {"bicubic": "bicubic_aa", "bilinear": "bilinear"}


def grid_to_rows(a: np.ndarray) -> np.ndarray:
    """``(1, H, W, D)`` learned grid -> canonical ``(1, H*W, D)`` rows, row-major."""
    if a.ndim != 4 or a.shape[0] != 1:
        raise ValueError(f"expected (1, H, W, D), got {a.shape}")
    return np.ascontiguousarray(a.reshape(1, -1, a.shape[-1]))


def rows_to_grid(a: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    return np.ascontiguousarray(a.reshape(1, cfg.grid_size, cfg.grid_size, a.shape[-1]))


GRID_POS = LayoutOp("grid_to_rows", lambda a, cfg: grid_to_rows(a[0]), lambda a, cfg: [rows_to_grid(a, cfg)],
                    shapes=lambda s, cfg: [(1, cfg.grid_size, cfg.grid_size, s[-1])])


@lru_cache(maxsize=None)
def _table(norm_key: str) -> Tuple[Rule, ...]:
    rows = [Rule("patch_embed.weight", (_E + "proj.weight",), PATCH_LINEAR),
            Rule("patch_embed.bias", (_E + "proj.bias",), IDENTITY, "model", When("patch_bias")),
            Rule("cls_token", (_E + "cls_token",), IDENTITY, "model", When("class_token")),
            Rule("reg_token", (_E + "reg_token",), IDENTITY, "model", When("num_reg_tokens")),
            Rule("pos_embed", (_E + "pos_embed",), GRID_POS)]
    return tuple(rows) + tuple(r for r in _timm_table("pos_embed", norm_key) if r.canonical not in _REPLACED)


def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
    return _table("fc_norm" if cfg.final_norm == "pooled" else "norm")


CARRIES = (
    heads_carry("num_heads", "model_args.num_heads"),
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="timm's attention width is the embedding width"),
    Carry("act", values=ACTIVATIONS, key="model_args.act_layer", argument="act_layer", default="gelu"),
    # JSON cannot hold a norm_layer: a directory records the architecture's, timm's LayerNorm (1e-6)
    Carry("norm_eps", key="architecture", records=(1e-6,), argument="norm_layer", default=1e-6),
    Carry("pos_resize", values=tuple(INTERP.values()), key="model_args.pos_embed_interp_mode",
          argument="pos_embed_interp_mode", default="bicubic_aa",
          why="NaFlexVit resizes its grid bicubic or bilinear, antialiased"),
    timm_pool_carry(_E + "cls_token", "model_args.global_pool"), Carry("class_token"), Carry("final_norm"),
    Carry("qkv_bias"), Carry("layer_scale"),
    TIMM_MAP_PREFIX,
    Carry("pool_heads", key="model_args.attn_pool_num_heads", argument="attn_pool_num_heads", default=0,
          written=When("classifier", "==", "map")),
    Carry("num_reg_tokens"), Carry("norm_pre"),
    Carry("pos_embed_prefix", holds=lambda c: c.num_pos_prefix == 0,
          why="NaFlexVit's position grid never covers the prefix tokens"),
    Carry("patch_bias", holds=lambda c: c.patch_bias != c.norm_pre,
          why="timm ties the patch bias to pre_norm (bias = not pre_norm)"),
    Carry("head_bias", hardcoded="timm's head always has a bias: a bias-free head is written with a zero one, "
          "the same function", default=True),
    # rows timm's table has and NaFlexVit's options could fill, which vitconv does not map for it yet
    *(Carry(f, values=(v,), why=f"vitconv maps NaFlexVit with {f}={v!r} only so far")
      for f, v in (("norm", "layernorm"), ("qk_norm", False), ("patch_embed_norm", False), ("proj_bias", True),
                   ("mlp_bias", True))),
)

#: (key that shows it, the feature) for NaFlexVit configurations the canonical model does not compute
_REFUSED = ((_E + "pos_embed_y", "factorized position embeddings (pos_embed='factorized')"),
            (_E + "norm_input.weight", "a LayerNorm over each input patch (input_norm_layer)"),
            (_E + "norm.weight", "a norm after the patch projection (embed_norm_layer)"))


def detect(probe: Probe) -> bool:
    return _E + "proj.weight" in probe.shapes and "blocks.0.attn.qkv.weight" in probe.shapes


def infer(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    for key, feature in _REFUSED:
        if key in shapes:
            raise MappingError(f"a timm NaFlexVit with {feature}: vitconv does not compute this feature yet", path)
    if _E + "pos_embed" not in shapes:
        raise MappingError("a timm NaFlexVit without embeds.pos_embed (rotary or no position embedding): "
                           "vitconv does not compute this feature yet", path)
    depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
    proj = need(shapes, _E + "proj.weight", "timm_naflexvit", path)
    if len(proj) != 2:
        raise MappingError(f"{_E}proj.weight {proj}: a convolutional NaFlexVit patch embedding "
                           "(embed_proj_type='conv') is not read yet; only the Linear one", path)
    args = timm_model_args(probe)
    patch, in_chans = patch_from_columns(proj[1], args.get("patch_size"), args.get("in_chans"),
                                         _E + "proj.weight", path)
    width = proj[0]
    pos = shapes[_E + "pos_embed"]
    if len(pos) != 4 or pos[0] != 1 or pos[3] != width:
        raise MappingError(f"{_E}pos_embed must be (1, H, W, {width}), got {pos}", path)
    if pos[1] != pos[2]:
        raise MappingError(f"{_E}pos_embed is a {pos[1]} x {pos[2]} grid: vitconv's position table is square", path)
    qkv = need(shapes, "blocks.0.attn.qkv.weight", "timm_naflexvit", path)
    if qkv[0] != 3 * width:
        raise MappingError(f"blocks.0.attn.qkv.weight {qkv}: the attention width must equal the embedding "
                           f"width {width}", path)
    recorded = timm_recorded_heads(args, path)
    heads, head_dim = heads_from_attn_dim(width, probe, recorded)
    act, interp = args.get("act_layer", "gelu"), args.get("pos_embed_interp_mode", "bicubic")
    if act not in ACTIVATIONS:
        raise MappingError(f"config.json: act_layer {act!r} is not one vitconv maps ({', '.join(ACTIVATIONS)})", path)
    if interp not in INTERP:
        raise MappingError(f"config.json: pos_embed_interp_mode {interp!r}: vitconv computes "
                           f"{' and '.join(INTERP)} (antialiased)", path)
    for name, bad in (("pos_embed_ar_preserving", True), ("pos_embed_antialias", False),
                      ("pos_embed_align_corners", True), ("pos_embed_use_grid_sample", True)):
        if args.get(name, not bad) == bad:
            raise MappingError(f"config.json: {name}={bad}: a position resize vitconv does not compute yet", path)
    token = _E + "cls_token" in shapes
    reg = shapes.get(_E + "reg_token")
    regs = reg[1] if reg is not None and len(reg) == 3 else 0
    fc_norm = "fc_norm.weight" in shapes
    classifier = timm_pooling(shapes, args, _E + "cls_token", path)
    pool_heads = args.get("attn_pool_num_heads") or 0
    if type(pool_heads) is not int or pool_heads < 0:
        raise MappingError(f"config.json: attn_pool_num_heads {pool_heads!r} is not a head count", path)
    fc2 = need(shapes, "blocks.0.mlp.fc2.weight", "timm_naflexvit", path)
    head = shapes.get("head.weight")
    return build(probe, image_size=pos[1] * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                 num_heads=heads, head_dim=head_dim, mlp_dim=fc2[1], classifier=classifier, class_token=token,
                 num_classes=head[0] if head else 0, qkv_bias="blocks.0.attn.qkv.bias" in shapes,
                 norm_eps=1e-6, act=act, layer_scale="blocks.0.ls1.gamma" in shapes, num_reg_tokens=regs,
                 final_norm="pooled" if fc_norm else ("encoder" if "norm.weight" in shapes else "none"),
                 pos_embed_prefix="none", norm_pre="norm_pre.weight" in shapes,
                 patch_bias=_E + "proj.bias" in shapes, pos_resize=INTERP[interp], pool_heads=pool_heads,
                 map_prefix=timm_map_prefix(args, classifier, int(token) + regs, path))


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    if "patch_size" in timm_model_args(probe):
        return []
    return [f"patch {cfg.patch_size} x {cfg.patch_size} x {cfg.in_chans} channels assumed: embeds.proj's "
            f"{cfg.patch_size ** 2 * cfg.in_chans} columns read as 3-channel patches (the file records neither)"]


def mlp_ratio(cfg: ViTConfig) -> float:
    """The ``mlp_ratio`` whose ``int(embed_dim * mlp_ratio)`` is the MLP width (a plain quotient
    can round to one less)."""
    r = cfg.mlp_dim / cfg.width
    return r if int(cfg.width * r) == cfg.mlp_dim else (cfg.mlp_dim + 0.5) / cfg.width


def model_args(cfg: ViTConfig) -> Dict[str, Any]:
    """``NaFlexVitCfg`` fields (and ``in_chans``, ``num_classes``) under which timm's NaFlexVit
    computes what the canonical model does; each is set, whatever the architecture's defaults."""
    pool = {TIMM_MAP_PREFIX.argument: cfg.map_prefix, "attn_pool_num_heads": cfg.pool_heads or None}
    return dict(patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=mlp_ratio(cfg),
                qkv_bias=cfg.qkv_bias, init_values=1e-5 if cfg.layer_scale else None, class_token=cfg.class_token,
                reg_tokens=cfg.num_reg_tokens, pos_embed_grid_size=[cfg.grid_size, cfg.grid_size],
                pos_embed_interp_mode={v: k for k, v in INTERP.items()}[cfg.pos_resize],
                global_pool=TIMM_GLOBAL_POOL[cfg.classifier],
                fc_norm=cfg.final_norm == "pooled", final_norm=cfg.final_norm != "none", pre_norm=cfg.norm_pre,
                act_layer=cfg.act, **(pool if TIMM_MAP_PREFIX.written.holds(cfg) else {}))


def architecture(cfg: ViTConfig) -> str:
    """A registered NaFlexVit name for a directory's ``config.json`` (``model_args`` set every field)."""
    if cfg.pos_resize == "bilinear":
        return "naflexvit_base_patch16_siglip"
    return "naflexvit_base_patch16_map" if cfg.classifier == "map" else "naflexvit_base_patch16_gap"


def constructor(cfg: ViTConfig) -> str:
    """The timm call whose model computes what the canonical model does."""
    args = {k: v for k, v in model_args(cfg).items() if k not in ("in_chans", "num_classes")}
    args["pos_embed_grid_size"] = tuple(args["pos_embed_grid_size"])
    said = [f"{k}={v!r}" for k, v in args.items()]
    if cfg.norm_eps != 1e-6:
        said.append(f"norm_layer=partial(LayerNorm, eps={cfg.norm_eps:g})")
    return (f"timm NaFlexVit(NaFlexVitCfg({', '.join(said)}), in_chans={cfg.in_chans}, "
            f"num_classes={cfg.num_classes})")


def directory_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> Dict[str, Any]:
    """``config.json`` of a timm model directory, for ``timm.create_model('local-dir:DIR',
    pretrained=True)``."""
    return timm_directory_config(cfg, usage, architecture(cfg), model_args(cfg), first_conv="embeds.proj")


def write_notes(cfg: ViTConfig) -> List[str]:
    return [f"{constructor(cfg)} computes the same function"]


register(Layout(name="timm_naflexvit", description="timm NaFlexVit state dict (naflexvit_*)", table=table,
                detect=detect, infer=infer, carries=CARRIES, write_notes=write_notes, read_notes=read_notes,
                containers=("safetensors", "pt", "dir"), directory_config=directory_config, names_arch=timm_named_arch,
                restates=("num_classes", "model_args.num_classes", "model_args.embed_dim", "model_args.depth",
                          "model_args.patch_size", "model_args.in_chans"),
                loads_with={"dir": "timm.create_model('local-dir:{path}', pretrained=True)"},
                sources=lambda cfg: {"patch_size": "embeds.proj.weight [1] (p*p*C columns)",
                                     "classifier": "attn_pool (map), fc_norm or no cls_token (avg), "
                                                   "else the class token"}))
