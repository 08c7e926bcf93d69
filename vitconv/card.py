"""The model card (``README.md``) of every model directory vitconv writes: where the weights
came from (file, sha256, layout), the architecture, how to load it, the preprocessing and
labels, vitconv's version and command, and the figures of ``verify`` run on the written
files against the source's own reference, before the directory appears. Front matter in the
Hugging Face Hub's format, so the directory can be pushed as it is.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from . import __version__
from .errors import VitconvError
from .export.safetensors import read_back
from .formats.hf_dir import JSON_FILES
from .pipeline import Checkpoint, ConversionReport, convert as convert_checkpoint, open_checkpoint
from .predict import classifies
from .rules.registry import Layout
from .verify import verify

PathLike = Union[str, os.PathLike]


def cli_command() -> str:
    """The command line that is running, as a user would type it."""
    return "vitconv " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def convert(src: PathLike, dst: PathLike, *, command: Optional[str] = None, **kwargs: Any) -> ConversionReport:
    """:func:`vitconv.pipeline.convert`, with a model card in a directory output; ``command``
    is recorded in it (default: a Python call)."""
    said = command or f"vitconv.convert({os.fspath(src)!r}, {os.fspath(dst)!r})"

    def card(ckpt: Checkpoint, layout: Layout, temporaries: List[Path], digest: str) -> str:
        return model_card(src, ckpt, layout, temporaries, digest, said, kwargs.get("num_heads"),
                          kwargs.get("overrides"))
    return convert_checkpoint(src, dst, card=card, **kwargs)


def _verify_written(src: PathLike, temporaries: Sequence[Path], num_heads: Optional[int],
                    overrides: Optional[Dict[str, object]]):
    """``verify`` on the files just written (still under their temporary names), the config
    and preprocessing files beside them included, against the source's reference."""
    from .checkpoint import build_model  # torch

    weights = list(temporaries[:-1] if len(temporaries) > 1 else temporaries)  # shards, then the index
    source = read_back(weights)
    folder = Path(weights[0]).parent
    for name, key in JSON_FILES.items():
        if (folder / name).is_file():
            source.metadata[key] = (folder / name).read_text(encoding="utf-8")
    with open_checkpoint(folder, source=source) as written:
        model = build_model(written.config, written.state_dict())
    return verify(src, model, num_heads=num_heads, overrides=overrides)


def model_card(src: PathLike, ckpt: Checkpoint, layout: Layout, temporaries: Sequence[Path], digest: str,
               command: str, num_heads: Optional[int] = None,
               overrides: Optional[Dict[str, object]] = None) -> str:
    cfg, usage = ckpt.config, ckpt.usage
    library = layout.loads_with.get("dir", "").split(".")[0].split("(")[0] or None
    task = "image-classification" if classifies(cfg) else "image-feature-extraction"
    try:
        if ckpt.new_head:
            raise VitconvError("the classifier was replaced by a new zero-initialised one; every other "
                               "tensor is the source's, unchanged")
        report = _verify_written(src, temporaries, num_heads, overrides)
        figures = [f"`vitconv verify` on the written files, before they were renamed into place: "
                   f"{report.verdict()}", "",
                   f"Reference: {report.reference}; {report.batch} seeded images at {report.image_size}px, "
                   f"tolerance {report.tolerance:g} x max(1, rms) per stage.", "",
                   "| stage | max abs diff | bound |", "|---|---|---|"]
        figures += [f"| {s.what} | {s.max_abs:.3g} | {s.bound:.3g} |" for s in report.stages]
    except VitconvError as e:
        figures = [f"Not verified: {e.message}"]
    labels = usage.labels
    front = ["---", "tags:", "  - vision", "  - vision-transformer", "  - vitconv", f"pipeline_tag: {task}"]
    if library:
        front.insert(1, f"library_name: {library}")
    front.append("---")
    lines = front + [
        "", f"# {Path(src).name}, converted by vitconv", "",
        f"Converted from `{Path(src).name}` ({ckpt.layout.name} layout: {ckpt.layout.description})"
        + (f", sha256 `{digest}`" if digest else "") + f", to the {layout.name} layout ({layout.description}).",
        "", "## Architecture", "", f"{cfg.describe()}; {sum(s.numel for s in ckpt.specs()):,} parameters.",
        "", "## Use", "", "```python", layout.loads_with.get("dir", "").format(path="."), "```", "",
        "## Preprocessing", "", usage.preprocessing.describe() + ".", "",
        "## Labels", "",
        (f"{len(labels):,} classes, from `{labels[0]}` to `{labels[-1]}` (`id2label` / `label_names`)."
         if labels else ("Not known: the classes are numbered." if cfg.num_classes else "No classifier.")),
        "", "## Verification", "", *figures, "",
        "## Conversion", "", f"vitconv {__version__}: `{command}`", "",
        *[f"- {n}" for n in ckpt.notes], "",
    ]
    return "\n".join(lines)
