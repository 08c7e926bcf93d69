"""Hugging Face ``ViTForImageClassification`` / ``ViTModel`` <-> canonical.

Keys are the ones ``save_pretrained`` writes (transformers 4.x and 5.x alike; 5.x renames
modules internally but saves these): ``vit.embeddings.*``, ``vit.encoder.layer.{i}.attention
.attention.query/key/value``, ``attention.output.dense``, ``intermediate.dense``,
``output.dense``, ``layernorm_before/after``, ``vit.layernorm``, ``classifier``; a bare
``ViTModel`` has the same names without ``vit.`` and may carry ``pooler.dense``.

Semantics come from ``config.json`` (``layer_norm_eps``, ``hidden_act``, heads, ``qkv_bias``);
without one, Hugging Face's own defaults (eps 1e-12, exact GELU) apply and the report says so.
``ViTForImageClassification`` classifies ``layernorm(x)[:, 0]`` directly: it never applies the
pooler, so Google's ``pre_logits`` (tanh Dense) fits only a bare ``ViTModel``, whose
``pooler_output`` is exactly ``tanh(Dense(layernorm(x)[:, 0]))``. Not expressible, refused:
a classifier on top of pre_logits, ``gap`` pooling, a hybrid stem, a final norm other than
the encoder one, patch LayerNorms, an attention width other than the hidden size.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import HF_VIT, Usage
from vitconv.layouts.table import ABSENT, Carry, Rule, found_at, lookup
from vitconv.layouts.transforms import IDENTITY, QKV_CONCAT
from vitconv.layouts.inference import build, config_json, count_blocks, grid_from_tokens, heads_carry, heads_from_attn_dim, need
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import FINAL_NORM, When

#: layout name -> prefix of the ViTModel inside the checkpoint.
PREFIX = {"hf": "vit.", "hf_model": ""}
#: canonical act -> transformers ``hidden_act`` (``gelu_pytorch_tanh`` is F.gelu(approximate='tanh')).
ACT_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu", "relu": "relu",
             "silu": "silu"}
#: transformers' other names for the tanh GELU (the same formula), read, never written.
ACT_ALIASES = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def act_carry(default: Any, key: str = "hidden_act", **more: Any) -> Carry:
    """``act`` as a transformers config.json records it (``hidden_act``, in transformers' names),
    the model class's ``default`` where nothing does."""
    return Carry("act", values=tuple(ACT_TO_HF), key=key, argument="hidden_act", default=default,
                 spelling=ACT_TO_HF, aliases=ACT_ALIASES, **more)


def eps_carry(default: float, key: str = "layer_norm_eps") -> Carry:
    """``norm_eps`` as a transformers config.json records it (``key``: ``layer_norm_eps`` or
    ``rms_norm_eps``), the model class's ``default`` where nothing does."""
    return Carry("norm_eps", key=key, argument=key.split("|")[0], default=default,
                 check=("a small non-negative number", lambda v: 0 <= v < 1))


@lru_cache(maxsize=None)
def _table(prefix: str) -> Tuple[Rule, ...]:
    e, b = prefix + "embeddings.", prefix + "encoder.layer.{i}."
    a = b + "attention.attention."
    rows = [
        Rule("patch_embed.weight", (e + "patch_embeddings.projection.weight",), IDENTITY),
        Rule("patch_embed.bias", (e + "patch_embeddings.projection.bias",), IDENTITY),
        Rule("cls_token", (e + "cls_token",), IDENTITY),
        Rule("pos_embed", (e + "position_embeddings",), IDENTITY),
        Rule("blocks.{i}.norm1.weight", (b + "layernorm_before.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm1.bias", (b + "layernorm_before.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.qkv.weight", tuple(a + f"{n}.weight" for n in ("query", "key", "value")),
             QKV_CONCAT, "block"),
        Rule("blocks.{i}.attn.qkv.bias", tuple(a + f"{n}.bias" for n in ("query", "key", "value")),
             QKV_CONCAT, "block", When("qkv_bias")),
        Rule("blocks.{i}.attn.proj.weight", (b + "attention.output.dense.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.bias", (b + "attention.output.dense.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.weight", (b + "layernorm_after.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.bias", (b + "layernorm_after.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc1.weight", (b + "intermediate.dense.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc1.bias", (b + "intermediate.dense.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.weight", (b + "output.dense.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.bias", (b + "output.dense.bias",), IDENTITY, "block"),
        Rule("norm.weight", (prefix + "layernorm.weight",), IDENTITY, "model", FINAL_NORM),
        Rule("norm.bias", (prefix + "layernorm.bias",), IDENTITY, "model", FINAL_NORM),
    ]
    if prefix:  # ViTForImageClassification: always a classifier, never the pooler
        rows += [Rule("head.weight", ("classifier.weight",), IDENTITY),
                 Rule("head.bias", ("classifier.bias",), IDENTITY)]
    else:  # ViTModel: the pooler is Google's pre_logits (Dense + tanh), no classifier
        rows += [Rule("pre_logits.weight", ("pooler.dense.weight",), IDENTITY, "model", When("representation_size")),
                 Rule("pre_logits.bias", ("pooler.dense.bias",), IDENTITY, "model", When("representation_size"))]
    return tuple(rows)


def carries(layout: str) -> Tuple[Carry, ...]:
    """config.json records the semantics; a weights file without one gets Hugging Face's
    defaults (``argument`` here: the config.json key transformers reads)."""
    rep = (Carry("representation_size") if layout == "hf_model" else
           Carry("representation_size", values=(None,), why="ViTForImageClassification never applies "
                 "the pooler; only a bare ViTModel's pooler_output computes tanh(Dense)"))
    return (
        heads_carry("num_attention_heads", "num_attention_heads"),
        Carry("head_dim", holds=lambda c: c.attn_dim == c.width,
              why="Hugging Face's attention width is the hidden size"),
        act_carry("gelu"),
        eps_carry(1e-12),
        Carry("pos_resize", hardcoded="transformers resizes position tables bicubic without antialiasing "
              "(interpolate_pos_encoding=True); the native resolution is unaffected", default="bicubic"),
        Carry("qkv_bias"), rep,
        Carry("classifier", values=("token",), why="Hugging Face ViT always classifies the class token"),
        Carry("final_norm", values=("encoder",), why="Hugging Face ViT always has its final layernorm"),
        Carry("resnet_layers", values=(None,), why="ViTHybrid differs from Google's stem and is deprecated"),
    )


def detect(layout: str):
    key = PREFIX[layout] + "embeddings.patch_embeddings.projection.weight"
    block = PREFIX[layout] + "encoder.layer.0.layernorm_before.weight"  # DINOv2 shares the embeddings
    q, k = (PREFIX[layout] + f"encoder.layer.0.attention.attention.{n}.bias" for n in ("query", "key"))
    return lambda probe: (key in probe.shapes and block in probe.shapes
                          and (k in probe.shapes or q not in probe.shapes))  # BEiT: a query bias, no key bias


def semantics(doc: Mapping[str, Any], probe: Probe, attn_dim: int,
              carries: Sequence[Carry]) -> Tuple[int, int, str, float]:
    """``(heads, head_dim, act, norm_eps)`` of a transformers model, read through its layout's rows
    (``carries``): what ``doc`` (its config.json, or the vision tower's part of one) records at
    each row's key, checked, else the model class's default there (:meth:`Carry.read`). What every
    Hugging Face layout reads the same way; the rows are the one place its keys and defaults are said."""
    rows = {c.field: c for c in carries}
    key = rows["num_heads"].key
    recorded = lookup(doc, key)
    if recorded is not ABSENT and type(recorded) is not int:
        raise MappingError(f"config.json: {found_at(doc, key)} {recorded!r} is not an integer", probe.path)
    heads, head_dim = heads_from_attn_dim(attn_dim, probe, None if recorded is ABSENT else recorded)
    return heads, head_dim, rows["act"].read(doc, probe.path), rows["norm_eps"].read(doc, probe.path)


def infer(layout: str):
    def infer_config(probe: Probe) -> ViTConfig:
        shapes, path, p = probe.shapes, probe.path, PREFIX[layout]
        hc = config_json(probe)
        if hc.get("model_type", "vit") != "vit":
            raise MappingError(f"config.json model_type {hc.get('model_type')!r} is not 'vit'", path)
        depth = count_blocks(shapes, r"^" + p.replace(".", r"\.") + r"encoder\.layer\.(\d+)\.",
                             p + "encoder.layer.N", path)
        emb = need(shapes, p + "embeddings.patch_embeddings.projection.weight", layout, path)
        width, in_chans, patch = emb[0], emb[1], emb[2]
        q = need(shapes, p + "encoder.layer.0.attention.attention.query.weight", layout, path)
        heads, head_dim, act, eps = semantics(hc, probe, q[0], carries(layout))
        pos = need(shapes, p + "embeddings.position_embeddings", layout, path)
        if p + "embeddings.cls_token" not in shapes:
            raise MappingError("no embeddings.cls_token: Hugging Face ViT always has one", path)
        g = grid_from_tokens(pos[1], 1, p + "embeddings.position_embeddings", path)
        pooler = p + "pooler.dense.weight"
        rep = shapes[pooler][0] if pooler in shapes else None
        if rep and str(hc.get("pooler_act", "tanh")) != "tanh":
            raise MappingError(f"pooler_act {hc.get('pooler_act')!r}: only tanh (Google's pre_logits) is supported", path)
        head = shapes.get("classifier.weight") if p else None
        if rep and head:
            raise MappingError("a checkpoint with both pooler and classifier: ViTForImageClassification "
                               "ignores the pooler, which vitconv will not guess", path)
        return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width,
                     depth=depth, num_heads=heads, head_dim=head_dim,
                     mlp_dim=need(shapes, p + "encoder.layer.0.intermediate.dense.weight", layout, path)[0],
                     classifier="token", representation_size=rep, num_classes=head[0] if head else 0,
                     qkv_bias=(p + "encoder.layer.0.attention.attention.query.bias") in shapes,
                     norm_eps=eps, act=act, pos_resize="bicubic",
                     final_norm="encoder" if (p + "layernorm.weight") in shapes else "none")
    return infer_config


def hf_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> dict:
    """The ``config.json`` under which transformers computes what the canonical model does."""
    arch = "ViTForImageClassification" if cfg.num_classes else "ViTModel"
    d = {"architectures": [arch], "model_type": "vit", "hidden_size": cfg.width,
         "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
         "intermediate_size": cfg.mlp_dim, "hidden_act": ACT_TO_HF[cfg.act],
         "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
         "num_channels": cfg.in_chans, "qkv_bias": cfg.qkv_bias, "hidden_dropout_prob": 0.0,
         "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
         "encoder_stride": cfg.patch_size, "dtype": "float32"}
    if cfg.num_classes:
        d["id2label"] = (usage or Usage()).id2label(cfg.num_classes)
        d["label2id"] = {name: int(i) for i, name in d["id2label"].items()}
    if cfg.representation_size:
        d["pooler_output_size"] = cfg.representation_size
        d["pooler_act"] = "tanh"
    return d


def hf_files(cfg: ViTConfig, usage: Usage) -> dict:
    """``preprocessor_config.json``, so ``AutoImageProcessor`` and ``pipeline`` run offline."""
    return {"preprocessor_config.json": usage.preprocessing.hf_processor(cfg.image_size)}


#: config.json keys the weights' shapes also say (transformers builds the model from them).
RESTATES = ("hidden_size", "num_hidden_layers", "intermediate_size", "image_size", "patch_size", "num_channels",
            "qkv_bias", "pooler_output_size")


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    """A bare ViTModel's pooler: its activation (``pooler_act``) is not in the weights; tanh is
    transformers' default and the one vitconv computes (Google's ``pre_logits``)."""
    if cfg.representation_size and "pooler_act" not in config_json(probe):
        return ["pooler_act='tanh' assumed: transformers' default, which the file does not record "
                "(a ViTModel whose pooler uses another is not one vitconv computes)"]
    return []


def write_notes(cfg: ViTConfig) -> List[str]:
    notes = [f"config.json: hidden_act {ACT_TO_HF[cfg.act]!r}, layer_norm_eps {cfg.norm_eps:g} "
             "(Hugging Face's defaults are 'gelu' and 1e-12)"]
    if not cfg.num_classes:
        notes.append("no classifier: written as a ViTModel" + (
            " whose pooler_output is Google's pre_logits (load with ViTModel, add_pooling_layer=True)"
            if cfg.representation_size else " (load with ViTModel.from_pretrained(dir, add_pooling_layer=False))"))
    return notes


for _name, _description, _class in (("hf", "Hugging Face ViTForImageClassification", "ViTForImageClassification"),
                                    ("hf_model", "Hugging Face ViTModel (no classifier)", "ViTModel")):
    register(Layout(name=_name, target="hf", description=_description, table=lambda cfg, p=PREFIX[_name]: _table(p),
                    detect=detect(_name), infer=infer(_name), carries=carries(_name), containers=("dir",),
                    directory_config=hf_config, write_notes=write_notes, read_notes=read_notes, restates=RESTATES,
                    directory_files=hf_files, preprocessing=HF_VIT,
                    loads_with={"dir": f"transformers.{_class}.from_pretrained('{{path}}')"}))
