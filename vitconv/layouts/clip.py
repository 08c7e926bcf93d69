"""OpenAI CLIP and OpenCLIP vision towers (``visual.*`` of a CLIP state dict, or the tower's own
``state_dict()``) <-> canonical.

Keys (``clip/model.py`` ``VisionTransformer``; OpenCLIP ``transformer.py`` keeps them):
``conv1`` (no bias), ``class_embedding`` (D,), ``positional_embedding`` (N+1, D), ``ln_pre``,
``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight/bias ([q; k; v]), attn.out_proj, ls_1.gamma
(OpenCLIP LayerScale), ln_2, mlp.c_fc, mlp.c_proj, ls_2.gamma}``, ``ln_post``, ``proj`` (D, E:
the transposed weight of a bias-free head). A full CLIP checkpoint's text tower (its top-level
keys, some with the same names) is left out.

Semantics: the class token takes row 0 of the table; ``ln_pre`` after the embedding;
``ln_post`` on the pooled class token (the same function as the canonical encoder norm, then
token pooling); ``x @ proj``. None of the choices below is in the weights; they are the
carries' arguments, with OpenAI's values assumed: QuickGELU (OpenAI and OpenCLIP's
``quick_gelu`` models; most other OpenCLIP models use exact GELU: ``--set act=gelu``),
LayerNorm eps 1e-5, 64-dim heads (OpenCLIP's ViT-H/g/bigG use 80/88/104: ``--num-heads 16``),
class-token pooling (OpenCLIP ``pool_type='avg'``: ``--set classifier=gap``). OpenAI CLIP never
resizes its position table; OpenCLIP (and timm) resize it bicubic with antialiasing, which
the converted model follows.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import CLIP
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.inference import build, count_blocks, grid_from_tokens, heads_carry, heads_from_attn_dim, need
from vitconv.layouts.transforms import BATCH_AXIS, DENSE, IDENTITY, VECTOR_TOKEN
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import ALWAYS, When

_R = "transformer.resblocks.{i}."
PREFIXES = ("visual.", "module.visual.")


@lru_cache(maxsize=None)
def _table() -> Tuple[Rule, ...]:
    block = lambda canonical, key, when=ALWAYS: Rule("blocks.{i}." + canonical, (_R + key,), IDENTITY,  # noqa: E731
                                                       "block", when)
    return (
        Rule("patch_embed.weight", ("conv1.weight",), IDENTITY),
        Rule("cls_token", ("class_embedding",), VECTOR_TOKEN),
        Rule("pos_embed", ("positional_embedding",), BATCH_AXIS),
        Rule("norm_pre.weight", ("ln_pre.weight",), IDENTITY, "model", When("norm_pre")),
        Rule("norm_pre.bias", ("ln_pre.bias",), IDENTITY, "model", When("norm_pre")),
        block("norm1.weight", "ln_1.weight"), block("norm1.bias", "ln_1.bias"),
        block("attn.qkv.weight", "attn.in_proj_weight"), block("attn.qkv.bias", "attn.in_proj_bias"),
        block("attn.proj.weight", "attn.out_proj.weight"), block("attn.proj.bias", "attn.out_proj.bias"),
        block("ls1.gamma", "ls_1.gamma", When("layer_scale")),
        block("norm2.weight", "ln_2.weight"), block("norm2.bias", "ln_2.bias"),
        block("mlp.fc1.weight", "mlp.c_fc.weight"), block("mlp.fc1.bias", "mlp.c_fc.bias"),
        block("mlp.fc2.weight", "mlp.c_proj.weight"), block("mlp.fc2.bias", "mlp.c_proj.bias"),
        block("ls2.gamma", "ls_2.gamma", When("layer_scale")),
        Rule("norm.weight", ("ln_post.weight",), IDENTITY),
        Rule("norm.bias", ("ln_post.bias",), IDENTITY),
        Rule("head.weight", ("proj",), DENSE, "model", When("num_classes")),
    )


CARRIES = (
    heads_carry("heads"),
    Carry("head_dim", holds=lambda c: c.attn_dim == c.width, why="CLIP's attention width is the tower's width"),
    Carry("act", values=("quick_gelu", "gelu"), argument="act_layer", default="quick_gelu",
          why="CLIP's MLP is QuickGELU (OpenAI) or exact GELU (OpenCLIP)"),
    Carry("norm_eps", argument="norm_kwargs", default=1e-5),
    Carry("classifier", values=("token", "gap"), argument="pool_type", default="token",
          why="OpenCLIP pools the class token or the mean of the patch tokens"),
    Carry("final_norm", values=("encoder", "pooled"), argument="final_ln_after_pool", default="encoder",
          why="ln_post runs before or after pooling"),
    Carry("norm_pre"), Carry("layer_scale"),
    Carry("patch_bias", values=(False,), why="CLIP's conv1 has no bias"),
    Carry("head_bias", holds=lambda c: not c.num_classes or not c.head_bias, why="CLIP's proj has no bias"),
    Carry("pos_resize", hardcoded="OpenCLIP resizes position tables bicubic with antialiasing (OpenAI CLIP "
          "never does): the native resolution is unaffected", default="bicubic_aa"),
)


def find_prefix(keys: Sequence[str], path: Optional[str] = None) -> str:
    """``visual.`` (or ``module.visual.``) in a full CLIP state dict; nothing for a bare tower."""
    for p in PREFIXES:
        if p + "conv1.weight" in keys:
            return p
    return ""


def detect(probe: Probe) -> bool:
    s = probe.shapes
    return any(p + "conv1.weight" in s and p + "class_embedding" in s
               and p + "transformer.resblocks.0.attn.in_proj_weight" in s for p in ("",) + PREFIXES)


def infer_config(probe: Probe) -> ViTConfig:
    shapes, path = probe.shapes, probe.path
    depth = count_blocks(shapes, r"^transformer\.resblocks\.(\d+)\.", "transformer.resblocks.N", path)
    emb = need(shapes, "conv1.weight", "clip", path)
    if len(emb) != 4 or emb[2] != emb[3]:
        raise MappingError(f"conv1.weight must be a square (out, in, k, k) kernel, got {emb}", path)
    width, in_chans, patch = emb[0], emb[1], emb[2]
    heads, head_dim = heads_from_attn_dim(need(shapes, _R.format(i=0) + "attn.in_proj_weight", "clip", path)[0] // 3,
                                          probe)
    pos = need(shapes, "positional_embedding", "clip", path)
    if len(pos) != 2:
        raise MappingError(f"positional_embedding must be (tokens, width), got {pos}", path)
    g = grid_from_tokens(pos[0], 1, "positional_embedding", path)
    proj = shapes.get("proj")
    return build(probe, image_size=g * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                 num_heads=heads, head_dim=head_dim,
                 mlp_dim=need(shapes, _R.format(i=0) + "mlp.c_fc.weight", "clip", path)[0],
                 num_classes=proj[1] if proj else 0, head_bias=False if proj else True, norm_eps=1e-5,
                 act="quick_gelu", norm_pre="ln_pre.weight" in shapes, patch_bias=False,
                 layer_scale=_R.format(i=0) + "ls_1.gamma" in shapes, pos_resize="bicubic_aa")


def write_notes(cfg: ViTConfig) -> List[str]:
    return [f"clip: VisionTransformer(input_resolution={cfg.image_size}, patch_size={cfg.patch_size}, "
            f"width={cfg.width}, layers={cfg.depth}, heads={cfg.num_heads}, output_dim={cfg.num_classes}) "
            "(OpenAI's clip/model.py) loads it strictly" + (
                "" if cfg.act == "quick_gelu" else f"; its MLP must use {cfg.act} (OpenCLIP act_layer)")]


register(Layout(name="clip", description="OpenAI CLIP / OpenCLIP vision tower (visual.*)", table=lambda cfg: _table(),
                detect=detect, infer=infer_config, carries=CARRIES, prefix=find_prefix,
                ignored_what="the text tower", write_notes=write_notes, preprocessing=CLIP))
