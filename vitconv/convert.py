"""File-to-file conversion with a report: the library call behind ``npz2pt`` and ``convert``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .checkpoint import output_kind, param_count, read_canonical, save_canonical
from .config import ViTConfig
from .errors import OutputError
from .formats.atomic import check_writable
from .formats.base import sha256_file


@dataclass
class ConversionReport:
    source: str
    layout: str
    source_sha256: str
    config: ViTConfig
    num_params: int
    output: str
    output_kind: str
    resized: Optional[Tuple[int, int]] = None
    notes: List[str] = field(default_factory=list)

    def rows(self) -> List[Tuple[str, str]]:
        rows = [("read", f"{self.source} ({self.layout} layout, sha256 {self.source_sha256[:12]}…)"),
                ("model", self.config.describe()),
                ("params", f"{self.num_params:,}")]
        if self.resized:
            a, b = self.resized
            rows.append(("resized", f"position embeddings {a}x{a} -> {b}x{b} grid "
                                    "(Google's order-1 zoom, class token kept)"))
        rows += [("note", n) for n in self.notes]
        rows.append(("wrote", f"{self.output} ({self.output_kind})"))
        return rows


def refuse_overwrite(src: Path, dst: Path) -> None:
    """Writing onto the file being read would destroy the source mid-read."""
    if dst.exists() and src.resolve() == dst.resolve():
        raise OutputError("output would overwrite the source", dst)


def convert_file(src: os.PathLike | str, dst: os.PathLike | str, image_size: Optional[int] = None,
                 require_layout: Optional[str] = None,
                 progress: Optional[Callable[[int, int, str], None]] = None) -> ConversionReport:
    """Read ``src`` (any layout vitconv knows), map it onto the canonical ViT and write
    ``dst`` (``.pt``/``.safetensors`` canonical, ``.npz`` Google layout), atomically.

    Canonical outputs stream (:func:`vitconv.stream.stream_convert`): one tensor read,
    mapped and written at a time, so memory stays flat whatever the model's size.
    ``progress(done, total, name)`` is called after each tensor there."""
    src, dst = Path(src), Path(dst)
    check_writable(dst)  # fail before reading a multi-GB source, not after
    if output_kind(dst) in ("pt", "safetensors"):
        from .stream import stream_convert

        return stream_convert(src, dst, image_size=image_size, require_layout=require_layout,
                              progress=progress)
    refuse_overwrite(src, dst)
    c = read_canonical(src, image_size=image_size, require_layout=require_layout)
    try:
        state = c.state_dict()
    finally:
        c.read.source.close()
    digest = sha256_file(src)
    kind = save_canonical(state, c.config, dst, extra={"source_sha256": digest, "source": src.name})
    notes = [c.info["ignored"]] if "ignored" in c.info else []
    resized = (c.resized_from, c.config.grid_size) if c.resized_from is not None else None
    return ConversionReport(str(src), c.read.layout.name, digest, c.config, param_count(state),
                            str(dst), kind, resized, notes)
