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

Refused, naming the reason: class-token models that average-pool
(MAE-style ``fc_norm`` with a class token: timm excludes the class token from the mean),
position tables without the class token (``no_embed_class``), hybrid backbones, and
anything else the strict audit finds unused (layer scale, register tokens, ``attn_pool``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from ..config import ACTIVATIONS, ViTConfig
from ..errors import MappingError
from .base import Rule
from .layout import IDENTITY
from .pytorch_infer import Shapes, count_blocks, grid_from_tokens, heads_from_attn_dim, need

POS_KEYS = {"timm": "pos_embed", "timm_posembs": "pos_embedding.pos_embedding"}
_B = "blocks.{i}."


@lru_cache(maxsize=None)
def _table(pos_key: str, norm_key: str) -> Tuple[Rule, ...]:
    """One table for both directions; ``norm_key`` is ``norm`` or timm's ``fc_norm``."""
    rows = [Rule("patch_embed.weight", ("patch_embed.proj.weight",), IDENTITY),
            Rule("patch_embed.bias", ("patch_embed.proj.bias",), IDENTITY),
            Rule("cls_token", ("cls_token",), IDENTITY, "model", "token"),
            Rule("dist_token", ("dist_token",), IDENTITY, "model", "distilled"),
            Rule("pos_embed", (pos_key,), IDENTITY)]
    for canon, src, when in (("norm1.weight", "norm1.weight", "always"), ("norm1.bias", "norm1.bias", "always"),
                             ("attn.qkv.weight", "attn.qkv.weight", "always"),
                             ("attn.qkv.bias", "attn.qkv.bias", "qkv_bias"),
                             ("attn.proj.weight", "attn.proj.weight", "always"),
                             ("attn.proj.bias", "attn.proj.bias", "always"),
                             ("norm2.weight", "norm2.weight", "always"), ("norm2.bias", "norm2.bias", "always"),
                             ("mlp.fc1.weight", "mlp.fc1.weight", "always"), ("mlp.fc1.bias", "mlp.fc1.bias", "always"),
                             ("mlp.fc2.weight", "mlp.fc2.weight", "always"), ("mlp.fc2.bias", "mlp.fc2.bias", "always")):
        rows.append(Rule("blocks.{i}." + canon, (_B + src,), IDENTITY, "block", when))
    rows += [Rule("norm.weight", (f"{norm_key}.weight",), IDENTITY, "model", "final_norm"),
             Rule("norm.bias", (f"{norm_key}.bias",), IDENTITY, "model", "final_norm"),
             Rule("pre_logits.weight", ("pre_logits.fc.weight",), IDENTITY, "model", "pre_logits"),
             Rule("pre_logits.bias", ("pre_logits.fc.bias",), IDENTITY, "model", "pre_logits"),
             Rule("head.weight", ("head.weight",), IDENTITY, "model", "head"),
             Rule("head.bias", ("head.bias",), IDENTITY, "model", "head"),
             Rule("head_dist.weight", ("head_dist.weight",), IDENTITY, "model", "distilled_head"),
             Rule("head_dist.bias", ("head_dist.bias",), IDENTITY, "model", "distilled_head")]
    return tuple(rows)


def table_for(layout: str):
    def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
        # a class-token model's pooled norm is timm's `norm` (same values); only avg-pool uses fc_norm
        pooled = cfg.final_norm == "pooled" and cfg.classifier == "gap"
        return _table(POS_KEYS[layout], "fc_norm" if pooled else "norm")
    return table


def detect(layout: str):
    pos = POS_KEYS[layout]
    return lambda shapes: ("patch_embed.proj.weight" in shapes and "blocks.0.attn.qkv.weight" in shapes
                           and pos in shapes)


def infer(layout: str):
    def infer_config(shapes: Shapes, path: Optional[str] = None) -> ViTConfig:
        pos_key = POS_KEYS[layout]
        if any(k.startswith("patch_embed.backbone.") for k in shapes):
            raise MappingError("timm hybrid (patch_embed.backbone.*): timm's ResNet stem differs from "
                               "Google's; convert the Google .npz instead", path)
        depth = count_blocks(shapes, r"^blocks\.(\d+)\.", "blocks.N", path)
        emb = need(shapes, "patch_embed.proj.weight", layout, path)
        if len(emb) != 4 or emb[2] != emb[3]:
            raise MappingError(f"patch_embed.proj.weight must be a square (out, in, k, k) kernel, got {emb}", path)
        width, in_chans, patch = emb[0], emb[1], emb[2]
        qkv = need(shapes, _B.format(i=0) + "attn.qkv.weight", layout, path)
        if qkv[0] != 3 * width:
            raise MappingError(f"attn.qkv.weight {qkv}: timm's attention width must equal the "
                               f"embedding width {width}", path)
        heads, head_dim = heads_from_attn_dim(qkv[0] // 3, path)
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
        try:
            return ViTConfig(image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width,
                             depth=depth, num_heads=heads, head_dim=head_dim,
                             mlp_dim=need(shapes, _B.format(i=0) + "mlp.fc1.weight", layout, path)[0],
                             classifier="token" if token else "gap", representation_size=rep,
                             num_classes=head[0] if head else 0,
                             qkv_bias=(_B.format(i=0) + "attn.qkv.bias") in shapes,
                             norm_eps=1e-6, act="gelu", final_norm=final, distilled=distilled)
        except ValueError as e:
            raise MappingError(f"inconsistent architecture: {e}", path) from None
    return infer_config


def write_problems(cfg: ViTConfig) -> List[str]:
    """What a timm ``VisionTransformer`` cannot hold."""
    out = []
    if cfg.resnet_layers is not None:
        out.append("hybrid ResNet stem (timm's hybrid backbone uses other names and semantics)")
    if cfg.patch_norm:
        out.append("LayerNorms around the patch projection (vit-pytorch)")
    if cfg.attn_dim != cfg.width:
        out.append(f"attention width {cfg.attn_dim} != embedding width {cfg.width}")
    return out



def architecture(cfg: ViTConfig) -> str:
    """A registered timm model name whose class is the right one; ``model_args`` override
    every size, so the name only selects ``VisionTransformer`` or DeiT's distilled class."""
    return "deit_base_distilled_patch16_224" if cfg.distilled else "vit_base_patch16_224"


def model_args(cfg: ViTConfig) -> Dict[str, Any]:
    """Keyword arguments under which timm's constructor computes what the canonical model
    does (timm >= 1.0: ``final_norm`` needs it). ``norm_eps`` other than timm's 1e-6 has no
    JSON-expressible argument and is returned as ``None`` under ``"norm_eps"`` for callers
    to report (see :func:`write_notes`)."""
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
    if cfg.act != "gelu":
        notes.append(f"timm's default act is exact GELU; without act_layer={cfg.act!r} timm "
                     "computes something else (up to ~1e-3 per activation)")
    if cfg.norm_eps != 1e-6:
        notes.append(f"LayerNorm eps {cfg.norm_eps:g}: timm's default is 1e-6; pass norm_layer as above")
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


def _config_args(metadata: Dict[str, str], path: Optional[str]) -> Dict[str, Any]:
    """``model_args`` of a timm directory's ``config.json`` (carried as the ``hf_config``
    metadata string by the directory reader); empty for a bare state dict."""
    import json

    text = metadata.get("hf_config")
    if not text:
        return {}
    d = json.loads(text)
    args = d.get("model_args") if isinstance(d, dict) and "architecture" in d else None
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise MappingError("config.json: model_args is not an object", path)
    return args


def infer_with_meta(layout: str):
    """Shape inference, corrected by a timm ``config.json`` where one came with the weights:
    the head count and the activation are not in any shape."""
    from .pytorch_infer import given_heads, heads_given

    base = infer(layout)

    def infer_config(shapes: Shapes, metadata: Dict[str, str], path: Optional[str] = None) -> ViTConfig:
        args = _config_args(metadata, path)
        heads = args.get("num_heads") if heads_given() is None else None
        if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool)):
            raise MappingError(f"config.json: num_heads {heads!r} is not an integer", path)
        with given_heads(heads if heads is not None else heads_given()):
            cfg = base(shapes, path)
        act = args.get("act_layer")
        if act is not None:
            if act not in ACTIVATIONS:  # timm's act_layer names are the canonical ones
                raise MappingError(f"config.json: act_layer {act!r} is not one vitconv maps "
                                   f"({', '.join(sorted(ACTIVATIONS))})", path)
            cfg = cfg.replace(act=act)
        if args.get("final_norm") is False and cfg.final_norm != "none":
            raise MappingError("config.json says final_norm=False but the weights have a final norm", path)
        return cfg
    return infer_config


def config_records_heads(metadata: Dict[str, str]) -> bool:
    try:
        return "num_heads" in _config_args(metadata, None)
    except (ValueError, MappingError):
        return False
