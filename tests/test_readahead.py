"""Read-ahead (vitconv.formats.readahead): same values, errors in order, bounded memory, clean stop."""

from __future__ import annotations

import threading
import time
import zipfile

import numpy as np
import pytest

from vitconv.config import ViTConfig
from vitconv.errors import BadInputError
from vitconv.formats.readahead import ReadAhead
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions
from vitconv.tools.synthetic import make_synthetic

KEYS = [f"k{i}" for i in range(20)]


class Recorder:
    """A source whose reads note how many unconsumed bytes the reader holds at each read."""

    def __init__(self, size=1000, fail=None):
        self.size, self.fail = size, fail
        self.lock = threading.Lock()
        self.reads = []

    def read(self, k):
        with self.lock:
            self.reads.append((k, threading.current_thread().name))
        if k == self.fail:
            raise BadInputError(f"member {k!r} could not be read (Bad CRC-32)", "x.npz")
        return np.full(self.size // 4, int(k[1:]), np.float32)


def test_values_are_the_direct_reads_and_each_key_is_read_once():
    src = Recorder()
    with ReadAhead(src.read, KEYS, lambda k: 1000) as ra:
        got = [ra.get(k) for k in KEYS]
    assert sorted(k for k, _ in src.reads) == sorted(KEYS)  # by whichever thread got there first
    for k, a in zip(KEYS, got):
        np.testing.assert_array_equal(a, src.read(k))


def _until(condition, seconds: float = 60.0) -> None:
    """Wait for the reader thread to get somewhere (a condition, not a fixed sleep)."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("the reader thread did not get there")


def test_a_slow_caller_finds_everything_read_ahead():
    src = Recorder()
    with ReadAhead(src.read, KEYS, lambda k: 1000) as ra:
        _until(lambda: len(src.reads) == len(KEYS))  # a caller slower than the reader, however loaded
        for k in KEYS:
            ra.get(k)
    assert [k for k, t in src.reads if t == "vitconv-read"] == KEYS


def test_reader_holds_at_most_the_budget():
    """Budget 3500 bytes, 1000-byte tensors: each read starts with at most 3 tensors
    (this one counted) read and not yet taken, however far behind the caller is."""
    held_at_read = []
    ra = None

    def read(k):
        held_at_read.append(ra._held)  # already counts the tensor being read
        return np.zeros(250, np.float32)

    ra = ReadAhead(read, KEYS, lambda k: 1000, budget=3500)
    with ra:
        _until(lambda: len(held_at_read) >= 3)  # a slow caller: the reader runs as far as the budget lets it
        assert max(held_at_read) == 3000 and len(held_at_read) == 3  # and no further
        for k in KEYS:
            ra.get(k)
    assert len(held_at_read) == len(KEYS) and max(held_at_read) == 3000


def test_tensor_larger_than_budget_is_read_alone():
    with ReadAhead(lambda k: np.zeros(10, np.float32), KEYS[:3], lambda k: 10**9, budget=10) as ra:
        assert [ra.get(k).size for k in KEYS[:3]] == [10, 10, 10]


def test_failed_read_raises_at_its_own_key_not_before():
    src = Recorder(fail="k5")
    with ReadAhead(src.read, KEYS, lambda k: 1000) as ra:
        for k in KEYS[:5]:
            assert ra.get(k)[0] == int(k[1:])
        with pytest.raises(BadInputError, match="k5"):
            ra.get("k5")
    assert "k6" not in [k for k, _ in src.reads]  # the reader stopped at the failure


def test_keys_outside_the_plan_are_read_directly():
    src = Recorder()
    with ReadAhead(src.read, KEYS[:2], lambda k: 1000) as ra:
        assert ra.get("k7")[0] == 7
        assert ra.get("k1")[0] == 1 and ra.get("k0")[0] == 0  # out of order still answers
        assert ra.get("k0")[0] == 0  # asked twice: the second comes straight from the source


def test_out_of_order_caller_does_not_wait_on_the_budget():
    """The reader holds k0 and may not read k1 (budget: one tensor); a caller asking for k1
    first must read it itself rather than wait for a reader that waits for it."""
    got = []

    def caller():
        with ReadAhead(lambda k: np.full(1, int(k[1:])), KEYS[:3], lambda k: 1000, budget=1000) as ra:
            time.sleep(0.1)  # the reader has read k0 and is waiting on the budget
            got.extend(int(ra.get(k)[0]) for k in ("k1", "k0", "k2"))

    t = threading.Thread(target=caller, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "deadlock: get() waited for a read the budget forbade"
    assert got == [1, 0, 2]


def test_leaving_early_stops_the_reader():
    release = threading.Event()

    def slow(k):
        release.wait(5)
        return np.zeros(1, np.float32)

    ra = ReadAhead(slow, KEYS, lambda k: 4)
    with ra:
        release.set()
        ra.get("k0")
    assert not ra._thread.is_alive()


MEDIUM = ViTConfig(image_size=64, patch_size=16, width=256, depth=3, num_heads=4, mlp_dim=1024,
                   num_classes=100)


def test_stream_with_read_ahead_equals_without(tmp_path, monkeypatch):
    """Bytes of the streamed file with read-ahead on (the default for .npz) and off."""
    from vitconv.formats.npz import NpzSource

    src = tmp_path / "m.npz"
    make_synthetic(MEDIUM, src)
    convert(src, tmp_path / "on.safetensors", ConvertOptions(hash_source=False))
    monkeypatch.setattr(NpzSource, "concurrent_reads", False)
    convert(src, tmp_path / "off.safetensors", ConvertOptions(hash_source=False))
    assert (tmp_path / "on.safetensors").read_bytes() == (tmp_path / "off.safetensors").read_bytes()


def test_corrupt_member_mid_stream_is_named_and_leaves_nothing(tmp_path):
    """A CRC failure found by the reader thread reaches the user as the same one-line error."""
    src = tmp_path / "m.npz"
    make_synthetic(MEDIUM, src)
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel.npy"
    with zipfile.ZipFile(src) as z:
        info = z.getinfo(key)
    raw = bytearray(src.read_bytes())
    raw[info.header_offset + 30 + len(key) + 200] ^= 0x10  # a data byte, past the .npy header
    src.write_bytes(bytes(raw))
    with pytest.raises(BadInputError, match="Dense_0/kernel.*CRC"):
        convert(src, tmp_path / "out.safetensors", ConvertOptions(hash_source=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
