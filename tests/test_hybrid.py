"""Hybrid R50+ViT: the real (3, 4, 9) stem layout converts, and both GroupNorm storage forms read."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner

import vitconv
from _vitconv_cli.main import main
from vitconv.config import ViTConfig
from vitconv.formats.npz import NpzSource
from conftest import CASES, golden_expected, golden_input, golden_path
from test_google_rules import google_shapes

# Google's R50+ViT-B_16 stem (width 64, stages (3, 4, 9)) under a small transformer, so the
# test stays fast while every stem tensor has its published shape.
R50_SMALL_VIT = ViTConfig(image_size=64, patch_size=1, width=32, depth=1, num_heads=2, head_dim=16,
                          mlp_dim=64, num_classes=5, resnet_layers=(3, 4, 9), resnet_width=64)


def synthetic_npz(cfg: ViTConfig, path, seed=0, gn_vectors=False):
    rng = np.random.default_rng(seed)
    arrays = {}
    for k, s in sorted(google_shapes(cfg).items()):
        a = (rng.standard_normal(s) * 0.1).astype(np.float32)
        if gn_vectors and ("/gn" in k or k.startswith("gn_root")):
            a = a.reshape(-1)  # newer flax stores GroupNorm params as (C,)
        arrays[k] = a
    np.savez(path, **arrays)
    return arrays


def test_real_stage_layout_converts_with_published_stem_shapes(tmp_path):
    src = tmp_path / "R50+tiny.npz"
    arrays = synthetic_npz(R50_SMALL_VIT, src)
    assert arrays["block3/unit9/conv3/kernel"].shape == (1, 1, 256, 1024)
    assert arrays["embedding/kernel"].shape == (1, 1, 1024, 32)
    r = CliRunner().invoke(main, ["npz2pt", str(src), "-o", str(tmp_path / "r50.pt")])
    assert r.exit_code == 0, r.output
    assert "R3+4+9(w64)+ViT" in r.output and "@64px" in r.output
    model = vitconv.load(tmp_path / "r50.pt")
    assert model.config == R50_SMALL_VIT
    n = sum(int(np.prod(a.shape)) for a in arrays.values())
    assert sum(p.numel() for p in model.parameters()) == n
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_groupnorm_stored_as_vectors_gives_the_same_model(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    synthetic_npz(R50_SMALL_VIT, a, seed=3)
    synthetic_npz(R50_SMALL_VIT, b, seed=3, gn_vectors=True)
    assert NpzSource(b).shape("gn_root/scale") == (64,)
    ma, mb = vitconv.load(a), vitconv.load(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_golden_hybrid_resized_input_runs_through_the_stem():
    """At 64 px the /8 tiny stem gives an 8x8 grid: the position table is resized on the fly."""
    case = CASES["tiny_r50_32"]
    model = vitconv.load(golden_path(case["checkpoint"]))
    with torch.no_grad():
        same = model(golden_input(case)).numpy()
        big = model(torch.nn.functional.interpolate(golden_input(case), size=64))
    assert np.abs(same - golden_expected(case, "logits")).max() <= 2e-5
    assert big.shape == (4, 10)


def test_tf_same_padding_is_asymmetric_for_stride_two():
    """TF SAME for a 7x7/2 conv on 32 px pads 2 before and 3 after; a symmetric pad of 3
    (PyTorch's usual choice) shifts every output by one input pixel."""
    from vitconv.model import tf_same_pad

    x = torch.zeros(1, 1, 32, 32)
    y = tf_same_pad(x, 7, 2)
    assert y.shape[-2:] == (37, 37)
    marker = torch.zeros(1, 1, 32, 32)
    marker[..., 0, 0] = 1
    padded = tf_same_pad(marker, 7, 2)
    assert padded[0, 0, 2, 2] == 1  # two rows/cols before, three after
    assert tf_same_pad(torch.zeros(1, 1, 31, 31), 7, 2).shape[-1] == 31 + 6  # odd: 3 + 3


def test_real_stage_layout_agrees_with_the_independent_numpy_reference(tmp_path):
    """The golden hybrid has one unit per stage; here (3, 4, 9) exercises the identity-residual
    units too, checked against the NumPy reference that reads Google's keys directly."""
    from vitconv.verification.references.google_numpy import reference_forward

    src = tmp_path / "r50.npz"
    synthetic_npz(R50_SMALL_VIT, src, seed=7)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    ref = reference_forward(src, x)
    with torch.no_grad():
        got = vitconv.load(src).forward_stages(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    for stage in ("embed", "encoded", "logits"):
        scale = max(1.0, float(np.sqrt(np.mean(np.square(ref[stage])))))
        err = float(np.abs(got[stage].double().numpy() - ref[stage]).max())
        assert err <= 1e-4 * scale, f"{stage}: {err:.3g}"
