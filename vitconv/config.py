"""ViTConfig: every hyperparameter that changes the math of the canonical ViT.

Defaults are Google's (``vit_jax/models_vit.py``), not PyTorch's: a config built
from a Google checkpoint needs no flags to compute what Google's Flax code computes.
Fields that other layouts need (timm's exact GELU, Hugging Face's epsilon, lucidrains'
bias-free qkv and inner attention width) are explicit here so that no layout's
default can silently leak into another.

A layout carries a field either through its tensors' shapes (:data:`SHAPE_FIELDS`, which
every layout's tensors hold) or through a row of its table
(:class:`vitconv.layouts.table.Carry`); a field a layout has no row for can only hold the
default here, so a new field needs no change to the layouts that cannot express it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from typing import Any, Dict, List, Optional, Tuple

#: Activation forms. Flax's ``nn.gelu`` defaults to ``approximate=True``, the tanh
#: form, which is what every Google ViT was trained with; PyTorch's ``nn.GELU()`` and
#: timm default to the exact erf form. The two differ by up to ~1e-3 per activation.
ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu", "relu", "silu")
#: Pooling. "token": the class token. "gap": the mean of the patch tokens (prefix tokens left
#: out, as timm's and OpenCLIP's 'avg'; Google's gap models have none). "map": an attention-
#: pooling head (SigLIP's MAPHead, timm's ``attn_pool``): a learned probe attends over every
#: token, then ``x + mlp(norm(x))``.
CLASSIFIERS = ("token", "gap", "map")
#: Which prefix tokens have rows in the position table. "all": every one (Google, DeiT,
#: timm's default); "class": only the class token, registers are inserted after the table is
#: added (DINOv2); "none": the table covers the patches, prefix tokens are concatenated after
#: it is added (timm ``no_embed_class``, DeiT-3, big_vision).
POS_EMBED_PREFIXES = ("all", "class", "none")
#: How a source family resizes its position table for another resolution; the converted model
#: follows its source's. "zoom": Google's ``scipy.ndimage.zoom(order=1)`` (bilinear, corners
#: aligned). "bicubic": ``F.interpolate(size=, mode='bicubic', align_corners=False)``
#: (Hugging Face ViT, DINOv2, CLIP, SigLIP). "bicubic_aa": the same with ``antialias=True``
#: (timm, OpenCLIP, DINOv2 with registers). "dinov2": the original DINOv2's
#: ``scale_factor=((g + 0.1) / M)``, bicubic, no antialias. "sincos2d": the table is no
#: parameter but big_vision's fixed 2-D sin-cos function of the grid (``posemb='sincos2d'``),
#: generated afresh for any grid. "bilinear": half-pixel bilinear, antialiased when shrinking
#: (``jax.image.resize(..., "linear")``, as FlexiViT resizes its table for another patch size),
#: which is also SigLIP 2's NaFlex resize of its square table to every image's own patch grid
#: (transformers' ``Siglip2VisionEmbeddings``: the same weights as ``F.interpolate(mode=
#: 'bilinear', align_corners=False, antialias=True)``, in float32, rows row-major) and timm
#: NaFlexVit's with ``pos_embed_interp_mode='bilinear'``; at the table's own grid it is the
#: identity. Grids need not be square. "sincos2d_aimv2": no parameter either, but Hugging Face
#: AIMv2's native table (``is_native``): [sin x, cos x, sin y, cos y] with
#: ``w = 10000 ** -(k / (width/4))`` (not big_vision's ``width/4 - 1``), computed in float64 and
#: rounded once. Prefix rows are always kept.
POS_RESIZES = ("zoom", "bicubic", "bicubic_aa", "dinov2", "sincos2d", "bilinear", "sincos2d_aimv2")
#: How a relative position bias table (BEiT) is resized when the patch grid differs from the one
#: it was trained at; the converted model follows its source's. "geometric": timm's
#: ``resize_rel_pos_bias_table`` (from BEiT's own fine-tuning code): each axis of the
#: ``(2g-1)`` distance table is placed at geometric-progression offsets (ratio found by bisection
#: so the outermost source offset reaches the new half-width) and read at integer offsets by
#: linear interpolation, edges clamped. "bilinear": Hugging Face's ``BeitRelativePositionBias``:
#: ``F.interpolate(mode='bilinear', align_corners=False)`` over the distance table, no
#: antialiasing. Both keep the three class-token rows.
REL_POS_RESIZES = ("geometric", "bilinear")
MLPS = ("mlp", "swiglu")
#: Rotary position embeddings (RoPE), rotating each head's queries and keys of the patch tokens
#: by angles computed from the patch grid at run time (prefix tokens are left unrotated); no
#: tensor holds them. "none": no rotation. "dinov3": DINOv3's form (timm ``Eva`` with
#: ``rope_type='dinov3'``, Hugging Face ``DINOv3ViTModel``): patch centres ``(i + 0.5) / n``
#: per axis, each axis normalised by its own length and mapped to [-1, 1]; ``head_dim / 4``
#: periods ``rope_theta ** (4k / head_dim)``; angles ``2 pi coord / period``, rows' angles first
#: then columns', the whole repeated twice ("rotate-half" layout: ``x cos + rotate_half(x) sin``).
#: "cat": EVA's axial form (timm ``RotaryEmbeddingCat`` with ``in_pixels=False``: EVA-02, timm's
#: ``*_rope_*`` ViTs, Perception Encoder's grid): integer patch indices per axis plus
#: ``rope_grid_offset``, rescaled by ``rope_ref_grid`` where set (``i / n * ref``: the pretraining
#: grid's span at any grid); ``head_dim / 4`` frequencies ``rope_theta ** -(k / (head_dim / 4))``;
#: angles ``coord * frequency``, the first coordinate's then the second's (``rope_indexing``: "ij"
#: rows first, "xy" columns first), laid out interleaved (``[a0, a0, a1, a1, ...]`` with timm's
#: ``rot``: ``[-x1, x0, -x3, x2, ...]``) or rotate-half (``rope_half``).
#: "mixed": RoPE-Mixed (timm ``RotaryEmbeddingMixed``, ``vit_*_rope_mixed_*``): learned 2-D
#: frequencies per block and head (``rope_freqs``, ``(2, depth, heads, head_dim / 2)``: x's then y's),
#: angles ``t_x * fx + t_y * fy`` over integer patch indices (``rope_indexing`` says which is x),
#: interleaved; ``rope_theta`` only initialised the frequencies and is not kept.
ROPES = ("none", "dinov3", "cat", "mixed")
#: Which coordinate's angles come first in a rotary embedding: "ij" the row's, "xy" the column's
#: (timm ``rope_grid_indexing``; the grid itself is row-major either way).
ROPE_INDEXINGS = ("ij", "xy")
#: The precision the rotary periods are held in, the arithmetic float32 either way. "float32":
#: computed in float32 (timm, transformers). "bfloat16": each period rounded to bfloat16 first, as
#: the original DINOv3 checkpoints hold them (``rope_embed.periods``, a persistent buffer made with
#: ``pos_embed_rope_dtype='bf16'`` in training and loaded as stored): the rounding moves the angles
#: by up to 2^-9 relative, which moves a real model's output by ~1e-3.
ROPE_PERIODS = ("float32", "bfloat16")
#: The normalisation layer. "layernorm": ``nn.LayerNorm`` (weight and bias). "rmsnorm":
#: ``x * rsqrt(mean(x^2) + eps) * weight``, weight only (timm ``RmsNorm``, Hugging Face
#: ``Aimv2RMSNorm``: AIMv2), the statistics taken in float32.
NORMS = ("layernorm", "rmsnorm")
#: The attention-pooling head's form (``classifier='map'``). "siglip": big_vision's ``MAPHead``
#: (timm ``AttentionPoolLatent``, HF SigLIP): the probe goes through a query projection, the
#: output projection follows, then ``x + mlp(norm(x))``. "aimv2": Hugging Face's
#: ``Aimv2AttentionPoolingHead``: the probe itself is the query (no projection), keys and values
#: are projected with the blocks' ``qkv_bias``, then an output projection with a bias, and nothing
#: after it.
POOL_HEADS = ("siglip", "aimv2")
#: Where the last LayerNorm sits. Google normalises every token and then pools
#: ("encoder"); timm's avg-pool models pool first and normalise the pooled vector
#: ("pooled", timm's ``fc_norm``). For a class-token model the two are the same function
#: (a LayerNorm acts on each token alone), and the config says "encoder" for both.
FINAL_NORMS = ("encoder", "pooled", "none")
#: Largest image side vitconv builds or feeds a model at (``--image-size``, an artifact's input
#: dims, its metadata): a ViT at 8192 px has 262,144 patches of 16 px; a size past it is a typo,
#: forged or broken, and would only exhaust memory.
MAX_IMAGE_SIZE = 8192
#: The values each text field may take (checked on construction, and by rule conditions).
CHOICES: Dict[str, Tuple[str, ...]] = {
    "classifier": CLASSIFIERS, "act": ACTIVATIONS, "final_norm": FINAL_NORMS, "pos_embed_prefix": POS_EMBED_PREFIXES,
    "pos_resize": POS_RESIZES, "mlp": MLPS, "rope": ROPES, "rope_indexing": ROPE_INDEXINGS, "norm": NORMS,
    "pool_head": POOL_HEADS, "rel_pos_resize": REL_POS_RESIZES, "rope_periods": ROPE_PERIODS}
#: Fields every layout carries in its tensors' shapes (sizes and counts).
SHAPE_FIELDS = ("image_size", "patch_size", "in_chans", "width", "depth", "mlp_dim", "num_classes")


def _field(default: Any, what: str, training_only: Tuple[str, ...] = (), storage: bool = False) -> Any:
    """A config field with its meaning in a few words (said when a layout cannot hold it).
    ``training_only``: the canonical tensors of a field that inference never reads; a layout
    without a place for them leaves them out (with a note) rather than refusing the model.
    ``storage``: how a layout lays the tensors out, not what the model computes; a layout
    without a place for it writes its own way."""
    return dataclasses.field(default=default, metadata={"what": what, "training_only": training_only,
                                                        "storage": storage})


def describe_field(name: str) -> str:
    """What a config field means, in a few words (empty for the shape fields)."""
    return ViTConfig.__dataclass_fields__[name].metadata.get("what", "")


def training_only(name: str) -> Tuple[str, ...]:
    """The canonical tensors of field ``name`` that inference never reads (see :func:`_field`)."""
    return ViTConfig.__dataclass_fields__[name].metadata.get("training_only", ())


def storage_only(name: str) -> bool:
    """Whether field ``name`` says how tensors are stored, not what the model computes."""
    return bool(ViTConfig.__dataclass_fields__[name].metadata.get("storage", False))


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
    num_heads: int = _field(12, "attention heads")
    head_dim: int = _field(64, "attention head size")
    mlp_dim: int = 3072
    classifier: str = _field("token", "pooling: the class token, the mean of the patch tokens, or an "
                                      "attention-pooling head")
    representation_size: Optional[int] = _field(None, "pre_logits layer (Dense + tanh before the head)")
    num_classes: int = 1000
    qkv_bias: bool = _field(True, "q/k/v biases")
    #: Flax ``nn.LayerNorm`` default epsilon (PyTorch: 1e-5, Hugging Face ViT: 1e-12).
    norm_eps: float = _field(1e-6, "LayerNorm epsilon")
    act: str = _field("gelu_tanh", "MLP activation")
    final_norm: str = _field("encoder", "where the final LayerNorm sits")
    #: Hybrid ResNet stem (``R50+ViT-B_16``): units per stage, e.g. (3, 4, 9); None = pure ViT.
    resnet_layers: Optional[Tuple[int, ...]] = _field(None, "hybrid ResNet stem")
    #: Width of the stem root conv: ``int(64 * resnet.width_factor)`` in Google's code.
    resnet_width: int = _field(64, "hybrid stem width")
    #: Flax ``nn.GroupNorm`` defaults: 32 groups, epsilon 1e-6.
    resnet_groups: int = _field(32, "hybrid stem GroupNorm groups")
    resnet_gn_eps: float = _field(1e-6, "hybrid stem GroupNorm epsilon")
    #: Weight standardisation epsilon, added to the std (not inside the sqrt) as in
    #: ``vit_jax/models_resnet.py::weight_standardize``.
    resnet_ws_eps: float = _field(1e-5, "hybrid stem weight-standardisation epsilon")
    #: LayerNorms before and after the patch projection (vit-pytorch's ``to_patch_embedding``):
    #: LN over each flattened patch, the projection, LN over the width. Google has none.
    patch_norm: bool = _field(False, "LayerNorms around the patch projection")
    #: DeiT's distillation token: a second prefix token (after the class token) with its own
    #: head, ``head_dist``. In inference the logits are the mean of the two heads' outputs,
    #: which is what timm's ``VisionTransformerDistilled`` returns in eval mode.
    distilled: bool = _field(False, "DeiT distillation token and head_dist")
    #: LayerScale (CaiT, DeiT-3, DINOv2): each residual branch is multiplied by a learned
    #: per-channel vector before it is added, ``x + ls1 * attn(norm1(x))`` and likewise ls2.
    layer_scale: bool = _field(False, "LayerScale: a learned per-channel scale on each residual branch")
    class_token: bool = _field(True, "class token")
    #: Register tokens (DINOv2 and timm ``reg_tokens``): learned prefix tokens after the class token.
    num_reg_tokens: int = _field(0, "register tokens")
    pos_embed_prefix: str = _field("all", "which prefix tokens have rows in the position table")
    #: A LayerNorm after the embedding, before block 0 (CLIP's ``ln_pre``, timm ``pre_norm``).
    norm_pre: bool = _field(False, "LayerNorm before the first block (CLIP ln_pre)")
    patch_bias: bool = _field(True, "patch projection bias")
    #: CLIP's projection ``x @ proj`` is a bias-free head.
    head_bias: bool = _field(True, "head bias")
    #: "swiglu": ``fc1`` holds [gate; up] (2 x mlp_dim rows) and the MLP is ``fc2(act(gate) * up)``
    #: (DINOv2 ViT-g, timm ``SwiGLUPacked``), with ``act`` the gate's activation (SiLU).
    mlp: str = _field("mlp", "MLP form (SwiGLU: act(gate) * up)")
    #: DINOv2's ``mask_token``: used only by masked training, kept so conversions round-trip.
    mask_token: bool = _field(False, "mask token (training only)", training_only=("mask_token",))
    pos_resize: str = _field("zoom", "how the position table is resized for another resolution")
    norm: str = _field("layernorm", "normalisation layer (LayerNorm or RMSNorm)")
    #: The attention output projection's bias (timm ``proj_bias``; AIMv2 has none).
    proj_bias: bool = _field(True, "attention output projection bias")
    #: The MLP's biases, fc1 and fc2 alike (timm ``proj_bias`` sets both; HF AIMv2 ``mlp_bias``).
    mlp_bias: bool = _field(True, "MLP biases")
    #: A norm on the projected patches before the position table is added (timm
    #: ``embed_norm_layer``, AIMv2's patchifier norm); not vit-pytorch's pair (``patch_norm``).
    patch_embed_norm: bool = _field(False, "a norm on the patch embeddings before the position table")
    #: qk-norm: the model's norm over each head's queries and keys (``head_dim`` channels) before
    #: attention (timm ``qk_norm=True``: ``attn.q_norm``, ``attn.k_norm``).
    qk_norm: bool = _field(False, "a norm over each head's queries and keys (qk-norm)")
    pool_head: str = _field("siglip", "form of the attention-pooling head")
    #: SwiGLU's gate and up kept as two linears (timm ``SwiGLU``'s ``fc1_g``/``fc1_x``, HF AIMv2's
    #: ``gate_proj``/``up_proj``) rather than one packed ``fc1``: the same function, stored apart.
    swiglu_unpacked: bool = _field(False, "SwiGLU's gate and up stored as two linears", storage=True)
    #: BEiT's learned relative position bias, added to every attention logit: a table of
    #: ``(2g-1)^2 + 3`` rows (one per 2-D offset between patches, then class->token, token->class,
    #: class->class) by heads, read through an index built for the grid. ``rel_pos_bias``: one
    #: table per block (timm ``use_rel_pos_bias``, HF ``use_relative_position_bias``);
    #: ``rel_pos_bias_shared``: one table for all blocks (timm ``use_shared_rel_pos_bias``, HF
    #: ``use_shared_relative_position_bias``); with both, the two are added.
    rel_pos_bias: bool = _field(False, "relative position bias table in each block (BEiT)")
    rel_pos_bias_shared: bool = _field(False, "one relative position bias table shared by all blocks (BEiT)")
    rel_pos_resize: str = _field("geometric", "how the relative position bias table is resized for another grid")
    #: big_vision's ``scan=True``: every block's tensors stacked along a leading axis in one array.
    scan: bool = _field(False, "blocks stored stacked along a leading axis (big_vision scan=True)", storage=True)
    #: A learned absolute position table (``pos_embed``) added to the tokens. DINOv3 has none (its
    #: positions are rotary only); timm's ``*_rope_ape`` models have both.
    abs_pos_embed: bool = _field(True, "a learned absolute position table")
    #: A bias on the key projection. timm's ``Eva`` and Hugging Face DINOv3 (``key_bias=False``) have
    #: query and value biases only: with ``qkv_bias`` and no key bias the middle third of
    #: ``qkv.bias`` is held at zero by the model. Without RoPE a key bias cannot change the output
    #: (it adds the same ``q . b`` to every score of a query); with RoPE it can (the bias is rotated
    #: with each key's position), so the two are not interchangeable.
    key_bias: bool = _field(True, "a key projection bias (besides the query and value biases)")
    rope: str = _field("none", "rotary position embeddings")
    #: The base of the rotary periods (DINOv3's ``rope_temperature`` / ``rope_theta``: 100).
    rope_theta: float = _field(100.0, "the rotary embeddings' base period (temperature)")
    #: See :data:`ROPE_PERIODS`: the original DINOv3 checkpoints' bfloat16-rounded periods.
    rope_periods: str = _field("float32", "the precision the rotary periods are rounded to")
    #: ``rope='cat'``: the grid the rotary coordinates are rescaled to (timm ``ref_feat_shape``,
    #: rows then columns: a patch index ``i`` of an ``n``-long axis becomes ``i / n * ref``), so
    #: any grid spans the pretraining grid's coordinates; None: raw patch indices.
    rope_ref_grid: Optional[Tuple[int, int]] = _field(None, "the grid rotary coordinates are rescaled to")
    #: ``rope='cat'``: added to every patch index before the rescale (timm ``rope_grid_offset``;
    #: Perception Encoder: 1).
    rope_grid_offset: float = _field(0.0, "an offset added to the rotary patch coordinates")
    rope_indexing: str = _field("ij", "which coordinate's rotary angles come first (rows: ij, columns: xy)")
    #: The rotary layout: the two halves rotated together (``rotate_half``: DINOv3's, timm's
    #: ``rope_rotate_half=True``) or interleaved pairs ``(x0, x1), (x2, x3)...`` (False: timm's default
    #: for ``cat``, EVA-02, the ``*_rope_*`` ViTs, Perception Encoder).
    rope_half: bool = _field(True, "rotary pairs in two halves (rotate-half) rather than interleaved")
    #: EVA-02's sub-LayerNorms (NormFormer-style): the model's norm over the attention output (its
    #: ``num_heads * head_dim`` channels) before the output projection (timm Eva ``scale_attn_inner``,
    #: ``attn.norm``), and over the MLP's hidden (after the activation or gating) before ``fc2``
    #: (``scale_mlp``, ``mlp.norm``).
    attn_norm: bool = _field(False, "a norm over the attention output before its projection (EVA-02)")
    mlp_norm: bool = _field(False, "a norm over the MLP hidden before fc2 (EVA-02)")
    #: q, k and v kept as three linears (timm Eva ``qkv_fused=False``: ``q_proj``/``k_proj``/``v_proj``)
    #: rather than one fused ``qkv``: the same function, stored apart.
    qkv_unfused: bool = _field(False, "q, k and v stored as three linears", storage=True)
    #: The attention-pooling head's own head count (timm ``attn_pool_num_heads``: Perception Encoder's
    #: core tower pools with 8 heads whatever the blocks have); 0: the blocks' ``num_heads``.
    pool_heads: int = _field(0, "the attention-pooling head's own head count")
    #: Whether the attention-pooling head attends to the prefix tokens (class, registers) as well as
    #: the patches: Perception Encoder's does (timm Eva); timm's ``VisionTransformer`` and ``NaFlexVit``
    #: leave them out unless ``pool_include_prefix=True`` (``vit_so150m_patch16_reg4_map_256``,
    #: ``naflexvit_base_patch16_map``).
    map_prefix: bool = _field(True, "the attention-pooling head attends to the prefix tokens too")

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.classifier == "token" and not self.class_token:
            raise ValueError("classifier 'token' needs a class token")
        if self.final_norm == "pooled" and self.classifier == "token":
            object.__setattr__(self, "final_norm", "encoder")  # the same function; one spelling
        if self.final_norm == "pooled" and self.classifier == "map":
            raise ValueError("an attention-pooling head reads normalised tokens: final_norm 'pooled' "
                             "has no meaning there")
        if not self.num_classes and not self.head_bias:
            object.__setattr__(self, "head_bias", True)  # no head, no bias to leave out; one spelling
        if self.swiglu_unpacked and self.mlp != "swiglu":
            object.__setattr__(self, "swiglu_unpacked", False)  # nothing to unpack; one spelling
        if self.pool_head != "siglip" and self.classifier != "map":
            object.__setattr__(self, "pool_head", "siglip")  # no pooling head; one spelling
        if self.classifier != "map" or self.pool_heads == self.num_heads:
            object.__setattr__(self, "pool_heads", 0)  # no pooling head, or the blocks' count; one spelling
        elif self.pool_heads < 0 or (self.pool_heads and self.width % self.pool_heads):
            raise ValueError(f"pool_heads {self.pool_heads} does not divide the width {self.width}")
        if self.classifier != "map" or not self.num_prefix_tokens:
            object.__setattr__(self, "map_prefix", True)  # no pooling head, or nothing to leave out; one spelling
        if self.patch_norm and self.patch_embed_norm:
            raise ValueError("patch_norm already normalises the patch embeddings (patch_norm_post): "
                             "patch_embed_norm is for a model without vit-pytorch's pair")
        if not (self.rel_pos_bias or self.rel_pos_bias_shared):  # no table to resize; one spelling
            object.__setattr__(self, "rel_pos_resize", "geometric")
        elif self.num_prefix_tokens != int(self.class_token) or not self.class_token:
            raise ValueError("a relative position bias needs exactly one prefix token, the class token "
                             "(its table has rows for class->token, token->class and class->class only)")
        if self.num_reg_tokens < 0:
            raise ValueError(f"num_reg_tokens must be >= 0, got {self.num_reg_tokens}")
        if self.pos_embed_prefix == "class" and not self.class_token:
            raise ValueError("pos_embed_prefix 'class' needs a class token")
        if self.pos_embed_prefix != "all" and self.num_prefix_tokens == int(self.pos_embed_prefix == "class"):
            object.__setattr__(self, "pos_embed_prefix", "all")  # the same table either way; one spelling
        if not self.abs_pos_embed:  # no table to resize or to give prefix rows; one spelling
            object.__setattr__(self, "pos_embed_prefix", "all")
            object.__setattr__(self, "pos_resize", "zoom")
        if not self.qkv_bias and not self.key_bias:
            object.__setattr__(self, "key_bias", True)  # no biases at all; one spelling
        if self.rope_ref_grid is not None:
            object.__setattr__(self, "rope_ref_grid", tuple(int(n) for n in self.rope_ref_grid))
            if len(self.rope_ref_grid) != 2 or min(self.rope_ref_grid) <= 0:
                raise ValueError(f"rope_ref_grid must be two positive sizes, got {self.rope_ref_grid}")
        object.__setattr__(self, "rope_grid_offset", float(self.rope_grid_offset))
        if not math.isfinite(self.rope_grid_offset):
            raise ValueError(f"rope_grid_offset must be finite, got {self.rope_grid_offset}")
        if self.rope == "mixed":  # integer indices, interleaved, learned frequencies; one spelling
            for name, default in (("rope_ref_grid", None), ("rope_grid_offset", 0.0), ("rope_half", False),
                                  ("rope_theta", 100.0)):
                object.__setattr__(self, name, default)
        elif self.rope != "cat":  # only EVA's form has these; one spelling
            if self.rope == "dinov3" and (self.rope_ref_grid is not None or self.rope_grid_offset
                                          or self.rope_indexing != "ij" or not self.rope_half):
                raise ValueError("rope 'dinov3' has no reference grid, offset, 'xy' order or interleaved "
                                 "layout (those are rope 'cat''s)")
            for name, default in (("rope_ref_grid", None), ("rope_grid_offset", 0.0), ("rope_indexing", "ij"),
                                  ("rope_half", True)):
                object.__setattr__(self, name, default)
        if self.rope == "none":
            object.__setattr__(self, "rope_theta", 100.0)  # no rotation, no base; one spelling
            object.__setattr__(self, "rope_periods", "float32")
        elif self.rope != "dinov3" and self.rope_periods != "float32":
            raise ValueError("rope_periods 'bfloat16' is the original DINOv3 checkpoints' (rope 'dinov3'); "
                             f"rope {self.rope!r} computes its frequencies in float32")
        else:
            object.__setattr__(self, "rope_theta", float(self.rope_theta))
            if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
                raise ValueError(f"rope_theta must be a positive number, got {self.rope_theta}")
            if self.head_dim % 4:
                raise ValueError(f"rope {self.rope!r} needs a head size divisible by 4, got {self.head_dim}")
        if self.resnet_layers is not None and self.resnet_width % self.resnet_groups:
            raise ValueError(f"hybrid stem width {self.resnet_width} is not a multiple of GroupNorm's "
                             f"{self.resnet_groups} groups")
        if self.patch_norm and self.resnet_layers is not None:
            raise ValueError("patch_norm is not supported with a hybrid ResNet stem")
        if self.distilled and (self.classifier != "token" or self.representation_size or self.num_reg_tokens):
            raise ValueError("a distillation token needs a class-token model without pre_logits or "
                             "registers (as in DeiT)")
        if self.resnet_layers is not None:
            object.__setattr__(self, "resnet_layers", tuple(int(n) for n in self.resnet_layers))
        for name in ("image_size", "patch_size", "in_chans", "width", "depth", "num_heads",
                     "head_dim", "mlp_dim", "resnet_width", "resnet_groups"):
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
        """Tokens before the patches: the class token, DeiT's distillation token, registers."""
        return int(self.class_token) + int(self.distilled) + self.num_reg_tokens

    @property
    def num_pos_prefix(self) -> int:
        """Prefix rows of the position table (see :data:`POS_EMBED_PREFIXES`)."""
        return {"all": self.num_prefix_tokens, "class": 1, "none": 0}[self.pos_embed_prefix]

    @property
    def num_tokens(self) -> int:
        """Tokens entering block 0."""
        return self.grid_size ** 2 + self.num_prefix_tokens

    @property
    def num_pos_rows(self) -> int:
        """Rows of the position table."""
        return self.grid_size ** 2 + self.num_pos_prefix

    @property
    def rel_pos_rows(self) -> int:
        """Rows of a relative position bias table: every 2-D offset, then the 3 class-token rows."""
        return (2 * self.grid_size - 1) ** 2 + 3

    @property
    def mlp_in_dim(self) -> int:
        """Rows of ``fc1``: ``mlp_dim``, or gate and up halves for SwiGLU."""
        return 2 * self.mlp_dim if self.mlp == "swiglu" else self.mlp_dim

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

    def changed_fields(self) -> Tuple[str, ...]:
        """Fields whose value differs from the default (Google's semantics)."""
        return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)

    # ---- serialisation ------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("resnet_layers", "rope_ref_grid"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ViTConfig":
        """Build from a JSON object, checking every value's type first: files are untrusted,
        and a wrong type should be named here, not fail deep inside model construction.
        Raises ``ValueError`` naming the fields."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        if "class_token" not in d and "classifier" in d:  # written before the field existed,
            d = {**d, "class_token": d["classifier"] == "token"}  # when 'gap' meant no class token
        hints = typing.get_type_hints(cls)
        unknown = set(d) - set(hints)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(map(str, unknown))}")
        bad = [k for k, v in d.items() if not _json_fits(v, hints[k])]
        if bad:
            raise ValueError(f"field(s) of the wrong type: {', '.join(sorted(bad))}")
        try:
            return cls(**d)
        except (TypeError, OverflowError) as e:
            raise ValueError(str(e)) from None

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
        extras = [self.classifier + ("" if self.class_token or self.classifier == "token" else ", no class token")]
        if self.class_token and self.classifier != "token":
            extras[0] += " (class token not pooled)"
        if self.num_reg_tokens:
            extras.append(f"{self.num_reg_tokens} registers")
        if self.layer_scale:
            extras.append("LayerScale")
        if self.mlp != "mlp":
            extras.append(self.mlp)
        if self.norm != "layernorm":
            extras.append(self.norm)
        if self.qk_norm:
            extras.append("qk-norm")
        if self.patch_embed_norm:
            extras.append("patch embedding norm")
        if self.classifier == "map" and self.pool_head != "siglip":
            extras.append(f"{self.pool_head} pooling head")
        if self.pool_heads:
            extras.append(f"{self.pool_heads}-head pooling")
        if not self.map_prefix:
            extras.append("prefix tokens not pooled")
        if not (self.proj_bias and self.mlp_bias):
            extras.append("bias-free " + " and ".join(n for n, b in (("attention projection", self.proj_bias),
                                                                       ("MLP", self.mlp_bias)) if not b))
        if self.rel_pos_bias or self.rel_pos_bias_shared:
            extras.append("relative position bias" + (" (shared)" if not self.rel_pos_bias else "")
                          + (" + shared" if self.rel_pos_bias and self.rel_pos_bias_shared else ""))
        if self.representation_size:
            extras.append(f"pre_logits {self.representation_size}")
        if self.patch_norm:
            extras.append("patch norms")
        if self.attn_norm or self.mlp_norm:
            extras.append("sub-LayerNorms in " + " and ".join(n for n, b in (("attention", self.attn_norm),
                                                                           ("MLP", self.mlp_norm)) if b))
        if self.distilled:
            extras.append("distillation token")
        if self.rope != "none":
            extras.append(f"RoPE {self.rope} (theta {self.rope_theta:g}"
                          + (", bfloat16 periods" if self.rope_periods == "bfloat16" else "")
                          + (f", grid {self.rope_ref_grid[0]}x{self.rope_ref_grid[1]}" if self.rope_ref_grid else "")
                          + (f", offset {self.rope_grid_offset:g}" if self.rope_grid_offset else "")
                          + (", xy" if self.rope_indexing == "xy" else "")
                          + (", interleaved" if not self.rope_half else "") + ")")
        if not self.abs_pos_embed:
            extras.append("no position table")
        if self.qkv_bias and not self.key_bias:
            extras.append("no key bias")
        return (f"{kind} depth {self.depth} width {self.width} heads {self.num_heads}x{self.head_dim} "
                f"mlp {self.mlp_dim} patch {self.patch_size} @{self.image_size}px "
                f"({', '.join(extras)}), {self.num_classes} classes")


def parameter_shapes(cfg: ViTConfig) -> Dict[str, Tuple[int, ...]]:
    """``{name: shape}`` of the canonical model's ``state_dict`` for ``cfg``, in its order, without
    building the model: what every converter, writer and audit lays its tensors out from.

    This is :class:`vitconv.model.VisionTransformer`'s structure written as data, so that a
    conversion never waits for torch (its import costs more than converting a small model).
    ``tests/test_shapes.py`` holds it to the model built on the ``meta`` device, name for name,
    shape for shape and in order, over every preset, golden case and a broad sweep of configs: a
    module added to the model without its line here fails there. The order is PyTorch's: a
    module's own parameters, then its submodules' in the order they are assigned."""
    return dict(_parameter_shapes(cfg))


@functools.lru_cache(maxsize=32)
def _parameter_shapes(cfg: ViTConfig) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    d, out = cfg.width, []  # type: int, List[Tuple[str, Tuple[int, ...]]]

    def linear(name: str, n_in: int, n_out: int, bias: bool = True) -> None:
        out.append((f"{name}.weight", (n_out, n_in)))
        if bias:
            out.append((f"{name}.bias", (n_out,)))

    def norm(name: str, n: int) -> None:  # GroupNorm (the stem): weight, bias
        out.extend(((f"{name}.weight", (n,)), (f"{name}.bias", (n,))))

    def model_norm(name: str, n: int) -> None:  # model.norm_layer: LayerNorm (weight, bias) or RMSNorm
        out.append((f"{name}.weight", (n,)))
        if cfg.norm == "layernorm":
            out.append((f"{name}.bias", (n,)))

    def mlp(name: str, glu: bool, bias: bool = True, sub_norm: bool = False) -> None:
        linear(f"{name}.fc1", d, 2 * cfg.mlp_dim if glu else cfg.mlp_dim, bias)
        linear(f"{name}.fc2", cfg.mlp_dim, d, bias)
        if sub_norm:
            model_norm(f"{name}.norm", cfg.mlp_dim)

    # VisionTransformer's own parameters first
    for name, present, rows in (("cls_token", cfg.class_token, (1, 1)), ("dist_token", cfg.distilled, (1, 1)),
                                ("reg_token", cfg.num_reg_tokens > 0, (1, cfg.num_reg_tokens)),
                                ("mask_token", cfg.mask_token, (1,))):
        if present:
            out.append((name, (*rows, d)))
    if cfg.abs_pos_embed:
        out.append(("pos_embed", (1, cfg.num_pos_rows, d)))
    if cfg.rel_pos_bias_shared:
        out.append(("rel_pos_table", (cfg.rel_pos_rows, cfg.num_heads)))
    if cfg.rope == "mixed":
        out.append(("rope_freqs", (2, cfg.depth, cfg.num_heads, cfg.head_dim // 2)))
    if cfg.resnet_layers is not None:  # ResNetStem: root, then bottleneck units stage by stage
        w = cfg.resnet_width
        out.append(("stem.conv_root.weight", (w, cfg.in_chans, 7, 7)))
        norm("stem.gn_root", w)
        in_ch = w
        for i, units in enumerate(cfg.resnet_layers):
            features = w * 2 ** i
            for j in range(units):
                unit, stride = f"stem.stages.{i}.{j}", 2 if (i > 0 and j == 0) else 1
                if in_ch != features * 4 or stride != 1:
                    out.append((f"{unit}.conv_proj.weight", (features * 4, in_ch, 1, 1)))
                    norm(f"{unit}.gn_proj", features * 4)
                for conv, (c_out, c_in, k) in (("1", (features, in_ch, 1)), ("2", (features, features, 3)),
                                               ("3", (features * 4, features, 1))):
                    out.append((f"{unit}.conv{conv}.weight", (c_out, c_in, k, k)))
                    norm(f"{unit}.gn{conv}", c_out)
                in_ch = features * 4
    p = cfg.patch_size
    out.append(("patch_embed.weight", (d, cfg.embed_in_chans, p, p)))
    if cfg.patch_bias:
        out.append(("patch_embed.bias", (d,)))
    if cfg.patch_norm:
        model_norm("patch_norm_pre", cfg.embed_in_chans * p * p)
        model_norm("patch_norm_post", d)
    if cfg.patch_embed_norm:
        model_norm("patch_embed_norm", d)
    if cfg.norm_pre:
        model_norm("norm_pre", d)
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        model_norm(f"{b}.norm1", d)
        if cfg.rel_pos_bias:  # Attention's own parameter, before its submodules
            out.append((f"{b}.attn.rel_pos_table", (cfg.rel_pos_rows, cfg.num_heads)))
        linear(f"{b}.attn.qkv", d, 3 * cfg.attn_dim, cfg.qkv_bias)
        if cfg.qk_norm:
            model_norm(f"{b}.attn.q_norm", cfg.head_dim)
            model_norm(f"{b}.attn.k_norm", cfg.head_dim)
        if cfg.attn_norm:
            model_norm(f"{b}.attn.norm", cfg.attn_dim)
        linear(f"{b}.attn.proj", cfg.attn_dim, d, cfg.proj_bias)
        if cfg.layer_scale:
            out.append((f"{b}.ls1.gamma", (d,)))
        model_norm(f"{b}.norm2", d)
        mlp(f"{b}.mlp", cfg.mlp == "swiglu", cfg.mlp_bias, cfg.mlp_norm)
        if cfg.layer_scale:
            out.append((f"{b}.ls2.gamma", (d,)))
    if cfg.final_norm != "none":
        model_norm("norm", d)
    if cfg.classifier == "map" and cfg.pool_head == "aimv2":  # the probe, [k; v], proj
        out.append(("attn_pool.latent", (1, 1, d)))
        linear("attn_pool.kv", d, 2 * d, cfg.qkv_bias)
        linear("attn_pool.proj", d, d)
    elif cfg.classifier == "map":  # AttentionPool: the probe, then qkv, proj, norm, a plain MLP
        out.append(("attn_pool.latent", (1, 1, d)))
        linear("attn_pool.qkv", d, 3 * d)
        linear("attn_pool.proj", d, d)
        model_norm("attn_pool.norm", d)
        mlp("attn_pool.mlp", glu=False)
    if cfg.representation_size:
        linear("pre_logits", d, cfg.representation_size)
    if cfg.num_classes:
        linear("head", cfg.head_in_dim, cfg.num_classes, cfg.head_bias)
        if cfg.distilled:
            linear("head_dist", d, cfg.num_classes)
    for name, shape in out:  # what torch refuses to allocate, even on the meta device
        if math.prod(shape) >= 2 ** 63:
            raise OverflowError(f"{name} {shape} has more than 2**63 elements")
    return tuple(out)


def parse_settings(items: "typing.Iterable[str]") -> dict:
    """``("act=quick_gelu", "norm_eps=1e-5")`` -> ``{"act": "quick_gelu", "norm_eps": 1e-05}``
    (``--set``, a batch row's ``set``): a value that reads as JSON (a number, true/false) is taken
    as such, otherwise as text. Raises ``ValueError`` naming an item that is not FIELD=VALUE."""
    out: dict = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{item!r} is not FIELD=VALUE")
        try:
            out[name.strip()] = json.loads(value)
        except RecursionError:
            raise ValueError(f"{name.strip()}: the value is nested deeper than JSON's parser goes") from None
        except ValueError:
            out[name.strip()] = value
    return out


def _json_fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can stand for a field annotated ``hint`` (bool is not an int here)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_json_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (tuple, list):
        return isinstance(value, (list, tuple)) and all(_json_fits(v, args[0]) for v in value)
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return type(value) is str
    return False
