"""Google ``.npz`` checkpoints, read lazily one member at a time and written one member at a time.

``np.load`` would also work lazily, but it offers no way to read a member's header
without its data; reading headers straight from the zip lets architecture inference
look at every shape without touching a single weight. Pickled (object) members are
refused: ``allow_pickle=False`` everywhere.

Stored (uncompressed) members, what ``np.savez`` writes, are read with ``preadv`` straight
into the array's own buffer, and their CRC-32 checked as ``zipfile`` would check it.
``np.lib.format.read_array`` on a zip member instead reads 256 KiB ``bytes`` chunks and
copies each into the array: twice the copying and a fresh allocation per chunk, which is
a third of the time of a streaming conversion's reads.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import stat
import struct
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
from zlib_ng.zlib_ng import crc32  # the stdlib's checksum, 11x faster (pyproject.toml)

from vitconv.errors import BadInputError, first_line
from vitconv.formats.atomic import atomic_output
from vitconv.formats.base import StreamWriter, TensorSource, bf16_bits_to_float32
from vitconv.formats.writeback import Writeback


#: How big_vision (and any writer without a bfloat16 dtype, e.g. numpy with ``ml_dtypes``) stores
#: bfloat16 in an ``.npy``: a 2-byte void, the raw bits. Read as bfloat16, widened exactly.
BF16_VOID = np.dtype("V2")

#: Bytes first read for a stored member's ``.npy`` header: numpy writes 128 for a ViT's
#: tensors; a longer one is read again whole, up to :data:`HEADER_MAX` (numpy refuses headers
#: over 10,000 bytes as unsafe to parse, so a longer read would only be refused later).
HEADER_READ, HEADER_MAX = 256, 16 << 10



class NpzSource(TensorSource):
    """A ``.npz`` file as a lazy tensor source; keys are the member names without ``.npy``.

    2-byte void members are bfloat16 as big_vision stores them: reported and returned as
    float32 (exactly; :meth:`stored_dtype` says what the file holds)."""

    concurrent_reads = True  # preadv, or zipfile's own locked reader for deflated members

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        self.metadata = {}
        try:
            self._zip = zipfile.ZipFile(self.path)
            infos = [i for i in self._zip.infolist() if not i.filename.endswith("/")]
        except Exception as e:  # BadZipFile, NotImplementedError, OSError ... all mean "corrupt"
            raise BadInputError(f"corrupt or truncated .npz archive ({first_line(e)})", self.path) from None
        self._members: Dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            m = info.filename
            key = m[:-4] if m.endswith(".npy") else m
            if key in self._members:  # a zip may list a name twice; which one is "the" tensor?
                self.close()
                raise BadInputError(f"member {key!r} appears twice in the archive", self.path)
            self._members[key] = info
        self._headers: Dict[str, Tuple[Tuple[int, ...], np.dtype, bool]] = {}
        self._header_len: Dict[str, int] = {}
        self._start: Dict[str, int] = {}  # stored members: where the .npy header begins
        st = os.fstat(self._zip.fp.fileno())
        self._size, self._regular = st.st_size, stat.S_ISREG(st.st_mode)  # mapped only if regular

    def keys(self) -> List[str]:
        return list(self._members)

    def _header(self, key: str) -> Tuple[Tuple[int, ...], np.dtype, bool]:
        if key not in self._headers:
            info = self._members[key]
            try:
                if self._stored(key, info):  # a pread or two, not zipfile's open, seek and five reads
                    f = io.BytesIO(self._stored_header(key, info))
                else:
                    f = self._zip.open(info)
                with f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    header_len = f.tell()
            except (KeyError, BadInputError):
                raise
            except Exception as e:  # zlib/zip/format errors all mean the same to the user
                raise BadInputError(f"member {key!r} is not a valid .npy array ({first_line(e)})",
                                    self.path) from None
            if dtype.hasobject:
                raise BadInputError(f"member {key!r} holds Python objects (a pickle); refusing to "
                                    "load it (allow_pickle=False)", self.path)
            shape = tuple(int(s) for s in shape)
            # The header is the file's word; check it against the member's size before
            # allocating, so a forged shape cannot ask for terabytes.
            need = int(np.prod(shape, dtype=object)) * dtype.itemsize
            have = self._members[key].file_size - header_len
            if need != have:
                raise BadInputError(f"member {key!r} declares {dtype}{shape} ({need:,} bytes) but "
                                    f"holds {have:,} bytes", self.path)
            self._headers[key] = (shape, dtype, fortran)
            self._header_len[key] = header_len
        return self._headers[key]

    def _stored_header(self, key: str, info: zipfile.ZipInfo) -> bytes:
        """A stored member's ``.npy`` header bytes (magic, version, length, text), read past
        its local file header; never more than the member holds, so a header that claims more
        reads short and fails to parse, as through ``zipfile``."""
        start = self._member_start(key, info)
        fd = self._zip.fp.fileno()
        head = os.pread(fd, min(HEADER_READ, info.file_size), start)
        if head[6:7] == b"\x01" and len(head) >= 10:  # version 1: a 2-byte length, else 4
            need = 10 + struct.unpack("<H", head[8:10])[0]
        elif len(head) >= 12:
            need = 12 + struct.unpack("<I", head[8:12])[0]
        else:
            return head
        if need > len(head):
            head = os.pread(fd, min(need, info.file_size, HEADER_MAX), start)
        return head

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._header(key)[0]

    def stored_dtype(self, key: str) -> str:
        """The dtype as the file stores it: ``bfloat16`` for a 2-byte void member."""
        dtype = self._header(key)[1]
        return "bfloat16" if dtype == BF16_VOID else dtype.name

    def dtype(self, key: str) -> np.dtype:
        dtype = self._header(key)[1]
        return np.dtype(np.float32) if dtype == BF16_VOID else dtype

    def _stored(self, key: str, info: zipfile.ZipInfo) -> bool:
        return (info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1  # not encrypted
                and hasattr(os, "preadv") and self._regular)

    def get(self, key: str) -> np.ndarray:
        shape, dtype, fortran = self._header(key)
        info = self._members[key]
        try:
            if self._stored(key, info):
                a = self._read_stored(key, info, shape, dtype, fortran)
            else:
                with self._zip.open(info) as f:
                    a = np.lib.format.read_array(f, allow_pickle=False)
        except BadInputError:
            raise
        except Exception as e:  # CRC mismatch, truncated deflate stream, short read ...
            raise BadInputError(f"member {key!r} could not be read ({first_line(e)})", self.path) from None
        return self._native(a)

    def _native(self, a: np.ndarray) -> np.ndarray:
        if a.dtype == BF16_VOID:
            return bf16_bits_to_float32(a)
        if not a.dtype.isnative:  # torch refuses big-endian arrays; the values are fine
            a = a.astype(a.dtype.newbyteorder("="))
        return a

    def get_index(self, key: str, index: int) -> np.ndarray:
        """``get(key)[index]``, reading only that slice's bytes where the member is stored
        (what ``np.savez`` writes): a stacked array is then read once over all its slices,
        never whole. The zip's CRC covers the whole member, so a slice read cannot check it;
        a deflated or Fortran-ordered member is read whole."""
        shape, dtype, fortran = self._header(key)
        info = self._members[key]
        if not shape or not 0 <= index < shape[0]:
            raise BadInputError(f"member {key!r} {shape} has no slice {index}", self.path)
        if fortran or not self._stored(key, info):
            return self.get(key)[index]
        fd = self._zip.fp.fileno()
        a = np.empty(shape[1:], dtype)
        buf = memoryview(a.reshape(-1)).cast("B")
        offset = self._member_start(key, info) + self._header_len[key] + index * len(buf)
        got = 0
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], offset + got)
            if n <= 0:
                raise BadInputError(f"member {key!r} could not be read (truncated)", self.path)
            got += n
        return self._native(a)

    def _member_start(self, key: str, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes (its ``.npy`` header first) begin: past its local file
        header, whose name and extra field lengths may differ from the central directory's
        (read once per member: the header's read and the data's share it)."""
        if key in self._start:
            return self._start[key]
        local = os.pread(self._zip.fp.fileno(), 30, info.header_offset)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise BadInputError(f"member {key!r}: bad local file header", self.path)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        self._start[key] = info.header_offset + 30 + name_len + extra_len
        return self._start[key]

    def _read_stored(self, key: str, info: zipfile.ZipInfo, shape: Tuple[int, ...], dtype: np.dtype,
                     fortran: bool) -> np.ndarray:
        """The member's bytes in place, as a view of a private mapping of just that member
        (no copy: the file's cached pages are the array's), checked against the zip's CRC-32,
        which covers the ``.npy`` header too. The mapping goes with the last array that uses
        it, so the pages held stay those of the tensors in flight. ``pread`` leaves the shared
        file position alone, so ``zipfile`` is not disturbed."""
        fd = self._zip.fp.fileno()
        start = self._member_start(key, info)
        header_len = self._header_len[key]
        head = os.pread(fd, header_len, start)
        stored_shape = shape[::-1] if fortran else shape  # Fortran order: read its transpose
        count = int(np.prod(stored_shape, dtype=np.int64))
        offset = start + header_len
        end = offset + count * dtype.itemsize
        if len(head) != header_len or end > self._size:
            raise BadInputError(f"member {key!r} could not be read (truncated: the file ends at "
                                f"{self._size:,} bytes, the member at {end:,})", self.path)
        if count == 0:
            data, crc = np.empty(stored_shape, dtype), crc32(head)
        else:
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(fd, end - base, access=mmap.ACCESS_COPY, offset=base)
            data = np.frombuffer(mapped, dtype, count, offset - base).reshape(stored_shape)
            crc = crc32(data.reshape(-1).view(np.uint8), crc32(head))
        if crc != info.CRC:
            raise BadInputError(f"member {key!r} could not be read (Bad CRC-32)", self.path)
        return data.T if fortran else data

    def close(self) -> None:
        zf = getattr(self, "_zip", None)
        if zf is not None:
            zf.close()


#: Member timestamps. ``np.savez`` stamps the current time, so two conversions of the same
#: checkpoint differed; a fixed stamp (the zip epoch) makes the output reproducible.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class NpzStreamWriter(StreamWriter):
    """Write a ``.npz`` one member at a time, in the order of ``specs`` (Google's saver:
    sorted keys).

    Members are what ``np.savez`` writes (stored, zip64-capable, ``.npy`` v1 headers) with a
    fixed timestamp, so ``np.load`` and every ``.npz`` reader read them; the archive appears
    under its final name only when every member is in (:func:`atomic_output`).
    """

    def _open(self, stack: contextlib.ExitStack) -> None:
        tmp = stack.enter_context(atomic_output(self.path))
        self._zip = stack.enter_context(zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True))
        self._writeback = Writeback(self._zip.fp)

    def _member(self, index: int):
        info = zipfile.ZipInfo(self.specs[index].name + ".npy", date_time=ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o600 << 16  # what zipfile gives a member opened by name
        return self._zip.open(info, "w", force_zip64=True)

    def _write(self, index: int, array: np.ndarray) -> None:
        with self._member(index) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        self._writeback.advance()

    def _write_parts(self, index: int, parts: Iterator[np.ndarray]) -> None:
        """A stacked member (big_vision's ``scan=True``) one block's slice at a time: the
        ``.npy`` header ``write_array`` would give the whole array, then each slice's bytes,
        which are the whole array's C-order bytes in turn."""
        spec = self.specs[index]
        header = np.lib.format.header_data_from_array_1_0(np.empty(0, spec.dtype))
        header["shape"] = tuple(spec.shape)
        with self._member(index) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for part in parts:
                f.write(memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8)))  # bfloat16: no buffer format
        self._writeback.advance()

    def _finish(self) -> List[Path]:
        """The central directory: the archive's temporary path."""
        self._zip.close()
        return [Path(self._zip.filename)]
