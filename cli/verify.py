"""``vitconv verify SRC [CONVERTED] [--tolerance X] [--json] [--batch N] [--seed S] [--image-size N]
[--num-heads N] [--set FIELD=VALUE]``."""

from __future__ import annotations


import click

from vitconv.conversion.options import ReadOptions
from vitconv.errors import VerificationError
from vitconv.formats.storage import local_input
from vitconv.verification.verify import DEFAULT_BATCH, DEFAULT_SEED, DEFAULT_TOLERANCE, verify as run_verify

from .common import arch_option, image_size_option, json_option, num_heads_option, say, set_option, with_arch


@click.command("verify")
@click.argument("src")
@click.argument("converted", required=False)
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True,
              help="Per stage: max abs error <= TOLERANCE x max(1, rms of the reference stage).")
@json_option()
@click.option("--batch", type=int, default=DEFAULT_BATCH, show_default=True, help="Seeded images.")
@click.option("--seed", type=int, default=DEFAULT_SEED, show_default=True,
              help="numpy.random.default_rng seed of the images.")
@image_size_option("Resolution to test at (default: the converted "
                   "model's; the reference resizes position embeddings its own way).")
@num_heads_option("Heads, where a bare state dict cannot say (as for convert); "
                  "for SRC, CONVERTED or both, whichever leaves them open.")
@set_option("A config field a bare state dict does not record, as given to convert (repeatable); "
            "for SRC, CONVERTED or both, whichever leaves it open.")
@arch_option
@click.pass_context
def verify(ctx: click.Context, src: str, converted: str | None, tolerance: float, as_json: bool,
           batch: int, seed: int, image_size: int | None, num_heads: int | None, overrides: dict, arch: str | None) -> None:
    """Check CONVERTED against SRC, stage by stage, and name the first stage past tolerance.
    Exit 0 when within tolerance, 3 if not, or if the reference had to assume what SRC does not
    record and another known architecture with its keys computes otherwise (--arch names it).

    The reference: for Google's .npz, an independent NumPy implementation of vit_jax; for
    Hugging Face and timm directories, the library's own model loaded from SRC alone; for bare
    timm, DINOv2, OpenAI CLIP and OpenCLIP state dicts, the library's class built with the
    arguments vitconv read, with --set/--num-heads as given to convert (the report says which). Library references expose the embedding, each
    block's output and the final output.

    CONVERTED: any checkpoint vitconv reads (omitted: SRC is converted now), or an .onnx /
    TorchScript export (then only the final output can be compared). Weights in float16 or
    bfloat16 are checked as the float32 conversion rounded, bit for bit, and a --fp16 ONNX
    graph by top-1 and cosine, as export checks them.

    \b
      vitconv verify ViT-B_16.npz ViT-B_16.pt
      vitconv verify ViT-B_16.npz --image-size 384 --json
      vitconv verify dinov2-small/ dinov2-small.safetensors
      vitconv verify s3://zoo/ViT-B_16.npz s3://zoo/b16.safetensors   # URLs, as for convert
    """
    options = ReadOptions(image_size=image_size, num_heads=num_heads,
                          overrides=with_arch(overrides, arch))
    with local_input(src) as (local_src, _), local_input(converted or "") as (local_conv, _):
        report = run_verify(local_src, local_conv if converted else None, options, tolerance=tolerance,
                            batch=batch, seed=seed)
    if as_json:
        click.echo(report.to_json())
    else:
        for line in report.lines():
            say(ctx, line, **({} if report.ok or not line.startswith("FAILED") else {"fg": "red"}))
    if not report.ok:
        raise VerificationError(report.verdict(), converted or src)
