"""PyTorch checkpoints (``.pt``/``.pth``/``.bin``), loaded with ``weights_only=True`` only.

A ``.pth`` is a pickle, and unpickling can run arbitrary code; ``weights_only=True``
restricts the unpickler to tensors and plain containers, and we never fall back to
the unrestricted loader. vitconv's own ``.pt`` is ``{"format": "vitconv",
"format_version": 1, "config": {...}, "state_dict": {...}}``: plain types only, so it
loads under the same restriction.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..errors import BadInputError
from .atomic import atomic_output
from .base import DictSource

FORMAT_NAME = "vitconv"
FORMAT_VERSION = 1
#: Keys under which training scripts commonly nest the weights.
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "params")


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    return t.numpy()


def load_torch_file(path: os.PathLike | str) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as a one-line error."""
    import torch

    try:
        return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise BadInputError("refusing to unpickle: the file holds objects other than tensors and "
                            f"plain containers, which could run code ({first[:200]})", path) from None
    except Exception as e:  # truncated zips, bad magic, wrong storage sizes ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"not a readable PyTorch checkpoint ({msg[:200]})", path) from None


def flatten_state_dict(obj: Any, path: Optional[str] = None) -> Dict[str, Any]:
    """Find the ``{name: tensor}`` mapping in a loaded checkpoint (unwrapping ``model``,
    ``state_dict`` …, stripping a DataParallel ``module.`` prefix)."""
    import torch

    if isinstance(obj, Mapping):
        for w in _WRAPPERS:
            if w in obj and isinstance(obj[w], Mapping) and not isinstance(obj.get(w), torch.Tensor):
                inner = obj[w]
                if any(isinstance(v, torch.Tensor) for v in inner.values()):
                    return flatten_state_dict(inner, path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module."):]: v for k, v in tensors.items()}
            return tensors
    raise BadInputError("holds no state dict (no mapping of names to tensors found)", path)


def open_torch(path: os.PathLike | str) -> DictSource:
    obj = load_torch_file(path)
    meta: Dict[str, str] = {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        meta["vitconv_config"] = json.dumps(obj.get("config"))
        for k in ("source_sha256", "source"):
            if k in obj:
                meta[k] = str(obj[k])
    tensors = flatten_state_dict(obj, os.fspath(path))
    return DictSource({k: _to_numpy(v) for k, v in tensors.items()}, path=os.fspath(path), metadata=meta)


def save_vitconv_pt(state_dict: Mapping[str, Any], config: dict, path: os.PathLike | str,
                    extra: Optional[Mapping[str, str]] = None) -> None:
    """Write vitconv's ``.pt`` (state dict + config), atomically."""
    import torch

    payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": dict(config),
               "state_dict": {k: torch.as_tensor(v).contiguous() for k, v in state_dict.items()}}
    payload.update(dict(extra or {}))
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
