"""Sharded checkpoints read back through their index: vitconv's own sharded output and a real
``transformers`` ``save_pretrained`` split into shards; a stale or hostile index is refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import CASES, golden_expected, golden_input, golden_path
from vitconv.conversion.loading import load
from vitconv.errors import BadInputError
from vitconv.formats.npz import NpzSource
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _sharded(tmp_path):
    case = CASES["tiny_token_p8_32"]
    convert(golden_path(case["checkpoint"]), tmp_path / "model.safetensors", ConvertOptions(shard_bytes=20_000))
    index = tmp_path / "model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2
    return case, index


def test_vitconv_sharded_output_loads_and_converts_back_bitwise(tmp_path):
    case, index = _sharded(tmp_path)
    model = load(index)
    with torch.no_grad():
        got = model(golden_input(case)).numpy()
    assert np.abs(got - golden_expected(case, "logits")).max() <= 2e-5
    report = convert(index, tmp_path / "back.npz")
    assert report.layout == "canonical"
    a, b = NpzSource(golden_path(case["checkpoint"])), NpzSource(tmp_path / "back.npz")
    assert sorted(a.keys()) == sorted(b.keys()) and all(np.array_equal(a.get(k), b.get(k)) for k in a.keys())


def test_transformers_sharded_directory_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    case = CASES["tiny_token_p8_32"]
    convert(golden_path(case["checkpoint"]), tmp_path / "hf")
    hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    hf.save_pretrained(tmp_path / "hf_sharded", max_shard_size="50KB")
    assert (tmp_path / "hf_sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf_sharded" / "model.safetensors").exists()
    model = load(tmp_path / "hf_sharded")
    with torch.no_grad():
        want = hf(golden_input(case)).logits
        assert (model(golden_input(case)) - want).abs().max().item() <= 1e-5


def test_stale_or_hostile_index_is_refused(tmp_path):
    _, index = _sharded(tmp_path)
    doc = json.loads(index.read_text())
    key = sorted(doc["weight_map"])[0]
    shard = doc["weight_map"][key]
    other = next(f for f in sorted(set(doc["weight_map"].values())) if f != shard)
    for change, message in (({key: other}, "disagree"), ({key: "../model.safetensors"}, "not a file name"),
                            ({key: "model-00099-of-00099.safetensors"}, "missing")):
        bad = tmp_path / "bad.safetensors.index.json"
        bad.write_text(json.dumps(dict(doc, weight_map=dict(doc["weight_map"], **change))))
        with pytest.raises(BadInputError, match=message) as e:
            load(bad)
        assert "bad.safetensors.index.json" in str(e.value)
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="not valid JSON"):
        load(bad)
