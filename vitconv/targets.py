"""Convert any checkpoint vitconv reads into any layout it writes: the library call behind
``vitconv convert``.

Reading goes through the layout registry (detect, infer, strict audit). Writing inverts the
target layout's rule table; before a byte is written the target is asked what it cannot
express for this model (``write_problems``), and the conversion stops naming each item
rather than writing a file that computes something else. What a target can hold but runs
differently unless told (timm's default exact GELU, Hugging Face's eps) is said in the
report's notes, with the constructor arguments or ``config.json`` values that make it exact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .config import ViTConfig
from .convert import ConversionReport
from .errors import BadInputError, MappingError, OutputError
from .formats.base import open_source, sha256_file
from .layouts import LAYOUTS, read_layout, write_layout
from .ops import resize_pos_embed
from .rules import hf, jeonsworld, lucidrains, timm
from .rules.pytorch_infer import HEADS_NOTE, final_norm_is, given_heads

#: ``--to`` names -> the layout written ("hf" picks ViTForImageClassification or ViTModel).
TARGETS = ("canonical", "npz", "timm", "timm_posembs", "hf", "jeonsworld", "lucidrains", "lucidrains_prenorm")
#: Layouts whose attention shapes do not record the number of heads.
_HEADS_ASSUMED = {"timm", "timm_posembs", "jeonsworld", "lucidrains", "lucidrains_prenorm"}


def default_target(dst: os.PathLike | str) -> str:
    """``--to`` from the output name: ``.npz`` -> Google, a directory (or a name without an
    extension) -> Hugging Face, ``.pt``/``.pth``/``.bin``/``.safetensors`` -> canonical."""
    p = Path(dst)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if p.is_dir() or not suffix:
        return "hf"
    if suffix in (".pt", ".pth", ".bin", ".safetensors"):
        return "canonical"
    raise BadInputError(f"cannot tell the target from the extension {suffix!r}; pass --to "
                        f"({', '.join(TARGETS)})", dst)


def google_problems(cfg: ViTConfig) -> List[str]:
    """A Google ``.npz`` records no activation, epsilon or norm placement: it always means
    Google's semantics. A model with other semantics would compute something else when read
    back, so it is refused."""
    out = []
    if cfg.act != "gelu_tanh":
        out.append(f"act={cfg.act!r} (an .npz always means Google's tanh GELU)")
    if cfg.norm_eps != 1e-6:
        out.append(f"LayerNorm eps {cfg.norm_eps:g} (an .npz always means 1e-6)")
    if not final_norm_is(cfg, "encoder") and cfg.final_norm != "none":
        out.append(f"final_norm={cfg.final_norm!r} (Google normalises tokens before pooling)")
    if cfg.patch_norm:
        out.append("LayerNorms around the patch projection")
    return out


#: Targets that hold DeiT's distillation token and second head.
_DISTILLED_TARGETS = ("canonical", "timm", "timm_posembs")


def _problems(target: str, cfg: ViTConfig) -> List[str]:
    if cfg.distilled and target not in _DISTILLED_TARGETS:
        return ["DeiT distillation token and head_dist (written only as canonical or timm)"] + \
            _target_problems(target, cfg)
    return _target_problems(target, cfg)


def _target_problems(target: str, cfg: ViTConfig) -> List[str]:
    if target == "npz":
        return google_problems(cfg)
    if target in ("timm", "timm_posembs"):
        return timm.write_problems(cfg)
    if target == "hf":
        return hf.write_problems(cfg)
    if target == "jeonsworld":
        return jeonsworld.write_problems(cfg)
    if target in ("lucidrains", "lucidrains_prenorm"):
        return lucidrains.write_problems(target, cfg)
    return []


def _write_notes(target: str, cfg: ViTConfig) -> List[str]:
    if target in ("timm", "timm_posembs"):
        return timm.write_notes(cfg)
    if target == "hf":
        return hf.write_notes(cfg)
    if target == "jeonsworld":
        return jeonsworld.write_notes(cfg)
    if target in ("lucidrains", "lucidrains_prenorm"):
        return lucidrains.write_notes(cfg)
    return []


def _read_notes(layout: str, cfg: ViTConfig, metadata: Dict[str, str]) -> List[str]:
    notes = []
    if layout in _HEADS_ASSUMED and not (layout == "timm" and timm.config_records_heads(metadata)):
        notes.append(HEADS_NOTE.format(h=cfg.num_heads, d=cfg.head_dim))
    if layout in ("hf", "hf_model"):
        notes += hf.read_notes(cfg, metadata)
    if layout == "jeonsworld":
        notes += jeonsworld.read_notes(cfg)
    if layout in ("lucidrains", "lucidrains_prenorm"):
        notes += lucidrains.read_notes(layout, cfg)
    return notes


def to_layout(state: Dict[str, np.ndarray], cfg: ViTConfig, target: str) -> Tuple[str, Dict[str, np.ndarray]]:
    """Canonical state -> ``(layout name, {key: array})`` for ``target`` (a ``--to`` name),
    refusing with every reason when the target cannot express the model."""
    if target not in TARGETS:
        raise BadInputError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    problems = _problems(target, cfg)
    if problems:
        raise MappingError(f"the {target} layout cannot express this model: " + "; ".join(problems))
    name = {"npz": "google", "hf": hf.target_layout(cfg)}.get(target, target)
    arrays = write_layout(state, cfg, LAYOUTS[name])
    return name, {k: arrays[k] for k in sorted(arrays)}


def write_target(state: Dict[str, np.ndarray], cfg: ViTConfig, target: str, dst: os.PathLike | str,
                 extra: Optional[Dict[str, str]] = None,
                 source_layout: Optional[str] = None) -> Tuple[str, List[str]]:
    """Write ``target`` to ``dst`` atomically; returns (what was written, notes).
    ``source_layout`` lets a timm directory record Google's preprocessing."""
    dst = Path(dst)
    suffix = dst.suffix.lower()
    if target == "canonical":
        from .checkpoint import save_canonical

        if suffix not in (".pt", ".pth", ".bin", ".safetensors"):
            raise BadInputError("a canonical checkpoint needs .pt, .pth, .bin or .safetensors", dst)
        return f"canonical {save_canonical(state, cfg, dst, extra=extra)}", []
    name, arrays = to_layout(state, cfg, target)
    notes = _write_notes(target, cfg)
    if target == "hf":
        from .formats.hf_dir import write_hf_dir

        if suffix:
            raise BadInputError("a Hugging Face model is a directory: give a name without an extension", dst)
        write_hf_dir(dst, arrays, hf.hf_config(cfg))
        return f"Hugging Face {'ViTForImageClassification' if name == 'hf' else 'ViTModel'} directory", notes
    if target == "timm" and not suffix:
        from .formats.hf_dir import write_hf_dir

        write_hf_dir(dst, arrays, timm.timm_config(cfg, source_layout))
        return ("timm model directory (config.json + model.safetensors; "
                "timm.create_model('local-dir:" + str(dst) + "', pretrained=True))"), notes
    if target == "npz":
        from .formats.npz import write_npz

        if suffix != ".npz":
            raise BadInputError("a Google checkpoint needs the .npz extension", dst)
        write_npz(arrays, dst)
        return "Google .npz", notes
    if suffix == ".safetensors":
        from .formats.safetensors_io import save_safetensors

        save_safetensors(arrays, dst)  # no vitconv config: the file is in the foreign layout
    elif suffix in (".pt", ".pth", ".bin"):
        _save_plain_torch(arrays, dst)
    else:
        raise BadInputError(f"{target} state dicts are written as .pth/.pt/.bin or .safetensors"
                            + (" (or a directory: a name without an extension)" if target == "timm" else ""), dst)
    return f"{target} state dict ({suffix[1:]})", notes


def _save_plain_torch(arrays: Dict[str, np.ndarray], dst: Path) -> None:
    """A bare ``{name: tensor}`` state dict, as ``torch.save(model.state_dict())`` writes."""
    import torch

    from .errors import first_line
    from .formats.atomic import atomic_output

    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    with atomic_output(dst) as tmp:
        try:
            torch.save(sd, tmp)
        except RuntimeError as e:
            raise OutputError(f"writing failed ({first_line(e)})", dst) from None


def read_any(src: os.PathLike | str, num_heads: Optional[int] = None, image_size: Optional[int] = None):
    """Read ``src`` in any layout onto the canonical model: ``(layout name, config, state,
    notes, source metadata, weights file)``. ``num_heads`` overrides an assumed head count;
    ``image_size`` resizes the position table as Google's fine-tuning does."""
    source = open_source(src)
    try:
        with given_heads(num_heads):
            read = read_layout(source)
        cfg = read.config
        if num_heads is not None and read.layout.name not in _HEADS_ASSUMED | {"hf", "hf_model"}:
            raise BadInputError(f"--num-heads: the {read.layout.name} layout records the heads", src)
        state = dict(read.tensors())
        notes = _read_notes(read.layout.name, cfg, source.metadata)
        if num_heads is not None:
            notes = [n for n in notes if not n.startswith("heads:")] + [f"heads: {num_heads} (given)"]
        if read.ignored:
            notes.append(f"{len(read.ignored)} keys outside '{read.prefix}' ignored (optimizer state)")
        if image_size is not None and image_size != cfg.image_size:
            if image_size <= 0 or image_size % cfg.total_stride:
                raise BadInputError(f"--image-size {image_size} is not a positive multiple of the "
                                    f"model's stride {cfg.total_stride}", src)
            new = cfg.replace(image_size=image_size)
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], new.grid_size, cfg.num_prefix_tokens)
            notes.append(f"position embeddings resized {cfg.grid_size}x{cfg.grid_size} -> "
                         f"{new.grid_size}x{new.grid_size} (Google's order-1 zoom)")
            cfg = new
        return read.layout.name, cfg, state, notes, dict(source.metadata), source.path
    finally:
        source.close()


def convert(src: os.PathLike | str, dst: os.PathLike | str, to: Optional[str] = None,
            num_heads: Optional[int] = None, image_size: Optional[int] = None) -> ConversionReport:
    """Read ``src`` (any known layout, a Hugging Face directory included), write ``dst`` in
    layout ``to`` (default from ``dst``'s name: :func:`default_target`). Atomic; refuses
    targets that cannot express the model."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise OutputError("output would overwrite the source", dst)
    target = to or default_target(dst)
    if target not in TARGETS:
        raise BadInputError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    layout, cfg, state, notes, _meta, weights = read_any(src, num_heads, image_size)
    digest = sha256_file(weights or src)
    kind, wnotes = write_target(state, cfg, target, dst, extra={"source_sha256": digest, "source": src.name},
                                source_layout=layout)
    n = int(sum(int(np.prod(a.shape)) for a in state.values()))
    return ConversionReport(str(src), layout, digest, cfg, n, str(dst), kind, None, notes + wnotes)
