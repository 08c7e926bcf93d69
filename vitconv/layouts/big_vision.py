"""big_vision ``.npz`` <-> canonical: the table, and architecture inference.

big_vision (github.com/google-research/big_vision, ``models/vit.py``) is Google's current ViT
code: SigLIP, SigLIP 2, FlexiViT and the PaliGemma image encoders are released in its layout.
Its Linen names differ from ``vit_jax``'s (``MultiHeadDotProductAttention_0``,
``LayerNorm_0/1``, ``MlpBlock_0``, ``MAPHead_0``, a top-level ``pos_embedding``), and so does
its arithmetic in two places the table carries: the position table is added to the patches
*before* the class token joins (``pos_embed_prefix='none'``), and ``posemb='sincos2d'``
stores no table at all: it is the fixed function :func:`vitconv.ops.posemb_sincos_2d` of the
grid, generated when read and left out when written (``pos_resize='sincos2d'``).

Where a file keeps the model: ``params/`` (a classifier), ``params/img/`` (a two-tower
SigLIP/LiT file, whose text tower and ``t``/``b`` scalars are left out and said so), or the
root. ``scan=True`` files stack every block along a leading axis
(``Transformer/encoderblock/...``); the layout's ``stacked`` pair reads them per block and
writes them stacked again. bfloat16 files (2-byte void members) are read as float32,
exactly (:mod:`vitconv.formats.npz`).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from vitconv.errors import MappingError
from vitconv.runtime.preprocess import BIG_VISION
from vitconv.ops import posemb_sincos_2d
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.inference import build, count_blocks, grid_from_tokens, need, prefix_holding
from vitconv.layouts.transforms import ATTN_OUT, CONV, DENSE, IDENTITY, QKV_BIAS, QKV_KERNEL, LayoutOp
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import ALWAYS, MAP, Condition, When

_B = "Transformer/encoderblock_{i}/"
_A = _B + "MultiHeadDotProductAttention_0/"
_M = "MAPHead_0/"
_MA = _M + "MultiHeadDotProductAttention_0/"

#: ``posemb='sincos2d'``: nothing stored; generated for the model's grid when read, and
#: written as nothing (the writer's table has no key for it).
SINCOS2D = LayoutOp("sincos2d", lambda arrays, cfg: posemb_sincos_2d(cfg.grid_size, cfg.grid_size, cfg.width),
                    lambda t, cfg: [], arity=0, shapes=lambda shape, cfg: [])


def _attention(canonical: str, a: str, scope: str, when: Condition = ALWAYS) -> Tuple[Rule, ...]:
    return (Rule(canonical + "qkv.weight", tuple(a + f"{n}/kernel" for n in ("query", "key", "value")),
                 QKV_KERNEL, scope, when),
            Rule(canonical + "qkv.bias", tuple(a + f"{n}/bias" for n in ("query", "key", "value")),
                 QKV_BIAS, scope, when),
            Rule(canonical + "proj.weight", (a + "out/kernel",), ATTN_OUT, scope, when),
            Rule(canonical + "proj.bias", (a + "out/bias",), IDENTITY, scope, when))


def _mlp(canonical: str, m: str, scope: str, when: Condition = ALWAYS) -> Tuple[Rule, ...]:
    return tuple(Rule(canonical + f"fc{n + 1}.{w}", (m + f"Dense_{n}/{k}",), op, scope, when)
                 for n in (0, 1) for w, k, op in (("weight", "kernel", DENSE), ("bias", "bias", IDENTITY)))


def _norm(canonical: str, key: str, scope: str, when: Condition = ALWAYS) -> Tuple[Rule, ...]:
    return (Rule(canonical + "weight", (key + "scale",), IDENTITY, scope, when),
            Rule(canonical + "bias", (key + "bias",), IDENTITY, scope, when))


# canonical name <- big_vision key(s), op, scope, when
TABLE: Tuple[Rule, ...] = (
    Rule("patch_embed.weight", ("embedding/kernel",), CONV),
    Rule("patch_embed.bias", ("embedding/bias",), IDENTITY),
    Rule("cls_token", ("cls",), IDENTITY, "model", When("class_token")),
    Rule("pos_embed", ("pos_embedding",), IDENTITY, "model", When("pos_resize", "!=", "sincos2d")),
    Rule("pos_embed", (), SINCOS2D, "model", When("pos_resize", "==", "sincos2d")),
    *_norm("blocks.{i}.norm1.", _B + "LayerNorm_0/", "block"),
    *_attention("blocks.{i}.attn.", _A, "block"),
    *_norm("blocks.{i}.norm2.", _B + "LayerNorm_1/", "block"),
    *_mlp("blocks.{i}.mlp.", _B + "MlpBlock_0/", "block"),
    *_norm("norm.", "Transformer/encoder_norm/", "model"),
    Rule("attn_pool.latent", (_M + "probe",), IDENTITY, "model", MAP),
    *_attention("attn_pool.", _MA, "model", MAP),
    *_norm("attn_pool.norm.", _M + "LayerNorm_0/", "model", MAP),
    *_mlp("attn_pool.mlp.", _M + "MlpBlock_0/", "model", MAP),
    Rule("pre_logits.weight", ("pre_logits/kernel",), DENSE, "model", When("representation_size")),
    Rule("pre_logits.bias", ("pre_logits/bias",), IDENTITY, "model", When("representation_size")),
    Rule("head.weight", ("head/kernel",), DENSE, "model", When("num_classes")),
    Rule("head.bias", ("head/bias",), IDENTITY, "model", When("num_classes")),
)

#: Where big_vision files keep the model: a two-tower file's image tower first.
PREFIXES = ("params/img/", "params/", "", "opt/target/")
#: The resolution assumed for a sincos2d file, which records none (big_vision's usual 224 px).
SINCOS_IMAGE_SIZE = 224
_BLOCK = r"^Transformer/encoderblock_(\d+)/"


def find_prefix(keys: Sequence[str], path: Optional[str] = None) -> str:
    return prefix_holding(keys, PREFIXES, "embedding/kernel", "big_vision ViT", path)


def ignored_what(prefix: str) -> str:
    return ("the text tower params/txt/ and the two-tower scalars t and b" if prefix == "params/img/"
            else "outside the model: optimizer state or other towers")


def infer_config(probe: Probe):
    """The architecture from the tensors' shapes alone (prefix stripped; stacked blocks
    already split per block)."""
    shapes, path = probe.shapes, probe.path
    depth = count_blocks(shapes, _BLOCK, "Transformer/encoderblock_N", path)
    emb = need(shapes, "embedding/kernel", "big_vision", path)
    if len(emb) != 4 or emb[0] != emb[1]:
        raise MappingError(f"embedding/kernel must be a square (k, k, in, out) kernel, got {emb}", path)
    q = need(shapes, _A.format(i=0) + "query/kernel", "big_vision", path)
    mlp = need(shapes, _B.format(i=0) + "MlpBlock_0/Dense_0/kernel", "big_vision", path)
    if len(q) != 3 or len(mlp) != 2:
        raise MappingError(f"query kernel must be (D, heads, head_dim) and the MLP kernel (D, M), got {q}, {mlp}",
                           path)
    classifier = "token" if "cls" in shapes else ("map" if _M + "probe" in shapes else "gap")
    if "pos_embedding" in shapes:
        pos = shapes["pos_embedding"]
        if len(pos) != 3:
            raise MappingError(f"pos_embedding must be (1, tokens, width), got {pos}", path)
        image_size, pos_resize = grid_from_tokens(pos[1], 0, "pos_embedding", path) * emb[0], "zoom"
    else:
        image_size, pos_resize = SINCOS_IMAGE_SIZE, "sincos2d"
    head = shapes.get("head/kernel")
    rep = shapes.get("pre_logits/kernel")
    return build(probe, image_size=image_size, patch_size=emb[0], in_chans=emb[2], width=emb[3], depth=depth,
                 num_heads=q[1], head_dim=q[2], mlp_dim=mlp[1], classifier=classifier,
                 class_token=classifier == "token", representation_size=rep[1] if rep else None,
                 num_classes=head[1] if head else 0, pos_embed_prefix="none", pos_resize=pos_resize,
                 final_norm="encoder")


#: big_vision's named sizes (``models/vit.py: decode_variant``): width, depth, MLP width, heads.
VARIANTS = {"mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "M": (512, 12, 2048, 8),
            "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "So400m": (1152, 27, 4304, 16),
            "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16), "g-opt": (1536, 40, 6144, 16),
            "G": (1664, 48, 8192, 16), "e": (1792, 56, 15360, 16)}


def variant(cfg) -> Optional[str]:
    """big_vision's name for the model's size (``So400m/14``), or None for a size it has no name for."""
    size = (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads)
    name = next((v for v, s in VARIANTS.items() if s == size), None)
    return f"{name}/{cfg.patch_size}" if name else None


def read_notes(cfg, probe: Probe) -> List[str]:
    pool = {"token": "tok", "gap": "gap", "map": "map"}[cfg.classifier]
    out = [f"big_vision {variant(cfg) or 'ViT'}, pool_type={pool!r}, posemb="
           f"{'sincos2d' if cfg.pos_resize == 'sincos2d' else 'learn'}" + (", scan=True" if cfg.scan else "")]
    if cfg.pos_resize == "sincos2d":
        out.append(f"posemb sincos2d: no table stored, generated as big_vision does; the file records no "
                   f"resolution, {SINCOS_IMAGE_SIZE} px assumed (--image-size sets another)")
    return out


def inference_sources(cfg) -> Dict[str, str]:
    return {  # the sizes' tensors inspect reads off the table
        "depth": "count of Transformer/encoderblock_N" + (" (stacked: Transformer/encoderblock [0])"
                                                          if cfg.scan else ""),
        "classifier": "cls (tok), MAPHead_0/probe (map), else gap",
        "class_token": "presence of cls",
        "representation_size": "pre_logits/kernel [1]" if cfg.representation_size else "no pre_logits",
        **({} if cfg.pos_resize != "sincos2d" else
           {"image_size": f"not recorded (sincos2d): {SINCOS_IMAGE_SIZE} px unless --image-size"}),
        "pos_resize": "no pos_embedding: sincos2d" if cfg.pos_resize == "sincos2d" else "pos_embedding: learned",
        "scan": "Transformer/encoderblock/ (stacked)" if cfg.scan else "Transformer/encoderblock_N/",
    }


CARRIES = (
    Carry("num_heads"), Carry("head_dim"),  # DenseGeneral kernels are (D, heads, head_dim)
    Carry("classifier", values=("token", "gap", "map"), why="big_vision pools the class token, the mean, or MAP"),
    Carry("class_token", holds=lambda c: c.class_token == (c.classifier == "token"),
          why="big_vision has a class token exactly when it pools it (pool_type='tok')"),
    Carry("representation_size"),
    Carry("qkv_bias", values=(True,), why="big_vision's attention always has q/k/v biases"),
    Carry("final_norm", values=("encoder",), why="big_vision normalises every token before pooling"),
    Carry("act", values=("gelu_tanh",), why="big_vision's nn.gelu is the tanh approximation"),
    Carry("norm_eps", values=(1e-6,), why="big_vision's LayerNorm epsilon is Flax's 1e-6"),
    Carry("pos_embed_prefix", holds=lambda c: c.pos_embed_prefix == "none" or not c.num_prefix_tokens,
          why="big_vision adds the position table to the patches before the class token joins"),
    Carry("pos_resize", hardcoded="big_vision's load resizes a learned table with scipy's order-1 zoom "
          "(vit.resample_posemb); the native resolution is unaffected",
          default=lambda cfg: "sincos2d" if cfg.pos_resize == "sincos2d" else "zoom"),
    Carry("scan"),
)


def detect(probe: Probe) -> bool:
    """big_vision's Linen names (``MlpBlock_0``/``MultiHeadDotProductAttention_0`` in a block,
    per block or stacked); ``vit_jax`` files say ``MlpBlock_3``/``_1``."""
    return (any(k.endswith("embedding/kernel") for k in probe.shapes)
            and any(re.search(r"Transformer/encoderblock(_\d+)?/(MlpBlock_0|MultiHeadDotProductAttention_0)/", k)
                    for k in probe.shapes))


register(Layout(
    name="big_vision", target="big_vision",
    description="big_vision .npz (SigLIP, FlexiViT, ...: Linen names, MAP head, sincos2d, scan)",
    table=lambda cfg: TABLE, detect=detect, infer=infer_config, carries=CARRIES, containers=("npz",),
    prefix=find_prefix, ignored_what=ignored_what, read_notes=read_notes, sources=inference_sources,
    stacked=("Transformer/encoderblock/", "Transformer/encoderblock_{i}/"), write_prefix="params/",
    preprocessing=BIG_VISION))
