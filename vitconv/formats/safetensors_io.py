"""``.safetensors`` read through ``safe_open`` (memory-mapped, one tensor at a time) and
written with ``format: pt`` plus vitconv's config in ``__metadata__``."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import BadInputError
from .atomic import atomic_output
from .base import TensorSource

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
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInputError(f"invalid safetensors file ({msg[:200]})", self.path) from None

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        import torch

        try:
            t = self._f.get_tensor(key)
        except Exception as e:
            raise BadInputError(f"tensor {key!r} could not be read ({e})", self.path) from None
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()


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
    with atomic_output(path) as tmp:
        save_file(data, os.fspath(tmp), metadata=meta)
