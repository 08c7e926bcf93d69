"""Multiply-accumulates of one forward pass, counted from the config alone.

Why analytic: MFU (model FLOPs utilisation) compares what the model must compute with what
the hardware could compute; it should not depend on how a runtime happens to schedule or
fuse the work, so the count comes from the architecture, not from a profiler. Convention
(the one behind the published "ViT-B/16 at 224 px = 17.56 GMAC = 35.1 GFLOP"): every
matrix product and convolution is counted (attention's two token-by-token products
included); normalisation, activations, softmax and additions are not (they are a fraction of
a percent). One MAC is two FLOPs.
"""

from __future__ import annotations

from typing import Dict, Optional

from .config import ViTConfig


def _tf_same_out(size: int, stride: int) -> int:
    return -(-size // stride)  # TF SAME: ceil(size / stride)


def stem_macs(cfg: ViTConfig, image_size: int) -> int:
    """The hybrid ResNet stem: root 7x7/2 conv, 3x3/2 max-pool (no MACs), then pre-activation
    bottleneck units (1x1, 3x3 with the stage's stride on the first unit, 1x1, and a 1x1
    projection on each stage's first unit)."""
    if cfg.resnet_layers is None:
        return 0
    w = cfg.resnet_width
    h = _tf_same_out(image_size, 2)
    macs = h * h * w * cfg.in_chans * 7 * 7
    h = _tf_same_out(h, 2)  # max-pool
    cin = w
    for s, units in enumerate(cfg.resnet_layers):
        mid, out = w * 2 ** s, w * 4 * 2 ** s
        for u in range(units):
            stride = 2 if (u == 0 and s > 0) else 1
            h_out = _tf_same_out(h, stride)
            macs += h * h * cin * mid             # conv1 1x1 at the input resolution
            macs += h_out * h_out * mid * mid * 9  # conv2 3x3 (strided)
            macs += h_out * h_out * mid * out      # conv3 1x1
            if u == 0:
                macs += h_out * h_out * cin * out  # projection
            h, cin = h_out, out
    return macs


def macs_per_image(cfg: ViTConfig, image_size: Optional[int] = None) -> Dict[str, int]:
    """MACs per image by part: ``stem``, ``patch_embed``, ``attention`` (qkv, q@k^T, attn@v,
    output projection), ``mlp``, ``head`` (pre_logits and classifier) and ``total``."""
    size = image_size or cfg.image_size
    grid = size // cfg.total_stride
    patches = grid * grid
    n = patches + cfg.num_prefix_tokens
    d, a, m = cfg.width, cfg.attn_dim, cfg.mlp_dim
    heads_out = 2 if cfg.distilled else 1
    out = {
        "stem": stem_macs(cfg, size),
        "patch_embed": patches * d * cfg.embed_in_chans * cfg.patch_size ** 2,
        "attention": cfg.depth * (3 * n * d * a + 2 * n * n * a + n * a * d),
        "mlp": cfg.depth * 2 * n * d * m,
        "head": (d * cfg.representation_size if cfg.representation_size else 0)
        + heads_out * cfg.head_in_dim * cfg.num_classes,
    }
    out["total"] = sum(out.values())
    return out


def flops_per_image(cfg: ViTConfig, image_size: Optional[int] = None) -> int:
    """``2 * MACs``: the FLOP figure MFU is quoted against."""
    return 2 * macs_per_image(cfg, image_size)["total"]


def mfu(cfg: ViTConfig, images_per_s: float, peak_flops: float, image_size: Optional[int] = None) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak FLOP/s
    (for the precision the model ran in, dense, no sparsity)."""
    return flops_per_image(cfg, image_size) * images_per_s / peak_flops
