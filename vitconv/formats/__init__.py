"""Bytes <-> ``{name: array}``. Readers hand out tensors on demand and know nothing of models.

Every reader is a :class:`TensorSource`: ``keys()``, ``shape(key)`` (cheap, no data read
where the format allows) and ``get(key)`` (reads that one tensor). Conversion streams
through it so a checkpoint is never held twice.
"""

from __future__ import annotations

from .base import TensorSource, DictSource, open_source, sha256_file
from .atomic import atomic_output

__all__ = ["TensorSource", "DictSource", "open_source", "sha256_file", "atomic_output"]
