"""Prove a conversion: run the source through a reference and the converted model on the same
seeded images, stage by stage. The reference for Google's ``.npz`` is the independent NumPy
implementation of vit_jax (:mod:`vitconv.verification.references.google_numpy`, every stage), for big_vision's that of
big_vision's models/vit.py (:mod:`vitconv.verification.references.big_vision_numpy`); for Hugging Face, timm, the
original DINOv2, OpenAI CLIP and OpenCLIP sources it is that library's own model
(:mod:`vitconv.verification.references.library`: the embedding, each block's output, the final output).

Why stage by stage: a wrong logit says *that* a conversion is broken; the first stage that
leaves tolerance says *where* (a swapped head shows up in that block's attention, a wrong
activation in the first MLP, a mis-aligned position-table resize in the patch embedding).
Stages are compared in execution order and the first one past tolerance is named in words.

Tolerance (default :data:`DEFAULT_TOLERANCE` = 1e-4; the rule and the inputs are
:mod:`vitconv.verification.compare`'s, shared with convert, export, batch and golden): a stage passes when
``max|converted - reference| <= tolerance * max(1, rms(reference))``, i.e. an absolute bound
for stages of order one and a relative one for large activations (the residual stream grows
block by block, to hundreds in a real ViT-B, and float32 rounding grows with it). The scale is
the stage's RMS, not its max: a residual stream's few outlier channels would otherwise loosen
the bound for every other element (with max-scaling, exact-GELU-instead-of-tanh passes block 0
of the tiny golden models unnoticed). ``max rel`` in the report is ``max abs / rms(reference)``
(element-wise ratios explode near zero). The converted model runs in float32 and the reference
in float64: a correct conversion of a golden case stays below 1e-5 x RMS on every stage (15x
margin or more), while the known semantic faults (exact vs tanh GELU, a swapped head, a
mis-transposed kernel, a half-pixel position resize, a dropped ``pre_logits``) land 3x to
10^5x beyond the bound at the stage where they happen.

A weights file written in float16 or bfloat16 (``convert --dtype``) would fail a float32
tolerance on its rounding alone, and a tolerance loose enough for the rounding would hide a
wrong GELU. Such a file (every value held exactly by the one narrower type) is proven in two
exact steps instead: each tensor must be the source's float32 conversion rounded, bit for
bit, and that float32 conversion, in the file's architecture, is compared stage by stage at
the usual tolerance. The report says how far the rounding alone moves the output.

CONVERTED may be a canonical checkpoint (``.pt``/``.safetensors`` written by vitconv), omitted
(SRC converted on the fly with :func:`vitconv.load`), an in-memory canonical model, or an
exported artifact: ONNX (run with onnxruntime) or TorchScript (``torch.jit.load``; loading runs
the artifact's TorchScript code, so verify only artifacts you would run anyway). Exported
artifacts expose only their final output, so only logits are compared and the report says so.
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from vitconv import archs
from vitconv.config import SHAPE_FIELDS, ViTConfig
from vitconv.errors import BadInputError, VerificationError
from vitconv.verification.compare import (DEFAULT_SEED, DEFAULT_TOLERANCE, FP16_MIN_COSINE, CanonicalTensors,
                                          Comparison, check_rounded, compare,
                                          held_exactly, judge_rounded_output, nchw, rounding_note, seeded_images)
from vitconv.verification.references import table as references
from vitconv.verification.references.library import LibraryReference
from vitconv.conversion.pipeline import ARCH, left_open, open_checkpoint
from vitconv.conversion.options import ReadOptions
from vitconv.runtime.runners import OnnxRunner, TorchRunner, artifact_kind, load_torchscript, require_input
from vitconv.lazy import lazy_module

loading = lazy_module("vitconv.conversion.loading")  # torch, when a model runs

PathLike = Union[str, os.PathLike]

DEFAULT_BATCH = 2


def describe_stage(name: str) -> str:
    """``blocks.7.attn`` -> ``block 7 attention`` and so on: what a user reads."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) == 3:
        return f"block {parts[1]} " + {"attn": "attention", "mlp": "MLP"}.get(parts[2], parts[2])
    return {"stem": "ResNet stem", "embed": "patch embedding", "encoded": "final norm",
            "pooled": "pooling", "head_input": "pre_logits", "logits": "head"}.get(name, name)


@dataclass
class StageResult:
    name: str
    what: str
    max_abs: float
    max_rel: float
    ref_rms: float
    bound: float
    ok: bool
    note: str = ""
    rule: str = ""  # how the stage was judged, when not by ``bound`` (a float16 graph's output)


@dataclass
class VerifyReport:
    source: str
    converted: str
    kind: str  # 'canonical' | 'onnx' | 'torchscript'
    image_size: int
    batch: int
    seed: Optional[int]
    tolerance: float
    reference_dtype: str
    stages: List[StageResult] = field(default_factory=list)
    only_final: bool = False
    note: str = ""
    reference: str = ""  # what computed the reference outputs
    #: Each semantic config field of the source: its value and where it came from
    #: (:data:`vitconv.archs.SOURCES`: the file, its config, --arch, --set, the table, the code...).
    semantics: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    arch: Optional[str] = None  # the architecture the source was read as (--arch)
    source_dtype: str = ""  # the dtype(s) the source's floating-point weights are stored in

    @property
    def assumed(self) -> List[str]:
        """Fields the reference took from an assumption: nothing confirms them, and another known
        architecture with the source's keys computes otherwise. The stages cannot prove them."""
        return sorted(f for f, d in self.semantics.items() if d["from"] == "assumed")

    @property
    def stages_ok(self) -> bool:
        return bool(self.stages) and all(s.ok for s in self.stages)

    @property
    def ok(self) -> bool:
        return self.stages_ok and not self.assumed

    @property
    def first_failure(self) -> Optional[StageResult]:
        return next((s for s in self.stages if not s.ok), None)

    def verdict(self) -> str:
        bad = self.first_failure
        if bad is None and self.assumed:
            said = ", ".join(f"{f}={self.semantics[f]['value']!r}" for f in self.assumed)
            return (f"NOT CERTIFIED: {len(self.stages)} stage(s) within tolerance, but the reference was built "
                    f"from an assumption the file does not record ({said}, the source layout's defaults, which "
                    "other architectures with its keys do not share): name the architecture with --arch, or --set")
        if bad is None:
            judged = [s.rule for s in self.stages if s.rule]
            if judged:
                return f"OK: {len(self.stages)} stage(s) pass ({'; '.join(judged)})"
            worst = max(self.stages, key=lambda s: s.max_abs / s.bound)
            return (f"OK: {len(self.stages)} stage(s) within tolerance "
                    f"(closest: {worst.what}, max abs {worst.max_abs:.2g} <= {worst.bound:.2g})")
        detail = bad.note or f"max abs {bad.max_abs:.3g} > {bad.bound:.3g}"
        return f"FAILED: first stage past tolerance is {bad.what} ({bad.name}): {detail}"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        bad = self.first_failure
        d["first_failure"] = None if bad is None else {"stage": bad.name, "what": bad.what}
        d["verdict"] = self.verdict()
        d["assumed"] = self.assumed
        for s in d["stages"]:  # JSON has no inf/nan
            for k in ("max_abs", "max_rel", "ref_rms", "bound"):
                if not math.isfinite(s[k]):
                    s[k] = None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def lines(self) -> List[str]:
        """The human report: header, per-stage table, verdict."""
        stored = f"; weights stored as {self.source_dtype}" if self.source_dtype else ""
        out = [f"source     {self.source} ({self.reference}{stored})",
               f"converted  {self.converted} ({self.kind})",
               f"inputs     {self.batch} x {self.image_size}x{self.image_size} NHWC"
               + (f", uniform[-1, 1], seed {self.seed}" if self.seed is not None else ", given"),
               f"tolerance  max abs <= {self.tolerance:g} x max(1, rms(reference)) per stage; "
               "max rel = max abs / rms(reference)"]
        if self.note:
            out.append(f"note       {self.note}")
        w = max([len(s.name) for s in self.stages] + [5])
        ww = max([len(s.what) for s in self.stages] + [4])
        out.append("")
        out.append(f"{'stage'.ljust(w)}  {'what'.ljust(ww)}  {'max abs':>9}  {'max rel':>9}  result")
        for s in self.stages:
            res = "ok" if s.ok else ("FAIL " + s.note if s.note else "FAIL")
            out.append(f"{s.name.ljust(w)}  {s.what.ljust(ww)}  {s.max_abs:9.2e}  {s.max_rel:9.2e}  {res}")
        out.append("")
        out.append(self.verdict())
        return out


# --------------------------------------------------------------------------- comparing
def compare_stage(name: str, got: Optional[np.ndarray], ref: Optional[np.ndarray],
                  tolerance: float) -> StageResult:
    """One stage judged by :func:`vitconv.verification.compare.compare`, named in words."""
    c = compare(got, ref, tolerance)
    return StageResult(name, describe_stage(name), c.max_abs, c.max_rel, c.rms, c.bound, c.ok, c.note)


# --------------------------------------------------------------------------- running artifacts
def stored_dtypes(source) -> str:
    """The floating-point dtype(s) a source's weights are stored in (``bfloat16``;
    ``bfloat16, float32``), from headers alone."""
    kinds = {source.stored_dtype(k) for k in source.keys()}
    return ", ".join(sorted(k for k in kinds if "float" in k)) or ", ".join(sorted(kinds))


def reference_for(src: PathLike, ckpt, reference_dtype=np.float64):
    """The reference for ``src`` (opened as ``ckpt``), as the table of references
    (:data:`vitconv.verification.references.table.REFERENCES`) opens it for the layout: the
    NumPy forward of Google's ``vit_jax`` or of big_vision for their ``.npz`` files, else the
    source library's own model."""
    return references.opener(ckpt.layout.name)(src, ckpt, reference_dtype)


# --------------------------------------------------------------------------- the entry point
def verify(src: PathLike, converted: Union[PathLike, Any, None] = None, options: ReadOptions = ReadOptions(), *,
           tolerance: float = DEFAULT_TOLERANCE, batch: int = DEFAULT_BATCH, seed: int = DEFAULT_SEED,
           inputs: Optional[np.ndarray] = None, reference_dtype=np.float64, **given: Any) -> VerifyReport:
    """Compare ``src`` through its reference (Google ``.npz``: the NumPy reference; a
    library's layout: the library's model) with ``converted``.

    ``converted``: ``None`` (convert ``src`` now, at ``options.image_size`` if given), a path
    (vitconv ``.pt``/``.safetensors``, ``.onnx``, TorchScript), or an in-memory model
    (a canonical ``VisionTransformer`` is compared stage by stage; any other module on its
    output only). ``inputs`` (NHWC float) replaces the seeded images.

    ``options`` (:class:`~vitconv.conversion.options.ReadOptions`, varied by ``given``:
    ``image_size=``, ``num_heads=``, ``overrides=``, as for ``open_checkpoint``): how the files
    are read. ``image_size``: the resolution tested at; ``num_heads`` and ``overrides`` say what
    a bare state dict does not record, as for ``convert`` (the library reference is built with
    them); each goes to whichever of the two files leaves it open (a bare converted file too),
    and is refused when both record it. A field that would change what the converted model
    computes away from the source (``patch_size``, ``dtype``, ``num_classes``...) is refused:
    the reference cannot follow it.
    Returns the report; it does not raise on disagreement (see :func:`check`)."""
    options = replace(options, **given) if given else options
    _refuse_unread(options)
    image_size = options.image_size
    if not (tolerance > 0):
        raise BadInputError(f"tolerance must be positive, got {tolerance}")
    if batch <= 0:
        raise BadInputError(f"batch must be positive, got {batch}")
    if isinstance(converted, (str, os.PathLike)):  # before any work on the source
        require_input(Path(converted))
    src_as, conv_as = _arguments(src, converted, options)
    with open_checkpoint(src, src_as) as source:  # headers only
        scfg = source.config
        semantics = {f.name: {"value": getattr(source.source_config, f.name),
                              "from": source.semantics.sources[f.name]}
                     for f in fields(ViTConfig) if f.name not in SHAPE_FIELDS}
        read_as = source.semantics.arch
        stored = stored_dtypes(source.source)
    model, runner, kind, label = None, None, "canonical", "in-memory model"
    owned = True  # opened here, so released here before the reference is built
    if converted is None:
        model = loading.StreamedModel(lambda: open_checkpoint(src, replace(src_as, image_size=image_size)))
        label = f"{src} converted on the fly"
    elif isinstance(converted, (str, os.PathLike)):
        label = os.fspath(converted)
        kind = artifact_kind(converted)
        if kind == "onnx":
            runner = OnnxRunner(Path(converted))
            runner.check_channels(scfg.in_chans)
        elif kind == "torchscript":
            runner = TorchRunner(load_torchscript(Path(converted)), Path(converted))
        else:
            model = loading.StreamedModel(lambda: open_checkpoint(converted, conv_as))
    elif hasattr(converted, "forward_stages"):
        model, owned = converted, False
    else:
        runner, kind, owned = TorchRunner(converted), "torch module", False
    if model is not None:
        kind = "canonical vitconv model"

    if inputs is not None:
        images = np.asarray(inputs, dtype=np.float32)
        if images.ndim != 4:
            raise BadInputError(f"inputs must be NHWC (4-D), got shape {images.shape}")
        size, used_seed = images.shape[1], None
    else:
        size = image_size
        if size is None and model is not None:
            size = model.config.image_size
        if size is None and isinstance(runner, OnnxRunner):
            size = runner.static_size()
        size = size or scfg.image_size
        if size % scfg.total_stride:
            raise BadInputError(f"image size {size} is not a multiple of the model's stride {scfg.total_stride}", src)
        images = seeded_images(batch, size, scfg.in_chans, seed)
        used_seed = seed
    pixels = nchw(images)
    # A weights file holding float16 or bfloat16 values: proven as `convert --dtype --verify`
    # proves it (each tensor the float32 conversion's, rounded, bit for bit; the float32 model
    # against the reference), with how far the rounding moves the output said, never hidden
    # behind a looser tolerance.
    rounding, moved = None, None  # a file's (an in-memory model, a StreamedModel too, is what it computes)
    if isinstance(model, loading.StreamedModel) and isinstance(converted, (str, os.PathLike)):
        rounding = held_exactly(t for _, t in model.tensors())
    written_size = model.config.image_size if rounding else None
    # The converted model runs first and is released; only then is the reference built (a
    # float64 NumPy copy of the weights, or the library's model): the two are never held at once.
    got = _run_converted(model, runner, pixels)
    half = bool(getattr(runner, "half", False))
    if owned:
        model = runner = None
        gc.collect()
    report = VerifyReport(source=os.fspath(src), converted=label, kind=kind, image_size=int(size),
                          batch=int(images.shape[0]), seed=used_seed, tolerance=float(tolerance),
                          reference_dtype=np.dtype(reference_dtype).name, semantics=semantics, arch=read_as)
    if rounding is not None:
        twin, said = prove_rounded(lambda: open_checkpoint(src, replace(src_as, image_size=written_size)),
                                   lambda: open_checkpoint(converted, conv_as), rounding)
        if twin is not None:  # the float32 conversion, in the file's architecture: its stages are judged
            rounded, got = got, _run_converted(twin, None, pixels)
            final = "logits" if "logits" in got else "head_input"
            moved = judge_rounded_output(rounded[final], got[final], dtype=rounding)
            said = rounding_note(rounding, *said, moved)
        else:  # a tensor is not the float32 one rounded: no stage is worth running
            report.stages = [StageResult("weights", f"weights rounded to {rounding}", math.inf, math.inf,
                                         math.nan, tolerance, False, said)]
            return report
        report.note, report.kind = said, f"{kind}, {rounding} weights"
    with open_checkpoint(src, src_as) as source:  # the layout decides the reference
        ref = reference_for(src, source, reference_dtype)
    if size != ref.image_size and getattr(ref, "fixed_size", False):
        raise BadInputError(f"the reference ({ref.description}) runs at the checkpoint's {ref.image_size}px "
                            f"only, not {size}", src)
    numpy_reference = not isinstance(ref, LibraryReference)  # every stage; a library: some
    want = ref.forward_stages(images)
    report.reference_dtype, report.reference, report.source_dtype = ref.reference_dtype, ref.description, stored
    if hasattr(ref, "close"):
        ref.close()
    del ref
    if isinstance(got, dict):
        # a library exposes some stages (embedding, block outputs, the output): those are compared
        names = list(want) + ([k for k in got if k not in want] if numpy_reference else [])
        report.stages = [compare_stage(n, got.get(n), want.get(n), tolerance) for n in names]
        if moved is not None and not moved.ok:
            report.stages.append(rounded_stage(rounding, moved))
    else:
        final = "logits" if "logits" in want else "head_input"
        report.stages = [compare_stage(final, got, want[final], tolerance)]
        report.only_final = True
        pretty = {"onnx": "ONNX", "torchscript": "TorchScript"}.get(kind, kind)
        report.note = (f"{pretty} artifacts expose only their final output: only {final} compared, "
                       "a failure cannot be localised to a stage")
        if half:
            report.stages = [_half_stage(report.stages[0], want[final], got)]
            report.note += (f"; a float16 graph (its metadata says so) is judged as export --fp16 judges it: "
                            f"every top-1 equal and cosine >= {FP16_MIN_COSINE}; its max abs is the rounding's")
    return report


#: The :class:`~vitconv.conversion.options.ReadOptions` fields ``verify`` reads with; any other
#: (a resample, a cast, a new head, a required layout, labels) is refused, not silently dropped.
VERIFY_FIELDS = ("image_size", "num_heads", "overrides")


def _refuse_unread(options: ReadOptions) -> None:
    """A one-line error naming the fields of ``options`` that ``verify`` does not read."""
    unread = [f.name for f in fields(ReadOptions)
              if f.name not in VERIFY_FIELDS and getattr(options, f.name) != getattr(ReadOptions(), f.name)]
    if unread:
        raise BadInputError(f"verify reads with {', '.join(VERIFY_FIELDS)} only, not {', '.join(unread)}: "
                            "the reference computes the source as it is")


def _arguments(src: PathLike, converted: Any, options: ReadOptions) -> Tuple[ReadOptions, ReadOptions]:
    """How each side is read: ``(the source's, the converted file's)`` ``num_heads`` and
    ``overrides`` of ``options``, as :class:`~vitconv.conversion.options.ReadOptions`. Each goes
    to the file(s) that leave it open (a bare state dict, source or converted, records neither
    heads nor GELU; the same model has the same). Given where both files record it, it is
    refused. ONNX, TorchScript and in-memory models take none."""
    num_heads, overrides = options.num_heads, dict(options.overrides)
    if (num_heads is None and not overrides) or not isinstance(converted, (str, os.PathLike)) \
            or artifact_kind(converted) in ("onnx", "torchscript"):
        return ReadOptions(num_heads=num_heads, overrides=overrides), ReadOptions()
    given = {**overrides, **({"num_heads": num_heads} if num_heads is not None else {})}
    opened = [left_open(src), left_open(converted)]
    if ARCH in given:  # an architecture goes to the files of its layout that leave something open
        layout = f"{ARCH}:{archs.lookup(str(given[ARCH]), src).layout}"
        opened = [o if layout in o else o - {ARCH} for o in opened]
    closed = sorted(set(given) - opened[0] - opened[1])
    if closed:
        raise BadInputError(f"--num-heads/--set/--arch {', '.join(closed)}: both files record it", converted)
    src_as, conv_as = (ReadOptions(num_heads=num_heads if "num_heads" in o else None,
                                   overrides={k: v for k, v in overrides.items() if k in o}) for o in opened)
    return src_as, conv_as


def _half_stage(stage: StageResult, want: np.ndarray, got: np.ndarray) -> StageResult:
    """A float16 graph's output stage, judged by the rounded-weights rule (every top-1 equal,
    cosine >= ``FP16_MIN_COSINE``: :func:`~vitconv.verification.compare.judge_rounded_output`, as
    export judges it) instead of the float32 bound."""
    c = judge_rounded_output(got, want)
    said = f"float16 graph: top-1 {c.top1:.0%} equal, min cosine {c.cosine:.6f}"
    ok = c.ok and math.isfinite(stage.max_abs)
    return replace(stage, ok=ok, rule=said if ok else "",
                   note="" if ok else f"{said} (needs 100% and >= {FP16_MIN_COSINE})")


def rounded_stage(dtype: str, moved: Comparison) -> StageResult:
    """The stage that fails a report when the rounding to ``dtype`` moves the output past the
    rounded-weights rule (``moved``: :func:`~vitconv.verification.compare.judge_rounded_output`)."""
    return StageResult("rounded", f"output of the {dtype} weights", moved.max_abs, moved.max_rel, moved.rms,
                       moved.bound, moved.ok, moved.note)


def prove_rounded(open_exact: Callable[[], Any], open_written: Callable[[], Any], dtype: str):
    """The weights half of the rounded-weights proof, for ``verify`` and ``convert --verify``
    alike: whether each tensor of the file ``open_written()`` opens is the float32 conversion's
    (``open_exact()``) rounded to ``dtype``, bit for bit (:func:`~vitconv.verification.compare.
    check_rounded`, one tensor of each in memory at a time). Returns ``(the float32 conversion
    in the written file's architecture, run block by block, (total, changed))`` or ``(None,
    what is wrong)``; the caller verifies that model and judges the rounding's effect on the
    output (:func:`~vitconv.verification.compare.judge_rounded_output`)."""
    with open_exact() as exact, open_written() as written:
        written_cfg = written.config
        bad, changed, total = check_rounded(exact.tensors(), CanonicalTensors(written), dtype)
    if bad is not None:
        return None, bad
    return loading.StreamedModel(open_exact, written_cfg), (total, changed)


def _run_converted(model, runner, pixels: np.ndarray):
    """A canonical model's every stage (a dict), or a runtime's final output (an array)."""
    if model is None:
        return runner(pixels)
    import torch

    with torch.no_grad():
        return {k: v.detach().float().numpy() for k, v in model.forward_stages(torch.from_numpy(pixels)).items()}


def check(src: PathLike, converted: Union[PathLike, Any, None] = None, **kwargs) -> VerifyReport:
    """:func:`verify`, raising :class:`~vitconv.errors.VerificationError` (exit 3) on failure."""
    report = verify(src, converted, **kwargs)
    if not report.ok:
        where = converted if isinstance(converted, (str, os.PathLike)) else src
        raise VerificationError(report.verdict(), where)
    return report
