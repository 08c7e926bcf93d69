"""timm ``Eva`` state dicts of the DINOv3 models (``vit_*_patch16_dinov3[_qkvb]``,
``vit_small_plus`` / ``huge_plus`` / ``7b``: ``rope_type='dinov3'``) <-> canonical.

Keys (``timm/models/eva.py``, ``Eva`` with ``qkv_fused=True``, ``use_abs_pos_emb=False``):
``cls_token``, ``reg_token`` (DINOv3's four storage tokens), ``patch_embed.proj``,
``blocks.{i}.{gamma_1, gamma_2, norm1, attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj, norm2,
mlp.fc1 | mlp.fc1_g + mlp.fc1_x, mlp.fc2}``, ``norm`` (or ``fc_norm``), ``head``. There is no
position table and no rotary tensor: the rotation is computed from the grid (``rope`` and
``rope_theta``, timm's ``rope_type`` and ``rope_temperature``, which a bare state dict does not
record). Eva's attention has query and value biases only (``k_bias`` is a non-persistent zero
buffer): the canonical ``qkv.bias`` is ``[q_bias; 0; v_bias]`` with ``key_bias=False``. The
SwiGLU models use timm's unpacked ``SwiGLU`` (``swiglu_align_to`` set): ``fc1_g`` is the SiLU'd
gate, ``fc1_x`` the up projection, the canonical ``fc1`` their rows stacked [gate; up].

Semantics: LayerScale (``gamma_1``/``gamma_2``) on both branches; LayerNorm eps 1e-5 (the DINOv3
architectures' ``norm_layer``; Eva's own default is 1e-6); exact GELU (Eva's ``Mlp`` takes no
activation argument) or a SiLU gate; ``global_pool`` 'avg' by default (the mean of the patch
tokens after the final norm; prefix tokens left out) or 'token' (upstream DINOv3, LingBot).
RoPE rotates the patch tokens' queries and keys only (class and storage tokens unrotated).

Other ``Eva`` forms are refused, naming what is not supported yet: an absolute position table
(EVA, EVA-02, ``*_rope_ape_*``, Perception Encoder), separate q/k/v projections and sub-LNs
(EVA-02), learned per-head frequencies (``rope_mixed``), and timm's ``*_rope_*`` models without
a class token or registers (EVA-style ``cat`` rotary embeddings).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from ..config import ViTConfig
from ..errors import MappingError
from ..preprocess import Usage
from .base import Carry, Rule
from .inference import build, config_json, count_blocks, heads_carry, heads_from_attn_dim, need
from .layout import GLU_CONCAT, IDENTITY, Q_V_BIAS
from .registry import Layout, Probe, register

_B = "blocks.{i}."


@lru_cache(maxsize=None)
def _table(norm_key: str) -> Tuple[Rule, ...]:
    rows = [Rule("cls_token", ("cls_token",), IDENTITY),
            Rule("reg_token", ("reg_token",), IDENTITY),
            Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
            Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY)]
    for canonical, key, when, op in (
            ("ls1.gamma", "gamma_1", "always", IDENTITY), ("ls2.gamma", "gamma_2", "always", IDENTITY),
            ("norm1.weight", "norm1.weight", "always", IDENTITY), ("norm1.bias", "norm1.bias", "always", IDENTITY),
            ("attn.qkv.weight", "attn.qkv.weight", "always", IDENTITY),
            ("attn.proj.weight", "attn.proj.weight", "always", IDENTITY),
            ("attn.proj.bias", "attn.proj.bias", "always", IDENTITY),
            ("norm2.weight", "norm2.weight", "always", IDENTITY), ("norm2.bias", "norm2.bias", "always", IDENTITY),
            ("mlp.fc1.weight", "mlp.fc1.weight", "mlp=mlp", IDENTITY),
            ("mlp.fc1.bias", "mlp.fc1.bias", "mlp=mlp", IDENTITY),
            ("mlp.fc2.weight", "mlp.fc2.weight", "always", IDENTITY),
            ("mlp.fc2.bias", "mlp.fc2.bias", "always", IDENTITY)):
        rows.append(Rule(_B + canonical, (_B + key,), op, "block", when))
    rows += [Rule(_B + "attn.qkv.bias", (_B + "attn.q_bias", _B + "attn.v_bias"), Q_V_BIAS, "block", "qkv_bias"),
             Rule(_B + "mlp.fc1.weight", (_B + "mlp.fc1_g.weight", _B + "mlp.fc1_x.weight"), GLU_CONCAT, "block",
                  "mlp=swiglu"),
             Rule(_B + "mlp.fc1.bias", (_B + "mlp.fc1_g.bias", _B + "mlp.fc1_x.bias"), GLU_CONCAT, "block",
                  "mlp=swiglu"),
             Rule("norm.weight", (f"{norm_key}.weight",), IDENTITY, "model", "final_norm!=none"),
             Rule("norm.bias", (f"{norm_key}.bias",), IDENTITY, "model", "final_norm!=none"),
             Rule("head.weight", ("head.weight",), IDENTITY, "model", "num_classes"),
             Rule("head.bias", ("head.bias",), IDENTITY, "model", "num_classes")]
    return tuple(rows)


def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
    return _table("fc_norm" if cfg.final_norm == "pooled" else "norm")


def _eva_act(cfg: ViTConfig) -> str:
    return "silu" if cfg.mlp == "swiglu" else "gelu"


CARRIES = (
    heads_carry("num_heads", "model_args.num_heads"),
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="timm Eva's attention width is the embedding width"),
    Carry("act", holds=lambda c: c.act == _eva_act(c),
          why="timm's Eva takes no activation: exact GELU, or a SiLU gate in its SwiGLU"),
    # a directory records it through its architecture's norm_layer (every DINOv3 architecture: 1e-5)
    Carry("norm_eps", key="architecture", records=(1e-5,), argument="norm_layer", default=1e-5),
    Carry("qkv_bias"),
    Carry("key_bias", holds=lambda c: not c.qkv_bias or not c.key_bias,
          why="timm's Eva has query and value biases only (its k_bias is a zero buffer)"),
    Carry("layer_scale", values=(True,), why="the DINOv3 Eva models always have LayerScale (gamma_1/gamma_2)"),
    Carry("class_token", values=(True,), why="DINOv3 has a class token"),
    Carry("num_reg_tokens", holds=lambda c: c.num_reg_tokens > 0,
          why="DINOv3 has storage (register) tokens; timm's *_rope_* Eva models without them rotate otherwise"),
    Carry("classifier", values=("token", "gap"), key="model_args.global_pool", argument="global_pool",
          default="gap", why="timm's Eva pools the class token or the patch tokens' mean here"),
    Carry("final_norm"),
    Carry("mlp"),
    Carry("abs_pos_embed", values=(False,), why="a timm Eva with a position table (EVA, EVA-02, *_rope_ape_*, "
          "Perception Encoder) is not supported yet; DINOv3 has none"),
    Carry("rope", values=("dinov3",), key="model_args.rope_type", argument="rope_type", default="dinov3",
          why="only DINOv3's rotary form is supported in the timm Eva layout yet"),
    Carry("rope_theta", key="model_args.rope_temperature", argument="rope_temperature", default=100.0),
)

#: Keys only the Eva class writes (its own LayerScale, bias and MLP names, rotary frequencies).
_EVA_MARKERS = ("blocks.0.gamma_1", "blocks.0.attn.q_bias", "blocks.0.mlp.fc1_g.weight",
                "blocks.0.attn.q_proj.weight", "rope.freqs")


def detect(probe: Probe) -> bool:
    """An Eva state dict that timm's ``VisionTransformer`` table cannot be (no position table, or
    no fused qkv): every such Eva form is this layout's, to read or to refuse by name."""
    s = probe.shapes
    if "patch_embed.proj.weight" not in s or not any(k in s for k in _EVA_MARKERS):
        return False
    if any(k.endswith("relative_position_bias_table") for k in s):  # BEiT's (timm_beit)
        return False
    table = "pos_embed" in s or "pos_embedding.pos_embedding" in s  # timm's and the PositionEmbs variant's
    return not table or "blocks.0.attn.qkv.weight" not in s


def _not_yet(probe: Probe) -> Optional[str]:
    """What Eva form other than DINOv3's the keys show, in words; None for DINOv3's."""
    s = probe.shapes
    if "pos_embed" in s:
        return "an absolute position table (EVA, EVA-02, *_rope_ape_*, Perception Encoder)"
    if "rope.freqs" in s:
        return "learned per-head rotary frequencies (rope_mixed)"
    if any(k.startswith("blocks.0.") and k.endswith(n) for k in s
           for n in ("attn.norm.weight", "mlp.norm.weight", "attn.q_norm.weight", "attn.k_norm.weight")):
        return "sub-LayerNorms or qk-norm inside attention/MLP (EVA-02, Sapiens2)"
    if "blocks.0.attn.q_proj.weight" in s:
        return "separate q/k/v projections (EVA-02)"
    if "cls_token" not in s or "reg_token" not in s:
        return "timm's *_rope_* models without a class token or registers (EVA-style 'cat' rotary embeddings)"
    if "blocks.0.gamma_1" not in s:
        return "an Eva without LayerScale (not a DINOv3 model)"
    return None


def _model_args(probe: Probe) -> Dict[str, Any]:
    d = config_json(probe)
    if "architecture" not in d:
        return {}
    args = d.get("model_args", {})
    if not isinstance(args, dict):
        raise MappingError("config.json: model_args is not an object", probe.path)
    return args


def infer_config(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    other = _not_yet(probe)
    if other is not None:
        raise MappingError(f"a timm Eva with {other}: vitconv does not compute this feature yet (only DINOv3's "
                           "form, rope_type='dinov3', converts)", path)
    args = _model_args(probe)
    for name, want in (("rope_type", "dinov3"), ("use_abs_pos_emb", False), ("use_rot_pos_emb", True),
                       ("qkv_fused", True), ("rope_rotate_half", True)):
        if name in args and args[name] != want:
            raise MappingError(f"config.json: {name}={args[name]!r}: only DINOv3's rotary form "
                               f"({name}={want!r}) is supported yet", path)
    theta = args.get("rope_temperature", 100.0)
    if type(theta) not in (int, float) or not (math.isfinite(theta) and theta > 0):
        raise MappingError(f"config.json: rope_temperature {theta!r} is not a positive number", path)
    depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
    emb = need(shapes, "patch_embed.proj.weight", "timm_eva", path)
    if len(emb) != 4 or emb[2] != emb[3]:
        raise MappingError(f"patch_embed.proj.weight must be a square (out, in, k, k) kernel, got {emb}", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    qkv = need(shapes, "blocks.0.attn.qkv.weight", "timm_eva", path)
    if qkv[0] != 3 * width:
        raise MappingError(f"attn.qkv.weight {qkv}: timm Eva's attention width must equal the embedding "
                           f"width {width}", path)
    recorded = args.get("num_heads")
    if recorded is not None and type(recorded) is not int:
        raise MappingError(f"config.json: num_heads {recorded!r} is not an integer", path)
    heads, head_dim = heads_from_attn_dim(width, probe, recorded)
    swiglu = "blocks.0.mlp.fc1_g.weight" in shapes
    fc2 = need(shapes, "blocks.0.mlp.fc2.weight", "timm_eva", path)
    reg = need(shapes, "reg_token", "timm_eva", path)
    pool = args.get("global_pool", "avg")
    if pool not in ("avg", "token"):
        raise MappingError(f"config.json: global_pool {pool!r}: the canonical model pools 'avg' or 'token'", path)
    final = "pooled" if "fc_norm.weight" in shapes else ("encoder" if "norm.weight" in shapes else "none")
    head = shapes.get("head.weight")
    size = args.get("img_size")  # no position table: the weights do not say (DINOv3 pretrained at 224)
    if type(size) is not int or size <= 0 or size % patch:
        size = patch * max(224 // patch, 1)
    return build(probe, image_size=size,
                 patch_size=patch, in_chans=in_chans, width=width, depth=depth, num_heads=heads, head_dim=head_dim,
                 mlp_dim=fc2[1], classifier="token" if pool == "token" else "gap", num_classes=head[0] if head else 0,
                 qkv_bias="blocks.0.attn.q_bias" in shapes, key_bias=False, norm_eps=1e-5,
                 act="silu" if swiglu else "gelu", final_norm=final, layer_scale=True,
                 num_reg_tokens=reg[1] if len(reg) == 3 else 0, mlp="swiglu" if swiglu else "mlp",
                 abs_pos_embed=False, rope="dinov3", rope_theta=float(theta))


# --------------------------------------------------------------------------- writing
def architecture(cfg: ViTConfig) -> str:
    """A DINOv3 architecture whose defaults hold what JSON cannot say (the LayerNorm's eps 1e-5,
    ``rope_type='dinov3'``); ``model_args`` override every size and flag."""
    return "vit_small_plus_patch16_dinov3" if cfg.mlp == "swiglu" else "vit_small_patch16_dinov3"


def model_args(cfg: ViTConfig) -> Dict[str, Any]:
    """Keyword arguments under which timm's ``Eva`` computes what the canonical model does.
    SwiGLU needs ``swiglu_align_to`` set (else Eva packs fc1): the MLP width is reached as
    ``int(width * mlp_ratio)`` rounded up to it."""
    kw: Dict[str, Any] = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                              num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth,
                              num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias, init_values=1e-5,
                              global_pool="token" if cfg.classifier == "token" else "avg",
                              use_fc_norm=cfg.final_norm == "pooled",
                              use_post_transformer_norm=cfg.final_norm == "encoder",
                              num_reg_tokens=cfg.num_reg_tokens, use_abs_pos_emb=False, use_rot_pos_emb=True,
                              rope_type="dinov3", rope_temperature=cfg.rope_theta, rope_rotate_half=True,
                              dynamic_img_size=True)
    if cfg.mlp == "swiglu":
        kw.update(swiglu_mlp=True, mlp_ratio=cfg.mlp_dim / cfg.width, swiglu_align_to=8 if cfg.mlp_dim % 8 == 0 else 1)
    else:
        kw.update(swiglu_mlp=False, mlp_ratio=cfg.mlp_dim / cfg.width)
    return kw


def write_notes(cfg: ViTConfig) -> List[str]:
    call = ", ".join(f"{k}={v!r}" for k, v in model_args(cfg).items())
    notes = [f"timm: Eva({call}, norm_layer=partial(LayerNorm, eps={cfg.norm_eps:g})) computes the same function"]
    if cfg.norm_eps != 1e-5:
        notes.append(f"LayerNorm eps {cfg.norm_eps:g}: no DINOv3 architecture's default; a timm directory's "
                     "config.json cannot say it, so build the model with the norm_layer above")
    return notes


def eva_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> Dict[str, Any]:
    """``config.json`` of a timm model directory: ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    pretrained: Dict[str, Any] = {"input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
                                  "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj",
                                  "classifier": "head"}
    if usage is not None:
        pretrained.update(usage.preprocessing.timm_cfg())
        if usage.labels:
            pretrained["label_names"] = list(usage.labels)
    return {"architecture": architecture(cfg), "num_classes": cfg.num_classes, "num_features": cfg.width,
            "model_args": model_args(cfg), "pretrained_cfg": pretrained}


def named_arch(probe: Probe) -> Optional[str]:
    name = config_json(probe).get("architecture")
    return name if isinstance(name, str) else None


def read_notes(cfg: ViTConfig, probe: Probe) -> List[str]:
    said = "config.json's img_size" if isinstance(_model_args(probe).get("img_size"), int) else \
        "assumed: DINOv3's pretraining size (no position table records it)"
    return [f"RoPE {cfg.rope} (theta {cfg.rope_theta:g}) computed from the grid at any input size; the native "
            f"size {cfg.image_size} is {said}: --image-size sets another"]


def sources(cfg: ViTConfig) -> Dict[str, str]:
    return {"mlp": "mlp.fc1_g/fc1_x (SwiGLU) or mlp.fc1", "qkv_bias": "attn.q_bias and attn.v_bias",
            "key_bias": "none: Eva's k_bias is a zero buffer", "abs_pos_embed": "no pos_embed",
            "num_reg_tokens": "reg_token [1]", "width": "patch_embed.proj.weight [0]",
            "patch_size": "patch_embed.proj.weight [2]", "mlp_dim": "blocks.0.mlp.fc2.weight [1]",
            "final_norm": "norm (encoder) or fc_norm (pooled)"}


register(Layout(name="timm_eva", target="timm", description="timm Eva state dict (DINOv3, rope_type='dinov3')",
                table=table, detect=detect, infer=infer_config, carries=CARRIES,
                containers=("safetensors", "pt", "dir"), names_arch=named_arch, directory_config=eva_config,
                restates=("num_classes", "model_args.num_classes", "model_args.embed_dim", "model_args.depth",
                          "model_args.patch_size", "model_args.in_chans"),
                write_notes=write_notes, read_notes=read_notes, sources=sources,
                loads_with={"dir": "timm.create_model('local-dir:{path}', pretrained=True)"}))
