"""The one canonical ViT (and the hybrid ResNet stem), in PyTorch, with Google's semantics.

Every choice that moves the numbers follows ``vit_jax/models_vit.py`` and
``vit_jax/models_resnet.py`` unless the :class:`~vitconv.config.ViTConfig` says
otherwise; each is named where it is made. Nothing here knows about file formats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from vitconv.config import ViTConfig
from vitconv.ops import geometric_resize_weights, rel_pos_index, resize_pos_embed_torch, resize_rel_pos_table_torch


def _activation(name: str):
    if name == "gelu_tanh":  # flax nn.gelu(approximate=True): Google's form
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":  # erf form: PyTorch nn.GELU(), timm, Hugging Face "gelu"
        return F.gelu
    if name == "quick_gelu":  # x * sigmoid(1.702 x), OpenAI CLIP
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    if name == "silu":  # SwiGLU's gate
        return F.silu
    raise ValueError(f"unknown activation {name!r}")


# --------------------------------------------------------------------------- stem
def tf_same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad NCHW ``x`` as TensorFlow/XLA ``SAME`` does: total ``max((ceil(n/s)-1)*s + k - n, 0)``,
    the smaller half before and the larger after. For stride 2 this is asymmetric, which
    PyTorch's symmetric ``padding=`` cannot express; timm's hybrid defaults differ here."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    if any(pads):
        x = F.pad(x, pads, value=value)
    return x


class StdConv2d(nn.Conv2d):
    """Weight-standardised convolution, as Google's ``StdConv``.

    The kernel is normalised per output channel over (in, kh, kw) with the population
    std and ``eps`` *added to the std* (``w / (std + eps)``), not inside the square root as
    timm's ``StdConv2d`` does. Padding is TF ``SAME``. The stored weight stays the raw
    checkpoint kernel so conversions round-trip bit for bit.

    The standardisation is computed in float64 and rounded once: it is weight-only work,
    and doing it in float32 adds rounding that grows through the stem (on the golden
    hybrid it moves the logits 1.1e-5 further from Google's, past the 2e-5 bar).
    In inference the result is cached; exporters fold it into a plain conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, eps: float = 1e-5):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, bias=False)
        self.eps = eps
        self._cache: Tuple = (None, None)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        if w.requires_grad and torch.is_grad_enabled():
            return self._standardize(w)
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._cache[0] != key:
            self._cache = (key, self._standardize(w.detach()))
        return self._cache[1]

    def _standardize(self, w: torch.Tensor) -> torch.Tensor:
        w64 = w.double()
        mean = w64.mean(dim=(1, 2, 3), keepdim=True)
        std = w64.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return ((w64 - mean) / (std + self.eps)).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tf_same_pad(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, self.standardized_weight(), None, self.stride)


class ResidualUnit(nn.Module):
    """Google's bottleneck unit (``models_resnet.ResidualUnit``): stride on the 3x3 conv,
    projection when the shape changes, ReLU after the residual sum."""

    def __init__(self, in_ch: int, features: int, stride: int, cfg: ViTConfig):
        super().__init__()
        out_ch = features * 4
        g, eps, ws = cfg.resnet_groups, cfg.resnet_gn_eps, cfg.resnet_ws_eps
        self.needs_projection = in_ch != out_ch or stride != 1
        if self.needs_projection:
            self.conv_proj = StdConv2d(in_ch, out_ch, 1, stride, eps=ws)
            self.gn_proj = nn.GroupNorm(g, out_ch, eps=eps)
        self.conv1 = StdConv2d(in_ch, features, 1, eps=ws)
        self.gn1 = nn.GroupNorm(g, features, eps=eps)
        self.conv2 = StdConv2d(features, features, 3, stride, eps=ws)
        self.gn2 = nn.GroupNorm(g, features, eps=eps)
        self.conv3 = StdConv2d(features, out_ch, 1, eps=ws)
        self.gn3 = nn.GroupNorm(g, out_ch, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.conv_proj(x)) if self.needs_projection else x
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStem(nn.Module):
    """The hybrid's ResNet root and stages (``R50+ViT-B_16``: stages (3, 4, 9), width 64)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.resnet_layers is not None
        w = cfg.resnet_width
        self.conv_root = StdConv2d(cfg.in_chans, w, 7, 2, eps=cfg.resnet_ws_eps)
        self.gn_root = nn.GroupNorm(cfg.resnet_groups, w, eps=cfg.resnet_gn_eps)
        stages: List[nn.Module] = []
        in_ch = w
        for i, units in enumerate(cfg.resnet_layers):
            features = w * 2 ** i
            blocks = []
            for j in range(units):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(ResidualUnit(in_ch, features, stride, cfg))
                in_ch = features * 4
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))
        # flax nn.max_pool(padding='SAME') pads with -inf: padded cells never win.
        x = F.max_pool2d(tf_same_pad(x, 3, 2, value=float("-inf")), 3, 2)
        for stage in self.stages:
            x = stage(x)
        return x


# --------------------------------------------------------------------------- encoder
@dataclasses.dataclass
class Positions:
    """Where the tokens of one forward pass sit, made once per pass by
    :meth:`VisionTransformer.positions` and handed to every block: the patch grid (rows,
    columns), and whatever a position feature derives from it for attention. A feature
    computed from the grid (rotary angles, a relative-bias index) adds its field here and
    fills it in ``positions``, so blocks never recompute it and any grid works."""

    grid: Tuple[int, int]
    #: Rotary embeddings of the patch tokens (``config.rope``): ``(sin, cos)``, each
    #: ``(gh * gw, head_dim)`` in the rotate-half layout; None without RoPE.
    rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    #: BEiT: the ``(N+1, N+1)`` rows of a relative position table for this grid's token pairs
    #: (:func:`vitconv.ops.rel_pos_index`), and the bias of the model's shared table, ``(1, heads,
    #: N+1, N+1)``, which every block adds to its own; None without them.
    rel_index: Optional[torch.Tensor] = None
    rel_shared: Optional[torch.Tensor] = None
    #: timm's geometric resize of every table to this grid, as (rows, cols) matrices made once
    rel_weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None



def rope_dinov3(gh, gw, head_dim: int, theta: float, device=None,
                periods_dtype: str = "float32") -> Tuple[torch.Tensor, torch.Tensor]:
    """DINOv3's rotary ``(sin, cos)`` for a ``gh`` x ``gw`` patch grid (``gh``, ``gw`` may be
    symbolic: nothing is baked for one size), in the order of operations of timm's
    ``RotaryEmbeddingDinoV3`` (``timm/layers/pos_embed_sincos.py``), so the angles are timm's bit
    for bit: patch centres ``(arange(0.5, n) / n)`` per axis (each axis normalised by its own
    length: a non-square grid spans [-1, 1] both ways; timm's Eva passes no other
    ``normalize_coords``, and Hugging Face's ``get_patches_center_coordinates`` does the same),
    an ``ij`` meshgrid, ``2 c - 1``; periods ``theta ** (2k / (head_dim / 2))`` for
    ``k < head_dim / 4``; angles ``2 pi c / period`` with the row coordinate's angles before the
    column's, repeated twice (rotate-half). Hugging Face computes the same angles as
    ``2 pi c * (1 / theta ** arange(0, 1, 4 / head_dim))``, equal up to float32 rounding.
    The training-time coordinate augmentations (shift, jitter, rescale) are off in eval mode in
    both libraries and are not modelled. Always float32 (as both libraries): a half-precision
    model rotates in float32 and rounds the result once (:meth:`Attention._rotate`).
    ``periods_dtype='bfloat16'``: the periods rounded to bfloat16 before use, the arithmetic still
    float32, as the original DINOv3 code computes with its checkpoints' stored bfloat16 periods."""
    axes = [torch.arange(0.5, n, dtype=torch.float32, device=device) / n for n in (gh, gw)]
    coords = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1)
    coords = (2.0 * coords - 1.0).flatten(0, 1)  # (gh * gw, 2)
    n = head_dim // 4
    periods = theta ** (2.0 * torch.arange(n, dtype=torch.float32, device=device) / (head_dim // 2))
    if periods_dtype == "bfloat16":
        periods = periods.to(torch.bfloat16).float()
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1)  # (gh * gw, head_dim / 2)
    sin, cos = angles.sin(), angles.cos()
    return torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)


def rope_cat(gh, gw, cfg: ViTConfig, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """EVA's axial rotary ``(sin, cos)`` (``config.rope='cat'``) for a ``gh`` x ``gw`` patch grid,
    each ``(gh * gw, head_dim)``, in the order of operations of timm's ``RotaryEmbeddingCat`` with
    ``in_pixels=False`` (``build_rotary_pos_embed``: ``freq_bands(step=1)``, ``_build_grid('index')``)
    so the angles are timm's bit for bit: ``head_dim / 4`` frequencies ``1 / theta ** (k / (head_dim / 4))``;
    per axis the patch index as float32 plus ``rope_grid_offset``, then ``/ n * ref`` where a
    reference grid is set (timm's ``ref_feat_shape``: EVA-02 fine-tuned at another size keeps its
    pretraining span); angles ``coord * frequency``, the first coordinate's then the second's
    (``rope_indexing``: 'ij' the row's first, 'xy' the column's; tokens stay row-major), laid out
    interleaved ``[a0, a0, a1, a1, ...]`` or in halves ``[a0, a1, ..., a0, a1, ...]``. Always float32."""
    n = cfg.head_dim // 4
    exp = torch.arange(0, n, 1, dtype=torch.int64, device=device).to(torch.float32) / n
    bands = 1.0 / (cfg.rope_theta ** exp)
    sizes = [gh, gw]
    ref = list(cfg.rope_ref_grid) if cfg.rope_ref_grid is not None else None
    axes = [torch.arange(s, dtype=torch.int64, device=device).to(torch.float32) + cfg.rope_grid_offset for s in sizes]
    if ref is not None:
        axes = [a / s * r for a, s, r in zip(axes, sizes, ref)]
    coords = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1)  # (gh, gw, [row, col])
    if cfg.rope_indexing == "xy":
        coords = coords.flip(-1)  # [col, row]: timm's 'xy' meshgrid, the same values
    angles = (coords.unsqueeze(-1) * bands).flatten(-2).flatten(0, -2)  # (gh * gw, head_dim / 2)
    sin, cos = angles.sin(), angles.cos()
    if cfg.rope_half:
        return torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
    return sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)


def rope_mixed(gh, gw, cfg: ViTConfig, freqs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE-Mixed's ``(sin, cos)``, each ``(depth, heads, gh * gw, head_dim)``, in the order of
    operations of timm's ``RotaryEmbeddingMixed.get_embed`` (``get_mixed_grid``, ``get_mixed_freqs``):
    integer patch indices as float32, ``t_x`` the first coordinate (``rope_indexing`` 'xy': the
    column), ``t_y`` the second; angles ``t_x * fx + t_y * fy`` per block and head with the learned
    ``rope_freqs`` ``(2, depth, heads, head_dim / 2)`` in float32, laid out interleaved."""
    axes = [torch.arange(s, dtype=torch.int64, device=freqs.device).to(torch.float32) for s in (gh, gw)]
    coords = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).reshape(-1, 2)  # [row, col]
    if cfg.rope_indexing == "xy":
        coords = coords.flip(-1)
    f = freqs.float()
    angles = coords[:, 0].unsqueeze(-1) * f[0].unsqueeze(-2) + coords[:, 1].unsqueeze(-1) * f[1].unsqueeze(-2)
    return angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """``[x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]`` (the interleaved RoPE layout, timm's ``rot``)."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last axis (the rotate-half RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last axis, weight only (AIMv2).

    timm's ``RmsNorm`` (``fast_norm.rms_norm``) and Hugging Face's ``Aimv2RMSNorm`` compute the
    same operations in the same order, ``x.pow(2).mean(-1)``, ``+ eps`` inside the ``rsqrt``, the
    product with ``x``, then the weight; the Hugging Face one takes the statistics in float32 and
    casts back before the weight, which is followed here (in float32 the two are the same bits).
    Written out rather than ``F.rms_norm``, whose fused kernel may round otherwise."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight


def relative_bias(table: torch.Tensor, cfg: ViTConfig, pos: Positions) -> torch.Tensor:
    """``(1, heads, N+1, N+1)`` attention-logit bias of a BEiT relative position table for the
    grid of ``pos``: the table resized from the config's grid in the source's way
    (``cfg.rel_pos_resize``; the same table at its own grid), then read through the index."""
    t = resize_rel_pos_table_torch(table, cfg.grid_size, pos.grid, cfg.rel_pos_resize, pos.rel_weights)
    n = pos.rel_index.shape[0]
    return t[pos.rel_index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)


def norm_layer(cfg: ViTConfig, dim: int) -> nn.Module:
    """The model's normalisation layer over ``dim`` channels (every LayerNorm of the encoder,
    its heads and patch norms is made here, so a family's other norm is one change):
    ``config.norm`` picks LayerNorm or RMSNorm, ``config.norm_eps`` its epsilon."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and PyTorch SDPA.

    Rows of ``qkv.weight`` are ``[q; k; v]``, each ``(num_heads * head_dim)`` rows ordered
    head-major, which is what Google's ``(D, heads, head_dim)`` kernels flatten to.
    Scaling is ``1/sqrt(head_dim)`` as in flax. With qk-norm (timm ``qk_norm=True``) the model's
    norm, over ``head_dim`` channels, is applied to each head's queries and keys before the
    product, as timm's ``Attention`` does (its ``norm_layer``, so its epsilon). BEiT: a relative position bias (the block's own
    table, plus the model's shared one) is added to the logits before the softmax."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.rel_pos_table = (nn.Parameter(torch.zeros(cfg.rel_pos_rows, cfg.num_heads))
                              if cfg.rel_pos_bias else None)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.attn_dim, bias=cfg.qkv_bias)
        self.q_norm = norm_layer(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = norm_layer(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.norm = norm_layer(cfg, cfg.attn_dim) if cfg.attn_norm else None  # EVA-02's scale_attn_inner
        self.proj = nn.Linear(cfg.attn_dim, cfg.width, bias=cfg.proj_bias)
        self.key_bias = cfg.key_bias
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.rotate = rotate_half if cfg.rope_half else rotate_interleaved
        self.block_index = 0  # set by the model: RoPE-Mixed's angles differ per block
        self.per_block = cfg.rope == "mixed"

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        b, n, _ = x.shape
        if self.qkv.bias is not None and not self.key_bias:  # q and v biases only: the key's held at zero
            a = self.num_heads * self.head_dim
            bias = self.qkv.bias
            bias = torch.cat([bias[:a], bias.new_zeros(a), bias[2 * a:]])
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            qkv = self.qkv(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.q_norm is not None:  # qk-norm comes before the rotation, as in timm Eva
            q, k = self.q_norm(q), self.k_norm(k)
        if pos.rope is not None:  # rotate the patch tokens' queries and keys; prefix tokens stay
            q, k = self._rotate(q, pos.rope), self._rotate(k, pos.rope)
        bias = relative_bias(self.rel_pos_table, self.cfg, pos) if self.rel_pos_table is not None else None
        if pos.rel_shared is not None:  # timm and transformers alike: the block's own, then the shared
            bias = pos.rel_shared if bias is None else bias + pos.rel_shared
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(self.norm(out) if self.norm is not None else out)

    def _rotate(self, t: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``t * cos + rotate_half(t) * sin`` on the tokens after the prefix (timm's
        ``apply_rot_embed(half=True)``, Hugging Face's ``apply_rotary_pos_emb``; with
        ``rope_half=False`` the pairwise ``rotate_interleaved``, timm's ``half=False``), in float32
        sin and cos and cast back to ``t``'s dtype once, as timm does."""
        sin, cos = rope
        if self.per_block:  # (depth, heads, N, head_dim): this block's, per head
            sin, cos = sin[self.block_index], cos[self.block_index]
        p = self.num_prefix_tokens
        patches = t[:, :, p:]
        return torch.cat([t[:, :, :p], (patches * cos + self.rotate(patches) * sin).to(t.dtype)], dim=2)


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; SwiGLU: ``fc1`` holds [gate; up] and the hidden is ``act(gate) * up``
    (DINOv2's ``w12``, timm's ``SwiGLUPacked``: the first half is the activated gate). With
    ``mlp_norm`` the hidden is normalised before ``fc2`` (timm's ``Mlp``/``SwiGLU`` ``norm_layer``)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_in_dim, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width, bias=cfg.mlp_bias)
        self.norm = norm_layer(cfg, cfg.mlp_dim) if cfg.mlp_norm else None  # EVA-02's scale_mlp, before fc2
        self.act = _activation(cfg.act)
        self.glu = cfg.mlp == "swiglu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.fc2(self.norm(h) if self.norm is not None else h)


class AttentionPool(nn.Module):
    """Attention pooling (big_vision's ``MAPHead``, timm's ``AttentionPoolLatent``, Hugging Face
    SigLIP's head): a learned probe attends over every token (``qkv`` rows are [q; k; v], the
    probe makes the query, the tokens the keys and values), the output projection follows, then
    ``x + mlp(norm(x))``: a residual around the MLP only.

    ``config.pool_head='aimv2'`` (Hugging Face ``Aimv2AttentionPoolingHead``): the probe is the
    query as it is, ``kv`` holds the [k; v] projections (biases as the blocks' ``qkv_bias``), the
    output projection (always a bias) is the result: no query projection, norm or MLP."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.width
        heads = cfg.pool_heads or cfg.num_heads  # its own count where it has one (Perception Encoder)
        self.num_heads, self.head_dim = heads, d // heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.plain = cfg.pool_head == "aimv2"
        if self.plain:
            self.kv = nn.Linear(d, 2 * d, bias=cfg.qkv_bias)
            self.proj = nn.Linear(d, d)
            return
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = norm_layer(cfg, d)
        self.mlp = Mlp(cfg.replace(mlp="mlp", mlp_bias=True, mlp_norm=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        if self.plain:
            q = self.latent.expand(b, -1, -1).reshape(b, 1, self.num_heads, self.head_dim)
            kv = self.kv(x)
        else:
            w_q, w_kv = self.qkv.weight[:d], self.qkv.weight[d:]
            b_q, b_kv = self.qkv.bias[:d], self.qkv.bias[d:]
            q = F.linear(self.latent.expand(b, -1, -1), w_q, b_q).reshape(b, 1, self.num_heads, self.head_dim)
            kv = F.linear(x, w_kv, b_kv)
        kv = kv.reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kv[0], kv[1])
        out = self.proj(out.transpose(1, 2).reshape(b, 1, d))
        if not self.plain:
            out = out + self.mlp(self.norm(out))
        return out[:, 0]


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (``gamma``, as timm and DINOv2 name it)."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm encoder block (``Encoder1DBlock``): x + attn(ln(x)), then x + mlp(ln(x));
    with LayerScale each branch is scaled per channel before it is added."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = norm_layer(cfg, cfg.width)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = norm_layer(cfg, cfg.width)
        self.mlp = Mlp(cfg)
        self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward_stages(self, x: torch.Tensor, pos: Positions) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x + self.ls1(self.attn(self.norm1(x), pos))
        return x, x + self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        return self.forward_stages(x, pos)[1]


class VisionTransformer(nn.Module):
    """The canonical ViT. ``forward`` takes NCHW float32 images and returns logits.

    ``forward_stages`` returns every intermediate the verifier compares (stem, embed, each
    block's attention and MLP, encoded, pooled, head_input, logits); ``pooled`` and
    ``head_input`` are reachable there and through :meth:`forward_head`. Inputs whose grid
    differs from the config's get their position embeddings resized on the fly in the source
    family's way (``config.pos_resize``), as ``npz2pt --image-size`` does.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.width
        self.stem = ResNetStem(cfg) if cfg.resnet_layers is not None else None
        self.patch_embed = nn.Conv2d(cfg.embed_in_chans, d, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        if cfg.patch_norm:  # vit-pytorch: LN(patch) -> Linear -> LN(width)
            patch_dim = cfg.embed_in_chans * cfg.patch_size ** 2
            self.patch_norm_pre = norm_layer(cfg, patch_dim)
            self.patch_norm_post = norm_layer(cfg, d)
        # AIMv2 (timm embed_norm_layer): the projected patches normalised before the table is added
        self.patch_embed_norm = norm_layer(cfg, d) if cfg.patch_embed_norm else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_reg_tokens, d)) if cfg.num_reg_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, d)) if cfg.mask_token else None  # training only
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_pos_rows, d)) if cfg.abs_pos_embed else None
        self.rel_pos_table = (nn.Parameter(torch.zeros(cfg.rel_pos_rows, cfg.num_heads))
                              if cfg.rel_pos_bias_shared else None)  # BEiT's shared table
        # RoPE-Mixed: learned frequencies (x's, y's) per block and head
        self.rope_freqs = (nn.Parameter(torch.zeros(2, cfg.depth, cfg.num_heads, cfg.head_dim // 2))
                           if cfg.rope == "mixed" else None)
        self.norm_pre = norm_layer(cfg, d) if cfg.norm_pre else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        for i, blk in enumerate(self.blocks):  # RoPE-Mixed: each block reads its own angles
            blk.attn.block_index = i
        self.norm = norm_layer(cfg, d) if cfg.final_norm != "none" else None
        self.attn_pool = AttentionPool(cfg) if cfg.classifier == "map" else None
        if cfg.representation_size:
            self.pre_logits = nn.Linear(d, cfg.representation_size)
        else:
            self.pre_logits = None
        self.head = nn.Linear(cfg.head_in_dim, cfg.num_classes, bias=cfg.head_bias) if cfg.num_classes else None
        self.head_dist = nn.Linear(d, cfg.num_classes) if cfg.distilled and cfg.num_classes else None

    # -- pieces ---------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens entering block 0: patches, prefix tokens (class, distillation,
        registers, in that order) and the position table, added to the tokens it has rows for
        (``config.pos_embed_prefix``), then ``norm_pre``."""
        return self.embed_with_positions(x)[0]

    def embed_with_positions(self, x: torch.Tensor) -> Tuple[torch.Tensor, Positions]:
        """:meth:`embed`, and the :class:`Positions` of its patch grid for the blocks."""
        if self.stem is not None:
            x = self.stem(x)
        if self.config.patch_norm:
            x, gh, gw = self._embed_normed_patches(x)
        else:
            x = self.patch_embed(x)
            gh, gw = x.shape[-2], x.shape[-1]
            x = x.flatten(2).transpose(1, 2)
        if self.patch_embed_norm is not None:
            x = self.patch_embed_norm(x)
        b = x.shape[0]
        tokens = [t.expand(b, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        mode = self.config.pos_embed_prefix
        pos = self.pos_embed_for(gh, gw)
        if pos is None:  # no absolute table (BEiT; DINOv3, whose positions are rotary only)
            x = torch.cat(tokens + [x], dim=1)
        elif mode == "all":
            x = torch.cat(tokens + [x], dim=1) + pos
        elif mode == "none":
            x = torch.cat(tokens + [x + pos], dim=1)
        else:  # "class": the class token and the patches take the table; registers go in after
            x = torch.cat([tokens[0], x], dim=1) + pos
            x = torch.cat([x[:, :1]] + tokens[1:] + [x[:, 1:]], dim=1)
        x = self.norm_pre(x) if self.norm_pre is not None else x
        return x, self.positions(gh, gw)

    def positions(self, gh: int, gw: int) -> Positions:
        """What the blocks need to know of a ``gh`` x ``gw`` patch grid (see :class:`Positions`)."""
        cfg = self.config
        pos = Positions(grid=(gh, gw))
        if cfg.rope == "dinov3":
            pos.rope = rope_dinov3(gh, gw, cfg.head_dim, cfg.rope_theta, self.patch_embed.weight.device,
                                   cfg.rope_periods)
        elif cfg.rope == "cat":
            pos.rope = rope_cat(gh, gw, cfg, self.patch_embed.weight.device)
        elif cfg.rope == "mixed":
            pos.rope = rope_mixed(gh, gw, cfg, self.rope_freqs)
        if self.config.rel_pos_bias or self.config.rel_pos_bias_shared:
            device = self.patch_embed.weight.device  # built on the CPU; the tables may live elsewhere
            pos.rel_index = rel_pos_index(gh, gw).to(device)
            if self.config.rel_pos_resize == "geometric":
                weights = geometric_resize_weights(self.config.grid_size, (gh, gw))
                pos.rel_weights = None if weights is None else (weights[0].to(device), weights[1].to(device))
            if self.rel_pos_table is not None:
                pos.rel_shared = relative_bias(self.rel_pos_table, self.config, pos)
        return pos

    def _embed_normed_patches(self, x: torch.Tensor):
        """Patch embedding with LayerNorms around it: the per-patch LN needs the flattened
        patch, so the conv is run as a matmul over ``unfold``'s ``(c, p1, p2)``-ordered
        patches (the order of a conv kernel row; ``patch_norm_pre`` is stored in it)."""
        p = self.config.patch_size
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        patches = F.unfold(x, p, stride=p).transpose(1, 2)  # (B, N, c*p*p)
        w = self.patch_embed.weight.reshape(self.patch_embed.weight.shape[0], -1)
        x = F.linear(self.patch_norm_pre(patches), w, self.patch_embed.bias)
        return self.patch_norm_post(x), gh, gw

    def pos_embed_for(self, gh: int, gw: int) -> Optional[torch.Tensor]:
        if self.pos_embed is None:
            return None
        g = self.config.grid_size
        if isinstance(gh, int) and isinstance(gw, int) and (gh, gw) == (g, g):
            return self.pos_embed
        return resize_pos_embed_torch(self.pos_embed, (gh, gw), self.config.num_pos_prefix,
                                      self.config.pos_resize)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``token``: the class token; ``gap``: the mean of the patch tokens (Google pools after
        the encoder norm; with ``final_norm='pooled'`` the norm is applied after pooling);
        ``map``: the attention-pooling head over every token, or over the patch tokens only
        (``map_prefix=False``). A distilled model pools both prefix tokens, ``(B, 2, width)``: one
        per head."""
        cfg = self.config
        if cfg.distilled:
            return tokens[:, :2]
        if cfg.classifier == "token":
            pooled = tokens[:, 0]
        elif cfg.classifier == "gap":
            pooled = tokens[:, cfg.num_prefix_tokens:].mean(dim=1)
        else:
            pooled = self.attn_pool(tokens if cfg.map_prefix else tokens[:, cfg.num_prefix_tokens:])
        if cfg.final_norm == "pooled":
            pooled = self.norm(pooled)
        return pooled

    def head_input(self, pooled: torch.Tensor) -> torch.Tensor:
        """Google's ``pre_logits``: ``tanh(Dense(pooled))`` when a representation layer exists."""
        return torch.tanh(self.pre_logits(pooled)) if self.pre_logits is not None else pooled

    def forward_head(self, head_in: torch.Tensor) -> torch.Tensor:
        if self.head_dist is not None:  # DeiT at inference: the mean of both heads
            return (self.head(head_in[:, 0]) + self.head_dist(head_in[:, 1])) / 2
        return self.head(head_in) if self.head is not None else head_in

    # -- whole passes ---------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block and (Google's) encoder norm."""
        x, pos = self.embed_with_positions(x)
        for blk in self.blocks:
            x = blk(x, pos)
        if self.config.final_norm == "encoder":
            x = self.norm(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.head_input(self.pool(self.forward_features(x))))

    def forward_stages(self, x: torch.Tensor,
                       each_block: Optional[Callable[[int, "Block"], ContextManager]] = None
                       ) -> Dict[str, torch.Tensor]:
        """Every intermediate, in execution order (``blocks.{i}.attn`` is the
        residual stream after the attention half of block i, ``blocks.{i}.mlp`` after the
        whole block). ``each_block(i, block)``: a context entered around each block's run (the
        block-by-block runner loads the block's weights there and frees them after)."""
        out: Dict[str, torch.Tensor] = {}
        if self.stem is not None:
            out["stem"] = self.stem(x)
        x, pos = self.embed_with_positions(x)
        out["embed"] = x
        for i, blk in enumerate(self.blocks):
            with each_block(i, blk) if each_block is not None else contextlib.nullcontext():
                a, x = blk.forward_stages(x, pos)
            out[f"blocks.{i}.attn"] = a
            out[f"blocks.{i}.mlp"] = x
        if self.config.final_norm == "encoder":
            x = self.norm(x)
        out["encoded"] = x
        out["pooled"] = self.pool(x)
        out["head_input"] = self.head_input(out["pooled"])
        out["logits"] = self.forward_head(out["head_input"])
        return out


def parameter_shapes(cfg: ViTConfig) -> Dict[str, Tuple[int, ...]]:
    """``{name: shape}`` of the canonical model's ``state_dict`` for ``cfg``, in its order.

    Read off the model itself, built on the ``meta`` device (no memory, about 50 ms for
    ViT-H/14, cached per config): every converter, writer and audit takes its shapes from
    here, so a module added to the model needs no second description of its tensors."""
    return dict(_parameter_shapes(cfg))


@functools.lru_cache(maxsize=32)
def _parameter_shapes(cfg: ViTConfig) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


