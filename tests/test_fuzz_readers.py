"""Property-based fuzzing of the readers on mutated bytes: flip, overwrite, truncate or
insert bytes of a small valid file. Whatever comes out, reading it either succeeds or
raises the project's own error (a ``VitconvError``); never anything else.

Derandomized (the examples are a function of the test), no example database, bounded
example counts: the same inputs on every machine, a few seconds in all.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitconv.errors import VitconvError
from vitconv.formats import open_source
from vitconv.formats.base import DictSource
from vitconv.conversion.pipeline import open_checkpoint
from conftest import STRUCTURAL_EDIT_KINDS, golden_path, structurally_edited

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _arrays():
    rng = np.random.default_rng(0)
    return {"a/kernel": rng.standard_normal((3, 4)).astype(np.float32),
            "b": np.arange(5, dtype=np.float64), "c": np.array(7, dtype=np.int32)}


def _npz(compress: bool) -> bytes:
    import io

    buf = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buf, **_arrays())
    return buf.getvalue()


def _safetensors() -> bytes:
    from safetensors.torch import save

    return save({k: torch.from_numpy(v) for k, v in _arrays().items()},
                metadata={"format": "pt"})


def _torch_pt() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"model": {k: torch.from_numpy(v) for k, v in _arrays().items()}, "epoch": 3}, buf)
    return buf.getvalue()


SEEDS = {"npz": _npz(False), "npz_deflate": _npz(True), "safetensors": _safetensors(),
         "torch_pt": _torch_pt()}
SUFFIX = {"npz": ".npz", "npz_deflate": ".npz", "safetensors": ".safetensors", "torch_pt": ".pt"}

_op = st.tuples(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]),
                st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.integers(1, 64))


def mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for kind, where, byte, n in ops:
        if not b:
            break
        i = int(where * len(b))
        if kind == "flip":
            b[i] ^= 1 << (byte % 8)
        elif kind == "set":
            b[i] = byte
        elif kind == "truncate":
            del b[i:]
        elif kind == "insert":
            b[i:i] = bytes([byte]) * n
        else:
            del b[i:i + n]
    return bytes(b)


def read_everything(path: Path) -> int:
    """What conversion does with a source: keys, every shape and dtype, every tensor."""
    src = open_source(path)
    try:
        n = 0
        for k in src.keys():
            shape = src.shape(k)
            a = src.get(k)
            assert tuple(a.shape) == tuple(shape)
            src.dtype(k)
            n += a.size
        return n
    finally:
        src.close()


_DIR = Path(tempfile.mkdtemp(prefix="vitconv-fuzz-"))


def _check(kind: str, data: bytes) -> None:
    p = _DIR / f"fuzz{SUFFIX[kind]}"
    p.write_bytes(data)
    try:
        read_everything(p)
    except VitconvError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)


def test_seeds_are_valid():
    """Unmutated, every seed reads back exactly: the fuzzing starts from good files."""
    for kind, data in SEEDS.items():
        p = _DIR / f"seed{SUFFIX[kind]}"
        p.write_bytes(data)
        src = open_source(p)
        got = {k.replace("model.", ""): src.get(k) for k in src.keys()}
        assert got.keys() == _arrays().keys(), kind
        for k, v in _arrays().items():
            np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("kind", sorted(SEEDS))
@FUZZ
@given(ops=st.lists(_op, min_size=1, max_size=4))
def test_mutated_bytes_give_success_or_vitconv_error(kind, ops):
    _check(kind, mutate(SEEDS[kind], ops))


@FUZZ
@given(header=st.binary(max_size=200), declared=st.integers(0, 2**64 - 1), tail=st.binary(max_size=64))
def test_safetensors_arbitrary_header(header, declared, tail):
    """The header length and JSON are the attack surface: arbitrary bytes in both."""
    _check("safetensors", struct.pack("<Q", declared) + header + tail)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=3))
def test_mutated_google_checkpoint_through_conversion(ops):
    """Past the readers: layout detection, inference, the audit and the mapping see the
    mutated file too (a flipped header byte changes a shape, not just a CRC)."""
    p = _DIR / "google.npz"
    p.write_bytes(mutate(golden_path("jax/tiny_token_p8_32.npz").read_bytes(), ops))
    try:
        with open_checkpoint(p) as c:
            c.state_dict()
    except VitconvError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(STRUCTURAL_EDIT_KINDS), st.integers(0, 70)),
                      min_size=1, max_size=3))
def test_structurally_mutated_google_arrays(edits):
    """Byte flips mostly hit CRCs; this edits the arrays themselves (a dimension, the rank,
    a missing or renamed key), the way a wrong or hand-edited checkpoint goes wrong."""
    with np.load(golden_path("jax/tiny_token_p8_32.npz")) as z:
        a = structurally_edited({k: z[k] for k in z.files}, edits)
    try:
        open_checkpoint("edited.npz", source=DictSource(a, path="edited.npz")).state_dict()
    except VitconvError as e:
        assert str(e).startswith("edited.npz: ") and "\n" not in str(e)


_CANONICAL: dict = {}


def _canonical_bytes() -> bytes:
    """The golden model as vitconv writes it (the file ``verify`` compares against)."""
    if not _CANONICAL:
        import vitconv

        p = _DIR / "canonical-seed.safetensors"
        vitconv.convert(golden_path("jax/tiny_token_p8_32.npz"), p, hash_source=False)
        _CANONICAL["raw"] = p.read_bytes()
    return _CANONICAL["raw"]


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=3), side=st.sampled_from(["source", "converted"]))
def test_verify_on_mutated_inputs(ops, side):
    """``verify`` reads both of its inputs through the conversion's readers: a mutated source
    (the NumPy reference's input) or a mutated converted file gives a report (agreeing or
    not) or the project's own error naming the file, nothing else."""
    from vitconv.verification.verify import verify

    golden = golden_path("jax/tiny_token_p8_32.npz")
    if side == "source":
        p = _DIR / "verify-source.npz"
        p.write_bytes(mutate(golden.read_bytes(), ops))
        args = (p, None)
    else:
        p = _DIR / "verify-converted.safetensors"
        p.write_bytes(mutate(_canonical_bytes(), ops))
        args = (golden, p)
    try:
        report = verify(*args, batch=1)
        assert report.stages
    except VitconvError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)


def test_safetensors_read_after_the_file_shrank_names_the_tensor(tmp_path):
    """The header is validated at open; the data is read later, tensor by tensor. A file cut
    short in between is a one-line error naming the tensor, not a short array."""
    from safetensors.numpy import save_file

    from vitconv.errors import BadInputError

    path = tmp_path / "a.safetensors"
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}, str(path))
    with open_source(path) as src:
        assert src.get("b").tolist() == [1.0] * 5
        path.write_bytes(path.read_bytes()[:-4 * 4 - 10])  # 'b' gone, 'a' cut
        with pytest.raises(BadInputError, match=r"tensor 'a' could not be read"):
            src.get("a")


def test_safetensors_widens_bfloat16_and_float8_as_torch_does(tmp_path):
    """bfloat16 and float8 are read without torch and widened to float32 bit for bit as
    ``torch.Tensor.float()`` widens them."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g) * 40
    tensors = {"bf": x.bfloat16(), "e4": x.to(torch.float8_e4m3fn), "e5": x.to(torch.float8_e5m2)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with open_source(tmp_path / "w.safetensors") as src:
        for k, t in tensors.items():
            got = src.get(k)
            assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), t.float().numpy().view(np.uint32)), k
        assert [src.stored_dtype(k) for k in ("bf", "e4", "e5")] == ["bfloat16", "float8_e4m3fn", "float8_e5m2"]
