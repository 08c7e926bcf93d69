"""Provenance has one schema (:mod:`vitconv.formats.provenance`): every key an output records is a
row of it, every writer writes through it and every reader keeps all of it. The files are read
back with torch's and safetensors' own readers, the expected values are literal strings."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from conftest import golden_path
from vitconv.conversion.service import convert as card_convert
from vitconv.conversion.options import ConvertOptions
from vitconv.formats.provenance import KEY_OF, Provenance
from vitconv.conversion.pipeline import convert

SRC = golden_path("jax/tiny_token_p8_32.npz")
ROOT = Path(__file__).resolve().parents[1]
#: What a newer vitconv might record that this one does not know.
NEWER = {"vitconv_future_field": '{"kept": [1, 2]}'}


def _header(path: Path) -> dict:
    with safe_open(path, "np") as f:
        return dict(f.metadata())


def _pt_strings(path: Path) -> dict:
    obj = torch.load(path, weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, str)}


def test_every_vitconv_key_the_code_names_is_a_row_of_the_schema():
    """No module spells a ``vitconv_*`` key of its own: a new key is added to the schema, where
    every writer and reader sees it."""
    found = {}
    for path in [*ROOT.joinpath("vitconv").rglob("*.py"), *ROOT.joinpath("cli").rglob("*.py")]:
        if path.name == "provenance.py":
            continue
        for key in re.findall(r"[\"'](vitconv_[a-z0-9_]+)[\"']", path.read_text(encoding="utf-8")):
            found.setdefault(key, path.relative_to(ROOT).as_posix())
    assert {k: p for k, p in found.items() if k not in KEY_OF.values()} == {}


def test_the_schema_reads_what_it_writes_in_the_order_outputs_have_always_had():
    meta = {"vitconv_config": "{}", "vitconv_preprocessing": "{}", "vitconv_labels": "imagenet",
            "source_sha256": "ab" * 32, "source": "a.npz", "vitconv_version": "0.1.0", "vitconv_arch": "vit_x",
            "vitconv_batch_row": '{"to": "timm"}', "vitconv_source_fingerprint": "file:1:2",
            "vitconv_verified": "true", **NEWER}
    shuffled = dict(reversed(list(meta.items())))
    read = Provenance.from_metadata({**shuffled, "format": "pt", "total_size": "9", "opset": "17"})
    assert list(read.metadata().items()) == list(meta.items())
    assert read.verified is True and read.batch_row == '{"to": "timm"}' and dict(read.other) == NEWER
    assert Provenance.from_metadata({"vitconv_verified": "no"}).metadata() == {}
    assert Provenance.from_metadata({"mine": "x"}).metadata() == {}
    assert Provenance.of({"mine": "x"}).metadata() == {"mine": "x"}  # a caller's own strings are kept


def test_a_vitconv_source_hands_on_its_architecture_and_unknown_keys_but_not_its_write(tmp_path):
    """What describes the model travels (the architecture it was read as, keys of a newer
    vitconv); what describes the write that made the source (its source, hash, batch row,
    verification) is recorded afresh or not at all."""
    first = tmp_path / "first.safetensors"
    given = {"vitconv_arch": "vit_tiny_test", "vitconv_batch_row": "{}", "vitconv_source_fingerprint": "file:1:2",
             **NEWER}
    card_convert(SRC, first, ConvertOptions(verify=True, metadata=given))
    recorded = _header(first)
    assert recorded["vitconv_verified"] == "true" and recorded["vitconv_arch"] == "vit_tiny_test"
    assert recorded["vitconv_future_field"] == NEWER["vitconv_future_field"]
    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    for name in ("second.pt", "second.safetensors", "second_hf"):
        convert(first, tmp_path / name)
        out = tmp_path / name
        meta = (_pt_strings(out) if name.endswith(".pt") else
                _header(out / "model.safetensors" if out.is_dir() else out))
        assert meta["vitconv_arch"] == "vit_tiny_test", name
        assert meta["vitconv_future_field"] == NEWER["vitconv_future_field"], name
        assert meta["source"] == "first.safetensors" and meta["source_sha256"] == digest, name
        assert not {"vitconv_verified", "vitconv_batch_row", "vitconv_source_fingerprint"} & set(meta), name
    # and back again: the .pt hands them on as the safetensors header did
    convert(tmp_path / "second.pt", tmp_path / "third.safetensors")
    third = _header(tmp_path / "third.safetensors")
    assert third["vitconv_arch"] == "vit_tiny_test" and third["source"] == "second.pt"
    assert third["vitconv_future_field"] == NEWER["vitconv_future_field"]


def test_a_pt_records_every_key_a_safetensors_header_records(tmp_path):
    extra = {"vitconv_batch_row": '{"src": "a"}', "vitconv_source_fingerprint": "file:1:2", **NEWER}
    card_convert(SRC, tmp_path / "m.pt", ConvertOptions(verify=True, metadata=extra))
    card_convert(SRC, tmp_path / "m.safetensors", ConvertOptions(verify=True, metadata=extra))
    pt, st = _pt_strings(tmp_path / "m.pt"), _header(tmp_path / "m.safetensors")
    assert st.pop("format") == "pt" and pt.pop("format") == "vitconv"  # each container's own
    assert json.loads(st.pop("vitconv_config")) == torch.load(tmp_path / "m.pt", weights_only=True)["config"]
    assert pt == st
    assert {k: pt[k] for k in ("vitconv_verified", *extra)} == {"vitconv_verified": "true", **extra}


def test_recorded_class_names_that_do_not_fit_the_head_are_left_out_and_said(tmp_path):
    """Names a file records for another number of classes (2 for a 10-class head) are not
    written on, nor guessed at: left out, and the read says so (it used to say nothing)."""
    from safetensors.numpy import load_file, save_file

    convert(SRC, tmp_path / "a.safetensors", ConvertOptions(labels=tuple(f"c{i}" for i in range(10))))
    meta = _header(tmp_path / "a.safetensors")
    assert json.loads(meta[KEY_OF["labels"]]) == [f"c{i}" for i in range(10)]
    meta[KEY_OF["labels"]] = json.dumps(["cat", "dog"])
    save_file(load_file(tmp_path / "a.safetensors"), tmp_path / "b.safetensors", metadata=meta)
    report = convert(tmp_path / "b.safetensors", tmp_path / "c.safetensors")
    assert "the file's 2 class names do not fit its 10 classes: left out (name them with --labels)" in report.notes
    assert KEY_OF["labels"] not in _header(tmp_path / "c.safetensors")
    kept = convert(tmp_path / "a.safetensors", tmp_path / "d.safetensors")
    assert not any("class names do not fit" in n for n in kept.notes)
