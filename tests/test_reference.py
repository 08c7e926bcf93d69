"""The NumPy reference alone reproduces Google's own Flax outputs on every golden case.

The reference reads Google's ``.npz`` keys directly and shares no code with the converter,
so agreement here is independent evidence: expected values are Google's files, never ours.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CASES, GOLDEN, golden_expected, golden_path
from vitconv.verification.references import google_numpy as R

STAGE_OF = {"logits": "logits", "pooled": "pooled", "prelogits": "head_input"}
GOOGLE = {v["name"]: v["config"] for v in json.loads((GOLDEN / "jax/manifest.json").read_text())["variants"]}


def run_reference(case, dtype=np.float64):
    ref = R.GoogleViTReference.from_npz(golden_path(case["checkpoint"]), dtype=dtype)
    return ref, ref.forward_stages(np.load(golden_path(case["input"])))


def test_reference_reproduces_google_outputs(case):
    # Measured (float64): logits 1.5e-5 / 1.1e-6 / 5.6e-6 / 9.8e-6 / 1.6e-5 / 4.4e-6 for
    # token_p8_32 / gap / prelogits / p4_48 / r50 / resize; Google's own float32 rounding.
    _, stages = run_reference(case)
    tol = case["tolerance"]["max_abs"]
    assert tol <= 2e-5
    for what, stage in STAGE_OF.items():
        want = golden_expected(case, what)
        assert stages[stage].shape == want.shape
        err = float(np.abs(stages[stage] - want).max())
        assert err <= tol, f"{case['name']} {what}: {err:.3g}"
    assert stages["logits"].argmax(-1).tolist() == case["top1"]


def test_float32_reference_stays_close(case):
    _, s32 = run_reference(case, np.float32)
    assert s32["logits"].dtype == np.float32
    assert float(np.abs(s32["logits"] - golden_expected(case, "logits")).max()) <= 5e-5


def test_resized_position_table_is_googles_bit_for_bit():
    case = CASES["tiny_token_p8_32_to_48"]
    ref = R.GoogleViTReference.from_npz(golden_path(case["checkpoint"]))
    assert ref.arch.grid_size == 4 and ref.arch.image_size == 32
    np.testing.assert_array_equal(ref.pos_embed(6).astype(np.float32), golden_expected(case, "posemb_resized"))


@pytest.mark.parametrize("name", sorted(GOOGLE))
def test_architecture_read_off_keys_matches_googles_config(name):
    cfg = GOOGLE[name]
    arch = R.GoogleViTReference.from_npz(golden_path(f"jax/{name}.npz")).arch
    t = cfg["transformer"]
    assert (arch.depth, arch.num_heads, arch.width) == (t["num_layers"], t["num_heads"], cfg["hidden_size"])
    assert arch.classifier == cfg["classifier"]
    assert arch.has_pre_logits == (cfg["representation_size"] is not None)
    assert arch.patch_size == cfg["patches"]["size"][0]
    assert arch.resnet_units == (tuple(cfg["resnet"]["num_layers"]) if "resnet" in cfg else None)


def test_reference_imports_no_converter_mapping_code():
    code = ("import sys, vitconv.verification.references.google_numpy; "
            "print(sorted(m for m in sys.modules if m.startswith('vitconv.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for banned in ("vitconv.layouts", "vitconv.layouts", "vitconv.model", "vitconv.conversion.loading"):
        assert banned not in out, out


def test_prefixed_keys_are_accepted():
    """Checkpoints saved with optimizer state nest the model under ``opt/target/``."""
    case = CASES["tiny_gap_p8_32"]
    params = dict(np.load(golden_path(case["checkpoint"])))
    prefixed = {f"opt/target/{k}": v for k, v in params.items()}
    prefixed["opt/state/step"] = np.zeros(())
    x = np.load(golden_path(case["input"]))
    got = R.GoogleViTReference(prefixed).forward_stages(x)["logits"]
    assert float(np.abs(got - golden_expected(case, "logits")).max()) <= 2e-5


# ---- primitives against independent formulations (TensorFlow's SAME rule, torch ops) ----
@pytest.mark.parametrize("n,k,s,want", [(32, 7, 2, (2, 3)), (16, 3, 2, (0, 1)), (15, 3, 2, (1, 1)),
                                        (8, 1, 2, (0, 0)), (8, 3, 1, (1, 1))])
def test_same_padding_matches_tensorflow_rule(n, k, s, want):
    assert R.same_pads(n, k, s) == want


def test_conv_and_maxpool_match_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 9, 4))
    w = rng.standard_normal((3, 3, 4, 5))
    got = R.conv2d(x, w, 2, "SAME")
    xt = F.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (1, 1, 1, 1))  # n=9,k=3,s=2: (1, 1)
    want = F.conv2d(xt, torch.from_numpy(w).permute(3, 2, 0, 1), stride=2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)
    x8 = rng.standard_normal((1, 8, 8, 2))  # n=8,k=3,s=2: pad (0, 1) with -inf
    xt = F.pad(torch.from_numpy(x8).permute(0, 3, 1, 2), (0, 1, 0, 1), value=float("-inf"))
    want = F.max_pool2d(xt, 3, 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(R.max_pool_same(x8), want)


def test_gelu_is_the_tanh_form_and_group_norm_matches_torch():
    x = np.linspace(-6, 6, 101)
    np.testing.assert_allclose(R.gelu_tanh(x), F.gelu(torch.from_numpy(x), approximate="tanh").numpy(), atol=1e-12)
    assert np.abs(R.gelu_tanh(x) - F.gelu(torch.from_numpy(x)).numpy()).max() > 1e-4
    rng = np.random.default_rng(2)
    h = rng.standard_normal((2, 3, 3, 64))
    scale, bias = rng.standard_normal(64), rng.standard_normal(64)
    want = F.group_norm(torch.from_numpy(h).permute(0, 3, 1, 2), 32, torch.from_numpy(scale),
                        torch.from_numpy(bias), eps=1e-6).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(R.group_norm(h, scale.reshape(1, 1, 1, 64), bias), want, atol=1e-10)
