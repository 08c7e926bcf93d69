"""Helpers the commands share: the options several commands take (each flag's name, type and
parsing here once; its help, which says what it does for that command, from the command), quiet-
aware printing and aligned summaries."""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import click

from vitconv.config import parse_settings


#: ``--labels`` of every command that writes a model.
labels_option = click.option(
    "--labels", metavar="imagenet-1k|imagenet-21k|FILE",
    help="Class names for the classifier's outputs (a text file: one per line), written into "
         "config.json id2label, timm's pretrained_cfg, ONNX and vitconv metadata.")


#: ``--arch`` of every command that reads a checkpoint.
arch_option = click.option(
    "--arch", metavar="NAME",
    help="The architecture a bare state dict is (a timm model name, open_clip:NAME, openai:NAME): "
         "what the file cannot record (activation, epsilon, heads) comes from it; its tensors must "
         "agree with it. Needed where the keys fit architectures that compute different functions.")


def json_option(help: str = "Print a machine-readable report.") -> Callable:
    """``--json`` (``as_json``): the command's report as JSON."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def image_size_option(help: str) -> Callable:
    """``--image-size`` of the commands that read a model at another resolution."""
    return click.option("--image-size", type=int, help=help)


def num_heads_option(help: str) -> Callable:
    """``--num-heads`` of the commands that read a bare state dict."""
    return click.option("--num-heads", type=int, help=help)


def set_option(help: str) -> Callable:
    """``--set FIELD=VALUE`` (repeatable), handed to the command parsed: ``overrides``, a dict."""
    return click.option("--set", "overrides", multiple=True, metavar="FIELD=VALUE", help=help,
                        callback=lambda ctx, param, items: parse_overrides(items))


#: ``--patch-size`` of the commands that write a model.
patch_size_option = click.option(
    "--patch-size", type=int, help="Resample to this patch size as FlexiViT does (the kernel by its "
    "pseudo-inverse resize, the position table bilinearly).")


#: ``--no-source-hash`` of the commands that convert a file.
no_source_hash_option = click.option(
    "--no-source-hash", "hash_source", flag_value=False, default=True,
    help="Do not record the source's SHA-256 (another pass over the whole file, about 0.65 s of CPU "
         "per GB: on two cores, a fifth of a large conversion's wall time). The outputs then name "
         "their source without a digest.")


def with_arch(overrides: Dict[str, object], arch: Optional[str]) -> Dict[str, object]:
    """``--set`` fields and ``--arch`` as the one ``overrides`` mapping the library takes."""
    return {**overrides, **({"arch": arch} if arch else {})}


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
    """``--set`` items as the library's overrides (:func:`vitconv.config.parse_settings`)."""
    try:
        return parse_settings(items)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from None
