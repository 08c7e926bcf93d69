"""A model directory's ``config.json`` is decoded once, where the directory is opened, and every
reader after that (detection, inference, the restated-keys check, preprocessing and labels,
inspect) gets that one read-only mapping; a malformed one is refused in one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from _vitconv_cli.main import main
from conftest import golden_path
from vitconv.formats.open import open_source
from vitconv.tools.inspection import inspect_checkpoint
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions
from vitconv.layouts import Probe

SRC = golden_path("jax/tiny_token_p8_32.npz")


@pytest.fixture(scope="module")
def directories(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dirs")
    out = {"hf": root / "hf", "timm": root / "timm"}
    convert(SRC, out["hf"])
    convert(SRC, out["timm"], ConvertOptions(to="timm"))
    return out


def _decodes(monkeypatch, document: dict) -> list:
    """Every ``json.loads`` anywhere that yields ``document``."""
    real, seen = json.loads, []

    def counting(text, *args, **kwargs):
        value = real(text, *args, **kwargs)
        if value == document:
            seen.append(text)
        return value
    monkeypatch.setattr(json, "loads", counting)
    return seen


@pytest.mark.parametrize("kind", ["hf", "timm"])
def test_config_json_is_decoded_once_per_read(directories, kind, monkeypatch, tmp_path):
    src = directories[kind]
    document = json.loads((src / "config.json").read_text(encoding="utf-8"))
    assert document  # what a directory of this kind records
    seen = _decodes(monkeypatch, document)
    report = convert(src, tmp_path / "m.pt")
    assert report.layout == ("hf" if kind == "hf" else "timm") and len(seen) == 1, (report.layout, len(seen))
    seen.clear()
    inspect_checkpoint(src)
    assert len(seen) == 1


def test_every_reader_gets_the_one_read_only_mapping(directories):
    with open_source(directories["hf"]) as source:
        config = source.documents["config.json"]
        assert config == json.loads((directories["hf"] / "config.json").read_text(encoding="utf-8"))
        assert Probe.of(source, {}).config is config
        assert "preprocessor_config.json" in source.documents
        for change in (lambda: config.__setitem__("hidden_act", "relu"), lambda: config.pop("hidden_act"),
                       lambda: config.update(hidden_act="relu"), lambda: config.setdefault("x", 1)):
            with pytest.raises(TypeError, match="read-only"):
                change()
        nested = next(v for v in config.values() if isinstance(v, (dict, list)))
        with pytest.raises(TypeError, match="read-only"):
            nested.clear()
        assert {**config, "hidden_act": "relu"}["hidden_act"] == "relu"  # a copy is the caller's
    with open_source(SRC) as single:
        assert dict(single.documents) == {} and Probe.of(single, {}).config == {}


@pytest.mark.parametrize("name,text,words", [
    ("config.json", "{\"hidden_size\": 64,", "config.json is not valid JSON"),
    ("config.json", "[1, 2]", "config.json is not a JSON object"),
    ("config.json", "[" * 100_000, "config.json is not usable JSON"),
    ("preprocessor_config.json", "{]", "preprocessor_config.json is not valid JSON"),
], ids=["truncated", "an-array", "nested-too-deep", "preprocessor"])
def test_a_malformed_document_is_one_line_naming_the_file(directories, tmp_path, name, text, words):
    src = tmp_path / "hf"
    src.mkdir()
    for f in directories["hf"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / name).write_text(text, encoding="utf-8")
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "m.pt")])
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(src / name) in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "m.pt").exists()
