"""The original DINOv3 checkpoints (``facebookresearch/dinov3``, ``dinov3_vits16`` … ``dinov3_vit7b16``,
the ``*.pth`` the hub loads) <-> canonical.

Keys (``DinoVisionTransformer``; every one is named by transformers' conversion script,
``convert_dinov3_vit_to_hf.py``): ``cls_token`` (1, 1, D), ``storage_tokens`` (1, R, D; absent
without storage tokens), ``mask_token`` (1, D; masked training only), ``patch_embed.proj``,
``rope_embed.periods`` (a persistent buffer), ``blocks.{i}.{norm1, attn.qkv.{weight, bias,
bias_mask}, attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 | mlp.w1/w2/w3, ls2.gamma}``, ``norm``,
and in some ``local_cls_norm`` (training only); no head.

Semantics: tokens [class, storage, patches]; no position table: RoPE rotates the patch tokens'
queries and keys, coordinates normalised per axis (``normalize_coords='separate'``, the released
models'); ``forward`` returns the class token after ``norm``. The script's facts, each kept here:
- ``attn.qkv`` is one fused projection (split into q/k/v by rows). With ``mask_k_bias`` it is a
  ``LinearKMaskedBias``: the bias is multiplied by the buffer ``bias_mask`` (1 on the query and
  value thirds, 0 on the key's), so the key third is dead; the script drops ``bias_mask`` and the
  key bias. Canonical: ``key_bias=False``, the key third held at zero; the mask is checked to be
  exactly that and written back as it. A stored key third is never computed with (released: 0).
  Without a ``bias_mask`` (plain ``nn.Linear``) the key bias is live: ``key_bias=True``.
- ``rope_embed.periods`` (the script drops it: transformers recomputes ``inv_freq``) is
  ``base ** (4k / head_dim)``, ``k < head_dim / 4``: its length records the head size (so the head
  count), its values ``rope_theta`` (``pos_embed_rope_base``), read by :func:`from_values`. The
  released checkpoints store it in bfloat16 and the model computes with those rounded values
  (loaded into its float32 buffer): ``rope_periods='bfloat16'``; timm and transformers recompute
  float32 periods, so such a model is refused as theirs. Periods of another form (the
  ``min_period``/``max_period`` construction, a changed buffer) are refused. Written, the buffer
  is made from ``rope_theta`` in float32 (NumPy's correctly rounded power: torch's float32
  ``pow`` can differ from it in the last bit, which the reading tolerates).
- ``mask_token`` is (1, D) here, (1, 1, D) in transformers; ``w1``/``w2``/``w3`` are the SwiGLU's
  gate (SiLU'd), up and down projections (canonical ``fc1`` = [w1; w2]).
- ``local_cls_norm`` (``untie_global_and_local_cls_norm``) normalises the local crops' class
  token in training only: left out. ``cls_norm`` (``untie_cls_and_patch_norms``) would normalise
  the class and storage tokens apart at inference: refused (no released model has it).
LayerNorm eps: ``norm_layer='layernormbf16'`` (eps 1e-5, every released model) or
``'layernorm'`` (1e-6); a bare state dict does not say which.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.layouts.table import Carry, Rule, fill
from vitconv.layouts.hf_dinov3 import DINOV3
from vitconv.layouts.inference import build, count_blocks, need
from vitconv.layouts.transforms import GLU_CONCAT, IDENTITY, LayoutOp
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import ALWAYS, PLAIN_MLP, SWIGLU, When

_B = "blocks.{i}."
PERIODS = "rope_embed.periods"


# --------------------------------------------------------------------------- the rotary periods
def to_bfloat16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def periods(theta: float, head_dim: int, precision: str = "float32") -> np.ndarray:
    """``theta ** (4k / head_dim)`` for ``k < head_dim / 4`` (the original's
    ``base ** (2k / (head_dim / 2))``), float32 (rounded once from float64), bfloat16-rounded on
    request. torch's float32 ``pow`` may differ from this in the last bit: see :func:`_matches`."""
    k = np.arange(head_dim // 4, dtype=np.float64)
    p = (np.float64(theta) ** (4.0 * k / head_dim)).astype(np.float32)
    return to_bfloat16(p) if precision == "bfloat16" else p


def _matches(stored: np.ndarray, theta: float, head_dim: int, precision: str) -> bool:
    """Whether ``stored`` periods are those of ``theta``: float32 ones to within 2 units in the
    last place (torch's and numpy's float32 ``pow`` differ by one here and there: an angle change
    of 1e-7 relative); bfloat16-rounded ones exactly, or the rounding of a neighbouring float32
    (the double rounding of torch's own bfloat16 ``pow``)."""
    want = periods(theta, head_dim)
    if stored.shape != want.shape:
        return False
    if precision == "float32":
        return bool(np.all(np.abs(stored.astype(np.float64) - want) <= 2 * np.spacing(want)))
    near = [to_bfloat16(np.nextafter(want, w)) for w in (np.float32(0), np.float32(np.inf))]
    return bool(np.all((stored == to_bfloat16(want)) | (stored == near[0]) | (stored == near[1])))


def precision_of(stored: np.ndarray) -> str:
    """bfloat16 where every period is a bfloat16 value (the released checkpoints), else float32."""
    return "bfloat16" if np.array_equal(to_bfloat16(stored), stored) else "float32"


def theta_of(stored: np.ndarray, head_dim: int, path: Optional[str]) -> Tuple[Optional[float], str]:
    """``(rope_theta, precision)`` the periods were made with; theta None where one period (1)
    cannot say it. The simplest decimal theta that makes exactly these periods wins (100, not
    100.00001): every theta that does computes the same. Refuses any other form."""
    p = np.asarray(stored, np.float32).reshape(-1)
    if p.size != head_dim // 4 or not np.all(np.isfinite(p)) or not np.all(p > 0):
        raise MappingError(f"{PERIODS} {tuple(stored.shape)} must hold head_dim / 4 = {head_dim // 4} positive "
                           "finite periods", path)
    if p[0] != 1:
        raise MappingError(f"{PERIODS}[0] is {float(p[0]):g}, not 1: not the periods base ** (4k / head_dim) "
                           "(pos_embed_rope_base); the min_period/max_period form is not supported", path)
    precision = precision_of(p)
    if p.size == 1:
        return None, "float32"
    k = np.arange(p.size, dtype=np.float64)
    estimate = math.exp(float(np.sum(k * np.log(p.astype(np.float64))) / np.sum(k * k)) * p.size)
    for digits in range(1, 17):
        theta = float(f"{estimate:.{digits}g}")
        if theta > 0 and _matches(p, theta, head_dim, precision):
            exact = periods(theta, head_dim)  # bfloat16 values already (theta 100, 8-dim heads: 1, 10)
            return theta, "float32" if np.array_equal(to_bfloat16(exact), exact) else precision
    raise MappingError(f"{PERIODS} are not base ** (4k / head_dim) for any base (nearest: {estimate:.6g}): "
                       "not DINOv3's rotary periods", path)


def from_values(cfg: ViTConfig, read: Callable[[str], Any], path: Optional[str]) -> ViTConfig:
    """``rope_theta`` and ``rope_periods`` from the stored periods (only a shape is in the header)."""
    theta, precision = theta_of(np.asarray(read(PERIODS)), cfg.head_dim, path)
    return cfg.replace(rope_theta=cfg.rope_theta if theta is None else theta, rope_periods=precision)


def _with_periods(cls: np.ndarray, stored: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    if not _matches(np.asarray(stored, np.float32).reshape(-1), cfg.rope_theta, cfg.head_dim, cfg.rope_periods):
        raise ValueError(f"{PERIODS} are not those of rope_theta {cfg.rope_theta:g} ({cfg.rope_periods})")
    # the common type of the two, as declared for the rule's output (a float16 model whose buffer
    # stayed float32 gets a float32 class token: the same values)
    return np.ascontiguousarray(cls, np.result_type(cls, stored))


#: ``rope_embed.periods`` holds no weight: read with the class token, it is checked against the
#: config (:func:`from_values` read the config from it); written from ``rope_theta``, float32
#: (the buffer's dtype in the hub's models; a bfloat16 value is exact in float32).
CLS_PERIODS = LayoutOp("cls_token_and_rope_periods", lambda a, cfg: _with_periods(a[0], a[1], cfg),
                       lambda a, cfg: [np.ascontiguousarray(a), periods(cfg.rope_theta, cfg.head_dim, cfg.rope_periods)],
                       2, shapes=lambda s, cfg: [tuple(s), (cfg.head_dim // 4,)])


# --------------------------------------------------------------------------- the masked key bias
def _mask(n: int, dtype) -> np.ndarray:
    m = np.ones(n, dtype)
    m[n // 3:2 * n // 3] = 0
    return m


def masked_bias(bias: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``bias`` with its dead key third at zero (what ``bias * bias_mask`` computes), after checking
    the mask is DINOv3's [1; 0; 1]."""
    if mask.shape != bias.shape or not np.array_equal(mask, _mask(bias.shape[0], mask.dtype)):
        raise ValueError("its bias_mask is not 1 on the query and value thirds and 0 on the key's")
    out = np.array(bias, copy=True)
    out[bias.shape[0] // 3:2 * bias.shape[0] // 3] = 0
    return out


def _unmask(b: np.ndarray) -> List[np.ndarray]:
    n = b.shape[0]
    if np.any(b[n // 3:2 * n // 3] != 0):
        raise ValueError("its key third is not zero, and DINOv3's masked key bias computes none")
    return [np.ascontiguousarray(b), _mask(n, b.dtype)]


MASKED_BIAS = LayoutOp("masked_key_bias", lambda a, cfg: masked_bias(*a), lambda a, cfg: _unmask(a), 2,
                       shapes=lambda s, cfg: [tuple(s), tuple(s)])


@lru_cache(maxsize=None)
def _table() -> Tuple[Rule, ...]:
    same = lambda name, scope="model", when=ALWAYS: Rule(name, (name,), IDENTITY, scope, when)  # noqa: E731
    return (
        Rule("cls_token", ("cls_token", PERIODS), CLS_PERIODS),
        Rule("reg_token", ("storage_tokens",), IDENTITY, "model", When("num_reg_tokens")),
        same("mask_token", when=When("mask_token")), fill("mask_token", lambda c: (1, c.width), ~When("mask_token")),
        Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
        Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY),
        *(same(_B + n, "block") for n in ("norm1.weight", "norm1.bias", "attn.qkv.weight")),
        same(_B + "attn.qkv.bias", "block", When("qkv_bias") & When("key_bias")),
        Rule(_B + "attn.qkv.bias", (_B + "attn.qkv.bias", _B + "attn.qkv.bias_mask"), MASKED_BIAS, "block",
             When("qkv_bias") & ~When("key_bias")),
        same(_B + "attn.proj.weight", "block"), same(_B + "attn.proj.bias", "block", When("proj_bias")),
        same(_B + "ls1.gamma", "block", When("layer_scale")), same(_B + "ls2.gamma", "block", When("layer_scale")),
        same(_B + "norm2.weight", "block"), same(_B + "norm2.bias", "block"),
        same(_B + "mlp.fc1.weight", "block", PLAIN_MLP),
        same(_B + "mlp.fc1.bias", "block", PLAIN_MLP & When("mlp_bias")),
        same(_B + "mlp.fc2.weight", "block", PLAIN_MLP),
        same(_B + "mlp.fc2.bias", "block", PLAIN_MLP & When("mlp_bias")),
        Rule(_B + "mlp.fc1.weight", (_B + "mlp.w1.weight", _B + "mlp.w2.weight"), GLU_CONCAT, "block", SWIGLU),
        Rule(_B + "mlp.fc1.bias", (_B + "mlp.w1.bias", _B + "mlp.w2.bias"), GLU_CONCAT, "block",
             SWIGLU & When("mlp_bias")),
        Rule(_B + "mlp.fc2.weight", (_B + "mlp.w3.weight",), IDENTITY, "block", SWIGLU),
        Rule(_B + "mlp.fc2.bias", (_B + "mlp.w3.bias",), IDENTITY, "block", SWIGLU & When("mlp_bias")),
        same("norm.weight"), same("norm.bias"),
    )


CARRIES = (
    Carry("num_heads"),  # rope_embed.periods' length is head_dim / 4
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="DINOv3's attention width is the embedding width"),
    Carry("act", holds=lambda c: c.act == ("silu" if c.mlp == "swiglu" else "gelu"),
          why="DINOv3's Mlp is exact GELU and its SwiGLUFFN gate SiLU"),
    Carry("norm_eps", values=(1e-5, 1e-6), argument="norm_layer", default=1e-5,
          why="DINOv3's norm_layer is 'layernormbf16' (eps 1e-5) or 'layernorm' (1e-6)"),
    Carry("qkv_bias"), Carry("key_bias"), Carry("proj_bias"), Carry("mlp_bias"), Carry("mlp"),
    Carry("num_reg_tokens"), Carry("layer_scale"),
    Carry("mask_token", hardcoded="DinoVisionTransformer always has a mask_token (masked training only): "
          "written as zeros", default=True),
    Carry("abs_pos_embed", values=(False,), why="DINOv3's positions are rotary only"),
    Carry("rope", values=("dinov3",), why="DinoVisionTransformer always rotates its patch tokens"),
    Carry("rope_theta"), Carry("rope_periods"),  # both in rope_embed.periods
)


def detect(probe: Probe) -> bool:
    s = probe.shapes
    return PERIODS in s and "patch_embed.proj.weight" in s and "cls_token" in s and "pos_embed" not in s


def infer_config(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    if "cls_norm.weight" in shapes:
        raise MappingError("cls_norm: a DINOv3 with untie_cls_and_patch_norms (the class and storage tokens "
                           "normalised apart) is not supported", path)
    depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
    emb = need(shapes, "patch_embed.proj.weight", "dinov3", path)
    if len(emb) != 4 or emb[2] != emb[3]:
        raise MappingError(f"patch_embed.proj.weight must be a square (out, in, k, k) kernel, got {emb}", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    per = need(shapes, PERIODS, "dinov3", path)
    if len(per) != 1 or per[0] <= 0 or width % (4 * per[0]):
        raise MappingError(f"{PERIODS} {per}: head_dim / 4 periods must divide the width {width} / 4", path)
    head_dim = 4 * per[0]
    heads = width // head_dim  # (``--num-heads`` is refused: the file records them)
    qkv = need(shapes, "blocks.0.attn.qkv.weight", "dinov3", path)
    if qkv[0] != 3 * width:
        raise MappingError(f"attn.qkv.weight {qkv}: DINOv3's attention width must equal the width {width}", path)
    swiglu = "blocks.0.mlp.w1.weight" in shapes
    fc2 = need(shapes, "blocks.0.mlp." + ("w3" if swiglu else "fc2") + ".weight", "dinov3", path)
    reg = shapes.get("storage_tokens", (1, 0, width))
    has_bias = "blocks.0.attn.qkv.bias" in shapes
    return build(probe, image_size=patch * max(224 // patch, 1), patch_size=patch, in_chans=in_chans, width=width,
                 depth=depth, num_heads=heads, head_dim=head_dim, mlp_dim=fc2[1], num_classes=0, qkv_bias=has_bias,
                 key_bias=not has_bias or "blocks.0.attn.qkv.bias_mask" not in shapes,
                 proj_bias="blocks.0.attn.proj.bias" in shapes,
                 mlp_bias=f"blocks.0.mlp.{'w3' if swiglu else 'fc2'}.bias" in shapes, norm_eps=1e-5,
                 act="silu" if swiglu else "gelu", layer_scale="blocks.0.ls1.gamma" in shapes, mask_token=True,
                 num_reg_tokens=reg[1] if len(reg) == 3 else 0, mlp="swiglu" if swiglu else "mlp",
                 abs_pos_embed=False, rope="dinov3")


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    notes = [f"RoPE theta {cfg.rope_theta:g} and {cfg.num_heads} heads read from {PERIODS} "
             f"({cfg.rope_periods} periods); computed from the grid at any input size: the native size "
             f"{cfg.image_size} is assumed (DINOv3's pretraining size; --image-size sets another)"]
    if cfg.rope_periods == "bfloat16":
        notes.append("the periods are stored in bfloat16 and the original model computes with the rounded "
                     "values, as this conversion does; timm and transformers recompute them in float32 (on real "
                     "weights the output moves by ~1e-3), so their layouts are refused as targets")
    return notes


def write_notes(cfg: ViTConfig) -> List[str]:
    if cfg.mlp == "swiglu":  # SwiGLUFFN: int(int(width * ffn_ratio) * 2 / 3), rounded up to 8
        ffn = f"ffn_layer='swiglu', ffn_ratio={1.5 * cfg.mlp_dim / cfg.width:g}"
    else:
        ffn = f"ffn_ratio={cfg.mlp_dim / cfg.width:g}"
    args = [f"patch_size={cfg.patch_size}", f"embed_dim={cfg.width}", f"depth={cfg.depth}",
            f"num_heads={cfg.num_heads}", ffn, f"qkv_bias={cfg.qkv_bias}", f"mask_k_bias={not cfg.key_bias}",
            f"proj_bias={cfg.proj_bias}", f"ffn_bias={cfg.mlp_bias}", f"n_storage_tokens={cfg.num_reg_tokens}",
            f"layerscale_init={1.0 if cfg.layer_scale else None}",
            f"norm_layer={'layernormbf16' if cfg.norm_eps == 1e-5 else 'layernorm'!r}",
            f"pos_embed_rope_base={cfg.rope_theta:g}", "pos_embed_rope_dtype='fp32'"]
    return ["dinov3: DinoVisionTransformer(" + ", ".join(args) + ") loads it strictly"]


def sources(cfg: ViTConfig) -> dict:
    return {"num_heads": f"{PERIODS} [0] (head_dim / 4)", "head_dim": f"{PERIODS} [0] x 4",
            "rope_theta": f"{PERIODS} values", "rope_periods": f"{PERIODS} values (bfloat16-rounded or not)",
            "key_bias": "attn.qkv.bias_mask (masks the key third)", "qkv_bias": "attn.qkv.bias",
            "proj_bias": "attn.proj.bias", "mlp_bias": "mlp.fc2.bias or mlp.w3.bias", "layer_scale": "ls1.gamma", "num_reg_tokens": "storage_tokens [1]",
            "image_size": "assumed: DINOv3's pretraining size (no position table records one)",
            "mlp": "mlp.w1/w2/w3 (SwiGLU) or mlp.fc1/fc2", "abs_pos_embed": "no pos_embed"}


register(Layout(name="dinov3_original", target="dinov3",
                description="original DINOv3 backbone (facebookresearch/dinov3 DinoVisionTransformer)",
                table=lambda cfg: _table(), detect=detect, infer=infer_config, carries=CARRIES,
                ignore=("local_cls_norm.",),
                ignored_what="local_cls_norm: the local crops' class-token norm, used in training only",
                from_values=from_values, read_notes=read_notes, write_notes=write_notes, sources=sources,
                preprocessing=DINOV3))
