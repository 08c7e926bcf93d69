"""timm ``VisionTransformer`` state dicts <-> canonical, and the timm-derived variant whose
position table sits in a ``PositionEmbs`` wrapper (``pos_embedding.pos_embedding``).

timm semantics (read direction): exact-erf GELU (``nn.GELU``), LayerNorm eps 1e-6, fused
``attn.qkv`` rows ``[q; k; v]`` head-major (the canonical order: identity rows). Pooling:
``global_pool='token'`` takes the class token after ``norm``; ``'avg'`` models without a
class token pool first and then apply ``fc_norm`` (canonical ``final_norm='pooled'``), or
apply ``norm`` to every token first when ``fc_norm=False``. timm < 0.9 (and the derived
variant) had ``pre_logits.fc`` (Linear + Tanh) = Google's ``pre_logits``; current timm has no
such layer, so such files load only into the old code.

DeiT (``VisionTransformerDistilled``): ``dist_token`` follows the class token, the position
table has rows for both, and in eval mode the logits are the mean of ``head`` on the class
token and ``head_dist`` on the distillation token (canonical ``distilled=True``).

Refused on reading, naming the reason: class-token models that average-pool
(MAE-style ``fc_norm`` with a class token: timm excludes the class token from the mean),
position tables without the class token (``no_embed_class``), hybrid backbones, and
anything else the strict audit finds unused (layer scale, register tokens, ``attn_pool``).
A bare state dict does not record the heads, the activation or the epsilon: they are
constructor arguments (the carries below), which a timm directory's ``config.json`` keeps.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from ..config import ACTIVATIONS, ViTConfig
from ..errors import MappingError
from .base import Carry, Rule
from .layout import IDENTITY
from .inference import build, config_json, count_blocks, grid_from_tokens, heads_carry, heads_from_attn_dim, need
from .registry import Layout, Probe, register

POS_KEYS = {"timm": "pos_embed", "timm_posembs": "pos_embedding.pos_embedding"}
_B = "blocks.{i}."


@lru_cache(maxsize=None)
def _table(pos_key: str, norm_key: str) -> Tuple[Rule, ...]:
    """One table for both directions; ``norm_key`` is ``norm`` or timm's ``fc_norm``."""
    rows = [Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
            Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY),
            Rule("cls_token", ("cls_token",), IDENTITY, "model", "classifier=token"),
            Rule("dist_token", ("dist_token",), IDENTITY, "model", "distilled"),
            Rule("pos_embed", (pos_key,), IDENTITY)]
    for name, when in (("norm1.weight", "always"), ("norm1.bias", "always"),
                       ("attn.qkv.weight", "always"), ("attn.qkv.bias", "qkv_bias"),
                       ("attn.proj.weight", "always"), ("attn.proj.bias", "always"),
                       ("ls1.gamma", "layer_scale"),  # DeiT-3, DINOv2 (init_values)
                       ("norm2.weight", "always"), ("norm2.bias", "always"),
                       ("mlp.fc1.weight", "always"), ("mlp.fc1.bias", "always"),
                       ("mlp.fc2.weight", "always"), ("mlp.fc2.bias", "always"),
                       ("ls2.gamma", "layer_scale")):
        rows.append(Rule(_B + name, (_B + name,), IDENTITY, "block", when))
    rows += [Rule("norm.weight", (f"{norm_key}.weight",), IDENTITY, "model", "final_norm!=none"),
             Rule("norm.bias", (f"{norm_key}.bias",), IDENTITY, "model", "final_norm!=none"),
             Rule("pre_logits.weight", ("pre_logits.fc.weight",), IDENTITY, "model", "representation_size"),
             Rule("pre_logits.bias", ("pre_logits.fc.bias",), IDENTITY, "model", "representation_size"),
             Rule("head.weight", ("head.weight",), IDENTITY, "model", "num_classes"),
             Rule("head.bias", ("head.bias",), IDENTITY, "model", "num_classes"),
             Rule("head_dist.weight", ("head_dist.weight",), IDENTITY, "model", "distilled&num_classes"),
             Rule("head_dist.bias", ("head_dist.bias",), IDENTITY, "model", "distilled&num_classes")]
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
        Carry("act", values=ACTIVATIONS, key=key("act_layer"), argument="act_layer", default="gelu"),
        Carry("norm_eps", argument="norm_layer", default=1e-6),
        Carry("classifier"), Carry("final_norm"), Carry("representation_size"), Carry("qkv_bias"),
        Carry("distilled"), Carry("layer_scale"),
        Carry("resnet_layers", values=(None,), why="timm's hybrid backbone has other names and semantics"),
    )


def detect(layout: str):
    pos = POS_KEYS[layout]
    return lambda probe: ("patch_embed.proj.weight" in probe.shapes
                          and "blocks.0.attn.qkv.weight" in probe.shapes and pos in probe.shapes)


def _model_args(probe: Probe) -> Dict[str, Any]:
    """``model_args`` of a timm directory's ``config.json``; empty for a bare state dict."""
    d = config_json(probe)
    if "architecture" not in d:
        return {}
    args = d.get("model_args", {})
    if not isinstance(args, dict):
        raise MappingError("config.json: model_args is not an object", probe.path)
    return args


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
        recorded = args.get("num_heads")
        if recorded is not None and (type(recorded) is not int):
            raise MappingError(f"config.json: num_heads {recorded!r} is not an integer", path)
        heads, head_dim = heads_from_attn_dim(qkv[0] // 3, probe, recorded)
        token = "cls_token" in shapes
        distilled = "dist_token" in shapes
        if distilled and not token:
            raise MappingError("dist_token without cls_token: DeiT has both", path)
        if "head_dist.weight" in shapes and not distilled:
            raise MappingError("head_dist without dist_token", path)
        pooled = "fc_norm.weight" in shapes
        if token and pooled:
            raise MappingError("class token with fc_norm (timm global_pool='avg' over patch tokens "
                               "only, MAE-style): the canonical 'gap' pools models without a class "
                               "token; not supported", path)
        pos = need(shapes, pos_key, layout, path)
        prefix = int(token) + int(distilled)
        n_grid = pos[1] - prefix
        if token and int(round(pos[1] ** 0.5)) ** 2 == pos[1] and int(round(n_grid ** 0.5)) ** 2 != n_grid:
            raise MappingError(f"{pos_key} {pos} has no rows for the prefix tokens (timm "
                               "no_embed_class=True); not supported", path)
        g = grid_from_tokens(pos[1], prefix, pos_key, path)
        rep = shapes["pre_logits.fc.weight"][0] if "pre_logits.fc.weight" in shapes else None
        head = shapes.get("head.weight")
        final = "pooled" if pooled else ("encoder" if "norm.weight" in shapes else "none")
        if args.get("final_norm") is False and final != "none":
            raise MappingError("config.json says final_norm=False but the weights have a final norm", path)
        act = args.get("act_layer") or "gelu"
        if act not in ACTIVATIONS:  # timm's act_layer names are the canonical ones
            raise MappingError(f"config.json: act_layer {act!r} is not one vitconv maps "
                               f"({', '.join(sorted(ACTIVATIONS))})", path)
        return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width,
                     depth=depth, num_heads=heads, head_dim=head_dim,
                     mlp_dim=need(shapes, _B.format(i=0) + "mlp.fc1.weight", layout, path)[0],
                     classifier="token" if token else "gap", representation_size=rep,
                     num_classes=head[0] if head else 0,
                     qkv_bias=(_B.format(i=0) + "attn.qkv.bias") in shapes,
                     norm_eps=1e-6, act=act, final_norm=final, distilled=distilled,
                     layer_scale=(_B.format(i=0) + "ls1.gamma") in shapes)
    return infer_config


def architecture(cfg: ViTConfig) -> str:
    """A registered timm model name whose class is the right one; ``model_args`` override
    every size, so the name only selects ``VisionTransformer`` or DeiT's distilled class."""
    return "deit_base_distilled_patch16_224" if cfg.distilled else "vit_base_patch16_224"


def model_args(cfg: ViTConfig) -> Dict[str, Any]:
    """Keyword arguments under which timm's constructor computes what the canonical model
    does (timm >= 1.0: ``final_norm`` needs it). An epsilon other than timm's 1e-6 needs
    ``norm_layer``, which JSON cannot hold: the write notes say so."""
    kw: Dict[str, Any] = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                              num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth,
                              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width,
                              qkv_bias=cfg.qkv_bias, act_layer=cfg.act)
    if cfg.classifier == "gap":
        kw.update(class_token=False, global_pool="avg", fc_norm=cfg.final_norm == "pooled")
    else:
        kw.update(global_pool="token")
    if cfg.final_norm == "none":
        kw["final_norm"] = False
    if cfg.layer_scale:  # any value creates ls1/ls2; the weights hold the trained scales
        kw["init_values"] = 1e-5
    return kw


def _py(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else repr(v)


def write_notes(cfg: ViTConfig) -> List[str]:
    """The timm constructor call under which timm computes what the canonical model does."""
    cls = "deit.VisionTransformerDistilled" if cfg.distilled else "VisionTransformer"
    call = ", ".join(f"{k}={_py(v)}" for k, v in model_args(cfg).items())
    if cfg.norm_eps != 1e-6:
        call += f", norm_layer=partial(nn.LayerNorm, eps={cfg.norm_eps:g})"
    notes = [f"timm: {cls}({call}) computes the same function"]
    if cfg.final_norm == "none":
        notes.append("no final LayerNorm: timm >= 1.0 needs final_norm=False")
    if cfg.distilled:
        notes.append("DeiT: in eval mode timm returns the mean of head and head_dist, as the canonical "
                     "model does; set_distilled_training(True) returns both during training")
    if cfg.representation_size:
        notes.append("pre_logits.fc (Linear + Tanh) written as older timm releases had it; current timm has no "
                     "pre_logits layer and refuses these keys under strict loading")
    return notes


def timm_config(cfg: ViTConfig, source_layout: Optional[str] = None) -> Dict[str, Any]:
    """``config.json`` of a timm model directory (the Hugging Face Hub layout timm writes with
    ``push_to_hf_hub``), so ``timm.create_model('local-dir:DIR', pretrained=True)`` builds the
    model with :func:`model_args` and loads ``model.safetensors``. Google checkpoints expect
    inputs scaled to [-1, 1] and resized without a crop (``vit_jax``'s eval pipeline); for
    other sources timm's defaults stand, as the source does not record its preprocessing."""
    pretrained: Dict[str, Any] = {"input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
                                  "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj",
                                  "classifier": ["head", "head_dist"] if cfg.distilled else "head"}
    if source_layout == "google":
        pretrained.update(mean=[0.5] * 3, std=[0.5] * 3, crop_pct=1.0, interpolation="bilinear")
    return {"architecture": architecture(cfg), "num_classes": cfg.num_classes,
            "num_features": cfg.width, "model_args": model_args(cfg), "pretrained_cfg": pretrained}




def _register(layout: str, description: str, **extra: Any) -> None:
    register(Layout(name=layout, description=description, table=table_for(layout), detect=detect(layout),
                    infer=infer(layout), carries=carries(layout), write_notes=write_notes, **extra))


_register("timm", "timm VisionTransformer state dict", containers=("safetensors", "pt", "dir"),
          directory_config=timm_config,
          loads_with={"dir": "timm.create_model('local-dir:{path}', pretrained=True)"})
_register("timm_posembs", "timm-derived ViT with a PositionEmbs wrapper (pos_embedding.pos_embedding)")
