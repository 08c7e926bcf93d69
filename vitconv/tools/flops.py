"""Model FLOPs of one forward pass, counted on the canonical model itself.

Why from the model: MFU (model FLOPs utilisation) compares what the model must compute with
what the hardware could compute, so the count must follow the architecture exactly, and a
module added to the model must be counted without a second description of it here. The
model runs on the ``meta`` device (shapes only, no arithmetic) under torch's
``FlopCounterMode``, which counts every matrix product and convolution (attention's two
token-by-token products included) and nothing else: normalisation, activations, softmax and
additions are a fraction of a percent. That is the convention behind the published
"ViT-B/16 at 224 px = 17.56 GMAC = 35.1 GFLOP". One MAC is two FLOPs.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from vitconv.config import ViTConfig
from vitconv.model import VisionTransformer


@functools.lru_cache(maxsize=32)
def _module_flops(cfg: ViTConfig, image_size: int) -> Dict[str, int]:
    with torch.device("meta"):
        model = VisionTransformer(cfg).eval()
        x = torch.empty(1, cfg.in_chans, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


def macs_per_image(cfg: ViTConfig, image_size: Optional[int] = None) -> Dict[str, int]:
    """MACs per image by part: ``stem``, ``patch_embed``, ``attention`` (qkv, q@k^T, attn@v,
    output projection), ``mlp``, ``head`` (everything after the encoder: pre_logits,
    classifiers) and ``total``."""
    flops = _module_flops(cfg, image_size or cfg.image_size)
    root = "VisionTransformer"
    blocks = [f"{root}.blocks.{i}" for i in range(cfg.depth)]
    parts = {
        "stem": flops.get(f"{root}.stem", 0),
        "patch_embed": flops.get(f"{root}.patch_embed", 0),
        "attention": sum(flops.get(f"{b}.attn", 0) for b in blocks),
        "mlp": sum(flops.get(f"{b}.mlp", 0) for b in blocks),
    }
    parts["head"] = flops.get("Global", 0) - sum(parts.values())
    parts["total"] = flops.get("Global", 0)
    return {k: v // 2 for k, v in parts.items()}


def flops_per_image(cfg: ViTConfig, image_size: Optional[int] = None) -> int:
    """``2 * MACs``: the FLOP figure MFU is quoted against."""
    return 2 * macs_per_image(cfg, image_size)["total"]


def mfu(cfg: ViTConfig, images_per_s: float, peak_flops: float, image_size: Optional[int] = None) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak FLOP/s
    (for the precision the model ran in, dense, no sparsity)."""
    return flops_per_image(cfg, image_size) * images_per_s / peak_flops
