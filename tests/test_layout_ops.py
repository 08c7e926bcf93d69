"""Each layout op against an independent numpy formulation, and its inverse (bitwise)."""

from __future__ import annotations

import numpy as np
import pytest

from vitconv.config import ViTConfig
from vitconv.layouts import transforms as L

RNG = np.random.default_rng(0)
CFG = ViTConfig(image_size=32, patch_size=8, width=12, depth=1, num_heads=3, head_dim=5, mlp_dim=7,
                num_classes=4)


def r(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


OPS = [
    (L.CONV, [r(8, 8, 3, 12)]),
    (L.DENSE, [r(12, 7)]),
    (L.GN, [r(1, 1, 1, 12)]),
    (L.IDENTITY, [r(1, 17, 12)]),
    (L.QKV_KERNEL, [r(12, 3, 5), r(12, 3, 5), r(12, 3, 5)]),
    (L.QKV_BIAS, [r(3, 5), r(3, 5), r(3, 5)]),
    (L.ATTN_OUT, [r(3, 5, 12)]),
]


@pytest.mark.parametrize("op,arrays", OPS, ids=[o.name for o, _ in OPS])
def test_round_trip_is_bitwise(op, arrays):
    back = op.from_canonical(op.to_canonical(arrays, CFG), CFG)
    assert len(back) == op.arity
    for a, b in zip(arrays, back):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()


def test_conv_kernel_computes_the_same_convolution():
    """A VALID patch conv in HWIO (Flax) and OIHW (PyTorch) gives the same numbers."""
    import torch

    k = r(4, 4, 3, 6)
    x = r(1, 8, 8, 3)  # NHWC
    # Flax: out[n, i, j, o] = sum_{h,w,c} x[n, 4i+h, 4j+w, c] k[h, w, c, o]
    patches = x.reshape(1, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5)
    want = np.einsum("nijhwc,hwco->nijo", patches, k)
    got = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2),
                                     torch.from_numpy(L.hwio_to_oihw(k)), stride=4)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), want, atol=1e-5)


def test_fused_qkv_matches_per_head_projections():
    """Flax DenseGeneral: q[n, h, d] = sum_D x[n, D] K[D, h, d] + b[h, d]. The fused Linear's
    rows must produce q, k, v in that head-major order."""
    x = r(5, 12)
    ks, bs = [r(12, 3, 5) for _ in range(3)], [r(3, 5) for _ in range(3)]
    w = L.merge_qkv_kernels(*ks)
    b = L.merge_qkv_biases(*bs)
    fused = x @ w.T + b  # what nn.Linear computes
    for idx in range(3):
        want = np.einsum("nD,Dhd->nhd", x, ks[idx]) + bs[idx]
        got = fused[:, idx * 15:(idx + 1) * 15].reshape(5, 3, 5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_out_matches_flax_out_projection():
    y = r(5, 3, 5)  # (tokens, heads, head_dim)
    k = r(3, 5, 12)
    want = np.einsum("nhd,hdD->nD", y, k)
    got = y.reshape(5, 15) @ L.heads_out_to_linear(k).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_kernel_matches_linear():
    x, k = r(5, 12), r(12, 7)
    np.testing.assert_allclose(x @ L.dense_to_linear(k).T, x @ k, rtol=1e-6)
