"""Read any supported checkpoint onto the canonical ViT, and write canonical checkpoints.

The one direction of data: read (``formats``) -> map (``rules``/``layouts``) ->
resample (``ops``) -> write. ``load`` is the public entry point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np

from .config import ViTConfig
from .errors import BadInputError
from .formats.base import TensorSource, open_source
from .layouts import LAYOUTS, ReadResult, read_layout, write_layout
from .ops import resize_pos_embed

PathLike = Union[str, os.PathLike]


@dataclass
class Canonical:
    """A checkpoint mapped onto the canonical model: config plus a lazy tensor stream."""

    config: ViTConfig
    read: ReadResult
    resized_from: Optional[int] = None  # source grid size when position embeddings were resized
    info: Dict[str, str] = field(default_factory=dict)

    def tensors(self, read_ahead: bool = False) -> Iterator[Tuple[str, np.ndarray]]:
        """Stream ``(name, array)``, each source tensor read once and resized if asked
        (``read_ahead``: see :meth:`vitconv.layouts.ReadResult.tensors`)."""
        src_cfg = self.read.config
        for name, t in self.read.tensors(read_ahead=read_ahead):
            if name == "pos_embed" and self.resized_from is not None:
                t = resize_pos_embed(t, self.config.grid_size, src_cfg.num_prefix_tokens)
            yield name, t
            del t

    def state_dict(self) -> Dict[str, np.ndarray]:
        return dict(self.tensors())


def read_canonical(path: PathLike, image_size: Optional[int] = None,
                   source: Optional[TensorSource] = None,
                   require_layout: Optional[str] = None, num_heads: Optional[int] = None) -> Canonical:
    """Open ``path``, recognise its layout (which must be ``require_layout`` when given),
    infer and audit; optionally retarget the resolution (``image_size``), resizing position
    embeddings as Google's ``load_pretrained`` does. Nothing is read beyond headers until
    ``tensors()``. A source opened here is closed again when any of this fails.

    ``num_heads`` is for PyTorch layouts whose shapes do not record the head count (64-dim
    heads are assumed otherwise). Google and canonical files refuse it (their shapes or
    config record the heads); a file's own config (Hugging Face) must agree with it."""
    from .rules.pytorch_infer import given_heads

    opened = source is None
    source = source or open_source(path)
    try:
        with given_heads(num_heads):
            read = read_layout(source)
        if require_layout and read.layout.name != require_layout:
            raise BadInputError(f"expected a {require_layout} checkpoint, found the "
                                f"{read.layout.name} layout", path)
        cfg = read.config
        if num_heads is not None and read.layout.name in ("google", "canonical"):
            raise BadInputError(f"--num-heads: the {read.layout.name} layout records the heads", path)
        if num_heads is not None and cfg.num_heads != num_heads:
            raise BadInputError(f"num_heads={num_heads}, but the {read.layout.name} checkpoint "
                                f"records {cfg.num_heads} heads", path)
        resized_from = None
        if image_size is not None and image_size != cfg.image_size:
            if image_size <= 0 or image_size % cfg.total_stride:
                raise BadInputError(f"--image-size {image_size} is not a positive multiple of the "
                                    f"model's stride {cfg.total_stride}", path)
            resized_from = cfg.grid_size
            cfg = cfg.replace(image_size=image_size)
    except BaseException:
        if opened:
            source.close()
        raise
    info = {"layout": read.layout.name, "source": os.fspath(path)}
    if read.ignored:
        info["ignored"] = f"{len(read.ignored)} keys outside '{read.prefix}' (optimizer state)"
    return Canonical(cfg, read, resized_from, info)


def build_model(config: ViTConfig, state: Dict[str, np.ndarray]):
    """Instantiate the canonical model and load ``state`` strictly (float32, eval mode)."""
    import torch

    from .model import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(config)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in state.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def load(path: PathLike, image_size: Optional[int] = None, num_heads: Optional[int] = None):
    """Load any checkpoint vitconv reads as the eval-mode canonical ViT. ``num_heads``
    overrides the 64-dim-head assumption of layouts that do not record the head count.

    >>> model = vitconv.load("golden/jax/tiny_token_p8_32.npz")   # doctest: +SKIP
    >>> logits = model(images_nchw)                                # doctest: +SKIP
    """
    c = read_canonical(path, image_size=image_size, num_heads=num_heads)
    try:
        return build_model(c.config, c.state_dict())
    finally:
        c.read.source.close()


def output_kind(path: PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return "pt"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".npz":
        return "npz"
    raise BadInputError(f"cannot tell the output format from the extension {suffix!r} "
                        "(use .pt, .safetensors or .npz)", path)


def save_canonical(state: Dict[str, np.ndarray], config: ViTConfig, path: PathLike,
                   extra: Optional[Dict[str, str]] = None) -> str:
    """Write a canonical checkpoint; the format follows the extension. Returns the kind."""
    kind = output_kind(path)
    meta = dict(extra or {})
    if kind == "pt":
        from .formats.torch_pt import save_vitconv_pt

        save_vitconv_pt(state, config.to_dict(), path, meta)
    elif kind == "safetensors":
        from .formats.safetensors_io import save_safetensors

        save_safetensors(state, path, config=config.to_dict(), extra=meta)
    else:
        from .formats.npz import write_npz

        write_npz(write_layout(state, config, LAYOUTS["google"]), path)
    return kind


def to_google_npz(state: Dict[str, np.ndarray], config: ViTConfig) -> Dict[str, np.ndarray]:
    """Canonical state -> Google's ``.npz`` arrays (sorted keys, as Google's saver writes)."""
    arrays = write_layout(state, config, LAYOUTS["google"])
    return {k: arrays[k] for k in sorted(arrays)}


def param_count(state: Dict[str, np.ndarray]) -> int:
    return int(sum(int(np.prod(a.shape)) for a in state.values()))
