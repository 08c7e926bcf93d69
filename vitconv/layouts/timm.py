"""timm ``VisionTransformer`` state dicts <-> canonical, and the timm-derived variant whose
position table sits in a ``PositionEmbs`` wrapper (``pos_embedding.pos_embedding``).

One table for every flag of timm's ``VisionTransformer`` that vitconv models: ``class_token``,
``reg_tokens`` (``reg_token``, after the class token), ``no_embed_class`` (a position table
without prefix rows, the prefix tokens concatenated after it is added), ``pre_norm``
(``norm_pre``, and then no patch bias: timm ties ``bias = not pre_norm``), ``init_values``
(``ls1``/``ls2.gamma``), ``mlp_layer=SwiGLUPacked`` (``fc1`` = [gate; up], the gate SiLU'd),
``global_pool`` 'token' / 'avg' (the mean of the patch tokens, registers and class token left
out, normalised after pooling with ``fc_norm``, or before it with ``fc_norm=False``) / 'map'
(``attn_pool``: ``latent``, ``q`` and ``kv`` ([k; v]) that the canonical ``qkv`` holds as
[q; k; v], ``proj``, ``norm``, ``mlp``; over the patch tokens only unless ``pool_include_prefix``,
canonical ``map_prefix``), DeiT's ``dist_token`` and ``head_dist`` (logits are
the mean of both heads in eval mode), the ``pre_logits.fc`` (Linear + Tanh) of timm < 0.9, and
AIMv2's (``aimv2_*``): ``norm_layer=RmsNorm`` (a weight-only norm everywhere, qk-norm and the
pooling head's included), ``proj_bias=False`` (no attention-projection or MLP biases: timm ties
the two), ``embed_norm_layer`` (``patch_embed.norm``, before the table is added) and
``mlp_layer=SwiGLU`` (``fc1_g``, the gate, and ``fc1_x`` apart: concatenated into the canonical
``fc1``); and ``qk_norm=True`` (``attn.q_norm``/``k_norm``: the model's norm over each head).

A bare state dict records none of the constructor's semantic arguments: the heads, the
activation, the epsilon, how the table is resized at another resolution (timm: bicubic
with antialiasing) and, for a class token without ``fc_norm``, the pooling are the carries'
arguments, which a timm directory's ``config.json`` keeps (``model_args``). Refused on reading,
naming the reason: timm's hybrid backbones, and the poolings the canonical model does not
compute (``global_pool`` 'avgmax', 'max' or '', a mean that includes the prefix tokens, the
class token normalised after pooling).
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from vitconv import archs
from vitconv.config import ACTIVATIONS, ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import Usage
from vitconv.layouts.table import Carry, Rule, fill
from vitconv.layouts.inference import (TIMM_GLOBAL_POOL, TIMM_MAP_PREFIX, build, config_json, count_blocks,
                                       heads_carry, heads_from_attn_dim, need, timm_directory_config, timm_map_prefix,
                                       timm_model_args, timm_named_arch, timm_pool_carry, timm_pooling,
                                       timm_recorded_heads)
from vitconv.layouts.transforms import GLU_CONCAT, IDENTITY, Q_KV_CONCAT
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import ALWAYS, FINAL_NORM, LAYERNORM, MAP, When

POS_KEYS = {"timm": "pos_embed", "timm_posembs": "pos_embedding.pos_embedding"}
_B = "blocks.{i}."
_P = "attn_pool."


@lru_cache(maxsize=None)
def _table(pos_key: str, norm_key: str) -> Tuple[Rule, ...]:
    """One table for both directions; ``norm_key`` is ``norm`` or timm's ``fc_norm``."""
    rows = [Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
            Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY, "model", When("patch_bias")),
            Rule("cls_token", ("cls_token",), IDENTITY, "model", When("class_token")),
            Rule("dist_token", ("dist_token",), IDENTITY, "model", When("distilled")),
            Rule("reg_token", ("reg_token",), IDENTITY, "model", When("num_reg_tokens")),
            Rule("pos_embed", (pos_key,), IDENTITY),
            Rule("norm_pre.weight", ("norm_pre.weight",), IDENTITY, "model", When("norm_pre")),
            Rule("norm_pre.bias", ("norm_pre.bias",), IDENTITY, "model", When("norm_pre") & LAYERNORM),
            # AIMv2 (embed_norm_layer): PatchEmbed's own norm, after the projection
            Rule("patch_embed_norm.weight", ("patch_embed.norm.weight",), IDENTITY, "model", When("patch_embed_norm")),
            Rule("patch_embed_norm.bias", ("patch_embed.norm.bias",), IDENTITY, "model",
                 When("patch_embed_norm") & LAYERNORM)]
    ln = LAYERNORM  # RmsNorm has a weight only
    for name, when in (("norm1.weight", ALWAYS), ("norm1.bias", ln),
                       ("attn.qkv.weight", ALWAYS), ("attn.qkv.bias", When("qkv_bias")),
                       ("attn.q_norm.weight", When("qk_norm")), ("attn.q_norm.bias", When("qk_norm") & ln),
                       ("attn.k_norm.weight", When("qk_norm")), ("attn.k_norm.bias", When("qk_norm") & ln),
                       ("attn.proj.weight", ALWAYS), ("attn.proj.bias", When("proj_bias")),
                       ("ls1.gamma", When("layer_scale")),  # DeiT-3, DINOv2 (init_values)
                       ("norm2.weight", ALWAYS), ("norm2.bias", ln),
                       ("mlp.fc1.weight", ~When("swiglu_unpacked")),
                       ("mlp.fc1.bias", ~When("swiglu_unpacked") & When("mlp_bias")),
                       ("mlp.fc2.weight", ALWAYS), ("mlp.fc2.bias", When("mlp_bias")),
                       ("ls2.gamma", When("layer_scale"))):
        rows.append(Rule(_B + name, (_B + name,), IDENTITY, "block", when))
    # timm SwiGLU (AIMv2): the gate and up linears apart, fc1_g the gate
    rows += [Rule(_B + "mlp.fc1." + p, (_B + "mlp.fc1_g." + p, _B + "mlp.fc1_x." + p), GLU_CONCAT, "block",
                  When("swiglu_unpacked") & (When("mlp_bias") if p == "bias" else ALWAYS)) for p in ("weight", "bias")]
    rows += [Rule("norm.weight", (f"{norm_key}.weight",), IDENTITY, "model", FINAL_NORM),
             Rule("norm.bias", (f"{norm_key}.bias",), IDENTITY, "model", FINAL_NORM & ln),
             # SigLIP (global_pool='map')
             Rule(_P + "latent", (_P + "latent",), IDENTITY, "model", MAP),
             Rule(_P + "qkv.weight", (_P + "q.weight", _P + "kv.weight"), Q_KV_CONCAT, "model", MAP),
             Rule(_P + "qkv.bias", (_P + "q.bias", _P + "kv.bias"), Q_KV_CONCAT, "model", MAP),
             *(Rule(_P + n, (_P + n,), IDENTITY, "model", MAP & (ln if n == "norm.bias" else ALWAYS))
               for n in ("proj.weight", "proj.bias", "norm.weight", "norm.bias", "mlp.fc1.weight",
                         "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")),
             Rule("pre_logits.weight", ("pre_logits.fc.weight",), IDENTITY, "model", When("representation_size")),
             Rule("pre_logits.bias", ("pre_logits.fc.bias",), IDENTITY, "model", When("representation_size")),
             Rule("head.weight", ("head.weight",), IDENTITY, "model", When("num_classes")),
             Rule("head.bias", ("head.bias",), IDENTITY, "model", When("num_classes") & When("head_bias")),
             fill("head.bias", lambda c: (c.num_classes,), When("num_classes") & ~When("head_bias")),  # CLIP's proj
             *(Rule(f"head_dist.{p}", (f"head_dist.{p}",), IDENTITY, "model", When("distilled") & When("num_classes"))
               for p in ("weight", "bias"))]
    return tuple(rows)


def table_for(layout: str):
    def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
        # timm normalises the pooled vector with fc_norm only in avg-pool models
        return _table(POS_KEYS[layout], "fc_norm" if cfg.final_norm == "pooled" else "norm")
    return table


def carries(layout: str) -> Tuple[Carry, ...]:
    """What a timm ``VisionTransformer`` holds; ``key``: where a timm directory's config.json
    records a constructor argument (``model_args``); the timm-derived variant has none."""
    def key(name: str) -> Optional[str]:
        return f"model_args.{name}" if layout == "timm" else None

    return (
        heads_carry("num_heads", key("num_heads")),
        Carry("head_dim", holds=lambda c: c.attn_dim == c.width,
              why="timm's attention width is the embedding width"),
        Carry("act", values=ACTIVATIONS, key=key("act_layer"), argument="act_layer",
              default=lambda c: "silu" if c.mlp == "swiglu" else "gelu"),
        # a directory records 1e-5 or 1e-6 through its architecture's norm_layer (architecture())
        Carry("norm_eps", key="architecture" if layout == "timm" else None, records=(1e-6, 1e-5),
              argument="norm_layer", default=1e-6),
        Carry("pos_resize", hardcoded="timm resizes position tables bicubic with antialiasing "
              "(resample_abs_pos_embed): the native resolution is unaffected", default="bicubic_aa"),
        timm_pool_carry("cls_token", key("global_pool")), Carry("class_token"), Carry("final_norm"),
        Carry("representation_size", not_in_dir="timm's create_model(pretrained=True) drops pre_logits "
              "without a word, and its model has no such layer: the output would change"),
        Carry("qkv_bias"), Carry("distilled"), Carry("layer_scale"), Carry("num_reg_tokens"),
        Carry("pos_embed_prefix", values=("all", "none"),
              why="timm's position table has rows for every prefix token or none (no_embed_class)"),
        Carry("norm_pre"), Carry("mlp"),
        # RmsNorm (AIMv2) has a weight only: the tensors say which norm; its epsilon is norm_eps's
        Carry("norm"), Carry("patch_embed_norm"), Carry("qk_norm"), Carry("swiglu_unpacked"),
        *(Carry(f, holds=lambda c: c.proj_bias == c.mlp_bias,
                why="timm's proj_bias sets the attention projection's and the MLP's biases together")
          for f in ("proj_bias", "mlp_bias")),
        Carry("patch_bias", holds=lambda c: c.patch_bias != c.norm_pre,
              why="timm ties the patch bias to pre_norm (bias = not pre_norm)"),
        Carry("head_bias", hardcoded="timm's head always has a bias: a bias-free head (CLIP's proj) is "
              "written with a zero one, the same function", default=True),
        Carry("resnet_layers", values=(None,), why="timm's hybrid backbone has other names and semantics"),
        dataclasses.replace(TIMM_MAP_PREFIX, key=key("pool_include_prefix")),
    )


def detect(layout: str):
    pos = POS_KEYS[layout]
    return lambda probe: ("patch_embed.proj.weight" in probe.shapes and "mask_token" not in probe.shapes
                          and "blocks.0.attn.qkv.weight" in probe.shapes and pos in probe.shapes
                          and not any(k.endswith("relative_position_bias_table") for k in probe.shapes)  # Beit
                          # timm's Eva (its LayerScale and q/v bias names; or keys only Eva models have: PE)
                          and not any(k in probe.shapes for k in ("blocks.0.gamma_1", "blocks.0.attn.q_bias"))
                          and archs.layouts_with(probe.shapes) != {"timm_eva"})


def _model_args(probe: Probe) -> Dict[str, Any]:
    """``model_args`` of a timm directory's ``config.json`` over what its architecture's code
    fixes that JSON does not say: the LayerNorm epsilon of its ``norm_layer`` (from
    :mod:`vitconv.archs`; the activation follows the same row through the read's semantics);
    empty for a bare state dict."""
    args = timm_model_args(probe)
    if not args and "architecture" not in config_json(probe):
        return {}
    row = archs.table().get(timm_named_arch(probe) or "")
    implied = {"norm_eps": row.norm_eps} if row is not None and row.layout == "timm" and row.norm_eps else {}
    if isinstance(args.get("norm_layer"), str):  # a norm named in JSON: timm's class at its default eps
        implied["norm_eps"] = 1e-6
    return {**implied, **args}


def _square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def infer(layout: str):
    def infer_config(probe: Probe) -> ViTConfig:
        shapes, path = probe.shapes, probe.path
        pos_key = POS_KEYS[layout]
        if any(k.startswith("patch_embed.backbone.") for k in shapes):
            raise MappingError("timm hybrid (patch_embed.backbone.*): timm's ResNet stem differs from "
                               "Google's; convert the Google .npz instead", path)
        args = _model_args(probe)
        depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
        emb = need(shapes, "patch_embed.proj.weight", layout, path)
        if len(emb) != 4 or emb[2] != emb[3]:
            raise MappingError(f"patch_embed.proj.weight must be a square (out, in, k, k) kernel, got {emb}", path)
        width, in_chans, patch = emb[0], emb[1], emb[2]
        qkv = need(shapes, _B.format(i=0) + "attn.qkv.weight", layout, path)
        if qkv[0] != 3 * width:
            raise MappingError(f"attn.qkv.weight {qkv}: timm's attention width must equal the "
                               f"embedding width {width}", path)
        recorded = timm_recorded_heads(args, path)
        heads, head_dim = heads_from_attn_dim(qkv[0] // 3, probe, recorded)
        token = "cls_token" in shapes
        distilled = "dist_token" in shapes
        regs = shapes["reg_token"][1] if "reg_token" in shapes and len(shapes["reg_token"]) == 3 else 0
        if distilled and not token:
            raise MappingError("dist_token without cls_token: DeiT has both", path)
        if "head_dist.weight" in shapes and not distilled:
            raise MappingError("head_dist without dist_token", path)
        fc_norm = "fc_norm.weight" in shapes
        classifier = timm_pooling(shapes, args, "cls_token", path)
        pos = need(shapes, pos_key, layout, path)
        prefix = int(token) + int(distilled) + regs
        map_prefix = timm_map_prefix(args, classifier, prefix, path)
        if len(pos) != 3 or pos[0] != 1:
            raise MappingError(f"{pos_key} must be (1, tokens, width), got {pos}", path)
        no_embed_class = args.get("no_embed_class")
        if no_embed_class is None:  # rows for every prefix token, or none (no_embed_class)
            no_embed_class = not _square(pos[1] - prefix) and _square(pos[1])
        rows = pos[1] - (0 if no_embed_class else prefix)
        if not _square(rows):
            raise MappingError(f"{pos_key} {pos} holds neither {prefix} prefix row(s) plus a square "
                               "grid nor a square grid alone (no_embed_class)", path)
        unpacked = _B.format(i=0) + "mlp.fc1_g.weight" in shapes  # timm SwiGLU (AIMv2): gate and up apart
        fc2 = need(shapes, _B.format(i=0) + "mlp.fc2.weight", layout, path)
        if unpacked:
            gate = need(shapes, _B.format(i=0) + "mlp.fc1_g.weight", layout, path)
            up = need(shapes, _B.format(i=0) + "mlp.fc1_x.weight", layout, path)
            if gate != up or gate[0] != fc2[1]:
                raise MappingError(f"mlp.fc1_g {gate}, mlp.fc1_x {up} and mlp.fc2 {fc2} are not a SwiGLU", path)
            swiglu = True
        else:
            fc1 = need(shapes, _B.format(i=0) + "mlp.fc1.weight", layout, path)
            swiglu = fc1[0] == 2 * fc2[1]
            if not swiglu and fc1[0] != fc2[1]:
                raise MappingError(f"mlp.fc1 {fc1} and mlp.fc2 {fc2} are neither an MLP nor a packed SwiGLU", path)
        # a weight-only norm is timm's RmsNorm (AIMv2): its LayerNorm always has a bias here
        first = _B.format(i=0) + "norm1" if depth else ("fc_norm" if fc_norm else "norm")
        rms = f"{first}.weight" in shapes and f"{first}.bias" not in shapes
        rep = shapes["pre_logits.fc.weight"][0] if "pre_logits.fc.weight" in shapes else None
        head = shapes.get("head.weight")
        final = "pooled" if fc_norm else ("encoder" if "norm.weight" in shapes else "none")
        if args.get("final_norm") is False and final != "none":
            raise MappingError("config.json says final_norm=False but the weights have a final norm", path)
        act = args.get("act_layer") or ("silu" if swiglu else "gelu")
        if act not in ACTIVATIONS:  # timm's act_layer names are the canonical ones
            raise MappingError(f"config.json: act_layer {act!r} is not one vitconv maps "
                               f"({', '.join(sorted(ACTIVATIONS))})", path)
        return build(probe, image_size=math.isqrt(rows) * patch, patch_size=patch, in_chans=in_chans,
                     width=width, depth=depth, num_heads=heads, head_dim=head_dim, mlp_dim=fc2[1],
                     classifier=classifier, class_token=token, representation_size=rep,
                     num_classes=head[0] if head else 0,
                     qkv_bias=(_B.format(i=0) + "attn.qkv.bias") in shapes,
                     norm_eps=float(args.get("norm_eps", 1e-6)), act=act, final_norm=final, distilled=distilled,
                     layer_scale=(_B.format(i=0) + "ls1.gamma") in shapes, num_reg_tokens=regs,
                     pos_embed_prefix="none" if no_embed_class else "all",
                     norm_pre="norm_pre.weight" in shapes, patch_bias="patch_embed.proj.bias" in shapes,
                     mlp="swiglu" if swiglu else "mlp", head_bias=not head or "head.bias" in shapes,
                     pos_resize="bicubic_aa", norm="rmsnorm" if rms else "layernorm",
                     proj_bias=not depth or _B.format(i=0) + "attn.proj.bias" in shapes,
                     mlp_bias=not depth or _B.format(i=0) + "mlp.fc2.bias" in shapes,
                     patch_embed_norm="patch_embed.norm.weight" in shapes,
                     qk_norm=_B.format(i=0) + "attn.q_norm.weight" in shapes, swiglu_unpacked=unpacked,
                     map_prefix=map_prefix)
    return infer_config


def architecture(cfg: ViTConfig) -> str:
    """A registered timm model name whose defaults hold what JSON cannot say; ``model_args``
    override every size and flag. DeiT's distilled class; the SwiGLU MLP layer (DINOv2
    ViT-g's ``SwiGLUPacked``); a LayerNorm epsilon of 1e-5 (the CLIP models' ``norm_layer``)."""
    if cfg.distilled:
        return "deit_base_distilled_patch16_224"
    if cfg.swiglu_unpacked:  # timm's SwiGLU (fc1_g, fc1_x) and RmsNorm eps 1e-5: AIMv2's
        return "aimv2_large_patch14_224"
    if cfg.mlp == "swiglu":
        return "vit_giant_patch14_dinov2"
    return "vit_base_patch16_clip_224" if cfg.norm_eps == 1e-5 else "vit_base_patch16_224"


def model_args(cfg: ViTConfig) -> Dict[str, Any]:
    """Keyword arguments under which timm's constructor computes what the canonical model
    does (timm >= 1.0: ``final_norm`` needs it). An epsilon other than timm's 1e-6 needs
    ``norm_layer``, which JSON cannot hold: the write notes say so."""
    kw: Dict[str, Any] = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                              num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth,
                              num_heads=cfg.num_heads,
                              # timm's SwiGLU makes each of fc1_g, fc1_x int(width * mlp_ratio) wide
                              mlp_ratio=(cfg.mlp_dim if cfg.swiglu_unpacked else cfg.mlp_in_dim) / cfg.width,
                              qkv_bias=cfg.qkv_bias, act_layer=cfg.act)
    kw["global_pool"] = TIMM_GLOBAL_POOL[cfg.classifier]
    if not cfg.class_token:
        kw["class_token"] = False
    if cfg.classifier == "gap":
        kw["fc_norm"] = cfg.final_norm == "pooled"
    if cfg.num_reg_tokens:
        kw["reg_tokens"] = cfg.num_reg_tokens
    if TIMM_MAP_PREFIX.written.holds(cfg):
        kw[TIMM_MAP_PREFIX.argument] = cfg.map_prefix
    if cfg.pos_embed_prefix == "none":
        kw["no_embed_class"] = True
    kw["pre_norm"] = cfg.norm_pre  # explicit: the CLIP architectures default to True
    if cfg.final_norm == "none":
        kw["final_norm"] = False
    # any value creates ls1/ls2 (the weights hold the trained scales); explicit None, as the
    # DINOv2 architecture defaults to LayerScale
    kw["init_values"] = 1e-5 if cfg.layer_scale else None
    aimv2 = architecture(cfg) == "aimv2_large_patch14_224"
    if aimv2:  # its defaults differ from VisionTransformer's: say each
        kw.update(class_token=cfg.class_token, proj_bias=cfg.proj_bias, fc_norm=cfg.final_norm == "pooled")
    elif not cfg.proj_bias:
        kw["proj_bias"] = False
    if cfg.qk_norm:
        kw["qk_norm"] = True
    name = {"layernorm": "layernorm", "rmsnorm": "rmsnorm"}[cfg.norm]
    # JSON names a norm class, at timm's default eps 1e-6; AIMv2's RmsNorm eps 1e-5 is its architecture's
    arch_norm = ("rmsnorm", 1e-5) if aimv2 else ("layernorm", None)
    if (cfg.norm, cfg.norm_eps) != arch_norm and (cfg.norm != "layernorm" or aimv2) and cfg.norm_eps == 1e-6:
        kw["norm_layer"] = name
    if cfg.patch_embed_norm:
        if "norm_layer" in kw or not aimv2:
            kw["embed_norm_layer"] = name
    elif aimv2:
        kw["embed_norm_layer"] = None
    return kw


def _py(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v)


def _eps_in_directory(cfg: ViTConfig) -> bool:
    """Whether a timm directory's config.json rebuilds the norm's epsilon: 1e-6 is timm's default
    for a norm named in JSON; 1e-5 comes only with an architecture whose norm_layer has it (the CLIP
    towers' LayerNorm with a plain MLP, AIMv2's RmsNorm with its unpacked SwiGLU)."""
    if cfg.norm_eps == 1e-6:
        return True
    if cfg.norm_eps != 1e-5:
        return False
    if cfg.swiglu_unpacked:
        return cfg.norm == "rmsnorm"
    return cfg.norm == "layernorm" and cfg.mlp != "swiglu"


def write_notes(cfg: ViTConfig) -> List[str]:
    """The timm constructor call under which timm computes what the canonical model does."""
    cls = "deit.VisionTransformerDistilled" if cfg.distilled else "VisionTransformer"
    args = model_args(cfg)
    call = ", ".join(f"{k}={_py(v)}" for k, v in args.items())
    norm_cls = "RmsNorm" if cfg.norm == "rmsnorm" else "nn.LayerNorm"
    if cfg.norm_eps != 1e-6 or (cfg.norm == "rmsnorm" and "norm_layer" not in args):
        call += f", norm_layer=partial({norm_cls}, eps={cfg.norm_eps:g})"
        if cfg.patch_embed_norm:
            call += f", embed_norm_layer=partial({norm_cls}, eps={cfg.norm_eps:g})"
    if cfg.mlp == "swiglu":
        call += ", mlp_layer=" + ("SwiGLU" if cfg.swiglu_unpacked else "SwiGLUPacked")
    notes = [f"timm: {cls}({call}) computes the same function"]
    if not _eps_in_directory(cfg):
        notes.append(f"{'RmsNorm' if cfg.norm == 'rmsnorm' else 'LayerNorm'} eps {cfg.norm_eps:g}: no timm "
                     "architecture's default; a timm directory's config.json cannot say it, so build the model "
                     "with the norm_layer above")
    if cfg.final_norm == "none":
        notes.append("no final LayerNorm: timm >= 1.0 needs final_norm=False")
    if cfg.distilled:
        notes.append("DeiT: in eval mode timm returns the mean of head and head_dist, as the canonical "
                     "model does; set_distilled_training(True) returns both during training")
    if cfg.representation_size:
        notes.append("pre_logits.fc (Linear + Tanh) written as timm < 0.9 had it; current timm has no pre_logits "
                     "layer: load_state_dict(strict=True) refuses these keys, and create_model(pretrained=True) "
                     "drops them silently, which changes the output")
    return notes


def timm_config(cfg: ViTConfig, usage: Optional[Usage] = None) -> Dict[str, Any]:
    """``config.json`` of a timm model directory: :func:`model_args` under :func:`architecture`;
    Google's preprocessing ([-1, 1], squashed to size) and class names when known."""
    return timm_directory_config(cfg, usage, architecture(cfg), model_args(cfg),
                                 classifier=["head", "head_dist"] if cfg.distilled else "head")


def sources(layout: str):
    pos = POS_KEYS[layout]
    return lambda cfg: {
        "pos_embed_prefix": f"{pos} rows against the prefix tokens (no_embed_class: none)",
        "mlp": "mlp.fc1 rows against mlp.fc2 columns (twice as many: packed SwiGLU)",
        "classifier": "attn_pool (map), fc_norm or no cls_token (avg), else the class token",
        "num_reg_tokens": "reg_token [1]",
        "norm": "blocks.0.norm1 with or without a bias (RmsNorm: a weight only)",
        "qk_norm": "blocks.0.attn.q_norm", "patch_embed_norm": "patch_embed.norm",
        "swiglu_unpacked": "blocks.0.mlp.fc1_g/fc1_x (timm SwiGLU) or one fc1 (SwiGLUPacked)",
        "proj_bias": "blocks.0.attn.proj.bias", "mlp_bias": "blocks.0.mlp.fc2.bias"}


def _register(layout: str, description: str, **extra: Any) -> None:
    register(Layout(name=layout, description=description, table=table_for(layout), detect=detect(layout),
                    infer=infer(layout), carries=carries(layout), write_notes=write_notes,
                    sources=sources(layout), **extra))


_register("timm", "timm VisionTransformer state dict", containers=("safetensors", "pt", "dir"), names_arch=timm_named_arch,
          directory_config=timm_config, restates=("num_classes", "model_args.num_classes", "model_args.embed_dim",
                                                  "model_args.depth", "model_args.patch_size",
                                                  "model_args.in_chans"),
          loads_with={"dir": "timm.create_model('local-dir:{path}', pretrained=True)"})
_register("timm_posembs", "timm-derived ViT with a PositionEmbs wrapper (pos_embedding.pos_embedding)")
