"""``vitconv batch MANIFEST [--workers N] [--ray [ADDRESS]] [--force] [--report FILE]``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vitconv.conversion.batch import run_batch
from vitconv.errors import VitconvError

from .common import say


@click.command("batch")
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: the CPU count); "
              "fewer start when the memory available cannot hold them all.")
@click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run the rows as Ray tasks: on a local Ray instance (no value), or a cluster "
                   "(auto, ray://HOST:PORT). Needs the ray extra.")
@click.option("--force", is_flag=True, help="Redo rows whose output already holds a verified conversion "
              "of the same source.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a JSON report: per row status, error, sha256s, verification figures, wall "
                   "time, peak RSS; totals. A previous report there is the record of outputs that "
                   "have no metadata (.npz, foreign .pt).")
@click.pass_context
def batch(ctx: click.Context, manifest: Path, workers: int | None, ray: str | None, force: bool,
          report: Path | None) -> None:
    """Convert and verify every checkpoint a MANIFEST lists, each row exactly as `vitconv
    convert SRC DST --verify` would, in parallel; resumable; a failed row does not stop the rest.
    Exit 0 when every row is ok or skipped.

    \b
    MANIFEST: JSON Lines, one object a line, or CSV with a header (.csv). Columns:
      src, dst (required; local paths, relative to the manifest, or URLs: s3://, gs://, https://)
      to, image_size, patch_size, dtype, num_heads, labels, arch, as for convert; set ("act=gelu
      norm_eps=1e-5": --set's FIELD=VALUE items, space-separated); verify (default true)

    \b
      vitconv batch zoo.jsonl --report report.json
      vitconv batch zoo.jsonl --ray auto
    """
    bar = None
    quiet = (ctx.obj or {}).get("quiet")

    def on_start(rows) -> None:
        nonlocal bar
        if not quiet and sys.stderr.isatty():
            bar = click.progressbar(length=len(rows), label=f"{len(rows)} rows", file=sys.stderr,
                                    show_pos=True)
            bar.__enter__()

    def on_result(res, done: int, total: int) -> None:
        if bar is not None:
            bar.label = f"{done}/{total} rows, {sum_bytes[0] + res.source_bytes:,} bytes read"
            bar.update(1)
        sum_bytes[0] += res.source_bytes
        if res.status == "failed":
            click.secho(f"vitconv: error: {res.error}", fg="red", err=True)
        else:
            say(ctx, res.line_text())

    sum_bytes = [0]
    try:
        out = run_batch(manifest, workers=workers, ray=(True if ray == "local" else ray), force=force,
                        report=report, on_result=on_result, on_start=on_start,
                        command=f"vitconv batch {manifest}")
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    t = out.totals()
    say(ctx, f"{t['ok']} ok, {t['skipped']} skipped, {t['failed']} failed of {t['rows']} rows in "
             f"{t['wall_s']:.1f} s ({out.workers})" + (f"; report: {report}" if report else ""))
    if out.interrupted:
        click.secho("vitconv: interrupted", fg="red", err=True)
        ctx.exit(130)
    if out.failed:
        codes = {r.exit_code for r in out.failed}
        raise _Failed(f"{len(out.failed)} of {t['rows']} rows failed", codes.pop() if len(codes) == 1 else 1)


class _Failed(VitconvError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.exit_code = code

