"""The benchmark harness returns well-formed results. No timing is asserted: timings on
a shared machine are noise; the numbers that can be checked are checked (outputs)."""

from __future__ import annotations

import filecmp
import json
import math
import os
import py_compile
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import golden_path
from vitconv.tools.bench import FLOOR_DIRECT_SCRIPT, FLOOR_SCRIPT, bench_convert, bench_runtimes, bytecode_cached


def test_bench_runtimes_torch_and_ort():
    res = bench_runtimes(golden_path("jax/tiny_token_p8_32.npz"), ["torch", "onnxruntime"],
                         batches=[1, 2], threads=1, iters=1, warmup=1)
    assert [(r.runtime, r.batch) for r in res.results] == [
        ("torch", 1), ("onnxruntime", 1), ("torch", 2), ("onnxruntime", 2)]
    for r in res.results:
        assert r.error is None and r.iters == 1 and r.threads == 1
        assert r.latency_ms > 0 and math.isclose(r.images_per_s, r.batch / (r.latency_ms / 1e3))
        # the exported graph computes the same logits (golden tolerance)
        assert r.max_abs_diff_vs_torch < 2e-5
    assert all(r.speedup_vs_torch == 1.0 for r in res.results if r.runtime == "torch")
    assert json.loads(json.dumps(res.to_dict()))["image_size"] == 32


def test_bench_convert_measures_both(tmp_path):
    src = golden_path("jax/tiny_gap_p8_32.npz")
    res = bench_convert(src, "safetensors", repeats=1, workdir=tmp_path, warmup=False)
    modes = sorted(m.mode for m in res.measurements)
    assert modes == ["floor", "floor-direct", "floor-process", "process", "process-unhashed", "stream"]
    data_bytes = sum(np.load(src)[k].nbytes for k in np.load(src).files)
    floor = next(m for m in res.measurements if m.mode == "floor")
    assert floor.bytes == data_bytes  # the floor wrote every member's bytes once
    for mode in ("floor-process", "floor-direct"):
        copy = next(m for m in res.measurements if m.mode == mode)
        assert copy.bytes == src.stat().st_size, mode  # the whole file, copied once
    s = res.summary()
    assert s["stream_peak_rss_mib"] >= s["stream_base_rss_mib"] > 0
    # CPU time of the work only (imports excluded): positive, and no more than wall time
    # on every thread of this machine
    for m in res.measurements:
        assert 0 < m.cpu_s <= m.wall_s * (os.cpu_count() or 1) + 0.05, m
    assert math.isclose(s["cpu_ratio"], s["stream_cpu_s"] / s["floor_cpu_s"])
    walls = {m.mode: m.wall_s for m in res.measurements}
    assert math.isclose(s["best_ratio"], walls["stream"] / walls["floor"])
    assert math.isclose(s["process_best_ratio"], walls["process"] / walls["floor-process"])
    assert math.isclose(s["process_unhashed_best_ratio"], walls["process-unhashed"] / walls["floor-process"])
    assert math.isclose(s["process_direct_best_ratio"], walls["process"] / walls["floor-direct"])
    assert math.isclose(s["process_unhashed_direct_best_ratio"], walls["process-unhashed"] / walls["floor-direct"])
    assert s["process_peak_rss_mib"] > 0 and s["floor_process_peak_rss_mib"] > 0
    assert list(tmp_path.iterdir()) == []  # outputs cleaned up


@pytest.mark.parametrize("size", [0, 1, 4095, 4097, (8 << 20) * 2 + 12345])
def test_floor_scripts_copy_the_file_exactly(tmp_path, size):
    # Both floors must write what they read, byte for byte, whatever the size's alignment: the
    # direct one pads its last block and cuts the file back.
    src = tmp_path / "src.bin"
    src.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    for name, script in (("buffered", FLOOR_SCRIPT), ("direct", FLOOR_DIRECT_SCRIPT)):
        dst = tmp_path / f"{name}.bin"
        subprocess.run([sys.executable, "-c", script, str(src), str(dst)], check=True)
        assert filecmp.cmp(src, dst, shallow=False), name


def test_floor_scripts_fail_rather_than_hang_on_a_missing_source(tmp_path):
    for script in (FLOOR_SCRIPT, FLOOR_DIRECT_SCRIPT):
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "absent.npz"), str(tmp_path / "out")],
                              capture_output=True, timeout=60)
        assert proc.returncode != 0


def test_bytecode_cached_sees_missing_and_stale_bytecode(tmp_path):
    (tmp_path / "pkg").mkdir()
    mod = tmp_path / "pkg" / "mod.py"
    mod.write_text("X = 1\n")
    assert not bytecode_cached([tmp_path])  # never compiled
    py_compile.compile(str(mod), doraise=True)
    assert bytecode_cached([tmp_path])
    later = mod.stat().st_mtime + 10
    os.utime(mod, (later, later))  # the source edited after it was compiled
    assert not bytecode_cached([tmp_path])


def test_cli_bench_json():
    from _vitconv_cli.main import main

    r = CliRunner().invoke(main, ["bench", str(golden_path("jax/tiny_gap_p8_32.npz")), "--runtime",
                                  "torch", "--batch", "2", "--iters", "1", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [(x["runtime"], x["batch"]) for x in out["results"]] == [("torch", 2)]


def test_runtime_rows_report_model_flops_and_mfu():
    from vitconv.tools.bench import bench_runtimes
    from vitconv.errors import BadInputError

    path = golden_path("jax/tiny_token_p8_32.npz")
    res = bench_runtimes(path, ["torch"], [2], threads=1, iters=1, warmup=0, peak_tflops=0.5)
    row = res.results[0]
    # tiny_token_p8_32: 16 patches + class token, width 48, mlp 96, depth 2, 10 classes;
    # MACs written out by hand: patch 16*48*192, per block qkv 3*17*48*48, q@k^T and attn@v
    # 2*17*17*48, out 17*48*48, mlp 2*17*48*96; head 48*10
    macs = 16 * 48 * 192 + 2 * (3 * 17 * 48 * 48 + 2 * 17 * 17 * 48 + 17 * 48 * 48 + 2 * 17 * 48 * 96) + 480
    assert row.gflops_per_s == pytest.approx(2 * macs * row.images_per_s / 1e9)
    assert row.mfu == pytest.approx(row.gflops_per_s / 500)
    with pytest.raises(BadInputError, match="peak-tflops"):
        bench_runtimes(path, ["torch"], [1], iters=1, peak_tflops=0)


def test_bench_memory_measures_each_whole_command(tmp_path):
    from vitconv.tools.bench import bench_memory

    rows = bench_memory(golden_path("jax/tiny_token_p8_32.npz"), tmp_path)
    assert [r["task"] for r in rows] == ["convert", "verify", "convert-hf", "verify-hf", "onnx", "onnx-fp16"]
    for r in rows:
        # a whole vitconv process, its imports included: tens of MiB at least
        assert r["peak_rss_mib"] > 30 and r["wall_s"] > 0 and "refused" not in r and r["met"]
        assert r["x_weights"] == pytest.approx(r["peak_rss_mib"] / r["weight_mib"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # its files removed


def test_device_bench_runs_its_code_path_on_the_cpu():
    """No accelerator is lent to the test machines: the --device path runs on the CPU, eager.
    float32 on the CPU is the reference itself (difference 0); bfloat16's rounding shows."""
    import torch

    from vitconv.conversion.loading import load
    from vitconv.tools.device_bench import bench_device

    model = load(golden_path("jax/tiny_token_p8_32.npz"))
    rows = bench_device(model, "cpu", ["float32", "bfloat16"], ["eager", "cudagraphs"], batch=4, iters=2,
                        warmup=1, peak_tflops=1.0)
    got = {(r.dtype, r.mode): r for r in rows}
    f32, bf16 = got["float32", "eager"], got["bfloat16", "eager"]
    assert f32.max_abs_diff_vs_fp32_cpu == 0.0 and f32.images_per_s > 0 and f32.mfu > 0
    assert 1e-3 < bf16.max_abs_diff_vs_fp32_cpu < 1.0 and 0.99 < bf16.cosine_vs_fp32_cpu < 1.0
    assert got["float32", "cudagraphs"].error == "RuntimeError: CUDA graphs need a CUDA device"
    if not torch.cuda.is_available():
        from _vitconv_cli.main import main

        r = CliRunner().invoke(main, ["bench", "Ti/16", "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA device is visible" in r.stderr
