"""``.safetensors`` read through ``safe_open`` (memory-mapped, one tensor at a time).

The Rust reader validates the header (length, JSON, dtypes, offsets inside the file)
before handing anything out; every failure it reports becomes a :class:`BadInputError`
naming the file. ``__metadata__`` is handed on as strings (a vitconv config in it is the
canonical layout's to validate). Writing is :mod:`vitconv.formats.safetensors_stream`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from safetensors import safe_open

from ..errors import BadInputError, first_line
from .base import DictSource, TensorSource, tensor_to_numpy


#: safetensors' dtype codes as numpy-style names.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class SafetensorsSource(TensorSource):
    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        try:
            self._f = safe_open(self.path, framework="pt")
            self._keys = list(self._f.keys())
            self.metadata = dict(self._f.metadata() or {})
        except Exception as e:
            raise BadInputError(f"invalid safetensors file ({first_line(e)})", self.path) from None

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        try:
            return tuple(int(n) for n in self._f.get_slice(key).get_shape())
        except Exception as e:
            raise BadInputError(f"tensor {key!r} has no readable shape ({first_line(e)})", self.path) from None

    def stored_dtype(self, key: str) -> str:
        code = self._f.get_slice(key).get_dtype()
        return SAFETENSORS_DTYPES.get(code, code.lower())

    def get(self, key: str) -> np.ndarray:
        try:
            t = self._f.get_tensor(key)
        except Exception as e:
            raise BadInputError(f"tensor {key!r} could not be read ({first_line(e)})", self.path) from None
        return tensor_to_numpy(t, key, self.path)

    def close(self) -> None:
        self._f = None


def read_back(paths: Sequence[Path]) -> DictSource:
    """Every tensor of the written data files (a file and its shards) with the first file's
    metadata: how a written output is read back for verification, before it is renamed."""
    tensors: Dict[str, np.ndarray] = {}
    meta: Dict[str, str] = {}
    for p in paths:
        with SafetensorsSource(p) as f:
            meta = meta or dict(f.metadata)
            for k in f.keys():
                tensors[k] = f.get(k)
    return DictSource(tensors, os.fspath(paths[0]), meta)
