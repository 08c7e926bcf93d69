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
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from vitconv.errors import OutputError
from vitconv.formats.atomic import atomic_output
from vitconv.formats import direct_io
from vitconv.formats.base import StreamWriter, TensorSpec, has_deferred, resolve
from vitconv.formats.writeback import Writeback

#: Shard above this many bytes of tensor data: Hugging Face's ``max_shard_size="5GB"`` default
#: (decimal units), used by every writer of sharded outputs.
DEFAULT_SHARD_BYTES = 5 * 10**9

#: numpy dtype name -> safetensors dtype tag (the formats' common ground; bf16 through ml_dtypes,
#: named so that it loads only where one is met).
DTYPE_TAGS: Dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "bfloat16": "BF16",
}


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
        if not dt.isnative or dt.name not in DTYPE_TAGS:
            raise ValueError(f"{s.name}: dtype {dt} has no safetensors equivalent")
        end = offset + s.nbytes
        header[s.name] = {"dtype": DTYPE_TAGS[dt.name], "shape": [int(d) for d in s.shape],
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


class SafetensorsStreamWriter(StreamWriter):
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
        super().__init__(path, specs)
        self.metadata = dict(metadata or {})
        self.shards = plan_shards(self.specs, shard_bytes)
        self.sharded = len(self.shards) > 1
        self.files = shard_names(self.path, len(self.shards)) if self.sharded else [self.path]
        self.outputs = list(self.files) + ([index_path(self.path)] if self.sharded else [])
        self.total_bytes = sum(s.nbytes for s in self.specs)
        self._shard_of = [i for i, group in enumerate(self.shards) for _ in group]
        self._handles: List = []
        self._writeback: List[Writeback] = []
        self._direct: List[Optional[direct_io.DirectAppender]] = []  # per shard, while it is written
        self._index_tmp: Optional[Path] = None
        self._header_bytes: List[int] = []

    def _open(self, stack: contextlib.ExitStack) -> None:
        if self.sharded:  # entered first, so renamed last: the index appears only when all shards have
            self._index_tmp = stack.enter_context(atomic_output(index_path(self.path)))
        for final, group in zip(self.files, self.shards):
            tmp = stack.enter_context(atomic_output(final))
            f = stack.enter_context(open(tmp, "wb"))
            header = build_header(group, self.metadata)
            direct = None
            if direct_io.wanted(len(header) + sum(s.nbytes for s in group)):  # past the page cache
                direct = direct_io.DirectAppender(f)
                stack.callback(direct.abandon)  # closed below when written; on a failure, let go
            self._header_bytes.append((direct or f).write(header))
            self._handles.append(f)
            self._writeback.append(Writeback(f))
            self._direct.append(direct)

    def _write(self, index: int, a: np.ndarray) -> None:
        if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
            a = a.astype(a.dtype.newbyteorder("<"))  # safetensors is little-endian
        a = np.ascontiguousarray(a)
        shard = self._shard_of[index]
        direct = self._direct[shard]
        if direct is not None:
            direct.write(a)
            if index + 1 == len(self.specs) or self._shard_of[index + 1] != shard:  # the shard's tail, now
                direct.close()
            return
        self._handles[shard].write(memoryview(a.reshape(-1).view(np.uint8)))  # bfloat16 has no buffer format
        self._writeback[shard].advance()

    def _finish(self) -> List[Path]:
        """Data flushed, deferred metadata written in place of its placeholders (each header
        keeps its length), index written: temporary paths, data files first, the index last."""
        for direct in self._direct:
            if direct is not None:
                direct.close()  # (a shard without tensors has only its header staged)
        for f in self._handles:
            f.flush()
        if has_deferred(self.metadata):
            self.metadata = resolve(self.metadata)
            for f, group, laid_out in zip(self._handles, self.shards, self._header_bytes):
                header = build_header(group, self.metadata)
                if len(header) != laid_out or os.pwrite(f.fileno(), header, 0) != laid_out:
                    raise OutputError("the header could not be rewritten in place", self.path)
        if self.sharded:
            self._write_index()
        return [Path(f.name) for f in self._handles] + ([self._index_tmp] if self._index_tmp else [])

    def _write_index(self) -> None:
        weight_map = {s.name: self.files[i].name for i, group in enumerate(self.shards) for s in group}
        index = {"metadata": {"total_size": self.total_bytes, **self.metadata},
                 "weight_map": dict(sorted(weight_map.items()))}
        assert self._index_tmp is not None
        self._index_tmp.write_text(json.dumps(index, indent=2) + "\n")
