"""The canonical PyTorch model from any checkpoint vitconv reads: :func:`load`.

Reading is :func:`vitconv.conversion.pipeline.open_checkpoint` (the one path every command uses); this
module only builds the ``torch`` module from what it streams.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from vitconv.config import ViTConfig, parameter_shapes
from vitconv.model import Block, VisionTransformer
from vitconv.conversion.pipeline import Checkpoint, PathLike, open_checkpoint
from vitconv.conversion.options import ReadOptions


def _torch(named: Iterable[Tuple[str, np.ndarray]], strip: str = "") -> Dict[str, torch.Tensor]:
    """Canonical arrays as float32 tensors, names without ``strip``."""
    return {k[len(strip):]: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in named}


def build_model(config: ViTConfig, state: Dict[str, np.ndarray]) -> VisionTransformer:
    """Instantiate the canonical model and load ``state`` strictly (float32, eval mode)."""
    with torch.device("meta"):
        model = VisionTransformer(config)
    model.load_state_dict(_torch(state.items()), strict=True, assign=True)
    return model.eval()


def forward_stages_streamed(ckpt: Checkpoint, images: torch.Tensor,
                            config: Optional[ViTConfig] = None) -> Dict[str, torch.Tensor]:
    """``VisionTransformer.forward_stages`` of ``ckpt``'s model (or of the architecture
    ``config``, from ``ckpt``'s tensors), holding one block's weights at a time: the model is
    built on the ``meta`` device, everything outside the blocks (embedding, final norm, heads)
    is read first, and each block's tensors are read as the pass reaches it and freed when it
    is done. The same modules run the same operations on the same values as the whole model
    does, so the stages are equal to the bit (``tests/test_streamed.py``); the peak is one
    block's weights, which is what lets a model larger than memory be verified."""
    cfg = config or ckpt.config
    names = list(parameter_shapes(cfg))
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    inside = [[n for n in names if n.startswith(f"blocks.{i}.")] for i in range(cfg.depth)]
    missing, unexpected = model.load_state_dict(
        _torch(ckpt.tensors(order=[n for n in names if not n.startswith("blocks.")])), strict=False, assign=True)
    assert not unexpected and all(n.startswith("blocks.") for n in missing), (missing, unexpected)
    model.eval()

    @contextlib.contextmanager
    def block_weights(i: int, block: Block) -> Iterator[None]:
        block.load_state_dict(_torch(ckpt.tensors(order=inside[i]), f"blocks.{i}."), strict=True, assign=True)
        try:
            yield
        finally:
            block.to_empty(device="meta")  # the block's weights go; the next block's come

    with torch.no_grad():
        return model.forward_stages(images, each_block=block_weights)


class StreamedModel:
    """The canonical model of a checkpoint that stays in its files: ``forward_stages`` as
    :class:`~vitconv.model.VisionTransformer`'s, run by :func:`forward_stages_streamed` (each
    pass reads the file again, one block's weights in memory at a time). ``open`` opens the
    checkpoint; ``config`` runs another architecture's reading of the same tensors (the
    float32 twin of a rounded file). What verify runs for every model it reads from a file."""

    def __init__(self, open: Callable[[], Checkpoint], config: Optional[ViTConfig] = None):
        self._open = open
        if config is None:
            with open() as ckpt:  # headers only
                config = ckpt.config
        self.config = config

    def forward_stages(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        with self._open() as ckpt:
            return forward_stages_streamed(ckpt, images, self.config)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        stages = self.forward_stages(images)
        return stages["logits"] if "logits" in stages else stages["head_input"]

    def tensors(self) -> Iterator[Tuple[str, np.ndarray]]:
        """Every canonical tensor as stored, one at a time."""
        with self._open() as ckpt:
            yield from ckpt.tensors()


def load(path: PathLike, image_size: Optional[int] = None, num_heads: Optional[int] = None,
         patch_size: Optional[int] = None, num_classes: Optional[int] = None,
         **overrides: object) -> VisionTransformer:
    """Load any checkpoint vitconv reads as the eval-mode canonical ViT. ``image_size``
    resizes the position table as the source's family does; ``patch_size`` resamples the
    patch kernel and table as FlexiViT does; ``num_heads`` overrides the
    64-dim-head assumption of layouts that do not record the head count; ``overrides`` set
    other fields such a file leaves to its code (``act="quick_gelu"``, ``norm_eps=1e-5``), and
    ``arch="vit_base_patch16_clip_224"`` names the architecture it is (:mod:`vitconv.archs`).
    ``num_classes`` replaces the classifier with a zero-initialised one for fine-tuning (and
    drops Google's ``pre_logits``, as vit_jax does); 0 leaves none, and the model returns its
    pooled features.

    >>> model = vitconv.load("golden/jax/tiny_token_p8_32.npz")   # doctest: +SKIP
    >>> logits = model(images_nchw)                                # doctest: +SKIP
    """
    options = ReadOptions(image_size=image_size, num_heads=num_heads, overrides=overrides, patch_size=patch_size,
                          num_classes=num_classes)
    with open_checkpoint(path, options) as ckpt:
        return build_model(ckpt.config, ckpt.state_dict())
