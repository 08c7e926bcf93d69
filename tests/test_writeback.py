"""Early write-out: which byte ranges are handed to the kernel, and that it changes
nothing in what is written."""

import io
import os
import sys

import numpy as np
import pytest

from vitconv.formats import writeback
from vitconv.formats.writeback import Writeback


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def record(fd, offset, length):
        seen.append((fd, offset, length))
        return 0

    monkeypatch.setattr(writeback, "_start_writeout", record)
    return seen


def test_ranges_are_contiguous_chunks_of_what_was_written(tmp_path, calls):
    sizes = [3_000, 9_000, 500, 20_000, 100, 100, 7_000]
    with open(tmp_path / "f", "wb") as f:
        wb = Writeback(f, chunk=8_000)
        for n in sizes:
            f.write(b"x" * n)
            wb.advance()
        fd = f.fileno()
    ends = np.cumsum(sizes)
    # a range starts where the last one ended and is issued once at least a chunk has built
    # up; the last 7,200 bytes (under a chunk) are left to the fsync
    assert calls == [(fd, 0, 12_000), (fd, 12_000, 20_500)]
    assert all(o + n in ends for _, o, n in calls) and wb.started == 32_500
    assert (tmp_path / "f").stat().st_size == sum(sizes)


def test_refusal_turns_it_off(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(writeback, "_start_writeout", lambda *a: seen.append(a) or -1)
    with open(tmp_path / "f", "wb") as f:
        wb = Writeback(f, chunk=1)
        for _ in range(3):
            f.write(b"abc")
            wb.advance()
    assert len(seen) == 1 and (tmp_path / "f").read_bytes() == b"abc" * 3


def test_without_the_call_nothing_happens(monkeypatch):
    monkeypatch.setattr(writeback, "_start_writeout", None)
    buf = io.BytesIO()  # no fileno(): would fail if anything were attempted
    wb = Writeback(buf, chunk=1)
    buf.write(b"data")
    wb.advance()
    assert wb.started == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_the_real_call_accepts_a_regular_file(tmp_path):
    """libc's sync_file_range is found and succeeds on a real file, so conversions here do
    start write-out early; and the bytes are untouched."""
    assert writeback._start_writeout is not None
    data = os.urandom(1 << 20)
    with open(tmp_path / "f", "wb") as f:
        wb = Writeback(f, chunk=1 << 16)
        for i in range(0, len(data), 1 << 17):
            f.write(data[i:i + (1 << 17)])
            wb.advance()
        assert wb._on and wb.started == len(data)
    assert (tmp_path / "f").read_bytes() == data
