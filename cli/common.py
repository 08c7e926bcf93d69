"""Helpers the commands share: quiet-aware printing and aligned summaries."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import click


#: ``--labels`` of every command that writes a model.
labels_option = click.option(
    "--labels", metavar="imagenet-1k|imagenet-21k|FILE",
    help="Class names for the classifier's outputs (a text file: one per line), written into "
         "config.json id2label, timm's pretrained_cfg, ONNX and vitconv metadata.")


#: ``--num-classes`` of the commands that write a model.
num_classes_option = click.option(
    "--num-classes", type=int, metavar="N",
    help="Replace the classifier with a new zero-initialised N-way one, for fine-tuning (Google's "
         "pre_logits is dropped, as vit_jax does); 0: no classifier, the pooled features out.")


def say(ctx: click.Context, text: str = "", **style) -> None:
    if not (ctx.obj or {}).get("quiet"):
        click.secho(text, **style)


def summary(ctx: click.Context, rows: Iterable[Tuple[str, str]]) -> None:
    """Print ``label  value`` rows, labels aligned: the shape of every command's report."""
    rows = list(rows)
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        say(ctx, f"{k.ljust(width)}  {v}")


@contextlib.contextmanager
def progress_bar(ctx: click.Context, label: str) -> Iterator[Optional[Callable[[int, int, str], None]]]:
    """A ``progress(done, total, item)`` callback drawing a bar on stderr, created on the
    first call so quick jobs print nothing; None under ``--quiet`` or when stderr is no
    terminal (logs and CI stay clean)."""
    if (ctx.obj or {}).get("quiet") or not sys.stderr.isatty():
        yield None
        return
    bar = None

    def update(done: int, total: int, item: str) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label=label, file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def parse_overrides(items: Iterable[str]) -> Dict[str, object]:
    """``("act=quick_gelu", "norm_eps=1e-5")`` -> ``{"act": "quick_gelu", "norm_eps": 1e-05}``;
    a value that reads as JSON (a number, true/false) is taken as such, otherwise as text."""
    out: Dict[str, object] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise click.BadParameter(f"{item!r} is not FIELD=VALUE", param_hint="--set")
        try:
            out[field.strip()] = json.loads(value)
        except ValueError:
            out[field.strip()] = value
    return out
