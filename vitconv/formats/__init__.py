"""Bytes <-> ``{name: array}``. Readers hand out tensors on demand and know nothing of models.

Every reader is a :class:`TensorSource`: ``keys()``, ``shape(key)`` (cheap, no data read
where the format allows) and ``get(key)`` (reads that one tensor). Conversion streams
through it so a checkpoint is never held twice. Writers take one tensor at a time, in an
order declared up front by :class:`TensorSpec` s.
"""

from __future__ import annotations

from vitconv.formats.atomic import atomic_directory, atomic_output
from vitconv.formats.base import DictSource, TensorSource, TensorSpec, sha256_file
from vitconv.formats.open import open_source, sniff

__all__ = ["TensorSource", "TensorSpec", "DictSource", "open_source", "sniff", "sha256_file",
           "atomic_output", "atomic_directory"]
