"""Invertible layout operations between foreign tensors and canonical (PyTorch) tensors.

Each op is a pair ``to_canonical(arrays, cfg) -> array`` / ``from_canonical(array, cfg)
-> arrays`` and is exact (transposes, reshapes, concatenations): a round trip is bitwise.
``foreign_shapes(shape, cfg)`` gives ``from_canonical``'s output shapes without data, so a
streaming writer can lay out its header before any tensor exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from vitconv.config import ViTConfig

Arrays = Sequence[np.ndarray]


Shape = Tuple[int, ...]


@dataclass(frozen=True)
class LayoutOp:
    name: str
    to_canonical: Callable[[Arrays, ViTConfig], np.ndarray]
    from_canonical: Callable[[np.ndarray, ViTConfig], List[np.ndarray]]
    arity: int = 1
    #: canonical shape -> the foreign shapes ``from_canonical`` returns (None: same shape).
    shapes: Optional[Callable[[Shape, ViTConfig], List[Shape]]] = None

    def foreign_shapes(self, shape: Shape, cfg: ViTConfig) -> List[Shape]:
        return [tuple(shape)] * self.arity if self.shapes is None else [tuple(s) for s in self.shapes(tuple(shape), cfg)]


def _one(f):
    return lambda arrays, cfg: f(arrays[0])


# -- the transpose every Dense kernel needs ------------------------------------
#: Below this many elements a plain copy is as fast and the band loop only adds overhead.
_BAND_MIN_ELEMENTS = 1 << 16
#: Source rows per band, and the padding (bytes) added to each row of the band's staging copy.
_BAND_ROWS, _STAGING_PAD = 64, 64


def transpose2d(a: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``a.T`` copied into a C-contiguous array (``out`` when given, shape ``a.T.shape``).

    Why not ``np.ascontiguousarray(a.T)``: numpy fills the output row by row, so it walks
    the source down a column, one element per cache line and, for a ViT-L MLP kernel
    (16 KiB rows), one element per page: it is TLB-bound.
    Here the source is taken in bands of 64 rows; each output row then receives 64
    consecutive elements (whole cache lines) from rows that stay in cache while the band
    is scattered. Why the band is first copied (a fast contiguous copy) into a staging
    buffer whose rows are 64 bytes longer: ViT rows are multiples of 4 KiB, so the 64
    source addresses that fill one output run all fall in the same L1 cache set and evict
    each other (4K aliasing); the padding spreads them over 64 sets. Measured here on the
    Dense kernels of ViT-L/16, all 24 blocks: ``np.ascontiguousarray(a.T)`` 2.2 s, 16-row
    bands read in place 0.58 s, this way 0.31 s (a plain copy of the same bytes: 0.08 s).
    The bytes are the same (a copy is a copy)."""
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {a.shape}")
    m, n = a.shape
    if out is None:
        out = np.empty((n, m), a.dtype)
    elif out.shape != (n, m) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous {(n, m)}, got {out.shape}")
    if a.size < _BAND_MIN_ELEMENTS:
        np.copyto(out, a.T)
        return out
    pad = -(-_STAGING_PAD // a.itemsize)
    staging = np.empty((min(_BAND_ROWS, m), n + pad), a.dtype)
    for i in range(0, m, _BAND_ROWS):
        band = staging[:min(_BAND_ROWS, m - i), :n]
        np.copyto(band, a[i:i + _BAND_ROWS])
        out[:, i:i + band.shape[0]] = band.T
    return out


def all_finite(a: np.ndarray) -> bool:
    """``np.isfinite(a).all()`` for floating arrays without its full-size boolean temporary.

    Why it is the same answer: numpy's ``min``/``max`` propagate NaN, so the minimum is NaN
    when any element is; otherwise the minimum is -inf exactly when some element is -inf and
    the maximum +inf exactly when some element is +inf. (Unlike a sum, a min or max cannot
    overflow into a false alarm, nor cancel an inf away.) Two vectorised passes that
    allocate nothing, against a pass that writes a boolean array (a quarter of the tensor,
    fresh pages each time) and a second pass over it. float16 is checked on its exponent bits
    as integers (all ones: inf or NaN), because numpy's half-precision min and max run an
    element at a time (3.5 s for a ViT-L/16, against 0.1 s). Other dtypes take numpy's route."""
    if a.size == 0:
        return True
    if a.dtype == np.float16:
        bits = np.ascontiguousarray(a).reshape(-1).view(np.uint16)
        return int(np.bitwise_and(bits, 0x7C00).max()) < 0x7C00
    if a.dtype.kind != "f":
        return bool(np.isfinite(a).all())
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


# -- single-tensor ops -------------------------------------------------------
def hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    """Flax/TF conv kernel ``(kh, kw, in, out)`` -> PyTorch ``(out, in, kh, kw)``."""
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def dense_to_linear(w: np.ndarray) -> np.ndarray:
    """Flax ``Dense`` kernel ``(in, out)`` -> ``nn.Linear.weight`` ``(out, in)``."""
    return transpose2d(w) if w.ndim == 2 else np.ascontiguousarray(w.T)


def linear_to_dense(w: np.ndarray) -> np.ndarray:
    return transpose2d(w) if w.ndim == 2 else np.ascontiguousarray(w.T)


def gn_to_vector(w: np.ndarray) -> np.ndarray:
    """GroupNorm scale/bias: published files store ``(1, 1, 1, C)``, newer flax ``(C,)``."""
    return np.ascontiguousarray(w.reshape(-1))


def vector_to_gn(w: np.ndarray) -> np.ndarray:
    """Inverse of :func:`gn_to_vector`, writing the published ``(1, 1, 1, C)`` layout."""
    return np.ascontiguousarray(w.reshape(1, 1, 1, -1))


# -- attention ---------------------------------------------------------------
def merge_qkv_kernels(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Three ``(D, heads, head_dim)`` DenseGeneral kernels -> fused ``(3*heads*head_dim, D)``.

    Each kernel is transposed straight into its third of the result (no concatenation copy)."""
    parts = [x.reshape(x.shape[0], -1) for x in (q, k, v)]
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"q/k/v kernels differ in input width: {[x.shape for x in (q, k, v)]}")
    out = np.empty((sum(p.shape[1] for p in parts), parts[0].shape[0]), np.result_type(*parts))
    row = 0
    for p in parts:
        transpose2d(p, out[row:row + p.shape[1]])
        row += p.shape[1]
    return out


def split_qkv_kernel(w: np.ndarray, cfg: ViTConfig) -> List[np.ndarray]:
    return [transpose2d(p).reshape(-1, cfg.num_heads, cfg.head_dim) for p in np.split(w, 3, axis=0)]


def merge_qkv_biases(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Three ``(heads, head_dim)`` biases -> fused ``(3*heads*head_dim,)``."""
    return np.ascontiguousarray(np.concatenate([x.reshape(-1) for x in (q, k, v)]))


def split_qkv_bias(b: np.ndarray, cfg: ViTConfig) -> List[np.ndarray]:
    return [np.ascontiguousarray(p.reshape(cfg.num_heads, cfg.head_dim)) for p in np.split(b, 3)]


def heads_out_to_linear(w: np.ndarray) -> np.ndarray:
    """Attention output kernel ``(heads, head_dim, D)`` -> ``nn.Linear.weight`` ``(D, heads*head_dim)``."""
    return transpose2d(w.reshape(-1, w.shape[-1]))


def linear_to_heads_out(w: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    return (transpose2d(w) if w.ndim == 2 else np.ascontiguousarray(w.T)).reshape(
        cfg.num_heads, cfg.head_dim, -1)


def _t(shape: Shape) -> Shape:
    return tuple(reversed(shape))


def _qkv_kernel_shapes(shape: Shape, cfg: ViTConfig) -> List[Shape]:
    return [(shape[1], cfg.num_heads, cfg.head_dim)] * 3


IDENTITY = LayoutOp("identity", _one(np.ascontiguousarray), lambda a, cfg: [np.ascontiguousarray(a)])
CONV = LayoutOp("hwio_to_oihw", _one(hwio_to_oihw), lambda a, cfg: [oihw_to_hwio(a)],
                shapes=lambda s, cfg: [(s[2], s[3], s[1], s[0])])
DENSE = LayoutOp("dense_to_linear", _one(dense_to_linear), lambda a, cfg: [linear_to_dense(a)],
                 shapes=lambda s, cfg: [_t(s)])
GN = LayoutOp("gn_to_vector", _one(gn_to_vector), lambda a, cfg: [vector_to_gn(a)],
              shapes=lambda s, cfg: [(1, 1, 1, s[0])])
QKV_KERNEL = LayoutOp("merge_qkv_kernels", lambda a, cfg: merge_qkv_kernels(*a), split_qkv_kernel, 3,
                      shapes=_qkv_kernel_shapes)
QKV_BIAS = LayoutOp("merge_qkv_biases", lambda a, cfg: merge_qkv_biases(*a), split_qkv_bias, 3,
                    shapes=lambda s, cfg: [(cfg.num_heads, cfg.head_dim)] * 3)
ATTN_OUT = LayoutOp("heads_out_to_linear", _one(heads_out_to_linear),
                    lambda a, cfg: [linear_to_heads_out(a, cfg)],
                    shapes=lambda s, cfg: [(cfg.num_heads, cfg.head_dim, s[0])])


# -- PyTorch layouts (timm, Hugging Face, jeonsworld, vit-pytorch) -------------
def concat_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Separate q/k/v ``nn.Linear`` weights ``(A, D)`` (or biases ``(A,)``) -> fused rows ``[q; k; v]``."""
    return np.ascontiguousarray(np.concatenate([q, k, v], axis=0))


def split_qkv(w: np.ndarray) -> List[np.ndarray]:
    return [np.ascontiguousarray(p) for p in np.split(w, 3, axis=0)]


def patch_linear_to_conv(w: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    """vit-pytorch's patch ``nn.Linear`` ``(out, p1*p2*c)`` over ``(p1 p2 c)``-ordered patches
    -> the equivalent ``Conv2d`` kernel ``(out, c, p1, p2)``."""
    p, c = cfg.patch_size, cfg.embed_in_chans
    if w.ndim != 2 or w.shape[1] != p * p * c:
        raise ValueError(f"expected (out, {p * p * c}), got {w.shape}")
    return np.ascontiguousarray(w.reshape(w.shape[0], p, p, c).transpose(0, 3, 1, 2))


def conv_to_patch_linear(w: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1))


def patch_vector_to_canonical(v: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    """A per-element vector over a ``(p1 p2 c)``-ordered patch (vit-pytorch's patch LayerNorm)
    -> the canonical ``(c p1 p2)`` order, the order of a flattened conv kernel row."""
    p, c = cfg.patch_size, cfg.embed_in_chans
    if v.shape != (p * p * c,):
        raise ValueError(f"expected ({p * p * c},), got {v.shape}")
    return np.ascontiguousarray(v.reshape(p, p, c).transpose(2, 0, 1).reshape(-1))


def canonical_to_patch_vector(v: np.ndarray, cfg: ViTConfig) -> np.ndarray:
    p, c = cfg.patch_size, cfg.embed_in_chans
    return np.ascontiguousarray(v.reshape(c, p, p).transpose(1, 2, 0).reshape(-1))


def add_batch_axis(a: np.ndarray) -> np.ndarray:
    """vit-pytorch stores ``pos_embedding`` ``(N, D)`` and ``cls_token`` ``(1, D)`` without the batch axis."""
    return np.ascontiguousarray(a[None])


def drop_batch_axis(a: np.ndarray) -> np.ndarray:
    if a.shape[0] != 1:
        raise ValueError(f"expected a leading axis of 1, got {a.shape}")
    return np.ascontiguousarray(a[0])


def pos_with_empty_cls(pos: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """vit-pytorch ``pool='mean'`` keeps a ``cls_token`` of shape ``(0, D)``: nothing to map,
    but consumed here (and written back) so the audit stays strict and the round trip exact."""
    if cls.size != 0:
        raise ValueError(f"expected an empty (0, D) cls_token, got {cls.shape}")
    return add_batch_axis(pos)


QKV_CONCAT = LayoutOp("concat_qkv", lambda a, cfg: concat_qkv(*a), lambda a, cfg: split_qkv(a), 3,
                      shapes=lambda s, cfg: [(s[0] // 3,) + tuple(s[1:])] * 3)
VECTOR_TOKEN = LayoutOp("vector_to_token", lambda a, cfg: np.ascontiguousarray(a[0].reshape(1, 1, -1)),
                        lambda a, cfg: [np.ascontiguousarray(a.reshape(-1))],
                        shapes=lambda s, cfg: [(s[-1],)])  # CLIP's class_embedding (D,)
Q_KV_CONCAT = LayoutOp("concat_q_kv", lambda a, cfg: np.ascontiguousarray(np.concatenate(a, axis=0)),
                       lambda a, cfg: [np.ascontiguousarray(a[:cfg.width]), np.ascontiguousarray(a[cfg.width:])], 2,
                       shapes=lambda s, cfg: [(cfg.width,) + tuple(s[1:]), (s[0] - cfg.width,) + tuple(s[1:])])
PATCH_LINEAR = LayoutOp("patch_linear_to_conv", lambda a, cfg: patch_linear_to_conv(a[0], cfg),
                        lambda a, cfg: [conv_to_patch_linear(a, cfg)],
                        shapes=lambda s, cfg: [(s[0], s[1] * s[2] * s[3])])
PATCH_VECTOR = LayoutOp("patch_vector_to_canonical", lambda a, cfg: patch_vector_to_canonical(a[0], cfg),
                        lambda a, cfg: [canonical_to_patch_vector(a, cfg)])
BATCH_AXIS = LayoutOp("add_batch_axis", _one(add_batch_axis), lambda a, cfg: [drop_batch_axis(a)],
                      shapes=lambda s, cfg: [tuple(s[1:])])
POS_EMPTY_CLS = LayoutOp("pos_with_empty_cls", lambda a, cfg: pos_with_empty_cls(*a),
                         lambda a, cfg: [drop_batch_axis(a), np.zeros((0, a.shape[-1]), a.dtype)], 2,
                         shapes=lambda s, cfg: [tuple(s[1:]), (0, s[-1])])


# -- query/value biases only, an unpacked SwiGLU (BEiT, timm Eva, Hugging Face DINOv3, AIMv2) --
def q_v_to_qkv_bias(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Separate query and value biases (BEiT, timm Eva: the key projection has none) -> the fused
    ``[q; 0; v]`` bias, whose zero key third computes what no key bias does."""
    if q.shape != v.shape or q.ndim != 1:
        raise ValueError(f"q and v biases must be vectors of one length, got {q.shape} and {v.shape}")
    return np.ascontiguousarray(np.concatenate([q, np.zeros_like(q), v]))


def qkv_bias_to_q_v(b: np.ndarray) -> List[np.ndarray]:
    q, k, v = np.split(b, 3)
    if np.any(k != 0):
        raise ValueError(f"its key third is not zero (max |k bias| {float(np.abs(k).max()):.3g}), and this "
                         "layout's key projection has no bias")
    return [np.ascontiguousarray(q), np.ascontiguousarray(v)]


#: ``[q_bias; v_bias]`` <-> canonical ``qkv.bias`` with a zero key third (``key_bias=False``, BEiT);
#: writing refuses a key third that is not zero, naming the tensor.
Q_V_BIAS = LayoutOp("q_v_bias", lambda a, cfg: q_v_to_qkv_bias(*a), lambda a, cfg: qkv_bias_to_q_v(a), 2,
                    shapes=lambda s, cfg: [(cfg.attn_dim,), (cfg.attn_dim,)])
#: SwiGLU stored unpacked (timm ``SwiGLU``'s ``fc1_g``/``fc1_x``, Hugging Face AIMv2's
#: ``gate_proj``/``up_proj``): the gate's rows, then the up rows, are the canonical packed ``fc1``
#: ([gate; up]); weights and biases alike.
GLU_CONCAT = LayoutOp("concat_gate_up", lambda a, cfg: np.ascontiguousarray(np.concatenate(a, axis=0)),
                      lambda a, cfg: [np.ascontiguousarray(p) for p in np.split(a, 2, axis=0)], 2,
                      shapes=lambda s, cfg: [(s[0] // 2,) + tuple(s[1:])] * 2)
