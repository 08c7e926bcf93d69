"""Lossy operations: position-embedding resizing.

Google fine-tunes at a higher resolution by ``vit_jax.checkpoint.load_pretrained``:
keep the class-token row, reshape the rest to its square grid, and resample it with
``scipy.ndimage.zoom(grid, (new/old, new/old, 1), order=1)``. Order-1 zoom with scipy's
default ``grid_mode=False`` maps output index ``o`` to input ``o * (old-1)/(new-1)``:
bilinear interpolation with the corner samples aligned. timm instead resizes with
``align_corners=False`` bicubic (and antialiasing when shrinking), which gives a
different table; that is one of the silent differences this project exists to avoid.

:func:`resize_pos_embed` is the converter's route (literally scipy's zoom, as Google);
:func:`resize_pos_embed_torch` is the same arithmetic in traceable torch ops
(``F.interpolate(mode='bilinear', align_corners=True)``), used when a model runs or is
exported at a resolution other than its own. Tests hold the two to each other.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence, Tuple, Union

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


def resize_pos_embed(posemb: np.ndarray, new_grid: Union[int, Sequence[int]],
                     num_prefix_tokens: int) -> np.ndarray:
    """Resize a ``(1, prefix + g*g, D)`` table to ``new_grid`` exactly as Google's
    ``load_pretrained`` does (class-token row kept, ``scipy.ndimage.zoom`` order 1).

    >>> resize_pos_embed(np.zeros((1, 1 + 4, 8), np.float32), 3, 1).shape
    (1, 10, 8)
    """
    import scipy.ndimage  # imported here: only conversion with resizing needs scipy

    gh, gw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid, g = split_pos_embed(np.asarray(posemb), num_prefix_tokens)
    if (gh, gw) == (g, g):
        return np.asarray(posemb)
    zoomed = scipy.ndimage.zoom(grid, (gh / g, gw / g, 1), order=1)
    if zoomed.shape[:2] != (gh, gw):  # zoom rounds the output size; never silently off by one
        raise ValueError(f"zoom produced grid {zoomed.shape[:2]}, wanted {(gh, gw)}")
    return np.concatenate([prefix, zoomed.reshape(1, gh * gw, -1)], axis=1).astype(posemb.dtype)


def resize_pos_embed_torch(posemb: "torch.Tensor", new_grid: Tuple[int, int],
                           num_prefix_tokens: int) -> "torch.Tensor":
    """Traceable twin of :func:`resize_pos_embed` (bilinear, ``align_corners=True``).

    ``new_grid`` may hold symbolic sizes (ONNX / torch.export dynamic resolution)."""
    import torch  # imported here so reading and error paths never pay for torch
    import torch.nn.functional as F

    n = posemb.shape[1] - num_prefix_tokens
    g = math.isqrt(n)
    prefix = posemb[:, :num_prefix_tokens]
    grid = posemb[:, num_prefix_tokens:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, posemb.shape[-1])
    return torch.cat([prefix, grid], dim=1)
