"""The FLOP count behind MFU (torch's FlopCounterMode over the model on the meta device)
against an analytic count written here from the ViT paper's architecture, part by part, and
against the published ViT-B/16 figure (17.56 GMAC, 35.1 GFLOP at 224 px)."""

from __future__ import annotations

import pytest

from vitconv.config import ViTConfig
from vitconv.tools.flops import flops_per_image, macs_per_image, mfu
from vitconv.tools.synthetic import preset

TINY = dict(width=64, depth=2, num_heads=2, head_dim=32, mlp_dim=128, num_classes=10)


def _same_out(size: int, stride: int) -> int:
    return -(-size // stride)  # TF SAME: ceil(size / stride)


def _analytic_macs(cfg: ViTConfig, size: int) -> dict:
    """Every matmul and convolution of the ViT (and Google's ResNet-v2 stem), counted by hand."""
    stem = 0
    if cfg.resnet_layers is not None:
        w = cfg.resnet_width
        h = _same_out(size, 2)
        stem = h * h * w * cfg.in_chans * 7 * 7  # root 7x7/2
        h, cin = _same_out(h, 2), w  # max-pool 3x3/2
        for s, units in enumerate(cfg.resnet_layers):
            mid, out = w * 2 ** s, w * 4 * 2 ** s
            for u in range(units):
                h_out = _same_out(h, 2 if (u == 0 and s > 0) else 1)
                stem += h * h * cin * mid + h_out * h_out * mid * mid * 9 + h_out * h_out * mid * out
                if u == 0:
                    stem += h_out * h_out * cin * out  # projection
                h, cin = h_out, out
    patches = (size // cfg.total_stride) ** 2
    n, d, a, m = patches + cfg.num_prefix_tokens, cfg.width, cfg.attn_dim, cfg.mlp_dim
    parts = {"stem": stem, "patch_embed": patches * d * cfg.embed_in_chans * cfg.patch_size ** 2,
             "attention": cfg.depth * (3 * n * d * a + 2 * n * n * a + n * a * d),
             "mlp": cfg.depth * 2 * n * d * m,
             "head": (d * cfg.representation_size if cfg.representation_size else 0)
             + (2 if cfg.distilled else 1) * cfg.head_in_dim * cfg.num_classes}
    parts["total"] = sum(parts.values())
    return parts


@pytest.mark.parametrize("cfg,size", [
    (preset("B/16"), 224),
    (preset("B/16"), 384),  # another grid: position table resized on the fly
    (ViTConfig(image_size=32, patch_size=8, classifier="gap", class_token=False, **TINY), 32),
    (ViTConfig(image_size=32, patch_size=8, representation_size=48, **TINY), 32),
    (ViTConfig(image_size=32, patch_size=8, distilled=True, act="gelu", **TINY), 32),
    (ViTConfig(image_size=64, patch_size=1, resnet_layers=(1, 2, 1), resnet_width=32, **TINY), 64),
    (ViTConfig(image_size=64, patch_size=1, resnet_layers=(3, 4, 9), resnet_width=32, **TINY), 64),
], ids=["B16", "B16@384", "gap", "pre_logits", "deit", "hybrid", "hybrid_349"])
def test_flops_equal_the_analytic_count(cfg, size):
    assert macs_per_image(cfg, size) == _analytic_macs(cfg, size)
    assert flops_per_image(cfg, size) == 2 * _analytic_macs(cfg, size)["total"]


def test_vit_b16_published_figure():
    macs = macs_per_image(preset("B/16"))["total"]
    assert round(macs / 1e9, 2) == 17.56 and round(2 * macs / 1e9, 1) == 35.1


def test_mfu_is_achieved_over_peak():
    cfg = preset("B/16")
    # 1000 img/s of a 35.13 GFLOP model on a 100 TFLOP/s device: 35.13 %
    assert mfu(cfg, 1000.0, 100e12) == pytest.approx(0.3513, abs=1e-4)
