"""Hugging Face ``Aimv2VisionModel`` directories <-> canonical.

Keys are what ``save_pretrained`` writes: ``embeddings.{patch_embed (a Conv2d with a bias),
rms_norm, position_embedding.weight ((N, D): an nn.Embedding, no batch axis, no class row)}``,
``encoder.layers.{i}.{rms_norm1, attention.{q,k,v,out}_proj, rms_norm2,
ffn.{gate,up,down}_proj}``, ``rms_norm``, and with ``use_head`` the ``head.{cls_token, k_proj,
v_proj, output_proj}``.

Semantics (``modeling_aimv2.py``): every norm is ``Aimv2RMSNorm`` (weight only, statistics in
float32, ``rms_norm_eps``), the patch embeddings are normalised before the table is added; no
class token; ``qkv_bias`` gives q/k/v *and* ``out_proj`` their biases (and the head's k/v);
``mlp_bias`` the three MLP linears; the MLP is ``down(act(gate) * up)`` whatever ``hidden_act``
(canonical SwiGLU with ``fc1`` = [gate; up], stored unpacked). ``pooler_output`` is
``Aimv2AttentionPoolingHead`` over the normalised tokens: the probe ``cls_token`` itself is the
query (no projection), then ``output_proj`` (always a bias) and nothing else: not SigLIP's MAP
head, so the canonical ``pool_head='aimv2'``. Without a head ``pooler_output`` is None; the
model reads as timm's AIMv2 pooling (the mean of the normalised tokens), which ``last_hidden_state``
gives. transformers never resizes the learned table (``is_native=False``): another resolution
fails there; the converted model resizes timm's way (bicubic, antialiased), what timm's AIMv2
does with the same table. ``is_native=True`` stores no table: transformers generates a 2-D
sin-cos one for each grid (``pos_resize='sincos2d_aimv2'``, :func:`vitconv.ops.posemb_sincos_2d_aimv2`),
so the resolution is config.json's ``image_size`` alone.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.ops import posemb_sincos_2d_aimv2
from vitconv.runtime.preprocess import CLIP, Usage
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.hf import ACT_TO_HF, act_carry, eps_carry, hf_files, semantics
from vitconv.layouts.inference import build, config_json, count_blocks, grid_from_tokens, heads_carry, need
from vitconv.layouts.transforms import BATCH_AXIS, GLU_CONCAT, IDENTITY, QKV_CONCAT, Q_KV_CONCAT, LayoutOp
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import MAP, When

MODEL_TYPE = "aimv2_vision_model"
#: ``is_native``: no table stored; generated for the model's grid when read, written as nothing.
SINCOS2D_AIMV2 = LayoutOp("sincos2d_aimv2",
                          lambda arrays, cfg: posemb_sincos_2d_aimv2(cfg.grid_size, cfg.grid_size, cfg.width),
                          lambda t, cfg: [], arity=0, shapes=lambda shape, cfg: [])
_E, _B, _H = "embeddings.", "encoder.layers.{i}.", "head."
_A, _F = _B + "attention.", _B + "ffn."
#: The native sin-cos table (``is_native``): no parameter.
_NATIVE = When("pos_resize", "==", "sincos2d_aimv2")


@lru_cache(maxsize=None)
def _table() -> Tuple[Rule, ...]:
    return (
        Rule("pos_embed", (_E + "position_embedding.weight",), BATCH_AXIS, "model", ~_NATIVE),
        Rule("pos_embed", (), SINCOS2D_AIMV2, "model", _NATIVE),
        Rule("patch_embed.weight", (_E + "patch_embed.weight",), IDENTITY),
        Rule("patch_embed.bias", (_E + "patch_embed.bias",), IDENTITY),
        Rule("patch_embed_norm.weight", (_E + "rms_norm.weight",), IDENTITY),
        Rule("blocks.{i}.norm1.weight", (_B + "rms_norm1.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.qkv.weight", tuple(_A + f"{n}_proj.weight" for n in "qkv"), QKV_CONCAT, "block"),
        Rule("blocks.{i}.attn.qkv.bias", tuple(_A + f"{n}_proj.bias" for n in "qkv"), QKV_CONCAT, "block",
             When("qkv_bias")),
        Rule("blocks.{i}.attn.proj.weight", (_A + "out_proj.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.bias", (_A + "out_proj.bias",), IDENTITY, "block", When("proj_bias")),
        Rule("blocks.{i}.norm2.weight", (_B + "rms_norm2.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc1.weight", (_F + "gate_proj.weight", _F + "up_proj.weight"), GLU_CONCAT, "block"),
        Rule("blocks.{i}.mlp.fc1.bias", (_F + "gate_proj.bias", _F + "up_proj.bias"), GLU_CONCAT, "block",
             When("mlp_bias")),
        Rule("blocks.{i}.mlp.fc2.weight", (_F + "down_proj.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.bias", (_F + "down_proj.bias",), IDENTITY, "block", When("mlp_bias")),
        Rule("norm.weight", ("rms_norm.weight",), IDENTITY),
        # use_head: Aimv2AttentionPoolingHead; [k; v] split at the width, as timm's [q; kv]
        Rule("attn_pool.latent", (_H + "cls_token",), IDENTITY, "model", MAP),
        Rule("attn_pool.kv.weight", (_H + "k_proj.weight", _H + "v_proj.weight"), Q_KV_CONCAT, "model",
             MAP),
        Rule("attn_pool.kv.bias", (_H + "k_proj.bias", _H + "v_proj.bias"), Q_KV_CONCAT, "model",
             MAP & When("qkv_bias")),
        Rule("attn_pool.proj.weight", (_H + "output_proj.weight",), IDENTITY, "model", MAP),
        Rule("attn_pool.proj.bias", (_H + "output_proj.bias",), IDENTITY, "model", MAP),
    )


CARRIES = (
    heads_carry("num_attention_heads", "num_attention_heads"),
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="Aimv2's attention width is the hidden size"),
    act_carry("silu"),
    eps_carry(1e-5, "rms_norm_eps"),
    Carry("norm", values=("rmsnorm",), why="every norm of Aimv2 is Aimv2RMSNorm"),
    Carry("mlp", values=("swiglu",), why="Aimv2's MLP is down(act(gate) * up)"),
    # swiglu_unpacked: no row, a storage field: gate_proj and up_proj are always apart here
    Carry("patch_embed_norm", values=(True,), why="Aimv2 always normalises the patch embeddings"),
    Carry("class_token", values=(False,), why="Aimv2 has no class token"),
    Carry("qkv_bias", key="qkv_bias"),
    Carry("proj_bias", holds=lambda c: c.proj_bias == c.qkv_bias,
          why="Aimv2's out_proj has a bias exactly when q/k/v have one (qkv_bias)"),
    Carry("mlp_bias", key="mlp_bias"),
    Carry("classifier", values=("map", "gap"), key="use_head",
          why="Aimv2VisionModel pools with its attention head (use_head) or not at all (the tokens' mean, "
              "as timm's AIMv2)"),
    Carry("pool_head", holds=lambda c: c.classifier != "map" or c.pool_head == "aimv2",
          why="Aimv2's head is Aimv2AttentionPoolingHead (pool_head='aimv2'), not SigLIP's MAP head"),
    # is_native records the generated table; a learned one transformers never resizes
    Carry("pos_resize", key="is_native", records=("sincos2d_aimv2",),
          hardcoded="transformers' Aimv2 (is_native=False) never resizes its table: another resolution fails "
          "there; the converted model resizes as timm's AIMv2 does", default="bicubic_aa",
          holds=lambda c: c.pos_resize != "sincos2d_aimv2" or c.width % 4 == 0,
          why="AIMv2's sin-cos table needs a width that is a multiple of 4"),
)


def detect(probe: Probe) -> bool:
    s = probe.shapes
    if config_json(probe).get("model_type") not in (None, MODEL_TYPE):
        return False
    return _E + "rms_norm.weight" in s and "encoder.layers.0.ffn.gate_proj.weight" in s


def infer(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    hc = config_json(probe)
    if hc.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise MappingError(f"config.json model_type {hc.get('model_type')!r} is not {MODEL_TYPE!r}", path)
    native = _E + "position_embedding.weight" not in shapes
    if bool(hc.get("is_native", native)) != native:
        raise MappingError(f"config.json says is_native={hc['is_native']!r} but the weights "
                           f"{'lack' if native else 'have'} embeddings.position_embedding", path)
    depth = count_blocks(shapes, r"^encoder\.layers\.(\d+)\.", "encoder.layers.N", path)
    emb = need(shapes, _E + "patch_embed.weight", "hf_aimv2", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    q = need(shapes, _A.format(i=0) + "q_proj.weight", "hf_aimv2", path)
    heads, head_dim, act, eps = semantics(hc, probe, q[0], CARRIES)
    if native:  # the table is generated for the grid: only config.json says the resolution
        size = hc.get("image_size")
        size = size[0] if isinstance(size, list) and len(size) == 2 and size[0] == size[1] else size
        if type(size) is not int or size <= 0 or size % patch:
            raise MappingError("Aimv2 is_native (a sin-cos table generated for the grid, no "
                               "embeddings.position_embedding) needs config.json's square image_size, "
                               f"a multiple of the patch {patch}; got {hc.get('image_size')!r}", path)
        g = size // patch
    else:
        pos = need(shapes, _E + "position_embedding.weight", "hf_aimv2", path)
        g = grid_from_tokens(pos[0], 0, _E + "position_embedding.weight", path)
    qkv_bias = _A.format(i=0) + "q_proj.bias" in shapes
    head = _H + "cls_token" in shapes
    if "use_head" in hc and bool(hc["use_head"]) != head:
        raise MappingError(f"config.json says use_head={hc['use_head']!r} but the weights "
                           f"{'have' if head else 'lack'} head.*", path)
    return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                 num_heads=heads, head_dim=head_dim,
                 mlp_dim=need(shapes, _F.format(i=0) + "gate_proj.weight", "hf_aimv2", path)[0],
                 classifier="map" if head else "gap", class_token=False, num_classes=0, qkv_bias=qkv_bias,
                 proj_bias=qkv_bias, mlp_bias=_F.format(i=0) + "down_proj.bias" in shapes, norm_eps=float(eps),
                 act=act, norm="rmsnorm", mlp="swiglu", swiglu_unpacked=True, patch_embed_norm=True,
                 pool_head="aimv2" if head else "siglip",
                 pos_resize="sincos2d_aimv2" if native else "bicubic_aa")


def hf_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> dict:
    """The ``config.json`` under which transformers computes what the canonical model does."""
    return {"architectures": ["Aimv2VisionModel"], "model_type": MODEL_TYPE, "hidden_size": cfg.width,
            "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.depth,
            "num_attention_heads": cfg.num_heads, "num_channels": cfg.in_chans, "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "hidden_act": ACT_TO_HF[cfg.act], "rms_norm_eps": cfg.norm_eps,
            "qkv_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias, "use_head": cfg.classifier == "map",
            "is_native": cfg.pos_resize == "sincos2d_aimv2", "attention_dropout": 0.0, "initializer_range": 0.02, "dtype": "float32"}


def write_notes(cfg: ViTConfig) -> list:
    if cfg.classifier == "map":
        return ["Aimv2VisionModel: pooler_output is the attention head's output, as the canonical model's"]
    return ["Aimv2VisionModel without a head (use_head=False): pooler_output is None; the canonical model's "
            "output is last_hidden_state.mean(1)"]


register(Layout(name="hf_aimv2", target="hf", description="Hugging Face Aimv2VisionModel", table=lambda cfg: _table(),
                detect=detect, infer=infer, carries=CARRIES, containers=("dir",), directory_config=hf_config,
                directory_files=hf_files, preprocessing=CLIP, write_notes=write_notes,
                restates=("hidden_size", "num_hidden_layers", "intermediate_size", "image_size", "patch_size",
                          "num_channels", "qkv_bias", "mlp_bias", "use_head"),
                loads_with={"dir": "transformers.Aimv2VisionModel.from_pretrained('{path}')"}))
