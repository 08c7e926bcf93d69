"""Hugging Face and vit-pytorch layouts against the real third-party implementations:
``transformers`` ``ViTForImageClassification``/``ViTModel`` (offline) and ``vit_pytorch.vit.ViT``."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from vitconv.conversion.loading import build_model
from vitconv.errors import MappingError
from vitconv.conversion.pipeline import convert, to_layout
from conftest import CASES, golden_expected, golden_input, golden_path, read, skip_unless_installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _vit_pytorch_vit():
    """``vit_pytorch.vit`` without the package ``__init__``, which imports torchvision (not
    installable with CPU torch here) for modules these tests do not use."""
    pytest.importorskip("einops", reason="vit-pytorch needs einops (test extra)")
    spec = importlib.util.find_spec("vit_pytorch")
    if spec is None:
        skip_unless_installed("vit-pytorch not installed (pip install --no-deps vit-pytorch, as .ci/run does)")
    path = os.path.join(spec.submodule_search_locations[0], "vit.py")
    mspec = importlib.util.spec_from_file_location("_vit_pytorch_vit", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.ViT


# ---------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")


def test_golden_npz_to_hf_dir_runs_in_transformers(tmp_path):
    case = CASES["tiny_token_p8_32"]
    out = tmp_path / "hf"
    convert(golden_path(case["checkpoint"]), out)  # a name without extension -> hf
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_act"] == "gelu_pytorch_tanh" and cfg["layer_norm_eps"] == 1e-6
    m = transformers.ViTForImageClassification.from_pretrained(out).eval()
    x = golden_input(case)
    with torch.no_grad():
        hf_logits = m(pixel_values=x).logits.numpy()
        canon = build_model(*_state(golden_path(case["checkpoint"])))(x).numpy()
    assert np.abs(hf_logits - canon).max() <= 1e-5
    assert np.abs(hf_logits - golden_expected(case, "logits")).max() <= 2e-5


def _state(path):
    return read(path)[1:3]


@pytest.mark.parametrize("act,eps", [("gelu", 1e-12), ("gelu_pytorch_tanh", 1e-6)])
def test_transformers_model_reads_exactly_and_round_trips(tmp_path, act, eps):
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                 intermediate_size=96, image_size=32, patch_size=8, num_labels=5,
                                 hidden_act=act, layer_norm_eps=eps)
    m = _randomize(transformers.ViTForImageClassification(cfg), 1)
    m.save_pretrained(tmp_path / "src")
    name, c, state, _ = read(tmp_path / "src")
    assert name == "hf" and c.num_heads == 3 and c.norm_eps == eps
    with torch.no_grad():
        ref = m(pixel_values=X).logits.numpy()
        got = build_model(c, state)(X).numpy()
    assert np.abs(got - ref).max() <= 1e-5
    from safetensors.numpy import load_file

    src = load_file(str(tmp_path / "src" / "model.safetensors"))
    _, back = to_layout(state, c, "hf", "dir")
    assert sorted(back) == sorted(src)
    assert all(back[k].tobytes() == src[k].tobytes() for k in src)


def test_vitmodel_pooler_is_googles_pre_logits(tmp_path):
    """A bare ViTModel with its tanh pooler: vitconv's output equals ``pooler_output``."""
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                 intermediate_size=96, image_size=32, patch_size=8)
    m = _randomize(transformers.ViTModel(cfg, add_pooling_layer=True), 2)
    m.save_pretrained(tmp_path / "m")
    name, c, state, _ = read(tmp_path / "m")
    assert name == "hf_model" and c.representation_size == 48 and c.num_classes == 0
    with torch.no_grad():
        ref = m(pixel_values=X).pooler_output.numpy()
        got = build_model(c, state)(X).numpy()
    assert np.abs(got - ref).max() <= 1e-5


def test_in21k_pre_logits_with_classifier_is_refused(tmp_path):
    with pytest.raises(MappingError, match="never applies the pooler"):
        convert(golden_path(CASES["tiny_prelogits_p8_32"]["checkpoint"]), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(MappingError, match="gap"):
        convert(golden_path(CASES["tiny_gap_p8_32"]["checkpoint"]), tmp_path / "hf")


# ---------------------------------------------------------------- vit-pytorch
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pytorch_matches_and_round_trips(tmp_path, pool):
    ViT = _vit_pytorch_vit()
    m = _randomize(ViT(image_size=32, patch_size=8, num_classes=7, dim=40, depth=2, heads=2,
                       dim_head=64, mlp_dim=80, pool=pool), 3)
    torch.save(m.state_dict(), tmp_path / "v.pth")
    name, c, state, _ = read(tmp_path / "v.pth")
    assert name == "lucidrains" and c.patch_norm and c.attn_dim == 128 and c.width == 40
    assert c.classifier == ("token" if pool == "cls" else "gap")
    with torch.no_grad():
        ref = m(X).numpy()
        got = build_model(c, state)(X).numpy()
    assert np.abs(got - ref).max() <= 1e-5
    _, back = to_layout(state, c, "lucidrains", "pt")
    src = {k: v.numpy() for k, v in m.state_dict().items()}
    assert sorted(back) == sorted(src)
    assert all(back[k].shape == src[k].shape and back[k].tobytes() == src[k].tobytes() for k in src)
