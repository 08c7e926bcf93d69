from __future__ import annotations

import pytest

from vitconv.config import ViTConfig


@pytest.mark.parametrize("cfg", [
    ViTConfig(),
    ViTConfig(classifier="gap", class_token=False, act="gelu", norm_eps=1e-12, qkv_bias=False, final_norm="pooled"),
    ViTConfig(image_size=384, patch_size=1, resnet_layers=(3, 4, 9), representation_size=768,
              num_classes=21843),
])
def test_json_round_trip(cfg):
    assert ViTConfig.from_json(cfg.to_json()) == cfg


def test_derived_sizes():
    assert ViTConfig().num_tokens == 197
    assert ViTConfig(image_size=384, patch_size=1, resnet_layers=(3, 4, 9)).grid_size == 24
    assert ViTConfig(classifier="gap", class_token=False).num_tokens == 196


@pytest.mark.parametrize("bad", [dict(classifier="mean"), dict(act="swish"), dict(image_size=230),
                                 dict(width=0)])
def test_rejects_invalid(bad):
    with pytest.raises(ValueError):
        ViTConfig(**bad)


def test_unknown_fields_rejected():
    with pytest.raises(ValueError, match="unknown"):
        ViTConfig.from_dict({"widht": 3})


def test_distilled_config_counts_both_prefix_tokens_and_refuses_what_deit_lacks():
    c = ViTConfig(image_size=32, patch_size=8, width=48, depth=1, num_heads=3, head_dim=16, mlp_dim=96,
                  num_classes=10, distilled=True)
    assert (c.num_prefix_tokens, c.num_tokens) == (2, 18)
    assert ViTConfig.from_json(c.to_json()) == c
    for bad in (dict(classifier="gap", class_token=False), dict(representation_size=48)):
        with pytest.raises(ValueError, match="distillation token"):
            c.replace(**bad)
