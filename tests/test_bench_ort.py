"""The onnxruntime variants ``vitconv bench`` times compute Google's logits.

The reference is the golden case's logits from Google's Flax code, not torch: a variant
that rewrites the graph (onnxruntime's transformer optimizer, onnxscript's ORT fusions)
must land as close to them as the canonical model does. The unfixed transformer
optimizer is the negative control: its BiasGelu fusion swaps tanh GELU for erf GELU and
misses these logits by 1.2e-3.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import onnx
import pytest

from conftest import CASES, golden_expected, golden_input, golden_path
from vitconv.tools.bench import _export_onnx, _ort_session, _vit_fusion_options, bench_runtimes
from vitconv.conversion.loading import load

CASE = CASES["tiny_token_p8_32"]  # tanh GELU, class token: Google's ImageNet form


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = load(golden_path(CASE["checkpoint"]))
    work = tmp_path_factory.mktemp("ort")
    _export_onnx(model, work / "model.onnx")
    return model.config, work


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("variant", ["onnxruntime", "onnxruntime-vit", "onnxruntime-fused"])
def test_ort_variant_matches_google_logits(exported, variant):
    cfg, work = exported
    run = _ort_session(work / "model.onnx", variant, 1, work, cfg)
    got = run(golden_input(CASE).numpy())
    diff = float(np.abs(got - golden_expected(CASE, "logits")).max())
    assert diff <= CASE["tolerance"]["max_abs"], f"{variant}: {diff:.2e} from Google's logits"


def test_vit_optimizer_keeps_tanh_gelu_but_still_fuses(exported):
    """The exact setting still rewrites the graph (so it measures something): every residual
    add + LayerNorm becomes SkipLayerNormalization, no GELU becomes the erf BiasGelu."""
    cfg, work = exported
    _ort_session(work / "model.onnx", "onnxruntime-vit", 1, work, cfg)
    ops = _ops(work / "model.vit-opt.onnx")
    assert ops["BiasGelu"] == 0 and ops["Gelu"] == cfg.depth
    assert ops["SkipLayerNormalization"] == 2 * cfg.depth
    assert _vit_fusion_options(cfg.replace(act="gelu")).enable_bias_gelu  # erf models keep it


def test_default_vit_optimizer_is_the_culprit(exported):
    """Negative control: onnxruntime's defaults on the same graph miss Google's logits by
    far more than the tolerance, and the only GELU change is Gelu(tanh) -> BiasGelu (erf)."""
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    cfg, work = exported
    bad = optimize_model(str(work / "model.onnx"), model_type="vit", opt_level=0,
                         num_heads=cfg.num_heads, hidden_size=cfg.width)
    bad.save_model_to_file(str(work / "bad.onnx"))
    assert _ops(work / "bad.onnx")["BiasGelu"] == cfg.depth
    sess = ort.InferenceSession(str(work / "bad.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: golden_input(CASE).numpy()})[0]
    assert float(np.abs(got - golden_expected(CASE, "logits")).max()) > 5e-4


def test_fused_variant_uses_multihead_attention(exported):
    cfg, work = exported
    _ort_session(work / "model.onnx", "onnxruntime-fused", 1, work, cfg)
    ops = _ops(work / "model.ort-fused.onnx")
    assert ops["MultiHeadAttention"] == cfg.depth and ops["Softmax"] == 0
    assert ops["SkipLayerNormalization"] == 2 * cfg.depth


def test_bench_reports_cpu_time_for_every_runtime():
    res = bench_runtimes(golden_path("jax/tiny_gap_p8_32.npz"), ["torch", "onnxruntime-fused"],
                         batches=[2], threads=1, iters=2, warmup=1)
    assert [r.runtime for r in res.results] == ["torch", "onnxruntime-fused"]
    for r in res.results:
        assert r.error is None and math.isfinite(r.cpu_ms) and r.cpu_ms > 0
        assert r.max_abs_diff_vs_torch < 2e-5
