"""How a checkpoint is read and how a conversion is written, as one frozen object.

Why: the same dozen choices (``--image-size``, ``--num-heads``, ``--set`` ...) travel from a
command's flags, a batch manifest's row or a keyword call through reading, writing and
verifying. Held in one immutable value they are built once, where they are given, and handed
on whole; a variant is ``dataclasses.replace(options, image_size=384)``, and nothing on the
way can change what the caller asked for. :class:`ReadOptions` is what
:func:`vitconv.conversion.pipeline.open_checkpoint` and each side of ``verify`` read with;
:class:`ConvertOptions` adds what :func:`vitconv.conversion.pipeline.convert` and the convert
service (:mod:`vitconv.conversion.service`) write with. Torch-free.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Tuple, Union

from vitconv.formats.provenance import Provenance
from vitconv.formats.safetensors_stream import DEFAULT_SHARD_BYTES


def _frozen(options: object, name: str, value: object) -> None:
    """Set a field of a frozen dataclass in its ``__post_init__`` (its normal form)."""
    object.__setattr__(options, name, value)


@dataclass(frozen=True)
class ReadOptions:
    """How a checkpoint is read (see :func:`vitconv.conversion.pipeline.open_checkpoint`).

    ``overrides`` (``--set``, and its key ``arch`` for ``--arch``) is held as a read-only
    mapping; ``require_layout`` as a tuple of layout names; ``labels`` as a tuple of class
    names (a list is held as one), or the file or name :func:`vitconv.runtime.labels.load_labels`
    reads (``imagenet-1k``)."""

    image_size: Optional[int] = None
    patch_size: Optional[int] = None
    num_heads: Optional[int] = None
    overrides: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    require_layout: Tuple[str, ...] = ()
    dtype: Optional[str] = None
    labels: Union[str, "os.PathLike[str]", Tuple[str, ...], None] = None
    num_classes: Optional[int] = None

    def __post_init__(self) -> None:
        _frozen(self, "overrides", MappingProxyType(dict(self.overrides or {})))
        layouts = self.require_layout
        _frozen(self, "require_layout", (layouts,) if isinstance(layouts, str) else tuple(layouts or ()))
        if isinstance(self.labels, list):  # anything else is load_labels' to judge
            _frozen(self, "labels", tuple(self.labels))

    def reading(self) -> "ReadOptions":
        """Only the read-side fields (what a read of the same source with these options needs)."""
        return ReadOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ReadOptions)})


@dataclass(frozen=True)
class ConvertOptions(ReadOptions):
    """How a conversion reads its source (the :class:`ReadOptions` fields) and writes its output.

    ``to``: the target layout (default from the destination's name); ``shard_bytes``: the most a
    ``.safetensors`` file holds before it is sharded; ``hash_source=False`` skips the source's
    SHA-256 (the outputs then record none: ``--no-source-hash``), and ``source_sha256`` gives it
    when already known; ``metadata``: more provenance
    (a :class:`~vitconv.formats.provenance.Provenance`, or strings, held as a Provenance);
    ``verify``: nothing is renamed into place unless the written files, read back, compute what
    the source computes; ``command``: the command line recorded in a model card."""

    to: Optional[str] = None
    shard_bytes: Optional[int] = DEFAULT_SHARD_BYTES
    hash_source: bool = True
    metadata: Provenance = Provenance()
    source_sha256: Optional[str] = None
    verify: bool = False
    command: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _frozen(self, "metadata", Provenance.of(self.metadata))

    @classmethod
    def of(cls, read: ReadOptions, **changes: object) -> "ConvertOptions":
        """A conversion that reads as ``read`` does, but for ``changes`` (any field: the write's, or a
        read-side one such as ``dtype``)."""
        return cls(**{**{f.name: getattr(read, f.name) for f in dataclasses.fields(ReadOptions)}, **changes})


__all__ = ["ReadOptions", "ConvertOptions"]
