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

from .checkpoint import read_canonical, save_canonical
from .config import ViTConfig
from .convert import ConversionReport
from .errors import BadInputError, MappingError, OutputError
from .formats.base import sha256_file
from .layouts import LAYOUTS, write_layout
from .rules import hf, timm
from .rules.pytorch_infer import HEADS_NOTE

#: ``--to`` names -> the layout written ("hf" picks ViTForImageClassification or ViTModel).
TARGETS = ("canonical", "npz", "timm", "timm_posembs", "hf", "jeonsworld", "lucidrains", "lucidrains_prenorm")


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


def _layout_for(target: str, cfg: ViTConfig):
    """The layout a ``--to`` name writes ("npz" is Google's; "hf" picks by the classifier)."""
    return LAYOUTS[{"npz": "google", "hf": hf.target_layout(cfg)}.get(target, target)]


def _problems(target: str, cfg: ViTConfig) -> List[str]:
    layout = _layout_for(target, cfg)
    out = []
    if cfg.distilled and not layout.holds_distillation:
        out.append("DeiT distillation token and head_dist (written only as canonical or timm)")
    return out + layout.write_problems(cfg)


def _read_notes(layout: str, cfg: ViTConfig, metadata: Dict[str, str]) -> List[str]:
    read = LAYOUTS[layout]
    notes = [] if read.heads_recorded(metadata) else [HEADS_NOTE.format(h=cfg.num_heads, d=cfg.head_dim)]
    return notes + read.read_notes(cfg, metadata)


def to_layout(state: Dict[str, np.ndarray], cfg: ViTConfig, target: str) -> Tuple[str, Dict[str, np.ndarray]]:
    """Canonical state -> ``(layout name, {key: array})`` for ``target`` (a ``--to`` name),
    refusing with every reason when the target cannot express the model."""
    if target not in TARGETS:
        raise BadInputError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    problems = _problems(target, cfg)
    if problems:
        raise MappingError(f"the {target} layout cannot express this model: " + "; ".join(problems))
    layout = _layout_for(target, cfg)
    arrays = write_layout(state, cfg, layout)
    return layout.name, {k: arrays[k] for k in sorted(arrays)}


def write_target(state: Dict[str, np.ndarray], cfg: ViTConfig, target: str, dst: os.PathLike | str,
                 extra: Optional[Dict[str, str]] = None,
                 source_layout: Optional[str] = None) -> Tuple[str, List[str]]:
    """Write ``target`` to ``dst`` atomically; returns (what was written, notes).
    ``source_layout`` lets a timm directory record Google's preprocessing."""
    dst = Path(dst)
    suffix = dst.suffix.lower()
    if target == "canonical":
        if suffix not in (".pt", ".pth", ".bin", ".safetensors"):
            raise BadInputError("a canonical checkpoint needs .pt, .pth, .bin or .safetensors", dst)
        return f"canonical {save_canonical(state, cfg, dst, extra=extra)}", []
    name, arrays = to_layout(state, cfg, target)
    notes = LAYOUTS[name].write_notes(cfg)
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
    c = read_canonical(src, image_size=image_size, num_heads=num_heads)
    source, read = c.read.source, c.read
    try:
        state = c.state_dict()
        notes = _read_notes(read.layout.name, read.config, source.metadata)
        if num_heads is not None:
            notes = [n for n in notes if not n.startswith("heads:")] + [f"heads: {num_heads} (given)"]
        if read.ignored:
            notes.append(f"{len(read.ignored)} keys outside '{read.prefix}' ignored (optimizer state)")
        if c.resized_from is not None:
            g = c.config.grid_size
            notes.append(f"position embeddings resized {c.resized_from}x{c.resized_from} -> {g}x{g} "
                         "(Google's order-1 zoom)")
        return read.layout.name, c.config, state, notes, dict(source.metadata), source.path
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
