"""Large outputs written past the page cache (``O_DIRECT``), for the CPU that copy costs.

A buffered ``write`` copies every byte into the kernel's page cache, and the kernel's flusher
then walks those dirty pages to the disk: here about 0.75 s of CPU per GB between the two, the
largest single cost of converting a ViT-H/14 (a third of its CPU time, on two cores shared with
the source's SHA-256 and the transposes). With ``O_DIRECT`` the disk reads the bytes straight from
the process's memory; what is left is one copy into a page-aligned staging buffer, which the
alignment rules need anyway (the file offset, the length and the buffer's address of each write
must be multiples of the device's block size, and tensors start wherever the header ends).

:class:`DirectAppender` appends through such buffers, writing each as it fills, and at the
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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO, List, Optional

import numpy as np

#: Outputs (each file of a sharded one) at least this large are written with ``O_DIRECT``.
DIRECT_MIN_BYTES = 256 << 20
#: Every direct write starts and ends on this boundary (4 KiB: any device's logical block divides it).
ALIGN = 4096
#: Each staging buffer: large enough that each write keeps the disk busy, small enough to stay cheap.
STAGING_BYTES = 8 << 20
#: Staging buffers: one filling, the others written one after another (one write in flight: a
#: second in flight measured slower here) or queued. Why four, not two: with two, the disk idles
#: whenever the transposes fall behind for a moment, since the filling buffer is the only slack;
#: with four they can run up to 24 MiB ahead. ViT-L/16 ``.npz`` -> ``.safetensors`` in the
#: process, 1.2 GB: 1.36-1.46 s with two, 1.14-1.17 s with four, 1.15-1.34 s with eight (three
#: runs each, taking turns, 2026-12-07); 16 MiB more memory.
BUFFERS = 4


def wanted(nbytes: int) -> bool:
    """Whether a file of ``nbytes`` is written with ``O_DIRECT`` (see the module docstring)."""
    setting = os.environ.get("VITCONV_DIRECT_IO", "")
    if setting in ("0", "1"):
        return setting == "1"
    return nbytes >= DIRECT_MIN_BYTES and hasattr(os, "O_DIRECT")


class DirectAppender:
    """Append bytes to ``f`` (opened for writing, empty) from offset 0 with ``O_DIRECT``.

    ``write`` copies into one of :data:`BUFFERS` staging buffers; a full buffer is written on a
    thread of its own, in order, while the next ones fill, so the copies and the disk overlap (a
    direct write returns only when the device has the bytes). ``close`` writes the tail and
    truncates the file to the bytes given. ``f`` stays the caller's to flush, rewrite in place
    (a deferred header) and close."""

    def __init__(self, f: BinaryIO, staging_bytes: Optional[int] = None):
        staging_bytes = staging_bytes or STAGING_BYTES
        if staging_bytes % ALIGN:
            raise ValueError(f"staging_bytes must be a multiple of {ALIGN}")
        self.f = f
        self.fd: Optional[int] = None
        try:
            self.fd = os.open(f.name, os.O_WRONLY | os.O_DIRECT)
        except (OSError, AttributeError, TypeError):
            self.fd = None  # refused here: ordinary writes from the same buffers
        # anonymous mappings: page-aligned, as O_DIRECT needs
        self._bufs = [mmap.mmap(-1, staging_bytes) for _ in range(BUFFERS)]
        self._views = [np.frombuffer(b, np.uint8) for b in self._bufs]
        self._pending: List[Optional[Future]] = [None] * BUFFERS  # each buffer's write in flight
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vitconv-direct")
        self._cur = 0  # the buffer being filled
        self._fill = 0  # bytes staged in it
        self._offset = 0  # file offset of its first byte
        self._first = True  # the first write runs here: a refusal (EINVAL) turns O_DIRECT off

    def write(self, data) -> int:
        src = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        size, pos = src.size, 0
        while pos < size:
            view = self._views[self._cur]
            n = min(view.size - self._fill, size - pos)
            view[self._fill:self._fill + n] = src[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == view.size:
                self._flush(view.size)
        return size

    def _flush(self, length: int, wait: bool = False) -> None:
        """Write the first ``length`` bytes of the current buffer (a multiple of :data:`ALIGN`)
        at its offset, in the background unless ``wait``; the next bytes go to the next buffer,
        once its own last write is done."""
        i, offset = self._cur, self._offset
        if self._first or wait:
            self._first = False
            self._write(i, length, offset)
        else:
            self._pending[i] = self._pool.submit(self._write, i, length, offset)
        self._offset += length
        self._fill = 0
        self._cur = (i + 1) % BUFFERS
        self._settle(self._cur)

    def _settle(self, i: int) -> None:
        """Wait for buffer ``i``'s write; its error is raised here, in the writer's thread."""
        pending, self._pending[i] = self._pending[i], None
        if pending is not None:
            pending.result()

    def _write(self, i: int, length: int, offset: int) -> None:
        view = memoryview(self._bufs[i])
        try:
            done = 0
            while done < length:
                if self.fd is not None:
                    try:
                        n = os.pwrite(self.fd, view[done:length], offset + done)
                    except OSError as e:
                        if e.errno != errno.EINVAL or done or offset:
                            raise
                        self._stop_direct()  # refused at the first write: not this file system's way
                        continue
                else:
                    n = os.pwrite(self.f.fileno(), view[done:length], offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, "short write", self.f.name)
                done += n
        finally:
            view.release()

    def _stop_direct(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None

    def close(self) -> None:
        """Write what is staged (padded to a whole block, then cut back) and let go of the buffers."""
        if self._pool is None:
            return
        try:
            for j in range(1, BUFFERS):  # every write in flight, the oldest first
                self._settle((self._cur + j) % BUFFERS)
            tail = self._fill
            if tail:
                padded = -(-tail // ALIGN) * ALIGN
                self._views[self._cur][tail:padded] = 0
                self._flush(padded, wait=True)
                self._offset -= padded - tail
            os.ftruncate(self.f.fileno(), self._offset)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Let go of the buffers and the descriptor (after any write in flight) without writing more."""
        if self._pool is None:
            return
        self._pool.shutdown(wait=True)  # nothing may write into a file being removed, or from freed memory
        self._pool = None
        self._stop_direct()
        del self._views
        for b in self._bufs:
            b.close()
