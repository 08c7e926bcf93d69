"""Regenerate ``vitconv/archs/table.json`` from the libraries themselves.

Every architecture is built on the ``meta`` device (no weights, no memory) and its modules are
read: the activation, the LayerNorm epsilon, the heads, widths and patch, whether it rotates its
positions or normalises queries and keys, and the keys of its ``state_dict`` with the block index
folded to ``{i}`` (the key signature a bare file of it has). Rerun when a library adds models::

    python -m vitconv.archs.generate            # writes vitconv/archs/table.json
    python -m vitconv.archs.generate --check    # compares a fresh run with the shipped table

Sources: every ``timm.create_model`` name of the modules whose state dicts vitconv's timm layout
reads (``vision_transformer``, ``deit``) and of those whose keys can look the same with other math
(``eva``: rotary positions, Perception Encoder included), timm's ``naflexvit`` (read as the
``timm_naflexvit`` layout, what its ``NaFlexEmbeds`` computes beyond it as features) and ``beit``
(read as ``timm_beit``); every OpenCLIP model config whose tower is OpenCLIP's own
``VisionTransformer`` (read as the ``clip`` layout); Hugging Face ``model_type``s from each config
class's defaults. The hand-written rows (:data:`HAND_WRITTEN`) say why they are.

timm and OpenCLIP import torchvision, which has no CPU build on some indexes; where it is missing
:func:`torchvision_placeholder` answers for it while they are imported (their model code does not
use it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from vitconv.archs import TABLE, signature
from vitconv.layouts.inference import TIMM_POOLS
#: timm modules whose models are read (the others have keys vitconv's layouts never match).
TIMM_MODULES = ("vision_transformer", "deit", "eva", "naflexvit", "beit")
#: NaFlexVit's ``pos_embed_interp_mode`` (antialiased, corners not aligned) -> ``pos_resize``
NAFLEX_RESIZES = {"bicubic": "bicubic_aa", "bilinear": "bilinear"}
#: What no library declares in code these rows need; each says why.
HAND_WRITTEN: Tuple[Dict[str, Any], ...] = (
    # OpenAI's clip package derives a tower's sizes from its weights (build_model), so it has no
    # size table to read; these are OpenCLIP's configs for the same towers, with OpenAI's QuickGELU.
    *({"name": f"openai:{n}", "source": "openai", "layout": "clip", "act": "quick_gelu", "norm_eps": 1e-5,
       "like": f"open_clip:{c}-quickgelu", "why": "OpenAI's clip reads its sizes off the weights"}
      for n, c in (("ViT-B/32", "ViT-B-32"), ("ViT-B/16", "ViT-B-16"), ("ViT-L/14", "ViT-L-14"),
                   ("ViT-L/14@336px", "ViT-L-14-336"))),
)


# --------------------------------------------------------------------------- importing
class _Named(type):
    """Class attributes answer with their own name (``InterpolationMode.BICUBIC`` etc.)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return name


class _Placeholder(metaclass=_Named):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision placeholder: not usable here")


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Named(name, (_Placeholder,), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


@contextlib.contextmanager
def torchvision_placeholder() -> Iterator[None]:
    """Within this block every ``torchvision`` import is answered by a placeholder (unless a
    real torchvision is installed); afterwards the placeholders are gone again."""
    if importlib.util.find_spec("torchvision") is not None:
        yield
        return
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


def import_timm():
    if "timm" not in sys.modules:
        with torchvision_placeholder():
            import timm  # noqa: F401
    return sys.modules["timm"]


def import_openclip_transformer():
    """``open_clip.transformer`` without the package ``__init__`` (tokenizers, transforms)."""
    if "open_clip.transformer" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            raise ImportError("open_clip is not installed")
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("open_clip", pkg)
        with torchvision_placeholder():
            importlib.import_module("open_clip.transformer")
    return sys.modules["open_clip.transformer"]


# --------------------------------------------------------------------------- reading modules
def activation(module) -> str:
    """vitconv's name for an activation module (``gelu``, ``gelu_tanh``, ``quick_gelu``, ``silu``...)."""
    name = type(module).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"
    if name in ("QuickGELU", "GELUTanh"):
        return {"QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh"}[name]
    return {"SiLU": "silu", "ReLU": "relu", "Swish": "silu"}.get(name, name)


def dinov3_rope(model) -> bool:
    """Whether an Eva rotates its positions DINOv3's way, which vitconv computes (``rope='dinov3'``):
    timm's ``RotaryEmbeddingDinoV3`` with per-axis normalised, unshifted, rotate-half angles and no
    absolute position table (the ``timm_eva`` layout)."""
    rope = getattr(model, "rope", None)
    return (type(rope).__name__ == "RotaryEmbeddingDinoV3" and getattr(model, "pos_embed", None) is None
            and bool(rope.rotate_half) and rope.normalize_coords == "separate" and not rope.grid_offset
            and rope.grid_indexing == "ij" and rope.min_period is None)


def eva_rope(model) -> Optional[Dict[str, Any]]:
    """The rotary fields of a timm ``Eva`` whose positions vitconv computes (``rope`` 'none',
    'dinov3', 'cat': ``RotaryEmbeddingCat`` over patch indices, ``in_pixels=False``, or 'mixed'), for
    its row; None for another Eva (pixel-based bands, MRoPE) or another class."""
    if type(model).__name__ != "Eva":
        return None
    rope = getattr(model, "rope", None)
    # the fields a form does not have are recorded as the config's one spelling of them
    plain = {"rope_ref_grid": None, "rope_grid_offset": 0.0, "rope_indexing": "ij", "rope_half": True}
    if rope is None:
        return {"rope": "none", "rope_theta": 100.0, **plain}
    if dinov3_rope(model):
        return {"rope": "dinov3", "rope_theta": float(rope.temperature), **plain}
    if type(rope).__name__ == "RotaryEmbeddingMixed":  # learned frequencies: only the axis order is code's
        return {"rope": "mixed", "rope_theta": 100.0, **plain, "rope_indexing": rope.grid_indexing,
                "rope_half": False}
    if type(rope).__name__ == "RotaryEmbeddingCat" and not rope.in_pixels and rope.grid_type == "index":
        ref = rope.ref_feat_shape
        return {"rope": "cat", "rope_theta": float(rope.temperature),
                "rope_ref_grid": [int(n) for n in ref] if ref is not None else None,
                "rope_grid_offset": float(rope.grid_offset), "rope_indexing": rope.grid_indexing,
                "rope_half": bool(rope.rotate_half)}
    return None


def _features(model, block) -> List[str]:
    """What the model computes that no vitconv layout expresses, in words."""
    out = []
    attn = getattr(block, "attn", None)
    rotary = getattr(model, "rope", None) is not None or getattr(attn, "rope", None) is not None
    if rotary and eva_rope(model) is None:
        out.append("rotary position embeddings")
    if type(model).__name__ == "Eva":  # what the timm_eva layout refuses by name (its _not_yet)
        # sub-LayerNorms (attn.norm, mlp.norm) and separate q/k/v are computed (attn_norm, mlp_norm)
        for part, what in (("q_norm", "qk-norm (timm Eva)"), ("gate", "a gated attention output")):
            if type(getattr(attn, part, None)).__name__ not in ("NoneType", "Identity"):
                out.append(what)
        if getattr(attn, "num_kv_heads", getattr(attn, "num_heads", None)) != getattr(attn, "num_heads", None):
            out.append("grouped-query attention")
        if (getattr(block, "gamma_1", None) is None) != (getattr(block, "gamma_2", None) is None):
            out.append("LayerScale on the attention branch only")
    norm = type(getattr(block, "norm1", None)).__name__
    for n in ("q_norm", "k_norm"):  # vitconv computes qk-norm with the model's own norm (timm's norm_layer)
        if type(getattr(attn, n, None)).__name__ not in ("NoneType", "Identity", norm):
            out.append("qk-norm")
            break
    if norm not in ("LayerNorm", "LayerNormFp32", "RmsNorm", "NoneType"):
        out.append(f"{norm} instead of LayerNorm")
    if type(getattr(block, "mlp", None)).__name__ not in ("Mlp", "SwiGLUPacked", "GluMlp", "SwiGLU"):
        out.append(f"{type(getattr(block, 'mlp', None)).__name__} MLP")
    if type(block).__name__ not in ("Block", "EvaBlock"):
        out.append(f"timm {type(block).__name__}")
    return sorted(set(out))


def _naflex_features(embeds) -> List[str]:
    """What a timm ``NaFlexEmbeds`` computes that the timm_naflexvit layout does not read."""
    out = []
    kind = embeds.pos_embed_type
    if kind == "factorized":
        out.append("factorized position embeddings")
    if not embeds.is_linear:
        out.append("a convolutional NaFlex patch embedding")
    if embeds.norm_input is not None or type(embeds.norm).__name__ != "Identity":
        out.append("a norm around the patch projection")
    if kind == "learned":
        if embeds.pos_embed_ar_preserving:
            out.append("an aspect-preserving position resize")
        how = [w for w, odd in (("without antialiasing", not embeds.pos_embed_antialias),
                                ("with corners aligned", embeds.pos_embed_align_corners),
                                ("by grid_sample", embeds.pos_embed_use_grid_sample)) if odd]
        if how or embeds.pos_embed_interp_mode not in NAFLEX_RESIZES:
            out.append(" ".join([f"a {embeds.pos_embed_interp_mode} position resize"] + how))
        if embeds.pos_embed.shape[1] != embeds.pos_embed.shape[2]:
            out.append("a non-square position table")
    return out


def timm_rows(names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    import torch

    timm = import_timm()
    if names is None:
        names = sorted({n for m in TIMM_MODULES for n in timm.list_models(module=m)})
    rows = []
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        blocks = getattr(model, "blocks", None)
        if blocks is None or not len(blocks):
            continue
        b = blocks[0]
        mlp = getattr(b, "mlp", None)
        fc2 = getattr(mlp, "fc2", None)
        act_module = getattr(mlp, "act", None)
        attn = getattr(b, "attn", None)
        naflex = type(model).__name__ == "NaFlexVit"  # its embedding is model.embeds
        embed = model.embeds if naflex else model.patch_embed
        patch = embed.patch_size
        eva = type(model).__name__ == "Eva"  # its own layout, with what a bare file cannot say of it
        rope = eva_rope(model) or {}
        extra: Dict[str, Any] = {}
        pool = getattr(model, "attn_pool", None)
        if naflex:
            grid = embed.pos_embed_grid_size if embed.pos_embed_type == "learned" else None
            extra = {"layout": "timm_naflexvit", "image_size": int(grid[0] * patch[0]) if grid else None,
                     "features": sorted(set(_features(model, b) + _naflex_features(embed))),
                     "pos_resize": NAFLEX_RESIZES.get(embed.pos_embed_interp_mode),
                     "classifier": TIMM_POOLS.get(model.global_pool, model.global_pool)}
        elif eva:
            extra = {**rope, "classifier": TIMM_POOLS.get(model.global_pool, model.global_pool),
                     "pool_heads": int(pool.num_heads) if pool is not None and pool.num_heads != attn.num_heads else 0}
        elif type(model).__name__ != "Beit":  # with a class token and no fc_norm, only this says 'token' or 'avg'
            extra = {"classifier": TIMM_POOLS.get(model.global_pool, model.global_pool)}
        if pool is not None and getattr(model, "num_prefix_tokens", 0) and not eva:  # Eva's pool takes them all
            extra["map_prefix"] = bool(model.pool_include_prefix)
        rows.append({
            **extra, "name": name, "source": "timm",
            "layout": "timm_eva" if eva else ("timm_beit" if type(model).__name__ == "Beit" else "timm"),
            "class": type(model).__name__,
            "act": activation(act_module) if act_module is not None else None,
            "norm_eps": float(getattr(getattr(b, "norm1", None), "eps", 0.0) or 0.0),
            "width": int(model.embed_dim), "heads": int(attn.num_heads) if attn is not None else None,
            "mlp_dim": int(fc2.in_features) if fc2 is not None else None,
            "patch": int(patch[0] if isinstance(patch, (tuple, list)) else patch),
            "image_size": int(embed.img_size[0]) if getattr(embed, "img_size", None) else None,
            "features": _features(model, b),
            "swiglu": bool(fc2 is not None and (getattr(getattr(mlp, "fc1", None), "out_features", 0) == 2 * fc2.in_features
                                                or hasattr(mlp, "fc1_g"))),  # SwiGLUPacked, or SwiGLU (AIMv2)
            "keys": sorted(signature(model.state_dict())),
            **extra,
        })
    return rows


def openclip_rows(names: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """OpenCLIP configs whose tower is its own ``VisionTransformer`` (``model_configs/*.json``;
    towers built from timm or Hugging Face are those libraries' layouts)."""
    import torch

    oct = import_openclip_transformer()
    folder = Path(oct.__file__).parent / "model_configs"
    rows = []
    for f in sorted(folder.glob("*.json")):
        if names is not None and f.stem not in names:
            continue
        d = json.loads(f.read_text())
        v = d.get("vision_cfg", {})
        if "timm_model_name" in v or "hf_model_name" in v or isinstance(v.get("layers"), (list, tuple)):
            continue
        act = oct.QuickGELU if d.get("quick_gelu") else torch.nn.GELU
        width = v.get("width", 768)
        with torch.device("meta"):
            tower = oct.VisionTransformer(
                image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 16), width=width,
                layers=v.get("layers", 12), heads=width // v.get("head_width", 64), mlp_ratio=v.get("mlp_ratio", 4.0),
                ls_init_value=v.get("ls_init_value"), output_dim=d.get("embed_dim", 512),
                attentional_pool=v.get("attentional_pool", False), no_ln_pre=v.get("no_ln_pre", False),
                pool_type=v.get("pool_type", "tok"), final_ln_after_pool=v.get("final_ln_after_pool", False),
                output_tokens=v.get("output_tokens", False), act_layer=act,
                norm_layer=oct.LayerNorm)
        b = tower.transformer.resblocks[0]
        features = [] if type(getattr(tower, "attn_pool", None)).__name__ == "NoneType" else ["attentional pooler"]
        rows.append({
            "name": f"open_clip:{f.stem}", "source": "open_clip", "layout": "clip", "class": "VisionTransformer",
            "act": activation(b.mlp.gelu), "norm_eps": float(b.ln_1.eps), "width": int(width),
            "heads": int(b.attn.num_heads), "mlp_dim": int(b.mlp.c_fc.out_features),
            "patch": int(v.get("patch_size", 16)), "image_size": int(v.get("image_size", 224)),
            "classifier": {"tok": "token", "avg": "gap"}.get(v.get("pool_type", "tok"), v.get("pool_type")),
            "final_norm": "pooled" if v.get("final_ln_after_pool") else "encoder", "features": features, "swiglu": False, "keys": sorted(signature(tower.state_dict())),
        })
    return rows


#: Hugging Face model types vitconv reads (always with their config.json, which records the
#: semantics): their defaults, for --arch and for naming.
HF_TYPES = (("vit", "ViTConfig"), ("dinov2", "Dinov2Config"), ("dinov2_with_registers", "Dinov2WithRegistersConfig"),
            ("clip_vision_model", "CLIPVisionConfig"), ("siglip_vision_model", "SiglipVisionConfig"),
            ("aimv2_vision_model", "Aimv2VisionConfig"))


def hf_rows() -> List[Dict[str, Any]]:
    import transformers

    rows = []
    for model_type, cls in HF_TYPES:
        c = getattr(transformers, cls)()
        act = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
               "gelu_new": "gelu_tanh", "silu": "silu", "swish": "silu"}.get(c.hidden_act, c.hidden_act)
        rows.append({"name": f"hf:{model_type}", "source": "transformers", "layout": "hf", "class": cls,
                     "act": act, "norm_eps": float(getattr(c, "layer_norm_eps", None) or c.rms_norm_eps),  # Aimv2: RMSNorm's
                     "width": c.hidden_size,
                     "heads": c.num_attention_heads, "mlp_dim": getattr(c, "intermediate_size", None),
                     "patch": c.patch_size, "image_size": c.image_size, "features": [], "swiglu": model_type == "aimv2_vision_model",
                     "keys": None})
    return rows


def hand_written(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    by_name = {r["name"]: r for r in rows}
    out = []
    for h in HAND_WRITTEN:
        like = by_name.get(h["like"])
        if like is None:
            continue
        out.append({**like, **{k: v for k, v in h.items() if k != "like"}})
    return out


def versions() -> Dict[str, str]:
    out = {}
    for name in ("torch", "timm", "open_clip", "transformers"):
        try:
            out[name] = importlib.metadata.version({"open_clip": "open_clip_torch"}.get(name, name))
        except Exception:  # noqa: BLE001 - not installed: not recorded
            pass
    return out


def pack(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The shipped form: each distinct key signature once (``signatures``), rows pointing to it
    by index; rows in name order."""
    sigs: List[List[str]] = []
    index: Dict[Tuple[str, ...], int] = {}
    packed = []
    for r in sorted(rows, key=lambda r: r["name"]):
        r = dict(r)
        keys = r.pop("keys")
        if keys is not None:
            t = tuple(keys)
            if t not in index:
                index[t] = len(sigs)
                sigs.append(list(t))
            r["sig"] = index[t]
        packed.append(r)
    return {"versions": versions(), "signatures": sigs, "archs": packed}


def unpack_row(table: Dict[str, Any], row: Dict[str, Any]) -> Dict[str, Any]:
    """A shipped row with its key signature in place of the index (as :func:`timm_rows` gives it)."""
    r = dict(row)
    r["keys"] = table["signatures"][r.pop("sig")] if "sig" in r else None
    return r


def generate() -> Dict[str, Any]:
    rows = timm_rows() + openclip_rows()
    rows += hand_written(rows) + hf_rows()
    return pack(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare a fresh run with the shipped table")
    p.add_argument("--out", default=str(TABLE))
    a = p.parse_args(argv)
    table = generate()
    text = json.dumps(table, separators=(",", ":"), sort_keys=True) + "\n"
    if a.check:
        same = TABLE.read_text() == text
        print("the shipped table matches a fresh run" if same else "the shipped table differs from a fresh run")
        return 0 if same else 1
    Path(a.out).write_text(text)
    print(f"{len(table['archs'])} architectures, {len(table['signatures'])} key signatures -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
