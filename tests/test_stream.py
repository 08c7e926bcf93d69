"""The one conversion path's writers, each against an independent writer of the same format:
``safetensors.torch.save_file`` (byte for byte, header included), ``torch.save`` (what
``torch.load`` returns, key order included), ``np.savez`` (every member's bytes, Google's
member order); and the synthetic generator against timm's published parameter counts.

The tensors handed to the reference writers come from ``open_checkpoint(...).state_dict()``
and the layout's table; whether that mapping is right is the golden tests' business (Google's
logits). What is checked here is that streaming, ordering and headers change nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import CASES, GOOGLE_CASES, golden_path
import vitconv
from vitconv.conversion.loading import build_model
from vitconv.config import ViTConfig
from vitconv.errors import OutputError
from vitconv.formats import open_source
from vitconv.formats.base import BFLOAT16, TensorSpec
from vitconv.formats.safetensors_stream import SafetensorsStreamWriter
from vitconv.conversion.pipeline import LAYOUTS, convert, map_state, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions
from vitconv.tools.synthetic import PRESETS, google_shapes, make_synthetic, preset

CKPTS = sorted({c["checkpoint"] for c in CASES.values()})
#: what each bare checkpoint's keys leave open (golden cases' "set")
TOLD = {c["checkpoint"]: c.get("set") or {} for c in CASES.values()}
GOOGLE_CKPTS = sorted({c["checkpoint"] for c in GOOGLE_CASES.values()})  # what an .npz can hold


def _split(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _torch_state(arrays):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


@pytest.mark.parametrize("ckpt", CKPTS)
def test_canonical_safetensors_equals_save_file(ckpt, tmp_path):
    src = golden_path(ckpt)
    report = convert(src, tmp_path / "b.safetensors", ConvertOptions(overrides=TOLD[ckpt]))
    with open_checkpoint(src, ReadOptions(overrides=TOLD[ckpt])) as c:
        meta = {"format": "pt", "vitconv_config": c.config.to_json(), **c.usage.metadata(),
                "source_sha256": report.source_sha256, "source": src.name, "vitconv_version": vitconv.__version__}
        save_file(_torch_state(c.state_dict()), str(tmp_path / "a.safetensors"), metadata=meta)
    # save_file orders __metadata__ keys at random (a Rust HashMap): compare the parsed header,
    # whose data_offsets fix every tensor's place, and the data section byte for byte.
    head, data = _split(tmp_path / "a.safetensors")
    assert _split(tmp_path / "b.safetensors") == (head, data)
    assert (tmp_path / "b.safetensors").stat().st_size == (tmp_path / "a.safetensors").stat().st_size
    assert report.num_params == sum(int(np.prod(v["shape"])) for k, v in head.items() if k != "__metadata__")


@pytest.mark.parametrize("to,dst", [("timm", "t.safetensors"), ("hf", "hf_dir")])
def test_foreign_safetensors_equal_save_file(to, dst, tmp_path):
    src = golden_path("jax/tiny_prelogits_p8_32.npz" if to == "timm" else "jax/tiny_token_p8_32.npz")
    report = convert(src, tmp_path / dst, ConvertOptions(to=to))
    out = tmp_path / dst / "model.safetensors" if to == "hf" else tmp_path / dst
    with open_checkpoint(src) as c:
        arrays = map_state(c.state_dict(), c.config, LAYOUTS[report.target_layout])
    provenance = {"source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "source": src.name,
                  "vitconv_version": vitconv.__version__}
    save_file(_torch_state(arrays), str(tmp_path / "ref.safetensors"), metadata={"format": "pt", **provenance})
    assert _split(out) == _split(tmp_path / "ref.safetensors")  # metadata key order is save_file's own


@pytest.mark.parametrize("ckpt", ["jax/tiny_token_p8_32.npz", "jax/tiny_r50_32.npz"])
def test_canonical_pt_loads_as_torch_save_would_write_it(ckpt, tmp_path):
    src = golden_path(ckpt)
    size = 48 if "p8_32" in ckpt else None
    report = convert(src, tmp_path / "b.pt", ConvertOptions(image_size=size))
    with open_checkpoint(src, ReadOptions(image_size=size)) as c:  # the torch module's own state_dict order
        ref = {"format": "vitconv", "format_version": 1, "config": c.config.to_dict(),
               "state_dict": build_model(c.config, c.state_dict()).state_dict(),
               **c.usage.metadata(), "source_sha256": report.source_sha256, "source": src.name,
               "vitconv_version": vitconv.__version__}
    torch.save(ref, tmp_path / "a.pt")
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert list(b) == list(a)
    assert {k: v for k, v in b.items() if k != "state_dict"} == {k: v for k, v in a.items() if k != "state_dict"}
    assert list(b["state_dict"]) == list(a["state_dict"])  # state-dict order
    for k, t in a["state_dict"].items():
        assert b["state_dict"][k].dtype == t.dtype and torch.equal(b["state_dict"][k], t), k
    with zipfile.ZipFile(tmp_path / "b.pt") as zf:
        assert zf.testzip() is None  # every CRC-32 filled in and correct


def test_foreign_pt_is_a_bare_state_dict_in_sorted_order(tmp_path):
    src = golden_path("jax/tiny_token_p8_32.npz")
    convert(src, tmp_path / "j.pth", ConvertOptions(to="jeonsworld"))
    with open_checkpoint(src) as c:
        ref = map_state(c.state_dict(), c.config, LAYOUTS["jeonsworld"])
    got = torch.load(tmp_path / "j.pth", weights_only=True)
    assert list(got) == sorted(ref)
    for k, v in ref.items():
        assert got[k].numpy().tobytes() == v.tobytes(), k


@pytest.mark.parametrize("ckpt", GOOGLE_CKPTS)
def test_npz_equals_np_savez_member_for_member(ckpt, tmp_path):
    """Written from the canonical .safetensors back to .npz: every member as np.savez writes it
    (same .npy bytes, Google's sorted member order), so the source comes back bit for bit."""
    src = golden_path(ckpt)
    convert(src, tmp_path / "c.safetensors")
    convert(tmp_path / "c.safetensors", tmp_path / "back.npz")
    with np.load(src, allow_pickle=False) as z:
        np.savez(tmp_path / "ref.npz", **{k: z[k] for k in sorted(z.files)})
    with zipfile.ZipFile(tmp_path / "back.npz") as got, zipfile.ZipFile(tmp_path / "ref.npz") as ref:
        assert got.namelist() == ref.namelist()
        for name in ref.namelist():
            assert got.read(name) == ref.read(name), name
        assert got.testzip() is None


def test_npz_output_is_reproducible(tmp_path):
    src = golden_path("jax/tiny_token_p8_32.npz")
    convert(src, tmp_path / "a.npz")
    convert(src, tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_sharding_and_index(tmp_path):
    src = golden_path("jax/tiny_gap_p8_32.npz")
    convert(src, tmp_path / "ref.safetensors")
    report = convert(src, tmp_path / "model.safetensors", ConvertOptions(shard_bytes=20_000))
    index_path = tmp_path / "model.safetensors.index.json"
    assert report.output == str(index_path)
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads(index_path.read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert [os.path.basename(f) for f in report.files] == shards + [index_path.name]
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


@pytest.mark.parametrize("src,to,out", [
    ("bv/tiny_gap_scan_p8_32.npz", "big_vision", "o.npz"),  # every key, then every query ...
    ("jax/tiny_token_p8_32.npz", None, "o.npz"),  # Google's q/k/v, sorted within each block
    ("jax/tiny_token_p8_32.npz", "hf", "o"),  # a directory: its model.safetensors
])
def test_outputs_past_the_held_bytes_are_read_again_to_the_same_file(src, to, out, tmp_path, monkeypatch):
    """A fused qkv row gives three outputs; those whose turn is not next are held while they fit
    in HELD_BYTES, and the row is read again for the others. Holding nothing must write the
    same bytes, reading each qkv once per output; holding everything, once."""
    import vitconv.conversion.pipeline as pipeline

    reads = []
    real = pipeline.map_to_canonical

    def counting(rules, *args, **kwargs):
        for name, t in real(rules, *args, **kwargs):
            reads.append(name)
            yield name, t
    monkeypatch.setattr(pipeline, "map_to_canonical", counting)
    source = golden_path(src)
    canonical = tmp_path / "c.safetensors"
    convert(source, canonical)
    written, default = {}, pipeline.HELD_BYTES
    for held in (default, 0):
        monkeypatch.setattr(pipeline, "HELD_BYTES", held)
        reads.clear()
        dst = tmp_path / f"{held}_{out}"
        convert(canonical, dst, ConvertOptions(to=to))
        qkv = [n for n in reads if n.endswith("attn.qkv.weight")]
        written[held] = ((dst / "model.safetensors" if dst.is_dir() else dst).read_bytes(), len(qkv))
    (whole, once), (again, thrice) = written[default], written[0]
    assert again == whole and thrice == 3 * once == 3 * 2  # two blocks


@pytest.mark.parametrize("dtype", [np.float32, BFLOAT16])
def test_a_stacked_member_written_in_parts_is_the_whole_array_s_member(dtype, tmp_path):
    """big_vision's scan=True members go to the .npz one block's slice at a time; the member's
    bytes (header and data) must be what np.lib.format writes for the stacked array, and a
    wrong slice, or one too many or too few, fails with nothing left."""
    from vitconv.formats.npz import NpzStreamWriter

    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((5, 7)).astype(np.float32).astype(dtype) for _ in range(3)]
    specs = [TensorSpec("s", np.dtype(dtype), (3, 5, 7)), TensorSpec("t", np.dtype(np.float32), (2,))]
    for name, parts in (("parts.npz", True), ("whole.npz", False)):
        with NpzStreamWriter(tmp_path / name, specs) as w:
            if parts:
                w.write_parts("s", iter(blocks))
            else:
                w.write("s", np.stack(blocks))
            w.write("t", np.ones(2, np.float32))
    members = [zipfile.ZipFile(tmp_path / n).read("s.npy") for n in ("parts.npz", "whole.npz")]
    assert members[0] == members[1] and len(members[0]) > 3 * 5 * 7 * np.dtype(dtype).itemsize
    for wrong in ([*blocks, blocks[0]], blocks[:2], [blocks[0], blocks[1][:4], blocks[2]]):
        with pytest.raises(OutputError, match="parts|does not match"):
            with NpzStreamWriter(tmp_path / "bad.npz", specs) as w:
                w.write_parts("s", iter(wrong))
                w.write("t", np.ones(2, np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts.npz", "whole.npz"]


def test_progress_reports_every_tensor(tmp_path):
    calls = []
    convert(golden_path("jax/tiny_token_p8_32.npz"), tmp_path / "o.safetensors",
            progress=lambda done, total, name: calls.append((done, total, name)))
    with safe_open(tmp_path / "o.safetensors", "np") as f:
        keys = list(f.keys())
        nbytes = sum(f.get_tensor(k).nbytes for k in keys)
    assert sorted(c[2] for c in calls) == sorted(keys)
    assert calls[-1][:2] == (nbytes, nbytes)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


def test_a_failed_check_before_commit_leaves_nothing(tmp_path):
    """The hook sees the finished temporaries; raising there renames nothing into place."""
    seen = []

    def refuse(paths):
        seen.extend(paths)
        assert all(p.is_file() for p in paths)
        raise RuntimeError("no")

    for dst in ("x.safetensors", "x.pt", "x.npz", "xdir"):
        with pytest.raises(RuntimeError, match="no"):
            convert(golden_path("jax/tiny_token_p8_32.npz"), tmp_path / dst, hook=lambda w: refuse(w.temporaries))
    assert seen and list(tmp_path.iterdir()) == []


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
              num_classes=5, classifier="gap", class_token=False, representation_size=24),
    ViTConfig(image_size=32, patch_size=1, width=32, depth=1, num_heads=2, head_dim=16, mlp_dim=64,
              num_classes=7, resnet_layers=(1, 1), resnet_width=32),
], ids=["token", "gap_prelogits", "hybrid"])
def test_synthetic_is_inferred_as_its_config(cfg, tmp_path):
    path = tmp_path / "syn.npz"
    make_synthetic(cfg, path, seed=3)
    with open_checkpoint(path) as c:
        assert c.config == cfg
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

    def broken_pickle(*a, **k):
        raise RuntimeError("disk went away")

    # data.pkl is the first record: the temporary and its zip writer exist by then.
    monkeypatch.setattr(torch_pt_stream, "dumps", broken_pickle)
    out = tmp_path / "out.pt"
    with pytest.raises(RuntimeError, match="disk went away"):
        convert(golden_path("jax/tiny_token_p8_32.npz"), out)
    assert os.listdir(tmp_path) == []
