"""ViTConfig: every hyperparameter that changes the math of the canonical ViT.

Defaults are Google's (``vit_jax/models_vit.py``), not PyTorch's: a config built
from a Google checkpoint needs no flags to compute what Google's Flax code computes.
Fields that other layouts need (timm's exact GELU, Hugging Face's epsilon, lucidrains'
bias-free qkv and inner attention width) are explicit here so that no layout's
default can silently leak into another.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Tuple

#: Activation forms. Flax's ``nn.gelu`` defaults to ``approximate=True``, the tanh
#: form, which is what every Google ViT was trained with; PyTorch's ``nn.GELU()`` and
#: timm default to the exact erf form. The two differ by up to ~1e-3 per activation.
ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu", "relu")
CLASSIFIERS = ("token", "gap")
#: Where the last LayerNorm sits. Google normalises every token and then pools
#: ("encoder"); timm's avg-pool models pool first and normalise the pooled vector
#: ("pooled", timm's ``fc_norm``).
FINAL_NORMS = ("encoder", "pooled", "none")


def stem_stride(resnet_layers: Optional[Tuple[int, ...]]) -> int:
    """Down-sampling of the hybrid stem: root conv /2, max-pool /2, then /2 per stage after
    the first (``R50+ViT-B_16``: 16, so its 1x1 "patches" see a /16 grid); 1 for a pure ViT."""
    if resnet_layers is None:
        return 1
    return 4 * 2 ** max(len(resnet_layers) - 1, 0)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and semantics of one ViT. ``ViTConfig.from_json(c.to_json()) == c``."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    head_dim: int = 64
    mlp_dim: int = 3072
    classifier: str = "token"
    representation_size: Optional[int] = None
    num_classes: int = 1000
    qkv_bias: bool = True
    #: Flax ``nn.LayerNorm`` default epsilon (PyTorch: 1e-5, Hugging Face ViT: 1e-12).
    norm_eps: float = 1e-6
    act: str = "gelu_tanh"
    final_norm: str = "encoder"
    #: Hybrid ResNet stem (``R50+ViT-B_16``): units per stage, e.g. (3, 4, 9); None = pure ViT.
    resnet_layers: Optional[Tuple[int, ...]] = None
    #: Width of the stem root conv: ``int(64 * resnet.width_factor)`` in Google's code.
    resnet_width: int = 64
    #: Flax ``nn.GroupNorm`` defaults: 32 groups, epsilon 1e-6.
    resnet_groups: int = 32
    resnet_gn_eps: float = 1e-6
    #: Weight standardisation epsilon, added to the std (not inside the sqrt) as in
    #: ``vit_jax/models_resnet.py::weight_standardize``.
    resnet_ws_eps: float = 1e-5
    #: LayerNorms before and after the patch projection (vit-pytorch's ``to_patch_embedding``):
    #: LN over each flattened patch, the projection, LN over the width. Google has none.
    patch_norm: bool = False
    #: DeiT's distillation token: a second prefix token (after the class token) with its own
    #: head, ``head_dist``. In inference the logits are the mean of the two heads' outputs,
    #: which is what timm's ``VisionTransformerDistilled`` returns in eval mode.
    distilled: bool = False

    def __post_init__(self) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {self.final_norm!r}")
        if self.resnet_layers is not None and self.resnet_width % self.resnet_groups:
            raise ValueError(f"hybrid stem width {self.resnet_width} is not a multiple of GroupNorm's "
                             f"{self.resnet_groups} groups")
        if self.patch_norm and self.resnet_layers is not None:
            raise ValueError("patch_norm is not supported with a hybrid ResNet stem")
        if self.distilled and (self.classifier != "token" or self.representation_size
                               or self.final_norm == "pooled"):
            raise ValueError("a distillation token needs a class-token model without pre_logits "
                             "whose norm is applied before pooling (as in DeiT)")
        if self.resnet_layers is not None:
            object.__setattr__(self, "resnet_layers", tuple(int(n) for n in self.resnet_layers))
        for name in ("image_size", "patch_size", "in_chans", "width", "depth", "num_heads",
                     "head_dim", "mlp_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.total_stride:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the model's stride "
                f"{self.total_stride} (patch {self.patch_size}"
                + (f" x stem {self.stem_stride}" if self.resnet_layers is not None else "") + ")")

    # ---- derived quantities -------------------------------------------------
    @property
    def attn_dim(self) -> int:
        """Width of q, k and v: ``num_heads * head_dim`` (equals ``width`` for Google/timm)."""
        return self.num_heads * self.head_dim

    @property
    def stem_stride(self) -> int:
        return stem_stride(self.resnet_layers)

    @property
    def total_stride(self) -> int:
        return self.patch_size * self.stem_stride

    @property
    def grid_size(self) -> int:
        return self.image_size // self.total_stride

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, then DeiT's distillation token."""
        return (1 if self.classifier == "token" else 0) + (1 if self.distilled else 0)

    @property
    def num_tokens(self) -> int:
        return self.grid_size ** 2 + self.num_prefix_tokens

    @property
    def head_in_dim(self) -> int:
        return self.representation_size or self.width

    @property
    def embed_in_chans(self) -> int:
        """Channels the patch embedding sees: the image's, or the hybrid stem's output."""
        if self.resnet_layers is None:
            return self.in_chans
        stages = len(self.resnet_layers)
        return self.resnet_width * 4 * 2 ** max(stages - 1, 0) if stages else self.resnet_width

    def replace(self, **changes: Any) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    # ---- serialisation ------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["resnet_layers"] is not None:
            d["resnet_layers"] = list(d["resnet_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ViTConfig":
        return cls.from_dict(json.loads(s))

    def describe(self) -> str:
        """One line for summaries, e.g. ``ViT 12x768 heads 12 patch 16 @224 token, 1000 classes``."""
        kind = "ViT"
        if self.resnet_layers is not None:
            kind = f"R{'+'.join(str(n) for n in self.resnet_layers)}(w{self.resnet_width})+ViT"
        extras = [self.classifier]
        if self.representation_size:
            extras.append(f"pre_logits {self.representation_size}")
        if self.patch_norm:
            extras.append("patch norms")
        if self.distilled:
            extras.append("distillation token")
        return (f"{kind} depth {self.depth} width {self.width} heads {self.num_heads}x{self.head_dim} "
                f"mlp {self.mlp_dim} patch {self.patch_size} @{self.image_size}px "
                f"({', '.join(extras)}), {self.num_classes} classes")
