"""Hugging Face ``BeitModel`` / ``BeitForImageClassification`` and ``Data2VecVisionModel`` /
``Data2VecVisionForImageClassification`` directories <-> canonical.

One table for the four: data2vec-vision has BEiT's structure, keys and math under its own
``model_type`` (and ``data2vec_vision.`` where the classifier nests the model; BEiT: ``beit.``).
Keys are what ``save_pretrained`` writes (transformers 5.x renames the modules in memory, not on
disk): ``embeddings.{cls_token, patch_embeddings.projection, position_embeddings}``,
``encoder.relative_position_bias.relative_position_bias_table`` (the shared table),
``encoder.layer.{i}.{layernorm_before, attention.attention.{query, key, value}, attention.attention
.relative_position_bias.relative_position_bias_table, attention.output.dense, lambda_1,
layernorm_after, intermediate.dense, output.dense, lambda_2}``, then ``layernorm`` or, with
``use_mean_pooling``, ``pooler.layernorm``; ``classifier``. The key projection has no bias:
canonical ``qkv.bias`` holds a zero key third (a model with another one is refused when written).

Semantics (``modeling_beit.py``): ``pooler_output`` is ``pooler.layernorm`` over the mean of the
patch tokens (``use_mean_pooling``: canonical ``gap`` with ``final_norm='pooled'``), or the class
token after ``layernorm`` (``token``); the classifier reads it. A mean-pooling model without its
pooler (``add_pooling_layer=False``, ``Data2VecVisionModel``'s default) has no final norm at all
(``final_norm='none'``; its ``last_hidden_state`` is the canonical encoding). At any input grid the relative
tables are resized bilinearly (``align_corners=False``, no antialiasing: ``rel_pos_resize=
'bilinear'``; at the table's own grid this is the identity), the block's own and the shared one
added; the absolute table is resized bicubic without antialiasing whenever the grid differs.
``config.json`` records the heads, ``hidden_act`` and ``layer_norm_eps`` (defaults exact GELU and
1e-12); the tables' columns hold the heads too.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import HF_VIT, Usage
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.hf import ACT_TO_HF, act_carry, eps_carry, hf_files, semantics
from vitconv.layouts.inference import build, config_json, count_blocks, grid_from_tokens, heads_carry, need
from vitconv.layouts.transforms import IDENTITY, Q_V_BIAS, QKV_CONCAT
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.timm_beit import TABLE, grid_from_table
from vitconv.layouts.table import FINAL_NORM, When

#: layout -> (model_type, class, prefix of the model's keys)
LAYOUTS = {"hf_beit": ("beit", "BeitModel", ""),
           "hf_beit_cls": ("beit", "BeitForImageClassification", "beit."),
           "hf_data2vec_vision": ("data2vec-vision", "Data2VecVisionModel", ""),
           "hf_data2vec_vision_cls": ("data2vec-vision", "Data2VecVisionForImageClassification", "data2vec_vision.")}
_REL = "relative_position_bias." + TABLE


def _keys(prefix: str):
    e, b = prefix + "embeddings.", prefix + "encoder.layer.{i}."
    return e, b, b + "attention.attention."


@lru_cache(maxsize=None)
def _table(layout: str, pooled: bool) -> Tuple[Rule, ...]:
    prefix = LAYOUTS[layout][2]
    e, b, a = _keys(prefix)
    norm = prefix + ("pooler.layernorm" if pooled else "layernorm")
    rows = [
        Rule("patch_embed.weight", (e + "patch_embeddings.projection.weight",), IDENTITY),
        Rule("patch_embed.bias", (e + "patch_embeddings.projection.bias",), IDENTITY),
        Rule("cls_token", (e + "cls_token",), IDENTITY),
        Rule("pos_embed", (e + "position_embeddings",), IDENTITY, "model", When("abs_pos_embed")),
        Rule("rel_pos_table", (prefix + "encoder." + _REL,), IDENTITY, "model", When("rel_pos_bias_shared")),
        Rule("blocks.{i}.norm1.weight", (b + "layernorm_before.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm1.bias", (b + "layernorm_before.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.rel_pos_table", (a + _REL,), IDENTITY, "block", When("rel_pos_bias")),
        Rule("blocks.{i}.attn.qkv.weight", tuple(a + f"{n}.weight" for n in ("query", "key", "value")),
             QKV_CONCAT, "block"),
        Rule("blocks.{i}.attn.qkv.bias", (a + "query.bias", a + "value.bias"), Q_V_BIAS, "block"),
        Rule("blocks.{i}.attn.proj.weight", (b + "attention.output.dense.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.bias", (b + "attention.output.dense.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.ls1.gamma", (b + "lambda_1",), IDENTITY, "block", When("layer_scale")),
        Rule("blocks.{i}.norm2.weight", (b + "layernorm_after.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.bias", (b + "layernorm_after.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc1.weight", (b + "intermediate.dense.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc1.bias", (b + "intermediate.dense.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.weight", (b + "output.dense.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.bias", (b + "output.dense.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.ls2.gamma", (b + "lambda_2",), IDENTITY, "block", When("layer_scale")),
        Rule("norm.weight", (norm + ".weight",), IDENTITY, "model", FINAL_NORM),
        Rule("norm.bias", (norm + ".bias",), IDENTITY, "model", FINAL_NORM),
    ]
    if prefix:  # the classifier reads pooler_output
        rows += [Rule("head.weight", ("classifier.weight",), IDENTITY, "model", When("num_classes")),
                 Rule("head.bias", ("classifier.bias",), IDENTITY, "model", When("num_classes"))]
    return tuple(rows)


def carries(layout: str) -> Tuple[Carry, ...]:
    return (
        heads_carry("num_attention_heads", "num_attention_heads",  # and every relative table's columns
                    shaped=lambda shapes: any(k.endswith(_REL) for k in shapes)),
        Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="BEiT's attention width is the hidden size"),
        act_carry("gelu"),
        eps_carry(1e-12),
        Carry("pos_resize", hardcoded="transformers resizes the absolute table bicubic without antialiasing at "
              "another grid: the native resolution is unaffected",
              default=lambda c: "bicubic" if c.abs_pos_embed else "zoom"),  # no table: the one spelling
        Carry("rel_pos_resize", hardcoded="transformers resizes relative position tables bilinearly at another "
              "grid: the native resolution is unaffected",
              default=lambda c: "bilinear" if c.rel_pos_bias or c.rel_pos_bias_shared else "geometric"),
        Carry("qkv_bias", values=(True,), why="transformers' BEiT always has query and value biases"),
        Carry("key_bias", values=(False,), why="transformers' BEiT has query and value biases only"),
        Carry("classifier", values=("token", "gap"), why="transformers' BEiT pools the class token or the mean "
              "of the patch tokens"),
        Carry("final_norm", holds=lambda c: (c.classifier, c.final_norm) in (
              ("token", "encoder"), ("gap", "pooled"), ("gap", "none")),
              why="transformers' BEiT normalises every token before taking the class token, and the mean of "
                  "the patch tokens after pooling (use_mean_pooling; no norm at all without its pooler)"),
        Carry("layer_scale"), Carry("rel_pos_bias"), Carry("rel_pos_bias_shared"), Carry("abs_pos_embed"),
    )


def table(layout: str):
    return lambda cfg: _table(layout, cfg.final_norm == "pooled")


def detect(layout: str):
    model_type, _, prefix = LAYOUTS[layout]
    _, _, a = (k.format(i=0) for k in _keys(prefix))

    def found(probe: Probe) -> bool:
        s = probe.shapes
        # BEiT's key projection has no bias; a Hugging Face ViT has all three or none
        if not (a + "query.bias" in s and a + "key.weight" in s and a + "key.bias" not in s):
            return False
        recorded = config_json(probe).get("model_type")
        if recorded in ("beit", "data2vec-vision"):
            return recorded == model_type
        return model_type == "beit"  # no config.json: the keys are BEiT's
    return found


def infer(layout: str):
    model_type, _, p = LAYOUTS[layout]
    e, b0, a0 = (k.format(i=0) for k in _keys(p))

    def infer_config(probe: Probe) -> ViTConfig:
        shapes, path = probe.shapes, probe.path
        hc = config_json(probe)
        if hc.get("model_type", model_type) != model_type:
            raise MappingError(f"config.json model_type {hc.get('model_type')!r} is not {model_type!r}", path)
        depth = count_blocks(shapes, r"^" + p.replace(".", r"\.") + r"encoder\.layer\.(\d+)\.",
                             p + "encoder.layer.N", path)
        emb = need(shapes, e + "patch_embeddings.projection.weight", layout, path)
        width, in_chans, patch = emb[0], emb[1], emb[2]
        q = need(shapes, a0 + "query.weight", layout, path)
        per_block, shared = a0 + _REL in shapes, p + "encoder." + _REL in shapes
        grid, table_heads = None, None
        if per_block or shared:
            key = a0 + _REL if per_block else p + "encoder." + _REL
            rel = shapes[key]
            if len(rel) != 2:
                raise MappingError(f"{key} {rel} is not (offsets, heads)", path)
            grid, table_heads = grid_from_table(rel[0], key, path), rel[1]
            if "num_attention_heads" in hc and hc["num_attention_heads"] != table_heads:
                raise MappingError(f"config.json says {hc['num_attention_heads']!r} heads, but {key} holds "
                                   f"{table_heads}", path)
            hc = {**hc, "num_attention_heads": table_heads}
        heads, head_dim, act, eps = semantics(hc, probe, q[0], carries(layout))
        abs_pos = e + "position_embeddings" in shapes
        if abs_pos:
            g = grid_from_tokens(shapes[e + "position_embeddings"][1], 1, e + "position_embeddings", path)
            if grid is not None and g != grid:
                raise MappingError(f"position_embeddings hold a {g}x{g} grid, the relative tables "
                                   f"{grid}x{grid}", path)
            grid = g
        if grid is None:
            raise MappingError("neither a position table nor a relative position table: the grid is unknown",
                               path)
        pooled, normed = p + "pooler.layernorm.weight" in shapes, p + "layernorm.weight" in shapes
        mean = pooled or not normed  # use_mean_pooling without a pooler (add_pooling_layer=False): no norm at all
        if "use_mean_pooling" in hc and bool(hc["use_mean_pooling"]) != mean:
            raise MappingError(f"config.json says use_mean_pooling={hc['use_mean_pooling']!r}, but the weights "
                               f"have {'pooler.layernorm' if pooled else 'layernorm' if normed else 'no final norm'}",
                               path)
        head = shapes.get("classifier.weight") if p else None
        return build(probe, image_size=grid * patch, patch_size=patch, in_chans=in_chans, width=width,
                     depth=depth, num_heads=heads, head_dim=head_dim,
                     mlp_dim=need(shapes, b0 + "intermediate.dense.weight", layout, path)[0],
                     classifier="gap" if mean else "token",
                     final_norm="pooled" if pooled else "encoder" if normed else "none",
                     num_classes=head[0] if head else 0, qkv_bias=True, key_bias=False, norm_eps=eps, act=act,
                     layer_scale=b0 + "lambda_1" in shapes, rel_pos_bias=per_block, rel_pos_bias_shared=shared,
                     abs_pos_embed=abs_pos, pos_resize="bicubic", rel_pos_resize="bilinear")
    return infer_config


def hf_config(layout: str):
    model_type, cls, prefix = LAYOUTS[layout]

    def config(cfg: ViTConfig, usage: Optional[Usage] = None) -> dict:
        d = {"architectures": [cls], "model_type": model_type, "hidden_size": cfg.width,
             "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
             "intermediate_size": cfg.mlp_dim, "hidden_act": ACT_TO_HF[cfg.act], "layer_norm_eps": cfg.norm_eps,
             "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
             "use_absolute_position_embeddings": cfg.abs_pos_embed, "use_relative_position_bias": cfg.rel_pos_bias,
             "use_shared_relative_position_bias": cfg.rel_pos_bias_shared,
             # any positive value creates lambda_1/lambda_2 (the weights hold the trained scales)
             "layer_scale_init_value": 0.1 if cfg.layer_scale else 0.0,
             "use_mean_pooling": cfg.classifier == "gap", "use_mask_token": False, "drop_path_rate": 0.0,
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
             "dtype": "float32"}
        if prefix:
            d["id2label"] = (usage or Usage()).id2label(cfg.num_classes)
            d["label2id"] = {name: int(i) for i, name in d["id2label"].items()}
        return d
    return config


RESTATES = ("hidden_size", "num_hidden_layers", "intermediate_size", "image_size", "patch_size", "num_channels",
            "use_absolute_position_embeddings", "use_relative_position_bias", "use_shared_relative_position_bias",
            "use_mean_pooling")


def write_notes(cfg: ViTConfig) -> List[str]:
    notes = [f"config.json: hidden_act {ACT_TO_HF[cfg.act]!r}, layer_norm_eps {cfg.norm_eps:g}, use_mean_pooling "
             f"{cfg.classifier == 'gap'} (pooler_output is what the canonical model pools)"]
    if cfg.final_norm == "none":
        notes.append("no final norm: a mean-pooling model without its pooler; load it with "
                     "from_pretrained(dir, add_pooling_layer=False) (last_hidden_state is the canonical encoding)")
    return notes


for _name, (_type, _class, _prefix) in LAYOUTS.items():
    register(Layout(name=_name, target="hf" if _type == "beit" else "hf_data2vec_vision",
                    description=f"Hugging Face {_class}", write_rank=1, table=table(_name), detect=detect(_name),
                    infer=infer(_name), carries=carries(_name), containers=("dir",),
                    directory_config=hf_config(_name), directory_files=hf_files, preprocessing=HF_VIT,
                    restates=RESTATES, write_notes=write_notes,
                    loads_with={"dir": f"transformers.{_class}.from_pretrained('{{path}}')"}))
