"""Prove a conversion: run the source through a reference and the converted model on the same
seeded images, stage by stage. The reference for Google's ``.npz`` is the independent NumPy
implementation of vit_jax (:mod:`vitconv.reference`, every stage), for big_vision's that of
big_vision's models/vit.py (:mod:`vitconv.big_vision_reference`); for Hugging Face, timm, the
original DINOv2, OpenAI CLIP and OpenCLIP sources it is that library's own model
(:mod:`vitconv.library_reference`: the embedding, each block's output, the final output).

Why stage by stage: a wrong logit says *that* a conversion is broken; the first stage that
leaves tolerance says *where* (a swapped head shows up in that block's attention, a wrong
activation in the first MLP, a mis-aligned position-table resize in the patch embedding).
Stages are compared in execution order and the first one past tolerance is named in words.

Tolerance (default :data:`DEFAULT_TOLERANCE` = 1e-4): a stage passes when
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
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import archs
from .config import SHAPE_FIELDS, ViTConfig
from .errors import BadInputError, VerificationError, first_line
from .export.common import FP16_MIN_COSINE, compare as compare_artifact
from .formats.base import numpy_dtype
from .big_vision_reference import BigVisionReference
from .library_reference import LibraryReference, open_reference
from .pipeline import ARCH, left_open, open_checkpoint
from .reference import GoogleViTReference
from .runtimes import OnnxRunner, TorchRunner, artifact_kind, load_torchscript, require_input

PathLike = Union[str, os.PathLike]

DEFAULT_TOLERANCE = 1e-4
DEFAULT_BATCH = 2
DEFAULT_SEED = 0


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
    what = describe_stage(name)
    if got is None or ref is None:
        missing = "converted model" if got is None else "reference"
        return StageResult(name, what, math.inf, math.inf, math.nan, tolerance, False,
                           f"stage missing from the {missing}")
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return StageResult(name, what, math.inf, math.inf, math.nan, tolerance, False,
                           f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    rms = float(np.sqrt(np.mean(ref ** 2))) if ref.size else 0.0
    diff = np.abs(got - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(got).all():
        max_abs = math.inf
    bound = tolerance * max(1.0, rms)
    max_rel = max_abs / rms if rms > 0 else (0.0 if max_abs == 0 else math.inf)
    return StageResult(name, what, max_abs, max_rel, rms, bound, max_abs <= bound)


def seeded_images(batch: int, image_size: int, channels: int = 3, seed: int = DEFAULT_SEED) -> np.ndarray:
    """``(batch, size, size, channels)`` float32 NHWC, uniform in [-1, 1] (the range Google's
    input pipeline feeds), from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(batch, image_size, image_size, channels)).astype(np.float32)


# --------------------------------------------------------------------------- rounded weights
#: The narrower float types a weights file may hold the float32 weights rounded to.
ROUNDED_DTYPES = ("float16", "bfloat16")


def held_exactly(arrays: Iterable[np.ndarray]) -> Optional[str]:
    """The one narrower float type (float16 or bfloat16) that holds every array's values
    exactly, or ``None``: float32 values, or values both hold (then rounding changes nothing).
    Trained float32 weights fail both on the first tensor; a file written ``--dtype float16``
    or ``bfloat16`` (read back widened) passes one."""
    left = list(ROUNDED_DTYPES)
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        left = [d for d in left if np.array_equal(a.astype(numpy_dtype(d)).astype(np.float32), a, equal_nan=True)]
        if not left:
            return None
    return left[0] if len(left) == 1 else None


def check_rounded(exact: Iterable[Tuple[str, np.ndarray]], written: Mapping[str, np.ndarray],
                  dtype: str) -> Tuple[Optional[str], int, int]:
    """Whether each ``written`` tensor is, bit for bit, the ``exact`` (float32) tensor of the
    same name rounded to ``dtype`` (read back as ``dtype`` or widened to float32): the first
    that is not, in words, or ``None``; how many the rounding changed; how many there are.
    ``exact`` is streamed (one tensor at a time)."""
    want, changed, seen = numpy_dtype(dtype), 0, set()
    for name, a in exact:
        seen.add(name)
        got = written.get(name)
        rounded = a.astype(want).astype(np.float32)
        if (got is None or got.dtype not in (want, np.float32) or got.shape != a.shape
                or got.astype(np.float32).tobytes() != rounded.tobytes()):
            return f"{name}: the written tensor is not the float32 weight rounded to {dtype}", changed, len(seen)
        changed += rounded.tobytes() != a.astype(np.float32).tobytes()
    extra = sorted(set(written) - seen)
    if extra:
        return f"{extra[0]}: written, but not a tensor of the source's conversion", changed, len(seen)
    return None, changed, len(seen)


def rounding_note(dtype: str, total: int, changed: int, full: np.ndarray, moved: np.ndarray) -> str:
    """How far the rounding alone moves the output: the float32 model's ``full`` output
    against the rounded model's ``moved`` on the same images (max abs and cosine)."""
    full, moved = np.asarray(full, np.float64), np.asarray(moved, np.float64)
    cos = float(np.min((full * moved).sum(-1) / np.maximum(
        np.linalg.norm(full, axis=-1) * np.linalg.norm(moved, axis=-1), 1e-30)))
    return (f"the {total} tensors written as {dtype} are the verified float32 weights rounded to {dtype}, "
            f"bit for bit ({changed} changed by it); the stages are the float32 model's. The "
            f"rounding alone moves the output by max abs {float(np.abs(full - moved).max()):.3g} "
            f"(cosine {cos:.7f}) on the same images")


# --------------------------------------------------------------------------- running artifacts
def stored_dtypes(source) -> str:
    """The floating-point dtype(s) a source's weights are stored in (``bfloat16``;
    ``bfloat16, float32``), from headers alone."""
    kinds = {source.stored_dtype(k) for k in source.keys()}
    return ", ".join(sorted(k for k in kinds if "float" in k)) or ", ".join(sorted(kinds))


def _open_reference(src: PathLike, dtype) -> GoogleViTReference:
    p = Path(src)
    if not p.exists():
        raise BadInputError("no such file", p)
    try:
        return GoogleViTReference.from_npz(p, dtype=dtype)
    except (OSError, zipfile.BadZipFile) as e:
        raise BadInputError(f"not a readable .npz ({first_line(e)})", p) from None
    except (KeyError, ValueError) as e:
        raise BadInputError(f"not a Google ViT checkpoint the reference understands "
                            f"({type(e).__name__}: {e})", p) from None


def reference_for(src: PathLike, ckpt, reference_dtype=np.float64):
    """The reference for ``src`` (opened as ``ckpt``): the NumPy forward of Google's ``vit_jax``
    or of big_vision for their ``.npz`` files, else the source library's own model."""
    if ckpt.layout.name == "google":
        return _open_reference(src, reference_dtype)
    if ckpt.layout.name == "big_vision":
        return BigVisionReference.from_npz(src, dtype=reference_dtype)
    return open_reference(src, ckpt)


# --------------------------------------------------------------------------- the entry point
def verify(src: PathLike, converted: Union[PathLike, Any, None] = None, *,
           tolerance: float = DEFAULT_TOLERANCE, batch: int = DEFAULT_BATCH, seed: int = DEFAULT_SEED,
           image_size: Optional[int] = None, inputs: Optional[np.ndarray] = None,
           reference_dtype=np.float64, num_heads: Optional[int] = None,
           overrides: Optional[Dict[str, Any]] = None) -> VerifyReport:
    """Compare ``src`` through its reference (Google ``.npz``: the NumPy reference; a
    library's layout: the library's model) with ``converted``.

    ``converted``: ``None`` (convert ``src`` now, at ``image_size`` if given), a path
    (vitconv ``.pt``/``.safetensors``, ``.onnx``, TorchScript), or an in-memory model
    (a canonical ``VisionTransformer`` is compared stage by stage; any other module on its
    output only). ``inputs`` (NHWC float) replaces the seeded images. ``num_heads`` and
    ``overrides`` say what a bare state dict does not record, as for ``convert`` (the library
    reference is built with them); each goes to whichever of the two files leaves it open (a
    bare converted file too), and is refused when both record it.
    Returns the report; it does not raise on disagreement (see :func:`check`)."""
    if not (tolerance > 0):
        raise BadInputError(f"tolerance must be positive, got {tolerance}")
    if batch <= 0:
        raise BadInputError(f"batch must be positive, got {batch}")
    if isinstance(converted, (str, os.PathLike)):  # before any work on the source
        require_input(Path(converted))
    (src_heads, src_set), (conv_heads, conv_set) = _arguments(src, converted, num_heads, dict(overrides or {}))
    from .checkpoint import StreamedModel  # torch

    with open_checkpoint(src, num_heads=src_heads, overrides=src_set) as source:  # headers only
        scfg = source.config
        semantics = {f.name: {"value": getattr(source.source_config, f.name),
                              "from": source.semantics.sources[f.name]}
                     for f in fields(ViTConfig) if f.name not in SHAPE_FIELDS}
        read_as = source.semantics.arch
        stored = stored_dtypes(source.source)
    model, runner, kind, label = None, None, "canonical", "in-memory model"
    owned = True  # opened here, so released here before the reference is built
    if converted is None:
        model = StreamedModel(lambda: open_checkpoint(src, image_size=image_size, num_heads=src_heads,
                                                      overrides=src_set))
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
            model = StreamedModel(lambda: open_checkpoint(converted, num_heads=conv_heads, overrides=conv_set))
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
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    # A weights file holding float16 or bfloat16 values: proven as `convert --dtype --verify`
    # proves it (each tensor the float32 conversion's, rounded, bit for bit; the float32 model
    # against the reference), with how far the rounding moves the output said, never hidden
    # behind a looser tolerance.
    rounding = None  # a file's (an in-memory model, a StreamedModel too, is what it computes)
    if isinstance(model, StreamedModel) and isinstance(converted, (str, os.PathLike)):
        rounding = held_exactly(t for _, t in model.tensors())
    written_size = model.config.image_size if rounding else None
    # The converted model runs first and is released; only then is the reference built (a
    # float64 NumPy copy of the weights, or the library's model): the two are never held at once.
    got = _run_converted(model, runner, nchw)
    half = bool(getattr(runner, "half", False))
    if owned:
        model = runner = None
        gc.collect()
    report = VerifyReport(source=os.fspath(src), converted=label, kind=kind, image_size=int(size),
                          batch=int(images.shape[0]), seed=used_seed, tolerance=float(tolerance),
                          reference_dtype=np.dtype(reference_dtype).name, semantics=semantics, arch=read_as)
    if rounding is not None:
        got, said = _float32_twin(src, converted, rounding, written_size, nchw, got,
                                  (src_heads, src_set), (conv_heads, conv_set))
        if got is None:  # a tensor is not the float32 one rounded: no stage is worth running
            report.stages = [StageResult("weights", f"weights rounded to {rounding}", math.inf, math.inf,
                                         math.nan, tolerance, False, said)]
            return report
        report.note, report.kind = said, f"{kind}, {rounding} weights"
    with open_checkpoint(src, num_heads=src_heads, overrides=src_set) as source:  # the layout decides the reference
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
    else:
        final = "logits" if "logits" in want else "head_input"
        report.stages = [compare_stage(final, got, want[final], tolerance)]
        report.only_final = True
        pretty = {"onnx": "ONNX", "torchscript": "TorchScript"}.get(kind, kind)
        report.note = (f"{pretty} artifacts expose only their final output: only {final} compared, "
                       "a failure cannot be localised to a stage")
        if half:
            report.stages = [_half_stage(report.stages[0], want[final], got, size)]
            report.note += (f"; a float16 graph (its metadata says so) is judged as export --fp16 judges it: "
                            f"every top-1 equal and cosine >= {FP16_MIN_COSINE}; its max abs is the rounding's")
    return report


def _arguments(src: PathLike, converted: Any, num_heads: Optional[int], overrides: Dict[str, Any]):
    """``((num_heads, overrides) for the source, (the same) for the converted file)``: each goes
    to the file(s) that leave it open (a bare state dict, source or converted, records neither
    heads nor GELU; the same model has the same). Given where both files record it, it is
    refused. ONNX, TorchScript and in-memory models take none."""
    if (num_heads is None and not overrides) or not isinstance(converted, (str, os.PathLike)) \
            or artifact_kind(converted) in ("onnx", "torchscript"):
        return (num_heads, overrides), (None, {})
    given = {**overrides, **({"num_heads": num_heads} if num_heads is not None else {})}
    opened = [left_open(src), left_open(converted)]
    if ARCH in given:  # an architecture goes to the files of its layout that leave something open
        layout = f"{ARCH}:{archs.lookup(str(given[ARCH]), src).layout}"
        opened = [o if layout in o else o - {ARCH} for o in opened]
    closed = sorted(set(given) - opened[0] - opened[1])
    if closed:
        raise BadInputError(f"--num-heads/--set/--arch {', '.join(closed)}: both files record it", converted)
    return tuple((num_heads if "num_heads" in o else None, {k: v for k, v in overrides.items() if k in o})
                 for o in opened)


def _half_stage(stage: StageResult, want: np.ndarray, got: np.ndarray, size: int) -> StageResult:
    """A float16 graph's output stage, judged by top-1 and cosine (:func:`~vitconv.export.
    common.compare`, export's own rule) instead of the float32 bound."""
    p = compare_artifact(want, got, len(got), size, fp16=True)
    said = f"float16 graph: top-1 {p.top1_agree:.0%} equal, min cosine {p.min_cosine:.6f}"
    ok = p.ok and math.isfinite(stage.max_abs)
    return replace(stage, ok=ok, rule=said if ok else "",
                   note="" if ok else f"{said} (needs 100% and >= {FP16_MIN_COSINE})")


def _float32_twin(src: PathLike, converted: PathLike, dtype: str, size: int, nchw: np.ndarray,
                  rounded: Dict[str, np.ndarray], src_args: Tuple[Optional[int], Dict[str, Any]],
                  conv_args: Tuple[Optional[int], Dict[str, Any]]):
    """For a file of ``dtype`` weights whose model gave the stages ``rounded``: check each of its
    tensors is the source's float32 conversion (at ``size``) rounded, bit for bit, then run
    that float32 conversion in the file's architecture. Returns its stages and the note saying
    how far the rounding alone moves the output, or ``(None, what is wrong)``. One tensor of
    each is in memory at a time while checking, one block's weights while running."""
    from .checkpoint import StreamedModel  # torch

    opened = dict(image_size=size, num_heads=src_args[0], overrides=src_args[1])
    with open_checkpoint(src, **opened) as exact, \
            open_checkpoint(converted, num_heads=conv_args[0], overrides=conv_args[1]) as written:
        written_cfg = written.config
        bad, changed, total = check_rounded(exact.tensors(), CanonicalTensors(written), dtype)
    if bad is not None:
        return None, bad
    got = _run_converted(StreamedModel(lambda: open_checkpoint(src, **opened), written_cfg), None, nchw)
    final = "logits" if "logits" in got else "head_input"
    return got, rounding_note(dtype, total, changed, got[final], rounded[final])


class CanonicalTensors(Mapping):
    """An open checkpoint's canonical tensors as a mapping that reads each when asked."""

    def __init__(self, ckpt) -> None:
        self._ckpt, self._names = ckpt, [s.name for s in ckpt.specs()]
        self._known = set(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return dict(self._ckpt.tensors(order=[name]))[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _run_converted(model, runner, nchw: np.ndarray):
    """A canonical model's every stage (a dict), or a runtime's final output (an array)."""
    if model is None:
        return runner(nchw)
    import torch

    with torch.no_grad():
        return {k: v.detach().float().numpy() for k, v in model.forward_stages(torch.from_numpy(nchw)).items()}


def check(src: PathLike, converted: Union[PathLike, Any, None] = None, **kwargs) -> VerifyReport:
    """:func:`verify`, raising :class:`~vitconv.errors.VerificationError` (exit 3) on failure."""
    report = verify(src, converted, **kwargs)
    if not report.ok:
        where = converted if isinstance(converted, (str, os.PathLike)) else src
        raise VerificationError(report.verdict(), where)
    return report
