"""Large outputs written past the page cache (``O_DIRECT``), for the CPU that copy costs.

A buffered ``write`` copies every byte into the kernel's page cache, and the kernel's flusher
then walks those dirty pages to the disk: here about 0.75 s of CPU per GB between the two, the
largest single cost of converting a ViT-H/14 (a third of its CPU time, on two cores shared with
the source's SHA-256 and the transposes). With ``O_DIRECT`` the disk reads the bytes straight from
the process's memory; what is left is one copy into a page-aligned staging buffer, which the
alignment rules need anyway (the file offset, the length and the buffer's address of each write
must be multiples of the device's block size, and tensors start wherever the header ends).

:class:`DirectAppender` appends through that buffer, writing it each time it fills, and at the
end writes the tail padded to a whole block and truncates the file to its true length. The bytes
on disk are the same as a buffered write's; the file is still fsynced and renamed into place by
:func:`~vitconv.formats.atomic.atomic_output`. Where a file system refuses ``O_DIRECT`` (at the
open, or with ``EINVAL`` at the first write), the same buffer goes through ordinary writes.

Only files of at least :data:`DIRECT_MIN_BYTES` go this way: for small outputs the page cache
costs little, and a command that reads the file back next (``convert --verify``) finds it there.
``VITCONV_DIRECT_IO=0`` turns it off, ``=1`` on for every size.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import BinaryIO, Optional

import numpy as np

#: Outputs (each file of a sharded one) at least this large are written with ``O_DIRECT``.
DIRECT_MIN_BYTES = 256 << 20
#: Every direct write starts and ends on this boundary (4 KiB: any device's logical block divides it).
ALIGN = 4096
#: The staging buffer: large enough that each write keeps the disk busy, small enough to stay cheap.
STAGING_BYTES = 8 << 20


def wanted(nbytes: int) -> bool:
    """Whether a file of ``nbytes`` is written with ``O_DIRECT`` (see the module docstring)."""
    setting = os.environ.get("VITCONV_DIRECT_IO", "")
    if setting in ("0", "1"):
        return setting == "1"
    return nbytes >= DIRECT_MIN_BYTES and hasattr(os, "O_DIRECT")


class DirectAppender:
    """Append bytes to ``f`` (opened for writing, empty) from offset 0 with ``O_DIRECT``.

    ``write`` copies into the staging buffer and writes each full buffer; ``close`` writes the
    tail and truncates the file to the bytes given. ``f`` stays the caller's to flush, rewrite
    in place (a deferred header) and close."""

    def __init__(self, f: BinaryIO, staging_bytes: Optional[int] = None):
        staging_bytes = staging_bytes or STAGING_BYTES
        if staging_bytes % ALIGN:
            raise ValueError(f"staging_bytes must be a multiple of {ALIGN}")
        self.f = f
        self.fd: Optional[int] = None
        try:
            self.fd = os.open(f.name, os.O_WRONLY | os.O_DIRECT)
        except (OSError, AttributeError, TypeError):
            self.fd = None  # refused here: ordinary writes from the same buffer
        self._buf = mmap.mmap(-1, staging_bytes)  # anonymous: page-aligned, as O_DIRECT needs
        self._view = np.frombuffer(self._buf, np.uint8)
        self._fill = 0  # bytes staged
        self._offset = 0  # file offset of the staging buffer's first byte
        self.direct = self.fd is not None

    @property
    def written(self) -> int:
        """Bytes given so far (the file's length once closed)."""
        return self._offset + self._fill

    def write(self, data) -> int:
        src = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        size, pos, cap = src.size, 0, self._view.size
        while pos < size:
            n = min(cap - self._fill, size - pos)
            self._view[self._fill:self._fill + n] = src[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == cap:
                self._flush(cap)
        return size

    def _flush(self, length: int) -> None:
        """Write the first ``length`` bytes of the buffer (a multiple of :data:`ALIGN`) at the
        buffer's offset, and start the next buffer after them."""
        view = memoryview(self._buf)
        done = 0
        while done < length:
            if self.fd is not None:
                try:
                    n = os.pwrite(self.fd, view[done:length], self._offset + done)
                except OSError as e:
                    if e.errno != errno.EINVAL or done or self._offset:
                        raise
                    self._stop_direct()  # refused at the first write: not this file system's way
                    continue
            else:
                n = os.pwrite(self.f.fileno(), view[done:length], self._offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "short write", self.f.name)
            done += n
        view.release()
        self._offset += length
        self._fill = 0

    def _stop_direct(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None
        self.direct = False

    def close(self) -> None:
        """Write what is staged (padded to a whole block, then cut back) and let go of the buffer."""
        if self._buf.closed:
            return
        try:
            tail = self._fill
            if tail:
                padded = -(-tail // ALIGN) * ALIGN
                self._view[tail:padded] = 0
                self._flush(padded)
                self._offset -= padded - tail
            os.ftruncate(self.f.fileno(), self._offset)
        finally:
            self._stop_direct()
            del self._view
            self._buf.close()

    def abandon(self) -> None:
        """Let go of the buffer and the descriptor without writing (the output is being removed)."""
        if not self._buf.closed:
            self._stop_direct()
            del self._view
            self._buf.close()
