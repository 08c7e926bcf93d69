"""Which reference proves a layout's conversion: one table, layout name -> how its reference is opened.

Why a table: ``verify`` (:func:`vitconv.verification.verify.reference_for`) and ``golden`` both
ask the same two questions of a source's layout, whether an independent reference exists and
how it is opened. Answered here once, by data, neither branches on layout names, and a new
reference for a layout is one row of :data:`REFERENCES`.

Each opener takes ``(src, ckpt, dtype)``: the source's path, the source opened
(:class:`~vitconv.conversion.pipeline.Checkpoint`, whose layout chose the row) and the dtype the
reference computes in. The NumPy references of Google's and big_vision's ``.npz`` honour
``dtype`` (float64 by default); a library's own model runs in float32 whatever is asked
(:class:`~vitconv.verification.references.library.LibraryReference`).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Union

import numpy as np

from vitconv.conversion.pipeline import Checkpoint
from vitconv.errors import BadInputError, first_line
from vitconv.verification.references.big_vision_numpy import BigVisionReference
from vitconv.verification.references.google_numpy import GoogleViTReference
from vitconv.verification.references.library import LAYOUTS as LIBRARY_LAYOUTS
from vitconv.verification.references.library import LibraryReference, open_reference

PathLike = Union[str, os.PathLike]
#: ``(src, ckpt, dtype) -> reference``: anything with ``forward_stages(images_nhwc)``,
#: ``image_size``, ``description`` and ``reference_dtype``.
Opener = Callable[[PathLike, Checkpoint, Any], Any]


def google_npz(src: PathLike, ckpt: Checkpoint, dtype: Any = np.float64) -> GoogleViTReference:
    """The NumPy forward of ``vit_jax`` over Google's ``.npz``; a file it cannot read is a one-line
    :class:`~vitconv.errors.BadInputError` naming it."""
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


def big_vision_npz(src: PathLike, ckpt: Checkpoint, dtype: Any = np.float64) -> BigVisionReference:
    """The NumPy forward of big_vision's ``models/vit.py`` over its ``.npz``."""
    return BigVisionReference.from_npz(src, dtype=dtype)


def library_model(src: PathLike, ckpt: Checkpoint, dtype: Any = np.float64) -> LibraryReference:
    """The source library's own model (run in float32: ``dtype`` is not its to choose)."""
    return open_reference(src, ckpt)


#: Layout name -> how its reference is opened.
REFERENCES: Mapping[str, Opener] = MappingProxyType({
    "google": google_npz,
    "big_vision": big_vision_npz,
    **{name: library_model for name in LIBRARY_LAYOUTS},
})


def has_reference(layout: str) -> bool:
    """Whether the layout named ``layout`` has a reference (``golden`` runs it only then)."""
    return layout in REFERENCES


def opener(layout: str) -> Opener:
    """How the reference of the layout named ``layout`` is opened. A layout without one gets the
    library's opener, whose refusal names every layout that has one (a one-line error)."""
    return REFERENCES.get(layout, library_model)


__all__ = ["REFERENCES", "Opener", "has_reference", "opener", "google_npz", "big_vision_npz", "library_model"]
