"""Hugging Face ``DINOv3ViTModel`` directories (± ``use_gated_mlp``) <-> canonical.

Keys are what ``save_pretrained`` writes (transformers 5.x): ``embeddings.{cls_token, mask_token,
register_tokens, patch_embeddings (a Conv2d)}``, ``layer.{i}.{norm1, attention.{q,k,v,o}_proj,
layer_scale1.lambda1, norm2, mlp.{up,down}_proj | mlp.{gate,up,down}_proj, layer_scale2.lambda1}``,
``norm``. No position table and no rotary tensor: ``DINOv3ViTRopePositionEmbedding`` computes
the angles from the grid of each input with ``config.rope_theta`` as the base.

Semantics (``modeling_dinov3_vit.py``): tokens [class, registers, patches]; RoPE rotates the
patch tokens' queries and keys (``apply_rotary_pos_emb`` splits the prefix off), rotate-half
form, coordinates normalised per axis (``get_patches_center_coordinates``), so any input size
and aspect runs; the training-time coordinate augmentations (``pos_embed_shift/jitter/rescale``)
apply only in training mode. LayerScale on both branches; a final LayerNorm on every token;
``pooler_output`` is the class token after it (canonical: token pooling, no head). The biases
follow ``query_bias``/``key_bias``/``value_bias`` (DINOv3: query and value only, ``key_bias=False``);
the gated MLP is ``down(act(gate(x)) * up(x))``, canonical ``fc1`` = [gate; up].
``mask_token`` is read by masked training only; the model always has one, written as zeros
where the canonical model has none. ``register_tokens`` exists, empty, with no registers.
A weights file without its config.json records neither the heads nor ``hidden_act``,
``layer_norm_eps`` and ``rope_theta``: it is read with ``DINOv3ViTConfig``'s defaults (64-dim
heads, GELU, 1e-5, 100), each named in a note, and ``--num-heads``/``--set`` say the model's own.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, Usage
from vitconv.layouts.table import Carry, Rule, fill
from vitconv.layouts.hf import ACT_TO_HF, act_carry, eps_carry, hf_files, semantics
from vitconv.layouts.inference import build, config_json, count_blocks, heads_carry, need
from vitconv.layouts.transforms import GLU_CONCAT, IDENTITY, Q_V_BIAS, QKV_CONCAT, LayoutOp
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import PLAIN_MLP, SWIGLU, When

_E, _B = "embeddings.", "layer.{i}."
_A = _B + "attention."
#: ``DINOv3ViTImageProcessor``'s defaults: 224 x 224 (squashed), bilinear, ImageNet mean and std.
DINOV3 = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bilinear", "squash", 1.0,
                       "DINOv3ViTImageProcessor: 224 x 224, bilinear, ImageNet mean/std")

#: ``mask_token`` (1, 1, D) <-> canonical (1, D).
_MASK = LayoutOp("mask_token", lambda a, cfg: np.ascontiguousarray(a[0].reshape(1, -1)),
                 lambda a, cfg: [np.ascontiguousarray(a.reshape(1, 1, -1))], shapes=lambda s, cfg: [(1, 1, s[-1])])
#: Without registers the model still holds an empty ``register_tokens`` (1, 0, D): consumed with
#: the class token so the audit stays strict and a round trip exact.
_CLS_EMPTY_REG = LayoutOp(
    "cls_with_empty_registers", lambda a, cfg: _cls_empty(*a),
    lambda a, cfg: [np.ascontiguousarray(a), np.zeros((1, 0, a.shape[-1]), a.dtype)], 2,
    shapes=lambda s, cfg: [tuple(s), (1, 0, s[-1])])


def _cls_empty(cls: np.ndarray, reg: np.ndarray) -> np.ndarray:
    if reg.size != 0:
        raise ValueError(f"expected an empty (1, 0, D) register_tokens, got {reg.shape}")
    return np.ascontiguousarray(cls)


@lru_cache(maxsize=None)
def _table() -> Tuple[Rule, ...]:
    return (
        Rule("cls_token", (_E + "cls_token",), IDENTITY, "model", When("num_reg_tokens")),
        Rule("cls_token", (_E + "cls_token", _E + "register_tokens"), _CLS_EMPTY_REG, "model", ~When("num_reg_tokens")),
        Rule("reg_token", (_E + "register_tokens",), IDENTITY, "model", When("num_reg_tokens")),
        Rule("mask_token", (_E + "mask_token",), _MASK, "model", When("mask_token")),
        fill(_E + "mask_token", lambda c: (1, 1, c.width), ~When("mask_token")),
        Rule("patch_embed.weight", (_E + "patch_embeddings.weight",), IDENTITY),
        Rule("patch_embed.bias", (_E + "patch_embeddings.bias",), IDENTITY),
        Rule("blocks.{i}.norm1.weight", (_B + "norm1.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm1.bias", (_B + "norm1.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.qkv.weight", tuple(_A + f"{n}_proj.weight" for n in "qkv"), QKV_CONCAT, "block"),
        Rule("blocks.{i}.attn.qkv.bias", tuple(_A + f"{n}_proj.bias" for n in "qkv"), QKV_CONCAT, "block",
             When("qkv_bias") & When("key_bias")),
        Rule("blocks.{i}.attn.qkv.bias", (_A + "q_proj.bias", _A + "v_proj.bias"), Q_V_BIAS, "block",
             When("qkv_bias") & ~When("key_bias")),
        Rule("blocks.{i}.attn.proj.weight", (_A + "o_proj.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.bias", (_A + "o_proj.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.ls1.gamma", (_B + "layer_scale1.lambda1",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.weight", (_B + "norm2.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.bias", (_B + "norm2.bias",), IDENTITY, "block"),
        *(Rule(f"blocks.{{i}}.mlp.fc1.{p}", (_B + f"mlp.up_proj.{p}",), IDENTITY, "block", PLAIN_MLP)
          for p in ("weight", "bias")),
        *(Rule(f"blocks.{{i}}.mlp.fc1.{p}", (_B + f"mlp.gate_proj.{p}", _B + f"mlp.up_proj.{p}"), GLU_CONCAT,
               "block", SWIGLU) for p in ("weight", "bias")),
        Rule("blocks.{i}.mlp.fc2.weight", (_B + "mlp.down_proj.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.bias", (_B + "mlp.down_proj.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.ls2.gamma", (_B + "layer_scale2.lambda1",), IDENTITY, "block"),
        Rule("norm.weight", ("norm.weight",), IDENTITY),
        Rule("norm.bias", ("norm.bias",), IDENTITY),
    )


#: Where ``DINOv3ViTConfig`` holds each field; the heads, activation, epsilon and rotary base are its
#: constructor arguments (with its defaults), which a weights file without config.json does not record.
CARRIES = (
    heads_carry("num_attention_heads", "num_attention_heads"),
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="DINOv3's attention width is the hidden size"),
    act_carry("gelu"),
    eps_carry(1e-5),
    Carry("qkv_bias"), Carry("key_bias"), Carry("mlp"), Carry("num_reg_tokens"),
    Carry("layer_scale", values=(True,), why="Hugging Face DINOv3 always has layer_scale1/2"),
    Carry("mask_token", hardcoded="DINOv3ViTModel always has a mask_token (masked training only): written as zeros",
          default=True),
    Carry("abs_pos_embed", values=(False,), why="DINOv3's positions are rotary only"),
    Carry("rope", values=("dinov3",), why="DINOv3ViTModel always rotates its patch tokens"),
    Carry("rope_theta", key="rope_theta", argument="rope_theta", default=100.0,
          check=("a positive number", lambda v: v > 0)),
)
_ROPE_THETA = next(c for c in CARRIES if c.field == "rope_theta")


def detect(probe: Probe) -> bool:
    s = probe.shapes
    return _E + "patch_embeddings.weight" in s and "layer.0.attention.q_proj.weight" in s


def infer_config(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    hc = config_json(probe)
    if hc.get("model_type", "dinov3_vit") != "dinov3_vit":
        raise MappingError(f"config.json model_type {hc.get('model_type')!r} is not 'dinov3_vit'", path)
    depth = count_blocks(shapes, r"^layer\.(\d+)\.", "layer.N", path)
    emb = need(shapes, _E + "patch_embeddings.weight", "hf_dinov3", path)
    if len(emb) != 4 or emb[2] != emb[3]:
        raise MappingError(f"embeddings.patch_embeddings.weight must be a square (out, in, k, k) kernel, "
                           f"got {emb}", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    q = need(shapes, _A.format(i=0) + "q_proj.weight", "hf_dinov3", path)
    heads, head_dim, act, eps = semantics(hc, probe, q[0], CARRIES)
    has = {n: _A.format(i=0) + f"{n}_proj.bias" in shapes for n in "qkvo"}
    if has["q"] != has["v"] or (has["k"] and not has["q"]):
        raise MappingError("query and value biases must come together (the canonical qkv bias holds the key's "
                           f"only beside them): q {has['q']}, k {has['k']}, v {has['v']}", path)
    if not has["o"]:
        raise MappingError("no o_proj bias (proj_bias=False): the canonical attention output has one", path)
    if not all(_B.format(i=0) + n in shapes for n in ("mlp.down_proj.bias", "mlp.up_proj.bias")):
        raise MappingError("no MLP biases (mlp_bias=False): the canonical MLP has them", path)
    gated = _B.format(i=0) + "mlp.gate_proj.weight" in shapes
    down = need(shapes, _B.format(i=0) + "mlp.down_proj.weight", "hf_dinov3", path)
    reg = need(shapes, _E + "register_tokens", "hf_dinov3", path)
    theta = _ROPE_THETA.read(hc, path)
    size = hc.get("image_size", 224)
    if type(size) is not int or size <= 0 or size % patch:  # only the rotary grid's default: any size runs
        size = patch * max(224 // patch, 1)
    return build(probe, image_size=size, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                 num_heads=heads, head_dim=head_dim, mlp_dim=down[1], num_classes=0, qkv_bias=has["q"],
                 key_bias=has["k"] or not has["q"], norm_eps=eps, act=act, layer_scale=True,
                 mask_token=True, num_reg_tokens=reg[1] if len(reg) == 3 else 0,
                 mlp="swiglu" if gated else "mlp", swiglu_unpacked=gated, abs_pos_embed=False, rope="dinov3",
                 rope_theta=float(theta))


def hf_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> dict:
    """The ``config.json`` under which transformers computes what the canonical model does."""
    return {"architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", "hidden_size": cfg.width,
            "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
            "hidden_act": ACT_TO_HF.get(cfg.act, cfg.act), "layer_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.in_chans, "query_bias": cfg.qkv_bias, "key_bias": cfg.qkv_bias and cfg.key_bias,
            "value_bias": cfg.qkv_bias, "proj_bias": True, "mlp_bias": True, "layerscale_value": 1.0,
            "use_gated_mlp": cfg.mlp == "swiglu", "num_register_tokens": cfg.num_reg_tokens,
            "attention_dropout": 0.0, "drop_path_rate": 0.0, "initializer_range": 0.02, "dtype": "float32"}


def write_notes(cfg: ViTConfig) -> List[str]:
    return ["load with transformers.DINOv3ViTModel.from_pretrained(dir): pooler_output is the class token "
            "after the final norm; any input size runs (RoPE is computed from the grid)"]


register(Layout(name="hf_dinov3", target="hf", description="Hugging Face DINOv3ViTModel", table=lambda cfg: _table(),
                detect=detect, infer=infer_config, carries=CARRIES, containers=("dir",), directory_config=hf_config,
                directory_files=hf_files, preprocessing=DINOV3, write_notes=write_notes,
                restates=("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size", "num_channels",
                          "num_register_tokens", "use_gated_mlp", "query_bias", "value_bias", "key_bias"),
                loads_with={"dir": "transformers.DINOv3ViTModel.from_pretrained('{path}')"}))
