"""``vitconv npz2pt SRC.npz [-o OUT] [--image-size N] [--patch-size N] [--dtype D]``."""

from __future__ import annotations

from pathlib import Path

import click

from vitconv.conversion.service import cli_command, convert
from vitconv.conversion.options import ConvertOptions
from vitconv.conversion.pipeline import DTYPES

from .common import (arch_option, image_size_option, labels_option, no_source_hash_option, num_classes_option,
                     patch_size_option, progress_bar, summary, with_arch)


@click.command("npz2pt")
@click.argument("src")
@click.option("-o", "--output", help="Output path or URL; .pt (default, beside SRC) or .safetensors by extension.")
@image_size_option("Target resolution; resizes position embeddings "
                   "as Google's fine-tuning does (order-1 zoom, class token kept; sincos2d: generated).")
@patch_size_option
@click.option("--dtype", type=click.Choice(DTYPES), help="Weights written as this dtype (default: as read; "
              "bfloat16 files are read as float32, exactly).")
@labels_option
@num_classes_option
@arch_option
@no_source_hash_option
@click.pass_context
def npz2pt(ctx: click.Context, src: str, output: str | None, image_size: int | None,
           patch_size: int | None, dtype: str | None, labels: str | None, num_classes: int | None,
           arch: str | None, hash_source: bool) -> None:
    """Convert a Google JAX/Flax ViT .npz (vit_jax or big_vision: SigLIP, FlexiViT, ...) into
    the canonical PyTorch ViT.

    The architecture is read off the tensors; no flags are needed (a big_vision sincos2d
    file records no resolution: give --image-size).

    \b
      vitconv npz2pt ViT-B_16.npz
      vitconv npz2pt imagenet21k_ViT-B_16.npz --image-size 384 -o vit384.safetensors
      vitconv npz2pt siglip_b16_224.npz -o siglip.safetensors
      vitconv npz2pt flexivit_b.npz --patch-size 16 --image-size 240
    """
    # the one convert service `vitconv convert` uses (URLs staged, the same checks), with the
    # Google layouts required
    head, sep, name = src.rpartition("/")  # a URL too: its path is not a local Path's
    out = output or head + sep + str(Path(name).with_suffix(".pt"))
    options = ConvertOptions(image_size=image_size, require_layout=("google", "big_vision"), dtype=dtype,
                             patch_size=patch_size, labels=labels, num_classes=num_classes,
                             overrides=with_arch({}, arch), command=cli_command(),
                             hash_source=hash_source)
    with progress_bar(ctx, "converting") as progress:
        report = convert(src, out, options, progress=progress)
    summary(ctx, report.rows())
