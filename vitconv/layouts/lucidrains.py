"""lucidrains ``vit-pytorch`` ``ViT`` state dicts <-> canonical, in two generations.

``lucidrains`` (the package today): ``to_patch_embedding.{1,2,3}`` = LayerNorm(patch) ->
Linear -> LayerNorm(dim) over ``(p1 p2 c)``-ordered patches; ``cls_token`` ``(1, D)`` (or
``(0, D)`` for ``pool='mean'``); ``pos_embedding`` ``(N, D)``; blocks
``transformer.layers.{i}.0`` (``norm``, ``to_qkv`` without bias, ``to_out.0``) and ``.1``
(``net.0`` LayerNorm, ``net.1``/``net.4`` Linears); ``transformer.norm`` on every token;
``mlp_head`` a bare Linear.

``lucidrains_prenorm`` (older releases): ``PreNorm`` wrappers (``layers.{i}.0.norm`` +
``.0.fn.to_qkv``, ``.1.norm`` + ``.1.fn.net.0/3``), ``to_patch_embedding.1`` a bare Linear,
``(1, N+1, D)`` tables, no final norm but ``mlp_head`` = LayerNorm + Linear on the pooled
vector (canonical ``final_norm='pooled'``). It always has a class token and the file does
not say whether ``pool='mean'`` was used, which averaged the class token too (something the
canonical ``gap`` does not do): ``pool='cls'`` is assumed and reported.

Semantics: exact GELU, PyTorch's LayerNorm eps 1e-5, softmax(q k^T / sqrt(dim_head)).
``dim_head * heads`` may differ from ``dim`` (canonical ``head_dim``). Refused: ``heads == 1``
with ``dim_head == dim`` (``to_out`` is an Identity there, no weights).
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.transforms import BATCH_AXIS, IDENTITY, PATCH_LINEAR, PATCH_VECTOR, POS_EMPTY_CLS
from vitconv.layouts.inference import build, count_blocks, grid_from_tokens, heads_carry, heads_from_attn_dim, need
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import When

_L = "transformer.layers.{i}."


@lru_cache(maxsize=None)
def _current(token: bool) -> Tuple[Rule, ...]:
    pos = (Rule("cls_token", ("cls_token",), BATCH_AXIS), Rule("pos_embed", ("pos_embedding",), BATCH_AXIS)) \
        if token else (Rule("pos_embed", ("pos_embedding", "cls_token"), POS_EMPTY_CLS),)
    return (
        Rule("patch_norm_pre.weight", ("to_patch_embedding.1.weight",), PATCH_VECTOR),
        Rule("patch_norm_pre.bias", ("to_patch_embedding.1.bias",), PATCH_VECTOR),
        Rule("patch_embed.weight", ("to_patch_embedding.2.weight",), PATCH_LINEAR),
        Rule("patch_embed.bias", ("to_patch_embedding.2.bias",), IDENTITY),
        Rule("patch_norm_post.weight", ("to_patch_embedding.3.weight",), IDENTITY),
        Rule("patch_norm_post.bias", ("to_patch_embedding.3.bias",), IDENTITY),
        *pos,
        Rule("blocks.{i}.norm1.weight", (_L + "0.norm.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm1.bias", (_L + "0.norm.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.qkv.weight", (_L + "0.to_qkv.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.weight", (_L + "0.to_out.0.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.attn.proj.bias", (_L + "0.to_out.0.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.weight", (_L + "1.net.0.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.norm2.bias", (_L + "1.net.0.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc1.weight", (_L + "1.net.1.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc1.bias", (_L + "1.net.1.bias",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.weight", (_L + "1.net.4.weight",), IDENTITY, "block"),
        Rule("blocks.{i}.mlp.fc2.bias", (_L + "1.net.4.bias",), IDENTITY, "block"),
        Rule("norm.weight", ("transformer.norm.weight",), IDENTITY),
        Rule("norm.bias", ("transformer.norm.bias",), IDENTITY),
        Rule("head.weight", ("mlp_head.weight",), IDENTITY, "model", When("num_classes")),
        Rule("head.bias", ("mlp_head.bias",), IDENTITY, "model", When("num_classes")),
    )


PRENORM_TABLE: Tuple[Rule, ...] = (
    Rule("patch_embed.weight", ("to_patch_embedding.1.weight",), PATCH_LINEAR),
    Rule("patch_embed.bias", ("to_patch_embedding.1.bias",), IDENTITY),
    Rule("cls_token", ("cls_token",), IDENTITY),
    Rule("pos_embed", ("pos_embedding",), IDENTITY),
    Rule("blocks.{i}.norm1.weight", (_L + "0.norm.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.norm1.bias", (_L + "0.norm.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.attn.qkv.weight", (_L + "0.fn.to_qkv.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.attn.proj.weight", (_L + "0.fn.to_out.0.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.attn.proj.bias", (_L + "0.fn.to_out.0.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.norm2.weight", (_L + "1.norm.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.norm2.bias", (_L + "1.norm.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc1.weight", (_L + "1.fn.net.0.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc1.bias", (_L + "1.fn.net.0.bias",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc2.weight", (_L + "1.fn.net.3.weight",), IDENTITY, "block"),
    Rule("blocks.{i}.mlp.fc2.bias", (_L + "1.fn.net.3.bias",), IDENTITY, "block"),
    Rule("norm.weight", ("mlp_head.0.weight",), IDENTITY),
    Rule("norm.bias", ("mlp_head.0.bias",), IDENTITY),
    Rule("head.weight", ("mlp_head.1.weight",), IDENTITY),
    Rule("head.bias", ("mlp_head.1.bias",), IDENTITY),
)


def table_for(layout: str):
    if layout == "lucidrains":
        return lambda cfg: _current(cfg.class_token)
    return lambda cfg: PRENORM_TABLE


def carries(layout: str) -> Tuple[Carry, ...]:
    """vit-pytorch's ``ViT(...)`` arguments name heads, dim_head and pool; its code hard-codes
    exact GELU, PyTorch's LayerNorm epsilon and a bias-free ``to_qkv``."""
    hard = "hard-coded in vit_pytorch/vit.py: patch it"
    common = (heads_carry("heads"), Carry("head_dim"),
              Carry("act", hardcoded=f"nn.GELU() is {hard}", default="gelu"),
              Carry("norm_eps", hardcoded=f"nn.LayerNorm's eps 1e-5 is {hard}", default=1e-5),
              Carry("qkv_bias", values=(False,), why="vit-pytorch's to_qkv has no bias"),
              Carry("pos_resize", hardcoded="vit-pytorch never resizes its position table: it runs at its own "
                    "resolution only", default="zoom"))
    if layout == "lucidrains":
        return common + (Carry("classifier", values=("token", "gap"), why="vit-pytorch pools the class token or "
                               "the mean"),
                         Carry("class_token", holds=lambda c: c.class_token == (c.classifier == "token"),
                               why="vit-pytorch keeps a class token exactly when it pools it (pool='cls')"),
                         Carry("patch_norm", values=(True,), why=(
            "current vit-pytorch has LayerNorms around the patch projection; use --to lucidrains_prenorm "
            "for the older layout")))
    return common + (Carry("classifier", values=("token",), why="old vit-pytorch always has a class token"),)


def detect(layout: str):
    if layout == "lucidrains":
        return lambda p: "transformer.layers.0.0.to_qkv.weight" in p.shapes and "to_patch_embedding.2.weight" in p.shapes
    return lambda p: "transformer.layers.0.0.fn.to_qkv.weight" in p.shapes and "to_patch_embedding.1.weight" in p.shapes


def infer(layout: str):
    prenorm = layout == "lucidrains_prenorm"

    def infer_config(probe: Probe) -> ViTConfig:
        shapes, path = probe.shapes, probe.path
        depth = count_blocks(shapes, r"^transformer\.layers\.(\d+)\.", "transformer.layers.N", path)
        f = "fn." if prenorm else ""
        lin = need(shapes, "to_patch_embedding.1.weight" if prenorm else "to_patch_embedding.2.weight", layout, path)
        width, patch_dim = lin
        qkv = need(shapes, f"transformer.layers.0.0.{f}to_qkv.weight", layout, path)
        if f"transformer.layers.0.0.{f}to_out.0.weight" not in shapes:
            raise MappingError("attention without to_out (vit-pytorch heads=1, dim_head=dim: an Identity "
                               "output projection); not supported", path)
        heads, head_dim = heads_from_attn_dim(qkv[0] // 3, probe)
        cls = need(shapes, "cls_token", layout, path)
        token = prenorm or cls[0] == 1
        pos = need(shapes, "pos_embedding", layout, path)
        n_tok = pos[1] if prenorm else pos[0]
        g = grid_from_tokens(n_tok, 1 if token else 0, "pos_embedding", path)
        # (p1 p2 c) patches: patch_dim = p*p*c; the grid fixes nothing about p, so take c = 3
        # unless p*p*3 does not fit, then c = 1 (grayscale), as vit-pytorch's `channels`.
        for c in (3, 1, 4):
            p = int(round((patch_dim / c) ** 0.5))
            if p * p * c == patch_dim:
                break
        else:
            raise MappingError(f"patch projection input {patch_dim} is not p*p*channels for 1, 3 or 4 channels", path)
        head = shapes.get("mlp_head.1.weight" if prenorm else "mlp_head.weight")
        mlp = need(shapes, f"transformer.layers.0.1.{f}net.{0 if prenorm else 1}.weight", layout, path)
        return build(probe, image_size=g * p, patch_size=p, in_chans=c, width=width, depth=depth,
                     num_heads=heads, head_dim=head_dim, mlp_dim=mlp[0],
                     classifier="token" if token else "gap", class_token=token,
                     num_classes=head[0] if head else 0,
                     qkv_bias=False, norm_eps=1e-5, act="gelu",
                     final_norm="pooled" if prenorm else "encoder", patch_norm=not prenorm)
    return infer_config


def read_notes(layout: str):
    def notes(cfg: ViTConfig, probe: Probe) -> List[str]:
        out = [f"patch: {cfg.patch_size}x{cfg.patch_size}x{cfg.in_chans} read off a "
               f"{cfg.patch_size ** 2 * cfg.in_chans}-wide patch projection (3 channels tried first)"]
        if layout == "lucidrains_prenorm":
            out.append("pool='cls' assumed: this vit-pytorch generation does not record pool='mean' "
                       "(which also averaged the class token, not supported)")
        return out
    return notes


def write_notes(cfg: ViTConfig) -> List[str]:
    kw = [f"image_size={cfg.image_size}", f"patch_size={cfg.patch_size}", f"num_classes={cfg.num_classes}",
          f"dim={cfg.width}", f"depth={cfg.depth}", f"heads={cfg.num_heads}", f"dim_head={cfg.head_dim}",
          f"mlp_dim={cfg.mlp_dim}", f"channels={cfg.in_chans}",
          f"pool={'cls' if cfg.classifier == 'token' else 'mean'!r}"]
    return ["vit-pytorch: ViT(" + ", ".join(kw) + ")"]


for _name, _description in (
        ("lucidrains", "vit-pytorch ViT (patch LayerNorms, final norm)"),
        ("lucidrains_prenorm", "older vit-pytorch ViT (PreNorm wrappers, LayerNorm in mlp_head)")):
    register(Layout(name=_name, description=_description, table=table_for(_name), detect=detect(_name),
                    infer=infer(_name), carries=carries(_name), read_notes=read_notes(_name),
                    write_notes=write_notes))
