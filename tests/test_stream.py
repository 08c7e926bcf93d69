"""Streaming conversion, its writers and the synthetic generator.

References are independent of the code under test: the non-streaming path
(``convert_file`` -> ``safetensors.torch.save_file`` / ``torch.save``), files read back
with ``safetensors.safe_open``, ``torch.load`` and ``zipfile`` CRC checks, and timm's
published parameter counts for the presets.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import CASES, golden_path
from vitconv.config import ViTConfig
from vitconv.convert import convert_file
from vitconv.errors import OutputError
from vitconv.formats.safetensors_stream import SafetensorsStreamWriter, TensorSpec
from vitconv.formats import open_source
from vitconv.layouts import read_layout
from vitconv.stream import stream_convert
from vitconv.synthetic import PRESETS, google_shapes, make_synthetic, preset

CKPTS = sorted({c["checkpoint"] for c in CASES.values()})


def _split(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.mark.parametrize("ckpt", CKPTS)
def test_streamed_safetensors_equals_save_file(ckpt, tmp_path):
    src = golden_path(ckpt)
    convert_file(src, tmp_path / "a.safetensors")
    report = stream_convert(src, tmp_path / "b.safetensors")
    head_a, data_a = _split(tmp_path / "a.safetensors")
    head_b, data_b = _split(tmp_path / "b.safetensors")
    assert head_b == head_a            # same dtypes, shapes, offsets and metadata
    assert data_b == data_a            # byte-identical tensor data, same layout
    with safe_open(tmp_path / "a.safetensors", "np") as fa, safe_open(tmp_path / "b.safetensors", "np") as fb:
        assert sorted(fb.keys()) == sorted(fa.keys())
        for k in fa.keys():
            np.testing.assert_array_equal(fb.get_tensor(k), fa.get_tensor(k))
    assert report.num_params == sum(int(np.prod(v["shape"])) for k, v in head_a.items()
                                    if k != "__metadata__")


@pytest.mark.parametrize("ckpt", ["jax/tiny_token_p8_32.npz", "jax/tiny_r50_32.npz"])
def test_streamed_pt_equals_torch_save(ckpt, tmp_path):
    src = golden_path(ckpt)
    convert_file(src, tmp_path / "a.pt", image_size=48 if "p8_32" in ckpt else None)
    stream_convert(src, tmp_path / "b.pt", image_size=48 if "p8_32" in ckpt else None)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert {k: v for k, v in b.items() if k != "state_dict"} == {k: v for k, v in a.items() if k != "state_dict"}
    assert list(b["state_dict"]) == list(a["state_dict"])
    for k, t in a["state_dict"].items():
        assert b["state_dict"][k].dtype == t.dtype and torch.equal(b["state_dict"][k], t), k
    with zipfile.ZipFile(tmp_path / "b.pt") as zf:
        assert zf.testzip() is None  # every CRC-32 filled in and correct


def test_sharding_and_index(tmp_path):
    src = golden_path("jax/tiny_gap_p8_32.npz")
    convert_file(src, tmp_path / "ref.safetensors")
    report = stream_convert(src, tmp_path / "model.safetensors", shard_bytes=20_000)
    index_path = tmp_path / "model.safetensors.index.json"
    assert report.output == str(index_path)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads(index_path.read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    with safe_open(tmp_path / "ref.safetensors", "np") as ref:
        ref_keys = sorted(ref.keys())
        assert sorted(index["weight_map"]) == ref_keys
        total = 0
        for shard in shards:
            with safe_open(tmp_path / shard, "np") as f:
                data = _split(tmp_path / shard)[1]
                assert len(data) <= 20_000 or len(f.keys()) == 1
                total += len(data)
                for k in f.keys():
                    assert index["weight_map"][k] == shard
                    np.testing.assert_array_equal(f.get_tensor(k), ref.get_tensor(k))
        assert index["metadata"]["total_size"] == total
    assert not list(tmp_path.glob(".*"))  # no temporaries left


def test_writer_refuses_mismatch_and_leaves_nothing(tmp_path):
    specs = [TensorSpec("a", np.dtype(np.float32), (2, 3)), TensorSpec("b", np.dtype(np.float32), (4,))]
    with pytest.raises(OutputError, match="does not match"):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", np.zeros((2, 3), np.float32))
            w.write("b", np.zeros((5,), np.float32))
    with pytest.raises(OutputError, match="never written"):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", np.zeros((2, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_every_tensor(tmp_path):
    calls = []
    stream_convert(golden_path("jax/tiny_token_p8_32.npz"), tmp_path / "o.safetensors",
                   progress=lambda done, total, name: calls.append((done, total, name)))
    with safe_open(tmp_path / "o.safetensors", "np") as f:
        keys = list(f.keys())
        nbytes = sum(f.get_tensor(k).nbytes for k in keys)
    assert sorted(c[2] for c in calls) == sorted(keys)
    assert calls[-1][:2] == (nbytes, nbytes)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


# timm's published parameter counts (vit_*_patch16_224 / vit_huge_patch14_224, 1000 classes).
TIMM_PARAMS = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632,
               "H/14": 632_045_800}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_presets_have_published_sizes(name):
    shapes = google_shapes(preset(name))
    assert sum(int(np.prod(s)) for s in shapes.values()) == TIMM_PARAMS[name]
    assert shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"] == (
        preset(name).width, preset(name).num_heads, preset(name).head_dim)


@pytest.mark.parametrize("cfg", [
    ViTConfig(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, head_dim=16, mlp_dim=64,
              num_classes=10),
    ViTConfig(image_size=32, patch_size=8, width=32, depth=2, num_heads=4, head_dim=8, mlp_dim=48,
              num_classes=5, classifier="gap", representation_size=24),
    ViTConfig(image_size=32, patch_size=1, width=32, depth=1, num_heads=2, head_dim=16, mlp_dim=64,
              num_classes=7, resnet_layers=(1, 1), resnet_width=32),
], ids=["token", "gap_prelogits", "hybrid"])
def test_synthetic_is_inferred_as_its_config(cfg, tmp_path):
    path = tmp_path / "syn.npz"
    make_synthetic(cfg, path, seed=3)
    with open_source(path) as src:
        assert read_layout(src).config == cfg
    with np.load(path, allow_pickle=False) as z:
        names = list(z.files)
        assert names == sorted(names)  # Google's member order
        assert all(np.isfinite(z[k]).all() and z[k].dtype == np.float32 for k in names)
    make_synthetic(cfg, tmp_path / "again.npz", seed=3)
    assert (tmp_path / "again.npz").read_bytes() == path.read_bytes()  # seeded: reproducible


def test_preset_names():
    assert preset("ViT-B/16") == preset("b16") == PRESETS["B/16"]
    with pytest.raises(KeyError):
        preset("Z/99")


def test_failure_while_setting_up_a_streamed_pt_leaves_no_file(tmp_path, monkeypatch):
    """A writer that fails after its temporary exists must not rename it into place
    (regression: unwinding the ExitStack with close() exited atomic_output as a success)."""
    from vitconv.formats import torch_pt_stream
    from vitconv.stream import stream_convert

    def broken_pickle(*a, **k):
        raise RuntimeError("disk went away")

    # data.pkl is the first record: the temporary and its zip writer exist by then.
    monkeypatch.setattr(torch_pt_stream, "dumps", broken_pickle)
    out = tmp_path / "out.pt"
    with pytest.raises(RuntimeError, match="disk went away"):
        stream_convert(golden_path("jax/tiny_token_p8_32.npz"), out)
    assert os.listdir(tmp_path) == []
