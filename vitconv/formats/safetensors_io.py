"""``.safetensors`` read through ``safe_open`` (memory-mapped, one tensor at a time) and
written with ``format: pt`` plus vitconv's config in ``__metadata__``.

The Rust reader validates the header (length, JSON, dtypes, offsets inside the file)
before handing anything out; every failure it reports, and a vitconv config in the
metadata that is not a valid one, becomes a :class:`BadInputError` naming the file."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import BadInputError, OutputError, first_line
from .atomic import atomic_output
from .base import TensorSource, parse_vitconv_config, tensor_to_numpy

CONFIG_KEY = "vitconv_config"


class SafetensorsSource(TensorSource):
    def __init__(self, path: os.PathLike | str):
        from safetensors import safe_open

        self.path = os.fspath(path)
        try:
            self._f = safe_open(self.path, framework="pt")
            self._keys = list(self._f.keys())
            self.metadata = dict(self._f.metadata() or {})
        except Exception as e:
            raise BadInputError(f"invalid safetensors file ({first_line(e)})", self.path) from None
        if CONFIG_KEY in self.metadata:
            self.metadata[CONFIG_KEY] = parse_vitconv_config(self.metadata[CONFIG_KEY], self.path)

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        try:
            return tuple(int(n) for n in self._f.get_slice(key).get_shape())
        except Exception as e:
            raise BadInputError(f"tensor {key!r} has no readable shape ({first_line(e)})", self.path) from None

    def get(self, key: str) -> np.ndarray:
        try:
            t = self._f.get_tensor(key)
        except Exception as e:
            raise BadInputError(f"tensor {key!r} could not be read ({first_line(e)})", self.path) from None
        return tensor_to_numpy(t, key, self.path)

    def close(self) -> None:
        self._f = None


def save_safetensors(tensors: Mapping[str, object], path: os.PathLike | str,
                     config: Optional[dict] = None, extra: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` with ``{"format": "pt", "vitconv_config": json}`` metadata, atomically."""
    import torch
    from safetensors.torch import save_file

    meta: Dict[str, str] = {"format": "pt"}
    if config is not None:
        meta[CONFIG_KEY] = json.dumps(config, sort_keys=True)
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    data = {k: torch.as_tensor(v).contiguous() for k, v in tensors.items()}
    from safetensors import SafetensorError

    with atomic_output(path) as tmp:
        try:
            save_file(data, os.fspath(tmp), metadata=meta)
        except SafetensorError as e:  # the Rust writer's I/O errors (ENOSPC ...) land here
            raise OutputError(f"writing failed ({first_line(e)})", path) from None
