"""vitconv's ``.pt`` written one tensor at a time, without torch and without holding the
state dict.

A ``torch.save`` file is a zip archive: ``data.pkl`` (the pickled object, whose tensors
refer to storages by key), one uncompressed ``data/<key>`` record per storage, and a few
small records (``version``, ``byteorder``, ``.format_version``, ``.storage_alignment``).
Everything in ``data.pkl`` follows from the tensors' names, dtypes and shapes
(:mod:`vitconv.formats.torch_pickle`), so it is written first and each tensor's bytes
are appended as the caller produces them, each with its CRC-32 computed first (zlib-ng's,
as :mod:`~vitconv.formats.npz` reads them: 0.04 s per GB here, against 0.44 s for the stdlib's,
which ``zipfile`` would run on the writer's thread) and its local header written once, complete;
``zipfile`` writes the small records and the central directory at the end. Records start on 64-byte boundaries as
torch's own writer places them (so ``torch.load(..., mmap=True)`` maps aligned data).

The payload is a bare state dict (a foreign layout, as ``torch.save(model.state_dict())``
writes) or vitconv's ``{"format": "vitconv", "config", "state_dict"}`` wrapper
(:func:`vitconv_payload`); both load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from zlib_ng.zlib_ng import crc32  # the stdlib's checksum, 11x faster (pyproject.toml)

from vitconv.errors import OutputError
from vitconv.formats.atomic import atomic_output
from vitconv.formats.base import StreamWriter, TensorSpec, has_deferred, resolve
from vitconv.formats.torch_pickle import StoredTensor, dumps
from vitconv.formats.torch_pt import FORMAT_NAME, FORMAT_VERSION
from vitconv.formats.writeback import Writeback

#: The archive's top folder. torch.load accepts any one name; torch itself uses "archive"
#: when it has no file name to go by.
ARCHIVE = "archive"
#: torch's record alignment (what it writes into ``.storage_alignment``).
ALIGNMENT = 64
#: The ``extra`` field id torch's writer pads local headers with.
_PAD_FIELD = 0x4246


def vitconv_payload(config: Dict[str, Any], extra: Optional[Mapping[str, str]] = None
                    ) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """vitconv's ``.pt`` wrapper around a state dict: format, version, config, then ``extra``."""
    def wrap(state: Dict[str, Any]) -> Dict[str, Any]:
        payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": dict(config),
                   "state_dict": state}
        payload.update(dict(extra or {}))
        return payload
    return wrap


class PtStreamWriter(StreamWriter):
    """Write a ``torch.save`` archive tensor by tensor, in ``specs`` order. ``state_order``
    (default: the same) is the order of the state dict ``torch.load`` returns: ``torch.load``
    finds each record by its key, so the records may be written in whatever order the
    producer makes them fastest. ``wrap`` builds the pickled object around the state dict
    (None: the bare dict)."""

    def __init__(self, path: os.PathLike | str, specs: Sequence[TensorSpec],
                 wrap: Optional[Callable[[Dict[str, Any]], Any]] = None,
                 state_order: Optional[Sequence[str]] = None):
        super().__init__(path, specs)
        self.wrap = wrap or (lambda state: state)
        self.state_order = list(state_order) if state_order is not None else [s.name for s in self.specs]
        if sorted(self.state_order) != sorted(s.name for s in self.specs):
            raise ValueError("state_order must name every tensor of specs once")

    def payload(self) -> Any:
        """The pickled object: each tensor's storage key is its position in the write order."""
        key = {s.name: (str(i), s) for i, s in enumerate(self.specs)}
        state = {n: StoredTensor(key[n][0], np.dtype(key[n][1].dtype), tuple(key[n][1].shape))
                 for n in self.state_order}
        return self.wrap(state)

    def _open(self, stack: contextlib.ExitStack) -> None:
        tmp = stack.enter_context(atomic_output(self.path))
        self._zip = stack.enter_context(zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED))
        self._writeback = Writeback(self._zip.fp)
        # deferred metadata as its placeholders (:class:`~.base.Deferred`) until _finish
        self._pickle_at = self._record("data.pkl", dumps(self.payload()))
        self._record(".format_version", b"1")
        self._record(".storage_alignment", str(ALIGNMENT).encode())
        self._record("byteorder", sys.byteorder.encode())

    def _aligned_info(self, name: str, nbytes: int, crc: int) -> Tuple[zipfile.ZipInfo, bool]:
        """A stored record's ``ZipInfo`` (and whether it needs zip64, zipfile's own rule stated up
        front) for a local header written where the central directory would start, its extra
        field padded so the data after it is aligned. ``FileHeader()`` is the exact bytes zipfile
        writes, so its length (with a 4-byte pad field) fixes the padding."""
        info = zipfile.ZipInfo(f"{ARCHIVE}/{name}")
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = info.compress_size = nbytes
        info.CRC = crc
        zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT
        info.extra = struct.pack("<HH", _PAD_FIELD, 0)
        pad = -(self._zip.start_dir + len(info.FileHeader(zip64))) % ALIGNMENT
        info.extra = struct.pack("<HH", _PAD_FIELD, pad) + b"Z" * pad
        return info, zip64

    def _record(self, name: str, data) -> Tuple[zipfile.ZipInfo, int]:
        """One stored record, its data starting on an ``ALIGNMENT`` boundary; returns its
        ``ZipInfo`` and where its data starts."""
        if isinstance(data, np.ndarray):  # raw bytes (bfloat16 has no buffer format)
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        buf = memoryview(data).cast("B")
        info, zip64 = self._aligned_info(name, buf.nbytes, crc=0)  # zipfile fills the CRC in
        info.compress_size = 0
        with self._zip.open(info, "w", force_zip64=zip64) as f:
            start = self._zip.fp.tell()
            if start % ALIGNMENT:
                raise OutputError(f"record {name} would start unaligned", self.path)
            f.write(buf)
        self._writeback.advance()  # after zipfile has rewritten the header and moved to the end
        return info, start

    def _rewrite_pickle(self, data: bytes) -> None:
        """``data.pkl`` replaced by ``data`` of the same length, its CRC-32 in the local header
        and (when the archive closes) the central directory."""
        info, start = self._pickle_at
        if len(data) != info.file_size:
            raise OutputError("data.pkl could not be rewritten in place", self.path)
        self._zip.fp.flush()
        fd = self._zip.fp.fileno()
        info.CRC = zlib.crc32(data)
        os.pwrite(fd, data, start)
        os.pwrite(fd, struct.pack("<I", info.CRC), info.header_offset + 14)  # the local header's CRC-32

    def _write(self, index: int, a: np.ndarray) -> None:
        self._stored(f"data/{index}", np.ascontiguousarray(a).reshape(-1).view(np.uint8))

    def _stored(self, name: str, data: np.ndarray) -> None:
        """A tensor's record, the bytes :meth:`_record` gives (zipfile's own, for a seekable file),
        written without zipfile's writer: the CRC-32 is known before the local header is written,
        so the header goes out once, complete, and the data after it in one write."""
        zf, buf = self._zip, memoryview(data)
        info, zip64 = self._aligned_info(name, buf.nbytes, crc=crc32(buf))
        info.external_attr = 0o600 << 16  # as zipfile's open(mode="w") sets it
        zf.fp.seek(zf.start_dir)
        info.header_offset = zf.start_dir
        zf.fp.write(info.FileHeader(zip64))
        if zf.fp.tell() % ALIGNMENT:
            raise OutputError(f"record {name} would start unaligned", self.path)
        zf.fp.write(buf)
        zf.start_dir = zf.fp.tell()
        zf.filelist.append(info)
        zf.NameToInfo[info.filename] = info
        self._writeback.advance()

    def _finish(self) -> List[Path]:
        """Deferred metadata written in place, the last record and the central directory: the
        archive's temporary path."""
        payload = self.payload()
        if has_deferred(payload):
            self._rewrite_pickle(dumps(resolve(payload)))
        self._record("version", b"3\n")
        self._zip.close()
        return [Path(self._zip.filename)]
