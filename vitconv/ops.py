"""Lossy operations: position-embedding resizing, in each source family's own way.

Google fine-tunes at a higher resolution by ``vit_jax.checkpoint.load_pretrained``:
keep the class-token row, reshape the rest to its square grid, and resample it with
``scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1)``. Order-1 zoom with scipy's
default ``grid_mode=False`` maps output index ``o`` to input ``o * (old-1)/(new-1)``:
bilinear interpolation with the corner samples aligned. Other families resize otherwise
(:data:`vitconv.config.POS_RESIZES`): timm and OpenCLIP bicubic with antialiasing, Hugging
Face bicubic without, the original DINOv2 bicubic with a ``+0.1`` on the scale factor, and
big_vision's sincos2d models generate their fixed table afresh for the new grid. The
same table resized two ways differs by far more than rounding, so the converted model
records its source's mode and every resize (``--image-size``, a run or an export at another
resolution) uses it.

:func:`resize_pos_embed` is the converter's route (for "zoom" literally scipy's zoom, as
Google); :func:`resize_pos_embed_torch` is the same arithmetic in traceable torch ops
(zoom: ``F.interpolate(mode='bilinear', align_corners=True)``), used when a model runs or is
exported at a resolution other than its own. Tests hold the two to each other, and each
mode to its family's own code.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily; see resize_pos_embed_torch
    import torch


def split_pos_embed(posemb: np.ndarray, num_prefix_tokens: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """``(1, prefix + g*g, D)`` -> prefix rows, ``(g, g, D)`` grid, g. Raises on a non-square grid."""
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"position embedding must be (1, tokens, dim), got {tuple(posemb.shape)}")
    n_grid = posemb.shape[1] - num_prefix_tokens
    g = math.isqrt(max(n_grid, 0))
    if n_grid <= 0 or g * g != n_grid:
        raise ValueError(f"position embedding has {n_grid} grid tokens, not a square grid")
    return posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:].reshape(g, g, -1), g


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's fixed position table (``posemb='sincos2d'``, MoCo v3's): ``(1, h*w, width)``
    float32, rows in raster order, columns [sin(x*w), cos(x*w), sin(y*w), cos(y*w)] with
    ``w = temperature ** -(k / (width/4 - 1))``. Computed in float32 step by step, as jax.numpy
    does it by default (``big_vision/models/vit.py: posemb_sincos_2d``)."""
    if width % 4 or width < 8:
        raise ValueError(f"sincos2d needs a width that is a multiple of 4 (and at least 8), got {width}")
    n = width // 4
    omega = np.float32(1.0) / (np.float32(temperature) ** (np.arange(n, dtype=np.float32) / np.float32(n - 1)))
    y, x = np.mgrid[:h, :w]
    y = y.reshape(-1, 1).astype(np.float32) * omega
    x = x.reshape(-1, 1).astype(np.float32) * omega
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


def posemb_sincos_2d_torch(h, w, width: int, temperature: float = 10_000.0) -> "torch.Tensor":
    """:func:`posemb_sincos_2d` in traceable torch ops (``h``, ``w`` may be symbolic)."""
    import torch

    n = width // 4
    omega = 1.0 / (temperature ** (torch.arange(n, dtype=torch.float32) / (n - 1)))
    ys = torch.arange(h, dtype=torch.float32)[:, None].expand(-1, w).reshape(-1, 1) * omega
    xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, -1).reshape(-1, 1) * omega
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)[None]


def posemb_sincos_2d_aimv2(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Hugging Face AIMv2's native table (``Aimv2VisionEmbeddings`` with ``is_native``,
    ``build_2d_sinusoidal_position_embedding`` with its halves swapped): ``(1, h*w, width)``
    float32, rows in raster order, columns [sin(x*w), cos(x*w), sin(y*w), cos(y*w)] with
    ``w = temperature ** -(k / (width/4))``, computed in float64 and rounded to float32 once."""
    if width % 4:
        raise ValueError(f"AIMv2's sin-cos table needs a width that is a multiple of 4, got {width}")
    omega = 1.0 / temperature ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    y, x = np.mgrid[:h, :w]
    y = np.outer(y.reshape(-1).astype(np.float64), omega)
    x = np.outer(x.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


def posemb_sincos_2d_aimv2_torch(h, w, width: int, temperature: float = 10_000.0) -> "torch.Tensor":
    """:func:`posemb_sincos_2d_aimv2` in traceable torch ops (``h``, ``w`` may be symbolic)."""
    import torch

    n = width // 4
    omega = 1.0 / temperature ** (torch.arange(n, dtype=torch.float64) / n)
    ys = torch.arange(h, dtype=torch.float64)[:, None].expand(-1, w).reshape(-1, 1) * omega
    xs = torch.arange(w, dtype=torch.float64)[None, :].expand(h, -1).reshape(-1, 1) * omega
    return torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)[None].float()


def resize_pos_embed(posemb: np.ndarray, new_grid: Union[int, Sequence[int]],
                     num_prefix_tokens: int, mode: str = "zoom") -> np.ndarray:
    """Resize a ``(1, prefix + g*g, D)`` table to ``new_grid``, keeping the prefix rows, the way
    ``mode`` says (:data:`vitconv.config.POS_RESIZES`; "zoom" is Google's ``load_pretrained``).

    >>> resize_pos_embed(np.zeros((1, 1 + 4, 8), np.float32), 3, 1).shape
    (1, 10, 8)
    """
    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid, g = split_pos_embed(np.asarray(posemb), num_prefix_tokens)
    if (gh, gw) == (g, g):
        return np.asarray(posemb)
    if mode in ("sincos2d", "sincos2d_aimv2"):  # a function of the grid, not a table to resample
        make = posemb_sincos_2d if mode == "sincos2d" else posemb_sincos_2d_aimv2
        table = make(gh, gw, posemb.shape[-1]).astype(posemb.dtype)
        return np.concatenate([prefix, table], axis=1)
    if mode != "zoom":
        import torch  # the bicubic modes are torch's F.interpolate, as in their families' code

        out = resize_pos_embed_torch(torch.from_numpy(np.ascontiguousarray(posemb)), (gh, gw),
                                     num_prefix_tokens, mode)
        return out.numpy().astype(posemb.dtype)
    import scipy.ndimage  # imported here: only conversion with resizing needs scipy

    zoomed = scipy.ndimage.zoom(grid, (gh / g, gw / g, 1), order=1)
    if zoomed.shape[:2] != (gh, gw):  # zoom rounds the output size; never silently off by one
        raise ValueError(f"zoom produced grid {zoomed.shape[:2]}, wanted {(gh, gw)}")
    return np.concatenate([prefix, zoomed.reshape(1, gh * gw, -1)], axis=1).astype(posemb.dtype)


def resize_pos_embed_torch(posemb: "torch.Tensor", new_grid: Tuple[int, int],
                           num_prefix_tokens: int, mode: str = "zoom") -> "torch.Tensor":
    """Traceable twin of :func:`resize_pos_embed`, computed in float32 and cast back (as timm,
    DINOv2 and Hugging Face's DINOv2 do). ``new_grid`` may hold symbolic sizes (ONNX /
    torch.export dynamic resolution)."""
    import torch  # imported here so reading and error paths never pay for torch
    import torch.nn.functional as F

    n = posemb.shape[1] - num_prefix_tokens
    g = math.isqrt(n)
    prefix = posemb[:, :num_prefix_tokens]
    if mode in ("sincos2d", "sincos2d_aimv2"):
        make = posemb_sincos_2d_torch if mode == "sincos2d" else posemb_sincos_2d_aimv2_torch
        table = make(new_grid[0], new_grid[1], posemb.shape[-1]).to(posemb.dtype)
        return torch.cat([prefix, table], dim=1)
    grid = posemb[:, num_prefix_tokens:].float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    if mode == "zoom":
        grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=True)
    elif mode in ("bicubic", "bicubic_aa"):
        grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False,
                             antialias=mode == "bicubic_aa")
    elif mode == "bilinear":  # jax.image.resize "linear": the triangle kernel, widened when shrinking
        # (FlexiViT; SigLIP 2 / NaFlex, whose transformers code builds these weights as a matrix)
        grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=False, antialias=True)
    elif mode == "dinov2":  # dinov2/models/vision_transformer.py: interpolate_offset 0.1
        # DINOv2 keeps its table when both sides equal the checkpoint's grid; the offset makes
        # the resize no identity there, so the skip is arithmetic (scale 1 is the identity) and
        # holds in a traced graph too, where the sizes are not Python numbers
        gh, gw = (torch.as_tensor(n, dtype=torch.float64) for n in new_grid)
        same = (gh == g) & (gw == g)
        rows = _bicubic_matrix(g, new_grid[0], torch.where(same, 1.0, (gh + 0.1) / g))
        cols = _bicubic_matrix(g, new_grid[1], torch.where(same, 1.0, (gw + 0.1) / g))
        grid = torch.einsum("hi,bcij,wj->bchw", rows, grid, cols)
    else:
        raise ValueError(f"unknown position-table resize {mode!r}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, posemb.shape[-1]).to(posemb.dtype)
    return torch.cat([prefix, grid], dim=1)


def _bicubic_matrix(n_in: int, n_out, scale_factor) -> "torch.Tensor":
    """``(n_out, n_in)`` weights of PyTorch's bicubic resampling (``align_corners=False``) with
    an explicit ``scale_factor``: ``F.interpolate(x, scale_factor=s, mode='bicubic')`` along one
    axis is ``W @ x``. Why a matrix: the original DINOv2 passes ``scale_factor=(g + 0.1) / M``,
    which no ``size=`` call reproduces, and a ``scale_factor`` computed from a symbolic size
    does not trace (ONNX, torch.export, TorchScript); built from ``arange`` it does. Same taps as
    ATen's ``upsample_bicubic2d``: source ``(dst + 0.5) / s - 0.5`` (not clamped), the cubic
    convolution kernel with A = -0.75, neighbours clamped to the border."""
    import torch

    a = -0.75
    # as ATen: the reciprocal of the scale in double, rounded to float, then float arithmetic
    inverse = 1.0 / torch.as_tensor(scale_factor, dtype=torch.float64)
    src = inverse.float() * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5
    base = torch.floor(src)
    t = src - base
    # weights of the taps at base-1 .. base+2 (ATen's get_cubic_upsample_coefficients)
    x1, x2 = t + 1, 1 - t
    w = torch.stack([((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a,
                     ((a + 2) * t - (a + 3)) * t * t + 1,
                     ((a + 2) * x2 - (a + 3)) * x2 * x2 + 1,
                     ((a * (x2 + 1) - 5 * a) * (x2 + 1) + 8 * a) * (x2 + 1) - 4 * a], dim=1)
    taps = (base.long()[:, None] + torch.arange(-1, 3)[None, :]).clamp(0, n_in - 1)
    return torch.zeros(n_out, n_in).scatter_add(1, taps, w)


def _tf_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``tf.image.resize(method="bilinear")`` along one axis as an ``(n_out, n_in)`` matrix:
    half-pixel centres, edge samples clamped, no antialiasing."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        x = (o + 0.5) * n_in / n_out - 0.5
        lo, frac = math.floor(x), x - math.floor(x)
        m[o, min(max(lo, 0), n_in - 1)] += 1.0 - frac
        m[o, min(max(lo + 1, 0), n_in - 1)] += frac
    return m


def resample_patch_embed(weight: np.ndarray, new_patch: int) -> np.ndarray:
    """FlexiViT's patch-embedding resample (``big_vision/models/proj/flexi/vit.py:
    resample_patchemb``) of an OIHW kernel to ``new_patch`` x ``new_patch``: the pseudo-inverse
    of bilinearly resizing a patch, so a model fed patches resized the same way computes the
    same tokens. ``B`` resizes a flattened old patch to the new size (TF's bilinear, per axis);
    each kernel becomes ``pinv(B.T) @ kernel`` (float64, cast back)."""
    old = weight.shape[-1]
    if weight.shape[-2] != old:
        raise ValueError(f"patch kernel must be square, got {weight.shape}")
    resize = np.kron(_tf_bilinear_matrix(old, new_patch), _tf_bilinear_matrix(old, new_patch))
    flat = weight.reshape(-1, old * old).astype(np.float64)
    out = flat @ np.linalg.pinv(resize.T).T
    return out.reshape(*weight.shape[:2], new_patch, new_patch).astype(weight.dtype)


# -- relative position bias tables (BEiT) -----------------------------------------------
#: timm's bisection of the ratio: [1.01, 1.5] halved until narrower than 1e-6, which takes the
#: same number of steps whichever half is kept (so a traced graph can unroll it).
_BISECT_LO, _BISECT_HI, _BISECT_WIDTH = 1.01, 1.5, 1e-6
_BISECT_STEPS = next(k for k in range(64) if (_BISECT_HI - _BISECT_LO) / 2 ** k <= _BISECT_WIDTH)


def geometric_offsets(src: int, dst) -> "torch.Tensor":
    """Where timm's ``resize_rel_pos_bias_table`` (BEiT's fine-tuning code) places the ``src``
    rows of one axis of a distance table that must cover ``dst`` rows, float32: at offsets 0, ±1,
    ±(1 + q), ±(1 + q + q^2), ... whose ratio ``q`` in [1.01, 1.5] is bisected (in double, down
    to a bracket of 1e-6; the last midpoint is used) until ``1 + q + ... + q^(src//2 - 1)`` just
    reaches ``dst // 2``. Shrinking, ``q`` stays near 1.01 and the offsets overshoot. timm runs
    the bisection in Python; here it is unrolled in torch ops (the bracket narrows by half each
    step either way), so ``dst`` may be symbolic."""
    import torch

    half = src // 2
    goal = torch.floor(_size_tensor(dst) / 2)
    # made from goal, not torch.tensor: a literal would be a constant lifted out of the traced graph
    lo, hi = torch.full_like(goal, _BISECT_LO), torch.full_like(goal, _BISECT_HI)
    q = lo
    for _ in range(_BISECT_STEPS):
        q = (lo + hi) / 2.0
        over = (1.0 - q ** half) / (1.0 - q) > goal
        lo, hi = torch.where(over, lo, q), torch.where(over, q, hi)
    side = torch.cumsum(q ** torch.arange(half, dtype=torch.float64, device=goal.device), dim=0)  # 1, 1 + q, ...
    return torch.cat([-side.flip(0), torch.zeros(1, dtype=torch.float64, device=goal.device), side]).float()


def _size_tensor(n) -> "torch.Tensor":
    """A (possibly symbolic or traced) size as a float64 tensor, read off ``arange``: turning it
    into a tensor directly makes torch.export fix it to the example's value."""
    import torch

    return torch.ones_like(torch.arange(n, dtype=torch.float64)).sum()


def _linear_matrix(points: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
    """``(len(targets), len(points))`` weights of linear interpolation over the increasing,
    possibly uneven ``points``, held at the edge values outside them (as timm's
    ``RegularGridInterpolator``: the right neighbour is the first point not below the target,
    as ``bucketize``; distances clamped at 0; a target on a point takes that point). Built from
    comparisons, not ``bucketize`` or a scatter, so that it exports."""
    import torch

    n = points.shape[0]
    right = (points[None, :] < targets[:, None]).sum(dim=1).clamp(max=n - 1)
    left = (right - 1).clamp(min=0)
    d_left = (targets - points[left]).clamp(min=0)
    d_right = (points[right] - targets).clamp(min=0)
    both = (d_left == 0) & (d_right == 0)
    d_left, d_right = torch.where(both, 1.0, d_left), torch.where(both, 1.0, d_right)
    total = d_left + d_right
    cols = torch.arange(n)[None, :]
    return ((d_right / total)[:, None] * (cols == left[:, None]) +
            (d_left / total)[:, None] * (cols == right[:, None]))


def _geometric_matrix(src: int, dst, same) -> "torch.Tensor":
    """``(dst, src)``: timm's geometric resize along one axis, or the identity where ``same``
    (timm leaves the table alone when both axes keep their size; resized, even an axis of the
    same size moves)."""
    import torch

    targets = torch.arange(dst, dtype=torch.float32) - (dst // 2)
    resize = _linear_matrix(geometric_offsets(src, dst), targets)
    keep = (torch.arange(dst)[:, None] == torch.arange(src)[None, :]).float()
    return torch.where(same, keep, resize)


def geometric_resize_weights(grid: int, new_grid: Tuple[int, int]) -> Optional[Tuple["torch.Tensor", "torch.Tensor"]]:
    """The ``(rows, cols)`` matrices of timm's geometric resize of a ``grid`` table for
    ``new_grid`` (None where the grid is its own): one pair serves every table of a forward pass."""
    src, dst = 2 * grid - 1, (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    if isinstance(dst[0], int) and isinstance(dst[1], int) and dst == (src, src):
        return None
    same = (_size_tensor(dst[0]) == src) & (_size_tensor(dst[1]) == src)
    rows, cols = (_geometric_matrix(src, n, same) for n in dst)
    return rows, cols


def resize_rel_pos_table_torch(table: "torch.Tensor", grid: int, new_grid: Tuple[int, int],
                               mode: str = "geometric",
                               weights: Optional[Tuple["torch.Tensor", "torch.Tensor"]] = None) -> "torch.Tensor":
    """A BEiT relative position bias table ``((2g-1)^2 + 3, heads)`` trained on a ``grid`` x
    ``grid`` patch grid, for a ``gh`` x ``gw`` grid: the distance rows resized as a
    ``(heads, 2g-1, 2g-1)`` image to ``(2gh-1, 2gw-1)`` in the source family's way
    (:data:`vitconv.config.REL_POS_RESIZES`), the 3 class-token rows kept. Computed in float32
    and cast back. The same grid returns the table itself; ``new_grid`` may hold symbolic or
    traced sizes (ONNX, torch.export, TorchScript tracing). ``weights``: the geometric matrices
    for this grid, made once (:func:`geometric_resize_weights`)."""
    import torch
    import torch.nn.functional as F

    src, dst = 2 * grid - 1, (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    if isinstance(dst[0], int) and isinstance(dst[1], int) and dst == (src, src):
        return table
    heads = table.shape[1]
    body = table[:src * src].float().t().reshape(1, heads, src, src)
    if mode == "bilinear":  # transformers' BeitRelativePositionBias (the identity at the same size)
        out = F.interpolate(body, size=dst, mode="bilinear", align_corners=False)[0]
    elif mode == "geometric":  # timm's resize_rel_pos_bias_table (its scipy-free path)
        rows, cols = weights or geometric_resize_weights(grid, new_grid)
        out = torch.einsum("hi,nij,wj->nhw", rows, body[0], cols)
    else:
        raise ValueError(f"unknown relative position table resize {mode!r}")
    out = out.reshape(heads, -1).t().to(table.dtype)
    return torch.cat([out, table[src * src:]], dim=0)


def resize_rel_pos_table(table: np.ndarray, grid: int, new_grid: int, mode: str) -> np.ndarray:
    """:func:`resize_rel_pos_table_torch` for a NumPy table (a conversion to another resolution)."""
    import torch

    out = resize_rel_pos_table_torch(torch.from_numpy(np.ascontiguousarray(table)), grid, (new_grid, new_grid), mode)
    return out.numpy().astype(table.dtype)


def rel_pos_index(gh, gw) -> "torch.Tensor":
    """``(N+1, N+1)`` rows of a BEiT relative position table for every (query, key) pair of a
    ``gh`` x ``gw`` grid with a class token first (``N = gh*gw``, raster order), as BEiT's
    ``gen_relative_position_index``: patch pairs take ``(dy + gh-1) * (2gw-1) + (dx + gw-1)``
    with ``d = query - key``; then class->token, token->class and class->class take the three
    rows after the ``(2gh-1)(2gw-1)`` distance rows. Built from ``arange`` and ``cat`` so that
    it traces with symbolic sizes."""
    import torch

    ys = torch.arange(gh)[:, None].expand(gh, gw).reshape(-1)
    xs = torch.arange(gw)[None, :].expand(gh, gw).reshape(-1)
    idx = (ys[:, None] - ys[None, :] + (gh - 1)) * (2 * gw - 1) + (xs[:, None] - xs[None, :] + (gw - 1))
    n, rows = idx.shape[0], (2 * gh - 1) * (2 * gw - 1)
    top = torch.cat([torch.full((1, 1), 2, dtype=torch.long), torch.zeros((1, n), dtype=torch.long)], dim=1)
    body = torch.cat([torch.ones((n, 1), dtype=torch.long), idx - rows], dim=1)
    return torch.cat([top, body], dim=0) + rows
