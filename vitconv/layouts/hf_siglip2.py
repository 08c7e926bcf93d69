"""Hugging Face ``Siglip2VisionModel`` directories (and a full ``Siglip2Model``: its vision
tower) <-> canonical.

Keys are what ``save_pretrained`` writes, SigLIP's (:mod:`vitconv.layouts.hf_clip`) but for the
patch embedding: ``embeddings.patch_embedding`` is an ``nn.Linear`` ``(D, p*p*C)`` over
patches the processor has already cut out (``pixel_values`` ``(B, N, p*p*C)``). Its
``convert_image_to_patches`` flattens each patch as ``(row, column, channel)``, the channel
fastest, so the weight is the canonical ``Conv2d`` kernel ``(D, C, p, p)`` with its axes moved
(``PATCH_LINEAR``, vit-pytorch's order too). ``embeddings.position_embedding`` is an
``nn.Embedding`` of ``num_patches`` rows: a square grid, row-major.

Semantics (``modeling_siglip2.py``): no class token, tanh GELU and eps 1e-6 by default, every
token normalised (``post_layernorm``) and pooled by the attention head (``head``), which
ignores the padding slots through ``pixel_attention_mask``. NaFlex: every image keeps its own
aspect ratio, and ``Siglip2VisionEmbeddings.resize_positional_embeddings`` resizes the square
table to that image's patch grid ``spatial_shapes[i] = (rows, columns)``: bilinear, half-pixel
centres, antialiased when shrinking (the weights of ``F.interpolate(mode="bilinear",
align_corners=False, antialias=True)``, applied as a matrix), in float32 and cast back; the
resized rows are laid out row-major, as the patches are. That is the canonical
``pos_resize='bilinear'``; at the table's own grid it is the identity. Padding slots take the
first row and are masked out of attention and pooling, so the canonical model on the image
itself computes what the NaFlex tower computes on its padded patches.

A bare state dict records neither the patch size nor the channels (``p*p*C`` is one number):
without ``config.json`` three channels are assumed, and said.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import PIL_RESAMPLE, SIGLIP, Usage
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.hf import ACT_TO_HF, RESTATES, act_carry, eps_carry, semantics
from vitconv.layouts.hf_clip import VISION, _table as _siglip_table, _vision_config
from vitconv.layouts.inference import build, config_json, count_blocks, grid_from_tokens, heads_carry, need, patch_from_columns
from vitconv.layouts.transforms import PATCH_LINEAR
from vitconv.layouts.layout import Layout, Probe, register

CLASS, MODEL_TYPE = "Siglip2VisionModel", "siglip2_vision_model"
#: Channels a bare state dict is read with (SigLIP 2 is an RGB model; config.json says otherwise).
DEFAULT_CHANNELS = 3


@lru_cache(maxsize=None)
def _table() -> Tuple[Rule, ...]:
    """SigLIP's table, the patch projection read as a Linear over ``(p, p, C)`` patches."""
    return tuple(Rule(r.canonical, r.source, PATCH_LINEAR) if r.canonical == "patch_embed.weight" else r
                 for r in _siglip_table("hf_siglip"))


def carries() -> Tuple[Carry, ...]:
    def key(name: str) -> str:  # a two-tower config.json nests the vision tower's
        return f"{name}|vision_config.{name}"

    return (
        heads_carry("num_attention_heads", key("num_attention_heads")),
        Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="the attention width is the hidden size"),
        act_carry("gelu_tanh", key("hidden_act")),
        eps_carry(1e-6, key("layer_norm_eps")),
        Carry("pos_resize", hardcoded="transformers resizes SigLIP 2 position tables to every image's patch "
              "grid, bilinear with antialiasing: the table's own grid is unaffected", default="bilinear"),
        Carry("class_token", values=(False,), why="SigLIP 2 has no class token"),
        Carry("patch_bias", values=(True,), why="SigLIP 2's patch embedding has a bias"),
        Carry("classifier", values=("map",), why="SigLIP 2 pools with its attention head"),
    )


def _prefix(keys, path: Optional[str]) -> str:
    return VISION if any(k.startswith(VISION) for k in keys) else ""


def detect(probe: Probe) -> bool:
    s = probe.shapes
    for p in ("", VISION):
        w = s.get(p + "embeddings.patch_embedding.weight")
        if w is not None:  # a Linear over flattened patches (SigLIP v1: a Conv2d kernel)
            return len(w) == 2 and p + "embeddings.position_embedding.weight" in s \
                and p + "embeddings.class_embedding" not in s
    return False


def infer(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    vc = _vision_config(probe)
    e, b = "embeddings.", "encoder.layers.0."
    depth = count_blocks(shapes, r"^encoder\.layers\.(\d+)\.", "encoder.layers.N", path)
    emb = need(shapes, e + "patch_embedding.weight", "hf_siglip2", path)
    if len(emb) != 2:
        raise MappingError(f"{e}patch_embedding.weight must be a Linear (hidden, p*p*C), got {emb}", path)
    if "head.probe" not in shapes:
        raise MappingError("a Siglip2VisionModel without its attention-pooling head (vision_use_head=False): "
                           "vitconv's model always pools; this one returns tokens only", path)
    patch, in_chans = patch_from_columns(emb[1], vc.get("patch_size"), vc.get("num_channels"),
                                         e + "patch_embedding.weight", path, DEFAULT_CHANNELS)
    q = need(shapes, b + "self_attn.q_proj.weight", "hf_siglip2", path)
    heads, head_dim, act, eps = semantics(vc, probe, q[0], carries())
    pos = need(shapes, e + "position_embedding.weight", "hf_siglip2", path)
    if len(pos) != 2:
        raise MappingError(f"{e}position_embedding.weight must be (num_patches, hidden), got {pos}", path)
    g = grid_from_tokens(pos[0], 0, e + "position_embedding.weight", path)
    return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=emb[0], depth=depth,
                 num_heads=heads, head_dim=head_dim, mlp_dim=need(shapes, b + "mlp.fc1.weight", "hf_siglip2", path)[0],
                 num_classes=0, act=act, norm_eps=eps, class_token=False, classifier="map",
                 patch_bias=e + "patch_embedding.bias" in shapes, pos_resize="bilinear")


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    vc = config_json(probe)
    vc = vc.get("vision_config", vc) if isinstance(vc.get("vision_config", vc), dict) else vc
    if "patch_size" in vc or "num_channels" in vc:
        return []
    return [f"patch {cfg.patch_size} x {cfg.patch_size} x {cfg.in_chans} channels assumed: the patch projection's "
            f"{cfg.patch_size ** 2 * cfg.in_chans} columns read as {DEFAULT_CHANNELS}-channel patches (the file "
            "records neither)"]


def hf_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> dict:
    return {"architectures": [CLASS], "model_type": MODEL_TYPE, "hidden_size": cfg.width,
            "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.num_heads, "num_channels": cfg.in_chans, "patch_size": cfg.patch_size,
            "num_patches": cfg.grid_size ** 2, "hidden_act": ACT_TO_HF[cfg.act], "layer_norm_eps": cfg.norm_eps,
            "attention_dropout": 0.0, "vision_use_head": True, "dtype": "float32"}


def hf_files(cfg: ViTConfig, usage: Usage) -> dict:
    """``preprocessor_config.json`` for ``Siglip2ImageProcessor``: each image resized (aspect
    ratio kept) to at most ``max_num_patches`` patches, cut into patches, padded to that many."""
    pre = usage.preprocessing
    return {"preprocessor_config.json": {
        "image_processor_type": "Siglip2ImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std),
        "resample": PIL_RESAMPLE[pre.interpolation], "patch_size": cfg.patch_size,
        "max_num_patches": cfg.grid_size ** 2}}


def write_notes(cfg: ViTConfig) -> List[str]:
    return [f"Siglip2VisionModel takes patches: pixel_values (B, N, {cfg.patch_size}*{cfg.patch_size}*"
            f"{cfg.in_chans}) in (row, column, channel) order, pixel_attention_mask and spatial_shapes "
            "(Siglip2ImageProcessor makes them)"]


register(Layout(name="hf_siglip2", description="Hugging Face Siglip2VisionModel (NaFlex; or a "
                "Siglip2Model's vision tower)", table=lambda cfg: _table(), detect=detect, infer=infer,
                carries=carries(), containers=("dir",), prefix=_prefix, ignored_what="the text tower",
                directory_config=hf_config, directory_files=hf_files, preprocessing=SIGLIP,
                restates=tuple(f"vision_config.{k}|{k}" for k in RESTATES + ("num_patches",)),
                read_notes=read_notes, write_notes=write_notes,
                loads_with={"dir": f"transformers.{CLASS}.from_pretrained('{{path}}')"}))
