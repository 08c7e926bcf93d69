"""``vitconv npz2pt SRC.npz [-o OUT] [--image-size N]``."""

from __future__ import annotations

from pathlib import Path

import click

from vitconv.pipeline import convert

from .common import progress_bar, summary


@click.command("npz2pt")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Output path; .pt (default, beside SRC) or .safetensors by extension.")
@click.option("--image-size", type=int, help="Target resolution; resizes position embeddings "
              "as Google's fine-tuning does (order-1 zoom, class token kept).")
@click.pass_context
def npz2pt(ctx: click.Context, src: Path, output: Path | None, image_size: int | None) -> None:
    """Convert a Google JAX/Flax ViT .npz into the canonical PyTorch ViT.

    The architecture is read off the tensors; no flags are needed.

    \b
      vitconv npz2pt ViT-B_16.npz
      vitconv npz2pt imagenet21k_ViT-B_16.npz --image-size 384 -o vit384.safetensors
    """
    out = output or src.with_suffix(".pt")
    with progress_bar(ctx, "converting") as progress:
        report = convert(src, out, image_size=image_size, require_layout="google", progress=progress)
    summary(ctx, report.rows())
