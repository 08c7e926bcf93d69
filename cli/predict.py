"""``vitconv predict CKPT IMAGE... [--top-k K] [--json]``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import click

from vitconv.conversion.options import ReadOptions
from vitconv.runtime.predict import display_name, open_predictor, predict as predict_images

from .common import (arch_option, image_size_option, json_option, labels_option, num_heads_option, say,
                     with_arch)


@click.command("predict")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=int, default=5, show_default=True, help="Classes shown per image.")
@image_size_option("Run at this resolution (a checkpoint's position table is "
                   "resized its family's way).")
@num_heads_option("Heads, for a bare state dict that does not record them.")
@labels_option
@arch_option
@json_option("Print the predictions as one JSON document.")
@click.pass_context
def predict(ctx: click.Context, ckpt: Path, images: Tuple[Path, ...], top_k: int, image_size: Optional[int],
            num_heads: Optional[int], labels: Optional[str], arch: Optional[str], as_json: bool) -> None:
    """What the model sees in each image: the top classes with probabilities (and labels when
    known), or the embedding of a model without a classifier. Any checkpoint vitconv reads,
    or an .onnx / TorchScript export; the image is preprocessed the model's own way.

    \b
      vitconv predict ViT-B_16.npz cat.jpg --labels imagenet-1k
      vitconv predict vit.onnx cat.jpg dog.png --top-k 3 --json
    """
    model = open_predictor(ckpt, ReadOptions(image_size=image_size, num_heads=num_heads, labels=labels,
                                             overrides=with_arch({}, arch)))
    results = predict_images(model, images, top_k=top_k)
    if as_json:
        click.echo(json.dumps({"model": display_name(ckpt), "runtime": model.runtime, "image_size": model.image_size,
                               "preprocessing": model.usage.preprocessing.describe(),
                               "predictions": [r.to_dict() for r in results]}, indent=2, ensure_ascii=False))
        return
    say(ctx, f"model   {display_name(ckpt)} ({model.runtime}, {model.image_size}px)")
    say(ctx, f"input   {model.usage.preprocessing.describe()}")
    for r in results:
        for line in r.lines():
            say(ctx, line)
