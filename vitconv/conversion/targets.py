"""Where an output goes: the one place that maps an output path to a container and a ``--to``
name to the layouts it may write.

Containers: ``.safetensors``; ``.pt``/``.pth``/``.bin`` (a ``torch.save`` archive); ``.npz``;
and a model directory (a name without an extension, or an existing directory). Without
``--to`` the container picks the layout: ``.npz`` is Google's, a directory Hugging Face's,
a single file the canonical layout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

from vitconv.errors import BadInputError
from vitconv.layouts import Layout, targets

SUFFIXES = {".npz": "npz", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt"}
#: The layout written when ``--to`` is not given, by container.
DEFAULT_TARGET = {"npz": "npz", "dir": "hf", "safetensors": "canonical", "pt": "canonical"}
_CONTAINER_WORDS = {"npz": "a .npz file", "safetensors": "a .safetensors file",
                    "pt": "a .pt/.pth/.bin file", "dir": "a directory (a name without an extension)"}


def target_names() -> Tuple[str, ...]:
    """Every ``--to`` name, from the layout registry."""
    return tuple(targets())


def container_of(path: os.PathLike | str) -> str:
    """``safetensors``, ``pt``, ``npz`` or ``dir`` for an output path."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if p.is_dir() or not suffix:
        return "dir"
    raise BadInputError(f"cannot tell the output format from the extension {suffix!r} (use "
                        f"{', '.join(sorted(SUFFIXES))}, or a name without an extension for a directory)",
                        path)


def candidates(dst: os.PathLike | str, to: Optional[str]) -> Tuple[str, str, List[Layout]]:
    """``(target name, container, layouts)`` for writing ``dst``: the layouts of ``to`` (or the
    container's default) that can be written in ``dst``'s container, in preference order."""
    container = container_of(dst)
    name = to or DEFAULT_TARGET[container]
    known = targets()
    if name not in known:
        raise BadInputError(f"unknown target {name!r} (known: {', '.join(known)})")
    layouts = [l for l in known[name] if container in l.containers]
    if not layouts:
        can = sorted({c for l in known[name] for c in l.containers})
        raise BadInputError(f"the {name} layout is written as " + " or ".join(_CONTAINER_WORDS[c] for c in can)
                            + f", not {_CONTAINER_WORDS[container]}", dst)
    return name, container, layouts
