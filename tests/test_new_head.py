"""``num_classes=`` / ``--num-classes``: a new zero-initialised classifier for fine-tuning (as
timm's ``create_model(pretrained=True, num_classes=10)`` and jeonsworld's zeroed head), with
Google's ``pre_logits`` dropped the way vit_jax's ``load_pretrained`` drops it; ``0`` gives a
feature extractor. The reference for the features is Google's own Flax output (golden
``pooled``), not vitconv's model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import vitconv
from _vitconv_cli.main import main
from conftest import CASES, golden_expected, golden_input, golden_path
from vitconv.config import ViTConfig
from vitconv.formats.base import DictSource
from vitconv.model import VisionTransformer
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.conversion.options import ReadOptions

PRELOGITS = CASES["tiny_prelogits_p8_32"]  # an in21k-style model: pre_logits 48 + a 10-way head


def test_new_head_is_zero_and_pre_logits_is_dropped():
    src = golden_path(PRELOGITS["checkpoint"])
    old = vitconv.load(src).state_dict()
    new = vitconv.load(src, num_classes=7)
    assert new.config.num_classes == 7 and new.config.representation_size is None and new.pre_logits is None
    sd = new.state_dict()
    assert sd["head.weight"].shape == (7, 48) and not sd["head.weight"].any() and not sd["head.bias"].any()
    assert not any(k.startswith("pre_logits.") for k in sd)
    for k, v in sd.items():  # everything else is the source's, bit for bit
        if not k.startswith("head."):
            assert torch.equal(v, old[k]), k
    x = golden_input(PRELOGITS)
    with torch.no_grad():
        assert not new(x).any()  # a zero head: zero logits until trained


def test_num_classes_0_returns_exactly_googles_pooled_features():
    """Google's Flax code computed ``pooled`` (the encoder output pooled, before pre_logits):
    the headless model returns it, to float32 rounding."""
    for name in ("tiny_prelogits_p8_32", "tiny_gap_p8_32"):
        case = CASES[name]
        model = vitconv.load(golden_path(case["checkpoint"]), num_classes=0)
        assert model.config.num_classes == 0
        with torch.no_grad():
            got = model(golden_input(case)).numpy()
        want = golden_expected(case, "pooled")
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= case["tolerance"]["max_abs"], name


def test_distilled_model_gets_both_heads_replaced():
    cfg = ViTConfig(image_size=32, patch_size=8, width=48, depth=1, num_heads=3, mlp_dim=96, num_classes=10,
                    distilled=True)
    torch.manual_seed(0)
    state = {k: v.numpy() + 0.5 for k, v in VisionTransformer(cfg).state_dict().items()}
    src = DictSource(state, path="deit.safetensors", metadata={"vitconv_config": cfg.to_json()})
    with open_checkpoint("deit.safetensors", ReadOptions(num_classes=3), source=src) as ckpt:
        sd = ckpt.state_dict()
        notes = ckpt.notes
    assert sd["head.weight"].shape == sd["head_dist.weight"].shape == (3, 48)
    assert not any(sd[k].any() for k in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"))
    np.testing.assert_array_equal(sd["dist_token"], state["dist_token"])
    assert any("10 -> 3 classes, zero-initialised heads" in n for n in notes)


def test_cli_new_head_into_a_hugging_face_directory(tmp_path):
    """The report says what was replaced; transformers loads the directory with the new
    classifier, labelled with the labels given for it."""
    from transformers import ViTForImageClassification

    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    r = CliRunner().invoke(main, ["convert", str(golden_path("jax/tiny_token_p8_32.npz")), str(tmp_path / "hf"),
                                  "--num-classes", "3", "--labels", str(labels)])
    assert r.exit_code == 0, r.output
    assert "classifier replaced: 10 -> 3 classes, zero-initialised head" in r.stdout
    m = ViTForImageClassification.from_pretrained(tmp_path / "hf")
    assert m.classifier.weight.shape == (3, 48) and not m.classifier.weight.any()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}
    r = CliRunner().invoke(main, ["convert", str(golden_path("jax/tiny_token_p8_32.npz")), str(tmp_path / "x.pt"),
                                  "--num-classes", "-1"])
    assert r.exit_code == 2 and "--num-classes must be 0 or more" in r.stderr


@pytest.mark.parametrize("n", [0, 10])
def test_timm_directory_with_a_new_head_loads_in_timm(tmp_path, n):
    """timm's create_model builds the headless (or re-headed) model from the directory, and
    computes what vitconv's does."""
    from timm_import import import_timm

    timm = import_timm()
    src = golden_path("jax/tiny_token_p8_32.npz")
    vitconv.convert(src, tmp_path / "t", to="timm", num_classes=n, hash_source=False)
    ours = vitconv.load(src, num_classes=n)
    theirs = timm.create_model(f"local-dir:{tmp_path / 't'}", pretrained=True).eval()
    x = golden_input(CASES["tiny_token_p8_32"])
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5
