"""Every golden case converted from Google's .npz reproduces Google's own Flax outputs; every
case of the modern families (``golden/families``) reproduces its own library's output."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import vitconv
from conftest import CASES, FAMILY_CASES, golden_expected, golden_input, golden_path

# Which model output each golden file holds (see golden/manifest.json "expected_semantics").
OUTPUTS = {"logits": "logits", "pooled": "pooled", "prelogits": "head_input"}


def test_golden_files_match_manifest_sha256():
    for case in CASES.values():
        for rel, digest in case["sha256"].items():
            assert hashlib.sha256(golden_path(rel).read_bytes()).hexdigest() == digest, rel


def run_case(case, **load_kwargs):
    model = vitconv.load(golden_path(case["checkpoint"]), image_size=case["image_size"], **load_kwargs)
    with torch.no_grad():
        return model, model.forward_stages(golden_input(case))


def test_case_reproduces_google_outputs(case):
    model, stages = run_case(case)
    tol = case["tolerance"]["max_abs"]
    for what, stage in OUTPUTS.items():
        got, want = stages[stage].numpy(), golden_expected(case, what)
        assert got.shape == want.shape
        err = float(np.abs(got - want).max())
        assert err <= tol, f"{case['name']} {what}: max abs diff {err:.3g} > {tol}"
    assert stages["logits"].argmax(-1).tolist() == case["top1"]


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_family_case_reproduces_its_library(name):
    """timm, OpenAI CLIP and the original DINOv2 computed these (golden/families/make.py); the
    ``_to_48`` cases run at another resolution, where each library resizes its table its own way."""
    case = FAMILY_CASES[name]
    _, stages = run_case(case, **case.get("set", {}))  # what the bare file's keys leave open
    got, want = stages["logits"].numpy(), golden_expected(case, "logits")
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= case["tolerance"]["max_abs"], f"{name}: max abs diff {err:.3g}"
    assert float(np.abs(want).max()) > 0.1  # the outputs are not near zero, so the bound means something


def test_case_parameter_count(case):
    """Google's parameter count (from its manifest); a resized model gains the new grid's rows."""
    model = vitconv.load(golden_path(case["checkpoint"]), image_size=case["image_size"])
    want = case["num_params"]
    if want is None:  # resize case: source count + (37 - 17) position rows of width 48
        want = CASES["tiny_token_p8_32"]["num_params"] + (37 - 17) * 48
    assert sum(p.numel() for p in model.parameters()) == want


def test_resize_reproduces_googles_posemb_table():
    case = CASES["tiny_token_p8_32_to_48"]
    model = vitconv.load(golden_path(case["checkpoint"]), image_size=48)
    want = golden_expected(case, "posemb_resized")
    got = model.pos_embed.detach().numpy()
    assert got.shape == want.shape == (1, 37, 48)
    np.testing.assert_array_equal(got, want)  # scipy's zoom, as Google: bitwise


def test_dynamic_resolution_forward_equals_converted_at_that_size():
    """Running the native-resolution model on 48 px inputs resizes on the fly (torch twin of
    Google's zoom) and must agree with the model converted at 48 px."""
    case = CASES["tiny_token_p8_32_to_48"]
    native = vitconv.load(golden_path(case["checkpoint"]))
    x = golden_input(case)
    with torch.no_grad():
        on_the_fly = native(x).numpy()
    err = float(np.abs(on_the_fly - golden_expected(case, "logits")).max())
    assert err <= 2e-5, err


def test_a_reference_that_fails_fails_the_case(monkeypatch):
    """The NumPy reference is half of what `golden check` holds: if it cannot run on a Google
    case, the case fails with the reason, rather than passing on the converter's figures alone."""
    from vitconv.verification import golden

    def broken(*args, **kwargs):
        raise KeyError("Transformer/encoder_norm/scale")

    monkeypatch.setattr(golden, "reference_for", broken)
    report = golden.check(golden_path(""), ["tiny_token_p8_32"])
    assert not report.ok
    (case,) = report.cases
    assert case.problems == ["the reference failed (KeyError: 'Transformer/encoder_norm/scale')"]
    assert any("FAIL the reference failed" in line for line in report.lines())
