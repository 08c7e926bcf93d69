"""Hugging Face model directories: ``config.json`` beside ``model.safetensors`` (or a
``pytorch_model.bin``, read with ``weights_only=True``). Writing one is the pipeline's job
(:func:`vitconv.formats.atomic.atomic_directory` plus the ordinary writers).

The weights file is opened by the ordinary readers; ``config.json`` travels as the
``hf_config`` metadata string, which the Hugging Face layout reads for what shapes cannot
say (heads, ``layer_norm_eps``, ``hidden_act``), and ``preprocessor_config.json`` as
``hf_preprocessor`` (the model's preprocessing, :mod:`vitconv.runtime.preprocess`). Sharded weights are read through their
``*.index.json`` (:mod:`vitconv.formats.sharded`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, List

from vitconv.errors import BadInputError
from vitconv.formats.base import TensorSource
from vitconv.formats.json_doc import read_json

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Sharded weights (``save_pretrained`` above ``max_shard_size``): read through the index.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: JSON files beside the weights -> the metadata key their text travels under.
JSON_FILES = {"config.json": "hf_config", "preprocessor_config.json": "hf_preprocessor"}


class _DirSource(TensorSource):
    """The weights file's source, with ``config.json`` as the ``hf_config`` metadata string."""

    def __init__(self, inner: TensorSource, directory: Path, texts: Dict[str, str]):
        self._inner, self.path, self._dir = inner, os.fspath(directory), directory
        self.metadata = {**inner.metadata, **texts}
        self.concurrent_reads = inner.concurrent_reads

    def keys(self) -> List[str]:
        return self._inner.keys()

    def files(self) -> List[Path]:
        return self._inner.files() + [self._dir / n for n in JSON_FILES if (self._dir / n).is_file()]

    def shape(self, key: str):
        return self._inner.shape(key)

    def dtype(self, key: str):
        return self._inner.dtype(key)

    def stored_dtype(self, key: str) -> str:
        return self._inner.stored_dtype(key)

    def get(self, key: str):
        return self._inner.get(key)

    def close(self) -> None:
        self._inner.close()


def open_hf_dir(path: os.PathLike | str, open_weights: Callable[[Path], TensorSource]) -> TensorSource:
    """``open_weights`` opens the weights file (:func:`vitconv.formats.open.open_source`)."""
    d = Path(path)
    weights = next((d / n for n in WEIGHT_FILES + INDEX_FILES if (d / n).is_file()), None)
    if weights is None:
        raise BadInputError("is a directory without model.safetensors or pytorch_model.bin "
                            "(or their shard index): not a Hugging Face model directory", d)
    texts = {}
    for name, key in JSON_FILES.items():
        if (d / name).is_file():
            doc = read_json(d / name, name)
            if not isinstance(doc, dict):
                raise BadInputError(f"{name} is not a JSON object", d / name)
            texts[key] = json.dumps(doc)  # parsed once, so the layouts read checked text
    return _DirSource(open_weights(weights), d, texts)
