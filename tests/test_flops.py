"""The analytic FLOP count behind MFU against torch's own FlopCounterMode, run on the meta
device (no arithmetic) with SDPA's math backend so attention's two products are seen as
matmuls; and against the published ViT-B/16 figure (17.56 GMAC, 35.1 GFLOP at 224 px)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitconv.config import ViTConfig
from vitconv.flops import flops_per_image, macs_per_image, mfu
from vitconv.model import VisionTransformer
from vitconv.synthetic import preset

TINY = dict(width=64, depth=2, num_heads=2, head_dim=32, mlp_dim=128, num_classes=10)


def _counted(cfg: ViTConfig, size: int) -> int:
    with torch.device("meta"):
        model = VisionTransformer(cfg).eval()
        x = torch.empty(1, cfg.in_chans, size, size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg,size", [
    (preset("B/16"), 224),
    (preset("B/16"), 384),  # another grid: position table resized on the fly
    (ViTConfig(image_size=32, patch_size=8, classifier="gap", **TINY), 32),
    (ViTConfig(image_size=32, patch_size=8, representation_size=48, **TINY), 32),
    (ViTConfig(image_size=32, patch_size=8, distilled=True, act="gelu", **TINY), 32),
    (ViTConfig(image_size=64, patch_size=1, resnet_layers=(1, 2, 1), resnet_width=32, **TINY), 64),
    (ViTConfig(image_size=64, patch_size=1, resnet_layers=(3, 4, 9), resnet_width=32, **TINY), 64),
], ids=["B16", "B16@384", "gap", "pre_logits", "deit", "hybrid", "hybrid_349"])
def test_flops_equal_torch_flop_counter(cfg, size):
    assert flops_per_image(cfg, size) == _counted(cfg, size)


def test_vit_b16_published_figure():
    macs = macs_per_image(preset("B/16"))["total"]
    assert round(macs / 1e9, 2) == 17.56 and round(2 * macs / 1e9, 1) == 35.1


def test_mfu_is_achieved_over_peak():
    cfg = preset("B/16")
    # 1000 img/s of a 35.13 GFLOP model on a 100 TFLOP/s device: 35.13 %
    assert mfu(cfg, 1000.0, 100e12) == pytest.approx(0.3513, abs=1e-4)
