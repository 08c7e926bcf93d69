"""The timm families of the modern-ViT issue, against the real timm 1.0.31: DINOv2 (± registers,
SwiGLU), DeiT-3, the gap/reg models, CLIP (± QuickGELU), SigLIP (MAP head, So400m's MLP width)
and MAE-style average pooling with a class token. Each model is built by timm at small width
with every parameter seeded far from its init (LayerScale gammas log-uniform over 2e-4..11,
the range of trained DINOv2 scales); its own forward is the reference. Read onto the canonical
model it gives timm's output; written back it loads strictly and bit for bit; a timm directory
rebuilds it with ``create_model``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import seeded
from timm_import import import_timm
from vitconv.conversion.loading import load
from vitconv.errors import MappingError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions

timm = import_timm()

SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
# name -> (extra create_model arguments, fields a bare state dict cannot say, what must be read)
FAMILIES = {
    "vit_small_patch14_dinov2": (dict(), {}, dict(layer_scale=True, classifier="token")),
    "vit_small_patch14_reg4_dinov2": (dict(), {}, dict(num_reg_tokens=4, pos_embed_prefix="none")),
    "vit_giant_patch14_dinov2": (dict(), {}, dict(mlp="swiglu", act="silu", layer_scale=True)),
    "deit3_small_patch16_224": (dict(num_classes=10), {}, dict(pos_embed_prefix="none", layer_scale=True)),
    "vit_medium_patch16_gap_256": (dict(num_classes=10), {}, dict(class_token=False, classifier="gap",
                                                                  final_norm="encoder", qkv_bias=False)),
    "vit_little_patch16_reg4_gap_256": (dict(num_classes=10), {}, dict(
        class_token=False, num_reg_tokens=4, classifier="gap", final_norm="pooled", pos_embed_prefix="none")),
    # the keys of timm's CLIP and SigLIP towers fit GELU and QuickGELU (tanh GELU) variants alike
    "vit_base_patch16_clip_224": (dict(num_classes=16), dict(act="gelu"), dict(norm_pre=True, patch_bias=False,
                                                                               norm_eps=1e-5)),
    "vit_base_patch16_clip_quickgelu_224": (dict(num_classes=16), dict(norm_eps=1e-5, act="quick_gelu"),
                                            dict(norm_pre=True, act="quick_gelu")),
    "vit_base_patch16_siglip_224": (dict(), dict(act="gelu"), dict(classifier="map", class_token=False)),
    "vit_so400m_patch14_siglip_224": (dict(), dict(act="gelu"), dict(classifier="map", mlp_dim=478)),
    "vit_base_patch16_224 avg": (dict(global_pool="avg", num_classes=10), {}, dict(
        class_token=True, classifier="gap", final_norm="pooled")),
    # a class token without fc_norm: the keys of global_pool='token', which only the argument tells apart
    "vit_base_patch16_224 avg no fc_norm": (dict(global_pool="avg", fc_norm=False, num_classes=10),
                                            dict(classifier="gap"),
                                            dict(class_token=True, classifier="gap", final_norm="encoder")),
    # timm's attention pool leaves the registers out (pool_include_prefix=False) unless told
    "vit_so150m_patch16_reg4_map_256": (dict(num_classes=10), {}, dict(classifier="map", num_reg_tokens=4,
                                                                      map_prefix=False)),
    "vit_so150m_patch16_reg4_map_256 include": (dict(num_classes=10, pool_include_prefix=True), dict(map_prefix=True),
                                                dict(classifier="map", map_prefix=True)),
}


def _build(name: str, extra: dict):
    arch = name.split(" ")[0]
    return seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra), scale=0.2)


def _x(size=32):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _close(got, want):
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-5 * scale, (got - want).abs().max().item()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_timm_family_reads_writes_and_rebuilds(name, tmp_path):
    extra, unsaid, expect = FAMILIES[name]
    model = _build(name, extra)
    src = tmp_path / "src.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    report = convert(src, tmp_path / "c.safetensors", ConvertOptions(overrides=unsaid))
    for field, value in expect.items():
        assert getattr(report.config, field) == value, field
    with torch.no_grad():
        want = model(_x())
        _close(load(tmp_path / "c.safetensors")(_x()), want)
    # back to timm: strict, bit for bit
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(src), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timm.create_model(name.split(" ")[0], pretrained=False, **SMALL, **extra).load_state_dict(b, strict=True)
    # a timm directory: create_model rebuilds the same function from config.json alone
    convert(tmp_path / "c.safetensors", tmp_path / "tdir", ConvertOptions(to="timm"))
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    with torch.no_grad():
        _close(built(_x()), want)
    with open_checkpoint(tmp_path / "tdir") as again:
        assert again.config == report.config


def _timm_dir(path, arch: str, model_args: dict, model) -> None:
    """A timm directory as ``push_to_hf_hub`` writes one: config.json names the architecture
    and records the constructor arguments, beside the weights."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": model.num_classes,
                                                  "model_args": model_args}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


NAFLEX = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, pos_embed_grid_size=(4, 4), num_classes=5)


@pytest.mark.parametrize("arch,extra", [("naflexvit_base_patch16_map", dict()),
                                        ("naflexvit_base_patch16_map", dict(attn_pool_num_heads=4)),
                                        ("naflexvit_base_patch16_map", dict(reg_tokens=0, attn_pool_num_heads=4)),
                                        ("naflexvit_base_patch16_map", dict(class_token=True, pool_include_prefix=True)),
                                        ("naflexvit_base_patch16_gap", dict(act_layer="gelu_tanh")),
                                        # the keys of token pooling: only global_pool says it
                                        ("naflexvit_base_patch16_gap", dict(class_token=True, fc_norm=False))])
def test_naflexvit_directory_pools_as_its_config_says(arch, extra, tmp_path):
    """NaFlexVit's attention pool (naflexvit_base_patch16_map: one register token) attends to the
    patches only unless pool_include_prefix, with attn_pool_num_heads heads where given: a timm
    directory's config.json says both, and the canonical model computes what timm does. A directory
    that names its architecture is read as that one, not refused for the keys' other fits (the
    aspect-preserving *_par_gap)."""
    model = seeded(timm.create_model(arch, pretrained=False, **NAFLEX, **extra), scale=0.2)
    _timm_dir(tmp_path / "src", arch, {**NAFLEX, "pos_embed_grid_size": [4, 4], **extra}, model)
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    assert report.config.pool_heads == extra.get("attn_pool_num_heads", 0)
    pooled = report.config
    assert pooled.map_prefix == (extra.get("pool_include_prefix", False) or not pooled.num_prefix_tokens
                                 or pooled.classifier != "map")
    with torch.no_grad():
        _close(load(tmp_path / "c.safetensors")(_x()), model(_x()))
    convert(tmp_path / "c.safetensors", tmp_path / "tdir", ConvertOptions(to="timm_naflexvit"))
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    with torch.no_grad():
        _close(built(_x()), model(_x()))


@pytest.mark.parametrize("arch,args,says", [
    ("vit_base_patch16_224", dict(global_pool="avgmax"), "global_pool 'avgmax': vitconv computes 'token', 'avg', 'map'"),
    ("vit_base_patch16_224", dict(global_pool="avg", reg_tokens=2, pool_include_prefix=True),
     "pool_include_prefix=True with global_pool='avg' (the mean over the prefix tokens too)"),
    ("naflexvit_base_patch16_gap", dict(class_token=True, pool_include_prefix=True, pos_embed_grid_size=(4, 4)),
     "pool_include_prefix=True with global_pool='avg'"),
    # the class token normalised after pooling: fc_norm's keys are read as a mean's
    ("vit_base_patch16_224", dict(global_pool="token", fc_norm=True),
     "global_pool='token' but the weights have fc_norm, which vitconv reads with global_pool='avg' only"),
])
def test_a_pooling_vitconv_does_not_compute_is_refused_by_name(arch, args, says, tmp_path):
    """timm's other poolings (avgmax, max, a mean over the prefix tokens too, the class token
    normalised after pooling) recorded in a directory's config.json: refused in one line naming the
    argument, never read as plain avg."""
    kw = {**SMALL, **args}
    model = timm.create_model(arch, pretrained=False, **kw)
    _timm_dir(tmp_path / "src", arch, {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}, model)
    with pytest.raises(MappingError, match=re.escape(says)):
        convert(tmp_path / "src", tmp_path / "c.safetensors")


def test_bare_clip_state_dict_needs_its_epsilon_and_says_so(tmp_path):
    """A bare timm CLIP state dict does not record LayerNorm eps 1e-5 or QuickGELU, and its keys fit
    timm's GELU and QuickGELU CLIP towers alike: read as is it is refused, naming both with the
    --arch that picks each. Told the activation, the eps all those towers share follows; timm's
    defaults (eps 1e-6, exact GELU) would differ from timm's CLIP by far more than rounding."""
    extra, unsaid, _ = FAMILIES["vit_base_patch16_clip_quickgelu_224"]
    model = _build("vit_base_patch16_clip_quickgelu_224", extra)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    with pytest.raises(MappingError, match=r"act='gelu' \(--arch vit_base_patch16_clip_224.*act='quick_gelu' "
                                           r"\(--arch vit_base_patch16_clip_quickgelu_224"):
        open_checkpoint(tmp_path / "clip.safetensors")
    with open_checkpoint(tmp_path / "clip.safetensors", ReadOptions(overrides={"act": "quick_gelu"})) as c:
        assert (c.config.act, c.config.norm_eps) == ("quick_gelu", 1e-5)
        assert any("norm_eps=1e-05: what every architecture with these keys computes" in n
                   for n in c.notes), c.notes
    with torch.no_grad():
        wrong = load(tmp_path / "clip.safetensors", act="gelu", norm_eps=1e-6)(_x())
        assert (wrong - model(_x())).abs().max().item() > 1e-3
        right = load(tmp_path / "clip.safetensors", **unsaid)(_x())
        _close(right, model(_x()))


def test_bare_file_names_the_pooling_its_keys_leave_open(tmp_path):
    """A class token and no fc_norm are the keys of global_pool='token' and of 'avg' with
    fc_norm=False alike. Every timm architecture with those keys pools the class token, so a bare
    file reads as token pooling and the note names it; an avg-pooled one is then far off timm,
    and told --set classifier=gap it matches; written back as a bare file, the note says the argument
    in timm's spelling. Its directory records global_pool and reads as gap
    with no note. A file whose tensors show the pooling (fc_norm) names none."""
    extra, unsaid, _ = FAMILIES["vit_base_patch16_224 avg no fc_norm"]
    model = _build("vit_base_patch16_224 avg no fc_norm", extra)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "avg.safetensors"))
    with open_checkpoint(tmp_path / "avg.safetensors") as c:
        assert c.config.classifier == "token"
        assert any("classifier='token'" in n and "what every architecture with these keys computes" in n
                   and "none has this file's sizes" in n for n in c.notes), c.notes
    with torch.no_grad():
        want = model(_x())
        assert (load(tmp_path / "avg.safetensors")(_x()) - want).abs().max().item() > 1e-2
        _close(load(tmp_path / "avg.safetensors", **unsaid)(_x()), want)
    convert(tmp_path / "avg.safetensors", tmp_path / "c.safetensors", ConvertOptions(overrides=unsaid))
    back = convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    assert "classifier='gap' is not recorded in a bare timm state dict: pass global_pool='avg'" in back.notes
    _timm_dir(tmp_path / "dir", "vit_base_patch16_224", {**SMALL, **extra}, model)
    with open_checkpoint(tmp_path / "dir") as c:
        assert c.config.classifier == "gap"
        assert not any("classifier" in n for n in c.notes), c.notes
    shown = _build("vit_base_patch16_224 avg", FAMILIES["vit_base_patch16_224 avg"][0])
    save_file({k: v.contiguous() for k, v in shown.state_dict().items()}, str(tmp_path / "fc.safetensors"))
    with open_checkpoint(tmp_path / "fc.safetensors") as c:
        assert c.config.classifier == "gap" and not any("classifier" in n for n in c.notes), c.notes


def test_set_refuses_fields_the_file_records(tmp_path):
    from vitconv.errors import BadInputError

    model = _build("vit_small_patch14_dinov2", {})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "d.safetensors"))
    with pytest.raises(BadInputError, match="--set layer_scale: the timm layout reads it from the file"):
        open_checkpoint(tmp_path / "d.safetensors", ReadOptions(overrides={"layer_scale": False}))


@pytest.mark.parametrize("arch,kw,feature", [
    ("vit_base_patch16_sapiens2", dict(num_kv_heads=1), "qk-norm (Sapiens2)"),
])
def test_out_of_scope_features_are_refused_by_name(arch, kw, feature, tmp_path):
    """The issue's out-of-scope list, built by the real timm: refused naming the feature, not as
    unused keys or an unknown layout."""
    model = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, embed_dim=128, depth=1,
                              num_heads=2, **kw)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    with pytest.raises(MappingError, match=re.escape(feature)) as e:
        convert(tmp_path / "m.safetensors", tmp_path / "c.safetensors")
    assert "does not compute this feature yet" in str(e.value) and not (tmp_path / "c.safetensors").exists()


def test_pre_logits_is_refused_where_timm_would_drop_it(tmp_path):
    """An in21k model's pre_logits (Dense + tanh): timm's create_model(pretrained=True) filters
    the keys out without a word (shown here on a directory written by hand), so vitconv refuses
    the timm directory by name; a bare file is written, with the note saying what timm does."""
    from conftest import golden_path

    src = golden_path("jax/tiny_prelogits_p8_32.npz")
    with pytest.raises(MappingError, match="representation_size=48 in a model directory"):
        convert(src, tmp_path / "dir", ConvertOptions(to="timm"))
    assert not (tmp_path / "dir").exists()
    report = convert(src, tmp_path / "bare.safetensors", ConvertOptions(to="timm"))
    assert any("drops them silently" in n for n in report.notes)
    # the hazard itself: the same weights in a timm directory load without complaint and compute otherwise
    convert(golden_path("jax/tiny_token_p8_32.npz"), tmp_path / "plain", ConvertOptions(to="timm"))
    state = load_file(str(tmp_path / "bare.safetensors"))
    save_file(state, str(tmp_path / "plain" / "model.safetensors"))
    model = timm.create_model(f"local-dir:{tmp_path / 'plain'}", pretrained=True).eval()
    with torch.no_grad():
        assert (model(_x()) - load(src)(_x())).abs().max().item() > 1e-2


def test_verify_builds_naflexvit_with_its_pooling_for_a_bare_file(tmp_path):
    """verify's reference for a bare NaFlexVit file is timm's NaFlexVit built with what vitconv
    read, its pooling included (the register token left out, as every architecture with these keys
    does: vitconv/archs/table.json; the pool's own heads, told): it computes the timm model's
    function, and the converted file agrees with it stage by stage."""
    from vitconv.verification.references.library import open_reference
    from vitconv.verification.verify import seeded_images, verify

    model = seeded(timm.create_model("naflexvit_base_patch16_map", pretrained=False, **NAFLEX,
                                     attn_pool_num_heads=4), scale=0.2)
    bare = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    told = dict(num_heads=2, overrides={"pool_heads": 4, "pos_resize": "bicubic_aa"})
    convert(bare, tmp_path / "c.safetensors", ConvertOptions(**told))
    report = verify(bare, tmp_path / "c.safetensors", **told)
    assert report.ok and "NaFlexVit" in report.reference, report.lines()
    # the architectures whose keys fit (naflexvit_base_patch16_map) leave the register token out
    assert report.semantics["map_prefix"] == {"value": False, "from": "table"}, report.semantics
    images = seeded_images(2, 32, 3, 0)
    with open_checkpoint(bare, ReadOptions(**told)) as ckpt:
        got = open_reference(bare, ckpt).forward_stages(images)["logits"]
    with torch.no_grad():
        _close(torch.from_numpy(got), model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())))
