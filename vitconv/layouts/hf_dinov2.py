"""Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` directories <-> canonical.

Keys are what ``save_pretrained`` writes (transformers 5.x keeps the 4.x names on disk):
``embeddings.{cls_token, mask_token, register_tokens, patch_embeddings.projection,
position_embeddings}``, ``encoder.layer.{i}.{norm1, attention.attention.{query,key,value},
attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1/fc2 | mlp.weights_in/weights_out
(SwiGLU: [gate; up]), layer_scale2.lambda1}``, ``layernorm``.

Semantics (``modeling_dinov2*.py``): the class token and the patches take the position
table, registers are inserted after it ([class, registers, patches]); LayerScale on both
branches; a final LayerNorm on every token; ``pooler_output`` is the class token after it
(canonical: token pooling, no head). ``config.json`` records the heads, ``hidden_act``,
``layer_norm_eps``, ``mlp_ratio`` (an integer: the MLP width must be a multiple of the
width, or follow the SwiGLU rounding ``(int(int(D*r)*2/3)+7)//8*8``). At another resolution
transformers resizes the table bicubic, with antialiasing only in the register model; the
original DINOv2 (without registers) resizes otherwise (:mod:`vitconv.layouts.dinov2`).
``mask_token`` is read by masked training only; the register model always has one, written
as zeros where the canonical model has none.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import DINOV2, Usage
from vitconv.layouts.table import Carry, Rule, fill
from vitconv.layouts.hf import ACT_TO_HF, RESTATES, act_carry, eps_carry, hf_files, semantics
from vitconv.layouts.inference import build, config_json, count_blocks, grid_from_tokens, heads_carry, need
from vitconv.layouts.transforms import IDENTITY, QKV_CONCAT
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import PLAIN_MLP, SWIGLU, When

MODEL_TYPES = {"hf_dinov2": "dinov2", "hf_dinov2_reg": "dinov2_with_registers"}
CLASSES = {"hf_dinov2": "Dinov2Model", "hf_dinov2_reg": "Dinov2WithRegistersModel"}
_E, _B = "embeddings.", "encoder.layer.{i}."
_A = _B + "attention.attention."


@lru_cache(maxsize=None)
def _table(layout: str) -> Tuple[Rule, ...]:
    rows = [
        Rule("patch_embed.weight", (_E + "patch_embeddings.projection.weight",), IDENTITY),
        Rule("patch_embed.bias", (_E + "patch_embeddings.projection.bias",), IDENTITY),
        Rule("cls_token", (_E + "cls_token",), IDENTITY),
        Rule("mask_token", (_E + "mask_token",), IDENTITY, "model", When("mask_token")),
        Rule("pos_embed", (_E + "position_embeddings",), IDENTITY),
        Rule("blocks.{i}.norm1.weight", (_B + "norm1.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm1.bias", (_B + "norm1.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.qkv.weight", tuple(_A + f"{n}.weight" for n in ("query", "key", "value")),
             QKV_CONCAT, "block"),
        Rule("blocks.{i}.attn.qkv.bias", tuple(_A + f"{n}.bias" for n in ("query", "key", "value")),
             QKV_CONCAT, "block", When("qkv_bias")),
        Rule("blocks.{i}.attn.proj.weight", (_B + "attention.output.dense.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.bias", (_B + "attention.output.dense.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.ls1.gamma", (_B + "layer_scale1.lambda1",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.weight", (_B + "norm2.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.bias", (_B + "norm2.bias",), IDENTITY, "block"),
        *(Rule(f"blocks.{{i}}.mlp.fc{n}.{p}", (_B + f"mlp.fc{n}.{p}",), IDENTITY, "block", PLAIN_MLP)
          for n in (1, 2) for p in ("weight", "bias")),
        *(Rule(f"blocks.{{i}}.mlp.fc{n}.{p}", (_B + f"mlp.{w}.{p}",), IDENTITY, "block", SWIGLU)
          for n, w in ((1, "weights_in"), (2, "weights_out")) for p in ("weight", "bias")),
        Rule("blocks.{i}.ls2.gamma", (_B + "layer_scale2.lambda1",), IDENTITY, "block"),
        Rule("norm.weight", ("layernorm.weight",), IDENTITY),
        Rule("norm.bias", ("layernorm.bias",), IDENTITY),
    ]
    if layout == "hf_dinov2_reg":
        rows += [Rule("reg_token", (_E + "register_tokens",), IDENTITY, "model", When("num_reg_tokens")),
                 fill(_E + "mask_token", lambda c: (1, c.width), ~When("mask_token"))]
    return tuple(rows)


def mlp_ratio(cfg: ViTConfig) -> Optional[int]:
    """The integer ``mlp_ratio`` under which transformers builds this MLP width, if any."""
    for r in range(1, 65):
        hidden = cfg.width * r
        if cfg.mlp == "swiglu":
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        if hidden == cfg.mlp_dim:
            return r
    return None


def carries(layout: str) -> Tuple[Carry, ...]:
    reg = layout == "hf_dinov2_reg"
    return (
        heads_carry("num_attention_heads", "num_attention_heads"),
        Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="DINOv2's attention width is the hidden size"),
        act_carry(lambda c: "silu" if c.mlp == "swiglu" else "gelu",
                  holds=lambda c: c.mlp != "swiglu" or c.act == "silu", why="transformers' SwiGLU gate is SiLU"),
        eps_carry(1e-6),
        Carry("qkv_bias"),
        Carry("mlp", holds=lambda c: mlp_ratio(c) is not None,
              why="config.json's integer mlp_ratio cannot give this MLP width"),
        Carry("layer_scale", values=(True,), why="Hugging Face DINOv2 always has layer_scale1/2"),
        Carry("mask_token", hardcoded="the register model always has a mask_token (masked training "
              "only): written as zeros", default=True) if reg else Carry("mask_token", key="use_mask_token"),
        *((Carry("num_reg_tokens"),
           Carry("pos_embed_prefix", holds=lambda c: c.pos_embed_prefix == ("class" if c.num_reg_tokens else "all"),
                 why="DINOv2's registers have no position rows"))
          if reg else ()),
        Carry("pos_resize", hardcoded="transformers resizes position tables bicubic " + (
              "with" if reg else "without") + " antialiasing: the native resolution is unaffected",
              default="bicubic_aa" if reg else "bicubic"),
    )


def detect(layout: str):
    def found(probe: Probe) -> bool:
        s = probe.shapes
        if not (_E + "patch_embeddings.projection.weight" in s and "encoder.layer.0.layer_scale1.lambda1" in s):
            return False
        model_type = config_json(probe).get("model_type")  # a registers model may have none
        if model_type in MODEL_TYPES.values():
            return model_type == MODEL_TYPES[layout]
        return (_E + "register_tokens" in s) == (layout == "hf_dinov2_reg")
    return found


def infer(layout: str):
    def infer_config(probe: Probe) -> ViTConfig:
        shapes, path = probe.shapes, probe.path
        hc = config_json(probe)
        if hc.get("model_type", MODEL_TYPES[layout]) != MODEL_TYPES[layout]:
            raise MappingError(f"config.json model_type {hc.get('model_type')!r} is not "
                               f"{MODEL_TYPES[layout]!r}", path)
        depth = count_blocks(shapes, r"^encoder\.layer\.(\d+)\.", "encoder.layer.N", path)
        emb = need(shapes, _E + "patch_embeddings.projection.weight", layout, path)
        width, in_chans, patch = emb[0], emb[1], emb[2]
        q = need(shapes, _A.format(i=0) + "query.weight", layout, path)
        heads, head_dim, act, eps = semantics(hc, probe, q[0], carries(layout))
        swiglu = _B.format(i=0) + "mlp.weights_in.weight" in shapes
        fc2 = need(shapes, _B.format(i=0) + ("mlp.weights_out.weight" if swiglu else "mlp.fc2.weight"), layout, path)
        regs = shapes[_E + "register_tokens"][1] if _E + "register_tokens" in shapes else 0
        pos = need(shapes, _E + "position_embeddings", layout, path)
        g = grid_from_tokens(pos[1], 1, _E + "position_embeddings", path)
        return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width,
                     depth=depth, num_heads=heads, head_dim=head_dim, mlp_dim=fc2[1], num_classes=0,
                     qkv_bias=_A.format(i=0) + "query.bias" in shapes, norm_eps=eps,
                     act="silu" if swiglu else act, layer_scale=True,
                     mask_token=_E + "mask_token" in shapes, num_reg_tokens=regs,
                     pos_embed_prefix="class" if regs else "all", mlp="swiglu" if swiglu else "mlp",
                     pos_resize="bicubic_aa" if layout == "hf_dinov2_reg" else "bicubic")
    return infer_config


def hf_config(layout: str):
    def config(cfg: ViTConfig, usage: Optional[Usage] = None) -> dict:
        d = {"architectures": [CLASSES[layout]], "model_type": MODEL_TYPES[layout], "hidden_size": cfg.width,
             "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads, "mlp_ratio": mlp_ratio(cfg),
             "hidden_act": ACT_TO_HF.get(cfg.act, cfg.act), "layer_norm_eps": cfg.norm_eps,
             "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": cfg.in_chans,
             "qkv_bias": cfg.qkv_bias, "layerscale_value": 1.0, "use_swiglu_ffn": cfg.mlp == "swiglu",
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0,
             "initializer_range": 0.02, "dtype": "float32"}
        if layout == "hf_dinov2_reg":
            d["num_register_tokens"] = cfg.num_reg_tokens
        else:
            d["use_mask_token"] = cfg.mask_token
        return d
    return config


for _name, _description in (("hf_dinov2", "Hugging Face Dinov2Model"),
                            ("hf_dinov2_reg", "Hugging Face Dinov2WithRegistersModel")):
    register(Layout(name=_name, target="hf", description=_description, table=lambda cfg, n=_name: _table(n),
                    detect=detect(_name), infer=infer(_name), carries=carries(_name), containers=("dir",),
                    directory_config=hf_config(_name), directory_files=hf_files, preprocessing=DINOV2,
                    restates=RESTATES + (
                        ("num_register_tokens",) if _name == "hf_dinov2_reg" else ()),
                    loads_with={"dir": f"transformers.{CLASSES[_name]}.from_pretrained('{{path}}')"}))
