"""Helpers the commands share: quiet-aware printing and aligned summaries."""

from __future__ import annotations

from typing import Iterable, Tuple

import click


def say(ctx: click.Context, text: str = "", **style) -> None:
    if not (ctx.obj or {}).get("quiet"):
        click.secho(text, **style)


def summary(ctx: click.Context, rows: Iterable[Tuple[str, str]]) -> None:
    """Print ``label  value`` rows, labels aligned: the shape of every command's report."""
    rows = list(rows)
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        say(ctx, f"{k.ljust(width)}  {v}")
