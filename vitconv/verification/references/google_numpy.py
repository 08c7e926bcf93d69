"""An independent NumPy forward pass of Google's ViT, run directly on Google's ``.npz`` keys.

Why a second implementation: the canonical PyTorch model is produced by the converter's
mapping tables, so checking it against itself proves nothing about the mapping. This module
shares no mapping code with the converter (it imports none of ``vitconv.layouts``,
``vitconv.conversion.pipeline``, ``vitconv.model``): it reads Google's arrays in Google's own layouts
(HWIO conv kernels, ``(D, heads, head_dim)`` q/k/v kernels, ``(heads, head_dim, D)`` out
kernel, ``(1, 1, 1, C)`` GroupNorm parameters) and follows ``vit_jax/models_vit.py`` and
``vit_jax/models_resnet.py`` line by line, in float64 by default so that its own rounding
is far below the float32 model's. The architecture (depth, heads, classifier,
``pre_logits``, ResNet stages) is read off the keys, not from a :class:`ViTConfig`.

Semantics, each as Google's code: tanh-approximate GELU; LayerNorm epsilon 1e-6; class
token prepended before the position embedding; ``gap`` = mean over tokens *after*
``encoder_norm``; ``pre_logits`` = ``tanh(Dense)``; hybrid stem with weight-standardised
convs (``(w - mean) / (std + 1e-5)``, population std over (kh, kw, in) per output channel),
GroupNorm(32 groups, eps 1e-6), TF ``SAME`` padding (asymmetric for stride 2, ``-inf`` for
the 3x3/2 max-pool), bottleneck units with the stride on the 3x3 conv and a projection on
each stage's first unit, ``relu(residual + y)``.

Images are NHWC, as Google's. Stage names match ``VisionTransformer.forward_stages`` so a
verifier can compare them one for one; the ``stem`` stage is returned **NCHW** (converted
from the NHWC it is computed in) because that is what the canonical model returns.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np

from vitconv.formats.npz import NpzSource

Params = Mapping[str, np.ndarray]

LN_EPS = 1e-6  # flax nn.LayerNorm default
GN_EPS = 1e-6  # flax nn.GroupNorm default
GN_GROUPS = 32  # flax nn.GroupNorm default
WS_EPS = 1e-5  # models_resnet.weight_standardize: added to the std


# --------------------------------------------------------------------------- loading
POS_KEY = "Transformer/posembed_input/pos_embedding"


class NpzParams(Mapping):
    """A Google or big_vision ``.npz``'s model tensors (``prefix`` stripped) as a read-only
    mapping that reads each from the file when asked, in ``dtype`` (``None``: as stored,
    bfloat16 widened); nothing is kept. One forward pass asks for each tensor once, so the
    file is read once, as :func:`load_npz` would."""

    def __init__(self, source: NpzSource, prefix: str, dtype=None) -> None:
        self._src, self._prefix = source, prefix
        self._dtype = None if dtype is None else np.dtype(dtype)
        self._keys = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]
        self._set = set(self._keys)

    def _cast(self, a: np.ndarray) -> np.ndarray:
        return a if self._dtype is None else a.astype(self._dtype, copy=False)

    def _member(self, key: str) -> str:
        if key not in self._set:
            raise KeyError(key)
        return self._prefix + key

    def __getitem__(self, key: str) -> np.ndarray:
        return self._cast(self._src.get(self._member(key)))

    def shape(self, key: str) -> Tuple[int, ...]:
        """``self[key].shape``, from the member's header."""
        return tuple(self._src.shape(self._member(key)))

    def index(self, key: str, i: int) -> np.ndarray:
        """``self[key][i]``, reading that slice alone where the file allows (a stacked array)."""
        return self._cast(self._src.get_index(self._member(key), i))

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_npz(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Google's ``.npz`` as ``{key: array}`` of the model's tensors, read through vitconv's
    safe ``.npz`` reader (headers checked against member sizes, pickles refused, duplicate
    members refused): bytes, not mapping, so the reference stays independent of the
    converter's tables. A common prefix before the model's keys (``opt/target/`` in
    checkpoints saved with optimizer state) is stripped, and keys outside it (optimizer
    state) are never read."""
    with NpzSource(path) as src:
        keys = src.keys()
        prefix = _prefix(keys)
        return {k[len(prefix):]: src.get(k) for k in keys if k.startswith(prefix)}


def _prefix(keys) -> str:
    anchor = [k for k in keys if k == "embedding/kernel" or k.endswith("/embedding/kernel")]
    if len(anchor) != 1:
        raise KeyError("no unique 'embedding/kernel' key: not a Google ViT checkpoint")
    return anchor[0][: -len("embedding/kernel")]


def strip_prefix(params: Params) -> Dict[str, np.ndarray]:
    prefix = _prefix(list(params))
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Architecture:
    """What the keys say about the model (no converter code involved)."""

    depth: int
    num_heads: int
    head_dim: int
    width: int
    classifier: str  # 'token' when a 'cls' key exists, else 'gap'
    has_pre_logits: bool
    has_head: bool
    resnet_units: Optional[Tuple[int, ...]]  # units per stage, None for a pure ViT
    patch_size: int
    grid_size: int  # of the stored position table

    @property
    def stride(self) -> int:
        """Pixels per token: patch size times the hybrid stem's down-sampling."""
        if self.resnet_units is None:
            return self.patch_size
        return self.patch_size * 4 * 2 ** max(len(self.resnet_units) - 1, 0)

    @property
    def image_size(self) -> int:
        """The resolution the stored position table was made for."""
        return self.grid_size * self.stride


def architecture(params: Params) -> Architecture:
    blocks = sorted({int(m.group(1)) for k in params
                     for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
    if blocks != list(range(len(blocks))) or not blocks:
        raise KeyError(f"encoder blocks are not numbered 0..n-1: {blocks}")
    q = params["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    width, heads, head_dim = q.shape
    token = "cls" in params
    n_pos = params["Transformer/posembed_input/pos_embedding"].shape[1] - (1 if token else 0)
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"position table holds {n_pos} grid tokens, not a square")
    stages = sorted({int(m.group(1)) for k in params for m in [re.match(r"block(\d+)/unit", k)] if m})
    units = None
    if "conv_root/kernel" in params:
        units = tuple(len({m.group(1) for k in params
                           for m in [re.match(rf"block{s}/unit(\d+)/", k)] if m}) for s in stages)
    return Architecture(
        depth=len(blocks), num_heads=heads, head_dim=head_dim, width=width,
        classifier="token" if token else "gap", has_pre_logits="pre_logits/kernel" in params,
        has_head="head/kernel" in params, resnet_units=units,
        patch_size=params["embedding/kernel"].shape[0], grid_size=grid)


# --------------------------------------------------------------------------- primitives
def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """flax ``nn.gelu`` (``approximate=True``): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = LN_EPS) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def same_pads(n: int, k: int, s: int) -> Tuple[int, int]:
    """TF/XLA ``SAME``: total ``max((ceil(n/s)-1)*s + k - n, 0)``, smaller half first."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _windows(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """NHWC -> (N, Ho, Wo, C, k, k) strided windows (a view; VALID after padding)."""
    v = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return v[:, ::s, ::s]


def conv2d(x: np.ndarray, kernel: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """NHWC x HWIO convolution (``padding`` 'SAME' as TF or 'VALID'), as im2col + matmul."""
    kh, kw, cin, cout = kernel.shape
    assert kh == kw, "square kernels only"
    if padding == "SAME":
        ph, pw = same_pads(x.shape[1], kh, stride), same_pads(x.shape[2], kw, stride)
        x = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    if kh == 1:
        return x[:, ::stride, ::stride] @ kernel.reshape(cin, cout)
    w = _windows(x, kh, stride)  # (N, Ho, Wo, C, kh, kw)
    n, ho, wo = w.shape[:3]
    cols = w.transpose(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * cin)
    return (cols @ kernel.reshape(kh * kw * cin, cout)).reshape(n, ho, wo, cout)


def max_pool_same(x: np.ndarray, k: int = 3, s: int = 2) -> np.ndarray:
    """flax ``nn.max_pool(padding='SAME')``: padded cells are -inf and never win."""
    ph, pw = same_pads(x.shape[1], k, s), same_pads(x.shape[2], k, s)
    x = np.pad(x, ((0, 0), ph, pw, (0, 0)), constant_values=-np.inf)
    return _windows(x, k, s).max(axis=(-2, -1))


def standardize(kernel: np.ndarray, eps: float = WS_EPS) -> np.ndarray:
    """Google's ``weight_standardize``: per output channel over (kh, kw, in), population
    std, ``eps`` added to the std (not inside the square root)."""
    k = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
    return k / (k.std(axis=(0, 1, 2), keepdims=True) + eps)


def group_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray,
               groups: int = GN_GROUPS, eps: float = GN_EPS) -> np.ndarray:
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + eps)
    return g.reshape(n, h, w, c) * scale.reshape(c) + bias.reshape(c)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def zoom_pos_embed(posemb: np.ndarray, new_grid: int, num_prefix: int) -> np.ndarray:
    """Google's ``load_pretrained`` resize: keep the class-token row, zoom the square grid
    with ``scipy.ndimage.zoom(order=1)`` (done in the table's own dtype, as Google does)."""
    import scipy.ndimage

    tok, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
    old = math.isqrt(grid.shape[0])
    grid = grid.reshape(old, old, -1)
    grid = scipy.ndimage.zoom(grid, (new_grid / old, new_grid / old, 1), order=1)
    return np.concatenate([tok, grid.reshape(1, new_grid * new_grid, -1)], axis=1)


# --------------------------------------------------------------------------- the model
class ReadsFile:
    """A reference that reads its ``.npz`` as it runs (see :func:`reading`): ``close()`` it."""

    _source: Optional[NpzSource] = None

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None


def reading(path: Union[str, os.PathLike], build: Callable[[NpzSource], ReadsFile]) -> ReadsFile:
    """``build(source)`` on the ``.npz`` at ``path`` opened; the reference it returns keeps the
    file open until its ``close()``. A failed build closes it at once."""
    src = NpzSource(path)
    try:
        ref = build(src)
    except BaseException:
        src.close()
        raise
    ref._source = src
    return ref


class GoogleViTReference(ReadsFile):
    """Google's ViT forward pass in NumPy over a ``{google key: array}`` dict.

    >>> ref = GoogleViTReference.from_npz("golden/jax/tiny_token_p8_32.npz")  # doctest: +SKIP
    >>> stages = ref.forward_stages(images_nhwc)                              # doctest: +SKIP
    """

    def __init__(self, params: Params, dtype=np.float64):
        raw = strip_prefix(params)
        pos = np.asarray(raw[POS_KEY]) if POS_KEY in raw else None
        self._setup({k: np.asarray(v).astype(np.dtype(dtype), copy=False) for k, v in raw.items()},
                    lambda: pos, dtype)

    def _setup(self, p: Mapping[str, np.ndarray], pos_stored: Callable[[], Optional[np.ndarray]],
               dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.p = p
        # The position table as stored: a resize zooms it in its own dtype, as vit_jax does.
        self._pos_stored = pos_stored
        self.arch = architecture(self.p)
        self._std_cache: Dict[str, np.ndarray] = {}

    @classmethod
    def from_npz(cls, path: Union[str, os.PathLike], dtype=np.float64) -> "GoogleViTReference":
        """Weights read from the file as the forward pass reaches them (:class:`NpzParams`):
        the reference holds one tensor at a time, not a float64 copy of the model."""
        def build(src: NpzSource) -> "GoogleViTReference":
            prefix = _prefix(src.keys())
            ref = cls.__new__(cls)
            ref._setup(NpzParams(src, prefix, dtype), lambda: src.get(prefix + POS_KEY), dtype)
            return ref
        return reading(path, build)

    # -- what verify asks of any reference -------------------------------------
    @property
    def description(self) -> str:
        return f"Google .npz, NumPy {self.dtype.name} reference of vit_jax's models_vit.py"

    @property
    def reference_dtype(self) -> str:
        return self.dtype.name

    @property
    def image_size(self) -> int:
        return self.arch.image_size

    @property
    def stride(self) -> int:
        return self.arch.stride

    @property
    def in_chans(self) -> int:
        return int(self.p["conv_root/kernel" if self.arch.resnet_units else "embedding/kernel"].shape[2])

    # -- position table ------------------------------------------------------
    def pos_embed(self, grid: int) -> np.ndarray:
        """The position table for a ``grid`` x ``grid`` token grid (resized if needed)."""
        if grid == self.arch.grid_size:
            return self.p[POS_KEY]
        prefix = 1 if self.arch.classifier == "token" else 0
        return zoom_pos_embed(self._pos_stored(), grid, prefix).astype(self.dtype)

    # -- hybrid stem -----------------------------------------------------------
    def _conv(self, x: np.ndarray, name: str, stride: int = 1) -> np.ndarray:
        if name not in self._std_cache:
            self._std_cache[name] = standardize(self.p[f"{name}/kernel"])
        return conv2d(x, self._std_cache[name], stride, "SAME")

    def _gn(self, x: np.ndarray, name: str) -> np.ndarray:
        return group_norm(x, self.p[f"{name}/scale"], self.p[f"{name}/bias"])

    def _unit(self, x: np.ndarray, name: str, stride: int) -> np.ndarray:
        residual = x
        if f"{name}/conv_proj/kernel" in self.p:
            residual = self._gn(self._conv(x, f"{name}/conv_proj", stride), f"{name}/gn_proj")
        y = relu(self._gn(self._conv(x, f"{name}/conv1"), f"{name}/gn1"))
        y = relu(self._gn(self._conv(y, f"{name}/conv2", stride), f"{name}/gn2"))
        y = self._gn(self._conv(y, f"{name}/conv3"), f"{name}/gn3")
        return relu(residual + y)

    def stem(self, x: np.ndarray) -> np.ndarray:
        """NHWC in, NHWC out: root conv 7x7/2, GroupNorm, ReLU, max-pool 3x3/2, stages."""
        x = relu(self._gn(self._conv(x, "conv_root", 2), "gn_root"))
        x = max_pool_same(x)
        for s, units in enumerate(self.arch.resnet_units or (), start=1):
            for u in range(1, units + 1):
                x = self._unit(x, f"block{s}/unit{u}", 2 if (s > 1 and u == 1) else 1)
        return x

    # -- encoder ---------------------------------------------------------------
    def _attention(self, x: np.ndarray, pre: str) -> np.ndarray:
        p = self.p
        # (n, tokens, D) x (D, heads, head_dim) -> (n, heads, tokens, head_dim)
        q, k, v = ((np.tensordot(x, p[f"{pre}/{n}/kernel"], axes=(2, 0)) + p[f"{pre}/{n}/bias"])
                   .transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
        w = softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]))
        out = w @ v  # (n, heads, tokens, head_dim)
        # (n, tokens, heads, head_dim) x (heads, head_dim, D) -> (n, tokens, D)
        return (np.tensordot(out.transpose(0, 2, 1, 3), p[f"{pre}/out/kernel"], axes=([2, 3], [0, 1]))
                + p[f"{pre}/out/bias"])

    def _dense(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.p[f"{name}/kernel"] + self.p[f"{name}/bias"]

    def forward_stages(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        """NHWC images -> ordered stages named as ``VisionTransformer.forward_stages``:
        ``stem`` (hybrid only, NCHW), ``embed``, ``blocks.{i}.attn``, ``blocks.{i}.mlp``,
        ``encoded``, ``pooled``, ``head_input``, ``logits`` (absent without a head)."""
        a, p = self.arch, self.p
        x = np.asarray(images).astype(self.dtype)
        if x.ndim != 4:
            raise ValueError(f"images must be NHWC (4-D), got shape {x.shape}")
        out: Dict[str, np.ndarray] = {}
        if a.resnet_units is not None:
            x = self.stem(x)
            out["stem"] = x.transpose(0, 3, 1, 2)
        x = conv2d(x, p["embedding/kernel"], a.patch_size, "VALID") + p["embedding/bias"]
        n, gh, gw, d = x.shape
        if gh != gw:
            raise ValueError(f"token grid {gh}x{gw} is not square")
        x = x.reshape(n, gh * gw, d)
        if a.classifier == "token":
            x = np.concatenate([np.broadcast_to(p["cls"], (n, 1, d)), x], axis=1)
        x = x + self.pos_embed(gh)
        out["embed"] = x
        for i in range(a.depth):
            pre = f"Transformer/encoderblock_{i}"
            y = layer_norm(x, p[f"{pre}/LayerNorm_0/scale"], p[f"{pre}/LayerNorm_0/bias"])
            x = x + self._attention(y, f"{pre}/MultiHeadDotProductAttention_1")
            out[f"blocks.{i}.attn"] = x
            y = layer_norm(x, p[f"{pre}/LayerNorm_2/scale"], p[f"{pre}/LayerNorm_2/bias"])
            y = self._dense(gelu_tanh(self._dense(y, f"{pre}/MlpBlock_3/Dense_0")), f"{pre}/MlpBlock_3/Dense_1")
            x = x + y
            out[f"blocks.{i}.mlp"] = x
        x = layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
        out["encoded"] = x
        pooled = x[:, 0] if a.classifier == "token" else x.mean(axis=1)
        out["pooled"] = pooled
        out["head_input"] = np.tanh(self._dense(pooled, "pre_logits")) if a.has_pre_logits else pooled
        if a.has_head:
            out["logits"] = self._dense(out["head_input"], "head")
        return out

    def __call__(self, images: np.ndarray) -> np.ndarray:
        stages = self.forward_stages(images)
        return stages.get("logits", stages["head_input"])


def reference_forward(params: Union[Params, str, os.PathLike], images_nhwc: np.ndarray,
                      dtype=np.float64) -> Dict[str, np.ndarray]:
    """One call: Google ``.npz`` path or key dict + NHWC images -> every stage."""
    ref = (GoogleViTReference.from_npz(params, dtype) if isinstance(params, (str, os.PathLike))
           else GoogleViTReference(params, dtype))
    return ref.forward_stages(images_nhwc)
