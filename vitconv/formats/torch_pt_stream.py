"""vitconv's ``.pt`` written one tensor at a time, without holding the state dict.

``torch.save`` pickles a whole object, so it needs every tensor in memory. But its
zip format stores each storage as its own uncompressed record, and since torch 2.5
``torch.serialization.skip_data`` saves the *skeleton* of an object (pickle, record
headers, space for the bytes) without touching tensor data, so the state dict can be
made of uninitialised tensors whose pages are never touched. We save that skeleton, find where each
storage's record lies in the file, write each tensor's bytes there as it is produced,
and fill in the CRC-32s torch left blank. The result is the same ``{"format":
"vitconv", "config", "state_dict"}`` payload :func:`~vitconv.formats.torch_pt.save_vitconv_pt`
writes, loadable with ``torch.load(weights_only=True)`` (and a valid zip: ``zipfile``
checks every CRC).

Storage records are numbered in the order the pickler meets the tensors, which for a
dict is insertion order; every record's size is checked against its tensor before a
byte is written, so a torch that numbered differently fails here, not at load time.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import OutputError, first_line
from .atomic import atomic_output
from .safetensors_stream import TensorSpec
from .torch_pt import FORMAT_NAME, FORMAT_VERSION

_RECORD = re.compile(r"^[^/]+/data/(\d+)$")


def _skeleton(path: Path, specs: Sequence[TensorSpec], config: dict, extra: Mapping[str, str]) -> None:
    import torch
    from torch.utils.serialization import config as ser_config

    # ``torch.empty`` reserves address space but touches no page (large blocks come from
    # mmap), and under ``skip_data`` torch.save never reads them: resident memory stays
    # flat. (FakeTensors would do too, but importing their machinery costs ~2 s and ~100 MB.)
    state = {s.name: torch.empty(tuple(s.shape), dtype=torch.from_numpy(np.zeros(0, s.dtype)).dtype)
             for s in specs}
    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": dict(config),
               "state_dict": state}
    payload.update(dict(extra))
    old = ser_config.save.compute_crc32
    ser_config.save.compute_crc32 = False  # the bytes are not there yet; CRCs are filled in at the end
    try:
        with torch.serialization.skip_data():
            torch.save(payload, path)
    except RuntimeError as e:  # how torch's zip writer reports a full disk or a write error
        raise OutputError(f"writing failed ({first_line(e)})", path) from None
    finally:
        ser_config.save.compute_crc32 = old


class _Record:
    def __init__(self, info: zipfile.ZipInfo, data_offset: int):
        self.info = info
        self.data_offset = data_offset
        self.crc = 0
        self.written = 0


class PtStreamWriter:
    """Write vitconv's ``.pt`` tensor by tensor, in ``specs`` order (the state-dict order)."""

    def __init__(self, path: os.PathLike | str, specs: Sequence[TensorSpec], config: dict,
                 extra: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        self.specs = list(specs)
        self.config = config
        self.extra = dict(extra or {})
        self.outputs: List[Path] = [self.path]
        self.total_bytes = sum(s.nbytes for s in self.specs)
        self._stack = contextlib.ExitStack()
        self._pos = 0

    def __enter__(self) -> "PtStreamWriter":
        try:
            self._tmp = self._stack.enter_context(atomic_output(self.path))
            _skeleton(self._tmp, self.specs, self.config, self.extra)
            self._records = self._locate()
            self._f = self._stack.enter_context(open(self._tmp, "r+b"))
        except BaseException:
            # Unwind *with* the exception: atomic_output then deletes its temporary. A plain
            # close() would exit it as a success and rename a partial file into place.
            if not self._stack.__exit__(*sys.exc_info()):
                raise
        return self

    def _locate(self) -> List[_Record]:
        with zipfile.ZipFile(self._tmp) as zf, open(self._tmp, "rb") as raw:
            found: Dict[int, zipfile.ZipInfo] = {}
            for info in zf.infolist():
                m = _RECORD.match(info.filename)
                if m:
                    found[int(m.group(1))] = info
            if sorted(found) != list(range(len(self.specs))):
                raise OutputError(f"torch.save wrote {len(found)} storage records for "
                                  f"{len(self.specs)} tensors", self.path)
            records = []
            for i, spec in enumerate(self.specs):
                info = found[i]
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != spec.nbytes:
                    raise OutputError(f"storage record {i} ({info.file_size} bytes) does not match "
                                      f"{spec.name} ({spec.nbytes} bytes)", self.path)
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                records.append(_Record(info, info.header_offset + 30 + name_len + extra_len))
            self._central = zf.start_dir
            # torch.save wrote every CRC as 0 (compute_crc32=False): the small records
            # (pickle, version ...) are complete already, so their CRCs are computed now.
            storage = {id(info) for info in found.values()}
            self._others = []
            for info in zf.infolist():
                if id(info) in storage:
                    continue
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                rec = _Record(info, info.header_offset + 30 + name_len + extra_len)
                raw.seek(rec.data_offset)
                rec.crc = zlib.crc32(raw.read(info.compress_size))
                self._others.append(rec)
        return records

    def write(self, name: str, array: np.ndarray) -> None:
        if self._pos >= len(self.specs):
            raise OutputError(f"unexpected extra tensor {name!r}", self.path)
        spec, rec = self.specs[self._pos], self._records[self._pos]
        a = np.asarray(array)
        if name != spec.name or a.dtype != np.dtype(spec.dtype) or tuple(a.shape) != tuple(spec.shape):
            raise OutputError(f"tensor {name!r} {a.dtype}{tuple(a.shape)} does not match the "
                              f"skeleton entry {spec.name!r}", self.path)
        buf = memoryview(np.ascontiguousarray(a).reshape(-1)).cast("B")
        self._f.seek(rec.data_offset)
        self._f.write(buf)
        rec.crc = zlib.crc32(buf)
        self._pos += 1

    def _fill_crcs(self) -> None:
        """Write each record's CRC-32 where the zip keeps it: the data descriptor after the
        data (torch's writer sets flag bit 3) or else the local header, and the central
        directory entry."""
        f = self._f
        everything = self._records + self._others
        by_offset = {r.info.header_offset: r for r in everything}
        for r in everything:
            crc = struct.pack("<I", r.crc)
            if r.info.flag_bits & 0x08:
                f.seek(r.data_offset + r.info.compress_size)
                sig = f.read(4)
                f.seek(r.data_offset + r.info.compress_size + (4 if sig == b"PK\x07\x08" else 0))
            else:
                f.seek(r.info.header_offset + 14)
            f.write(crc)
        pos = self._central
        f.seek(0, os.SEEK_END)
        end = f.tell()
        while pos + 46 <= end:
            f.seek(pos)
            entry = f.read(46)
            if entry[:4] != b"PK\x01\x02":
                break
            n, m, k = struct.unpack("<HHH", entry[28:34])
            offset = struct.unpack("<I", entry[42:46])[0]
            if offset == 0xFFFFFFFF:  # zip64: the real offset is in the extra field
                f.seek(pos + 46 + n)
                offset = _zip64_offset(f.read(m), entry)
            r = by_offset.get(offset)
            if r is not None:
                f.seek(pos + 16)
                f.write(struct.pack("<I", r.crc))
            pos += 46 + n + m + k

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                if self._pos != len(self.specs):
                    raise OutputError(f"{len(self.specs) - self._pos} tensor(s) never written "
                                      f"(first: {self.specs[self._pos].name!r})", self.path)
                self._fill_crcs()
            except BaseException as e:
                self._stack.__exit__(type(e), e, e.__traceback__)
                raise
        self._stack.__exit__(exc_type, exc, tb)


def _zip64_offset(extra: bytes, entry: bytes) -> int:
    """The local-header offset from a zip64 extra field: the 8-byte fields appear only for
    the 32-bit fields set to 0xFFFFFFFF, in the order usize, csize, offset."""
    csize, usize = struct.unpack("<II", entry[20:28])
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack("<HH", extra[i:i + 4])
        if tag == 0x0001:
            body = extra[i + 4:i + 4 + size]
            skip = 8 * ((usize == 0xFFFFFFFF) + (csize == 0xFFFFFFFF))
            return struct.unpack("<Q", body[skip:skip + 8])[0]
        i += 4 + size
    raise OutputError("zip64 entry without an offset in its extra field")
