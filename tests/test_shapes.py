"""The canonical model's tensor shapes as data (:func:`vitconv.config.parameter_shapes`, which lets
a conversion run without torch) against the model itself, built on the ``meta`` device: the same
names, shapes and order, for every preset, every golden case and a broad sweep of configs."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import CASES, golden_path
from vitconv.config import ViTConfig, parameter_shapes
from vitconv.model import parameter_shapes as model_shapes
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.conversion.options import ReadOptions
from vitconv.tools.synthetic import PRESETS

#: Fields that change what the model computes but no tensor's shape.
NO_SHAPE = {"norm_eps", "act", "pos_resize", "rel_pos_resize", "scan", "resnet_gn_eps", "resnet_ws_eps", "key_bias",
            "rope_theta", "swiglu_unpacked", "rope_periods", "rope_ref_grid", "rope_grid_offset", "rope_indexing",
            "rope_half", "qkv_unfused", "pool_heads", "map_prefix"}

#: One strategy per field that can change a shape; a field missing here and from NO_SHAPE fails
#: test_every_field_is_swept, so a new model feature cannot slip past the comparison.
FIELDS = {
    "rope": st.sampled_from(["none", "mixed"]),  # RoPE-Mixed: learned frequencies per block and head
    "attn_norm": st.booleans(),
    "mlp_norm": st.booleans(),
    "image_size": st.sampled_from([16, 32, 48, 64]),
    "patch_size": st.sampled_from([1, 2, 4, 8, 16]),
    "in_chans": st.integers(1, 4),
    "width": st.integers(1, 24),
    "depth": st.integers(0, 3),
    "num_heads": st.integers(1, 4),
    "head_dim": st.integers(1, 8),
    "mlp_dim": st.integers(1, 32),
    "classifier": st.sampled_from(["token", "gap", "map"]),
    "representation_size": st.one_of(st.none(), st.integers(1, 12)),
    "num_classes": st.integers(0, 12),
    "qkv_bias": st.booleans(),
    "final_norm": st.sampled_from(["encoder", "pooled", "none"]),
    "resnet_layers": st.one_of(st.none(), st.lists(st.integers(1, 2), min_size=0, max_size=3).map(tuple)),
    "resnet_width": st.sampled_from([4, 8, 16]),
    "resnet_groups": st.sampled_from([1, 2, 4]),
    "patch_norm": st.booleans(),
    "distilled": st.booleans(),
    "layer_scale": st.booleans(),
    "class_token": st.booleans(),
    "num_reg_tokens": st.integers(0, 3),
    "pos_embed_prefix": st.sampled_from(["all", "class", "none"]),
    "norm_pre": st.booleans(),
    "patch_bias": st.booleans(),
    "head_bias": st.booleans(),
    "mlp": st.sampled_from(["mlp", "swiglu"]),
    "mask_token": st.booleans(),
    "abs_pos_embed": st.booleans(),
    "norm": st.sampled_from(["layernorm", "rmsnorm"]),
    "proj_bias": st.booleans(),
    "mlp_bias": st.booleans(),
    "patch_embed_norm": st.booleans(),
    "qk_norm": st.booleans(),
    "pool_head": st.sampled_from(["siglip", "aimv2"]),
    "rel_pos_bias": st.booleans(),
    "rel_pos_bias_shared": st.booleans(),
}


def _same(cfg: ViTConfig) -> None:
    assert list(parameter_shapes(cfg).items()) == list(model_shapes(cfg).items())


def test_every_field_is_swept():
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    assert fields == set(FIELDS) | NO_SHAPE, "a new config field: add it to FIELDS (or NO_SHAPE)"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets(name):
    _same(PRESETS[name])


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_cases(name):
    case = CASES[name]  # with what a bare file cannot record, as the case says it
    with open_checkpoint(golden_path(case["checkpoint"]), ReadOptions(overrides=dict(case.get("set") or {}))) as ckpt:
        _same(ckpt.source_config)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.fixed_dictionaries(FIELDS))
def test_any_config(fields):
    try:
        cfg = ViTConfig(**fields)
    except ValueError:
        assume(False)
    _same(cfg)


def test_sizes_torch_cannot_allocate_are_refused_here_too():
    cfg = ViTConfig(width=2 ** 31, mlp_dim=2 ** 33, depth=1, num_classes=0)
    with pytest.raises(OverflowError):
        parameter_shapes(cfg)
    with pytest.raises((RuntimeError, OverflowError, ValueError)):
        model_shapes(cfg)
