"""``vitconv bench MODEL --device cuda``: inference throughput of the canonical model on an
accelerator, in reduced precision, by execution mode, beside its exactness.

For each dtype (float16, bfloat16) and mode (``eager``: PyTorch with SDPA attention;
``compile``: ``torch.compile``; ``cudagraphs``: ``torch.compile(mode="reduce-overhead")``,
which replays CUDA graphs), the same seeded batch runs ``iters`` times after ``warmup``
untimed runs; the figures are images/s from the median run, model GFLOP/s and MFU against
``peak_tflops`` (the device's dense peak for that precision; ViT-B/16 at 224 px is 35.1
GFLOP per image, :mod:`vitconv.tools.flops`), and the largest difference of its output from the
float32 model on the CPU on the first images of the batch: the price of the precision and
the mode, in numbers. Modes and dtypes run one after another in one process; a mode that
fails (no compiler, no CUDA) is reported with its reason, not raised.

On a CPU the same code runs (``--device cpu``: eager and compile; CUDA graphs need CUDA),
which is how the tests hold it to account on machines without an accelerator.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

from vitconv.errors import BadInputError, first_line
from vitconv.lazy import lazy_module

flops_counter = lazy_module("vitconv.tools.flops")  # torch

MODES = ("eager", "compile", "cudagraphs")
DTYPES = ("float32", "float16", "bfloat16")
#: Images compared against the float32 CPU model (the whole batch would cost minutes on a CPU).
COMPARED = 8


@dataclass
class DeviceResult:
    dtype: str
    mode: str
    batch: int
    images_per_s: float = float("nan")
    ms_per_batch: float = float("nan")
    gflops_per_s: float = float("nan")
    mfu: Optional[float] = None
    max_abs_diff_vs_fp32_cpu: float = float("nan")
    cosine_vs_fp32_cpu: float = float("nan")
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device(model, device: str = "cuda", dtypes: Sequence[str] = ("float16", "bfloat16"),
                 modes: Sequence[str] = MODES, batch: int = 256, iters: int = 20, warmup: int = 5,
                 peak_tflops: Optional[float] = None, seed: int = 0) -> List[DeviceResult]:
    """Time the canonical ``model`` (float32, on the CPU) on ``device`` in each dtype and mode;
    see the module docstring."""
    import copy

    import torch

    bad = [d for d in dtypes if d not in DTYPES] + [m for m in modes if m not in MODES]
    if bad:
        raise BadInputError(f"unknown dtype or mode {', '.join(bad)} (dtypes: {', '.join(DTYPES)}; "
                            f"modes: {', '.join(MODES)})")
    if batch < 1 or iters < 1 or warmup < 0:
        raise BadInputError("--batch and --iters must be at least 1")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is visible to torch here")
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x_cpu = torch.rand(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    with torch.no_grad():
        want = model.eval()(x_cpu[:COMPARED]).double()
    flops = flops_counter.flops_per_image(cfg)
    out: List[DeviceResult] = []
    for dtype in dtypes:
        m = copy.deepcopy(model).to(dev, getattr(torch, dtype)).eval()
        x = x_cpu.to(dev, getattr(torch, dtype))
        for mode in modes:
            res = DeviceResult(dtype, mode, batch)
            try:
                if mode == "cudagraphs" and dev.type != "cuda":
                    raise RuntimeError("CUDA graphs need a CUDA device")
                run = m if mode == "eager" else torch.compile(
                    m, mode="reduce-overhead" if mode == "cudagraphs" else None, dynamic=False)
                times = []
                with torch.inference_mode():
                    for i in range(warmup + iters):
                        _sync(dev)
                        t0 = time.perf_counter()
                        y = run(x)
                        _sync(dev)
                        if i >= warmup:
                            times.append(time.perf_counter() - t0)
                    got = y[:COMPARED].double().cpu()
                t = statistics.median(times)
                res.ms_per_batch, res.images_per_s = 1000 * t, batch / t
                res.gflops_per_s = flops * batch / t / 1e9
                if peak_tflops:
                    res.mfu = res.gflops_per_s / (peak_tflops * 1e3)
                res.max_abs_diff_vs_fp32_cpu = float((got - want).abs().max())
                res.cosine_vs_fp32_cpu = float(torch.nn.functional.cosine_similarity(got, want, dim=-1).min())
            except Exception as e:  # a mode the machine cannot run: said, and the others go on
                res.error = f"{type(e).__name__}: {first_line(e)}"
            out.append(res)
            if mode != "eager":
                torch._dynamo.reset()  # each compiled mode starts from the same state
        del m, x
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def format_rows(results: Sequence[DeviceResult]) -> List[str]:
    lines = [f"{'dtype':9} {'mode':10} {'batch':>5} {'ms/batch':>9} {'img/s':>9} {'GFLOP/s':>9} {'MFU':>6} "
             f"{'max|diff| vs fp32 CPU':>22} {'cosine':>10}"]
    for r in results:
        if r.error:
            lines.append(f"{r.dtype:9} {r.mode:10} {r.batch:>5}  unavailable: {r.error}")
            continue
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        lines.append(f"{r.dtype:9} {r.mode:10} {r.batch:>5} {r.ms_per_batch:>9.2f} {r.images_per_s:>9.1f} "
                     f"{r.gflops_per_s:>9.1f} {mfu:>6} {r.max_abs_diff_vs_fp32_cpu:>22.3e} "
                     f"{r.cosine_vs_fp32_cpu:>10.6f}")
    return lines


__all__ = ["bench_device", "DeviceResult", "format_rows", "MODES", "DTYPES"]
