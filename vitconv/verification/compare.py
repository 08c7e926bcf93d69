"""The one verification vocabulary: the seeded inputs every check runs on, the one rule that
says whether two outputs agree, and the one proof of a file whose weights were rounded to
float16 or bfloat16. ``vitconv verify``, ``convert --verify`` (and so every row of ``batch``),
every exporter's parity, the streamed ONNX export's block-by-block proof and ``golden`` judge
with these functions, so two commands that look at the same bytes cannot disagree about them.

NumPy only, no torch: a conversion imports this module (the convert service verifies what it
wrote) and must not pay torch's import for it.

**Inputs** (:func:`seeded_images`): ``batch`` images, NHWC float32, uniform in [-1, 1] (the
range Google's preprocessing ``x / 127.5 - 1`` produces), from ``numpy.random.default_rng(seed)``.
NHWC because the NumPy references and the golden files are NHWC; a PyTorch model or an exported
graph takes :func:`nchw` of the same array, so every engine sees the same pixels.

**Agreement** (:func:`compare`): ``max|got - ref| <= tolerance * max(1, rms(ref))``. An absolute
bound for outputs of order one, a relative one for large activations (the residual stream grows
block by block, and float32 rounding with it). The scale is the RMS, not the max: a few outlier
channels would otherwise loosen the bound for every other element. ``max rel`` is
``max abs / rms(ref)`` (element-wise ratios explode near zero). A bound recorded as absolute
(a golden case's ``max_abs``) is the same rule with the scale fixed at 1 (``scale=1.0``).
A NaN or infinity in the output, or a shape that differs, never agrees.

**Rounded weights** (:func:`check_rounded`, :func:`judge_rounded_output`): a float16 or bfloat16
file would fail a float32 tolerance on its rounding alone, and a tolerance loose enough for the
rounding would hide a wrong GELU. Its proof is exact instead: every tensor must be the float32
conversion's tensor rounded to that type, bit for bit (and the float32 conversion is verified at
the usual tolerance). What the rounding does to the output is judged by one rule, every top-1
class equal and the cosine of each output row at least :data:`FP16_MIN_COSINE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Tuple

import numpy as np

from vitconv.formats.base import numpy_dtype

#: A stage agrees when ``max abs <= DEFAULT_TOLERANCE * max(1, rms(reference))``.
DEFAULT_TOLERANCE = 1e-4
DEFAULT_SEED = 0
#: Rounded (float16/bfloat16) weights: every top-1 equal and each output row's cosine at least this.
FP16_MIN_COSINE = 0.9999
#: The narrower float types a weights file may hold the float32 weights rounded to.
ROUNDED_DTYPES = ("float16", "bfloat16")


# --------------------------------------------------------------------------- inputs
def seeded_images(batch: int, image_size: int, channels: int = 3, seed: int = DEFAULT_SEED) -> np.ndarray:
    """``(batch, size, size, channels)`` float32 NHWC, uniform in [-1, 1], from
    ``numpy.random.default_rng(seed)``: the inputs of every check vitconv runs."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(batch, image_size, image_size, channels)).astype(np.float32)


def nchw(images: np.ndarray) -> np.ndarray:
    """NHWC images as the contiguous NCHW array a PyTorch model or an exported graph takes."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))


def seeded_nchw(batch: int, image_size: int, channels: int = 3, seed: int = DEFAULT_SEED) -> np.ndarray:
    """:func:`seeded_images`, NCHW: the same pixels, for the torch and ONNX side."""
    return nchw(seeded_images(batch, image_size, channels, seed))


# --------------------------------------------------------------------------- agreement
@dataclass(frozen=True)
class Comparison:
    """How one output agrees with its reference. ``max_rel`` is ``max_abs / rms``; ``bound`` the
    max abs allowed; ``note`` says why it failed when the figures cannot (a shape, a NaN).
    ``top1`` and ``cosine`` (the fraction of rows whose argmax agrees, the smallest row cosine)
    are filled by :func:`judge_rounded_output` and :func:`compare` alike (NaN where undefined)."""

    max_abs: float
    max_rel: float
    rms: float
    bound: float
    ok: bool
    note: str = ""
    top1: float = math.nan
    cosine: float = math.nan


def rms(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.sqrt(np.mean(a ** 2))) if a.size else 0.0


def cosine(got: np.ndarray, ref: np.ndarray, rows: bool = True) -> float:
    """The smallest cosine similarity of ``got`` and ``ref`` along the last axis (``rows``), or
    of the two whole arrays."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if not rows:
        got, ref = got.reshape(1, -1), ref.reshape(1, -1)
    if not got.size:
        return 1.0
    with np.errstate(invalid="ignore", over="ignore"):  # a NaN or infinity: a NaN cosine, which fails
        denom = np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)
        return float(np.min((got * ref).sum(-1) / np.maximum(denom, 1e-30)))


def _mismatch(got: Optional[np.ndarray], ref: Optional[np.ndarray], bound: float) -> Optional[Comparison]:
    """The failed comparison of a missing output or of two shapes, or ``None``."""
    if got is None or ref is None:
        return Comparison(math.inf, math.inf, math.nan, bound, False,
                          f"stage missing from the {'converted model' if got is None else 'reference'}")
    if np.shape(got) != np.shape(ref):
        return Comparison(math.inf, math.inf, math.nan, bound, False,
                          f"shape {tuple(np.shape(got))} != reference {tuple(np.shape(ref))}")
    return None


def compare(got: Optional[np.ndarray], ref: Optional[np.ndarray], tolerance: float = DEFAULT_TOLERANCE,
            scale: Optional[float] = None) -> Comparison:
    """``got`` against ``ref``: agrees when ``max abs <= tolerance * max(1, rms(ref))``, or
    ``tolerance * scale`` when ``scale`` is given (``1.0``: an absolute bound). A missing array
    (``None``), a shape that differs or a non-finite value in ``got`` fails."""
    bad = _mismatch(got, ref, tolerance)
    if bad is not None:
        return bad
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    r = rms(ref)
    max_abs = float(np.abs(got - ref).max()) if got.size else 0.0
    if not np.isfinite(got).all():
        max_abs = math.inf
    bound = tolerance * (max(1.0, r) if scale is None else scale)
    max_rel = max_abs / r if r > 0 else (0.0 if max_abs == 0 else math.inf)
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean()) if got.ndim and got.size else math.nan
    return Comparison(max_abs, max_rel, r, bound, max_abs <= bound, "", top1,
                      cosine(got, ref) if got.size else math.nan)


def judge_rounded_output(got: Optional[np.ndarray], ref: Optional[np.ndarray], rows: bool = True,
                         dtype: str = "float16") -> Comparison:
    """The output of rounded weights or of a float16 graph, ``got``, against the float32 model's,
    ``ref``. float16: every row's top-1 equal and each row's cosine at least
    :data:`FP16_MIN_COSINE` (``rows=False``: an activation, not logits; its whole cosine, no
    top-1). bfloat16 keeps 8 bits of mantissa to float16's 11: its rounding alone takes a
    tiny seeded model's logits to cosine 0.99984 (``tests/test_convert_verify.py``'s), so its
    figures are reported and only a non-finite output fails (the exact weight check is its
    proof). ``max abs`` is reported, not bounded (it is the rounding's); ``bound`` is inf."""
    bad = _mismatch(got, ref, math.inf)
    if bad is not None:
        return bad
    c = compare(got, ref, math.inf)
    cos = cosine(got, ref, rows)
    top1 = c.top1 if rows else 1.0
    ok = math.isfinite(c.max_abs) and (dtype != "float16" or (top1 == 1.0 and cos >= FP16_MIN_COSINE))
    note = "" if ok else (f"top-1 {top1:.0%} equal, min cosine {cos:.6f} (needs 100% and >= {FP16_MIN_COSINE})"
                          if rows else f"cosine {cos:.6f} (needs >= {FP16_MIN_COSINE})")
    return Comparison(c.max_abs, c.max_rel, c.rms, math.inf, ok, note, top1 if rows else math.nan, cos)


# --------------------------------------------------------------------------- rounded weights
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


def rounding_note(dtype: str, total: int, changed: int, moved: Comparison) -> str:
    """What the rounding did: ``total`` tensors rounded bit for bit (``changed`` of them moved),
    and how far it moves the output (``moved``: :func:`judge_rounded_output` of the rounded
    model's output against the float32 model's on the same images)."""
    return (f"the {total} tensors written as {dtype} are the verified float32 weights rounded to {dtype}, "
            f"bit for bit ({changed} changed by it); the stages are the float32 model's. The "
            f"rounding alone moves the output by max abs {moved.max_abs:.3g} "
            f"(cosine {moved.cosine:.7f}) on the same images")


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
