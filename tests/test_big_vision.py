"""big_vision ``.npz`` files (``golden/bv``: written by big_vision's own saver, outputs from its
own model code): every case reproduces big_vision's logits, ``pre_logits``, ``head_input`` and
``encoded`` through ``npz2pt`` and ``vitconv.load``; writes back bitwise (plain, scan-stacked,
bfloat16); reads a stacked file slice by slice and a bfloat16 file without JAX; and reaches
timm and Hugging Face SigLIP, checked there against big_vision's outputs."""

from __future__ import annotations

import json
import os
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import vitconv
from _vitconv_cli.main import main
from conftest import GOLDEN
from vitconv.formats.npz import NpzSource
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions

BV = GOLDEN / "bv"
UPSTREAM = json.loads((BV / "manifest.json").read_text())
VARIANTS = {c["name"]: c for c in UPSTREAM["variants"]}
#: big_vision's output file -> the canonical stage holding it
STAGES = {"logits": "logits", "pre_logits": "head_input", "head_input": "pooled", "encoded": "encoded"}
TOL = 2e-5


def _inputs(size):
    return torch.from_numpy(np.load(BV / f"inputs_{size}.npy").transpose(0, 3, 1, 2).copy())


def _check_outputs(model, name, size):
    with torch.no_grad():
        got = model.forward_stages(_inputs(size))
    for what, stage in STAGES.items():
        want = np.load(BV / f"{name}.{what}.npy")
        err = float(np.abs(got[stage].numpy() - want).max())
        assert err <= TOL, f"{name} {what}: {err:.3g}"
        assert float(np.abs(want).max()) > 0.1


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_npz2pt_and_load_reproduce_big_vision(name, tmp_path):
    case = VARIANTS[name]
    size = case["resolution"]
    sincos = ["--image-size", str(size)] if case["posemb"] == "sincos2d" else []  # a sincos file records none
    r = CliRunner().invoke(main, ["npz2pt", str(BV / case["checkpoint"]), "-o", str(tmp_path / "c.safetensors"), *sincos])
    assert r.exit_code == 0, r.output
    _check_outputs(vitconv.load(tmp_path / "c.safetensors"), name, size)
    _check_outputs(vitconv.load(BV / case["checkpoint"], image_size=size if sincos else None), name, size)
    with open_checkpoint(BV / case["checkpoint"]) as ckpt:
        cfg = ckpt.config
        assert ckpt.layout.name == "big_vision"
        assert cfg.classifier == {"tok": "token", "gap": "gap", "map": "map"}[case["pool_type"]]
        assert cfg.scan == bool(case["scan"]) and (cfg.pos_resize == "sincos2d") == (case["posemb"] == "sincos2d")
        assert (cfg.num_heads, cfg.mlp_dim, cfg.depth) == (case["num_heads"], case["mlp_dim"], case["depth"])
        assert bool(cfg.representation_size) == bool(case["rep_size"])
        if case["kind"] == "two_towers":  # the text tower is said to be left out
            assert any("text tower" in n for n in ckpt.notes) and all(k.startswith("params/") for k in ckpt.ignored)
            assert not any(k.startswith("params/img/") for k in ckpt.ignored)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_the_numpy_reference_reproduces_big_vision_reading_one_tensor_at_a_time(name, monkeypatch):
    """The reference verify uses for big_vision files, against big_vision's own outputs, every
    variant. It reads the file as its forward pass goes: each member once, a stacked
    (``scan=True``) member one block's slice at a time, never whole."""
    from vitconv.verification.references.big_vision_numpy import BigVisionReference
    from vitconv.formats.npz import NpzSource

    case = VARIANTS[name]
    whole, sliced = [], []
    get, get_index = NpzSource.get, NpzSource.get_index
    monkeypatch.setattr(NpzSource, "get", lambda self, k: whole.append(k) or get(self, k))
    monkeypatch.setattr(NpzSource, "get_index", lambda self, k, i: sliced.append((k, i)) or get_index(self, k, i))
    ref = BigVisionReference.from_npz(BV / case["checkpoint"])
    x = np.load(BV / f"inputs_{case['resolution']}.npy")
    got = ref.forward_stages(x)
    ref.close()
    for what, stage in STAGES.items():
        want = np.load(BV / f"{name}.{what}.npy")
        assert float(np.abs(got[stage] - want).max()) <= TOL, f"{name} {what}"
    assert not any("/encoderblock/" in k for k in whole)  # a stacked member: never read whole
    assert len(set(sliced)) == len(sliced) and (len(sliced) > 0) == bool(case["scan"])
    assert len(whole) == len(set(whole)) > 4  # each member once


def test_resize_on_load_is_big_vision_s_zoom():
    case = next(c for c in UPSTREAM["posemb_resize_cases"] if c["name"] == "tiny_tok_p8_32_to_48")
    model = vitconv.load(BV / case["source_checkpoint"], image_size=48)
    want = np.load(BV / "tiny_tok_p8_32_to_48.posemb_resized.npy")
    np.testing.assert_array_equal(model.pos_embed.detach().numpy(), want)  # scipy's zoom, as big_vision: bitwise
    _check_outputs(model, "tiny_tok_p8_32_to_48", 48)


def _members(path, prefix):
    """``{name below the model prefix: the member's bytes}`` in file order."""
    with zipfile.ZipFile(path) as z:
        return {n[len(prefix):]: z.read(n) for n in z.namelist() if n.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_writes_back_bitwise(name, tmp_path):
    """Member for member (the .npy header and data), in the same order: directly and through a
    canonical file; a bfloat16 file with --dtype bfloat16. A two-tower file's image tower is
    written as a classifier file is, under params/."""
    case = VARIANTS[name]
    src, prefix = BV / case["checkpoint"], case["image_tower_prefix"]
    dtype = "bfloat16" if case["storage_dtype"] == "bfloat16" else None
    want = _members(src, prefix)
    convert(src, tmp_path / "direct.npz", ConvertOptions(to="big_vision", dtype=dtype))
    assert list(_members(tmp_path / "direct.npz", "params/").items()) == list(want.items())
    convert(src, tmp_path / "c.safetensors", ConvertOptions(dtype=dtype))
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "back.npz"),
                                  "--to", "big_vision", *(["--dtype", dtype] if dtype else [])])
    assert r.exit_code == 0, r.output
    assert list(_members(tmp_path / "back.npz", "params/").items()) == list(want.items())


def test_stacked_blocks_are_read_slice_by_slice(monkeypatch):
    """A scan=True file: no stacked array is read whole; each block's slice is read once."""
    whole, slices = [], []
    get, get_index = NpzSource.get, NpzSource.get_index
    monkeypatch.setattr(NpzSource, "get", lambda self, k: whole.append(k) or get(self, k))
    monkeypatch.setattr(NpzSource, "get_index", lambda self, k, i: slices.append((k, i)) or get_index(self, k, i))
    model = vitconv.load(BV / "tiny_gap_scan_p8_32.npz")
    stacked = [k for k in whole if "encoderblock/" in k]
    assert not stacked, stacked
    assert len(slices) == len(set(slices)) == 2 * len([k for k in _members(BV / "tiny_gap_scan_p8_32.npz", "params/")
                                                       if k.startswith("Transformer/encoderblock/")])
    _check_outputs(model, "tiny_gap_scan_p8_32", 32)


def test_bfloat16_is_read_exactly_without_jax(tmp_path):
    """2-byte void members are bfloat16 bits: widened exactly (checked against ml_dtypes, not our
    bit shift), with no JAX imported; --dtype bfloat16 keeps them as BF16 in safetensors and .pt."""
    src = BV / "tiny_siglip_map_bf16_p8_32.npz"
    with np.load(src) as z, NpzSource(src) as ours:
        for k in z.files:
            assert z[k].dtype == np.dtype("V2")
            want = z[k].view(ml_dtypes.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(ours.get(k[:-4] if k.endswith(".npy") else k), want)
    convert(src, tmp_path / "b.safetensors", ConvertOptions(dtype="bfloat16"))
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        t = f.get_tensor("blocks.0.mlp.fc1.weight")
    assert t.dtype == torch.bfloat16
    convert(src, tmp_path / "b.pt", ConvertOptions(dtype="bfloat16"))
    state = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert torch.equal(state["blocks.0.mlp.fc1.weight"], t)
    assert "jax" not in sys.modules


def test_siglip_tower_to_timm_and_hugging_face(tmp_path):
    """The SigLIP image tower (MAP head, tanh GELU) in timm (attn_pool) and in transformers'
    SiglipVisionModel, each loaded by its library and run there against big_vision's output."""
    from timm_import import import_timm

    timm = import_timm()
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src, x = BV / "tiny_siglip_map_p8_32.npz", _inputs(32)
    want = np.load(BV / "tiny_siglip_map_p8_32.logits.npy")
    convert(src, tmp_path / "timm", ConvertOptions(to="timm"))
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    with torch.no_grad():
        assert float(np.abs(model(x).numpy() - want).max()) <= TOL
    convert(src, tmp_path / "hf", ConvertOptions(to="hf"))
    hf, info = transformers.SiglipVisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert float(np.abs(hf.eval()(pixel_values=x).pooler_output.numpy() - want).max()) <= TOL


def test_google_and_big_vision_files_are_told_apart():
    with open_checkpoint(GOLDEN / "jax" / "tiny_token_p8_32.npz") as g, open_checkpoint(BV / "tiny_tok_p8_32.npz") as b:
        assert (g.layout.name, b.layout.name) == ("google", "big_vision")
        # the same pooling, but big_vision adds the table before the class token joins
        assert (g.config.pos_embed_prefix, b.config.pos_embed_prefix) == ("all", "none")


def test_verify_has_an_independent_reference_stage_by_stage(tmp_path):
    """verify runs big_vision files through the NumPy reference of big_vision's code (which the
    golden outputs check too): every stage compared; exact GELU instead of big_vision's tanh
    approximation, a silent error elsewhere, is named at block 0's MLP."""
    from vitconv.model import VisionTransformer
    from vitconv.verification.verify import verify

    src = BV / "tiny_map_head_p8_32.npz"
    report = verify(src)
    assert report.ok and "big_vision" in report.reference
    assert [s.name for s in report.stages][:3] == ["embed", "blocks.0.attn", "blocks.0.mlp"]
    assert {"encoded", "pooled", "head_input", "logits"} <= {s.name for s in report.stages}
    model = vitconv.load(src)
    wrong = VisionTransformer(model.config.replace(act="gelu"))
    wrong.load_state_dict(model.state_dict())
    bad = verify(src, wrong.eval())
    assert bad.first_failure.name == "blocks.0.mlp" and all(s.ok for s in bad.stages[:2])
    r = CliRunner().invoke(main, ["verify", str(BV / "tiny_sincos_gap_p8_32.npz"), "--image-size", "32"])
    assert r.exit_code == 0 and "big_vision .npz, NumPy float64 reference" in r.output, r.output


def test_flexivit_patch_size_resamples_as_big_vision(tmp_path):
    """FlexiViT run by big_vision at patch 4 (an 8x8 grid) from its patch-8 file: the kernel
    (pseudo-inverse resize) and the table (bilinear) match big_vision's resampled arrays, and
    the outputs match, through npz2pt --patch-size and vitconv.load."""
    r = CliRunner().invoke(main, ["npz2pt", str(BV / "tiny_flexi_p8_32.npz"), "-o", str(tmp_path / "p4.safetensors"),
                                  "--patch-size", "4"])
    assert r.exit_code == 0, r.output
    for model in (vitconv.load(tmp_path / "p4.safetensors"), vitconv.load(BV / "tiny_flexi_p8_32.npz", patch_size=4)):
        assert (model.config.patch_size, model.config.image_size, model.config.pos_resize) == (4, 32, "bilinear")
        kernel = model.patch_embed.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> big_vision's HWIO
        want = np.load(BV / "tiny_flexi_p8_32_at_p4.embedding_kernel_resampled.npy")
        assert float(np.abs(kernel - want).max()) <= 1e-6 * float(np.abs(want).max())
        want = np.load(BV / "tiny_flexi_p8_32_at_p4.posemb_resampled.npy")
        assert float(np.abs(model.pos_embed.detach().numpy() - want).max()) <= 1e-6
        _check_outputs(model, "tiny_flexi_p8_32_at_p4", 32)


def _real_width_file(path, cfg, scan=False, bf16=False, seed=0):
    """A big_vision file at a real width: canonical weights drawn at a realistic scale, written
    with the big_vision table (read back by the NumPy reference's own key logic, not the table)."""
    from vitconv.model import parameter_shapes
    from vitconv.conversion.pipeline import LAYOUTS, map_state

    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in parameter_shapes(cfg).items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name.endswith("weight") and len(shape) >= 2:
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            a = 0.2 * rng.standard_normal(shape)
        state[name] = a.astype(np.float32)
    arrays = map_state(state, cfg, LAYOUTS["big_vision"])
    if scan:
        blocks = [k for k in arrays if k.startswith("Transformer/encoderblock_")]
        for rest in sorted({k.split("/", 2)[2] for k in blocks}):
            arrays[f"Transformer/encoderblock/{rest}"] = np.stack(
                [arrays.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(cfg.depth)])
    if bf16:
        arrays = {k: v.astype(ml_dtypes.bfloat16).view(np.dtype("V2")) for k, v in arrays.items()}
    np.savez(path, **{"params/" + k: v for k, v in arrays.items()})
    return path


@pytest.mark.parametrize("what,kw,size", [
    ("So400m/14 MAP, stacked", dict(width=1152, num_heads=16, head_dim=72, mlp_dim=4304, patch_size=14,
                                    classifier="map", class_token=False, scan=True), None),
    ("B/16 sincos2d gap, bfloat16", dict(width=768, num_heads=12, head_dim=64, mlp_dim=3072, patch_size=16, classifier="gap",
                                         class_token=False, pos_resize="sincos2d", bf16=True), 224),
    ("S/16 tok 224 -> 384", dict(width=384, num_heads=6, head_dim=64, mlp_dim=1536, patch_size=16, classifier="token",
                                 num_classes=1000, representation_size=384), 384),
])
def test_real_widths_against_the_reference(what, kw, size, tmp_path):
    """Depth 2, but the real widths, head sizes (So400m's 72), MLP widths (4304), sincos tables
    and a 224 -> 384 resize: the converter against the independent reference, every stage."""
    from vitconv.config import ViTConfig
    from vitconv.verification.verify import verify

    bf16, scan = kw.pop("bf16", False), kw.get("scan", False)
    cfg = ViTConfig(image_size=224, depth=2, pos_embed_prefix="none", num_classes=kw.pop("num_classes", 0), **kw)
    src = _real_width_file(tmp_path / "bv.npz", cfg.replace(scan=False), scan=scan, bf16=bf16)
    report = verify(src, image_size=size, batch=1)
    assert report.ok, report.lines()
    assert report.stages[-1].max_abs <= TOL * max(1.0, report.stages[-1].ref_rms), report.lines()
    with open_checkpoint(src) as ckpt:
        assert ckpt.config.scan == scan and ckpt.config.head_dim == cfg.width // cfg.num_heads


@pytest.mark.parametrize("name", ["tiny_sincos_gap_p8_32", "tiny_siglip_map_bf16_p8_32"])
def test_exports_with_dynamic_size(name, tmp_path):
    """ONNX at unseen resolutions: the sincos2d table is generated in the graph, a learned one
    resized by big_vision's zoom; at 48 px the graph matches the reference's own resize."""
    import onnxruntime as ort

    from vitconv.verification.references.big_vision_numpy import BigVisionReference
    from vitconv.runtime.export import ExportPlan, run_export

    src = BV / f"{name}.npz"
    convert(src, tmp_path / "c.safetensors", ConvertOptions(image_size=32))
    (result,) = run_export(tmp_path / "c.safetensors", ExportPlan(onnx=tmp_path / "m.onnx", dynamic_size=True))
    assert result.ok and len({p.size for p in result.parity}) >= 2
    x = np.load(BV / "inputs_48.npy")
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"pixel_values": x.transpose(0, 3, 1, 2).copy()})[0]
    want = BigVisionReference.from_npz(src)(x)
    assert float(np.abs(got - want).max()) <= 1e-4
