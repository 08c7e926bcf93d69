"""The canonical PyTorch model from any checkpoint vitconv reads: :func:`load`.

Reading is :func:`vitconv.pipeline.open_checkpoint` (the one path every command uses); this
module only builds the ``torch`` module from what it streams.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from .config import ViTConfig
from .model import VisionTransformer
from .pipeline import PathLike, open_checkpoint


def build_model(config: ViTConfig, state: Dict[str, np.ndarray]) -> VisionTransformer:
    """Instantiate the canonical model and load ``state`` strictly (float32, eval mode)."""
    with torch.device("meta"):
        model = VisionTransformer(config)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in state.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


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
    with open_checkpoint(path, image_size=image_size, num_heads=num_heads, overrides=overrides,
                         patch_size=patch_size, num_classes=num_classes) as ckpt:
        return build_model(ckpt.config, ckpt.state_dict())
