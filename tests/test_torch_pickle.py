"""The torch-free ``.pt`` writer against torch itself: ``torch.load`` is the reference
reader, and ``torch.save`` of the same object the reference for what comes back
(values, dtypes, shapes, strides, container types)."""

import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch

from vitconv.formats.base import BFLOAT16, TensorSpec
from vitconv.formats.torch_pickle import STORAGE_TYPES, StoredTensor, dumps
from vitconv.formats.torch_pt_stream import ALIGNMENT, PtStreamWriter, vitconv_payload

_RNG = np.random.default_rng(0)
#: every dtype the writer names a storage for, in awkward shapes: 0-d, empty, size-1 dims.
ARRAYS = {
    "f32": _RNG.standard_normal((3, 4, 5)).astype(np.float32),
    "f16": _RNG.standard_normal((7,)).astype(np.float16),
    "f64_scalar": np.array(3.25, np.float64),
    "empty_rows": np.zeros((0, 3), np.float32),
    "empty_cols": np.zeros((3, 0), np.float32),
    "ones_dims": _RNG.standard_normal((1, 5, 1)).astype(np.float32),
    "i64": np.arange(-4, 4, dtype=np.int64).reshape(2, 4),
    "i32": np.arange(6, dtype=np.int32),
    "i16": np.arange(6, dtype=np.int16),
    "i8": np.arange(-3, 3, dtype=np.int8),
    "u8": np.arange(250, 256, dtype=np.uint8),
    "bool": np.array([[True, False], [False, True]]),
    "c64": np.array([1 + 2j, -3j], np.complex64),
    "c128": np.array([0.5 - 1j], np.complex128),
}
#: config values of every type vitconv's config holds, and a few beyond.
CONFIG = {"width": 768, "big": 2**40, "neg": -5, "wide": 70000, "neg_big": -2**45, "eps": 1e-6,
          "layers": [3, 4, 9], "pair": (16, 16), "none": None, "yes": True, "no": False,
          "name": "ViT-B/16 ü", "nested": {"a": [], "b": {}, "c": ()}, "long": tuple(range(5))}


def _write(path, arrays, config, extra=None):
    specs = [TensorSpec(k, v.dtype, v.shape) for k, v in arrays.items()]
    with PtStreamWriter(path, specs, vitconv_payload(config, extra)) as w:
        for k, v in arrays.items():
            w.write(k, v)


def test_dtype_table_names_torchs_own_storage_classes():
    for dtype, name in STORAGE_TYPES.items():
        with warnings.catch_warnings():  # TypedStorage's deprecation notice on .dtype
            warnings.simplefilter("ignore", UserWarning)
            storage_dtype = getattr(torch, name).dtype
        if dtype == "bfloat16":  # torch takes no ml_dtypes array: the same bits through uint16
            assert storage_dtype == torch.bfloat16, name
            continue
        assert storage_dtype == torch.from_numpy(np.zeros(1, np.dtype(dtype))).dtype, name


def test_loads_as_torch_save_of_the_same_object(tmp_path):
    _write(tmp_path / "ours.pt", ARRAYS, CONFIG, {"source": "x.npz"})
    ref_payload = {"format": "vitconv", "format_version": 1, "config": CONFIG,
                   "state_dict": {k: torch.from_numpy(v).contiguous() for k, v in ARRAYS.items()},
                   "source": "x.npz"}
    torch.save(ref_payload, tmp_path / "ref.pt")
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    for mmap in (False, True):
        ours = torch.load(tmp_path / "ours.pt", weights_only=True, mmap=mmap)
        assert {k: v for k, v in ours.items() if k != "state_dict"} == \
               {k: v for k, v in ref.items() if k != "state_dict"}
        assert type(ours["config"]["pair"]) is tuple and type(ours["config"]["layers"]) is list
        assert list(ours["state_dict"]) == list(ref["state_dict"])
        for k, r in ref["state_dict"].items():
            t = ours["state_dict"][k]
            assert t.dtype == r.dtype and t.shape == r.shape and not t.requires_grad, k
            assert t.stride() == torch.empty(r.shape).stride(), k  # contiguous, torch's convention
            assert torch.equal(t, r), k


def test_records_are_aligned_and_crcs_correct(tmp_path):
    _write(tmp_path / "o.pt", ARRAYS, {})
    raw = (tmp_path / "o.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / "o.pt") as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        for info in zf.infolist():
            n, m = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + n + m) % ALIGNMENT == 0, info.filename
        assert zf.read("archive/version") == b"3\n"
        assert zf.read("archive/byteorder") == b"little"
    assert names == ["archive/data.pkl", "archive/.format_version", "archive/.storage_alignment",
                     "archive/byteorder"] + [f"archive/data/{i}" for i in range(len(ARRAYS))] + \
                    ["archive/version"]


def test_zip64_records_load(tmp_path, monkeypatch):
    """Records over 4 GiB need zip64 headers, and their size changes where the data starts.
    Lowering zipfile's limit puts every record and offset through that path at test size."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 16)
    _write(tmp_path / "o.pt", ARRAYS, CONFIG)
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "o.pt") as zf:
        assert zf.testzip() is None
        assert any(info.extract_version >= 45 for info in zf.infolist())  # zip64 in use
    ours = torch.load(tmp_path / "o.pt", weights_only=True)
    for k, v in ARRAYS.items():
        assert np.array_equal(ours["state_dict"][k].numpy(), v), k



@pytest.mark.parametrize("zip64_limit", [None, 16])
def test_tensor_records_are_the_bytes_zipfiles_own_writer_gives(tmp_path, monkeypatch, zip64_limit):
    """Tensors skip zipfile's writer (its stdlib CRC-32 on the writer's thread): their records,
    local headers included, must be what zipfile's ``open(mode="w")`` writes, zip64 too."""
    if zip64_limit is not None:
        monkeypatch.setattr(zipfile, "ZIP64_LIMIT", zip64_limit)
    _write(tmp_path / "fast.pt", ARRAYS, CONFIG)
    monkeypatch.setattr(PtStreamWriter, "_write",
                        lambda self, i, a: self._record(f"data/{i}", np.ascontiguousarray(a).reshape(-1)))
    _write(tmp_path / "zipfile.pt", ARRAYS, CONFIG)
    assert (tmp_path / "fast.pt").read_bytes() == (tmp_path / "zipfile.pt").read_bytes()

@pytest.mark.parametrize("value", [1.5, -(2**31), 2**31 - 1, 2**31, 255, 256, 65535, 65536, -1,
                                   2**63, -(2**63) - 1, "", "a\nb", [[1], (2,)], {"k": {"j": None}}])
def test_plain_values_unpickle_as_themselves(value):
    import pickle

    assert pickle.loads(dumps({"v": value})) == {"v": value}


def test_refuses_what_weights_only_cannot_load():
    with pytest.raises(TypeError, match="set"):
        dumps({"s": {1, 2}})
    with pytest.raises(TypeError, match="storage type"):
        dumps({"t": StoredTensor("0", np.dtype("<U3"), (1,))})


def test_mismatched_tensor_is_refused_and_leaves_nothing(tmp_path):
    specs = [TensorSpec("a", np.dtype(np.float32), (2, 2))]
    with pytest.raises(Exception, match="does not match"):
        with PtStreamWriter(tmp_path / "o.pt", specs, {}) as w:
            w.write("a", np.zeros((2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Exception, match="never written"):
        with PtStreamWriter(tmp_path / "o.pt", specs, {}):
            pass
    assert list(tmp_path.iterdir()) == []

