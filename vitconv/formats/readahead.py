"""Read source tensors ahead, on one background thread, while the caller maps the last ones.

Why: a streaming conversion does three kinds of work per tensor — read it (``preadv``
plus a CRC-32 check), map it (mostly Dense-kernel transposes) and write it — and all three
spend their time in calls that release the GIL. The writer already runs on its own thread
(:class:`vitconv.conversion.pipeline._Pipelined`); without read-ahead, reading and mapping still take
turns on the caller's thread, so on a ViT-L/16 about a quarter of the wall time is reads
that a second core could have done meanwhile.

Memory stays flat: the reader holds at most ``budget`` bytes of tensors the caller has not
taken yet (or one tensor, when a single tensor is larger than the budget), whatever the
model size. Errors stay in order: a read that fails is raised by the :meth:`get` that asks
for that key, as it would have been without read-ahead, and the reader stops there.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

#: Default bound on tensors read but not yet taken. 16 MiB holds ViT-L's largest tensor
#: (an MLP kernel) or three ViT-H q/k/v kernels; ViT-H's 26 MB MLP kernels are read one at
#: a time. 32 MiB measured no faster and cost ViT-H ~30 MiB more peak RSS.
DEFAULT_BUDGET = 16 * 2**20


class ReadAhead:
    """``get(key)`` for keys asked for in a known ``order``, read ahead by one thread.

    ``read(key)`` must be safe to call from another thread (positional reads are; see
    :attr:`vitconv.formats.base.TensorSource.concurrent_reads`). ``nbytes(key)`` sizes a key
    before it is read. A key the reader has not started on when it is asked for is read
    on the caller's thread and skipped by the reader: a caller that outruns the reader, or
    asks out of order, or for a key outside the plan, gets the right answer and never waits
    on the budget. Use as a context manager: leaving stops and joins the reader."""

    def __init__(self, read: Callable[[str], np.ndarray], order: Iterable[str],
                 nbytes: Callable[[str], int], budget: int = DEFAULT_BUDGET):
        self._read, self._nbytes, self._budget = read, nbytes, budget
        self._order = list(order)
        self._planned = set(self._order)  # keys nobody has started to read yet
        self._reading: Optional[str] = None
        self._ready: Dict[str, Tuple[bool, object, int]] = {}  # ok, array or error, bytes held
        self._held = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "ReadAhead":
        self._thread = threading.Thread(target=self._run, name="vitconv-read", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        for key in self._order:
            n = self._nbytes(key)
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._held == 0
                                    or self._held + n <= self._budget)
                if self._stop:
                    return
                if key not in self._planned:  # the caller got there first
                    continue
                self._planned.discard(key)
                self._reading = key
                self._held += n
            try:
                value, ok = self._read(key), True
            except BaseException as e:  # handed to the caller's get(key), in order
                value, ok = e, False
            with self._cond:
                self._ready[key] = (ok, value, n)
                self._reading = None
                self._cond.notify_all()
            if not ok:
                return

    def get(self, key: str) -> np.ndarray:
        with self._cond:
            if key in self._ready or key == self._reading:
                self._cond.wait_for(lambda: key in self._ready)
                entry = self._ready.pop(key)
                self._held -= entry[2]
                self._cond.notify_all()
            else:
                self._planned.discard(key)  # the reader will skip it
                entry = None
        if entry is None:
            return self._read(key)
        ok, value, _ = entry
        if not ok:
            raise value  # type: ignore[misc]
        return value  # type: ignore[return-value]
