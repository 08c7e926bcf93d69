"""bfloat16 sources verify at the float32 tolerance: a Hugging Face directory, a timm directory
and a big_vision ``.npz``, each stored in bfloat16 (as most 2025 releases ship), converted to
float32 exactly. Every library reference runs in float32 whatever the file stores (the report
says so, and names the stored dtype): transformers loads a bfloat16 directory in bfloat16 unless
told otherwise, and a bfloat16 reference fails an exact conversion at the patch embedding.

References: the library's own model built by the test in float32 from the same files
(transformers ``from_pretrained(dtype=float32)``, ``timm.create_model('local-dir:…')``), and
big_vision's own outputs for the golden bfloat16 SigLIP (``golden/bv``)."""

from __future__ import annotations

import json

import numpy as np
import torch

import vitconv
from conftest import golden_path, seeded
from vitconv.verification.verify import DEFAULT_TOLERANCE, seeded_images, verify


def _logits(model, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(x)
    out = getattr(out, "logits", out)
    return out.float().numpy()


def _check(report, stored: str) -> None:
    assert report.ok, report.lines()
    assert report.tolerance == DEFAULT_TOLERANCE  # not loosened for bfloat16
    assert report.source_dtype == stored
    assert any(f"weights stored as {stored}" in line for line in report.lines())


def test_bfloat16_hf_directory_verifies_at_float32_tolerance(tmp_path):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                 image_size=32, patch_size=8, num_labels=10, layer_norm_eps=1e-6)
    seeded(transformers.ViTForImageClassification(cfg), scale=0.5).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    # what made verify fail: transformers keeps the stored dtype unless told otherwise
    assert transformers.ViTForImageClassification.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    vitconv.convert(tmp_path / "bf16", tmp_path / "c.safetensors")
    report = verify(tmp_path / "bf16", tmp_path / "c.safetensors")
    _check(report, "bfloat16")
    assert "float32" in report.reference and [s.max_abs for s in report.stages] == [0.0] * len(report.stages)
    # the library's float32 model, built here, agrees with the converted file
    want = transformers.ViTForImageClassification.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    images = seeded_images(2, 32, 3, 0)
    got = _logits(vitconv.load(tmp_path / "c.safetensors"), images)
    assert np.abs(got - _logits(want, images)).max() < 1e-5
    # ... and the bfloat16 model the old reference ran is far from it: the check is not vacuous
    bf16 = transformers.ViTForImageClassification.from_pretrained(tmp_path / "bf16")
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(torch.bfloat16)
        rough = bf16(pixel_values=x).logits.float().numpy()
    assert np.abs(got - rough).max() > 100 * DEFAULT_TOLERANCE


def test_bfloat16_timm_directory_verifies_at_float32_tolerance(tmp_path):
    from timm_import import import_timm

    timm = import_timm()
    from safetensors.torch import save_file

    vitconv.convert(golden_path("jax/tiny_token_p8_32.npz"), tmp_path / "t", to="timm")
    weights = tmp_path / "t" / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}
    save_file(state, str(weights), metadata=meta)
    assert all(v.dtype == torch.bfloat16 for v in state.values())
    vitconv.convert(tmp_path / "t", tmp_path / "c.safetensors")
    report = verify(tmp_path / "t", tmp_path / "c.safetensors")
    _check(report, "bfloat16")
    assert "timm.create_model('local-dir:…')" in report.reference and "float32" in report.reference
    want = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval().float()
    images = seeded_images(2, 32, 3, 0)
    got = _logits(vitconv.load(tmp_path / "c.safetensors"), images)
    assert np.abs(got - _logits(want, images)).max() < 1e-5


def test_bfloat16_big_vision_npz_verifies_at_float32_tolerance(tmp_path):
    src = golden_path("bv/tiny_siglip_map_bf16_p8_32.npz")
    vitconv.convert(src, tmp_path / "c.safetensors")
    report = verify(src, tmp_path / "c.safetensors")
    _check(report, "bfloat16")
    assert "big_vision" in report.reference
    # big_vision's own logits on its inputs (golden/bv), through the converted file
    images = np.load(golden_path("bv/inputs_32.npy"))
    got = _logits(vitconv.load(tmp_path / "c.safetensors"), images)
    assert np.abs(got - np.load(golden_path("bv/tiny_siglip_map_bf16_p8_32.logits.npy"))).max() < 2e-5
    assert json.loads(report.to_json())["source_dtype"] == "bfloat16"
