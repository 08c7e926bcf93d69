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
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np

from vitconv.config import ViTConfig, parameter_shapes
from vitconv.formats.base import TensorSpec
from vitconv.formats.npz import NpzStreamWriter
from vitconv.layouts import LAYOUTS
from vitconv.layouts.table import foreign_shapes
from vitconv.conversion.options import ConvertOptions
from vitconv.conversion.pipeline import convert as convert_checkpoint

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
    # the 7B class (DINOv3 ViT-7B/16, InternViT-6B): width 4096, 32 blocks of 32 heads, MLP 16384;
    # 6.4 B parameters, 25.8 GB in float32, more than this machine's memory
    "7B": ViTConfig(width=4096, depth=32, num_heads=32, head_dim=128, mlp_dim=16384, patch_size=14),
    # the same 7B as an image tower with big_vision's MAP head and no class token (a SigLIP tower's
    # structure, 6.6 B parameters with the head): a Hugging Face layout holds it (SiglipVisionModel),
    # which the 'tok' 7B above (big_vision's table has no class-token row) has none of
    "7B-map": ViTConfig(width=4096, depth=32, num_heads=32, head_dim=128, mlp_dim=16384, patch_size=14,
                        classifier="map", class_token=False, num_classes=0),
}


#: How a preset is stored when generated, where not as Google's float32 ``.npz``: the 7B class in
#: bfloat16, as big_vision ``.npz`` (models this size ship in bfloat16; 12.9 GB instead of 25.8).
STORED: Dict[str, Tuple[str, str]] = {"7B": ("big_vision", "bfloat16"), "7B-map": ("big_vision", "bfloat16")}


def preset_name(name: str) -> str:
    """The :data:`PRESETS` key a preset name means (``B/16``, ``ViT-B/16``, ``vit-b16``)."""
    key = name.upper().replace("VIT-", "").replace("VIT", "").replace("_", "/").lstrip("-")
    for k in PRESETS:
        if key in (k.upper(), k.upper().replace("/", "")):
            return k
    raise KeyError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


def preset(name: str) -> ViTConfig:
    """The config of a named preset (``B/16``, ``ViT-B/16``, ``vit-b16`` all work)."""
    return PRESETS[preset_name(name)]


def google_shapes(cfg: ViTConfig, layout: str = "google") -> Dict[str, Tuple[int, ...]]:
    """Google key -> shape for ``cfg``: the Google table's inverse on the model's shapes (or
    another ``.npz`` layout's: ``big_vision``)."""
    return foreign_shapes(LAYOUTS[layout].rules(cfg), parameter_shapes(cfg), cfg)


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


def iter_arrays(cfg: ViTConfig, seed: int = 0, layout: str = "google") -> Iterator[Tuple[str, np.ndarray]]:
    """``(key, array)`` in sorted key order, one array alive at a time."""
    rng = np.random.default_rng(seed)
    for key, shape in sorted(google_shapes(cfg, layout).items()):
        yield key, _values(key, shape, rng)


#: big_vision's bfloat16 in an ``.npz``: the raw 16 bits as a 2-byte void (numpy has no bfloat16).
BF16_STORED = np.dtype("V2")


def _bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as 2-byte voids."""
    bits = a.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return rounded.astype(np.uint16).view(BF16_STORED)


def write_synthetic_npz(path: os.PathLike | str, cfg: ViTConfig, seed: int = 0,
                        prefix: str = "", layout: str = "google", dtype: str = "float32") -> int:
    """Write a Google-layout (or ``big_vision``) ``.npz`` for ``cfg`` at ``path``, streaming;
    returns bytes of tensor data written. ``prefix`` nests keys (``opt/target/`` as in older
    checkpoints); ``dtype`` ``bfloat16`` stores the weights as big_vision's bfloat16 files do."""
    total = 0
    stored = BF16_STORED if dtype == "bfloat16" else np.dtype(dtype)
    specs = [TensorSpec(prefix + k, stored, s) for k, s in sorted(google_shapes(cfg, layout).items())]
    with NpzStreamWriter(path, specs) as w:
        for key, a in iter_arrays(cfg, seed, layout):
            a = _bfloat16_bits(a) if dtype == "bfloat16" else a.astype(stored, copy=False)
            w.write(prefix + key, a)
            total += a.nbytes
            del a
    return total


def write_synthetic_hf(path: os.PathLike | str, cfg: ViTConfig, seed: int = 0, dtype: str = "float32") -> None:
    """A Hugging Face model directory (sharded above 5 GB) at ``path``: the ``.npz`` of
    :func:`write_synthetic_npz` (big_vision's in ``dtype`` for a tower without a class token,
    else Google's float32, whose table has the class token's row) written beside it, converted as
    ``vitconv convert --to hf --dtype`` converts (the model card's verification left out), and
    removed. The rule tables pick the class (``SiglipVisionModel`` for a MAP tower,
    ``ViTForImageClassification`` for a class token), so the directory is what a conversion of
    the ``.npz`` gives, tensor for tensor."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.source.npz")
    google = cfg.class_token and cfg.pos_embed_prefix != "none"
    try:
        write_synthetic_npz(tmp, cfg, seed, layout="google" if google else "big_vision",
                            dtype="float32" if google else dtype)
        convert_checkpoint(tmp, out, ConvertOptions(to="hf", dtype=dtype, hash_source=False))
    finally:
        tmp.unlink(missing_ok=True)


def make_synthetic(name_or_cfg: "str | ViTConfig", path: os.PathLike | str, seed: int = 0,
                   image_size: Optional[int] = None, num_classes: Optional[int] = None,
                   layout: Optional[str] = None, dtype: Optional[str] = None) -> ViTConfig:
    """Write a synthetic checkpoint for a preset name or a config (``layout`` ``google``,
    ``big_vision`` or ``hf``: a Hugging Face directory, :func:`write_synthetic_hf`; ``dtype``
    ``float32`` or ``bfloat16``; a preset's default: :data:`STORED`, else Google's float32);
    returns the config."""
    cfg = preset(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    stored = STORED.get(preset_name(name_or_cfg), ("google", "float32")) if isinstance(name_or_cfg, str) \
        else ("google", "float32")
    layout, dtype = layout or stored[0], dtype or stored[1]
    changes = {k: v for k, v in (("image_size", image_size), ("num_classes", num_classes)) if v is not None}
    if layout == "big_vision":  # big_vision adds its table to the patches alone ('tok' pooling too)
        changes["pos_embed_prefix"] = "none"
    cfg = cfg.replace(**changes) if changes else cfg
    if layout == "hf":
        write_synthetic_hf(path, cfg, seed, dtype=dtype)
    else:
        write_synthetic_npz(path, cfg, seed, layout=layout, dtype=dtype)
    return cfg
