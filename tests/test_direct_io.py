"""Large safetensors outputs are written with O_DIRECT through a page-aligned staging buffer
(vitconv.formats.direct_io): the files must be byte for byte those of ordinary writes, whatever
the tail's length, the shard boundaries and a header rewritten at the end; a file system that
refuses O_DIRECT gets the same bytes by ordinary writes; a failure leaves nothing."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import golden_path
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions
from vitconv.errors import OutputError
from vitconv.formats import direct_io
from vitconv.formats.base import TensorSpec
from vitconv.formats.safetensors_stream import SafetensorsStreamWriter

SRC = golden_path("jax/tiny_token_p8_32.npz")


def _arrays(seed: int = 0):
    """Odd sizes, so that no tensor, shard or file ends on a 4 KiB boundary."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(12):
        rows = int(rng.integers(1, 700))
        out[f"t{i:02d}"] = rng.standard_normal((rows, 37)).astype(np.float32 if i % 3 else np.float16)
    return out


def _write(path: Path, arrays, shard_bytes=None, metadata=None):
    specs = [TensorSpec(k, v.dtype, v.shape) for k, v in arrays.items()]
    with SafetensorsStreamWriter(path, specs, metadata or {"format": "pt"}, shard_bytes=shard_bytes) as w:
        for k, v in arrays.items():
            w.write(k, v)
    return w.outputs


def _bytes(paths):
    return [Path(p).read_bytes() for p in paths if str(p).endswith(".safetensors")]


@pytest.mark.parametrize("shard_bytes", [None, 60_000])
@pytest.mark.parametrize("staging", [direct_io.ALIGN, 3 * direct_io.ALIGN, direct_io.STAGING_BYTES])
def test_direct_writes_give_the_bytes_of_ordinary_writes(tmp_path, monkeypatch, shard_bytes, staging):
    arrays = _arrays()
    monkeypatch.setenv("VITCONV_DIRECT_IO", "0")
    plain = _write(tmp_path / "plain.safetensors", arrays, shard_bytes)
    monkeypatch.setenv("VITCONV_DIRECT_IO", "1")
    monkeypatch.setattr(direct_io, "STAGING_BYTES", staging)
    direct = _write(tmp_path / "direct.safetensors", arrays, shard_bytes)
    assert len(direct) == len(plain) >= (1 if shard_bytes is None else 4)
    assert _bytes(direct) == _bytes(plain)
    got = {}
    for p in direct:
        if str(p).endswith(".safetensors"):
            got.update(load_file(p))  # the reference reader agrees
    assert sorted(got) == sorted(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)


def test_a_conversion_written_directly_equals_one_written_through_the_cache(tmp_path, monkeypatch):
    """The whole path: the source's hash written into the headers at the end, in place."""
    monkeypatch.setenv("VITCONV_DIRECT_IO", "0")
    convert(SRC, tmp_path / "plain.safetensors", ConvertOptions(shard_bytes=40_000))
    monkeypatch.setenv("VITCONV_DIRECT_IO", "1")
    convert(SRC, tmp_path / "direct.safetensors", ConvertOptions(shard_bytes=40_000))
    plain = sorted(tmp_path.glob("plain-*.safetensors"))
    direct = sorted(tmp_path.glob("direct-*.safetensors"))
    assert len(plain) == len(direct) >= 3
    assert [p.read_bytes() for p in direct] == [p.read_bytes() for p in plain]
    digest = hashlib.sha256(SRC.read_bytes()).hexdigest()
    assert digest.encode() in direct[0].read_bytes()[:4096]


def test_a_file_system_that_refuses_o_direct_gets_ordinary_writes(tmp_path, monkeypatch):
    arrays = _arrays(1)
    monkeypatch.setenv("VITCONV_DIRECT_IO", "0")
    plain = _write(tmp_path / "plain.safetensors", arrays)
    monkeypatch.setenv("VITCONV_DIRECT_IO", "1")
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):  # what tmpfs before Linux 6.6 and some FUSE mounts answer
        if fd in opened:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    real_open, opened = os.open, set()

    def open_(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & getattr(os, "O_DIRECT", 0):
            opened.add(fd)
        return fd

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    direct = _write(tmp_path / "direct.safetensors", arrays)
    assert refused == [0]  # tried once, at the first write, then ordinary writes
    assert _bytes(direct) == _bytes(plain)


def test_a_failure_while_writing_directly_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCONV_DIRECT_IO", "1")
    arrays = _arrays(2)
    specs = [TensorSpec(k, v.dtype, v.shape) for k, v in arrays.items()]
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OutputError):
        with SafetensorsStreamWriter(tmp_path / "m.safetensors", specs, {"format": "pt"}) as w:
            for i, (k, v) in enumerate(arrays.items()):
                w.write(k, v if i < 5 else v[:1])  # the sixth disagrees with its spec
    assert list(tmp_path.iterdir()) == []
    assert set(os.listdir("/proc/self/fd")) <= before  # the O_DIRECT descriptor is closed too


def test_only_large_files_go_past_the_cache(monkeypatch):
    monkeypatch.delenv("VITCONV_DIRECT_IO", raising=False)
    assert not direct_io.wanted(direct_io.DIRECT_MIN_BYTES - 1)
    assert direct_io.wanted(direct_io.DIRECT_MIN_BYTES) == hasattr(os, "O_DIRECT")
    monkeypatch.setenv("VITCONV_DIRECT_IO", "0")
    assert not direct_io.wanted(10 * direct_io.DIRECT_MIN_BYTES)
