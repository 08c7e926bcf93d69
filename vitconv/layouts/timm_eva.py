"""timm ``Eva`` state dicts <-> canonical: DINOv3 (``rope_type='dinov3'``), EVA (no rotation),
EVA-02 (tiny to large, CLIP), timm's ``*_rope_*`` ViTs (RoPE-Axial, ``_ape``, the SBB
``rope_reg*_gap`` models) and Perception Encoder (``rope_type='cat'``), RoPE-Mixed (``'mixed'``:
learned frequencies ``rope.freqs``, the canonical ``rope_freqs``).

Keys (``timm/models/eva.py``, ``Eva`` with ``qkv_fused=True``): ``cls_token``, ``reg_token``,
``pos_embed`` (``use_abs_pos_emb``; rows for the prefix tokens unless ``no_embed_class``),
``patch_embed.proj`` (no bias with ``use_pre_transformer_norm``), ``norm_pre``,
``blocks.{i}.{gamma_1, gamma_2, norm1, attn.qkv.weight, attn.q_bias + attn.v_bias | attn.qkv.bias,
attn.proj, norm2, mlp.fc1 | mlp.fc1_g + mlp.fc1_x, mlp.fc2}``, ``norm`` (or ``fc_norm``), ``head``.
No rotary tensor: the rotation is computed from the grid (``rope`` and its parameters, timm's
``rope_type``, ``rope_temperature``, ``ref_feat_shape``, ``rope_grid_offset``,
``rope_grid_indexing``, ``rope_rotate_half``, which a bare state dict does not record: the named
architectures whose keys fit decide them, vitconv/archs). Eva's own attention (``attn_type='eva'``)
has query and value biases only (``k_bias`` is a non-persistent zero buffer): the canonical
``qkv.bias`` is ``[q_bias; 0; v_bias]`` with ``key_bias=False``; timm's ``AttentionRope``
(``attn_type='rope'``: the naver RoPE ViTs, Perception Encoder) has one full ``qkv.bias``. SwiGLU is
timm's unpacked ``SwiGLU`` (``swiglu_align_to`` set: ``fc1_g`` the SiLU'd gate, ``fc1_x`` the up
projection) or the packed ``GluMlp`` (EVA-02: ``fc1`` [gate; up]).

Semantics: LayerScale (``gamma_1``/``gamma_2``) where ``init_values`` is set; LayerNorm eps 1e-5 (the
DINOv3 and PE architectures' ``norm_layer``) or Eva's own 1e-6; exact GELU (Eva's ``Mlp`` takes no
activation argument) or a SiLU gate; ``global_pool`` 'avg' (the mean of the patch tokens after the
final norm, or ``fc_norm`` after pooling) or 'token'. RoPE rotates the patch tokens' queries and
keys only (class and register tokens unrotated). The position table is resampled bicubic,
antialiased (``resample_abs_pos_embed``) for another grid (``dynamic_img_size=True``).

EVA-02 B/L (``qkv_fused=False``: ``q_proj``, ``k_proj`` without a bias, ``v_proj``; ``scale_mlp``:
``mlp.norm``; EVA-02 CLIP's ``scale_attn_inner``: ``attn.norm``) and Perception Encoder's core tower
(``global_pool='map'``: ``attn_pool.{latent, q, kv, proj, norm, mlp}``, ``attn_pool_num_heads`` its
own head count) convert too. Other ``Eva`` forms are refused, naming what is not supported yet:
qk-norm and grouped-query attention (Sapiens2),
gated attention, LayerScale on one branch only.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import Usage
from vitconv import archs
from vitconv.layouts.table import Carry, Rule, read_arguments, recorded_arguments
from vitconv.layouts.inference import (TIMM_GLOBAL_POOL, TIMM_POOLS, build, count_blocks, heads_carry,
                                       heads_from_attn_dim, need, timm_directory_config, timm_model_args,
                                       timm_named_arch, timm_recorded_heads)
from vitconv.layouts.transforms import GLU_CONCAT, IDENTITY, Q_KV_CONCAT, Q_V_BIAS, QKV_CONCAT
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import ALWAYS, FINAL_NORM, MAP, When

_B = "blocks.{i}."
_P = "attn_pool."


@lru_cache(maxsize=None)
def _table(norm_key: str) -> Tuple[Rule, ...]:
    rows = [Rule("cls_token", ("cls_token",), IDENTITY, "model", When("class_token")),
            Rule("reg_token", ("reg_token",), IDENTITY, "model", When("num_reg_tokens")),
            Rule("pos_embed", ("pos_embed",), IDENTITY, "model", When("abs_pos_embed")),
            Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
            Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY, "model", When("patch_bias")),
            Rule("rope_freqs", ("rope.freqs",), IDENTITY, "model", When("rope", "==", "mixed")),  # RoPE-Mixed's learned
            Rule("norm_pre.weight", ("norm_pre.weight",), IDENTITY, "model", When("norm_pre")),
            Rule("norm_pre.bias", ("norm_pre.bias",), IDENTITY, "model", When("norm_pre"))]
    for canonical, key, when, op in (
            ("ls1.gamma", "gamma_1", When("layer_scale"), IDENTITY),
            ("ls2.gamma", "gamma_2", When("layer_scale"), IDENTITY),
            ("norm1.weight", "norm1.weight", ALWAYS, IDENTITY), ("norm1.bias", "norm1.bias", ALWAYS, IDENTITY),
            ("attn.qkv.weight", "attn.qkv.weight", ~When("qkv_unfused"), IDENTITY),
            # AttentionRope (attn_type='rope': the *_rope_* ViTs, Perception Encoder): one full qkv bias
            ("attn.qkv.bias", "attn.qkv.bias", ~When("qkv_unfused") & When("qkv_bias") & When("key_bias"), IDENTITY),
            ("attn.norm.weight", "attn.norm.weight", When("attn_norm"), IDENTITY),
            ("attn.norm.bias", "attn.norm.bias", When("attn_norm"), IDENTITY),
            ("mlp.norm.weight", "mlp.norm.weight", When("mlp_norm"), IDENTITY),
            ("mlp.norm.bias", "mlp.norm.bias", When("mlp_norm"), IDENTITY),
            ("attn.proj.weight", "attn.proj.weight", ALWAYS, IDENTITY),
            ("attn.proj.bias", "attn.proj.bias", ALWAYS, IDENTITY),
            ("norm2.weight", "norm2.weight", ALWAYS, IDENTITY), ("norm2.bias", "norm2.bias", ALWAYS, IDENTITY),
            ("mlp.fc1.weight", "mlp.fc1.weight", ~When("swiglu_unpacked"), IDENTITY),
            ("mlp.fc1.bias", "mlp.fc1.bias", ~When("swiglu_unpacked"), IDENTITY),
            ("mlp.fc2.weight", "mlp.fc2.weight", ALWAYS, IDENTITY),
            ("mlp.fc2.bias", "mlp.fc2.bias", ALWAYS, IDENTITY)):
        rows.append(Rule(_B + canonical, (_B + key,), op, "block", when))
    qkv = tuple(_B + f"attn.{p}_proj." for p in "qkv")  # qkv_fused=False (EVA-02 CLIP)
    rows += [Rule(_B + "attn.qkv.bias", (_B + "attn.q_bias", _B + "attn.v_bias"), Q_V_BIAS, "block",
                  ~When("qkv_unfused") & When("qkv_bias") & ~When("key_bias")),
             Rule(_B + "attn.qkv.weight", tuple(k + "weight" for k in qkv), QKV_CONCAT, "block", When("qkv_unfused")),
             Rule(_B + "attn.qkv.bias", (qkv[0] + "bias", qkv[2] + "bias"), Q_V_BIAS, "block",
                  When("qkv_unfused") & When("qkv_bias") & ~When("key_bias")),
             Rule(_B + "attn.qkv.bias", tuple(k + "bias" for k in qkv), QKV_CONCAT, "block",
                  When("qkv_unfused") & When("qkv_bias") & When("key_bias")),
             Rule(_B + "mlp.fc1.weight", (_B + "mlp.fc1_g.weight", _B + "mlp.fc1_x.weight"), GLU_CONCAT, "block",
                  When("swiglu_unpacked")),
             Rule(_B + "mlp.fc1.bias", (_B + "mlp.fc1_g.bias", _B + "mlp.fc1_x.bias"), GLU_CONCAT, "block",
                  When("swiglu_unpacked")),
             Rule("norm.weight", (f"{norm_key}.weight",), IDENTITY, "model", FINAL_NORM),
             Rule("norm.bias", (f"{norm_key}.bias",), IDENTITY, "model", FINAL_NORM),
             # AttentionPoolLatent (global_pool='map': Perception Encoder core): q and [k; v] apart
             Rule(_P + "latent", (_P + "latent",), IDENTITY, "model", MAP),
             Rule(_P + "qkv.weight", (_P + "q.weight", _P + "kv.weight"), Q_KV_CONCAT, "model", MAP),
             Rule(_P + "qkv.bias", (_P + "q.bias", _P + "kv.bias"), Q_KV_CONCAT, "model", MAP),
             *(Rule(_P + n, (_P + n,), IDENTITY, "model", MAP)
               for n in ("proj.weight", "proj.bias", "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                         "mlp.fc2.weight", "mlp.fc2.bias")),
             Rule("head.weight", ("head.weight",), IDENTITY, "model", When("num_classes")),
             Rule("head.bias", ("head.bias",), IDENTITY, "model", When("num_classes"))]
    return tuple(rows)


def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
    return _table("fc_norm" if cfg.final_norm == "pooled" else "norm")


def _eva_act(cfg: ViTConfig) -> str:
    return "silu" if cfg.mlp == "swiglu" else "gelu"


def _dinov3_form(class_token: bool, reg_tokens: int, layer_scale: bool, table: bool, key_bias: bool) -> bool:
    """Whether an Eva has the DINOv3 models' form (class and storage tokens, LayerScale, no position
    table, query and value biases only): what a bare file's rotary form is taken to be then (every
    timm architecture of that form is a DINOv3 one); else Eva's own default, no rotation
    (``use_rot_pos_emb=False``). The table of named architectures decides the rest."""
    return class_token and reg_tokens > 0 and layer_scale and not table and not key_bias


def _bare_rope(cfg: ViTConfig) -> str:
    if cfg.rope == "mixed":  # its frequencies are a tensor: the file says it
        return "mixed"
    return "dinov3" if _dinov3_form(cfg.class_token, cfg.num_reg_tokens, cfg.layer_scale, cfg.abs_pos_embed,
                                     cfg.qkv_bias and cfg.key_bias) else "none"


def _theta(rope: str) -> float:
    """The rotary base where a directory names the form but not the base: the DINOv3 architectures'
    100, else Eva's own 10000."""
    return 100.0 if rope == "dinov3" else 10000.0


#: LayerNorm epsilons a timm directory's architecture name can record (its norm_layer's)
_ARCH_EPS = {1e-5: "vit_small_patch16_dinov3", 1e-6: "vit_small_patch16_rope_224"}

_ROTATES = When("rope", "!=", "none")
#: What DINOv3's rotary form fixes of the parameters EVA's varies.
_DINOV3_FIXED = {"rope_half": True, "rope_grid_offset": 0, "rope_indexing": "ij"}
#: The rotary fields: these rows are the one place their constructor arguments are named (read from a
#: directory's ``model_args`` and written to it, in this order, only for a model that rotates). A bare
#: file's reading (DINOv3's or none) spells them as the config does without them (``default``).
ROTARY = (
    Carry("rope", values=("none", "dinov3", "cat", "mixed"), key="model_args.rope_type", argument="rope_type",
          default=_bare_rope, why="timm's Eva computes these rotary forms here", written=_ROTATES),
    Carry("rope_theta", key="model_args.rope_temperature", argument="rope_temperature", default=100.0,
          written=_ROTATES),
    Carry("rope_half", key="model_args.rope_rotate_half", argument="rope_rotate_half", default=True,
          written=_ROTATES),
    Carry("rope_grid_offset", key="model_args.rope_grid_offset", argument="rope_grid_offset", default=0.0,
          written=_ROTATES),
    Carry("rope_indexing", key="model_args.rope_grid_indexing", argument="rope_grid_indexing", default="ij",
          written=_ROTATES),
    Carry("rope_ref_grid", key="model_args.ref_feat_shape", argument="ref_feat_shape", default=None,
          written=When("rope", "==", "cat")),
)

CARRIES = (
    heads_carry("num_heads", "model_args.num_heads"),
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="timm Eva's attention width is the embedding width"),
    Carry("act", holds=lambda c: c.act == _eva_act(c),
          why="timm's Eva takes no activation: exact GELU, or a SiLU gate in its SwiGLU"),
    # a directory records it through its architecture's norm_layer (DINOv3's 1e-5, Eva's own 1e-6)
    Carry("norm_eps", key="architecture", records=tuple(_ARCH_EPS), argument="norm_layer",
          default=lambda c: 1e-5 if _bare_rope(c) == "dinov3" else 1e-6),
    Carry("qkv_bias"),
    Carry("key_bias"),
    Carry("layer_scale"),
    Carry("class_token"),
    Carry("num_reg_tokens"),
    Carry("classifier", values=("token", "gap", "map"), key="model_args.global_pool", argument="global_pool",
          default="gap", holds=lambda c: c.classifier != "map" or c.act == "gelu",
          why="timm's Eva pools the class token, the patch tokens' mean or attention (its pool's MLP a GELU one)"),
    Carry("pool_head", values=("siglip",), why="timm's Eva pools with AttentionPoolLatent (SigLIP's form)"),
    Carry("pool_heads", key="model_args.attn_pool_num_heads", argument="attn_pool_num_heads", default=0),
    Carry("final_norm"),
    Carry("mlp"),
    Carry("swiglu_unpacked"),
    Carry("abs_pos_embed"),
    Carry("pos_embed_prefix", values=("all", "none"),
          why="timm's Eva gives the table rows for every prefix token or none (no_embed_class)"),
    Carry("pos_resize", holds=lambda c: not c.abs_pos_embed or c.pos_resize == "bicubic_aa",
          why="timm's Eva resamples its table bicubic, antialiased"),
    Carry("norm_pre"),
    Carry("qkv_unfused"),
    Carry("attn_norm"),
    Carry("mlp_norm", holds=lambda c: not (c.mlp_norm and c.mlp == "swiglu" and not c.swiglu_unpacked),
          why="timm's Eva normalises a SwiGLU's hidden in its unpacked SwiGLU only (fc1_g/fc1_x)"),
    Carry("patch_bias", holds=lambda c: c.patch_bias != c.norm_pre,
          why="timm's Eva has a patch bias exactly when it has no pre-norm (use_pre_transformer_norm)"),
    *ROTARY,
)

#: Keys only the Eva class writes (its own LayerScale, bias and MLP names, rotary frequencies).
_EVA_MARKERS = ("blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.mlp.fc1_g.weight",
                "blocks.0.attn.q_proj.weight", "rope.freqs")


def detect(probe: Probe) -> bool:
    """An Eva state dict: its own LayerScale (``gamma_1``), query/value biases, separate q/k/v or
    rotary frequencies; unpacked SwiGLU alone (AIMv2's too in timm's ``VisionTransformer``) only
    where that table cannot be (no position table, or no fused qkv). Every Eva form is this
    layout's, to read or to refuse by name; BEiT's (relative position tables) is timm_beit's."""
    s = probe.shapes
    if "patch_embed.proj.weight" not in s or any(k.endswith("relative_position_bias_table") for k in s):
        return False  # not timm's; or BEiT's (timm_beit)
    if not any(k in s for k in _EVA_MARKERS):
        return archs.layouts_with(s) == {"timm_eva"}  # a plain ViT's keys that only Eva models have (PE)
    if any(k in s for k in _EVA_MARKERS if k != "blocks.0.mlp.fc1_g.weight"):
        return True
    table = "pos_embed" in s or "pos_embedding.pos_embedding" in s  # timm's and the PositionEmbs variant's
    return not table or "blocks.0.attn.qkv.weight" not in s


def _not_yet(probe: Probe) -> Optional[str]:
    """What Eva form vitconv does not compute the keys show, in words; None when it does."""
    s = probe.shapes
    if "blocks.0.attn.q_norm.weight" in s or "blocks.0.attn.k_norm.weight" in s:
        return "qk-norm (Sapiens2)"
    if "blocks.0.attn.q_proj.weight" in s and s.get("blocks.0.attn.k_proj.weight") != s["blocks.0.attn.q_proj.weight"]:
        return "fewer key/value heads than query heads (grouped-query attention)"
    if "blocks.0.attn.gate.weight" in s:
        return "a gated attention output"
    if ("blocks.0.gamma_1" in s) != ("blocks.0.gamma_2" in s):
        return "LayerScale on one branch only (attn_only_layer_scale)"
    if "blocks.0.attn.qkv.weight" not in s and "blocks.0.attn.q_proj.weight" not in s:
        return "no query/key/value projections"
    return None


def _rope_args(args: Dict[str, Any], bare_rope: str, path: Optional[str]) -> Dict[str, Any]:
    """The rotary fields from a timm directory's ``model_args``, else what Eva assumes for a bare file."""
    if args.get("use_rot_pos_emb", True) is False:
        return dict(rope="none")
    rope = args.get("rope_type", bare_rope)
    if rope == "none":
        return dict(rope="none")
    if rope not in ("dinov3", "cat", "mixed") or (rope == "mixed") != (bare_rope == "mixed"):
        raise MappingError(f"config.json: rope_type={rope!r}: vitconv computes timm Eva's 'dinov3', 'cat' and "
                           "'mixed' rotary forms only, 'mixed' with its rope.freqs", path)
    said = read_arguments(ROTARY[1:], args, "model_args.", path)  # the parameters, each checked
    if rope == "mixed":  # learned frequencies: only the axis order is not in the tensor
        return dict(rope="mixed", rope_indexing=said.get("rope_indexing", "ij"))
    theta = said.get("rope_theta", _theta(rope))
    if theta <= 0:
        raise MappingError(f"config.json: rope_temperature {theta!r} is not a positive number", path)
    out: Dict[str, Any] = dict(rope=rope, rope_theta=theta)
    if rope == "dinov3":
        for c in ROTARY:
            want = _DINOV3_FIXED.get(c.field)
            if c.field in _DINOV3_FIXED and c.field in said and said[c.field] != want:
                name = c.key.split(".")[-1]
                raise MappingError(f"config.json: {name}={args[name]!r}: vitconv computes DINOv3's rotary form "
                                   f"with {name}={want!r} only", path)
        return out
    # timm Eva's own defaults where a directory names the form but not a parameter
    return {**dict(rope_ref_grid=None, rope_grid_offset=0.0, rope_indexing="ij", rope_half=False), **said, **out}


def infer_config(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    other = _not_yet(probe)
    if other is not None:
        raise MappingError(f"a timm Eva with {other}: vitconv does not compute this feature yet", path)
    args = timm_model_args(probe)
    depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
    emb = need(shapes, "patch_embed.proj.weight", "timm_eva", path)
    if len(emb) != 4 or emb[2] != emb[3]:
        raise MappingError(f"patch_embed.proj.weight must be a square (out, in, k, k) kernel, got {emb}", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    unfused = "blocks.0.attn.q_proj.weight" in shapes
    qkv = need(shapes, "blocks.0.attn.qkv.weight", "timm_eva", path) if not unfused else \
        tuple([3 * shapes["blocks.0.attn.q_proj.weight"][0]] + list(shapes["blocks.0.attn.q_proj.weight"][1:]))
    if qkv[0] != 3 * width:
        raise MappingError(f"attn.qkv.weight {qkv}: timm Eva's attention width must equal the embedding "
                           f"width {width}", path)
    recorded = timm_recorded_heads(args, path)
    if recorded is None and len(shapes.get("rope.freqs", ())) == 4:  # RoPE-Mixed's frequencies record it
        recorded = shapes["rope.freqs"][2]
    heads, head_dim = heads_from_attn_dim(width, probe, recorded)
    unpacked = "blocks.0.mlp.fc1_g.weight" in shapes
    fc2 = need(shapes, "blocks.0.mlp.fc2.weight", "timm_eva", path)
    fc1 = shapes.get("blocks.0.mlp.fc1_g.weight" if unpacked else "blocks.0.mlp.fc1.weight", (0,))
    swiglu = unpacked or fc1[0] == 2 * fc2[1]
    class_token, reg = "cls_token" in shapes, shapes.get("reg_token", (1, 0, width))
    regs = reg[1] if len(reg) == 3 else 0
    layer_scale = "blocks.0.gamma_1" in shapes
    table = shapes.get("pos_embed")
    n_prefix = int(class_token) + regs
    prefix = "all"
    if table is not None:
        if len(table) != 3 or table[0] != 1 or table[2] != width:
            raise MappingError(f"pos_embed {table} is not (1, tokens, {width})", path)
        rows = table[1]
        g = math.isqrt(rows)
        if g * g != rows:  # no_embed_class=False: every prefix token has a row
            g = math.isqrt(rows - n_prefix)
            if g * g != rows - n_prefix or rows == n_prefix:
                raise MappingError(f"pos_embed has {rows} rows: not a square grid, with or without the "
                                   f"{n_prefix} prefix token(s)", path)
        else:
            prefix = "none" if n_prefix else "all"
    key_bias = "blocks.0.attn.k_proj.bias" in shapes if unfused else "blocks.0.attn.qkv.bias" in shapes
    qkv_bias = key_bias or ("blocks.0.attn.q_proj.bias" if unfused else "blocks.0.attn.q_bias") in shapes
    bare = "mixed" if "rope.freqs" in shapes else \
        "dinov3" if _dinov3_form(class_token, regs, layer_scale, table is not None, key_bias) else "none"
    named = archs.table().get(timm_named_arch(probe) or "")
    if named is not None and named.layout == "timm_eva" and "mixed" not in (bare, named.value("rope")) \
            and named.says("rope"):  # a directory naming its architecture: the form its config.json leaves out
        bare = named.value("rope")
    rope = _rope_args(args, bare, path)
    freqs = shapes.get("rope.freqs")
    if freqs is not None and tuple(freqs) != (2, depth, heads, head_dim // 2):
        raise MappingError(f"rope.freqs {tuple(freqs)} is not (2, depth {depth}, heads {heads}, head_dim/2 "
                           f"{head_dim // 2})", path)
    pool = "map" if _P + "latent" in shapes else args.get("global_pool", "avg")
    if pool not in TIMM_POOLS:
        raise MappingError(f"config.json: global_pool {pool!r}: the canonical model pools 'avg', 'token' or "
                           "'map'", path)
    pool_heads = args.get("attn_pool_num_heads") if pool == "map" else None
    if pool_heads is not None and (type(pool_heads) is not int or pool_heads <= 0):
        raise MappingError(f"config.json: attn_pool_num_heads {pool_heads!r} is not a positive integer", path)
    final = "pooled" if "fc_norm.weight" in shapes else ("encoder" if "norm.weight" in shapes else "none")
    head = shapes.get("head.weight")
    eps = named.norm_eps if named is not None and named.layout == "timm_eva" and named.norm_eps else \
        (1e-5 if _dinov3_form(class_token, regs, layer_scale, table is not None, key_bias) else 1e-6)
    size = args.get("img_size")
    if table is not None:
        size = g * patch
    elif type(size) is not int or size <= 0 or size % patch:  # no table: the weights do not say
        size = patch * max(224 // patch, 1)
    return build(probe, image_size=size,
                 patch_size=patch, in_chans=in_chans, width=width, depth=depth, num_heads=heads, head_dim=head_dim,
                 mlp_dim=fc2[1], classifier=TIMM_POOLS[pool], pool_heads=pool_heads or 0, num_classes=head[0] if head else 0,
                 qkv_bias=qkv_bias, key_bias=key_bias or not qkv_bias, norm_eps=eps,
                 act="silu" if swiglu else "gelu", final_norm=final, layer_scale=layer_scale,
                 class_token=class_token, num_reg_tokens=regs, mlp="swiglu" if swiglu else "mlp",
                 swiglu_unpacked=unpacked, abs_pos_embed=table is not None, pos_embed_prefix=prefix,
                 pos_resize="bicubic_aa", norm_pre="norm_pre.weight" in shapes,
                 patch_bias="patch_embed.proj.bias" in shapes, qkv_unfused=unfused,
                 attn_norm="blocks.0.attn.norm.weight" in shapes, mlp_norm="blocks.0.mlp.norm.weight" in shapes, **rope)


# --------------------------------------------------------------------------- writing
def architecture(cfg: ViTConfig) -> str:
    """An Eva architecture whose defaults hold what ``model_args`` cannot say: the LayerNorm
    epsilon of its ``norm_layer`` (the DINOv3 and PE ones' 1e-5, Eva's own 1e-6), and the two
    arguments whose absence is None (timm's ``create_model`` drops None-valued arguments, so the
    architecture's own ``init_values`` and ``ref_feat_shape`` stand): no LayerScale needs one
    without ``init_values``, no reference grid one without ``ref_feat_shape``. ``model_args``
    override every other size, flag and rotary parameter."""
    ref = cfg.rope == "cat" and cfg.rope_ref_grid is not None
    if cfg.norm_eps == 1e-5:
        if not cfg.layer_scale:
            return "vit_pe_spatial_tiny_patch16_512"  # ref_feat_shape (32, 32): a 'cat' one says its own
        return "vit_small_plus_patch16_dinov3" if cfg.mlp == "swiglu" else "vit_small_patch16_dinov3"
    if cfg.layer_scale:
        return "vit_base_patch16_rope_reg1_gap_256" if ref else "vit_small_patch16_rope_224"
    return "eva02_tiny_patch14_224" if ref else "eva_giant_patch14_224"


def _no_dir_arch(cfg: ViTConfig) -> bool:
    """Whether no architecture holds ``cfg``'s None-valued arguments (see :func:`architecture`)."""
    return cfg.norm_eps == 1e-5 and not cfg.layer_scale and cfg.rope == "cat" and cfg.rope_ref_grid is None


def model_args(cfg: ViTConfig) -> Dict[str, Any]:
    """Keyword arguments under which timm's ``Eva`` computes what the canonical model does, every
    one the architecture's defaults could otherwise decide said. A key bias needs timm's
    ``AttentionRope`` (``attn_type='rope'``, one full qkv bias); Eva's own attention has query and
    value biases only. Unpacked SwiGLU needs ``swiglu_align_to`` set (else Eva packs fc1,
    ``GluMlp``): the MLP width is reached as ``int(width * mlp_ratio)`` rounded up to it."""
    kw: Dict[str, Any] = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                              num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth,
                              num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias, qkv_fused=not cfg.qkv_unfused,
                              attn_type="rope" if cfg.qkv_bias and cfg.key_bias else "eva",
                              init_values=1e-5 if cfg.layer_scale else None,
                              global_pool=TIMM_GLOBAL_POOL[cfg.classifier],
                              use_fc_norm=cfg.final_norm == "pooled",
                              use_post_transformer_norm=cfg.final_norm == "encoder",
                              use_pre_transformer_norm=cfg.norm_pre, class_token=cfg.class_token,
                              num_reg_tokens=cfg.num_reg_tokens, use_abs_pos_emb=cfg.abs_pos_embed,
                              no_embed_class=cfg.abs_pos_embed and cfg.pos_embed_prefix == "none",
                              use_rot_pos_emb=cfg.rope != "none", scale_mlp=cfg.mlp_norm, scale_attn_inner=cfg.attn_norm,
                              dynamic_img_size=True)
    if cfg.classifier == "map":  # AttentionPoolLatent: its MLP as wide as the blocks'
        kw.update(attn_pool_num_heads=cfg.pool_heads or cfg.num_heads, attn_pool_mlp_ratio=cfg.mlp_dim / cfg.width)
    kw.update(recorded_arguments(ROTARY, cfg, "model_args."))
    if cfg.swiglu_unpacked:
        kw.update(swiglu_mlp=True, mlp_ratio=cfg.mlp_dim / cfg.width, swiglu_align_to=8 if cfg.mlp_dim % 8 == 0 else 1)
    else:  # GluMlp packs [gate; up] in fc1, mlp_ratio its full width (EVA-02's int(width * 4 * 2 / 3) * 2)
        kw.update(swiglu_mlp=cfg.mlp == "swiglu", mlp_ratio=cfg.mlp_dim / cfg.width, swiglu_align_to=0)
    return kw


def write_notes(cfg: ViTConfig) -> List[str]:
    call = ", ".join(f"{k}={v!r}" for k, v in model_args(cfg).items())
    notes = [f"timm: Eva({call}, norm_layer=partial(LayerNorm, eps={cfg.norm_eps:g})) computes the same function"]
    if _no_dir_arch(cfg):
        notes.append("no timm Eva architecture with LayerNorm eps 1e-5 and no LayerScale rotates without a "
                     "reference grid, and timm's create_model drops ref_feat_shape=None: a timm directory of this "
                     "model rebuilds it with (32, 32); load the bare file into the Eva above instead")
    if cfg.norm_eps not in _ARCH_EPS:
        notes.append(f"LayerNorm eps {cfg.norm_eps:g}: no Eva architecture's default; a timm directory's "
                     "config.json cannot say it, so build the model with the norm_layer above")
    return notes


def eva_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> Dict[str, Any]:
    """``config.json`` of a timm model directory: ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    return timm_directory_config(cfg, usage, architecture(cfg), model_args(cfg))


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    if cfg.rope == "none" or cfg.abs_pos_embed:
        return [] if cfg.rope == "none" else [f"RoPE {cfg.rope} (theta {cfg.rope_theta:g}) computed from the grid "
                                              "at any input size"]
    said = "config.json's img_size" if isinstance(timm_model_args(probe).get("img_size"), int) else \
        "assumed: timm's default img_size 224, rounded down to a multiple of the patch (no position table records it)"
    return [f"RoPE {cfg.rope} (theta {cfg.rope_theta:g}) computed from the grid at any input size; the native "
            f"size {cfg.image_size} is {said}: --image-size sets another"]


def sources(cfg: ViTConfig) -> Dict[str, str]:
    return {"mlp": "mlp.fc1_g/fc1_x (SwiGLU) or mlp.fc1", "qkv_bias": "attn.q_bias and attn.v_bias, or attn.qkv.bias",
            "key_bias": "attn.qkv.bias (AttentionRope), else none: Eva's k_bias is a zero buffer",
            "abs_pos_embed": "pos_embed", "layer_scale": "gamma_1/gamma_2", "norm_pre": "norm_pre",
            "num_reg_tokens": "reg_token [1]", "final_norm": "norm (encoder) or fc_norm (pooled)"}


register(Layout(name="timm_eva", target="timm", description="timm Eva state dict (DINOv3, EVA, the *_rope_* ViTs: rope_type 'dinov3'/'cat')",
                table=table, detect=detect, infer=infer_config, carries=CARRIES,
                containers=("safetensors", "pt", "dir"), names_arch=timm_named_arch, directory_config=eva_config,
                restates=("num_classes", "model_args.num_classes", "model_args.embed_dim", "model_args.depth",
                          "model_args.patch_size", "model_args.in_chans"),
                write_notes=write_notes, read_notes=read_notes, sources=sources,
                loads_with={"dir": "timm.create_model('local-dir:{path}', pretrained=True)"}))
