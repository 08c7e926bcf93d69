"""Start putting an output's finished bytes on disk while the rest is still being produced.

Every output is fsynced before it is renamed into place
(:func:`~vitconv.formats.atomic.atomic_output`), so all of its bytes reach the disk
before a conversion returns, whatever happens here. Left alone, Linux holds them as
dirty pages until a threshold or a timer, and ext4 flushes a truncated-then-rewritten
file on close: the whole file's I/O queues up at the end, after the CPU work, and the
conversion waits for it. ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts write-out of
a byte range without waiting for it, so the disk writes tensor *i* while tensor *i + 1*
is read and transposed. It adds no I/O (each byte is written once either way) and keeps
the pages cached, unlike ``posix_fadvise(DONTNEED)``, which also starts write-out but
then evicts what a user may read back next.

Python's ``os`` has no binding for it, so it is called through ``ctypes``; where libc
lacks it (not Linux) or the call fails (a pipe, a filesystem that refuses it),
:class:`Writeback` does nothing and the final fsync does all the work, as before.
"""

from __future__ import annotations

import ctypes
from typing import BinaryIO, Callable, Optional

#: Start write-out once this much has accumulated: large enough that the calls cost
#: nothing next to the copies, small enough that the disk starts early.
DEFAULT_CHUNK = 8 << 20

_SYNC_FILE_RANGE_WRITE = 2


def _load() -> Optional[Callable[[int, int, int], int]]:
    try:
        fn = ctypes.CDLL(None).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, offset, length: fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_start_writeout = _load()


class Writeback:
    """Call :meth:`advance` after writing to ``f``; every ``chunk`` bytes it starts the
    write-out of what was written since the last call that did. Only for files written
    front to back (rewriting a few earlier bytes, as zip headers do, is fine: the final
    fsync covers them)."""

    def __init__(self, f: BinaryIO, chunk: int = DEFAULT_CHUNK):
        self.f, self.chunk = f, chunk
        self.started = 0  # bytes [0, started) have had write-out started
        self._on = _start_writeout is not None

    def advance(self) -> None:
        if not self._on:
            return
        self.f.flush()  # the bytes must be in the kernel's page cache, not Python's buffer
        end = self.f.tell()
        if end - self.started < self.chunk:
            return
        if _start_writeout(self.f.fileno(), self.started, end - self.started) != 0:
            self._on = False  # refused here (pipe, odd filesystem): the fsync does it all
            return
        self.started = end
