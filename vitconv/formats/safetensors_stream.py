"""A ``.safetensors`` writer that takes one tensor at a time, optionally sharded.

``safetensors.torch.save_file`` needs every tensor in memory at once and copies each
into a ``bytes`` object before writing, so a converter using it holds the model twice.
The format does not need that: its header lists each tensor's dtype, shape and byte
range, and those follow from the shapes alone. So the header is computed first from
``(name, dtype, shape)`` specs, written, and each tensor's bytes are appended as the
caller produces them, in header order; memory holds one tensor at a time.

Files are written under temporary names and renamed only when every tensor has been
written (:func:`~vitconv.formats.atomic.atomic_output`), so a failure leaves nothing.
Above ``shard_bytes`` the output is split Hugging Face's way: ``NAME-00001-of-0000K
.safetensors`` files plus ``NAME.safetensors.index.json`` mapping each tensor to its file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import OutputError
from .atomic import atomic_output
from .writeback import Writeback

#: numpy dtype -> safetensors dtype tag (the formats' common ground; bf16 has no numpy dtype).
DTYPE_TAGS: Dict[np.dtype, str] = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know about a tensor before its data exists."""

    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def check(self, name: str, array: np.ndarray, path: os.PathLike | str) -> np.ndarray:
        """``array`` as an ndarray if it is the tensor this spec promised (name, dtype,
        shape); otherwise :class:`OutputError`. Streaming writers lay out bytes from specs
        before the data exists, so a producer that disagrees must fail here, not leave a
        file whose header or pickle lies about what follows."""
        a = np.asarray(array)
        if name != self.name or a.dtype != np.dtype(self.dtype) or tuple(a.shape) != tuple(self.shape):
            raise OutputError(f"tensor {name!r} {a.dtype}{tuple(a.shape)} does not match the declared "
                              f"{self.name!r} {np.dtype(self.dtype)}{tuple(self.shape)}", path)
        return a


def safetensors_order(specs: Sequence[TensorSpec]) -> List[TensorSpec]:
    """The order ``safetensors``' own writer lays tensors out in: widest dtype first, then
    by name. Writing in this order makes the data section byte-identical to ``save_file``'s."""
    return sorted(specs, key=lambda s: (-np.dtype(s.dtype).itemsize, s.name))


def build_header(specs: Sequence[TensorSpec], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """Length prefix + JSON header for ``specs`` laid out back to back in the given order,
    padded with spaces to a multiple of 8 bytes as the reference writer does."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        dt = np.dtype(s.dtype)
        if dt not in DTYPE_TAGS:
            raise ValueError(f"{s.name}: dtype {dt} has no safetensors equivalent")
        end = offset + s.nbytes
        header[s.name] = {"dtype": DTYPE_TAGS[dt], "shape": [int(d) for d in s.shape],
                          "data_offsets": [offset, end]}
        offset = end
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * ((8 - len(body) % 8) % 8)
    return len(body).to_bytes(8, "little") + body


def plan_shards(specs: Sequence[TensorSpec], shard_bytes: Optional[int]) -> List[List[TensorSpec]]:
    """Split ``specs`` (kept in order) into consecutive groups of at most ``shard_bytes``
    of data; a tensor larger than the limit gets a shard of its own. None: one file."""
    if not shard_bytes or sum(s.nbytes for s in specs) <= shard_bytes:
        return [list(specs)]
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_names(path: Path, count: int) -> List[Path]:
    """Hugging Face's shard names: ``model.safetensors`` -> ``model-00001-of-00002.safetensors``."""
    stem = path.name[: -len(".safetensors")] if path.name.endswith(".safetensors") else path.name
    return [path.with_name(f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors") for i in range(count)]


def index_path(path: Path) -> Path:
    return path.with_name(path.name + ".index.json")


class SafetensorsStreamWriter:
    """Write tensors one at a time into ``path`` (or its shards), in the order of ``specs``.

    >>> with SafetensorsStreamWriter(path, specs, {"format": "pt"}) as w:   # doctest: +SKIP
    ...     for name, array in produce():
    ...         w.write(name, array)

    ``write`` checks each tensor against its spec (name, dtype, shape, in order), so a
    producer that disagrees with the header it promised fails loudly instead of writing
    a file whose offsets lie. ``outputs`` lists the final paths (index last when sharded).
    """

    def __init__(self, path: os.PathLike | str, specs: Sequence[TensorSpec],
                 metadata: Optional[Mapping[str, str]] = None, shard_bytes: Optional[int] = None):
        self.path = Path(path)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in specs")
        self.metadata = dict(metadata or {})
        self.shards = plan_shards(self.specs, shard_bytes)
        self.sharded = len(self.shards) > 1
        self.files = shard_names(self.path, len(self.shards)) if self.sharded else [self.path]
        self.outputs: List[Path] = list(self.files) + ([index_path(self.path)] if self.sharded else [])
        self.total_bytes = sum(s.nbytes for s in self.specs)
        self._stack = contextlib.ExitStack()
        self._queue: List[Tuple[int, TensorSpec]] = [(i, s) for i, group in enumerate(self.shards)
                                                     for s in group]
        self._pos = 0
        self._handles: List = []
        self._writeback: List[Writeback] = []
        self._index_tmp: Optional[Path] = None

    # -- context management: temporaries renamed into place only on success -----------
    def __enter__(self) -> "SafetensorsStreamWriter":
        try:
            if self.sharded:  # entered first, so renamed last: the index appears only when all shards have
                self._index_tmp = self._stack.enter_context(atomic_output(index_path(self.path)))
            for final, group in zip(self.files, self.shards):
                tmp = self._stack.enter_context(atomic_output(final))
                f = self._stack.enter_context(open(tmp, "wb"))
                f.write(build_header(group, self.metadata))
                self._handles.append(f)
                self._writeback.append(Writeback(f))
        except BaseException:
            # Unwind *with* the exception: atomic_output then deletes its temporary. A plain
            # close() would exit it as a success and rename a partial file into place.
            if not self._stack.__exit__(*sys.exc_info()):
                raise
        return self

    def write(self, name: str, array: np.ndarray) -> None:
        if self._pos >= len(self._queue):
            raise OutputError(f"unexpected extra tensor {name!r}", self.path)
        shard, spec = self._queue[self._pos]
        a = spec.check(name, array, self.path)
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
            a = a.astype(a.dtype.newbyteorder("<"))  # safetensors is little-endian
        a = np.ascontiguousarray(a)
        self._handles[shard].write(memoryview(a.reshape(-1)).cast("B"))
        self._writeback[shard].advance()
        self._pos += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._pos != len(self._queue):
            missing = [s.name for _, s in self._queue[self._pos:]]
            exc = OutputError(f"{len(missing)} tensor(s) never written (first: {missing[0]!r})", self.path)
            self._stack.__exit__(type(exc), exc, None)
            raise exc
        if exc_type is None and self.sharded:
            self._write_index()
        self._stack.__exit__(exc_type, exc, tb)

    def _write_index(self) -> None:
        weight_map = {s.name: self.files[i].name for i, group in enumerate(self.shards) for s in group}
        index = {"metadata": {"total_size": self.total_bytes, **self.metadata},
                 "weight_map": dict(sorted(weight_map.items()))}
        assert self._index_tmp is not None
        self._index_tmp.write_text(json.dumps(index, indent=2) + "\n")
