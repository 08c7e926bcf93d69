"""``vitconv export SRC --onnx [OUT] --torchscript [OUT] --pt2 [OUT] --safetensors [OUT]``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from vitconv.errors import VerificationError
from vitconv.runtime.export import ExportPlan, default_output, run_export
from vitconv.runtime.export.onnx import DEFAULT_OPSET

from .common import arch_option, image_size_option, labels_option, say, summary, with_arch


def _target(flag: str, help_text: str):
    # is_flag=False + flag_value="": `--onnx` alone means "default name beside SRC".
    return click.option(flag, type=str, default=None, is_flag=False, flag_value="",
                        metavar="[OUT]", help=help_text)


@click.command("export")
@click.argument("src", type=click.Path(path_type=Path))
@_target("--onnx", "ONNX graph (default SRC stem + .onnx), verified in onnxruntime.")
@_target("--torchscript", "TorchScript trace (default SRC stem + .torchscript.pt).")
@_target("--pt2", "torch.export AOTInductor package (default SRC stem + .pt2).")
@_target("--safetensors", "Canonical safetensors checkpoint (default SRC stem + .safetensors).")
@click.option("--opset", type=click.IntRange(18, 23), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset: 20 spells attention as MatMul/Softmax (widest runtime support); 23 "
              "uses the fused ONNX Attention op (recent runtimes only); 18 for old ones.")
@click.option("--batch", type=click.IntRange(min=1), help="Static batch size (default: dynamic batch).")
@click.option("--dynamic-size", is_flag=True,
              help="Accept any resolution divisible by the model's stride.")
@click.option("--fp16", is_flag=True, help="float16 weights (ONNX: float32 I/O, norms and "
              "softmax kept float32; verified by top-1 agreement and cosine).")
@image_size_option("Convert to this resolution first (Google's "
                   "position-embedding resize, as npz2pt --image-size).")
@click.option("--no-aoti", is_flag=True, help="--pt2: save the ExportedProgram instead of "
              "compiling an AOTInductor package (seconds instead of minutes).")
@click.option("--shard-size", type=float, default=5.0, show_default=True,
              help="--safetensors: shard above this many GB.")
@click.option("--streamed/--whole", default=None,
              help="--onnx: trace on the meta device, stream the weights from SRC and prove the file "
              "block by block (default: when the whole model would not fit in memory, or "
              "VITCONV_ONNX_STREAMED=1).")
@labels_option
@arch_option
@click.pass_context
def export(ctx: click.Context, src: Path, onnx: Optional[str], torchscript: Optional[str],
           pt2: Optional[str], safetensors: Optional[str], opset: int, batch: Optional[int],
           dynamic_size: bool, fp16: bool, image_size: Optional[int], no_aoti: bool,
           shard_size: float, labels: Optional[str], arch: Optional[str],
           streamed: Optional[bool]) -> None:
    """Export a ViT checkpoint to ONNX, TorchScript, .pt2 and safetensors; every artifact is
    loaded back in its runtime and compared with the PyTorch model (exit 3 past tolerance).

    \b
      vitconv export ViT-B_16.npz --onnx --dynamic-size
      vitconv export ViT-B_16.npz --onnx vit16.onnx --fp16 --safetensors --torchscript
    """
    targets = {"onnx": onnx, "torchscript": torchscript, "pt2": pt2, "safetensors": safetensors}
    if all(v is None for v in targets.values()):
        raise click.UsageError("nothing to export: pass --onnx, --torchscript, --pt2 and/or --safetensors")
    paths = {k: (Path(v) if v else default_output(src, k)) if v is not None else None
             for k, v in targets.items()}
    plan = ExportPlan(opset=opset, batch=batch, dynamic_size=dynamic_size, fp16=fp16,
                      image_size=image_size, aoti=not no_aoti,
                      shard_bytes=int(shard_size * 10**9), labels=labels,
                      overrides=with_arch({}, arch), streamed=streamed, **paths)
    try:
        results = run_export(src, plan, progress=lambda s: say(ctx, s, dim=True))
    except VerificationError as e:
        for r in getattr(e, "results", []):
            summary(ctx, r.rows())
        raise
    for r in results:
        summary(ctx, r.rows())
