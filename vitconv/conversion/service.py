"""The convert service every command and :func:`vitconv.convert` use (:func:`convert`): stage
URLs -> read -> write -> verify -> commit, as one frozen
:class:`~vitconv.conversion.options.ConvertOptions` says, with one hook before the commit
(``export --safetensors`` proves its parity there).

The model card (``README.md``) of every model directory vitconv writes: where the weights
came from (file, sha256, layout), the architecture, how to load it, the preprocessing and
labels, vitconv's version and command, and the figures of ``verify`` run on the written
files against the source's own reference, before the directory appears. Front matter in the
Hugging Face Hub's format, so the directory can be pushed as it is.

The same check, before commit, on any output: ``convert(..., verify=True)`` (``vitconv
convert --verify``, every row of ``vitconv batch``) renames nothing into place unless the
written files, read back, compute what the source computes.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from vitconv import __version__
from vitconv.formats import storage
from vitconv.config import ViTConfig
from vitconv.errors import VerificationError, VitconvError
from vitconv.formats.atomic import atomic_output
from vitconv.formats.hf_dir import read_documents
from vitconv.formats.safetensors_io import read_back
from vitconv.conversion.options import ConvertOptions, ReadOptions
from vitconv.conversion.pipeline import (Checkpoint, ConversionReport, Hook, Progress, Written,
                                          convert as convert_checkpoint, open_checkpoint)
from vitconv.runtime.predict import classifies
from vitconv.layouts.layout import Layout
from vitconv.formats.provenance import KEY_OF, Provenance
from vitconv.verification.compare import judge_rounded_output, rounding_note
from vitconv.verification.verify import VerifyReport, prove_rounded, rounded_stage, verify
from vitconv.lazy import lazy_module

loading = lazy_module("vitconv.conversion.loading")  # torch, only to verify what was written

PathLike = Union[str, os.PathLike]


def cli_command() -> str:
    """The command line that is running, as a user would type it."""
    return "vitconv " + " ".join(shlex.quote(a) for a in sys.argv[1:])


#: Metadata of an output whose files were verified before they were renamed into place:
#: present only then, so a file that holds it was verified by construction.
VERIFIED_KEY = KEY_OF["verified"]


def convert(src: PathLike, dst: PathLike, options: ConvertOptions = ConvertOptions(), *,
            hook: Optional[Hook] = None, progress: Optional[Progress] = None) -> ConversionReport:
    """The convert service every command uses: stage URLs -> read -> write -> verify -> commit.
    :func:`vitconv.conversion.pipeline.convert` with ``options``, with a model card in a directory
    output; ``options.command`` is recorded in it (default: a Python call). The written files are
    read back and checked against the source's reference (:func:`verify_written`) before they are
    renamed into place: for the card's figures, and with ``options.verify`` for every output, which
    then appears only if the check passes (else :class:`VerificationError`, nothing written) and
    records ``vitconv_verified`` in its metadata; the report's ``checked`` holds the figures.
    ``hook`` (:data:`~vitconv.conversion.pipeline.Hook`) runs after that check, still before the
    commit (``export --safetensors`` checks its parity there); the report's ``checked`` is what it
    returns when the service has no figures of its own."""
    said = options.command or f"vitconv.convert({os.fspath(src)!r}, {os.fspath(dst)!r})"
    if storage.is_url(src) or storage.is_url(dst):  # staged and uploaded (vitconv.formats.storage)
        with storage.local_input(src) as (local_src, digest), storage.local_output(dst) as local_dst:
            staged = options if digest is None else dataclasses.replace(options, source_sha256=digest)  # hashed as downloaded
            report = convert(local_src, local_dst, dataclasses.replace(staged, command=said), hook=hook,
                             progress=progress)
        where = os.fspath(dst).rstrip("/").rsplit("/", 1)[0] if storage.is_url(dst) else None
        files = [where + "/" + Path(f).relative_to(Path(local_dst).parent).as_posix() if where else f
                 for f in report.files]
        return dataclasses.replace(report, source=os.fspath(src), output=files[-1], files=files)
    verify = options.verify
    if verify:
        options = dataclasses.replace(options, metadata=options.metadata.updated(Provenance(verified=True)))

    def on_written(written: Written) -> Any:
        ckpt, layout, container, temporaries = written.ckpt, written.layout, written.container, written.temporaries
        report: Union[VerifyReport, VitconvError, None] = None
        if verify or container == "dir":
            try:
                if ckpt.new_head:
                    raise VitconvError("the classifier was replaced by a new zero-initialised one; every other "
                                       "tensor is the source's, unchanged")
                report = verify_written(src, ckpt.config, layout, container, temporaries, options.reading())
            except VitconvError as e:
                if verify:  # named as the output the user asked for, not its temporary file
                    raise type(e)(e.message, dst) from None
                report = e
            if verify and not report.ok:
                raise VerificationError(report.verdict(), dst)
            if container == "dir":
                with atomic_output(temporaries[0].parent / "README.md") as tmp:
                    tmp.write_text(model_card(src, ckpt, layout, written.source_sha256, said, report),
                                   encoding="utf-8")
        theirs = hook(written) if hook is not None else None
        return report if isinstance(report, VerifyReport) else theirs
    return convert_checkpoint(src, dst, options, on_written, progress=progress)


def verify_written(src: PathLike, cfg: ViTConfig, layout: Layout, container: str, temporaries: Sequence[Path],
                   options: ReadOptions = ReadOptions()) -> VerifyReport:
    """``verify`` on the files just written (still under their temporary names), read back as
    a user would read them (a directory with its config and preprocessing files; a bare file
    told only what its layout cannot record), against the source's reference (the source read
    with the conversion's ``options``: its ``num_heads``, ``overrides``, ``image_size``).

    Weights written in a narrower ``dtype`` are checked in two steps that together are exact:
    every tensor read back must equal, bit for bit, the float32 conversion's tensor rounded to
    ``dtype``, and that float32 model is verified against the reference at the usual
    tolerance (a looser tolerance on the rounded model would hide a wrong GELU or epsilon)."""
    dtype = options.dtype
    # what verify is told of the source: what a bare state dict cannot record
    told_src = ReadOptions(num_heads=options.num_heads, overrides=options.overrides)
    # the source as the conversion read it, in its own dtype (the float32 side of a rounded proof)
    as_read = dataclasses.replace(told_src, image_size=options.image_size)
    if options.patch_size is not None:
        raise VitconvError("verify cannot check a --patch-size resample: the reference runs at the "
                           "source's own patch size")
    source, where, told = None, Path(temporaries[0]), {}
    if container in ("dir", "safetensors"):
        weights = list(temporaries[:-1] if len(temporaries) > 1 else temporaries)  # shards, then the index
        source = read_back(weights)
    if container == "dir":
        where = where.parent
        source.documents = read_documents(where)  # as a user's read of the directory parses them
    else:
        told = layout.arguments(cfg, recorded=False)
    back_as = ReadOptions(num_heads=told.pop("num_heads", None), overrides=told)
    try:
        # every model here runs block by block from its files (one block's weights in memory)
        written = loading.StreamedModel(lambda: open_checkpoint(where, back_as, source=source))
        if dtype is None:
            return verify(src, written, told_src)
        model, said = prove_rounded(lambda: open_checkpoint(src, as_read),
                                    lambda: open_checkpoint(where, back_as, source=source), dtype)
        if model is None:
            raise VerificationError(said)
        # the float32 weights, read as the written file is (its architecture): verify runs them
        # once, stage by stage, and that pass's output is the one the rounding is measured from
        twin = _Kept(model)
        report = verify(src, twin, told_src)
        exact, images = twin.output()
        rounded = _output(written, images)  # the rounded model, as users will run it, on the same images
    finally:
        if source is not None:
            source.close()
    moved = judge_rounded_output(rounded, exact, dtype=dtype)
    report.note = rounding_note(dtype, *said, moved)
    if not moved.ok:
        report.stages.append(rounded_stage(dtype, moved))
    return report


class _Kept:
    """``model`` as ``verify`` runs it, keeping its one pass: the images (NCHW) and the final
    output, so the float32 twin of a rounded file runs once, not once more for the rounding's
    figure (each pass reads every block of the file again)."""

    def __init__(self, model: Any):
        self.model, self.config = model, model.config
        self._kept: Optional[Tuple[Any, Any]] = None

    def forward_stages(self, images: Any) -> Any:
        stages = self.model.forward_stages(images)
        self._kept = (images, stages["logits"] if "logits" in stages else stages["head_input"])
        return stages

    def output(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(its final output as float64, the NCHW images it ran on)`` of the pass ``verify`` ran."""
        images, final = self._kept
        return final.double().numpy(), images.numpy()


def _output(model, nchw: np.ndarray) -> np.ndarray:
    """The model's final output (float64) on ``nchw``."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(nchw)).double().numpy()


def model_card(src: PathLike, ckpt: Checkpoint, layout: Layout, digest: str, command: str,
               report: Union[VerifyReport, VitconvError]) -> str:
    """The card's text; ``report``: :func:`verify_written`'s figures, or why there are none."""
    cfg, usage = ckpt.config, ckpt.usage
    library = layout.loads_with.get("dir", "").split(".")[0].split("(")[0] or None
    task = "image-classification" if classifies(cfg) else "image-feature-extraction"
    if isinstance(report, VerifyReport):
        figures = [f"`vitconv verify` on the written files, before they were renamed into place: "
                   f"{report.verdict()}", "",
                   f"Reference: {report.reference}; {report.batch} seeded images at {report.image_size}px, "
                   f"tolerance {report.tolerance:g} x max(1, rms) per stage.", "",
                   "| stage | max abs diff | bound |", "|---|---|---|"]
        figures += [f"| {s.what} | {s.max_abs:.3g} | {s.bound:.3g} |" for s in report.stages]
    else:
        figures = [f"Not verified: {report.message}"]
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
