"""Position-embedding resizing: Google's scipy route and its traceable torch twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitconv.ops import resize_pos_embed, resize_pos_embed_torch, split_pos_embed


@pytest.mark.parametrize("old,new,prefix", [(4, 6, 1), (14, 24, 1), (7, 3, 0), (24, 14, 1), (2, 9, 0)])
def test_torch_twin_equals_scipy_zoom(old, new, prefix):
    p = np.random.default_rng(old * 100 + new).standard_normal((1, prefix + old * old, 16)).astype(np.float32)
    a = resize_pos_embed(p, new, prefix)
    b = resize_pos_embed_torch(torch.from_numpy(p), (new, new), prefix).numpy()
    assert a.shape == b.shape == (1, prefix + new * new, 16)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(a[:, :prefix], p[:, :prefix])  # class-token row kept as is


def test_zoom_keeps_corners_aligned():
    """Order-1 zoom with grid_mode=False samples the old corners exactly (align_corners=True);
    timm's align_corners=False resize would not."""
    p = np.random.default_rng(1).standard_normal((1, 1 + 16, 3)).astype(np.float32)
    out = resize_pos_embed(p, 7, 1)
    _, old, _ = split_pos_embed(p, 1)
    _, new, _ = split_pos_embed(out, 1)
    for (i, j), (k, l) in [((0, 0), (0, 0)), ((0, 3), (0, 6)), ((3, 0), (6, 0)), ((3, 3), (6, 6))]:
        np.testing.assert_allclose(new[k, l], old[i, j], atol=1e-6)


def test_same_grid_is_identity_and_bad_grid_raises():
    p = np.zeros((1, 1 + 9, 4), np.float32)
    assert resize_pos_embed(p, 3, 1) is not None and resize_pos_embed(p, 3, 1).shape == p.shape
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(np.zeros((1, 11, 4), np.float32), 3, 1)
