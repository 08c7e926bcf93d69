"""``vitconv convert SRC DST [--to LAYOUT] [--num-heads N] [--image-size N] [--patch-size N]
[--dtype D] [--set FIELD=VALUE] [--verify]``."""

from __future__ import annotations


import click

from vitconv.conversion.service import cli_command, convert as convert_any
from vitconv.conversion.options import ConvertOptions
from vitconv.conversion.pipeline import DTYPES
from vitconv.conversion.targets import target_names

from .common import (arch_option, image_size_option, labels_option, num_classes_option, num_heads_option,
                     no_source_hash_option, patch_size_option, progress_bar, set_option, summary, with_arch)


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--to", "to", type=click.Choice(target_names()), help="Target layout (default from DST: .npz -> "
              "Google, a directory -> hf, .pt/.safetensors -> canonical).")
@num_heads_option("Heads, where the source's shapes cannot say "
                  "(fused or per-matrix q/k/v; default assumes 64-dim heads).")
@set_option("A config field the source does not record, e.g. --set act=quick_gelu --set "
            "norm_eps=1e-5 for a bare OpenAI-CLIP-style timm state dict (repeatable).")
@image_size_option("Target resolution; resizes position embeddings "
                   "the way the source's library does.")
@patch_size_option
@click.option("--dtype", type=click.Choice(DTYPES), help="Weights written as this dtype (default: "
              "as read; bfloat16 sources are read as float32, exactly).")
@arch_option
@labels_option
@num_classes_option
@click.option("--verify", "check", is_flag=True, help="Verify the written files against the source's "
              "reference before they are renamed into place: nothing appears unless they pass (exit 3).")
@no_source_hash_option
@click.pass_context
def convert(ctx: click.Context, src: str, dst: str, to: str | None, num_heads: int | None,
            overrides: dict, image_size: int | None, patch_size: int | None, dtype: str | None,
            arch: str | None, labels: str | None, num_classes: int | None, check: bool,
            hash_source: bool) -> None:
    """Convert a ViT checkpoint between layouts: Google .npz, canonical, timm, Hugging Face,
    jeonsworld, vit-pytorch. The source layout and architecture are read off the tensors.

    \b
      vitconv convert ViT-B_16.npz vit_hf                 # Hugging Face directory
      vitconv convert vit_hf vit_timm.pth --to timm
      vitconv convert vit_timm.pth back.npz               # Google .npz
      vitconv convert ViT-B_16.npz b16.safetensors --dtype float16 --verify
      vitconv convert clip_tower.pth clip.safetensors --arch vit_base_patch16_clip_quickgelu_224 --verify
      vitconv convert s3://zoo/ViT-B_16.npz s3://zoo/b16_hf --verify   # URLs: fsspec

    SRC and DST may be URLs (s3://, gs://, https://, with the s3/gcs/http extras): the source
    is streamed to a local temporary file once; the output is uploaded once complete.
    """
    options = ConvertOptions(to=to, num_heads=num_heads, image_size=image_size, patch_size=patch_size, dtype=dtype,
                             overrides=with_arch(overrides, arch), labels=labels,
                             num_classes=num_classes, command=cli_command(), verify=check,
                             hash_source=hash_source)
    with progress_bar(ctx, "converting") as progress:
        report = convert_any(src, dst, options, progress=progress)
    summary(ctx, report.rows())
