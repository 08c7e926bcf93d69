"""Hugging Face model directories: ``config.json`` beside ``model.safetensors`` (or a
``pytorch_model.bin``, read with ``weights_only=True``), and writing one atomically.

The weights file is opened by the ordinary readers; ``config.json`` travels as the
``hf_config`` metadata string, which the Hugging Face layout reads for what shapes cannot
say (heads, ``layer_norm_eps``, ``hidden_act``). Sharded weights are read through their
``*.index.json`` (:mod:`vitconv.formats.sharded`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BadInputError, OutputError
from .base import TensorSource

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Sharded weights (``save_pretrained`` above ``max_shard_size``): read through the index.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def open_hf_dir(path: os.PathLike | str) -> TensorSource:
    d = Path(path)
    weights = next((d / n for n in WEIGHT_FILES + INDEX_FILES if (d / n).is_file()), None)
    if weights is None:
        raise BadInputError("is a directory without model.safetensors or pytorch_model.bin "
                            "(or their shard index): not a Hugging Face model directory", d)
    cfg_text = None
    if (d / "config.json").is_file():
        try:
            cfg_text = (d / "config.json").read_text(encoding="utf-8")
            if not isinstance(json.loads(cfg_text), dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BadInputError(f"config.json is not valid JSON ({e})", d / "config.json") from None
    from .base import open_source

    src = open_source(weights)
    if cfg_text is not None:
        src.metadata = dict(src.metadata)
        src.metadata["hf_config"] = cfg_text
    return src


def write_hf_dir(path: os.PathLike | str, tensors: Mapping[str, np.ndarray], config: dict) -> None:
    """Write ``config.json`` + ``model.safetensors`` into a fresh directory beside ``path``
    and rename it into place: never a half-written model directory under the final name.
    An existing directory is replaced only if it is empty."""
    import torch
    from safetensors.torch import save_file

    final = Path(path)
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write here: directory {parent} does not exist", final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise OutputError("exists and is not an empty directory; remove it or pick another name", final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write here: {e.strerror or e}", final) from None
    try:
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if final.exists():
            final.rmdir()
        os.rename(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"cannot write the model directory ({e})", final) from None
