"""TorchScript, .pt2 and safetensors exports, loaded back in their runtimes, reproduce
Google's golden logits; sharding, metadata, the CLI and the exit-3 path."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import vitconv
from _vitconv_cli.main import main
from conftest import CASES, golden_expected, golden_input, golden_path
from vitconv.errors import VerificationError
from vitconv.runtime.export import ExportPlan, check_plan, run_export
from vitconv.runtime.export.torchscript import export_torchscript

ATOL = 1e-4


def max_err(fn, case, rows=slice(None)) -> float:
    with torch.no_grad():
        got = fn(golden_input(case)[rows])
    return float(np.abs(np.asarray(got) - golden_expected(case, "logits")[rows]).max())


@pytest.mark.parametrize("name", ["tiny_token_p8_32", "tiny_r50_32"])
def test_torchscript_trace_follows_batch_and_resolution(tmp_path, name):
    out = tmp_path / "m.pt"
    run_export(golden_path(CASES[name]["checkpoint"]), ExportPlan(torchscript=out, dynamic_size=True))
    loaded = torch.jit.load(str(out))
    assert max_err(loaded, CASES[name]) <= ATOL
    assert max_err(loaded, CASES[name], slice(0, 1)) <= ATOL
    if name == "tiny_token_p8_32":  # traced at 32 px, run at 48: Google's resize golden case
        assert max_err(loaded, CASES["tiny_token_p8_32_to_48"]) <= ATOL


def test_pt2_exported_program_dynamic(tmp_path):
    out = tmp_path / "m.pt2"
    run_export(golden_path(CASES["tiny_token_p8_32"]["checkpoint"]),
               ExportPlan(pt2=out, dynamic_size=True, aoti=False))
    prog = torch.export.load(str(out)).module()
    assert max_err(prog, CASES["tiny_token_p8_32"]) <= ATOL
    assert max_err(prog, CASES["tiny_token_p8_32"], slice(0, 1)) <= ATOL
    assert max_err(prog, CASES["tiny_token_p8_32_to_48"]) <= ATOL
    assert max_err(prog, CASES["tiny_token_p8_32_to_48"], slice(0, 3)) <= ATOL


@pytest.mark.skipif(not os.environ.get("VITCONV_SLOW_TESTS"),
                    reason="AOTInductor compiles C++ with gcc: 40-90 s for a tiny model on 2 "
                           "cores; set VITCONV_SLOW_TESTS=1 to run")
def test_pt2_aoti_package(tmp_path):
    from torch._inductor import aoti_load_package

    out = tmp_path / "m.pt2"
    run_export(golden_path(CASES["tiny_token_p8_32"]["checkpoint"]), ExportPlan(pt2=out))
    pkg = aoti_load_package(str(out))
    assert max_err(pkg, CASES["tiny_token_p8_32"]) <= ATOL
    assert max_err(pkg, CASES["tiny_token_p8_32"], slice(0, 1)) <= ATOL


def test_safetensors_sharded_index_and_metadata(tmp_path):
    case = CASES["tiny_r50_32"]
    out = tmp_path / "model.safetensors"
    run_export(golden_path(case["checkpoint"]), ExportPlan(safetensors=out, shard_bytes=200_000))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert not out.exists() and not list(tmp_path.glob(".*"))  # no temp files left
    model = vitconv.load(golden_path(case["checkpoint"]))
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    tensors = {}
    for s in shards:
        with safe_open(str(tmp_path / s), framework="pt") as f:
            assert f.metadata()["format"] == "pt"
            assert json.loads(f.metadata()["vitconv_config"])["resnet_layers"] == [1, 1]
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    model.load_state_dict(tensors, strict=True)  # raw StdConv kernels: round-trippable
    assert max_err(model, case) <= 2e-5


def test_safetensors_single_file_fp16(tmp_path):
    case = CASES["tiny_token_p8_32"]
    out = tmp_path / "half.safetensors"
    run_export(golden_path(case["checkpoint"]), ExportPlan(safetensors=out, fp16=True))
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = vitconv.load(out)  # vitconv reads its own export back
    with torch.no_grad():
        got = model(golden_input(case)).numpy()
    ref = golden_expected(case, "logits")
    assert got.argmax(-1).tolist() == case["top1"]
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.min() >= 0.9999


def test_failed_verification_writes_nothing(tmp_path):
    model = vitconv.load(golden_path(CASES["tiny_token_p8_32"]["checkpoint"]))
    out = tmp_path / "bad.pt"
    wrong = lambda batch, size: np.zeros((batch, 10), np.float32)  # noqa: E731
    with pytest.raises(VerificationError) as e:
        export_torchscript(model, out, wrong, check_plan(32, 8, None, False))
    assert e.value.exit_code == 3 and "nothing written" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_check_plan_uses_unseen_batches_and_sizes():
    assert [(c.batch, c.size) for c in check_plan(32, 8, None, True)] == [(1, 32), (3, 32), (2, 40), (2, 56)]
    assert [(c.batch, c.size) for c in check_plan(224, 16, 4, False)] == [(4, 224)]


def test_cli_default_output_beside_src_and_figures(tmp_path):
    src = tmp_path / "tiny.npz"
    shutil.copy(golden_path(CASES["tiny_token_p8_32"]["checkpoint"]), src)
    r = CliRunner().invoke(main, ["export", str(src), "--torchscript", "--safetensors", "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "tiny.torchscript.pt").exists() and (tmp_path / "tiny.safetensors").exists()
    assert "max|diff|" in r.output and "b2 32px" in r.output


def test_cli_rejects_fp16_torchscript_and_nothing_to_do(tmp_path):
    src = str(golden_path(CASES["tiny_token_p8_32"]["checkpoint"]))
    r = CliRunner().invoke(main, ["export", src, "--torchscript", str(tmp_path / "x.pt"), "--fp16"])
    assert r.exit_code == 2 and "--fp16" in r.output
    r = CliRunner().invoke(main, ["export", src])
    assert r.exit_code == 2
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["torchscript", "pt2"])
def test_a_handed_over_model_is_freed_before_the_file_is_loaded_back(kind, tmp_path):
    """As for ONNX: given a one-element list, the exporter frees the weights once written
    (parameters emptied in place); given the module, it leaves it alone; same parity."""
    from vitconv.conversion.loading import load
    from vitconv.runtime.export import make_reference
    from vitconv.runtime.export.pt2 import export_pt2

    src = golden_path("jax/tiny_token_p8_32.npz")
    model = load(src)
    checks = check_plan(32, 8, None, False)
    reference = make_reference(src, model, 32, checks)

    def run(m, out):
        if kind == "torchscript":
            return export_torchscript(m, out, reference, checks)
        return export_pt2(m, out, reference, checks, aoti=False)
    kept = run(model, tmp_path / "a")
    assert kept.ok and all(p.numel() for p in model.parameters())
    owned = [model]
    handed = run(owned, tmp_path / "b")
    assert handed.ok and owned == [] and all(p.numel() == 0 for p in model.parameters())
    assert [p.max_abs for p in handed.parity] == [p.max_abs for p in kept.parity]


def test_every_target_in_one_run_with_the_model_handed_to_the_last(tmp_path):
    src = golden_path("jax/tiny_token_p8_32.npz")
    plan = ExportPlan(onnx=tmp_path / "m.onnx", torchscript=tmp_path / "m.ts", pt2=tmp_path / "m.pt2",
                      safetensors=tmp_path / "m.safetensors", aoti=False)
    results = run_export(src, plan)
    assert [r.kind for r in results] == ["torchscript", "pt2", "onnx", "safetensors"]
    assert all(r.ok for r in results) and all((tmp_path / n).is_file() for n in ("m.onnx", "m.ts", "m.pt2",
                                                                                 "m.safetensors"))


def test_an_export_larger_than_memory_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    """Export proves every target against the whole model in memory: a model whose float32
    weights (x the measured peak factor) exceed the machine's memory is refused in one line
    naming the figures and what does work at that size, before a weight is read. (``--onnx``
    alone goes the streamed way: ``tests/test_export_streamed.py``.)"""
    from vitconv.runtime.export import run as export_run

    monkeypatch.setattr(export_run, "physical_memory", lambda: 100_000)
    r = CliRunner().invoke(main, ["export", str(golden_path("jax/tiny_token_p8_32.npz")),
                                  "--torchscript", str(tmp_path / "m.pt")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "export holds the whole model in memory" in r.output and "this machine has 0.0 GB" in r.output
    assert "vitconv convert" in r.output and not list(tmp_path.iterdir())


def test_the_memory_bound_is_the_float32_weights_times_the_measured_peak():
    """ViT-B/16 (224 px, 1000 classes) has 86,567,656 parameters (timm's and Google's count):
    346.3 MB in float32, 519.4 MB at the 1.5x peak."""
    from vitconv.runtime.export.run import WHOLE_MODEL_PEAK, refuse_whole_model_beyond_memory
    from vitconv.tools.synthetic import preset

    assert WHOLE_MODEL_PEAK == 1.5
    need = 1.5 * 4 * 86_567_656
    refuse_whole_model_beyond_memory(preset("B/16"), "b16.npz", memory=int(need) + 1)
    with pytest.raises(vitconv.errors.BadInputError, match=r"about 0\.5 GB \(1\.5x its 0\.3 GB"):
        refuse_whole_model_beyond_memory(preset("B/16"), "b16.npz", memory=int(need) - 1)
