"""Google ``vit_jax`` ``.npz`` layout <-> canonical: the table, and architecture inference.

Key names are those ``flax.traverse_util.flatten_dict(params, sep='/')`` gives for
``vit_jax/models_vit.py`` (e.g. ``Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel``)
and, for the hybrid, ``vit_jax/models_resnet.py`` (``block2/unit1/conv_proj/kernel``).
An ``.npz`` records no activation, epsilon or norm placement: it always means Google's
semantics, which are the canonical defaults, so the table carries only what the tensors say.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from vitconv.config import stem_stride
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import GOOGLE
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.big_vision import detect as big_vision_names
from vitconv.layouts.transforms import ATTN_OUT, CONV, DENSE, GN, IDENTITY, QKV_BIAS, QKV_KERNEL
from vitconv.layouts.inference import build, prefix_holding
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.layouts.table import FINAL_NORM, When

_B = "Transformer/encoderblock_{i}/"
_A = _B + "MultiHeadDotProductAttention_1/"
_U = "block{s1}/unit{u1}/"
_C = "stem.stages.{s}.{u}."

# canonical name                       Google key(s)                                  op          scope    when
TABLE: Tuple[Rule, ...] = (
    Rule("stem.conv_root.weight",       ("conv_root/kernel",),                         CONV,       "model", When("resnet_layers")),
    Rule("stem.gn_root.weight",         ("gn_root/scale",),                            GN,         "model", When("resnet_layers")),
    Rule("stem.gn_root.bias",           ("gn_root/bias",),                             GN,         "model", When("resnet_layers")),
    *(Rule(_C + f"conv{n}.weight",       (_U + f"conv{n}/kernel",),                     CONV,       "unit") for n in (1, 2, 3)),
    *(Rule(_C + f"gn{n}.{p}",            (_U + f"gn{n}/{g}",),                          GN,         "unit")
      for n in (1, 2, 3) for p, g in (("weight", "scale"), ("bias", "bias"))),
    Rule(_C + "conv_proj.weight",       (_U + "conv_proj/kernel",),                    CONV,       "proj"),
    Rule(_C + "gn_proj.weight",         (_U + "gn_proj/scale",),                       GN,         "proj"),
    Rule(_C + "gn_proj.bias",           (_U + "gn_proj/bias",),                        GN,         "proj"),
    Rule("patch_embed.weight",          ("embedding/kernel",),                         CONV),
    Rule("patch_embed.bias",            ("embedding/bias",),                           IDENTITY),
    Rule("cls_token",                   ("cls",),                                      IDENTITY,   "model", When("class_token")),
    Rule("pos_embed",                   ("Transformer/posembed_input/pos_embedding",), IDENTITY),
    Rule("blocks.{i}.norm1.weight",     (_B + "LayerNorm_0/scale",),                   IDENTITY,   "block"),
    Rule("blocks.{i}.norm1.bias",       (_B + "LayerNorm_0/bias",),                    IDENTITY,   "block"),
    Rule("blocks.{i}.attn.qkv.weight",  tuple(_A + f"{n}/kernel" for n in ("query", "key", "value")),
                                                                                       QKV_KERNEL, "block"),
    Rule("blocks.{i}.attn.qkv.bias",    tuple(_A + f"{n}/bias" for n in ("query", "key", "value")),
                                                                                       QKV_BIAS,   "block", When("qkv_bias")),
    Rule("blocks.{i}.attn.proj.weight", (_A + "out/kernel",),                          ATTN_OUT,   "block"),
    Rule("blocks.{i}.attn.proj.bias",   (_A + "out/bias",),                            IDENTITY,   "block"),
    Rule("blocks.{i}.norm2.weight",     (_B + "LayerNorm_2/scale",),                   IDENTITY,   "block"),
    Rule("blocks.{i}.norm2.bias",       (_B + "LayerNorm_2/bias",),                    IDENTITY,   "block"),
    Rule("blocks.{i}.mlp.fc1.weight",   (_B + "MlpBlock_3/Dense_0/kernel",),           DENSE,      "block"),
    Rule("blocks.{i}.mlp.fc1.bias",     (_B + "MlpBlock_3/Dense_0/bias",),             IDENTITY,   "block"),
    Rule("blocks.{i}.mlp.fc2.weight",   (_B + "MlpBlock_3/Dense_1/kernel",),           DENSE,      "block"),
    Rule("blocks.{i}.mlp.fc2.bias",     (_B + "MlpBlock_3/Dense_1/bias",),             IDENTITY,   "block"),
    Rule("norm.weight",                 ("Transformer/encoder_norm/scale",),           IDENTITY,   "model", FINAL_NORM),
    Rule("norm.bias",                   ("Transformer/encoder_norm/bias",),            IDENTITY,   "model", FINAL_NORM),
    Rule("pre_logits.weight",           ("pre_logits/kernel",),                        DENSE,      "model", When("representation_size")),
    Rule("pre_logits.bias",             ("pre_logits/bias",),                          IDENTITY,   "model", When("representation_size")),
    Rule("head.weight",                 ("head/kernel",),                              DENSE,      "model", When("num_classes")),
    Rule("head.bias",                   ("head/bias",),                                IDENTITY,   "model", When("num_classes")),
)

#: Prefixes under which Google's and big_vision's savers nest the parameters.
PREFIXES = ("", "opt/target/", "params/")
_BLOCK_RE = re.compile(r"^Transformer/encoderblock_(\d+)/")
_UNIT_RE = re.compile(r"^block(\d+)/unit(\d+)/")


def find_prefix(keys: Sequence[str], path: Optional[str] = None) -> str:
    """The prefix under which the model lives (``''``, ``opt/target/`` or ``params/``)."""
    return prefix_holding(keys, PREFIXES, "embedding/kernel", "Google ViT", path)


def infer_config(probe: Probe):
    """Read the architecture off the tensors' shapes alone (prefix already stripped).

    Every value comes from one named tensor; :func:`inference_sources` says which."""
    shapes, path = probe.shapes, probe.path

    def need(key: str, ndim: int) -> Tuple[int, ...]:
        if key not in shapes:
            raise MappingError(f"not a Google ViT checkpoint: missing {key!r}", path)
        if len(shapes[key]) != ndim:  # checked before indexing: files are untrusted
            raise MappingError(f"{key} must have {ndim} dimensions, got shape {shapes[key]}", path)
        return shapes[key]

    blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k))})
    if not blocks:
        raise MappingError("no Transformer/encoderblock_N tensors: not a ViT checkpoint", path)
    if blocks != list(range(len(blocks))):
        raise MappingError(f"encoder blocks are not numbered 0..N-1 (found {blocks})", path)

    emb = need("embedding/kernel", 4)
    if len(emb) != 4 or emb[0] != emb[1]:
        raise MappingError(f"embedding/kernel must be a square (k, k, in, out) kernel, got {emb}", path)
    q = need(_A.format(i=0) + "query/kernel", 3)
    if len(q) != 3:
        raise MappingError(f"query kernel must be (D, heads, head_dim), got {q}", path)
    width = emb[3]
    mlp = need(_B.format(i=0) + "MlpBlock_3/Dense_0/kernel", 2)
    pos = need("Transformer/posembed_input/pos_embedding", 3)
    classifier = "token" if "cls" in shapes else "gap"
    rep = need("pre_logits/kernel", 2)[1] if "pre_logits/kernel" in shapes else None
    head = need("head/kernel", 2) if "head/kernel" in shapes else None

    resnet_layers = None
    resnet_width = 64
    in_chans = emb[2]
    if "conv_root/kernel" in shapes:
        root = need("conv_root/kernel", 4)
        resnet_width, in_chans = root[3], root[2]
        units: Dict[int, List[int]] = {}
        for k in shapes:
            if m := _UNIT_RE.match(k):
                units.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        stages = sorted(units)
        if stages != list(range(1, len(stages) + 1)):
            raise MappingError(f"ResNet stages are not numbered block1..blockN (found {stages})", path)
        resnet_layers = tuple(max(units[s]) for s in stages)

    prefix = 1 if classifier == "token" else 0
    n_grid = pos[1] - prefix
    g = int(round(n_grid ** 0.5))
    if len(pos) != 3 or g * g != n_grid or n_grid <= 0:
        raise MappingError(f"position embedding {pos} does not hold a square grid", path)
    cfg_kwargs = dict(
        patch_size=emb[0], in_chans=in_chans, width=width, depth=len(blocks), num_heads=q[1],
        head_dim=q[2], mlp_dim=mlp[1], classifier=classifier, class_token=classifier == "token",
        representation_size=rep,
        num_classes=head[1] if head else 0,
        qkv_bias=(_A.format(i=0) + "query/bias") in shapes,
        final_norm="encoder" if "Transformer/encoder_norm/scale" in shapes else "none",
        resnet_layers=resnet_layers, resnet_width=resnet_width)
    return build(probe, image_size=g * emb[0] * stem_stride(resnet_layers), **cfg_kwargs)


def inference_sources(cfg) -> Dict[str, str]:
    """Which tensor (and axis) each inferred value was read from, for ``inspect``."""
    a0 = _A.format(i=0)
    src = {  # the sizes' tensors inspect reads off the table
        "classifier": "presence of cls",
        "class_token": "presence of cls",
        "representation_size": "pre_logits/kernel [1]" if cfg.representation_size else "no pre_logits",
        "qkv_bias": "presence of " + a0 + "query/bias",
    }
    if cfg.resnet_layers:
        src["resnet_layers"] = "count of block{s}/unit{u}"
        src["resnet_width"] = "conv_root/kernel [3]"
    src["final_norm"] = "presence of Transformer/encoder_norm/scale"
    return src


#: What the tensors carry beyond their shapes; every other field holds Google's default.
CARRIES = (
    Carry("num_heads"), Carry("head_dim"),  # DenseGeneral kernels are (D, heads, head_dim)
    Carry("classifier", values=("token", "gap"), why="vit_jax pools the class token or the mean of all tokens"),
    Carry("class_token", holds=lambda c: c.class_token == (c.classifier == "token"),
          why="vit_jax has a class token exactly when it pools it"),
    Carry("representation_size"), Carry("qkv_bias"),
    Carry("final_norm", values=("encoder", "none"), why="Google normalises every token before pooling"),
    Carry("resnet_layers"), Carry("resnet_width"),
    Carry("act", values=("gelu_tanh",), why="an .npz always means Flax's tanh GELU"),
    Carry("pos_resize", hardcoded="vit_jax resizes position tables with its order-1 zoom (load_pretrained); "
          "the native resolution is unaffected", default="zoom"),
    Carry("norm_eps", values=(1e-6,), why="an .npz always means Flax's LayerNorm epsilon 1e-6"),
)


def detect(probe: Probe) -> bool:
    """``vit_jax``'s names; big_vision's Linen names (``MlpBlock_0``, ...) are its own layout."""
    return (any(k.endswith("embedding/kernel") for k in probe.shapes)
            and any("encoderblock_" in k for k in probe.shapes) and not big_vision_names(probe))


register(Layout(
    name="google", target="npz", description="Google vit_jax .npz (HWIO kernels, per-head q/k/v)",
    table=lambda cfg: TABLE, detect=detect, infer=infer_config, carries=CARRIES,
    containers=("npz",), prefix=find_prefix, sources=inference_sources, preprocessing=GOOGLE))
