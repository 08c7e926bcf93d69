"""``vitconv bench MODEL`` (runtimes) and ``vitconv bench --convert SRC|PRESET ...`` (conversion)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import List

import click

from vitconv.tools.bench import RUNTIMES, bench_batch, bench_convert, bench_memory, bench_runtimes
from vitconv.tools.device_bench import bench_device, format_rows
from vitconv.tools.synthetic import make_synthetic, preset

from .common import image_size_option, json_option, say
from vitconv.lazy import lazy_module

canonical_model = lazy_module("vitconv.model")  # torch, for --device
loading = lazy_module("vitconv.conversion.loading")  # torch, for --device


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--runtime", "runtimes", default="torch,onnxruntime", show_default=True,
              help="Comma-separated: " + ", ".join(RUNTIMES) + ".")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Comma-separated batch sizes.")
@image_size_option("Benchmark at this resolution (position grid resized).")
@click.option("--threads", type=int, help="Threads for every runtime (default: torch's default).")
@click.option("--iters", type=int, default=10, show_default=True, help="Timed iterations per runtime.")
@click.option("--peak-tflops", type=float,
              help="The device's dense peak TFLOP/s for the precision run: adds MFU (model FLOPs from "
                   "the config, e.g. ViT-B/16 @224 = 35.1 GFLOP/image).")
@click.option("--convert", "convert", is_flag=True,
              help="Benchmark conversion instead: MODELS are .npz files or presets (B/16, L/16, H/14 ...) "
                   "generated as synthetic checkpoints; conversion against the read+write I/O floor, timed "
                   "inside the process and as whole commands (vitconv npz2pt against two floor scripts: the copy "
                   "written through the page cache and past it, as vitconv writes).")
@click.option("--to", "output_kind", type=click.Choice(["safetensors", "pt"]), default="safetensors",
              show_default=True, help="With --convert: output format.")
@click.option("--repeats", type=int, default=3, show_default=True, help="With --convert or --zoo: runs of each.")
@click.option("--workdir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="With --convert: where synthetic files and outputs go (default: a temp dir).")
@click.option("--device", help="Benchmark inference on this device instead (cuda, cuda:1, cpu): each "
              "--dtypes and --modes at each --batch, images/s, MFU with --peak-tflops, and the largest "
              "difference from the float32 model on the CPU. MODEL: a file or a preset (B/16, L/16 ...).")
@click.option("--dtypes", default="float16,bfloat16", show_default=True, help="With --device: "
              "comma-separated float32, float16, bfloat16.")
@click.option("--modes", default="eager,compile,cudagraphs", show_default=True,
              help="With --device: comma-separated eager (SDPA), compile (torch.compile), cudagraphs "
                   "(torch.compile reduce-overhead).")
@click.option("--memory", "memory", is_flag=True,
              help="Benchmark memory instead: MODELS are .npz files or presets (B/16 ... g/14, 7B); "
                   "convert, verify, export --onnx and --onnx --fp16, each a whole command: wall and peak "
                   "RSS against the float32 weight bytes.")
@click.option("--zoo", "zoo", type=click.IntRange(min=1), metavar="ROWS",
              help="Benchmark vitconv batch instead: ROWS synthetic copies of the MODEL preset (B/16 ...), "
                   "each converted and verified, with each --workers count and as Ray tasks.")
@click.option("--workers", "workers_list", default="1,2", show_default=True,
              help="With --zoo: comma-separated worker counts.")
@click.option("--no-ray", is_flag=True, help="With --zoo: leave out the Ray-local run.")
@json_option("Print results as JSON.")
@click.pass_context
def bench(ctx: click.Context, models, runtimes: str, batches: str, image_size, threads, iters: int, peak_tflops,
          convert: bool, output_kind: str, repeats: int, workdir, device, dtypes: str, modes: str, memory: bool,
          zoo, workers_list: str, no_ray: bool, as_json: bool) -> None:
    """Measure inference per runtime, or conversion cost (--convert), side by side in one run.

    \b
      vitconv bench golden/jax/tiny_token_p8_32.npz --runtime torch,onnxruntime --batch 1,8
      vitconv bench --convert B/16 L/16 --repeats 3
      vitconv bench --zoo 4 B/16 --workers 1,2
      vitconv bench --memory B/16 H/14
      vitconv bench B/16 --device cuda --batch 256 --peak-tflops 790
    """
    if device:
        _device(ctx, models, device, dtypes, modes, _ints(batches), iters, peak_tflops, image_size, as_json)
        return
    if memory:
        _memory(ctx, models, workdir, as_json)
        return
    if zoo:
        _zoo(ctx, models, zoo, _ints(workers_list), not no_ray, repeats, workdir, as_json)
        return
    if convert:
        _convert(ctx, models, output_kind, repeats, workdir, as_json)
        return
    if len(models) != 1:
        raise click.UsageError("give one MODEL (or --convert for several)")
    res = bench_runtimes(models[0], [r.strip() for r in runtimes.split(",") if r.strip()],
                         _ints(batches), image_size=image_size, threads=threads, iters=iters,
                         peak_tflops=peak_tflops)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    say(ctx, f"{res.model} @{res.image_size}px, {res.threads} thread(s), median of {iters}")
    say(ctx, f"{'runtime':22} {'batch':>5} {'ms/batch':>10} {'p90 ms':>9} {'cpu ms':>9} {'img/s':>9} "
             f"{'GFLOP/s':>9} {'MFU':>6} {'vs torch':>9} {'max|diff|':>10}")
    for r in res.results:
        if r.error:
            say(ctx, f"{r.runtime:22} {r.batch:>5}  unavailable: {r.error}")
            continue
        ratio = f"{r.speedup_vs_torch:.2f}x" if r.speedup_vs_torch else "-"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        say(ctx, f"{r.runtime:22} {r.batch:>5} {r.latency_ms:>10.2f} {r.latency_p90_ms:>9.2f} "
                 f"{r.cpu_ms:>9.2f} {r.images_per_s:>9.1f} {r.gflops_per_s:>9.1f} {mfu:>6} {ratio:>9} "
                 f"{r.max_abs_diff_vs_torch:>10.2e}")


def _device(ctx, models, device: str, dtypes: str, modes: str, batches: List[int], iters: int, peak_tflops,
            image_size, as_json: bool) -> None:
    import torch

    if len(models) != 1:
        raise click.UsageError("give one MODEL with --device")
    m = models[0]
    if Path(m).exists():
        model = loading.load(m, image_size=image_size)
    else:
        try:
            cfg = preset(m)
        except KeyError as e:
            raise click.BadParameter(f"{m}: neither a file nor a preset ({e.args[0]})") from None
        torch.manual_seed(0)
        model = canonical_model.VisionTransformer(cfg.replace(image_size=image_size) if image_size else cfg)  # its own init
    out = []
    for b in batches:
        out += bench_device(model, device, [d.strip() for d in dtypes.split(",") if d.strip()],
                            [x.strip() for x in modes.split(",") if x.strip()], batch=b, iters=iters,
                            peak_tflops=peak_tflops)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in out], indent=2))
        return
    say(ctx, f"{m} @{model.config.image_size}px on {device}, median of {iters}")
    for line in format_rows(out):
        say(ctx, line)


def _memory(ctx, models, workdir, as_json: bool) -> None:
    out = []
    with tempfile.TemporaryDirectory(prefix="vitconv-bench-", dir=workdir) as tmp:
        for m in models:
            path = _source(ctx, m, Path(tmp))
            for r in bench_memory(path, tmp):
                out.append(r | {"model": m})
                if not as_json:
                    said = f"; refused: {r['refused']}" if "refused" in r else ""
                    say(ctx, f"{m:>6} {r['task']:>9}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB = "
                             f"{r['x_weights']:.2f}x the {r['weight_mib']:.0f} MiB of float32 weights; target "
                             f"{r['target_mib']:.0f} MiB: {'met' if r['met'] else 'NOT met'}{said}")
            if path.parent == Path(tmp):
                path.unlink()
    if as_json:
        click.echo(json.dumps(out, indent=2))


def _source(ctx, m: str, tmp: Path) -> Path:
    """A model file, or a preset generated as a synthetic checkpoint in ``tmp``."""
    path = Path(m)
    if path.exists():
        return path
    try:
        preset(m)
    except KeyError as e:
        raise click.BadParameter(f"{m}: neither a file nor a preset ({e.args[0]})") from None
    path = tmp / (m.replace("/", "_").replace("+", "_") + ".npz")
    say(ctx, f"generating synthetic {m} -> {path}", err=True)
    make_synthetic(m, path)
    return path


def _zoo(ctx, models, rows: int, workers: List[int], ray: bool, repeats: int, workdir, as_json: bool) -> None:
    if len(models) != 1:
        raise click.UsageError("give one MODEL preset with --zoo")
    try:
        preset(models[0])
    except KeyError as e:
        raise click.BadParameter(f"{models[0]}: not a preset ({e.args[0]})") from None

    def show(r: dict) -> None:
        if not as_json:
            walls = ", ".join(f"{w:.1f}" for w in r["walls_s"])
            say(ctx, f"{r['mode']:>22}: {r['rows']} rows in {r['wall_s']:.1f} s (median of {walls}) = "
                     f"{r['rows_per_s']:.3f} rows/s; "
                     f"per row {r['row_wall_s']:.1f} s wall, {r['row_cpu_s']:.1f} s CPU; peak RSS per row "
                     f"{r['peak_rss_mib_median']:.0f} MiB (max {r['peak_rss_mib_max']:.0f})")
    with tempfile.TemporaryDirectory(prefix="vitconv-bench-", dir=workdir) as tmp:
        sources = []
        for i in range(rows):
            path = Path(tmp) / f"{models[0].replace('/', '_')}-{i}.npz"
            make_synthetic(models[0], path, seed=i)
            sources.append(path)
        say(ctx, f"{rows} synthetic {models[0]} checkpoints, {sources[0].stat().st_size / 2**20:.0f} MiB each, "
                 f"-> .safetensors, verified; {os.cpu_count()} CPUs", err=as_json)
        out = bench_batch(sources, Path(tmp), workers, ray, repeats=repeats, on_mode=show)
    if as_json:
        click.echo(json.dumps(out, indent=2))


def _convert(ctx, models, output_kind: str, repeats: int, workdir, as_json: bool) -> None:
    out = []
    with tempfile.TemporaryDirectory(prefix="vitconv-bench-", dir=workdir) as tmp:
        for m in models:
            path = _source(ctx, m, Path(tmp))
            res = bench_convert(path, output_kind, repeats=repeats, workdir=tmp)
            if path.parent == Path(tmp):
                path.unlink()
            s = res.summary()
            s["model"] = m
            out.append(res.to_dict() | {"model": m})
            if not as_json:
                pairs = ", ".join(f"{r:.2f}" for r in s["pair_ratios"])
                say(ctx, f"{m}: {s['source_mib']:.0f} MiB -> {output_kind}, median of {repeats}: "
                         f"stream {s['stream_wall_s']:.2f} s vs floor {s['floor_wall_s']:.2f} s "
                         f"({s['wall_ratio']:.2f}x; per pair {pairs}, geometric mean "
                         f"{s['pair_ratio_geomean']:.2f}x); best {s['stream_best_s']:.2f} s vs "
                         f"{s['floor_best_s']:.2f} s ({s['best_ratio']:.2f}x); CPU {s['stream_cpu_s']:.2f} s vs "
                         f"{s['floor_cpu_s']:.2f} s ({s['cpu_ratio']:.2f}x); peak RSS stream "
                         f"{s['stream_peak_rss_mib']:.0f} MiB (after imports {s['stream_base_rss_mib']:.0f}), "
                         f"floor {s['floor_peak_rss_mib']:.0f} MiB")
                pairs = ", ".join(f"{r:.2f}" for r in s["process_pair_ratios"])
                say(ctx, f"{m}: whole process, as the user waits: vitconv npz2pt {s['process_wall_s']:.2f} s vs "
                         f"floor script {s['floor_process_wall_s']:.2f} s ({s['process_wall_ratio']:.2f}x; per "
                         f"pair {pairs}, geometric mean {s['process_pair_ratio_geomean']:.2f}x); best "
                         f"{s['process_best_s']:.2f} s vs {s['floor_process_best_s']:.2f} s "
                         f"({s['process_best_ratio']:.2f}x); CPU {s['process_cpu_s']:.2f} s vs "
                         f"{s['floor_process_cpu_s']:.2f} s; peak RSS {s['process_peak_rss_mib']:.0f} MiB vs "
                         f"{s['floor_process_peak_rss_mib']:.0f} MiB; with --no-source-hash "
                         f"{s['process_unhashed_wall_s']:.2f} s ({s['process_unhashed_wall_ratio']:.2f}x, geometric "
                         f"mean {s['process_unhashed_pair_ratio_geomean']:.2f}x; best "
                         f"{s['process_unhashed_best_ratio']:.2f}x), CPU {s['process_unhashed_cpu_s']:.2f} s; " + (
                             "vitconv's bytecode cached, as an installed vitconv's is" if s["bytecode_cached"] else
                             "vitconv's bytecode NOT cached: each run compiled its modules, which an installed "
                             "vitconv does not (python -m compileall vitconv cli)"))
                faster = "direct" if s["floor_direct_wall_s"] < s["floor_process_wall_s"] else "buffered"
                say(ctx, f"{m}: against the floor written as vitconv writes (O_DIRECT): floor "
                         f"{s['floor_direct_wall_s']:.2f} s (best {s['floor_direct_best_s']:.2f} s); npz2pt "
                         f"{s['process_direct_wall_ratio']:.2f}x (geometric mean "
                         f"{s['process_direct_pair_ratio_geomean']:.2f}x), --no-source-hash "
                         f"{s['process_unhashed_direct_wall_ratio']:.2f}x (geometric mean "
                         f"{s['process_unhashed_direct_pair_ratio_geomean']:.2f}x); the faster floor this run: {faster}")
    if as_json:
        click.echo(json.dumps(out, indent=2))
