"""timm ``Beit`` state dicts (BEiT, BEiT-v2: ``beit_*``, ``beitv2_*``) <-> canonical.

Keys (``timm/models/beit.py``): ``cls_token``, ``pos_embed`` (``use_abs_pos_emb``; the
published BEiT models have none), ``patch_embed.proj``, ``rel_pos_bias.relative_position_bias_table``
(``use_shared_rel_pos_bias``), and per block ``norm1``, ``attn.qkv.weight`` with ``attn.q_bias`` and
``attn.v_bias`` (the key bias is a non-persistent zero buffer: canonical ``qkv.bias`` holds a zero
key third, and a model with another one is refused when written here), ``attn.relative_position_bias_table``
(``use_rel_pos_bias``), ``attn.proj``, ``gamma_1`` / ``gamma_2`` (LayerScale, ``init_values``),
``norm2``, ``mlp.fc1`` / ``mlp.fc2``; then ``norm`` (class-token pooling) or ``fc_norm`` (mean
of the patch tokens, normalised after pooling: ``global_pool='avg'``), ``head``.

Semantics: a relative position table of ``(2g-1)^2 + 3`` rows by heads (so the heads are in the
file) is read through BEiT's index and added to the attention logits, the block's own table
and the shared one summed. timm's ``Beit`` has no dynamic input size: at another resolution a
model built for it loads the weights through ``checkpoint_filter_fn``, which resizes the
relative tables with ``resize_rel_pos_bias_table`` (geometric offsets, linear interpolation;
``rel_pos_resize='geometric'``) and the absolute table bicubic with antialiasing. The
activation is always exact GELU; the LayerNorm epsilon is ``norm_layer``'s (timm's 1e-6), which
a bare state dict does not record. Not read: SwiGLU BEiTs (``mlp.fc1_g``) and ``scale_mlp``.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.inference import build, count_blocks, need
from vitconv.layouts.transforms import IDENTITY, Q_V_BIAS
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import ALWAYS, When

_B = "blocks.{i}."
TABLE = "relative_position_bias_table"
SHARED = "rel_pos_bias." + TABLE


@lru_cache(maxsize=None)
def _table(norm_key: str) -> Tuple[Rule, ...]:
    rows = [Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
            Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY),
            Rule("cls_token", ("cls_token",), IDENTITY),
            Rule("pos_embed", ("pos_embed",), IDENTITY, "model", When("abs_pos_embed")),
            Rule("rel_pos_table", (SHARED,), IDENTITY, "model", When("rel_pos_bias_shared"))]
    for canonical, key, when in (("norm1.weight", "norm1.weight", ALWAYS), ("norm1.bias", "norm1.bias", ALWAYS),
                                 ("attn.rel_pos_table", "attn." + TABLE, When("rel_pos_bias")),
                                 ("attn.qkv.weight", "attn.qkv.weight", ALWAYS),
                                 ("attn.proj.weight", "attn.proj.weight", ALWAYS),
                                 ("attn.proj.bias", "attn.proj.bias", ALWAYS),
                                 ("ls1.gamma", "gamma_1", When("layer_scale")),
                                 ("norm2.weight", "norm2.weight", ALWAYS), ("norm2.bias", "norm2.bias", ALWAYS),
                                 ("mlp.fc1.weight", "mlp.fc1.weight", ALWAYS),
                                 ("mlp.fc1.bias", "mlp.fc1.bias", ALWAYS),
                                 ("mlp.fc2.weight", "mlp.fc2.weight", ALWAYS),
                                 ("mlp.fc2.bias", "mlp.fc2.bias", ALWAYS),
                                 ("ls2.gamma", "gamma_2", When("layer_scale"))):
        rows.append(Rule(_B + canonical, (_B + key,), IDENTITY, "block", when))
    rows += [Rule(_B + "attn.qkv.bias", (_B + "attn.q_bias", _B + "attn.v_bias"), Q_V_BIAS, "block", When("qkv_bias")),
             Rule("norm.weight", (f"{norm_key}.weight",), IDENTITY),
             Rule("norm.bias", (f"{norm_key}.bias",), IDENTITY),
             Rule("head.weight", ("head.weight",), IDENTITY, "model", When("num_classes")),
             Rule("head.bias", ("head.bias",), IDENTITY, "model", When("num_classes"))]
    return tuple(rows)


def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
    return _table("fc_norm" if cfg.final_norm == "pooled" else "norm")


CARRIES = (
    Carry("num_heads"),  # the columns of every relative position table
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="timm's Beit attention width is the embedding width"),
    Carry("act", values=("gelu",), why="timm's Beit always uses exact GELU (nn.GELU)"),
    Carry("norm_eps", argument="norm_layer", default=1e-6),
    Carry("pos_resize", hardcoded="timm resizes the absolute table bicubic with antialiasing when a model of another "
          "img_size loads it (checkpoint_filter_fn): the native resolution is unaffected",
          default=lambda c: "bicubic_aa" if c.abs_pos_embed else "zoom"),  # no table: the one spelling
    Carry("rel_pos_resize", hardcoded="timm resizes relative position tables its geometric way when a model of another "
          "img_size loads them (checkpoint_filter_fn): the native resolution is unaffected", default="geometric"),
    Carry("classifier", values=("token", "gap"), why="timm's Beit pools the class token or the patch tokens' mean"),
    Carry("final_norm", values=("encoder", "pooled"), why="timm's Beit always has norm or fc_norm"),
    Carry("qkv_bias"), Carry("layer_scale"), Carry("rel_pos_bias_shared"),
    Carry("key_bias", holds=lambda c: not c.qkv_bias or not c.key_bias,
          why="timm's Beit has query and value biases only"),
    Carry("rel_pos_bias", holds=lambda c: c.rel_pos_bias or c.rel_pos_bias_shared,
          why="a timm Beit file is told by its relative position tables: a model without any is a timm "
              "VisionTransformer"),
    Carry("abs_pos_embed"),
)


def detect(probe: Probe) -> bool:
    s = probe.shapes
    return ("patch_embed.proj.weight" in s and "blocks.0.attn.qkv.weight" in s and "cls_token" in s
            and (f"blocks.0.attn.{TABLE}" in s or SHARED in s))


def grid_from_table(rows: int, key: str, path) -> int:
    """The side ``g`` of the square patch grid a BEiT table of ``(2g-1)^2 + 3`` rows was made for."""
    side = math.isqrt(max(rows - 3, 0))
    if rows <= 3 or side * side != rows - 3 or side % 2 == 0:
        raise MappingError(f"{key} has {rows} rows, not (2g-1)^2 + 3 for a square grid of side g", path)
    return (side + 1) // 2


def infer(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    if "blocks.0.mlp.fc1_g.weight" in shapes or "blocks.0.mlp.norm.weight" in shapes:
        raise MappingError("a timm Beit with a SwiGLU or normed MLP (swiglu_mlp, scale_mlp): not supported", path)
    depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
    emb = need(shapes, "patch_embed.proj.weight", "timm_beit", path)
    if len(emb) != 4 or emb[2] != emb[3]:
        raise MappingError(f"patch_embed.proj.weight must be a square (out, in, k, k) kernel, got {emb}", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    qkv = need(shapes, "blocks.0.attn.qkv.weight", "timm_beit", path)
    if qkv[0] != 3 * width:
        raise MappingError(f"attn.qkv.weight {qkv}: timm's Beit attention width must equal the embedding "
                           f"width {width}", path)
    per_block, shared = f"blocks.0.attn.{TABLE}" in shapes, SHARED in shapes
    key = f"blocks.0.attn.{TABLE}" if per_block else SHARED
    rel = shapes[key]
    if len(rel) != 2 or rel[1] <= 0 or width % rel[1]:
        raise MappingError(f"{key} {rel} is not (offsets, heads) for heads dividing the width {width}", path)
    heads, g = rel[1], grid_from_table(rel[0], key, path)
    if probe.num_heads is not None and probe.num_heads != heads:
        raise MappingError(f"num_heads={probe.num_heads}, but {key} holds {heads} heads", path)
    fc_norm = "fc_norm.weight" in shapes
    if not fc_norm and "norm.weight" not in shapes:
        raise MappingError("neither norm nor fc_norm: timm's Beit always has one", path)
    fc1 = need(shapes, "blocks.0.mlp.fc1.weight", "timm_beit", path)
    head = shapes.get("head.weight")
    return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                 num_heads=heads, head_dim=width // heads, mlp_dim=fc1[0],
                 classifier="gap" if fc_norm else "token", final_norm="pooled" if fc_norm else "encoder",
                 num_classes=head[0] if head else 0, qkv_bias="blocks.0.attn.q_bias" in shapes, key_bias=False, norm_eps=1e-6,
                 act="gelu", layer_scale="blocks.0.gamma_1" in shapes, rel_pos_bias=per_block,
                 rel_pos_bias_shared=shared, abs_pos_embed="pos_embed" in shapes, pos_resize="bicubic_aa",
                 rel_pos_resize="geometric")


def model_args(cfg: ViTConfig) -> dict:
    """Keyword arguments of ``timm.models.beit.Beit`` under which timm computes the canonical model
    (any ``init_values`` creates ``gamma_1``/``gamma_2``; the weights hold the trained scales)."""
    return dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                num_classes=cfg.num_classes, global_pool="avg" if cfg.classifier == "gap" else "token",
                use_fc_norm=cfg.final_norm == "pooled", embed_dim=cfg.width, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, qkv_bias=cfg.qkv_bias,
                init_values=0.1 if cfg.layer_scale else 0.0, use_abs_pos_emb=cfg.abs_pos_embed,
                use_rel_pos_bias=cfg.rel_pos_bias, use_shared_rel_pos_bias=cfg.rel_pos_bias_shared)


def write_notes(cfg: ViTConfig) -> List[str]:
    call = ", ".join(f"{k}={v!r}" for k, v in model_args(cfg).items())
    if cfg.norm_eps != 1e-6:
        call += f", norm_layer=partial(nn.LayerNorm, eps={cfg.norm_eps:g})"
    return [f"timm: timm.models.beit.Beit({call}) computes the same function"]


register(Layout(name="timm_beit", target="timm", write_rank=1, description="timm Beit state dict (BEiT, BEiT-v2)", table=table,
                detect=detect, infer=infer, carries=CARRIES, write_notes=write_notes,
                sources=lambda cfg: {"image_size": "relative_position_bias_table [0] ((2g-1)^2 + 3 rows) x patch",
                                     "classifier": "fc_norm (mean of the patch tokens), else the class token"}))
