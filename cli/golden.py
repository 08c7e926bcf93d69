"""``vitconv golden check [--dir golden]`` and ``vitconv golden add NAME CHECKPOINT ...``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from vitconv.verification import golden as lib
from vitconv.errors import VerificationError

from .common import arch_option, image_size_option, json_option, say, set_option, with_arch

_dir_option = click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                           default=Path("golden"), show_default=True, help="Golden directory (holds manifest.json).")


@click.group("golden")
def golden() -> None:
    """The golden regression suite: cases whose outputs come from independent code."""


@golden.command("check")
@_dir_option
@click.argument("names", nargs=-1)
@json_option()
@click.pass_context
def check(ctx: click.Context, directory: Path, names: tuple, as_json: bool) -> None:
    """Run every case (or NAMES) through the converter and the NumPy reference and compare with
    the expected files; exit 3 if any case fails.

    \b
      vitconv golden check
      vitconv golden check tiny_r50_32 --dir golden
    """
    report = lib.check(directory, list(names) or None)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for line in report.lines():
            say(ctx, line)
    if not report.ok:
        failed = [c.name for c in report.cases if not c.ok]
        raise VerificationError(f"golden case(s) failed: {', '.join(failed)}", directory)


@golden.command("add")
@click.argument("name")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "input_", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="NHWC float input batch (.npy).")
@click.option("--expected-logits", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--expected-pooled", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--expected-prelogits", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--expected-posemb-resized", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--source", required=True, help="Provenance: which code, version and settings "
              "produced the expected outputs.")
@image_size_option("Resolution the case converts the checkpoint to.")
@click.option("--tolerance", type=float, default=lib.DEFAULT_TOLERANCE, show_default=True,
              help="Max abs difference allowed.")
@click.option("--issue", help="Tag recorded with the case (default 'added').")
@click.option("--accept", is_flag=True, help="Replace an existing case of the same name.")
@set_option("What a bare checkpoint cannot record and its keys leave open, recorded with the case.")
@arch_option
@_dir_option
@click.pass_context
def add(ctx: click.Context, name: str, checkpoint: Path, input_: Path, expected_logits: Path,
        expected_pooled: Path | None, expected_prelogits: Path | None,
        expected_posemb_resized: Path | None, source: str, image_size: int | None,
        tolerance: float, issue: str | None, accept: bool, overrides: dict, arch: str | None,
        directory: Path) -> None:
    """Record a golden case: copy its files, write sha256 and provenance into the manifest.

    \b
      vitconv golden add my_case my.npz --input x.npy --expected-logits y.npy \\
          --source "vit_jax models_vit.py @c6de1e5, float32 CPU"
    """
    expected = {"logits": expected_logits, "pooled": expected_pooled,
                "prelogits": expected_prelogits, "posemb_resized": expected_posemb_resized}
    result = lib.add_case(name, checkpoint, input_, {k: v for k, v in expected.items() if v},
                          source, directory=directory, image_size=image_size, tolerance=tolerance,
                          issue=issue, accept=accept, overrides=with_arch(overrides, arch))
    figs = ", ".join(f"{f.engine} {f.what} {f.max_abs:.2g}" for f in result.figures if f.what != "top1")
    say(ctx, f"recorded  {name} in {directory / lib.MANIFEST}")
    say(ctx, f"figures   {figs}")
