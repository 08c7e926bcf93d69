"""The original DINOv2 code (PyPI ``dinov2``), OpenAI's CLIP (``clip/model.py`` from
clip-anytorch) and OpenCLIP's vision tower (``open_clip/transformer.py``), each the reference
for its own state dicts; and the cross-family targets: DINOv2 -> timm and HF, OpenAI CLIP ->
timm and HF CLIP, each checked against the target library's own forward.

Every model is built by its own code at small width with every parameter seeded far from
init; the packages are installed with ``--no-deps`` (their torchvision needs have no CPU
wheel here): the model files are loaded directly, and OpenCLIP's ``FrozenBatchNorm2d``
import is answered by the torchvision placeholder of ``timm_import``."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import seeded, skip_unless_installed
from timm_import import import_timm
from vitconv.archs.generate import import_openclip_transformer
from vitconv.conversion.loading import load
from vitconv.errors import MappingError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _module_file(package: str, relative: str, name: str):
    spec = importlib.util.find_spec(package)
    if spec is None:
        skip_unless_installed(f"{package} not installed (pip install --no-deps, as .ci/run does)")
    path = os.path.join(spec.submodule_search_locations[0], relative)
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def _openclip_transformer():
    """``open_clip.transformer`` without the package ``__init__`` (tokenizers, transforms)."""
    if "open_clip.transformer" not in sys.modules and importlib.util.find_spec("open_clip") is None:
        skip_unless_installed("open-clip-torch not installed (pip install --no-deps, as .ci/run does)")
    return import_openclip_transformer()


def _dinov2(**kw):
    if importlib.util.find_spec("dinov2") is None:
        skip_unless_installed("dinov2 not installed (pip install --no-deps dinov2==0.0.1.dev2, as .ci/run does)")
    from functools import partial

    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, init_values=1.0,
                                 block_chunks=0, block_fn=partial(Block, attn_class=MemEffAttention), **kw)


def _x(size):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))


def _close(got, want):
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), \
        (got - want).abs().max().item()


# ---------------------------------------------------------------------------------------- DINOv2
@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
def test_dinov2_hub_reads_resizes_its_own_way_and_writes_back(ffn, tmp_path):
    """At another resolution the original DINOv2 resizes with scale_factor (g + 0.1) / M: the
    converted model follows it; timm's and transformers' resize give another table."""
    model = seeded(_dinov2(ffn_layer=ffn))
    torch.save(model.state_dict(), tmp_path / "d.pth")
    report = convert(tmp_path / "d.pth", tmp_path / "c.safetensors")
    assert report.layout == "dinov2" and report.config.pos_resize == "dinov2" and report.config.mask_token
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        _close(ours(_x(32)), model(_x(32)))
        _close(ours(_x(48)), model(_x(48)))
        _close(load(tmp_path / "c.safetensors", image_size=48)(_x(48)), model(_x(48)))
    convert(tmp_path / "c.safetensors", tmp_path / "back.pth", ConvertOptions(to="dinov2"))
    back, src = torch.load(tmp_path / "back.pth", weights_only=True), model.state_dict()
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)
    again = _dinov2(ffn_layer=ffn)
    again.load_state_dict(back, strict=True)


def test_dinov2_resize_differs_from_the_other_families(tmp_path):
    """The reason pos_resize exists: at 48 px the original DINOv2's table is not timm's."""
    model = seeded(_dinov2())
    torch.save(model.state_dict(), tmp_path / "d.pth")
    convert(tmp_path / "d.pth", tmp_path / "t.safetensors", ConvertOptions(to="timm"))
    timm = import_timm()
    t = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=32, patch_size=8, embed_dim=128,
                          depth=2, num_heads=2, dynamic_img_size=True).eval()
    t.load_state_dict(load_file(tmp_path / "t.safetensors"), strict=True)
    with torch.no_grad():
        _close(t(_x(32)), model(_x(32)))  # the same function at the checkpoint's resolution
        assert (t(_x(48)) - model(_x(48))).abs().max().item() > 1e-3  # timm resizes otherwise


def test_dinov2_hub_to_hugging_face_and_timm(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = seeded(_dinov2())
    torch.save(model.state_dict(), tmp_path / "d.pth")
    report = convert(tmp_path / "d.pth", tmp_path / "hf")
    assert report.target_layout == "hf_dinov2"
    assert any("pos_resize='dinov2', but the hf_dinov2 code assumes 'bicubic'" in n for n in report.notes)
    hf, info = transformers.Dinov2Model.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        _close(hf.eval()(pixel_values=_x(32)).pooler_output, model(_x(32)))
    convert(tmp_path / "d.pth", tmp_path / "tdir", ConvertOptions(to="timm"))
    timm = import_timm()
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    with torch.no_grad():
        _close(built(_x(32)), model(_x(32)))


def test_dinov2_with_registers_needs_class_only_rows_which_timm_lacks(tmp_path):
    """DINOv2's registers have no position rows but its class token has one; timm holds either
    rows for every prefix token or none (its own converter folds the class row into the token).
    vitconv does not fold: the refusal names the field."""
    model = seeded(_dinov2())
    sd = model.state_dict()
    torch.save(sd, tmp_path / "plain.pth")
    sd["register_tokens"] = torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(3))
    torch.save(sd, tmp_path / "reg.pth")
    with open_checkpoint(tmp_path / "reg.pth") as c:
        assert c.config.num_reg_tokens == 4 and c.config.pos_embed_prefix == "class"
        assert c.config.pos_resize == "bicubic_aa"
        # the released *_reg models' resize, which the constructor's defaults do not give: said
        assert any(n.startswith("pos_resize='bicubic_aa' assumed at other resolutions") for n in c.notes), c.notes
    with open_checkpoint(tmp_path / "plain.pth") as c:
        assert not any("pos_resize" in n for n in c.notes), c.notes
    with pytest.raises(MappingError, match="pos_embed_prefix='class'"):
        convert(tmp_path / "reg.pth", tmp_path / "t.safetensors", ConvertOptions(to="timm"))
    assert convert(tmp_path / "reg.pth", tmp_path / "hf").target_layout == "hf_dinov2_reg"


# ------------------------------------------------------------------------------------------ CLIP
def _openai_clip(**kw):
    cm = _module_file("clip", "model.py", "_openai_clip_model")
    return cm.VisionTransformer(input_resolution=32, patch_size=8, width=128, layers=2, heads=2, output_dim=24, **kw)


def test_openai_clip_full_checkpoint_reads_its_visual_tower(tmp_path):
    model = seeded(_openai_clip())
    full = {"visual." + k: v for k, v in model.state_dict().items()}
    full.update({"positional_embedding": torch.zeros(77, 32), "transformer.resblocks.0.ln_1.weight": torch.ones(32),
                 "text_projection": torch.zeros(32, 24), "logit_scale": torch.tensor(4.6)})  # a text tower
    torch.save(full, tmp_path / "clip.pt")
    with pytest.raises(MappingError, match="act='quick_gelu' \\(--arch open_clip:"):  # OpenCLIP's GELU towers too
        convert(tmp_path / "clip.pt", tmp_path / "c.safetensors")
    report = convert(tmp_path / "clip.pt", tmp_path / "c.safetensors", ConvertOptions(overrides={"act": "quick_gelu"}))
    assert report.layout == "clip" and any("left out (the text tower)" in n for n in report.notes)
    assert (report.config.act, report.config.norm_eps, report.config.head_bias) == ("quick_gelu", 1e-5, False)
    with torch.no_grad():
        _close(load(tmp_path / "c.safetensors")(_x(32)), model(_x(32)))
    convert(tmp_path / "c.safetensors", tmp_path / "back.pt", ConvertOptions(to="clip"))
    back, src = torch.load(tmp_path / "back.pt", weights_only=True), model.state_dict()
    assert sorted(back) == sorted(src) and all(torch.equal(back[k], src[k]) for k in src)
    again = _openai_clip()
    again.load_state_dict(back, strict=True)


def test_openai_clip_to_timm_and_hugging_face(tmp_path):
    """timm's head has a bias: written as zeros (as timm's own converter does); timm's QuickGELU
    CLIP architecture (eps 1e-5) computes OpenAI's function; so does HF's CLIPVisionModelWithProjection."""
    transformers = pytest.importorskip("transformers")
    model = seeded(_openai_clip())
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    report = convert(tmp_path / "clip.pt", tmp_path / "tdir",
                     ConvertOptions(to="timm", overrides={"act": "quick_gelu"}))
    assert any("written with a zero one" in n for n in report.notes), report.notes
    timm = import_timm()
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    assert built.head.bias.abs().max().item() == 0.0
    with torch.no_grad():
        _close(built(_x(32)), model(_x(32)))
    convert(tmp_path / "clip.pt", tmp_path / "hf", ConvertOptions(overrides={"act": "quick_gelu"}))
    hf, info = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        _close(hf.eval()(pixel_values=_x(32)).image_embeds, model(_x(32)))


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_openclip_tower_with_layer_scale_and_exact_gelu(pool, tmp_path):
    """OpenCLIP's default: exact GELU, which no weight records (--set act=gelu); 'avg' pools the
    patch tokens' mean after ln_post (--set classifier=gap); LayerScale as ls_1/ls_2."""
    oct = _openclip_transformer()
    model = seeded(oct.VisionTransformer(image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0,
                                          output_dim=24, ls_init_value=0.5, pool_type=pool))
    torch.save(model.state_dict(), tmp_path / "oc.pt")
    overrides = {"act": "gelu", **({"classifier": "gap"} if pool == "avg" else {})}
    report = convert(tmp_path / "oc.pt", tmp_path / "c.safetensors", ConvertOptions(overrides=overrides))
    assert report.config.layer_scale and report.config.classifier == ("gap" if pool == "avg" else "token")
    with torch.no_grad():
        _close(load(tmp_path / "c.safetensors")(_x(32)), model(_x(32)))
        # the one OpenCLIP architecture with LayerScale uses exact GELU: the table says so unasked
        _close(load(tmp_path / "oc.pt", **({"classifier": "gap"} if pool == "avg" else {}))(_x(32)), model(_x(32)))
        assert (load(tmp_path / "oc.pt", act="quick_gelu")(_x(32)) - model(_x(32))).abs().max().item() > 1e-4
