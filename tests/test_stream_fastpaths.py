"""The fast paths behind streaming conversion: banded transpose, allocation-free finite
check, ``preadv`` reads of stored ``.npz`` members, and the pipelined writer.

Every expectation comes from plain numpy (``np.ascontiguousarray(a.T)``,
``np.isfinite(a).all()``, ``np.load``) or from ``safetensors.safe_open`` reading the
output back, never from the functions under test. Shapes are chosen above the size
where the banded path takes over (the golden checkpoints are all below it).
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from safetensors import safe_open

from vitconv.config import ViTConfig
from vitconv.errors import BadInputError, OutputError
from vitconv.formats.npz import NpzSource
from vitconv.layouts import transforms as L
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions
from vitconv.tools.synthetic import make_synthetic

RNG = np.random.default_rng(7)

# Large enough that every Dense kernel (256x1024, 256x256 ...) takes the banded path.
MEDIUM = ViTConfig(image_size=32, patch_size=16, width=256, depth=2, num_heads=4, head_dim=64,
                   mlp_dim=1024, num_classes=10)


@pytest.mark.parametrize("shape", [(256, 1024), (1024, 256), (333, 517), (17, 9000), (9000, 17)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_transpose2d_equals_numpy(shape, dtype):
    a = RNG.standard_normal(shape).astype(dtype)
    got = L.transpose2d(a)
    assert got.flags.c_contiguous and got.dtype == a.dtype
    assert got.tobytes() == np.ascontiguousarray(a.T).tobytes()


def test_transpose2d_of_a_strided_view_and_into_out():
    base = RNG.standard_normal((600, 900)).astype(np.float32)
    view = base[::2, 3:800]
    out = np.full((3 * 797, 300), np.nan, np.float32)
    L.transpose2d(view, out[797:1594])
    assert out[797:1594].tobytes() == np.ascontiguousarray(view.T).tobytes()
    assert np.isnan(out[:797]).all() and np.isnan(out[1594:]).all()  # nothing outside its slice
    with pytest.raises(ValueError):
        L.transpose2d(view, np.empty((300, 797), np.float32))


def test_qkv_merge_and_split_at_size_against_concatenate():
    q, k, v = (RNG.standard_normal((512, 8, 64)).astype(np.float32) for _ in range(3))
    want = np.concatenate([x.reshape(512, -1).T for x in (q, k, v)], axis=0)
    got = L.merge_qkv_kernels(q, k, v)
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()
    cfg = ViTConfig(width=512, num_heads=8, head_dim=64, mlp_dim=1024)
    for a, b in zip((q, k, v), L.split_qkv_kernel(got, cfg)):
        assert a.tobytes() == b.tobytes()


def test_attention_out_and_dense_at_size():
    w = RNG.standard_normal((8, 64, 512)).astype(np.float32)
    assert L.heads_out_to_linear(w).tobytes() == np.ascontiguousarray(w.reshape(512, 512).T).tobytes()
    d = RNG.standard_normal((512, 2048)).astype(np.float32)
    assert L.dense_to_linear(d).tobytes() == np.ascontiguousarray(d.T).tobytes()
    assert L.linear_to_dense(L.dense_to_linear(d)).tobytes() == d.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    a = RNG.standard_normal(70_001).astype(dtype)
    big = np.finfo(dtype).max
    a[::3] = big  # a sum would overflow to inf here; min/max must not raise a false alarm
    a[1::3] = -big
    assert L.all_finite(a) and np.isfinite(a).all()
    for value in (np.nan, np.inf, -np.inf):
        for pos in (0, 12_345, 70_000):
            b = a.copy()
            b[pos] = value
            assert L.all_finite(b) == bool(np.isfinite(b).all()) == False  # noqa: E712
            assert not L.all_finite(b[::-1])  # not contiguous
    assert L.all_finite(np.zeros((0, 4), dtype)) and L.all_finite(a[::-1])


def _npz_bytes(arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_stored_members_read_exactly_like_np_load(tmp_path):
    arrays = {
        "c": RNG.standard_normal((64, 48)).astype(np.float32),
        "f": np.asfortranarray(RNG.standard_normal((30, 7, 5))),
        "be": RNG.standard_normal((40,)).astype(">f4"),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "ints": np.arange(12, dtype=np.int64).reshape(3, 4),
    }
    p = tmp_path / "a.npz"
    p.write_bytes(_npz_bytes(arrays))
    with zipfile.ZipFile(p) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with NpzSource(p) as s, np.load(p, allow_pickle=False) as ref:
        for k in arrays:
            got, want = s.get(k), ref[k]
            assert got.shape == want.shape and got.dtype.newbyteorder("=") == want.dtype.newbyteorder("=")
            np.testing.assert_array_equal(got, want)
            assert got.dtype.isnative
        assert s.get("f").flags.f_contiguous  # the member's own order, as np.load gives it


def _npz_of_npy(members) -> bytes:
    """A stored ``.npz`` whose members are the given raw ``.npy`` bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, raw in members.items():
            zf.writestr(name + ".npy", raw)
    return buf.getvalue()


def _npy(a, version) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, version=version)
    return buf.getvalue()


def test_stored_headers_of_every_version_and_length_read_as_np_load(tmp_path):
    """Stored members' headers are read with a pread or two, not through zipfile: version 1,
    2 and 3 headers, and one longer than the first read (a many-axis shape), give what
    ``np.load`` gives."""
    long_shape = np.arange(2.0, dtype=np.float32).reshape((1,) * 60 + (2,))
    members = {"v1": _npy(RNG.standard_normal((5, 3)).astype(np.float32), (1, 0)),
               "v2": _npy(RNG.standard_normal((4,)).astype(np.float32), (2, 0)),
               "v3": _npy(RNG.standard_normal((2, 2)).astype(np.float32), (3, 0)),
               "long": _npy(long_shape, (1, 0))}
    assert len(members["long"]) - long_shape.nbytes > 256  # past the first read
    p = tmp_path / "h.npz"
    p.write_bytes(_npz_of_npy(members))
    with NpzSource(p) as s, np.load(p, allow_pickle=False) as ref:
        for k in members:
            assert s.shape(k) == ref[k].shape
            np.testing.assert_array_equal(s.get(k), ref[k])


def test_stored_header_claiming_more_than_its_member_is_refused(tmp_path):
    raw = bytearray(_npy(np.zeros(4, np.float32), (1, 0)))
    raw[8:10] = (4000).to_bytes(2, "little")  # the header's length, past the member's end
    p = tmp_path / "long.npz"
    p.write_bytes(_npz_of_npy({"w": bytes(raw)}))
    with NpzSource(p) as s:
        with pytest.raises(BadInputError, match="'w' is not a valid .npy array"):
            s.shape("w")


def test_corrupt_stored_member_is_refused_by_crc(tmp_path):
    a = RNG.standard_normal((128, 64)).astype(np.float32)
    raw = bytearray(_npz_bytes({"w": a}))
    needle = a.tobytes()[1000:1016]
    at = bytes(raw).index(needle)
    raw[at] ^= 0x40  # flip one bit inside the tensor data
    p = tmp_path / "bad.npz"
    p.write_bytes(bytes(raw))
    with NpzSource(p) as s:
        with pytest.raises(BadInputError, match="CRC"):
            s.get("w")


def test_streamed_medium_model_matches_google_arrays(tmp_path):
    """Streamed output, read back with safetensors, against the Google arrays mapped by plain
    numpy: the banded transposes and the fused q/k/v write put every value in place."""
    src = tmp_path / "m.npz"
    make_synthetic(MEDIUM, src)
    convert(src, tmp_path / "m.safetensors", ConvertOptions(hash_source=False))
    g = np.load(src, allow_pickle=False)
    blk = "Transformer/encoderblock_1/"
    attn = blk + "MultiHeadDotProductAttention_1/"
    want = {
        "blocks.1.mlp.fc1.weight": g[blk + "MlpBlock_3/Dense_0/kernel"].T,
        "blocks.1.mlp.fc2.weight": g[blk + "MlpBlock_3/Dense_1/kernel"].T,
        "blocks.1.attn.proj.weight": g[attn + "out/kernel"].reshape(256, 256).T,
        "blocks.1.attn.qkv.weight": np.concatenate(
            [g[attn + n + "/kernel"].reshape(256, 256).T for n in ("query", "key", "value")]),
        "head.weight": g["head/kernel"].T,
        "patch_embed.weight": g["embedding/kernel"].transpose(3, 2, 0, 1),
    }
    with safe_open(tmp_path / "m.safetensors", "np") as f:
        for name, w in want.items():
            np.testing.assert_array_equal(f.get_tensor(name), w, err_msg=name)


def test_writer_failure_mid_stream_surfaces_and_leaves_nothing(tmp_path, monkeypatch):
    from vitconv.formats import safetensors_stream

    src = tmp_path / "m.npz"
    make_synthetic(MEDIUM, src)
    calls = []
    real = safetensors_stream.SafetensorsStreamWriter.write

    def failing(self, name, array):
        calls.append(name)
        if len(calls) == 5:
            raise OutputError("writing failed: no space left on device", self.path)
        return real(self, name, array)

    monkeypatch.setattr(safetensors_stream.SafetensorsStreamWriter, "write", failing)
    with pytest.raises(OutputError, match="no space left"):
        convert(src, tmp_path / "out.safetensors", ConvertOptions(hash_source=False))
    assert len(calls) in (5, 6)  # stopped at the failure (at most one more was handed over)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
