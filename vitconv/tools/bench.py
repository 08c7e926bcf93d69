"""Benchmarks: inference throughput per runtime, and conversion cost against the I/O floor.

Two questions, each answered by comparison inside one run, never against numbers taken
on another day or machine:

* **Runtimes** (:func:`bench_runtimes`): images/s and latency of the canonical model in
  torch eager and in onnxruntime (several graph-optimisation settings), same input, same
  thread count. Iterations are interleaved round-robin across runtimes so that load from
  other processes on a shared machine hits every runtime alike; ratios are against torch
  eager at the same batch size. Each row also reports the median process CPU time per
  batch (on a shared machine wall time includes time spent descheduled; CPU time mostly
  does not) and the max abs difference of its logits from torch's, so a "fast" setting
  that changes the numbers shows it.
* **Conversion** (:func:`bench_convert`): wall time and peak RSS of :func:`vitconv.conversion.pipeline.
  convert` against the I/O floor, reading every source member once and writing
  its bytes once with nothing else, alternated in fresh child processes (peak RSS is the
  child's ``VmHWM``; one process per measurement, so peaks do not carry over). Twice: timed
  inside the child, after its imports ("stream" against "floor"), and as the user waits for
  it, the whole process from its start to its exit (``vitconv -q npz2pt SRC -o DST``, the
  source hashed as the command does by default, and the same with ``--no-source-hash``, against
  :data:`FLOOR_SCRIPT` run the same way: "process" and "process-unhashed" against "floor-process"),
  and against the same copy written as vitconv writes large outputs, past the page cache
  (:data:`FLOOR_DIRECT_SCRIPT`, "floor-direct").
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
import math
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from vitconv.conversion.batch import run_batch
from vitconv.errors import BadInputError, first_line
from vitconv.runtime.export import ExportPlan, run_export
from vitconv.runtime.export.common import export_ready
from vitconv.runtime.export.onnx import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, dynamic_shapes, example_input, quiet_exporter
from vitconv.formats import direct_io
from vitconv.formats.atomic import atomic_output
from vitconv.formats.npz import NpzSource
from vitconv.formats.writeback import Writeback
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions
from vitconv.verification.verify import check
from vitconv.lazy import lazy_module

canonical_model = lazy_module("vitconv.model")  # torch, for inference and memory benchmarks
flops = lazy_module("vitconv.tools.flops")  # torch
loading = lazy_module("vitconv.conversion.loading")  # torch

#: Runtime names ``bench_runtimes`` understands. ``onnxruntime`` is ORT_ENABLE_ALL, its
#: default; ``-basic``/``-disabled`` lower the graph-optimisation level. ``onnxruntime-vit``
#: first runs onnxruntime's transformer optimizer (``model_type='vit'``) with its BiasGelu
#: fusion off for tanh-GELU models (see :func:`_vit_fusion_options`); ``onnxruntime-fused``
#: first runs onnxscript's ``optimize_for_ort`` rewrites, which turn the exporter's SDPA
#: pattern into ``com.microsoft.MultiHeadAttention`` and the residual adds into
#: ``SkipLayerNormalization``. All of them stay within float32 rounding of torch.
RUNTIMES = ("torch", "onnxruntime", "onnxruntime-basic", "onnxruntime-disabled", "onnxruntime-vit",
            "onnxruntime-fused")


@dataclass
class RuntimeResult:
    runtime: str
    batch: int
    threads: int
    iters: int
    latency_ms: float  # median over iterations, one batch
    latency_p90_ms: float
    images_per_s: float
    cpu_ms: float  # median process CPU time per batch (all threads), same iterations
    #: model GFLOP/s achieved (:mod:`vitconv.tools.flops`: analytic count x images/s) and, when the
    #: device's peak is given, MFU = achieved / peak
    gflops_per_s: float = float("nan")
    mfu: Optional[float] = None
    speedup_vs_torch: Optional[float] = None  # images/s ratio, same batch, same run
    max_abs_diff_vs_torch: Optional[float] = None
    error: Optional[str] = None  # set when the runtime could not run this model


@dataclass
class RuntimeBench:
    model: str
    image_size: int
    threads: int
    results: List[RuntimeResult] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "image_size": self.image_size, "threads": self.threads,
                "results": [asdict(r) for r in self.results], "notes": list(self.notes)}


# ----------------------------------------------------------------------------- runtimes
def _export_onnx(model, path: Path) -> None:
    """The graph ``vitconv export --onnx`` writes (its default opset, names and dynamic batch,
    a hybrid stem folded to plain convs), without its parity check: the bench compares
    every runtime's logits with torch itself."""
    import onnx
    import torch

    cfg = model.config
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            export_ready(model), (example_input(cfg, None),), dynamo=True,
            opset_version=DEFAULT_OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes(cfg.total_stride, None, False))
    onnx.save_model(program.model_proto, str(path))


def _vit_fusion_options(cfg):
    """FusionOptions for onnxruntime's transformer optimizer that keep the model's numbers.

    Its BiasGelu fusion (``fusion_biasgelu.py``, onnxruntime 1.31) rewrites ``Add`` + any
    node whose op type is ``Gelu`` into ``com.microsoft.BiasGelu``, which computes the *erf*
    GELU; it never reads the ONNX ``Gelu`` op's ``approximate='tanh'`` attribute (opset 20+).
    On Google's tanh-GELU models that one fusion is what moved ViT-B/16 logits by 1.3e-3;
    with it off (SkipLayerNormalization fusions kept) the graph is within 4e-6 of torch.
    ORT's own level-2 optimizer already turns the same Add + Gelu(tanh) into the correct
    tanh ``FastGelu``, so nothing is lost."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("vit")
    if cfg.act != "gelu":  # BiasGelu is right only for the erf form
        opts.enable_bias_gelu = False
    return opts


def _ort_prepared(onnx_path: Path, variant: str, workdir: Path, cfg) -> Path:
    """The graph a variant runs: the export itself, or a rewritten copy of it."""
    if variant == "onnxruntime-vit":
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(onnx_path), model_type="vit", opt_level=0,
                             num_heads=cfg.num_heads, hidden_size=cfg.width,
                             optimization_options=_vit_fusion_options(cfg))
        path = workdir / "model.vit-opt.onnx"
        opt.save_model_to_file(str(path))
        return path
    if variant == "onnxruntime-fused":
        import onnx_ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model, _counts = optimize_for_ort(onnx_ir.load(str(onnx_path)))
        path = workdir / "model.ort-fused.onnx"
        onnx_ir.save(model, str(path))
        return path
    return onnx_path


def _ort_session(onnx_path: Path, variant: str, threads: int, workdir: Path, cfg):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = {"onnxruntime-basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
             "onnxruntime-disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    opts.graph_optimization_level = level.get(variant, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    path = _ort_prepared(onnx_path, variant, workdir, cfg)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def bench_runtimes(model_path: os.PathLike | str, runtimes: Sequence[str] = ("torch", "onnxruntime"),
                   batches: Sequence[int] = (1, 8), image_size: Optional[int] = None,
                   threads: Optional[int] = None, iters: int = 10, warmup: int = 2,
                   seed: int = 0, peak_tflops: Optional[float] = None) -> RuntimeBench:
    """Time ``model_path`` in each runtime at each batch size; see the module docstring.
    ``peak_tflops`` (the device's dense peak for the precision run) adds MFU to each row."""
    import torch

    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise BadInputError(f"unknown runtime(s) {', '.join(unknown)} (known: {', '.join(RUNTIMES)})")
    if iters < 1 or any(b < 1 for b in batches):
        raise BadInputError("--iters and every --batch must be at least 1")
    if peak_tflops is not None and not peak_tflops > 0:
        raise BadInputError("--peak-tflops must be positive")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model = loading.load(model_path, image_size=image_size)
    cfg = model.config
    size = cfg.image_size
    in_chans = cfg.in_chans
    bench = RuntimeBench(str(model_path), size, threads)

    def torch_fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    fns: Dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    errors: Dict[str, str] = {}
    ort_wanted = [r for r in runtimes if r.startswith("onnxruntime")]
    with tempfile.TemporaryDirectory(prefix="vitconv-bench-") as tmp:
        work = Path(tmp)
        if ort_wanted:
            onnx_path = work / "model.onnx"
            try:
                _export_onnx(model, onnx_path)
            except Exception as e:  # report per runtime rather than abort the torch numbers
                for r in ort_wanted:
                    errors[r] = f"ONNX export failed: {_first_line(e)}"
        for r in runtimes:
            if r == "torch":
                fns[r] = torch_fn
            elif r not in errors:
                try:
                    fns[r] = _ort_session(onnx_path, r, threads, work, cfg)
                except Exception as e:
                    errors[r] = f"{_first_line(e)}"
        rng = np.random.default_rng(seed)
        for b in batches:
            x = rng.standard_normal((b, in_chans, size, size), dtype=np.float32)
            ref = torch_fn(x)
            times: Dict[str, List[float]] = {r: [] for r in fns}
            cpu: Dict[str, List[float]] = {r: [] for r in fns}
            outs: Dict[str, np.ndarray] = {}
            for r, fn in fns.items():
                for _ in range(warmup):
                    outs[r] = fn(x)
            for _ in range(iters):  # round-robin: shared-machine noise hits every runtime alike
                for r, fn in fns.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    outs[r] = fn(x)
                    times[r].append(time.perf_counter() - t0)
                    cpu[r].append(time.process_time() - c0)
            base = b / statistics.median(times["torch"]) if "torch" in times else None
            for r in runtimes:
                if r in errors:
                    bench.results.append(RuntimeResult(r, b, threads, 0, float("nan"), float("nan"),
                                                       float("nan"), float("nan"), error=errors[r]))
                    continue
                med = statistics.median(times[r])
                p90 = float(np.percentile(times[r], 90))
                ips = b / med
                achieved = flops.flops_per_image(cfg) * ips
                bench.results.append(RuntimeResult(
                    r, b, threads, iters, med * 1e3, p90 * 1e3, ips, statistics.median(cpu[r]) * 1e3,
                    gflops_per_s=achieved / 1e9, mfu=achieved / (peak_tflops * 1e12) if peak_tflops else None,
                    speedup_vs_torch=(ips / base) if base else None,
                    max_abs_diff_vs_torch=float(np.abs(outs[r] - ref).max())))
    return bench


def _first_line(e: BaseException) -> str:
    """``Type: first line`` (errors.first_line gives the line, or the type name alone)."""
    msg = first_line(e)
    return msg if msg == type(e).__name__ else f"{type(e).__name__}: {msg}"


# --------------------------------------------------------------------------- conversion
#: Whole commands timed from outside (:func:`measure_process`): the two floor scripts, then
#: ``vitconv npz2pt`` with and without the source's hash. One repeat runs them in this order or
#: the reverse.
PROCESS_MODES = ("floor-process", "floor-direct", "process", "process-unhashed")
#: Every mode of :func:`bench_convert`: the in-process pair (imports excluded), then the whole commands.
CONVERT_MODES = ("floor", "stream") + PROCESS_MODES


@dataclass
class ConvertMeasurement:
    mode: str  # one of CONVERT_MODES; "verify", "onnx" (bench_memory)
    wall_s: float
    peak_rss_mib: float  # VmHWM of the child process
    base_rss_mib: float  # VmRSS after imports, before any work
    bytes: int
    cpu_s: float = float("nan")  # user + system time of the child's threads during the work


@dataclass
class ConvertBench:
    source: str
    source_bytes: int
    output_kind: str
    repeats: int
    measurements: List[ConvertMeasurement] = field(default_factory=list)
    #: whether the whole-process runs found vitconv's modules compiled (:func:`bytecode_cached`)
    bytecode_cached: Optional[bool] = None

    def summary(self) -> dict:
        s = {"source": self.source, "source_mib": self.source_bytes / 2**20, "output": self.output_kind,
             "repeats": self.repeats, "bytecode_cached": self.bytecode_cached}
        walls = {}
        for mode in CONVERT_MODES:
            ms = [m for m in self.measurements if m.mode == mode]
            if not ms:
                continue
            key = mode.replace("-", "_")
            walls[mode] = [m.wall_s for m in ms]
            s[f"{key}_wall_s"] = statistics.median(walls[mode])
            # The fastest run is the one least disturbed by the machine (on a VM, writing
            # into fresh page-cache pages costs 1x to 4x from one run to the next): its
            # ratio is the other estimate worth reading beside the medians'.
            s[f"{key}_best_s"] = min(walls[mode])
            s[f"{key}_peak_rss_mib"] = max(m.peak_rss_mib for m in ms)
            s[f"{key}_base_rss_mib"] = statistics.median(m.base_rss_mib for m in ms)
            s[f"{key}_cpu_s"] = statistics.median(m.cpu_s for m in ms)
        # Each side against its own floor: inside the process (imports excluded) and the whole
        # process as the user waits for it.
        for ratio, (work, floor) in (("", ("stream", "floor")), ("process_", ("process", "floor_process")),
                                     ("process_unhashed_", ("process_unhashed", "floor_process")),
                                     ("process_direct_", ("process", "floor_direct")),
                                     ("process_unhashed_direct_", ("process_unhashed", "floor_direct"))):
            if f"{work}_wall_s" not in s:
                continue
            s[f"{ratio}wall_ratio"] = s[f"{work}_wall_s"] / s[f"{floor}_wall_s"]
            s[f"{ratio}best_ratio"] = s[f"{work}_best_s"] / s[f"{floor}_best_s"]
            # CPU time (all threads) says how much work the stream adds to the floor's, apart
            # from waiting on the disk; wall time also shows how well that work overlaps.
            s[f"{ratio}cpu_ratio"] = s[f"{work}_cpu_s"] / s[f"{floor}_cpu_s"]
            # Floor and work alternate, so each repeat's pair saw the same machine load: the
            # spread of per-pair ratios says how much of the median ratio is noise.
            pairs = [b / a for a, b in zip(walls[floor.replace("_", "-")], walls[work.replace("_", "-")])]
            s[f"{ratio}pair_ratios"] = pairs
            s[f"{ratio}pair_ratio_median"] = statistics.median(pairs)
            # On this VM the second run of a pair is often slower, whichever it is, and which
            # side goes first alternates: the pairs' geometric mean cancels that penalty where
            # a median of an odd count hands it to one side.
            s[f"{ratio}pair_ratio_geomean"] = statistics.geometric_mean(pairs)
        return s

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "measurements": [asdict(m) for m in self.measurements]}


def _rss_mib(field_name: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _floor(src: Path, dst: Path) -> int:
    """Read every member once (the reader conversion uses) and write its bytes once, with
    the same early write-out the converters use (:mod:`vitconv.formats.writeback`), so the
    ratio measures the conversion's work, not a better I/O pattern."""
    total = 0
    with NpzSource(src) as s, atomic_output(dst) as tmp, open(tmp, "wb") as f:
        wb = Writeback(f)
        for k in s.keys():
            a = s.get(k)
            f.write(memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B"))
            wb.advance()
            total += a.nbytes
            del a
    return total


def _child(mode: str, src: str, dst: str, hash_source: bool) -> dict:
    if mode in ("verify", "onnx", "onnx-fp16"):
        # What these commands import (verify and export run the model, in torch and
        # onnxruntime): imported before the clock starts, so the figures are the work's.
        canonical_model.module  # noqa: B018 (the property imports it, here)
        import onnxruntime  # noqa: F401
    base = _rss_mib("VmRSS")
    c0 = time.process_time()  # every thread's user + system time, ns resolution
    t0 = time.perf_counter()
    if mode == "stream":
        convert(src, dst, ConvertOptions(hash_source=hash_source))
        n = os.path.getsize(dst)
    elif mode == "verify":  # dst: the converted file
        check(src, dst)
        n = os.path.getsize(dst)
    elif mode in ("onnx", "onnx-fp16"):
        run_export(src, ExportPlan(onnx=Path(dst), fp16=mode == "onnx-fp16"))
        n = sum(p.stat().st_size for p in Path(dst).parent.glob(Path(dst).name + "*"))
    else:
        n = _floor(Path(src), Path(dst))
    wall = time.perf_counter() - t0
    return {"mode": mode, "wall_s": wall, "peak_rss_mib": _rss_mib("VmHWM"), "base_rss_mib": base,
            "bytes": n, "cpu_s": time.process_time() - c0}


def measure_child(mode: str, src: os.PathLike | str, dst: os.PathLike | str,
                  hash_source: bool = False) -> ConvertMeasurement:
    """Run one measurement in a fresh interpreter and return what it reports."""
    cmd = [sys.executable, "-m", "vitconv.tools.bench", "--child", mode, os.fspath(src), os.fspath(dst),
           "1" if hash_source else "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark child ({mode}) failed: {tail}")
    return ConvertMeasurement(**json.loads(proc.stdout.strip().splitlines()[-1]))


#: The I/O floor as the user would time it, a whole process: read the ``.npz`` once, front to
#: back into one buffer, and write the same bytes once, with vitconv's own write pattern
#: (write-out started every 8 MiB, :mod:`vitconv.formats.writeback`, and an ``fsync`` at the
#: end, because every vitconv output is fsynced before it is renamed into place). Nothing else:
#: no zip parsing, no checksum, nothing imported beyond the standard library. (Two earlier
#: versions were slower, and so flattered vitconv: ``zipfile`` checks each member's CRC-32 with
#: the standard library's zlib, 0.44 s per GB here, and an ``fsync`` at the end alone waits for
#: the whole file to reach the disk then.)
FLOOR_SCRIPT = """
import ctypes, os, sys
try:
    start_writeout = ctypes.CDLL(None).sync_file_range
    start_writeout.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
except AttributeError:
    start_writeout = None
buf = bytearray(1 << 23)
view = memoryview(buf)
with open(sys.argv[1], "rb", buffering=0) as src, open(sys.argv[2], "wb", buffering=0) as out:
    done = 0
    while True:
        n = src.readinto(buf)
        if not n:
            break
        out.write(view[:n])
        if start_writeout is not None:
            start_writeout(out.fileno(), done, n, 2)
        done += n
    os.fsync(out.fileno())
"""


#: The same copy written as vitconv writes its large outputs (:mod:`vitconv.formats.direct_io`):
#: past the page cache (``O_DIRECT``), from page-aligned staging buffers that a thread writes in
#: order while the next ones fill (their size, count and alignment are ``direct_io``'s own), the
#: tail padded to a whole block and the file cut back to its length, then fsynced; where the file
#: system refuses ``O_DIRECT`` (or the system has none), the same writes go through the page cache,
#: as vitconv's then do. Standard library only. Why a second
#: floor: on a VM whose free memory the host takes back (free page reporting, as on the machine
#: BENCHMARKS.md was measured on), a buffered gigabyte written into fresh page cache can spend
#: 5-20 s in the kernel where a direct write does not, and on other days the buffered copy is the
#: faster one. Which floor is lower depends on the machine's state, so a run times both.
FLOOR_DIRECT_SCRIPT = f"""
SIZE, ALIGN, BUFFERS = {direct_io.STAGING_BYTES}, {direct_io.ALIGN}, {direct_io.BUFFERS}
""" + """
import errno, fcntl, mmap, os, queue, sys, threading
free, full = queue.Queue(), queue.Queue()
for _ in range(BUFFERS):
    free.put(mmap.mmap(-1, SIZE))
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
try:
    fd = os.open(sys.argv[2], flags | getattr(os, "O_DIRECT", 0), 0o644)
except OSError:
    fd = os.open(sys.argv[2], flags, 0o644)
def write():
    done = 0
    try:
        while (item := full.get()) is not None:
            buf, n = item
            view = memoryview(buf)[: -(-n // ALIGN) * ALIGN]
            try:
                os.pwrite(fd, view, done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_DIRECT", 0))
                os.pwrite(fd, view, done)
            done += n
            free.put(buf)
        os.ftruncate(fd, done)
        os.fsync(fd)
    except BaseException as e:
        print(e, file=sys.stderr)
        os._exit(1)
writer = threading.Thread(target=write, daemon=True)  # a failed read must not leave it waiting
writer.start()
with open(sys.argv[1], "rb", buffering=0) as src:
    while True:
        buf = free.get()
        n = src.readinto(buf)
        while n and n < SIZE and (more := src.readinto(memoryview(buf)[n:])):
            n += more
        if not n:
            break
        full.put((buf, n))
full.put(None)
writer.join()
os.close(fd)
"""


def bytecode_cached(roots: Optional[Sequence[Path]] = None) -> bool:
    """Whether every module of vitconv and of its command line (or under ``roots``) has cached
    bytecode no older than its source, for this interpreter. Why it is reported beside the whole-process figures:
    where it is missing and cannot be written (``PYTHONDONTWRITEBYTECODE=1``, as on the machine
    these figures were first taken on, with an editable install), every run compiles about 70
    modules, 0.1 s here that an installed vitconv does not spend (pip compiles at install; an
    editable install caches on its first run). ``python -m compileall vitconv cli`` caches it."""
    if roots is None:
        roots = [Path(__file__).resolve().parents[1]]
        spec = importlib.util.find_spec("_vitconv_cli")  # found, not imported: the library needs no click
        if spec is not None and spec.submodule_search_locations:
            roots += [Path(p) for p in spec.submodule_search_locations]
    for root in roots:
        for py in root.rglob("*.py"):
            cached = Path(importlib.util.cache_from_source(str(py)))
            if not cached.is_file() or cached.stat().st_mtime < py.stat().st_mtime:
                return False
    return True


def vitconv_command() -> List[str]:
    """How a user runs vitconv here: the installed script beside this interpreter, else ``-m``
    (full paths: the launcher ``exec``s without a ``PATH`` search)."""
    script = Path(sys.executable).with_name("vitconv")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vitconv"]


#: Runs a command and reports its wall time, peak RSS and CPU time from ``wait4``, as a shell's
#: ``time`` does. Why a launcher: Linux keeps a process's peak RSS across ``fork`` and
#: ``exec``, so a command started straight from the benchmark (tens of MiB) would report at
#: least the benchmark's own peak; started from this small interpreter it reports its own
#: (above the launcher's few MiB).
LAUNCHER_SCRIPT = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall_s": time.perf_counter() - t0, "rc": os.waitstatus_to_exitcode(status),
                  "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def measure_process(mode: str, src: os.PathLike | str, dst: os.PathLike | str) -> ConvertMeasurement:
    """Run the whole command (``process``: ``vitconv -q npz2pt SRC -o DST``; ``process-unhashed``:
    the same with ``--no-source-hash``; ``floor-process``: :data:`FLOOR_SCRIPT`; ``floor-direct``:
    :data:`FLOOR_DIRECT_SCRIPT`) and measure it from the outside (:data:`LAUNCHER_SCRIPT`): wall from
    its start to its exit, its peak RSS and CPU time."""
    src, dst = os.fspath(src), os.fspath(dst)
    floors = {"floor-process": FLOOR_SCRIPT, "floor-direct": FLOOR_DIRECT_SCRIPT}
    argv = ([sys.executable, "-c", floors[mode], src, dst] if mode in floors
            else [*vitconv_command(), "-q", "npz2pt", src, "-o", dst]
            + (["--no-source-hash"] if mode == "process-unhashed" else []))
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER_SCRIPT, *argv], capture_output=True, text=True)
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        got = {"rc": proc.returncode or 1}
    if got["rc"] != 0:
        raise RuntimeError(f"benchmark process ({mode}) failed: "
                           f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return ConvertMeasurement(mode, got["wall_s"], got["peak_rss_mib"], 0.0, os.path.getsize(dst), got["cpu_s"])


def bench_convert(src: os.PathLike | str, output_kind: str = "safetensors", repeats: int = 3,
                  workdir: Optional[os.PathLike | str] = None, hash_source: bool = False,
                  warmup: bool = True, whole_process: bool = True,
                  progress: Optional[Callable[[ConvertMeasurement], None]] = None) -> ConvertBench:
    """Time ``convert`` of ``src`` and the I/O floor, in the process ("stream", "floor") and,
    with ``whole_process``, as whole commands (:data:`PROCESS_MODES`: see
    :func:`measure_process`), alternating (and alternating which goes first), ``repeats``
    times each after one untimed warm-up of each (so all see the source in the page cache).

    Before each run the previous output is deleted and dirty pages are flushed
    (``os.sync``), outside the timing: otherwise a run would pay for dropping the last
    run's gigabyte of page cache when its rename replaces that file, work that belongs
    to neither side."""
    src = Path(src)
    work = Path(workdir) if workdir else src.parent
    outs = {mode: work / f".vitconv-bench-{os.getpid()}-{mode}.{output_kind}" for mode in CONVERT_MODES}
    modes = [("floor", "stream"), PROCESS_MODES][: 2 if whole_process else 1]
    bench = ConvertBench(str(src), src.stat().st_size, output_kind, repeats,
                         bytecode_cached=bytecode_cached() if whole_process else None)
    try:
        first = 0 if warmup else 1
        for i in range(first, repeats + 1):
            # Which side goes first alternates: on this VM the second run of a pair was
            # systematically slower (up to 4x on L/16, whichever side it was), and a fixed
            # order would hand that penalty to one side every time.
            for group in modes:
                for mode in (group if i % 2 else group[::-1]):
                    dst = outs[mode]
                    if dst.exists():
                        dst.unlink()
                    os.sync()
                    m = (measure_process(mode, src, dst) if mode in PROCESS_MODES
                         else measure_child(mode, src, dst, hash_source))
                    if i > 0:
                        bench.measurements.append(m)
                        if progress:
                            progress(m)
    finally:
        for p in outs.values():
            p.unlink(missing_ok=True)
    return bench


# --------------------------------------------------------------------------- batch
def bench_batch(sources: Sequence[Path], workdir: Path, workers: Sequence[int] = (1, 2), ray: bool = True,
                repeats: int = 1, on_mode: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """``vitconv batch`` on ``sources`` (each to ``.safetensors``, verified), once per worker
    count and once as Ray tasks on a local instance with every CPU, the modes taking turns
    ``repeats`` times in this run (so a slow spell of the machine hits each alike): per mode
    the median of rows/s, per-row wall and CPU seconds, and peak RSS per row (VmHWM)."""
    modes = [("local", w) for w in workers] + ([("ray", os.cpu_count() or 1)] if ray else [])
    runs: Dict[tuple, List[dict]] = {m: [] for m in modes}
    for _ in range(repeats):
        for kind, n in modes:
            dst = Path(workdir) / f"out-{kind}-{n}"
            dst.mkdir()
            manifest = Path(workdir) / f"zoo-{kind}-{n}.jsonl"
            manifest.write_text("".join(json.dumps({"src": os.fspath(s), "dst": os.fspath(dst / f"{Path(s).stem}.safetensors")})
                                        + "\n" for s in sources))
            report = run_batch(manifest, workers=n if kind == "local" else None, ray=kind == "ray", ray_num_cpus=n)
            failed = [r.error for r in report.rows if r.status != "ok"]
            if failed:
                raise BadInputError(f"batch benchmark row failed: {failed[0]}")
            runs[(kind, n)].append({"wall_s": report.wall_s, "rows": report.rows})
            for f in dst.iterdir():
                f.unlink()
            dst.rmdir()
    out = []
    for (kind, n), rs in runs.items():
        rows = [r for run in rs for r in run["rows"]]
        peaks = [r.peak_rss_bytes / 2**20 for r in rows if r.peak_rss_bytes]
        wall = statistics.median(run["wall_s"] for run in rs)
        res = {"mode": f"{n} worker(s)" if kind == "local" else f"ray local ({n} CPUs)", "rows": len(sources),
               "repeats": len(rs), "wall_s": wall, "walls_s": [run["wall_s"] for run in rs],
               "rows_per_s": len(sources) / wall,
               "row_wall_s": statistics.median(r.wall_s for r in rows),
               "row_cpu_s": statistics.median(r.cpu_s for r in rows),
               "source_mib": statistics.median(r.source_bytes for r in rows) / 2**20,
               "peak_rss_mib_max": max(peaks) if peaks else None,
               "peak_rss_mib_median": statistics.median(peaks) if peaks else None}
        out.append(res)
        if on_mode is not None:
            on_mode(res)
    return out


# --------------------------------------------------------------------------- export and verify memory
def run_measured(argv: Sequence[str]) -> dict:
    """Run ``argv`` under :data:`LAUNCHER_SCRIPT`: ``{"wall_s", "rc", "peak_rss_mib", "cpu_s",
    "said"}`` (``said``: its last line on stderr), peak RSS as ``/usr/bin/time`` reports it
    (mapped file pages count, as they do for a user watching ``top`` or a container's limit)."""
    proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER_SCRIPT, *argv], capture_output=True, text=True)
    try:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        got = {"rc": proc.returncode or 1, "wall_s": math.nan, "peak_rss_mib": math.nan, "cpu_s": math.nan}
    return got | {"said": (proc.stderr.strip().splitlines() or [""])[-1]}


#: Issue 33's bound on every command's peak RSS for models larger than memory.
MEMORY_TARGET_MIB = 4096


def bench_memory(src: os.PathLike | str, workdir: os.PathLike | str) -> List[dict]:
    """Each whole command a user runs on a model, in order: ``vitconv convert SRC OUT.safetensors
    --dtype float32``, ``vitconv verify SRC OUT.safetensors``, ``vitconv convert SRC HF_DIR --to hf``
    (a Hugging Face directory, sharded above 5 GB, its model card's verification included) and
    ``vitconv verify HF_DIR`` (transformers' model as the reference, run block by block; skipped
    where the conversion is refused: a model no Hugging Face class holds), ``vitconv export SRC --onnx`` and
    ``... --onnx --fp16`` (their verification in onnxruntime included): wall time and peak RSS
    (:func:`run_measured`), also as a multiple of the float32 weight bytes, beside the targets
    (convert and verify: 4 GiB, issue 33; export: 1.5x the weights + 1 GiB, issue 20). A command
    that refuses (export beyond the machine's memory) is reported with what it said."""
    src, work = Path(src), Path(workdir)
    converted = work / (src.stem + ".converted.safetensors")  # sharded above 5 GB: its index then
    index = converted.with_name(converted.name + ".index.json")
    onnx = work / (src.stem + ".onnx")
    hf = work / (src.stem.replace(".", "_") + "_converted_hf")  # a directory: a name without an extension
    vitconv = [*vitconv_command(), "-q"]
    tasks = (("convert", [*vitconv, "convert", str(src), str(converted), "--dtype", "float32"], None),
             ("verify", [*vitconv, "verify", str(src), "{converted}"], None),
             ("convert-hf", [*vitconv, "convert", str(src), str(hf), "--to", "hf"], None),
             ("verify-hf", [*vitconv, "verify", str(hf)], None),
             ("onnx", [*vitconv, "export", str(src), "--onnx", str(onnx)], 1.5),
             ("onnx-fp16", [*vitconv, "export", str(src), "--onnx", str(onnx), "--fp16"], 1.5))
    out, weights = [], 0
    try:
        for task, argv, factor in tasks:
            if task == "verify-hf" and not hf.is_dir():  # no Hugging Face class holds the model
                continue
            got = run_measured([a.format(converted=index if index.exists() else converted) for a in argv])
            if task == "convert":
                if got["rc"] != 0:
                    raise RuntimeError(f"benchmark command ({task}) failed: {got['said']}")
                weights = sum(p.stat().st_size for p in work.glob(src.stem + ".converted*.safetensors"))
            limit = factor * weights + 2**30 if factor else MEMORY_TARGET_MIB * 2**20
            row = {"model": src.stem, "task": task, "weight_mib": weights / 2**20, "wall_s": got["wall_s"],
                   "peak_rss_mib": got["peak_rss_mib"], "x_weights": got["peak_rss_mib"] * 2**20 / weights,
                   "target_mib": limit / 2**20, "met": got["rc"] == 0 and got["peak_rss_mib"] * 2**20 <= limit}
            if got["rc"] != 0:
                row["refused"] = got["said"]
            out.append(row)
            for p in work.glob(src.stem + ".onnx*"):
                p.unlink()
    finally:
        for p in work.glob(src.stem + ".converted*"):
            p.unlink()
        shutil.rmtree(hf, ignore_errors=True)
    return out


if __name__ == "__main__":  # child entry point for measure_child
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1")))
    else:
        sys.exit("usage: python -m vitconv.tools.bench --child {stream,floor,verify,onnx,onnx-fp16} SRC DST HASH")
