"""The source's SHA-256 is hashed on its own thread while the conversion writes, and put in
place of a placeholder when the writer finishes: every output must be byte-for-byte the file
written with the hash known up front, and the recorded hash that of the source's bytes."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import golden_path
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions

SRC = golden_path("jax/tiny_token_p8_32.npz")
DIGEST = hashlib.sha256(SRC.read_bytes()).hexdigest()


def _files(root: Path) -> dict:
    if root.is_dir():
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {p.name: p.read_bytes() for p in sorted(root.parent.glob(root.name.split(".")[0] + "*"))}


@pytest.mark.parametrize("name,shard_bytes", [("m.safetensors", None), ("m.safetensors", 40_000),
                                              ("m.pt", None), ("hf_dir", None)])
def test_the_hash_written_later_gives_the_bytes_of_the_hash_known_up_front(tmp_path, name, shard_bytes):
    later, upfront = tmp_path / "later", tmp_path / "upfront"
    later.mkdir(), upfront.mkdir()
    a = convert(SRC, later / name, ConvertOptions(shard_bytes=shard_bytes))
    b = convert(SRC, upfront / name, ConvertOptions(shard_bytes=shard_bytes, source_sha256=DIGEST))
    assert a.source_sha256 == b.source_sha256 == DIGEST
    got, want = _files(later / name), _files(upfront / name)
    assert len(got) == len(want) >= (3 if shard_bytes else 1)
    assert got == want


def test_every_place_records_the_source_s_own_hash(tmp_path):
    convert(SRC, tmp_path / "m.safetensors", ConvertOptions(shard_bytes=40_000))
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    assert index["metadata"]["source_sha256"] == DIGEST
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(tmp_path / shard, "np") as f:
            assert f.metadata()["source_sha256"] == DIGEST
    convert(SRC, tmp_path / "m.pt")
    assert zipfile.ZipFile(tmp_path / "m.pt").testzip() is None  # data.pkl's CRC-32 rewritten too
    assert torch.load(tmp_path / "m.pt", weights_only=True)["source_sha256"] == DIGEST


def test_a_pt_hands_on_every_provenance_string_it_records(tmp_path):
    """A vitconv ``.pt`` keeps what a safetensors header keeps, the batch's row and the source's
    fingerprint included: a manifest rerun decides from them for either kind of output."""
    from vitconv.formats.open import open_source

    extra = {"vitconv_batch_row": '{"src": "a"}', "vitconv_source_fingerprint": "file:1:2"}
    for name in ("m.pt", "m.safetensors"):
        convert(SRC, tmp_path / name, ConvertOptions(metadata=extra))
        with open_source(tmp_path / name) as src:
            meta = src.metadata
        assert {k: meta.get(k) for k in extra} == extra, name
        assert meta["source_sha256"] == DIGEST and meta["source"] == SRC.name
    with open_source(tmp_path / "m.pt") as a, open_source(tmp_path / "m.safetensors") as b:
        pt, st = dict(a.metadata), dict(b.metadata)
    assert json.loads(pt.pop("vitconv_config")) == json.loads(st.pop("vitconv_config"))
    st.pop("format")  # safetensors' own "pt"
    assert pt == st
