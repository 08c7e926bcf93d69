"""The library references run block by block (:class:`vitconv.verification.references.library.BlockStreamer`:
the library's model built with its parameters on ``meta``, one block's tensors read from the file
as the pass reaches it and sent back to ``meta`` after) against the same library's whole model
loaded as before (``from_pretrained``, ``create_model('local-dir:…')``, a strict
``load_state_dict``): every stage equal to the bit, on depth-4 timm, Hugging Face ViT, SigLIP
(bfloat16 weights) and DINOv2 models seeded far from init, and one block's weights materialised
at a time. The whole-model reference is itself checked against the model the test built (the
library's own forward on the weights in memory), so neither side is vitconv's code."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import seeded
from test_original_families import _dinov2, _openai_clip
from timm_import import import_timm
from vitconv.errors import BadInputError
from vitconv.formats.open import open_source
from vitconv.verification.references.library import open_reference
from vitconv.conversion.api import convert, open_checkpoint  # the keyword forms (vitconv.convert, vitconv.open_checkpoint)
from vitconv.tools.synthetic import make_synthetic, preset
from vitconv.verification.verify import seeded_images, verify

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
timm = import_timm()

HF_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, image_size=32,
                 patch_size=8)

#: name -> (the seeded model, its output as the reference names it "logits")
HF = {
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**HF_VISION, num_labels=5)),
            lambda o: o.logits),
    "siglip": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_VISION)),
               lambda o: o.pooler_output),
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32, patch_size=8, mlp_ratio=2)),
        lambda o: o.pooler_output),
}


def _references(path):
    """The whole-model reference and the block-by-block one of ``path``."""
    with open_checkpoint(path) as ckpt:
        whole = open_reference(path, ckpt, stream=False)
        streamed = open_reference(path, ckpt, stream=True)
    assert whole.streamed is None and streamed.streamed is not None
    assert streamed.description.endswith("block by block")
    return whole, streamed


def _resident(streamed):
    """For each block: does it hold real (non-meta) parameters now."""
    return [any(p.device.type != "meta" for p in b.parameters()) for b in streamed.streamed.blocks]


def _assert_equal_to_the_bit(path, sizes=(32,), depth=4):
    """Every stage of the block-by-block reference equals the whole model's bit for bit, at each
    size; while block i runs it alone of the blocks holds weights; after the pass, none does."""
    whole, streamed = _references(path)
    seen = []
    for i, block in enumerate(streamed.streamed.blocks):  # registered before the streamer's: runs first
        block.register_forward_hook(lambda module, args, out, i=i: seen.append((i, _resident(streamed))))
    assert len(streamed.streamed.blocks) == depth
    for size in sizes:
        x = seeded_images(2, size, 3, size)
        want, got = whole.forward_stages(x), streamed.forward_stages(x)
        assert list(got) == list(want)
        assert len(want) >= depth + 2  # embed, every block, logits (at least)
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (size, k)
        assert not any(_resident(streamed))
        assert all(p.device.type == "meta" for p in streamed.streamed.model.parameters())
    assert seen == [(i, [j == i for j in range(depth)]) for i in range(depth)] * len(sizes)
    return whole


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_directory_streamed_equals_from_pretrained(name, tmp_path):
    make, output = HF[name]
    model = seeded(make()).eval()
    if name == "siglip":  # a bfloat16 release: read widened to float32 by both
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    whole = _assert_equal_to_the_bit(tmp_path / "src", sizes=(32, 48) if name != "dinov2" else (32,))
    with torch.no_grad():  # and the whole-model reference is the library's forward of the model built here
        x = seeded_images(2, 32, 3, 0)
        want = output(model.float()(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))).numpy()
    assert np.abs(whole.forward_stages(x)["logits"] - want).max() <= 1e-6 * max(1, np.abs(want).max())


def _timm_model():
    return seeded(timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                    embed_dim=128, depth=4, num_heads=2), scale=0.2).eval()


def test_timm_state_dict_and_directory_streamed(tmp_path):
    model = _timm_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    whole = _assert_equal_to_the_bit(tmp_path / "m.safetensors", sizes=(32, 48))
    x = seeded_images(2, 32, 3, 0)
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(whole.forward_stages(x)["logits"] - want).max() <= 1e-6 * max(1, np.abs(want).max())
    convert(tmp_path / "m.safetensors", tmp_path / "dir", to="timm")  # config.json names the architecture
    _assert_equal_to_the_bit(tmp_path / "dir")


def test_original_dinov2_and_openai_clip_streamed(tmp_path):
    """The bare state dicts built with the arguments vitconv read (depth 2), OpenAI's blocks
    taking tokens first."""
    torch.save(seeded(_dinov2()).eval().state_dict(), tmp_path / "dinov2.pth")
    _assert_equal_to_the_bit(tmp_path / "dinov2.pth", sizes=(32, 48), depth=2)
    torch.save(seeded(_openai_clip()).eval().state_dict(), tmp_path / "clip.pt")
    with open_checkpoint(tmp_path / "clip.pt", overrides={"act": "quick_gelu"}) as ckpt:
        whole = open_reference(tmp_path / "clip.pt", ckpt, stream=False)
        streamed = open_reference(tmp_path / "clip.pt", ckpt, stream=True)
    assert streamed.streamed is not None
    x = seeded_images(2, 32, 3, 0)
    want, got = whole.forward_stages(x), streamed.forward_stages(x)
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_verify_runs_the_streamed_reference_and_a_bad_file_is_still_refused(tmp_path):
    """``verify`` (the default) runs it; a file the library's model does not take name for name
    falls back to the whole-model load, which refuses it in one line as before."""
    model = _timm_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "m.safetensors")
    report = verify(tmp_path / "m.safetensors")
    assert report.ok and report.reference.endswith("block by block")
    del state["blocks.3.mlp.fc2.bias"]
    save_file(state, tmp_path / "short.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ckpt:  # the shapes vitconv read, the file one short
        ckpt.source.close()
        ckpt.source = open_source(tmp_path / "short.safetensors")
        with pytest.raises(BadInputError, match="does not take this file"):
            open_reference(tmp_path / "short.safetensors", ckpt, stream=True)
        ckpt.source.close()


#: the 7B presets' structure at test size (64-dim heads, as a bare layout assumes)
SMALL = dict(width=128, depth=4, num_heads=2, head_dim=64, mlp_dim=256, image_size=56)


def test_synthetic_map_tower_as_a_hugging_face_directory_verifies_block_by_block(tmp_path):
    """``make_synthetic(..., layout='hf')`` of the ``7B-map`` structure: a bfloat16
    ``SiglipVisionModel`` directory transformers loads with no key missing or unexpected, whose
    block-by-block reference equals the whole one to the bit and agrees with vitconv's model; the
    'tok' 7B structure (a class token) comes out as ``ViTForImageClassification``."""
    import json

    cfg = make_synthetic(preset("7B-map").replace(**SMALL), tmp_path / "map", layout="hf", dtype="bfloat16")
    assert cfg.classifier == "map" and not cfg.class_token
    assert json.loads((tmp_path / "map" / "config.json").read_text())["architectures"] == ["SiglipVisionModel"]
    _, info = transformers.SiglipVisionModel.from_pretrained(tmp_path / "map", output_loading_info=True)
    assert not any(info.values()), info
    _assert_equal_to_the_bit(tmp_path / "map", sizes=(56,))
    report = verify(tmp_path / "map")
    assert report.ok and report.reference.endswith("block by block") and report.source_dtype == "bfloat16"
    make_synthetic(preset("7B").replace(**SMALL), tmp_path / "tok", layout="hf")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["architectures"] == [
        "ViTForImageClassification"]
    assert not list(tmp_path.glob(".*npz"))  # the intermediate .npz is gone


def test_bfloat16_big_vision_map_tower_converts_to_a_hugging_face_directory(tmp_path):
    """The 7B's path at test size: a bfloat16 big_vision MAP tower -> an HF directory, whose model
    card verifies it against big_vision's NumPy reference. Every value of such a file is exactly
    bfloat16, and verify took the model card's in-memory model for a rounded file and failed."""
    make_synthetic(preset("7B-map").replace(**SMALL), tmp_path / "bv.npz", layout="big_vision", dtype="bfloat16")
    for dtype in (None, "bfloat16"):
        out = tmp_path / f"hf_{dtype}"
        report = convert(tmp_path / "bv.npz", out, to="hf", dtype=dtype)  # with its model card
        assert report.checked is not None and report.checked.ok, report.checked
        assert "big_vision" in report.checked.reference
        assert "OK:" in (out / "README.md").read_text()
        assert verify(out).ok
