"""jeonsworld ``ViT-pytorch`` (``models/modeling.py``) state dicts <-> canonical.

Names: ``transformer.embeddings.{patch_embeddings,position_embeddings,cls_token}``, separate
``attn.query/key/value/out`` Linears per block (``transformer.encoder.layer.{i}``),
``attention_norm``/``ffn_norm``, ``ffn.fc1/fc2``, ``transformer.encoder.encoder_norm``, ``head``;
the hybrid's ResNet under ``transformer.embeddings.hybrid_model.{root,body}``
(``root.conv``/``root.gn``, ``body.block{s}.unit{u}.conv1..3``/``gn1..3``, ``downsample``,
``gn_proj``: checked against the repository's ``models/modeling_resnet.py``).

Semantics (read direction): exact-erf GELU (``torch.nn.functional.gelu``), LayerNorm eps
1e-6, always the class token, no pre_logits. Its hybrid ResNet is a port of Google's that
differs in the numbers (symmetric padding, weight-standardisation epsilon inside the square
root, ``gn_proj`` with one group per channel); vitconv maps the weights by name and computes
Google's stem, the one they were trained with, and the report says so.
"""

from __future__ import annotations

import re
from typing import List, Tuple

from vitconv.config import ViTConfig, stem_stride
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import JEONSWORLD
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.transforms import IDENTITY, QKV_CONCAT
from vitconv.layouts.inference import build, count_blocks, grid_from_tokens, heads_carry, heads_from_attn_dim, need
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import FINAL_NORM, When

_E = "transformer.embeddings."
_B = "transformer.encoder.layer.{i}."
_H = _E + "hybrid_model."
_U = _H + "body.block{s1}.unit{u1}."
_C = "stem.stages.{s}.{u}."

TABLE: Tuple[Rule, ...] = (
    Rule("stem.conv_root.weight", (_H + "root.conv.weight",), IDENTITY, "model", When("resnet_layers")),
    Rule("stem.gn_root.weight", (_H + "root.gn.weight",), IDENTITY, "model", When("resnet_layers")),
    Rule("stem.gn_root.bias", (_H + "root.gn.bias",), IDENTITY, "model", When("resnet_layers")),
    *(Rule(_C + f"conv{n}.weight", (_U + f"conv{n}.weight",), IDENTITY, "unit") for n in (1, 2, 3)),
    *(Rule(_C + f"gn{n}.{p}", (_U + f"gn{n}.{p}",), IDENTITY, "unit") for n in (1, 2, 3) for p in ("weight", "bias")),
    Rule(_C + "conv_proj.weight", (_U + "downsample.weight",), IDENTITY, "proj"),
    Rule(_C + "gn_proj.weight", (_U + "gn_proj.weight",), IDENTITY, "proj"),
    Rule(_C + "gn_proj.bias", (_U + "gn_proj.bias",), IDENTITY, "proj"),
    Rule("patch_embed.weight", (_E + "patch_embeddings.weight",), IDENTITY),
    Rule("patch_embed.bias", (_E + "patch_embeddings.bias",), IDENTITY),
    Rule("cls_token", (_E + "cls_token",), IDENTITY),
    Rule("pos_embed", (_E + "position_embeddings",), IDENTITY),
    Rule("blocks.{i}.norm1.weight", (_B + "attention_norm.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.norm1.bias", (_B + "attention_norm.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.attn.qkv.weight", tuple(_B + f"attn.{n}.weight" for n in ("query", "key", "value")),
         QKV_CONCAT, "block"),
    Rule("blocks.{i}.attn.qkv.bias", tuple(_B + f"attn.{n}.bias" for n in ("query", "key", "value")),
         QKV_CONCAT, "block", When("qkv_bias")),
    Rule("blocks.{i}.attn.proj.weight", (_B + "attn.out.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.attn.proj.bias", (_B + "attn.out.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.norm2.weight", (_B + "ffn_norm.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.norm2.bias", (_B + "ffn_norm.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc1.weight", (_B + "ffn.fc1.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc1.bias", (_B + "ffn.fc1.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc2.weight", (_B + "ffn.fc2.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc2.bias", (_B + "ffn.fc2.bias",), IDENTITY, "block"),
    Rule("norm.weight", ("transformer.encoder.encoder_norm.weight",), IDENTITY, "model", FINAL_NORM),
    Rule("norm.bias", ("transformer.encoder.encoder_norm.bias",), IDENTITY, "model", FINAL_NORM),
    Rule("head.weight", ("head.weight",), IDENTITY, "model", When("num_classes")),
    Rule("head.bias", ("head.bias",), IDENTITY, "model", When("num_classes")),
)


CARRIES = (
    heads_carry("num_heads"),  # CONFIGS[...].transformer["num_heads"]
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="jeonsworld's attention width is the hidden size"),
    Carry("act", hardcoded="its Mlp hard-codes exact GELU (ACT2FN['gelu']): patch models/modeling.py",
          default="gelu"),
    Carry("norm_eps", hardcoded="its LayerNorms hard-code eps 1e-6: patch models/modeling.py", default=1e-6),
    Carry("classifier", values=("token",), why="jeonsworld always classifies the class token"),
    Carry("final_norm", values=("encoder",), why="jeonsworld always has its encoder_norm"),
    Carry("qkv_bias"), Carry("resnet_layers"), Carry("resnet_width"),
    Carry("pos_resize", hardcoded="jeonsworld resizes position tables with Google's order-1 zoom (load_from); "
          "the native resolution is unaffected", default="zoom"),
)


def detect(probe: Probe) -> bool:
    return ((_E + "patch_embeddings.weight") in probe.shapes
            and "transformer.encoder.layer.0.attn.query.weight" in probe.shapes)


def infer_config(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    depth = count_blocks(shapes, r"^transformer\.encoder\.layer\.(\d+)\.", "transformer.encoder.layer.N", path)
    emb = need(shapes, _E + "patch_embeddings.weight", "jeonsworld", path)
    width, patch = emb[0], emb[2]
    q = need(shapes, "transformer.encoder.layer.0.attn.query.weight", "jeonsworld", path)
    heads, head_dim = heads_from_attn_dim(q[0], probe)
    resnet_layers, resnet_width, in_chans = None, 64, emb[1]
    if (_H + "root.conv.weight") in shapes:
        root = shapes[_H + "root.conv.weight"]
        resnet_width, in_chans = root[0], root[1]
        rx = re.compile(r"^" + re.escape(_H) + r"body\.block(\d+)\.unit(\d+)\.")
        units: dict = {}
        for k in shapes:
            if m := rx.match(k):
                units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        stages = sorted(units)
        if stages != list(range(1, len(stages) + 1)):
            raise MappingError(f"ResNet stages are not numbered block1..blockN (found {stages})", path)
        resnet_layers = tuple(max(units[s]) for s in stages)
    pos = need(shapes, _E + "position_embeddings", "jeonsworld", path)
    g = grid_from_tokens(pos[1], 1, _E + "position_embeddings", path)
    head = shapes.get("head.weight")
    return build(probe, patch_size=patch, in_chans=in_chans, width=width, depth=depth, num_heads=heads,
                 head_dim=head_dim, mlp_dim=need(shapes, _B.format(i=0) + "ffn.fc1.weight", "jeonsworld", path)[0],
                 classifier="token", num_classes=head[0] if head else 0,
                 qkv_bias=(_B.format(i=0) + "attn.query.bias") in shapes, norm_eps=1e-6, act="gelu",
                 final_norm="encoder" if "transformer.encoder.encoder_norm.weight" in shapes else "none",
                 resnet_layers=resnet_layers, resnet_width=resnet_width,
                 image_size=g * patch * stem_stride(resnet_layers))


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    if cfg.resnet_layers is None:
        return []
    return ["hybrid: weights mapped by name; vitconv computes Google's ResNet stem (TF SAME padding, "
            "weight-standardisation eps outside the sqrt, GroupNorm(32) projections), which "
            "jeonsworld's port approximates: its own logits differ from these"]


def write_notes(cfg: ViTConfig) -> List[str]:
    if cfg.resnet_layers is None:
        return []
    return ["hybrid: jeonsworld's ResNet port computes a slightly different stem than Google's"]


register(Layout(name="jeonsworld", description="jeonsworld ViT-pytorch (separate q/k/v Linears)",
                table=lambda cfg: TABLE, detect=detect, infer=infer_config, carries=CARRIES,
                read_notes=read_notes, write_notes=write_notes, preprocessing=JEONSWORLD))
