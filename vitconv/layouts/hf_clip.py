"""Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``SiglipVisionModel``
directories (and a full ``CLIPModel`` / ``SiglipModel``: its vision tower) <-> canonical.

Keys are what ``save_pretrained`` writes: ``embeddings.{patch_embedding, position_embedding
(an nn.Embedding: (N, D)), class_embedding ((D,), CLIP)}``, ``pre_layrnorm`` (CLIP),
``encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2}``,
``post_layernorm``, SigLIP's ``head.{probe, attention.in_proj_weight/bias ([q; k; v]),
attention.out_proj, layernorm, mlp}``; a fresh vision model saves them without a prefix, a
model with a projection (and a full two-tower model) under ``vision_model.``, with CLIP's
``visual_projection`` (no bias) beside it. A two-tower file's text tower is left out.

Semantics (``modeling_clip.py``, ``modeling_siglip.py``): CLIP has a class token (row 0 of
the table), ``pre_layrnorm`` after the embedding, no patch bias, QuickGELU and eps 1e-5 by
default, and normalises only the class token it pools (``post_layernorm``; the same
function as the canonical encoder norm then token pooling); ``image_embeds`` is the bias-free
projection of it (canonical: a bias-free head). SigLIP has no class token, tanh GELU and eps
1e-6, normalises every token and pools with its attention head (canonical ``classifier
'map'``). transformers resizes position tables bicubic without antialiasing
(``interpolate_pos_encoding=True``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import CLIP, SIGLIP, Usage
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.hf import ACT_TO_HF, RESTATES, act_carry, eps_carry, hf_files, semantics
from vitconv.layouts.inference import build, config_json, count_blocks, grid_from_tokens, heads_carry, need
from vitconv.layouts.transforms import BATCH_AXIS, IDENTITY, QKV_CONCAT, VECTOR_TOKEN
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import When

VISION = "vision_model."
#: layout -> (transformers class, model_type, the names' prefix inside the table)
CLASSES = {"hf_clip": ("CLIPVisionModel", "clip_vision_model", ""),
           "hf_clip_proj": ("CLIPVisionModelWithProjection", "clip_vision_model", VISION),
           "hf_siglip": ("SiglipVisionModel", "siglip_vision_model", "")}
TWO_TOWER = ("text_model.", "text_projection", "logit_scale", "logit_bias")


@lru_cache(maxsize=None)
def _table(layout: str) -> Tuple[Rule, ...]:
    p = CLASSES[layout][2]
    e, b = p + "embeddings.", p + "encoder.layers.{i}."
    a = b + "self_attn."
    rows = [
        Rule("patch_embed.weight", (e + "patch_embedding.weight",), IDENTITY),
        Rule("patch_embed.bias", (e + "patch_embedding.bias",), IDENTITY, "model", When("patch_bias")),
        Rule("pos_embed", (e + "position_embedding.weight",), BATCH_AXIS),
        Rule("blocks.{i}.norm1.weight", (b + "layer_norm1.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm1.bias", (b + "layer_norm1.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.qkv.weight", tuple(a + f"{n}_proj.weight" for n in "qkv"), QKV_CONCAT, "block"),
        Rule("blocks.{i}.attn.qkv.bias", tuple(a + f"{n}_proj.bias" for n in "qkv"), QKV_CONCAT, "block"),
        Rule("blocks.{i}.attn.proj.weight", (a + "out_proj.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.bias", (a + "out_proj.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.weight", (b + "layer_norm2.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.bias", (b + "layer_norm2.bias",), IDENTITY, "block"),
        *(Rule(f"blocks.{{i}}.mlp.fc{n}.{w}", (b + f"mlp.fc{n}.{w}",), IDENTITY, "block")
          for n in (1, 2) for w in ("weight", "bias")),
        Rule("norm.weight", (p + "post_layernorm.weight",), IDENTITY),
        Rule("norm.bias", (p + "post_layernorm.bias",), IDENTITY),
    ]
    if layout == "hf_siglip":
        h = p + "head."
        rows += [Rule("attn_pool.latent", (h + "probe",), IDENTITY),
                 Rule("attn_pool.qkv.weight", (h + "attention.in_proj_weight",), IDENTITY),
                 Rule("attn_pool.qkv.bias", (h + "attention.in_proj_bias",), IDENTITY),
                 *(Rule(f"attn_pool.{c}.{w}", (h + f"{f}.{w}",), IDENTITY)
                   for c, f in (("proj", "attention.out_proj"), ("norm", "layernorm"), ("mlp.fc1", "mlp.fc1"),
                                ("mlp.fc2", "mlp.fc2")) for w in ("weight", "bias"))]
    else:
        rows += [Rule("cls_token", (e + "class_embedding",), VECTOR_TOKEN),
                 Rule("norm_pre.weight", (p + "pre_layrnorm.weight",), IDENTITY),
                 Rule("norm_pre.bias", (p + "pre_layrnorm.bias",), IDENTITY)]
    if layout == "hf_clip_proj":
        rows.append(Rule("head.weight", ("visual_projection.weight",), IDENTITY))
    return tuple(rows)


def carries(layout: str) -> Tuple[Carry, ...]:
    siglip = layout == "hf_siglip"
    def key(name: str) -> str:  # a two-tower config.json nests the vision tower's
        return f"{name}|vision_config.{name}"

    common = (
        heads_carry("num_attention_heads", key("num_attention_heads")),
        Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="the attention width is the hidden size"),
        act_carry("gelu_tanh" if siglip else "quick_gelu", key("hidden_act")),
        eps_carry(1e-6 if siglip else 1e-5, key("layer_norm_eps")),
        Carry("pos_resize", hardcoded="transformers resizes position tables bicubic without antialiasing "
              "(interpolate_pos_encoding=True): the native resolution is unaffected", default="bicubic"),
    )
    if siglip:
        return common + (Carry("class_token", values=(False,), why="SigLIP has no class token"),
                         Carry("patch_bias", values=(True,), why="SigLIP's patch embedding has a bias"),
                         Carry("classifier", values=("map",), why="SigLIP pools with its attention head"))
    return common + (Carry("norm_pre", values=(True,), why="CLIP always has pre_layrnorm"),
                     Carry("patch_bias", values=(False,), why="CLIP's patch embedding has no bias"),
                     Carry("head_bias", holds=lambda c: not c.num_classes or not c.head_bias,
                           why="CLIP's visual_projection has no bias"))


def _prefix(layout: str):
    def find(keys: Sequence[str], path: Optional[str]) -> str:
        if layout == "hf_clip_proj":
            return ""  # its table names vision_model. and visual_projection itself
        return VISION if any(k.startswith(VISION) for k in keys) else ""
    return find


def detect(layout: str):
    def found(probe: Probe) -> bool:
        s = probe.shapes
        for p in ("", VISION):
            if p + "embeddings.patch_embedding.weight" not in s:
                continue
            clip = p + "embeddings.class_embedding" in s
            if layout == "hf_siglip":  # a Conv2d kernel (SigLIP 2's Linear: hf_siglip2)
                return not clip and p + "head.probe" in s and len(s[p + "embeddings.patch_embedding.weight"]) == 4
            return clip and ("visual_projection.weight" in s) == (layout == "hf_clip_proj")
        return False
    return found


def _vision_config(probe: Probe) -> dict:
    """The vision tower's config: a two-tower model nests it under ``vision_config``."""
    hc = config_json(probe)
    vc = hc.get("vision_config", hc)
    if not isinstance(vc, dict):
        raise MappingError("config.json: vision_config is not an object", probe.path)
    if "projection_dim" in hc and "vision_config" in hc:  # CLIPModel: the top level's governs
        vc = {**vc, "projection_dim": hc["projection_dim"]}
    return vc


def infer(layout: str):
    siglip = layout == "hf_siglip"

    def infer_config(probe: Probe) -> ViTConfig:
        shapes, path = probe.shapes, probe.path
        p = CLASSES[layout][2]
        vc = _vision_config(probe)
        e, b = p + "embeddings.", p + "encoder.layers.0."
        depth = count_blocks(shapes, r"^" + p.replace(".", r"\.") + r"encoder\.layers\.(\d+)\.",
                             p + "encoder.layers.N", path)
        emb = need(shapes, e + "patch_embedding.weight", layout, path)
        if len(emb) != 4 or emb[2] != emb[3]:
            raise MappingError(f"{e}patch_embedding.weight must be a square (out, in, k, k) kernel, got {emb}", path)
        width, in_chans, patch = emb[0], emb[1], emb[2]
        q = need(shapes, b + "self_attn.q_proj.weight", layout, path)
        heads, head_dim, act, eps = semantics(vc, probe, q[0], carries(layout))
        pos = need(shapes, e + "position_embedding.weight", layout, path)
        g = grid_from_tokens(pos[0], 0 if siglip else 1, e + "position_embedding.weight", path)
        proj = shapes.get("visual_projection.weight") if layout == "hf_clip_proj" else None
        return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                     num_heads=heads, head_dim=head_dim,
                     mlp_dim=need(shapes, b + "mlp.fc1.weight", layout, path)[0],
                     num_classes=proj[0] if proj else 0, act=act, norm_eps=eps,
                     class_token=not siglip, classifier="map" if siglip else "token", norm_pre=not siglip,
                     patch_bias=e + "patch_embedding.bias" in shapes, head_bias=False if proj else True,
                     pos_resize="bicubic")
    return infer_config


def hf_config(layout: str):
    cls, model_type, _ = CLASSES[layout]

    def config(cfg: ViTConfig, usage: Optional[Usage] = None) -> dict:
        d = {"architectures": [cls], "model_type": model_type, "hidden_size": cfg.width,
             "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
             "num_channels": cfg.in_chans, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
             "hidden_act": ACT_TO_HF[cfg.act], "layer_norm_eps": cfg.norm_eps, "attention_dropout": 0.0,
             "initializer_range": 0.02, "dtype": "float32"}
        if layout == "hf_clip_proj":
            d["projection_dim"] = cfg.num_classes
        if layout == "hf_siglip":
            d["vision_use_head"] = True
        return d
    return config


for _name, _description in (("hf_clip_proj", "Hugging Face CLIPVisionModelWithProjection (or a CLIPModel's vision "
                                             "tower)"),
                            ("hf_clip", "Hugging Face CLIPVisionModel"),
                            ("hf_siglip", "Hugging Face SiglipVisionModel (or a SiglipModel's vision tower)")):
    register(Layout(name=_name, target="hf", description=_description, table=lambda cfg, n=_name: _table(n),
                    detect=detect(_name), infer=infer(_name), carries=carries(_name), containers=("dir",),
                    prefix=_prefix(_name), ignore=TWO_TOWER if _name == "hf_clip_proj" else (),
                    ignored_what="the text tower", directory_config=hf_config(_name), directory_files=hf_files,
                    preprocessing=SIGLIP if _name == "hf_siglip" else CLIP,
                    restates=tuple(f"vision_config.{k}|{k}" for k in RESTATES) + (
                        ("projection_dim|vision_config.projection_dim",) if _name == "hf_clip_proj" else ()),
                    loads_with={"dir": f"transformers.{CLASSES[_name][0]}.from_pretrained('{{path}}')"}))
