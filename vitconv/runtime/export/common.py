"""What every exporter shares: :func:`export_ready` (the model as exporters should see it:
the hybrid stem's weight standardisation folded into plain convolutions, so no float64 op
reaches a graph; TensorRT has no double), :func:`check_plan` (which batch sizes and
resolutions to verify), :func:`verify` and :class:`Parity` (the figures), and
:class:`ExportResult`. The driver is :func:`vitconv.runtime.export.run_export`.

Parity is judged by :mod:`vitconv.verification.compare`, as ``verify`` and ``convert --verify``
judge: the same seeded inputs (:func:`~vitconv.verification.compare.seeded_nchw`), float32
artifacts within ``tolerance * max(1, rms(reference))``, float16 ones by the rounded-weights rule
(every top-1 equal, cosine >= :data:`~vitconv.verification.compare.FP16_MIN_COSINE`).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from vitconv.errors import VerificationError
from vitconv.lazy import lazy_module
from vitconv.verification.compare import DEFAULT_TOLERANCE, Comparison, compare, judge_rounded_output, seeded_nchw

canonical_model = lazy_module("vitconv.model")  # torch

PathLike = Union[str, os.PathLike]

#: fp32 artifacts must reproduce the PyTorch logits within this x max(1, rms(logits)).
FP32_ATOL = DEFAULT_TOLERANCE
#: The example batch handed to exporters when the batch dimension is dynamic: a batch of 1
#: lets torch.export specialise the dimension to the constant 1.
EXAMPLE_BATCH = 2


@dataclass
class Check:
    """One verification input: ``batch`` images of ``size`` x ``size``."""

    batch: int
    size: int


@dataclass
class Parity:
    """Figures of one artifact on one input against the PyTorch reference."""

    batch: int
    size: int
    max_abs: float
    top1_agree: float
    min_cosine: float
    ok: bool

    @classmethod
    def of(cls, batch: int, size: int, c: Comparison) -> "Parity":
        return cls(batch, size, c.max_abs, c.top1, c.cosine, c.ok)

    def describe(self, fp16: bool) -> str:
        s = f"b{self.batch} {self.size}px max|diff| {self.max_abs:.2e}"
        if fp16:
            s += f", top-1 {self.top1_agree:.0%}, cos {self.min_cosine:.6f}"
        return s + ("" if self.ok else "  FAIL")


@dataclass
class ExportResult:
    """What one exporter wrote and how it verified."""

    kind: str
    paths: List[Path]
    export_s: float
    verify_s: float
    parity: List[Parity] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    fp16: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.parity) and all(p.ok for p in self.parity)

    def rows(self) -> List[Tuple[str, str]]:
        size = sum(p.stat().st_size for p in self.paths if p.exists())
        rows = [(self.kind, f"{self.paths[0]}" + (f" (+{len(self.paths) - 1} files)" if len(self.paths) > 1 else "")
                 + f", {size / 1e6:.2f} MB, export {self.export_s:.1f} s, verify {self.verify_s:.1f} s")]
        rows += [("", p.describe(self.fp16)) for p in self.parity]
        rows += [("", n) for n in self.notes]
        return rows


# --------------------------------------------------------------------------- model prep
def export_ready(model):
    """``model`` in eval mode or, for a hybrid, a copy of it with every ``StdConv2d`` replaced by a plain convolution whose
    weight is the standardised kernel (computed once, in float64, rounded to float32 exactly
    as the eager model does). Exported graphs then hold no float64 ops and no per-call
    weight arithmetic; the numbers are identical to the eager model's."""
    import torch
    from torch import nn

    class FoldedStdConv(nn.Conv2d):
        """TF-SAME padded conv with a pre-standardised kernel (export form of StdConv2d)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = canonical_model.tf_same_pad(x, self.kernel_size[0], self.stride[0])
            return torch.nn.functional.conv2d(x, self.weight, None, self.stride)

    if not any(isinstance(m, canonical_model.StdConv2d) for m in model.modules()):
        return model.eval()  # nothing to fold: no copy (a copy is the model's size again)
    model = copy.deepcopy(model).eval()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, canonical_model.StdConv2d):
            with torch.no_grad():
                w = mod.standardized_weight().detach().clone()
            folded = FoldedStdConv(mod.in_channels, mod.out_channels, mod.kernel_size[0],
                                   stride=mod.stride[0], bias=False)
            folded.weight = nn.Parameter(w, requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, folded)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- verification
def check_plan(image_size: int, stride: int, batch: Optional[int], dynamic_size: bool) -> List[Check]:
    """Inputs every artifact is verified on: batch 1 and 3 when the batch is dynamic (the
    export example uses 2, so both are unseen), the static batch otherwise; with dynamic
    resolution also ``image_size + stride`` and ``image_size + 3 * stride``, sizes the
    exporter never saw."""
    batches = [batch] if batch else [1, 3]
    checks = [Check(b, image_size) for b in batches]
    if dynamic_size:
        b = batch or 2
        checks += [Check(b, image_size + stride), Check(b, image_size + 3 * stride)]
    return checks


def compare_output(ref: np.ndarray, got: np.ndarray, batch: int, size: int, fp16: bool,
                   atol: float = FP32_ATOL) -> Parity:
    """fp32: max abs within ``atol * max(1, rms(ref))``; fp16: every top-1 equal and cosine >=
    ``FP16_MIN_COSINE`` (:mod:`vitconv.verification.compare`)."""
    return Parity.of(batch, size, judge_rounded_output(got, ref) if fp16 else compare(got, ref, atol))


#: ``reference(batch, size) -> logits``: the PyTorch model's output on the seeded input.
Reference = Callable[[int, int], np.ndarray]


def verify(run: Callable[[np.ndarray], np.ndarray], reference: Reference,
           checks: Sequence[Check], in_chans: int, fp16: bool = False,
           atol: float = FP32_ATOL) -> List[Parity]:
    """Run an artifact (``run``) and the reference on each check's seeded input."""
    out = []
    for c in checks:
        x = seeded_nchw(c.batch, c.size, in_chans)
        out.append(compare_output(reference(c.batch, c.size), run(x), c.batch, c.size, fp16, atol))
    return out


def raise_if_failed(result: ExportResult, path: PathLike) -> None:
    """Raise (inside the exporter's ``atomic_output``, so nothing is renamed into place) when
    any check failed; the error carries ``result`` so callers can still print the figures."""
    if not result.ok:
        figures = "; ".join(p.describe(result.fp16) for p in result.parity if not p.ok)
        err = VerificationError(f"{result.kind} export disagrees with the PyTorch model past "
                                f"tolerance ({figures}); nothing written", path)
        err.results = [result]  # type: ignore[attr-defined]
        raise err


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t0


# --------------------------------------------------------------------------- handing the model over
def take(model) -> Tuple[object, bool]:
    """``(model, owned)``: an exporter is given the module itself (the caller keeps using it)
    or a one-element list that hands it over, which this empties: the exporter then frees the
    weights (:func:`release`) once they are in its file, before its runtime loads the file,
    so the model and the loaded artifact are never in memory together."""
    if isinstance(model, list):
        return model.pop(), True
    return model, False


def release(*modules) -> None:
    """Free handed-over modules' weights in place (each parameter and buffer keeps its object,
    with no data) and give the memory back to the system. In place, because exporters leave
    references behind (onnxscript's rewriter rules keep the last graph they matched, in
    module-level objects; a traced module shares the tensors): dropping our own references
    alone would keep every weight. The trim: glibc keeps freed blocks under its mmap
    threshold (32 MB, every MLP kernel) in its heap, and the runtime's copy would come on top."""
    import torch

    with torch.no_grad():
        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                t.data = torch.empty(0, dtype=t.dtype)
    trim()


def trim() -> None:
    """Collect, and hand glibc's freed heap back to the system (see :func:`release`)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
