"""The one verification core (:mod:`vitconv.verification.compare`, issue 28): hand-computed
cases of the comparison rule, the seeded inputs and the rounded-weights rule, and the commands
that judge with it agreeing on the same figures (verify's stages, export's parity, golden's
absolute bounds, a float16 file written by ``convert`` and by ``export``)."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from safetensors.numpy import load_file

from conftest import golden_path
from vitconv.conversion.api import convert  # the keyword form (vitconv.convert)
from vitconv.errors import VerificationError
from vitconv.runtime.export import ExportPlan, run_export
from vitconv.runtime.export.common import compare_output
from vitconv.verification.compare import (FP16_MIN_COSINE, check_rounded, compare, cosine, held_exactly,
                                          judge_rounded_output, nchw, seeded_images, seeded_nchw)
from vitconv.verification.golden import _figure
from vitconv.verification.verify import compare_stage, verify


def _rms10(error: float):
    """A stage whose reference has RMS exactly 10 (every element 10) and one element off by
    ``error``."""
    ref = np.full((2, 5, 8), 10.0)
    got = ref.copy()
    got[1, 3, 4] += error
    return got, ref


# --------------------------------------------------------------------------- the comparison
def test_the_bound_scales_with_the_stage_rms():
    """rms 10, error 5e-4: bound 1e-4 x 10 = 1e-3 passes; 1e-5 x 10 = 1e-4 fails."""
    got, ref = _rms10(5e-4)
    passed = compare(got, ref, 1e-4)
    assert passed.ok and passed.rms == pytest.approx(10.0)
    assert passed.bound == pytest.approx(1e-3) and passed.max_abs == pytest.approx(5e-4, rel=1e-9)
    assert passed.max_rel == pytest.approx(5e-5, rel=1e-9)
    failed = compare(got, ref, 1e-5)
    assert not failed.ok and failed.bound == pytest.approx(1e-4) and failed.note == ""


def test_below_rms_one_the_bound_is_absolute():
    """rms 0.5: the bound is the tolerance itself (max(1, 0.5) = 1), not half of it."""
    ref = np.full((4, 4), 0.5)
    got = ref + np.where(np.eye(4) > 0, 9e-5, 0.0)
    c = compare(got, ref, 1e-4)
    assert c.ok and c.bound == pytest.approx(1e-4) and c.max_rel == pytest.approx(1.8e-4, rel=1e-6)
    assert not compare(got, ref, 8e-5).ok


def test_an_absolute_bound_is_the_rule_with_the_scale_one():
    """A golden case's ``max_abs``: rms 10 does not widen it."""
    got, ref = _rms10(5e-4)
    c = compare(got, ref, 1e-4, scale=1.0)
    assert not c.ok and c.bound == pytest.approx(1e-4)
    assert compare(got, ref, 6e-4, scale=1.0).ok


def test_nan_or_infinity_in_the_converted_output_fails():
    got, ref = _rms10(0.0)
    for bad in (math.nan, math.inf, -math.inf):
        got[0, 0, 0] = bad
        c = compare(got, ref, 1e10)
        assert not c.ok and c.max_abs == math.inf


def test_shapes_that_differ_fail_saying_both():
    c = compare(np.zeros((2, 10)), np.zeros((2, 12)), 1.0)
    assert not c.ok and c.note == "shape (2, 10) != reference (2, 12)" and c.max_abs == math.inf
    assert compare(None, np.zeros(3), 1.0).note == "stage missing from the converted model"
    assert compare(np.zeros(3), None, 1.0).note == "stage missing from the reference"


def test_every_command_judges_the_same_figures_alike():
    """verify's stage, export's float32 parity and golden's figure on one pair: verify and
    export share the RMS-relative rule (export's used to be absolute); golden keeps its
    absolute bound."""
    got, ref = _rms10(5e-4)
    stage = compare_stage("logits", got, ref, 1e-4)
    parity = compare_output(ref, got, 2, 32, fp16=False, atol=1e-4)
    figure = _figure("converted", "logits", got, ref, 1e-4)
    assert stage.ok and parity.ok and stage.max_abs == parity.max_abs == figure.max_abs
    assert not figure.ok and figure.tolerance == 1e-4
    stage = compare_stage("logits", got, ref, 1e-5)
    parity = compare_output(ref, got, 2, 32, fp16=False, atol=1e-5)
    assert not stage.ok and not parity.ok
    assert _figure("converted", "logits", np.zeros((1, 3)), np.zeros((1, 4)), 1.0).note == \
        "logits shape (1, 3) != reference (1, 4)"


# --------------------------------------------------------------------------- inputs
def test_seeded_images_are_numpys_uniform_draws_and_the_nchw_view_the_same_pixels():
    x = seeded_images(2, 8, 3, seed=5)
    want = np.random.default_rng(5).uniform(-1.0, 1.0, size=2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    assert x.dtype == np.float32 and x.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(x, want.astype(np.float32))
    assert x.min() >= -1.0 and x.max() <= 1.0
    t = seeded_nchw(2, 8, 3, seed=5)
    assert t.shape == (2, 3, 8, 8) and t.flags["C_CONTIGUOUS"]
    assert t[1, 2, 3, 4] == x[1, 3, 4, 2] and t[0, 0, 7, 1] == x[0, 7, 1, 0]
    np.testing.assert_array_equal(nchw(x), t)


# --------------------------------------------------------------------------- rounded weights
def test_the_rounding_check_catches_one_flipped_mantissa_bit():
    rng = np.random.default_rng(0)
    exact = {"a": rng.standard_normal((4, 6)).astype(np.float32),
             "b": rng.standard_normal(7).astype(np.float32)}
    written = {k: v.astype(np.float16) for k, v in exact.items()}
    bad, changed, total = check_rounded(exact.items(), written, "float16")
    assert bad is None and (changed, total) == (2, 2)
    flipped = written["b"].copy()
    flipped.view(np.uint16)[3] ^= 1  # the last bit of float16's 10-bit mantissa
    assert abs(float(flipped[3]) - float(written["b"][3])) <= abs(float(written["b"][3])) * 2 ** -10
    bad, _, _ = check_rounded(exact.items(), {**written, "b": flipped}, "float16")
    assert bad == "b: the written tensor is not the float32 weight rounded to float16"
    bad, _, _ = check_rounded(exact.items(), {**written, "c": written["b"]}, "float16")
    assert bad == "c: written, but not a tensor of the source's conversion"


def test_held_exactly_names_the_one_narrower_type():
    rng = np.random.default_rng(1)
    w = rng.standard_normal(64).astype(np.float32)
    assert held_exactly([w]) is None
    assert held_exactly([w.astype(np.float16)]) == "float16"
    assert held_exactly([np.float32([0.5, 1.0, -2.0])]) is None  # both hold these: nothing to say


def test_the_rounded_output_rule_is_top1_and_cosine():
    """Rows [3, 4] vs [4, 3]: cosine 24/25 = 0.96 and top-1 differs: float16 fails both ways;
    bfloat16's figures are reported, not judged; the whole-activation cosine of a block."""
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    got = np.array([[4.0, 3.0], [1.0, 0.0]])
    assert cosine(got, ref) == pytest.approx(0.96)
    c = judge_rounded_output(got, ref)
    assert not c.ok and c.top1 == 0.5 and c.cosine == pytest.approx(0.96) and "top-1 50% equal" in c.note
    assert judge_rounded_output(got, ref, dtype="bfloat16").ok
    near = ref * (1 + 1e-6)
    assert judge_rounded_output(near, ref).ok and judge_rounded_output(near, ref).bound == math.inf
    whole = judge_rounded_output(got, ref, rows=False)  # (12 + 12 + 1) / (sqrt(26) sqrt(26))
    assert whole.cosine == pytest.approx(25 / 26) and not whole.ok and math.isnan(whole.top1)
    assert 25 / 26 < FP16_MIN_COSINE
    nan = got.copy()
    nan[0, 0] = math.nan
    assert not judge_rounded_output(nan, ref, dtype="bfloat16").ok


# --------------------------------------------------------------------------- one file, one rule
def _flip_one_bit(path, name: str) -> None:
    """Flip the lowest bit of the first float16 value of tensor ``name`` in a safetensors file."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[name]["data_offsets"][0]
    assert header[name]["dtype"] == "F16"
    raw[start] ^= 1
    path.write_bytes(bytes(raw))


def test_export_fp16_and_convert_float16_write_bytes_verify_accepts_and_a_flipped_bit_fails(tmp_path):
    """``export --safetensors --fp16`` and ``convert --dtype float16`` write the same tensors;
    ``verify`` proves either by the one rule (each tensor the float32 conversion rounded, bit
    for bit); one flipped mantissa bit in the file fails it, naming the tensor."""
    src = golden_path("jax/tiny_token_p8_32.npz")
    exported, converted = tmp_path / "e.safetensors", tmp_path / "c.safetensors"
    [result] = run_export(src, ExportPlan(safetensors=exported, fp16=True))
    assert result.ok and all(p.top1_agree == 1.0 and p.min_cosine >= FP16_MIN_COSINE for p in result.parity)
    convert(src, converted, to="canonical", dtype="float16", verify=True)
    a, b = load_file(str(exported)), load_file(str(converted))  # the metadata differs (vitconv_verified)
    assert sorted(a) == sorted(b) and all(a[k].dtype == np.float16 and a[k].tobytes() == b[k].tobytes() for k in a)
    report = verify(src, exported)
    assert report.ok and "float16 weights" in report.kind and "bit for bit" in report.note, report.lines()
    _flip_one_bit(exported, "blocks.0.attn.qkv.weight")
    report = verify(src, exported)
    assert not report.ok and [s.name for s in report.stages] == ["weights"], report.lines()
    assert "blocks.0.attn.qkv.weight: the written tensor is not the float32 weight rounded to float16" \
        in report.verdict()


def _near_tie(tmp_path):
    """The golden tiny model with classes 0 and 1 made a near tie far above the rest: equal
    kernels, biases 100 and 100 + 1e-4. float32 keeps the 1e-4 (its step at 100 is 7.6e-6), so
    class 1 wins every row; float16 rounds both biases to 100 (its step there is 0.0625), so the
    two tie and argmax picks class 0: the rounding flips every top-1."""
    weights = dict(np.load(golden_path("jax/tiny_token_p8_32.npz")))
    kernel, bias = weights["head/kernel"].copy(), weights["head/bias"].copy()
    kernel[:, 1] = kernel[:, 0]
    bias[0], bias[1] = 100.0, 100.0 + 1e-4
    assert np.float16(bias[0]) == np.float16(bias[1]) and np.float32(bias[1]) > np.float32(bias[0])
    weights["head/kernel"], weights["head/bias"] = kernel, bias
    path = tmp_path / "tie.npz"
    np.savez(path, **weights)
    return path


def test_a_float16_rounding_that_flips_top1_fails_convert_and_export_alike(tmp_path):
    """The same bytes, the same verdict: ``convert --dtype float16 --verify`` and ``export
    --safetensors --fp16`` both refuse a file whose rounding flips the top-1 (the float32
    conversion itself verifies); ``bfloat16`` reports the figures and passes."""
    src = _near_tie(tmp_path)
    with pytest.raises(VerificationError, match=r"output of the float16 weights.*top-1 0% equal"):
        convert(src, tmp_path / "c.safetensors", to="canonical", dtype="float16", verify=True)
    with pytest.raises(VerificationError, match=r"top-1 0%"):
        run_export(src, ExportPlan(safetensors=tmp_path / "e.safetensors", fp16=True))
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "e.safetensors").exists()
    convert(src, tmp_path / "u.safetensors", to="canonical", dtype="float16")  # unverified: written
    report = verify(src, tmp_path / "u.safetensors")  # and verify judges it by the same rule
    assert not report.ok and report.first_failure.name == "rounded", report.lines()
    assert all(s.ok for s in report.stages[:-1]) and "top-1 0% equal" in report.verdict()
    report = convert(src, tmp_path / "b.safetensors", to="canonical", dtype="bfloat16", verify=True).checked
    assert report.ok and "written as bfloat16" in report.note
    assert [s.name for s in report.stages][-1] == "logits"  # no "rounded" stage: bfloat16 is reported
