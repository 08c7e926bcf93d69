"""Canonical tensor names and shapes, computed from a :class:`ViTConfig` without torch.

Why not build the model on torch's meta device: a streaming conversion needs only these
shapes, and importing torch for them costs ~185 MiB of resident memory, most of the
conversion's footprint (it moves nothing else). The table below follows
:class:`vitconv.model.VisionTransformer`'s module tree in ``state_dict`` order; the test
suite checks it against the real module's ``state_dict`` across every architecture
variant, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterator, Tuple

from .config import ViTConfig

Shape = Tuple[int, ...]


def _linear(name: str, n_in: int, n_out: int, bias: bool = True) -> Iterator[Tuple[str, Shape]]:
    yield f"{name}.weight", (n_out, n_in)
    if bias:
        yield f"{name}.bias", (n_out,)


def _norm(name: str, n: int) -> Iterator[Tuple[str, Shape]]:
    yield f"{name}.weight", (n,)
    yield f"{name}.bias", (n,)


def _stem(cfg: ViTConfig) -> Iterator[Tuple[str, Shape]]:
    """Google's ResNet-v2 root and bottleneck stages (weight-standardised convs, no bias)."""
    w = cfg.resnet_width
    yield "stem.conv_root.weight", (w, cfg.in_chans, 7, 7)
    yield from _norm("stem.gn_root", w)
    in_ch = w
    for i, units in enumerate(cfg.resnet_layers or ()):
        features = w * 2 ** i
        for j in range(units):
            p, out_ch = f"stem.stages.{i}.{j}", features * 4
            if in_ch != out_ch or (i > 0 and j == 0):  # the unit projects its residual
                yield f"{p}.conv_proj.weight", (out_ch, in_ch, 1, 1)
                yield from _norm(f"{p}.gn_proj", out_ch)
            for k, (cin, cout, kernel) in enumerate(
                    ((in_ch, features, 1), (features, features, 3), (features, out_ch, 1)), 1):
                yield f"{p}.conv{k}.weight", (cout, cin, kernel, kernel)
                yield from _norm(f"{p}.gn{k}", cout)
            in_ch = out_ch


def _shapes(cfg: ViTConfig) -> Iterator[Tuple[str, Shape]]:
    d = cfg.width
    if cfg.classifier == "token":
        yield "cls_token", (1, 1, d)
    if cfg.distilled:
        yield "dist_token", (1, 1, d)
    yield "pos_embed", (1, cfg.num_tokens, d)
    if cfg.resnet_layers is not None:
        yield from _stem(cfg)
    yield "patch_embed.weight", (d, cfg.embed_in_chans, cfg.patch_size, cfg.patch_size)
    yield "patch_embed.bias", (d,)
    if cfg.patch_norm:
        yield from _norm("patch_norm_pre", cfg.embed_in_chans * cfg.patch_size ** 2)
        yield from _norm("patch_norm_post", d)
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        yield from _norm(f"{b}.norm1", d)
        yield from _linear(f"{b}.attn.qkv", d, 3 * cfg.attn_dim, cfg.qkv_bias)
        yield from _linear(f"{b}.attn.proj", cfg.attn_dim, d)
        yield from _norm(f"{b}.norm2", d)
        yield from _linear(f"{b}.mlp.fc1", d, cfg.mlp_dim)
        yield from _linear(f"{b}.mlp.fc2", cfg.mlp_dim, d)
    if cfg.final_norm != "none":
        yield from _norm("norm", d)
    if cfg.representation_size:
        yield from _linear("pre_logits", d, cfg.representation_size)
    if cfg.num_classes:
        yield from _linear("head", cfg.head_in_dim, cfg.num_classes)
        if cfg.distilled:
            yield from _linear("head_dist", d, cfg.num_classes)


def expected_shapes(cfg: ViTConfig) -> Dict[str, Shape]:
    """Canonical ``{name: shape}`` for ``cfg``, in ``state_dict`` order."""
    return dict(_cached(cfg))


@functools.lru_cache(maxsize=16)
def _cached(cfg: ViTConfig) -> Tuple[Tuple[str, Shape], ...]:
    return tuple(_shapes(cfg))
