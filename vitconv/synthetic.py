"""Full-size Google-layout ``.npz`` checkpoints with seeded random weights, for benchmarks.

Real checkpoints are hundreds of MB to GB and cannot ship with the project, but
conversion speed and memory depend only on the shapes and the container. The files
written here have Google's key names, shapes and member order (sorted keys, as
``np.savez`` of the flattened params gives) and are written member by member into the
zip, so generating ViT-H/14 (2.5 GB) never holds more than one tensor.

The keys and shapes come from the Google rule table run backwards on the model's own
shapes, so the generator cannot drift from what the converter reads.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from .config import ViTConfig, parameter_shapes
from .formats.base import TensorSpec
from .formats.npz import NpzStreamWriter
from .rules import LAYOUTS
from .rules.base import foreign_shapes

#: Google's published ImageNet models (``vit_jax/configs/models.py``), 224 px, 1000 classes.
PRESETS: Dict[str, ViTConfig] = {
    "Ti/16": ViTConfig(width=192, depth=12, num_heads=3, head_dim=64, mlp_dim=768, patch_size=16),
    "S/16": ViTConfig(width=384, depth=12, num_heads=6, head_dim=64, mlp_dim=1536, patch_size=16),
    "B/16": ViTConfig(width=768, depth=12, num_heads=12, head_dim=64, mlp_dim=3072, patch_size=16),
    "L/16": ViTConfig(width=1024, depth=24, num_heads=16, head_dim=64, mlp_dim=4096, patch_size=16),
    "H/14": ViTConfig(width=1280, depth=32, num_heads=16, head_dim=80, mlp_dim=5120, patch_size=14),
    # ViT-g/14 of "Scaling Vision Transformers" (Zhai et al., 2022): 1.0B parameters, 4.0 GB in float32
    "g/14": ViTConfig(width=1408, depth=40, num_heads=16, head_dim=88, mlp_dim=6144, patch_size=14),
    # R50+ViT-B/16: ResNet-50 stem with stages (3, 4, 9), then 1x1 "patches" on its /16 grid.
    "R50+B/16": ViTConfig(width=768, depth=12, num_heads=12, head_dim=64, mlp_dim=3072, patch_size=1,
                          resnet_layers=(3, 4, 9), resnet_width=64),
}


def preset(name: str) -> ViTConfig:
    """The config of a named preset (``B/16``, ``ViT-B/16``, ``vit-b16`` all work)."""
    key = name.upper().replace("VIT-", "").replace("VIT", "").replace("_", "/").lstrip("-")
    for k, cfg in PRESETS.items():
        if key in (k.upper(), k.upper().replace("/", "")):
            return cfg
    raise KeyError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


def google_shapes(cfg: ViTConfig) -> Dict[str, Tuple[int, ...]]:
    """Google key -> shape for ``cfg``: the Google table's inverse on the model's shapes."""
    return foreign_shapes(LAYOUTS["google"].rules(cfg), parameter_shapes(cfg), cfg)


def _values(key: str, shape: Tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Plausible magnitudes: norms' scales near 1, biases and embeddings small, kernels
    scaled like a fan-in initialisation. Only shapes matter for the benchmarks."""
    leaf = key.rsplit("/", 1)[-1]
    if leaf == "scale":
        return (1.0 + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    if leaf == "bias" or "pos_embedding" in key or key == "cls":
        return 0.02 * rng.standard_normal(shape, dtype=np.float32)
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(1.0 / np.sqrt(max(fan_in, 1)))
    return w


def iter_arrays(cfg: ViTConfig, seed: int = 0) -> Iterator[Tuple[str, np.ndarray]]:
    """``(google key, array)`` in sorted key order, one array alive at a time."""
    rng = np.random.default_rng(seed)
    for key, shape in sorted(google_shapes(cfg).items()):
        yield key, _values(key, shape, rng)


def write_synthetic_npz(path: os.PathLike | str, cfg: ViTConfig, seed: int = 0,
                        prefix: str = "") -> int:
    """Write a Google-layout ``.npz`` for ``cfg`` at ``path``, streaming; returns bytes of
    tensor data written. ``prefix`` nests keys (``opt/target/`` as in older checkpoints)."""
    total = 0
    specs = [TensorSpec(prefix + k, np.dtype(np.float32), s) for k, s in sorted(google_shapes(cfg).items())]
    with NpzStreamWriter(path, specs) as w:
        for key, a in iter_arrays(cfg, seed):
            w.write(prefix + key, a)
            total += a.nbytes
    return total


def make_synthetic(name_or_cfg: "str | ViTConfig", path: os.PathLike | str, seed: int = 0,
                   image_size: Optional[int] = None, num_classes: Optional[int] = None) -> ViTConfig:
    """Write a synthetic checkpoint for a preset name or a config; returns the config."""
    cfg = preset(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    changes = {k: v for k, v in (("image_size", image_size), ("num_classes", num_classes)) if v is not None}
    cfg = cfg.replace(**changes) if changes else cfg
    write_synthetic_npz(path, cfg, seed)
    return cfg
