"""Hugging Face DINOv2 (± registers, ± SwiGLU), CLIP (± projection, and a full CLIPModel) and
SigLIP (and a full SiglipModel) against the real transformers, offline. Each model is built by
transformers at small width with every parameter seeded far from its init (LayerScale lambdas
log-uniform over 2e-4..11) and saved with ``save_pretrained``; its own output (``pooler_output``
or ``image_embeds``) is the reference, at the checkpoint's resolution and at another one, where
transformers resizes the table its own way (DINOv2 always; CLIP and SigLIP with
``interpolate_pos_encoding=True``). Written back, the directory loads with
``from_pretrained`` with no missing or unexpected keys and holds the original tensors bit for
bit; timm SigLIP and HF SigLIP convert into each other."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.numpy import load_file

from conftest import golden_path, seeded
from vitconv.conversion.loading import load
from vitconv.errors import MappingError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions
from vitconv.verification.verify import verify

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1)
DINO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def _x(size):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


def _close(got, want, scale=1e-5):
    assert (got - want).abs().max().item() <= scale * max(1.0, want.abs().max().item()), \
        (got - want).abs().max().item()


# name -> (model factory, output of the vision model, resize flag, layout, what must be read)
FAMILIES = {
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO, mlp_ratio=2)),
               lambda o: o.pooler_output, {}, "hf_dinov2", dict(layer_scale=True, mask_token=True,
                                                                 pos_resize="bicubic")),
    "dinov2_swiglu": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO, use_swiglu_ffn=True)),
                      lambda o: o.pooler_output, {}, "hf_dinov2", dict(mlp="swiglu", act="silu", mlp_dim=176)),
    "dinov2_reg": (lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
                   **DINO, mlp_ratio=2, num_register_tokens=3)), lambda o: o.pooler_output, {}, "hf_dinov2_reg",
                   dict(num_reg_tokens=3, pos_embed_prefix="class", pos_resize="bicubic_aa")),
    "clip": (lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
             lambda o: o.pooler_output, {"interpolate_pos_encoding": True}, "hf_clip",
             dict(norm_pre=True, patch_bias=False, act="quick_gelu", norm_eps=1e-5)),
    "clip_proj": (lambda: transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
                  **VISION, projection_dim=24)), lambda o: o.image_embeds, {"interpolate_pos_encoding": True},
                  "hf_clip_proj", dict(num_classes=24, head_bias=False)),
    "siglip": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
               lambda o: o.pooler_output, {"interpolate_pos_encoding": True}, "hf_siglip",
               dict(classifier="map", class_token=False, act="gelu_tanh", num_heads=2)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hf_family_reads_resizes_and_writes_back(name, tmp_path):
    make, output, flag, layout, expect = FAMILIES[name]
    model = seeded(make())
    model.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    assert report.layout == layout
    for field, value in expect.items():
        assert getattr(report.config, field) == value, field
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        _close(ours(_x(32)), output(model(pixel_values=_x(32))))
        # another resolution: each family's own resize of the position table
        _close(ours(_x(48)), output(model(pixel_values=_x(48), **flag)))
        _close(load(tmp_path / "c.safetensors", image_size=48)(_x(48)), output(model(pixel_values=_x(48), **flag)))
    convert(tmp_path / "c.safetensors", tmp_path / "back")
    again, info = type(model).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    again.eval()
    with torch.no_grad():
        _close(output(again(pixel_values=_x(32))), output(model(pixel_values=_x(32))))
    a = load_file(str(tmp_path / "src" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("two_tower", ["clip", "siglip"])
def test_a_two_tower_checkpoint_converts_its_vision_tower(two_tower, tmp_path):
    if two_tower == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=TEXT,
                                                               projection_dim=24))
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT))
    seeded(model).save_pretrained(tmp_path / "full")
    report = convert(tmp_path / "full", tmp_path / "v.safetensors")
    assert any("left out (the text tower)" in n for n in report.notes), report.notes
    assert not any("assumed" in n for n in report.notes), report.notes  # vision_config records them
    with torch.no_grad():
        want = model.get_image_features(pixel_values=_x(32))
        want = getattr(want, "pooler_output", want)
        _close(load(tmp_path / "v.safetensors")(_x(32)), want)
    # verify's reference: the vision class, built with the projection width the two-tower config holds
    assert verify(tmp_path / "full", tmp_path / "v.safetensors").ok


def test_timm_and_hf_siglip_convert_into_each_other(tmp_path):
    """timm's SigLIP computes exact GELU (big_vision and transformers: tanh): the act travels
    in config.json, so HF computes timm's function, and timm's is written back bitwise."""
    from timm_import import import_timm

    timm = import_timm()
    model = seeded(timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, patch_size=8,
                                      embed_dim=128, depth=2, num_heads=2))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    report = convert(tmp_path / "t.safetensors", tmp_path / "hf",
                     ConvertOptions(overrides={"act": "gelu"}))  # or tanh: said
    assert report.target_layout == "hf_siglip"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "gelu"
    hf, info = transformers.SiglipVisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        _close(hf.eval()(pixel_values=_x(32)).pooler_output, model(_x(32)))
    convert(tmp_path / "hf", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(str(tmp_path / "t.safetensors")), load_file(str(tmp_path / "back.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_what_hugging_face_cannot_hold_is_refused_by_name(tmp_path):
    """A Google ViT has no LayerScale (Dinov2 needs it); a SigLIP (no class token, MAP head)
    is no CLIP; each refusal names the field."""
    gap = golden_path("jax/tiny_gap_p8_32.npz")
    with open_checkpoint(gap) as c:
        assert c.config.classifier == "gap"
    with pytest.raises(MappingError, match="classifier='gap'"):
        convert(gap, tmp_path / "x", ConvertOptions(to="hf"))



def test_a_bare_vit_model_with_a_pooler_says_its_activation_is_assumed(tmp_path):
    """ViTModel's pooler is tanh(Dense(class token)) unless config.json's pooler_act says
    otherwise; its weights alone cannot say, so a read names the tanh it assumed (and a directory
    recording another is refused)."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
               patch_size=8)
    model = seeded(transformers.ViTModel(transformers.ViTConfig(**cfg, pooler_act="relu")))
    model.save_pretrained(tmp_path / "src")
    bare = tmp_path / "model.safetensors"
    bare.write_bytes((tmp_path / "src" / "model.safetensors").read_bytes())
    with open_checkpoint(bare) as c:
        assert c.config.representation_size == 64
        assert any(n.startswith("pooler_act='tanh' assumed") for n in c.notes), c.notes
    with pytest.raises(MappingError, match="pooler_act 'relu'"):
        open_checkpoint(tmp_path / "src")
    tanh = seeded(transformers.ViTModel(transformers.ViTConfig(**cfg)))
    tanh.save_pretrained(tmp_path / "tanh")
    with open_checkpoint(tmp_path / "tanh") as c:
        assert not any("pooler_act" in n for n in c.notes), c.notes
