"""The layout registry: what a layout says it can express is exactly what survives a trip
through it, and what it cannot express is refused naming the field.

For every layout, container and architecture variant where :meth:`Layout.problems` finds
nothing, the tensors the layout's table writes (their shapes, from the model's own shapes)
plus the ``config.json`` a model directory would hold are read back by the layout's own
detection and inference: the config must come back, except for the fields a bare file does
not record (the layout's constructor arguments), which come back as the layout's defaults and
are named in the write notes. Nothing here reads a weight: inference works on shapes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Dict, List

import pytest

from vitconv.config import ViTConfig, storage_only, training_only
from vitconv.model import parameter_shapes
from vitconv.layouts import LAYOUTS, Probe, detect_layout
from vitconv.formats.json_doc import EMPTY, read_only
from vitconv.layouts.table import foreign_shapes

_SMALL = ViTConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=2, head_dim=32, mlp_dim=96,
                   num_classes=10)
SETTINGS: Dict[str, Dict[str, Any]] = {
    "token": dict(),
    "gap+fc_norm": dict(classifier="gap", class_token=False, final_norm="pooled"),
    "mae: class token, gap, fc_norm": dict(act="gelu", classifier="gap", final_norm="pooled", class_token=True),
    "gap, no norm": dict(classifier="gap", class_token=False, final_norm="none"),
    "pre_logits": dict(representation_size=48),
    "no head": dict(num_classes=0),
    "no qkv bias": dict(qkv_bias=False, proj_bias=True),
    "attn_dim != width": dict(num_heads=3, head_dim=16),
    "patch_norm": dict(patch_norm=True, in_chans=1),
    "deit": dict(distilled=True),
    "deit, no head": dict(distilled=True, num_classes=0),
    "hybrid r26": dict(image_size=64, patch_size=1, resnet_layers=(2, 2, 2, 2)),
    "hybrid r50-like": dict(image_size=64, patch_size=1, resnet_layers=(3, 4, 9)),
    "hybrid stem only": dict(image_size=64, patch_size=2, resnet_layers=(), resnet_width=32),
}


SETTINGS.update({
    "exact gelu": dict(act="gelu"),
    "hf defaults": dict(act="gelu", norm_eps=1e-12),
    "pytorch eps": dict(norm_eps=1e-5),
    "quick_gelu": dict(act="quick_gelu"),
    "vit-pytorch": dict(act="gelu", norm_eps=1e-5, qkv_bias=False, patch_norm=True, num_heads=2, head_dim=64,
                        proj_bias=True),
    "old vit-pytorch": dict(act="gelu", norm_eps=1e-5, qkv_bias=False, num_heads=2, head_dim=64, proj_bias=True),
    "timm gap": dict(act="gelu", classifier="gap", class_token=False, final_norm="pooled"),
    "layer scale": dict(act="gelu", layer_scale=True),
    "clip": dict(act="quick_gelu", norm_eps=1e-5, norm_pre=True, patch_bias=False, head_bias=False, num_classes=24,
                 pos_resize="bicubic_aa"),
    "clip, no projection": dict(act="quick_gelu", norm_eps=1e-5, norm_pre=True, patch_bias=False, num_classes=0,
                                pos_resize="bicubic"),
    "siglip": dict(class_token=False, classifier="map", num_classes=0, pos_resize="bicubic", final_norm="encoder",
                   pool_head="siglip"),
    "dinov2": dict(act="gelu", layer_scale=True, mask_token=True, num_classes=0, mlp_dim=128, pos_resize="dinov2"),
    "dinov2 registers": dict(act="gelu", layer_scale=True, mask_token=True, num_classes=0, mlp_dim=128,
                             num_reg_tokens=2, pos_embed_prefix="class", pos_resize="bicubic_aa"),
    "dinov2 swiglu": dict(act="silu", layer_scale=True, mask_token=True, num_classes=0, mlp="swiglu", mlp_dim=176,
                          pos_resize="bicubic"),
    "timm reg no_embed_class": dict(act="gelu", num_reg_tokens=4, pos_embed_prefix="none", layer_scale=True,
                                    pos_resize="bicubic_aa"),
    # DINOv3 (timm Eva, Hugging Face DINOv3ViTModel): no position table records the size, so its native 224
    "dinov3": dict(image_size=224, patch_size=16, act="gelu", norm_eps=1e-5, layer_scale=True, num_reg_tokens=4,
                   classifier="gap", num_classes=0, qkv_bias=False, mlp_dim=256, abs_pos_embed=False, rope="dinov3",
                   class_token=True, final_norm="encoder", pos_embed_prefix="all", proj_bias=True),
    "dinov3 swiglu, q/v biases": dict(image_size=224, patch_size=16, act="silu", norm_eps=1e-5, layer_scale=True,
                                      num_reg_tokens=4, mlp="swiglu", mlp_dim=128, key_bias=False,
                                      abs_pos_embed=False, rope="dinov3", num_classes=0, mask_token=True,
                                      swiglu_unpacked=True, pos_embed_prefix="all"),
    # EVA's axial rotary form (timm Eva rope_type='cat'): EVA-02 CLIP's sub-LayerNorms, separate q/k/v,
    # unpacked SwiGLU; and the RoPE-Axial ViT's full qkv bias, 'xy' angles and a patches-only table
    "eva02 clip": dict(act="silu", mlp="swiglu", mlp_dim=96, swiglu_unpacked=True, mlp_norm=True, attn_norm=True,
                       qkv_unfused=True, key_bias=False, rope="cat", rope_theta=1e4, rope_ref_grid=(16, 16),
                       rope_half=False, pos_resize="bicubic_aa"),
    "rope-axial ape": dict(act="gelu", layer_scale=True, rope="cat", rope_indexing="xy", rope_half=False,
                           rope_grid_offset=1.0, num_reg_tokens=1, pos_embed_prefix="none", pos_resize="bicubic_aa"),
    # AIMv2 (timm and Hugging Face): RMSNorm, no biases but the patch projection's, unpacked SwiGLU
    "aimv2": dict(act="silu", norm="rmsnorm", norm_eps=1e-5, qkv_bias=False, proj_bias=False, mlp_bias=False,
                  mlp="swiglu", mlp_dim=176, swiglu_unpacked=True, patch_embed_norm=True, classifier="gap",
                  class_token=False, num_classes=0, pos_resize="bicubic_aa", final_norm="encoder"),
    "aimv2 head": dict(act="silu", norm="rmsnorm", norm_eps=1e-5, qkv_bias=False, proj_bias=False, mlp_bias=False,
                       mlp="swiglu", mlp_dim=176, swiglu_unpacked=True, patch_embed_norm=True, classifier="map",
                       pool_head="aimv2", class_token=False, num_classes=0, pos_resize="bicubic_aa",
                       final_norm="encoder"),
    "aimv2 native": dict(act="silu", norm="rmsnorm", norm_eps=1e-5, qkv_bias=False, proj_bias=False, mlp_bias=False,
                         mlp="swiglu", mlp_dim=176, swiglu_unpacked=True, patch_embed_norm=True, classifier="map",
                         pool_head="aimv2", class_token=False, num_classes=0, pos_resize="sincos2d_aimv2",
                         final_norm="encoder"),
    "qk-norm": dict(act="gelu", qk_norm=True, pos_resize="bicubic_aa"),
    "beit": dict(act="gelu", key_bias=False, layer_scale=True, classifier="gap", final_norm="pooled",
                 rel_pos_bias=True, abs_pos_embed=False, class_token=True),
    "beit shared, abs table": dict(act="gelu", key_bias=False, rel_pos_bias_shared=True, pos_resize="bicubic_aa"),
    "hf beit, no head": dict(act="gelu", key_bias=False, norm_eps=1e-12, layer_scale=True, classifier="gap",
                             final_norm="pooled", rel_pos_bias=True, abs_pos_embed=False, num_classes=0,
                             rel_pos_resize="bilinear", class_token=True),
})
# Settings after a variant's own that restate a default (class_token=True, final_norm="encoder",
# proj_bias=True, ...) name what the variant keeps that some layout cannot hold alongside the rest
# (big_vision: a gap model has no class token; Aimv2: the out_proj bias follows qkv_bias).
VARIANTS = {name: _SMALL.replace(**settings) for name, settings in SETTINGS.items()}
#: What each layout refuses of ``_SMALL`` itself (the "token" variant: Google's semantics at a tiny
#: size): the fields whose Google value the layout's code cannot hold. A variant's refusals are
#: these (where it keeps ``_SMALL``'s value) and the fields it sets itself.
REFUSES_SMALL = {
    "big_vision": ("pos_embed_prefix",),  # its table covers the patches only
    "clip": ("act", "patch_bias", "head_bias"),  # QuickGELU or exact GELU; conv1 and proj have no bias
    "dinov2": ("layer_scale",), "hf_dinov2": ("layer_scale", "mlp"), "hf_dinov2_reg": ("layer_scale", "mlp"),
    "hf_dinov3": ("layer_scale", "abs_pos_embed", "rope"), "dinov3_original": ("act", "abs_pos_embed", "rope"),
    "hf_aimv2": ("classifier", "class_token", "mlp", "norm", "patch_embed_norm"),
    "hf_clip": ("norm_pre", "patch_bias", "head_bias"), "hf_clip_proj": ("norm_pre", "patch_bias", "head_bias"),
    "hf_siglip": ("classifier", "class_token"), "hf_siglip2": ("classifier", "class_token"),
    "lucidrains": ("qkv_bias", "patch_norm"), "lucidrains_prenorm": ("qkv_bias",),
    "timm_eva": ("act", "pos_resize"), "timm_naflexvit": ("pos_embed_prefix", "pos_resize"),
    "timm_beit": ("act", "rel_pos_bias", "key_bias"),
    **{name: ("key_bias",) for name in ("hf_beit", "hf_beit_cls", "hf_data2vec_vision", "hf_data2vec_vision_cls")},
}


def refusable(layout: str, variant: str) -> Dict[str, Any]:
    """The fields a refusal of ``variant`` by ``layout`` may name, with the variant's values: those
    it sets, and those of ``_SMALL`` the layout refuses, from the case's parametrisation alone."""
    cfg = VARIANTS[variant]
    return {name: getattr(cfg, name) for name in (*SETTINGS[variant], *REFUSES_SMALL.get(layout, ()))}


CASES = [(layout, container, name) for layout in LAYOUTS for container in LAYOUTS[layout].containers
         for name in VARIANTS]


def _written(layout, cfg: ViTConfig, container: str):
    """Shapes, metadata and ``config.json`` (as a directory's reader parses it) of what ``layout``
    writes for ``cfg`` in ``container``."""
    shapes = foreign_shapes(layout.rules(cfg), parameter_shapes(cfg), cfg)
    meta, config = {}, EMPTY
    if container == "dir":
        config = read_only(json.loads(json.dumps(layout.directory_config(cfg, None))))
    if layout.name == "canonical":
        meta["vitconv_config"] = cfg.to_json()
    return shapes, meta, config


def _assert_names_what_it_refuses(problems: List[str], layout, variant: str) -> None:
    """Each refusal names a config field with this model's value of it and says why in brackets
    (``act='gelu' (an .npz always means …)``), or the model's tensors the layout has no row for,
    or the tensors the layout always has that this model lacks. The fields named are among those
    the case's parametrisation gives (:func:`refusable`: what the variant sets, what the layout
    refuses of ``_SMALL``), each with the variant's value; for ``_SMALL`` itself, exactly those
    :data:`REFUSES_SMALL` lists."""
    cfg, expected = VARIANTS[variant], refusable(layout.name, variant)
    shapes = parameter_shapes(cfg)
    named = []
    for problem in problems:
        field = next((f for f in expected if problem.startswith(f"{f}={expected[f]!r} ")), None)
        if field is not None:
            assert problem.endswith(")"), problem
            named.append(field)
            continue
        missing = re.fullmatch(rf"no {layout.name} row for (.+)", problem)
        lacking = re.fullmatch(rf"the {layout.name} layout always has (.+), which this model lacks", problem)
        assert missing or lacking, f"{problem!r} names none of {expected}"
        tensors = (missing or lacking).group(1).split(", ")
        assert all((t in shapes) == bool(missing) for t in tensors), problem
    if not SETTINGS[variant]:  # _SMALL itself: exactly what the layout refuses of it
        assert sorted(named) == sorted(REFUSES_SMALL.get(layout.name, ())), problems


@pytest.mark.parametrize("layout,container,variant", CASES, ids=["-".join(c) for c in CASES])
def test_what_a_layout_accepts_reads_back_as_the_same_model(layout, container, variant):
    layout, cfg = LAYOUTS[layout], VARIANTS[variant]
    recorded = container == "dir"
    problems = layout.problems(cfg, parameter_shapes(cfg), recorded)
    if problems:  # refused: every reason names what it refuses, and says why
        _assert_names_what_it_refuses(problems, layout, variant)
        return
    shapes, meta, config = _written(layout, cfg, container)
    heads = layout.carry("num_heads")
    given = cfg.num_heads if heads.argument is not None and not heads.recorded(cfg, recorded) else None
    assert detect_layout(Probe(shapes, meta, config=config)) is layout
    got = layout.read_config(Probe(shapes, meta, None, given, config))
    # a bare file does not record the layout's constructor arguments: its code's defaults return
    want = cfg
    for c in layout.carries:
        if c.set_by_code and c.field != "num_heads" and not c.recorded(cfg, recorded):
            want = want.replace(**{c.field: c.default_for(cfg)})
    stored = []  # how tensors are laid out: a layout without a place for it writes its own way
    for f in dataclasses.fields(ViTConfig):  # training-only tensors a layout lacks are left out
        if (training_only(f.name) or storage_only(f.name)) and layout.carry(f.name) is None:
            want = want.replace(**{f.name: f.default})
            if storage_only(f.name):  # what it reads back is its own storage's, not compared
                stored.append(f.name)
                got = got.replace(**{f.name: f.default})
    assert got == want
    notes = layout.argument_notes(cfg, recorded) + [t + "=" for t in layout.dropped(cfg)]
    lost = [f.name for f in dataclasses.fields(ViTConfig)
            if getattr(cfg, f.name) != getattr(want, f.name) and f.name not in stored]
    assert sorted(n.split("=")[0] for n in notes if not n.startswith("num_heads")) == sorted(lost)


def test_every_layout_can_hold_some_variant():
    held = {layout: [] for layout in LAYOUTS}
    for layout, container, variant in CASES:
        cfg = VARIANTS[variant]
        if not LAYOUTS[layout].problems(cfg, parameter_shapes(cfg), container == "dir"):
            held[layout].append(variant)
    assert all(held.values()), held


@pytest.mark.parametrize("layout,cfg,says", [
    ("google", _SMALL.replace(act="gelu"), "act='gelu' (an .npz always means Flax's tanh GELU)"),
    ("google", _SMALL.replace(norm_eps=1e-5), "norm_eps=1e-05 (an .npz always means Flax's LayerNorm epsilon"),
    ("google", _SMALL.replace(patch_norm=True), "patch_norm=True (LayerNorms around the patch projection; the "
                                                "google layout has no place for it: it always means False)"),
    ("hf", _SMALL.replace(classifier="gap", class_token=False), "classifier='gap' (Hugging Face ViT always classifies"),
    ("hf", _SMALL.replace(distilled=True), "distilled=True (DeiT distillation token and head_dist; the hf layout"),
    ("hf", _SMALL.replace(representation_size=48), "never applies the pooler"),
    ("hf_model", _SMALL, "no hf_model row for head.weight, head.bias"),
    ("timm", _SMALL.replace(num_heads=4, head_dim=8), "timm's attention width is the embedding width"),
    ("timm", _SMALL.replace(resnet_layers=(1,), patch_size=1, image_size=64), "hybrid backbone"),
    ("lucidrains", _SMALL, "qkv_bias=True (vit-pytorch's to_qkv has no bias)"),
    ("lucidrains_prenorm", _SMALL.replace(qkv_bias=False, classifier="gap", class_token=False), "old vit-pytorch always has a class"),
    ("jeonsworld", _SMALL.replace(classifier="gap", class_token=False), "jeonsworld always classifies the class token"),
])
def test_refusals_name_the_field_and_the_reason(layout, cfg, says):
    problems = LAYOUTS[layout].problems(cfg, parameter_shapes(cfg), recorded=True)
    assert any(says in p for p in problems), problems


def test_fields_only_config_json_records_need_a_directory():
    """Hugging Face's epsilon lives in config.json: a bare weights file could not carry it."""
    cfg = _SMALL.replace(norm_eps=1e-6, act="gelu")
    hf = LAYOUTS["hf"]
    assert hf.problems(cfg, parameter_shapes(cfg), recorded=True) == []
    assert "hf" in [l.name for l in LAYOUTS.values() if "dir" in l.containers]
    assert LAYOUTS["hf"].containers == ("dir",)
