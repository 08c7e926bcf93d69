"""PyTorch checkpoints (``.pt``/``.pth``/``.bin``), loaded with ``weights_only=True`` only.

A ``.pth`` is a pickle, and unpickling can run arbitrary code; ``weights_only=True``
restricts the unpickler to tensors and plain containers, and we never fall back to
the unrestricted loader (the error says so and names the global the pickle asked for,
rather than suggesting ``weights_only=False`` as torch's own message does). vitconv's own ``.pt`` is ``{"format": "vitconv",
"format_version": 1, "config": {...}, "state_dict": {...}}``: plain types only, so it
loads under the same restriction (writing it: :mod:`vitconv.formats.torch_pt_stream`).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple


from vitconv.errors import BadInputError, first_line, one_line
from vitconv.formats.base import DictSource, tensor_to_numpy
from vitconv.formats.provenance import CONFIG_KEY

FORMAT_NAME = "vitconv"
FORMAT_VERSION = 1
#: Keys under which training scripts commonly nest the weights.
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "params")


def _weights_only_reason(e: Exception) -> Tuple[Optional[str], str]:
    """(the global the pickle asked for, or None; the informative line) from torch's long
    ``weights_only`` message, whose wording changes between releases."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"GLOBAL ([\w.]+)", text)
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation",
              "In PyTorch 2.6", "Re-running", "(1)", "(2)", "This file can still")
    lines = [l.strip().replace("WeightsUnpickler error:", "").strip() for l in text.splitlines()]
    useful = [l for l in lines if l and not l.startswith(boiler)]
    return (m.group(1) if m else None), one_line(useful[0] if useful else type(e).__name__, 200)


def load_torch_file(path: os.PathLike | str) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as a one-line error.
    There is deliberately no fallback to ``weights_only=False``."""
    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 250": a second line
            warnings.simplefilter("ignore")
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        name, reason = _weights_only_reason(e)
        if name:
            raise BadInputError(f"refusing to unpickle: the pickle calls {name}, which could run "
                                "code; torch.load(weights_only=True) allows only tensors and plain "
                                "containers", path) from None
        raise BadInputError(f"not a readable PyTorch checkpoint (weights_only unpickler: {reason})",
                            path) from None
    except MemoryError:
        raise BadInputError("not a readable PyTorch checkpoint (declares more data than fits in "
                            "memory)", path) from None
    except Exception as e:  # truncated zips, bad magic, wrong storage sizes ...
        raise BadInputError(f"not a readable PyTorch checkpoint ({first_line(e)})", path) from None


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
        bad = [k for k in tensors if not isinstance(k, str)]
        if bad:
            raise BadInputError(f"state dict has non-string key(s): {one_line(repr(bad[:3]), 120)}", path)
        if tensors:
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module."):]: v for k, v in tensors.items()}
            return tensors
    raise BadInputError("holds no state dict (no mapping of names to tensors found)", path)


#: The entries of vitconv's ``.pt`` wrapper that are not provenance strings.
_PAYLOAD_KEYS = ("format", "format_version", "config", "state_dict")


def open_torch(path: os.PathLike | str) -> DictSource:
    obj = load_torch_file(path)
    meta: Dict[str, str] = {}
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT_NAME:
        try:  # handed on as JSON text, as safetensors metadata carries it; validated by the layout
            meta[CONFIG_KEY] = json.dumps(obj.get("config"))
        except (TypeError, ValueError, RecursionError) as e:
            raise BadInputError(f"vitconv config is not plain data ({first_line(e)})", path) from None
        # every provenance string the writer recorded beside the config and the weights (as a
        # safetensors header keeps them all): a batch rerun decides from its row and fingerprint
        for k, v in obj.items():
            if isinstance(k, str) and k not in _PAYLOAD_KEYS and isinstance(v, str):
                meta[k] = v
    tensors = flatten_state_dict(obj, os.fspath(path))
    return DictSource({k: tensor_to_numpy(v, k, path) for k, v in tensors.items()},
                      path=os.fspath(path), metadata=meta)
