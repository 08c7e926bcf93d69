"""``vitconv inspect SRC [--json] [--plot-posembed OUT.png]``."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import click

from vitconv.errors import MappingError
from vitconv.formats.atomic import refuse_clobber
from vitconv.tools.inspection import format_text, inspect_path, read_pos_embed, total_bytes
from vitconv.tools.plot import plot_posembed_similarity, posembed_cosine_grid, require_matplotlib
from vitconv.formats.storage import local_input

from .common import arch_option, json_option, say

#: Hashing runs at roughly 0.5-1 GB/s; below this a bar would only flicker.
_BAR_BYTES = 256 << 20


@click.command("inspect")
@click.argument("src")
@json_option("Print the report as one JSON document.")
@click.option("--plot-posembed", type=click.Path(dir_okay=False, path_type=Path),
              metavar="OUT.png", help="Also draw the cosine similarity of every patch's position "
              "embedding with every other (ViT paper, figure 7). Needs matplotlib "
              "(pip install 'vitconv[plot]').")
@arch_option
@click.pass_context
def inspect(ctx: click.Context, src: str, as_json: bool, plot_posembed: Path | None, arch: str | None) -> None:
    """Show what a checkpoint or ONNX file holds, without converting it.

    Layout, architecture (and the tensor each value was read from), parameters, dtypes,
    size, sha256 and the key audit; for .onnx: inputs, outputs, opsets, metadata, ops.
    A bare state dict also lists the named architectures its keys and shapes fit (--arch picks
    one). A checkpoint that would not convert is reported in full, and the exit status is then
    2 (one line on stderr says why), so scripts can test it.

    \b
      vitconv inspect ViT-B_16.npz
      vitconv inspect vit.onnx --json
      vitconv inspect ViT-B_16.npz --plot-posembed posembed.png
    """
    quiet = (ctx.obj or {}).get("quiet")
    if plot_posembed is not None:
        require_matplotlib()  # fail before any work, not after
        refuse_clobber([plot_posembed], [src, *(Path(src).rglob("*") if Path(src).is_dir() else ())])
    err = sys.stderr
    with local_input(src) as (path, _):  # a URL is staged (vitconv.formats.storage)
        size = total_bytes(path) if path.exists() else 0
        show = size >= _BAR_BYTES and not quiet and err.isatty()  # never litter logs or pipes
        bar = click.progressbar(length=size, label="sha256", file=err) if show else contextlib.nullcontext()
        with bar as b:
            report = inspect_path(path, progress=b.update if b is not None else None, arch=arch)
        if as_json:
            click.echo(json.dumps(report.to_dict(), indent=2))
        else:
            for line in format_text(report):
                say(ctx, line)
        audit = getattr(report, "audit", None)
        if audit is not None and not audit.ok:  # the report is out; the status says it would not convert
            raise MappingError(f"would not convert: {audit.error}", src)
        if plot_posembed is not None:
            pe, cfg, layout = read_pos_embed(path)
            sim = posembed_cosine_grid(pe, cfg.num_prefix_tokens)
            g = sim.shape[0]
            plot_posembed_similarity(sim, plot_posembed, title=f"{path.name}: position embedding "
                                     f"similarity ({g}x{g} patches)")
            if not quiet:  # with --json, stdout holds only the JSON document
                click.echo(f"wrote {plot_posembed} ({g}x{g} grid of {g}x{g} cosine-similarity maps)",
                           err=as_json)
