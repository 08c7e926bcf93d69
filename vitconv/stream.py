"""Conversion that never holds the model twice: read one source tensor, map it, write it, drop it.

The ordinary path (:func:`vitconv.convert.convert_file`) builds the whole canonical state
dict and hands it to a writer; ``safetensors``' writer then copies every tensor into a
``bytes`` object, so a 2.5 GB ViT-H/14 needs about 5 GB of RAM. Here the output's layout
is computed from shapes alone (:func:`vitconv.shapes.expected_shapes` for the canonical
shapes, the source members' headers for dtypes), the header is written first and each
tensor streams from :meth:`vitconv.layouts.ReadResult.tensors` straight into its slot.
Peak memory is the interpreter plus the largest rule's inputs and output (three q/k/v
kernels and their fused result), whatever the model size.

The bytes are the same as the ordinary path's: tensors are produced by the same rule
table and laid out in the order ``safetensors`` itself uses.

Writing tensor *i* overlaps producing tensor *i + 1* (one writer thread, at most one write
in flight): the writer spends its time in ``write`` and ``zlib.crc32`` (``.pt``), which
release the GIL, so reading and transposing no longer wait for the disk. It costs no
memory: the generator chain already keeps the previous tensor alive while it reads the
next one's sources (measured peak RSS went down, not up). Both writers also start the
disk write-out of each finished 8 MiB (:mod:`vitconv.formats.writeback`), so the final
fsync does not find the whole file still waiting.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from .checkpoint import Canonical, output_kind, read_canonical
from .convert import ConversionReport, refuse_overwrite
from .errors import BadInputError
from .formats.base import sha256_file
from .formats.safetensors_io import CONFIG_KEY
from .formats.safetensors_stream import SafetensorsStreamWriter, TensorSpec, safetensors_order

#: Hugging Face's default shard limit (``max_shard_size="5GB"``, decimal units).
DEFAULT_SHARD_BYTES = 5 * 10**9

#: ``progress(done_bytes, total_bytes, tensor_name)``, called after each tensor is written.
Progress = Callable[[int, int, str], None]


def tensor_specs(c: Canonical) -> List[TensorSpec]:
    """Name, dtype and shape of every output tensor, in production (rule) order, before a
    byte of weight data is read: shapes from the target config, dtypes from the source
    members' headers (a rule's output has the common type of its inputs)."""
    from .shapes import expected_shapes

    shapes = expected_shapes(c.config)
    src, prefix = c.read.source, c.read.prefix
    specs = []
    for r in c.read.rules:
        dtypes = [np.dtype(src.dtype(prefix + k)) for k in r.source]
        specs.append(TensorSpec(r.canonical, np.result_type(*dtypes), tuple(shapes[r.canonical])))
    return specs


def _reordered(c: Canonical, names: List[str]) -> Canonical:
    """``c`` with its rules in the order of ``names`` (zip members are random access)."""
    by_name = {r.canonical: r for r in c.read.rules}
    return dataclasses.replace(c, read=dataclasses.replace(c.read, rules=[by_name[n] for n in names]))


class _Pipelined:
    """``writer.write`` on one background thread, at most one call in flight.

    ``write`` returns as soon as the tensor is handed over, once the previous write has
    finished; its errors surface on the next ``write`` or on leaving the ``with`` block.
    Leaving always waits for the thread, so the writer's own ``__exit__`` (which renames
    or deletes the temporaries) never runs under a write. ``progress`` is called in
    the caller's thread, in order, once each tensor's write has returned."""

    def __init__(self, writer, total: int, progress: Optional[Progress]):
        self.writer, self.total, self.progress = writer, total, progress
        self.done = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vitconv-write")
        self._pending: Optional[Future] = None
        self._pending_info: Optional[tuple] = None

    def __enter__(self) -> "_Pipelined":
        return self

    def _finish(self) -> None:
        if self._pending is None:
            return
        fut, (name, nbytes) = self._pending, self._pending_info
        self._pending = self._pending_info = None
        fut.result()  # re-raises the writer's error here, in the caller's thread
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, name)

    def write(self, name: str, array: np.ndarray, nbytes: int) -> None:
        self._finish()
        self._pending = self._pool.submit(self.writer.write, name, array)
        self._pending_info = (name, nbytes)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
            elif self._pending is not None:
                self._pending.exception()  # wait; the error already on its way wins
                self._pending = None
        finally:
            self._pool.shutdown(wait=True)


def stream_convert(src: os.PathLike | str, dst: os.PathLike | str, image_size: Optional[int] = None,
                   shard_bytes: Optional[int] = DEFAULT_SHARD_BYTES, progress: Optional[Progress] = None,
                   require_layout: Optional[str] = None, hash_source: bool = True) -> ConversionReport:
    """Convert ``src`` to a canonical ``.safetensors`` or ``.pt`` at ``dst``, streaming.

    Same checks, metadata and tensors as :func:`vitconv.convert.convert_file`; the output
    appears only when complete. ``.safetensors`` above ``shard_bytes`` (None: never) is
    sharded with a ``.safetensors.index.json`` (the report's ``output`` is then the index).
    ``.pt`` is never sharded. ``hash_source=False`` skips the source's SHA-256 (one more
    read of the file) and leaves it out of the metadata.
    """
    src, dst = Path(src), Path(dst)
    refuse_overwrite(src, dst)
    kind = output_kind(dst)
    if kind not in ("safetensors", "pt"):
        raise BadInputError("streaming conversion writes .safetensors or .pt; use convert_file "
                            "for a Google .npz", dst)
    c = read_canonical(src, image_size=image_size, require_layout=require_layout)
    try:
        specs = tensor_specs(c)
        digest = sha256_file(src) if hash_source else ""
        extra = {"source_sha256": digest, "source": src.name} if hash_source else {}
        if kind == "safetensors":
            specs = safetensors_order(specs)
            meta = {"format": "pt", CONFIG_KEY: c.config.to_json(), **extra}
            writer = SafetensorsStreamWriter(dst, specs, meta, shard_bytes=shard_bytes)
        else:
            from .formats.torch_pt_stream import PtStreamWriter

            writer = PtStreamWriter(dst, specs, c.config.to_dict(), extra)
        c = _reordered(c, [s.name for s in specs])
        with writer, _Pipelined(writer, sum(s.nbytes for s in specs), progress) as out:
            for (name, t), spec in zip(c.tensors(read_ahead=True), specs):
                out.write(name, t, spec.nbytes)
                del t
    finally:
        c.read.source.close()
    notes = [c.info["ignored"]] if "ignored" in c.info else []
    output = writer.outputs[-1]
    if len(writer.outputs) > 1:
        notes.append(f"sharded into {len(writer.outputs) - 1} files of at most {shard_bytes:,} bytes "
                     f"({', '.join(p.name for p in writer.outputs[:-1])})")
    resized = (c.resized_from, c.config.grid_size) if c.resized_from is not None else None
    num_params = int(sum(int(np.prod(s.shape, dtype=np.int64)) for s in specs))
    return ConversionReport(str(src), c.read.layout.name, digest, c.config, num_params, str(output),
                            kind, resized, notes)
