"""Hugging Face model directories: ``config.json`` beside ``model.safetensors`` (or a
``pytorch_model.bin``, read with ``weights_only=True``). Writing one is the pipeline's job
(:func:`vitconv.formats.atomic.atomic_directory` plus the ordinary writers).

The weights file is opened by the ordinary readers; ``config.json`` and
``preprocessor_config.json`` are parsed here, once, into the source's read-only ``documents``:
every reader after this one (the layouts read ``config.json`` for what shapes cannot say:
heads, ``layer_norm_eps``, ``hidden_act``; :mod:`vitconv.runtime.preprocess` the model's preprocessing)
gets the same mapping, and a malformed file is refused here, in one line naming it. Sharded
weights are read through their ``*.index.json`` (:mod:`vitconv.formats.sharded`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Mapping

from vitconv.errors import BadInputError
from vitconv.formats.base import TensorSource
from vitconv.formats.json_doc import read_json
from vitconv.formats.json_doc import ReadOnlyDict, read_only

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: Sharded weights (``save_pretrained`` above ``max_shard_size``): read through the index.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: The JSON files of a model directory read beside its weights (its ``documents``).
CONFIG_JSON, PREPROCESSOR_JSON = "config.json", "preprocessor_config.json"
JSON_FILES = (CONFIG_JSON, PREPROCESSOR_JSON)


class _DirSource(TensorSource):
    """The weights file's source, with the directory's JSON files as its ``documents``."""

    def __init__(self, inner: TensorSource, directory: Path, documents: Mapping[str, Mapping[str, Any]]):
        self._inner, self.path, self._dir = inner, os.fspath(directory), directory
        self.metadata, self.documents = dict(inner.metadata), documents
        self.concurrent_reads = inner.concurrent_reads

    def keys(self) -> List[str]:
        return self._inner.keys()

    def files(self) -> List[Path]:
        return self._inner.files() + [self._dir / n for n in JSON_FILES if n in self.documents]

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
    return _DirSource(open_weights(weights), d, read_documents(d))


def read_documents(directory: os.PathLike | str) -> Mapping[str, Mapping[str, Any]]:
    """The directory's :data:`JSON_FILES` that are there, each parsed (a JSON object, or a
    one-line error naming the file) and read-only: the only place they are decoded."""
    d, out = Path(directory), {}
    for name in JSON_FILES:
        if (d / name).is_file():
            doc = read_json(d / name, name)
            if not isinstance(doc, dict):
                raise BadInputError(f"{name} is not a JSON object", d / name)
            out[name] = read_only(doc)
    return ReadOnlyDict(out)
