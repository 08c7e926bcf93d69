"""The reader interface and the dispatcher that picks a reader by content, not by name."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import BadInputError, first_line


class TensorSource:
    """Lazy, read-only mapping of tensor names to numpy arrays.

    ``metadata`` holds format-level strings (safetensors ``__metadata__``, the config a
    vitconv ``.pt`` carries); ``path`` names the file in every error."""

    path: Optional[str] = None
    metadata: Dict[str, str]
    #: ``get`` may run on another thread while this one calls ``get`` too (positional
    #: reads, nothing shared moves); streaming conversion then reads ahead
    #: (:mod:`vitconv.readahead`).
    concurrent_reads: bool = False

    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        return self.get(key).dtype

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        """Size of ``key``'s data, from its header alone (nothing is read)."""
        return int(np.prod(self.shape(key), dtype=np.int64)) * np.dtype(self.dtype(key)).itemsize

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DictSource(TensorSource):
    """A source over arrays already in memory (tests, state dicts)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], path: Optional[str] = None,
                 metadata: Optional[Dict[str, str]] = None):
        self._arrays = dict(arrays)
        self.path = path
        self.metadata = dict(metadata or {})

    def keys(self) -> List[str]:
        return list(self._arrays)

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self._arrays[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self._arrays[key].dtype

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._arrays[key])


def sha256_file(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _is_int(v: Any) -> bool:
    return type(v) is int


#: What each ViTConfig annotation admits in JSON. Unlisted annotations go unchecked here
#: (``ViTConfig`` still validates what it knows).
_JSON_TYPES = {
    "int": _is_int,
    "Optional[int]": lambda v: v is None or _is_int(v),
    "bool": lambda v: type(v) is bool,
    "float": lambda v: type(v) in (int, float),
    "str": lambda v: type(v) is str,
    "Optional[str]": lambda v: v is None or type(v) is str,
    "Optional[Tuple[int, ...]]": lambda v: v is None or (isinstance(v, list) and all(map(_is_int, v))),
}


def parse_vitconv_config(raw: Any, path: Optional[os.PathLike | str]) -> str:
    """Validate the config a vitconv ``.pt``/``.safetensors`` carries (a dict or its JSON)
    and return it as JSON. Files are untrusted: a config that is not a valid
    :class:`~vitconv.config.ViTConfig`, down to each field's type, is a bad input here
    rather than a crash deep inside model construction."""
    import dataclasses

    from ..config import ViTConfig

    try:
        d = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (ValueError, RecursionError) as e:
        raise BadInputError(f"vitconv_config metadata is not valid JSON ({first_line(e)})", path) from None
    if isinstance(d, dict) and isinstance(d.get("resnet_layers"), tuple):
        d = {**d, "resnet_layers": list(d["resnet_layers"])}
    if not isinstance(d, dict):
        raise BadInputError(f"vitconv_config must be a JSON object, got {type(d).__name__}", path)
    bad = [f.name for f in dataclasses.fields(ViTConfig)
           if f.name in d and not _JSON_TYPES.get(str(f.type), lambda v: True)(d[f.name])]
    if bad:
        raise BadInputError(f"vitconv_config field(s) of the wrong type: {', '.join(bad)}", path)
    try:
        cfg = ViTConfig.from_dict(d)
    except (TypeError, ValueError, OverflowError) as e:
        raise BadInputError(f"invalid vitconv_config ({first_line(e)})", path) from None
    return cfg.to_json()


def tensor_to_numpy(t: Any, key: str, path: Optional[os.PathLike | str]) -> np.ndarray:
    """A torch tensor as a numpy array; dtypes numpy lacks (bfloat16, float8) widen to
    float32, which holds them exactly. Sparse, quantized or otherwise exotic tensors
    are a bad input with the key named."""
    import torch

    try:
        t = t.detach().cpu()
        if t.layout != torch.strided:
            raise TypeError(f"{t.layout} layout")
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()
        return t.numpy()
    except (TypeError, RuntimeError, ValueError) as e:
        raise BadInputError(f"tensor {key!r} cannot be read as an array ({first_line(e)})", path) from None


def sniff(path: Path) -> str:
    """Format of ``path`` by its first bytes: ``zip`` (npz or torch zip), ``safetensors``,
    ``pickle`` (legacy torch), ``onnx``, ``dir``, ``index`` (a shard index); raises :class:`BadInputError` otherwise."""
    if path.is_dir():
        return "dir"
    if not path.exists():
        raise BadInputError("no such file", path)
    if not path.is_file():  # FIFOs and devices would block or never end
        raise BadInputError("not a regular file", path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise BadInputError(f"cannot read: {e.strerror or e}", path) from None
    if not head:
        raise BadInputError("file is empty", path)
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if path.name.endswith(".index.json"):
        return "index"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if path.suffix == ".onnx":
        return "onnx"
    raise BadInputError("not a checkpoint vitconv can read (expected .npz, .pt/.pth/.bin, "
                        ".safetensors, a shard index .index.json)", path)


def open_source(path: os.PathLike | str) -> TensorSource:
    """Open any supported checkpoint file as a lazy :class:`TensorSource`."""
    p = Path(path)
    kind = sniff(p)
    if kind == "zip":
        import zipfile

        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except Exception as e:  # BadZipFile, NotImplementedError ("zip file version 10.9"), ...
            raise BadInputError(f"corrupt or truncated zip archive ({first_line(e)})", p) from None
        if any(n.endswith(".npy") for n in names) and not any(n.endswith("data.pkl") for n in names):
            from .npz import NpzSource

            return NpzSource(p)
        from .torch_pt import open_torch

        return open_torch(p)
    if kind == "pickle":
        from .torch_pt import open_torch

        return open_torch(p)
    if kind == "safetensors":
        from .safetensors_io import SafetensorsSource

        return SafetensorsSource(p)
    if kind == "index":
        from .sharded import ShardedSource  # Hugging Face's sharded convention

        return ShardedSource(p)
    if kind == "dir":
        from .hf_dir import open_hf_dir  # a Hugging Face model directory

        return open_hf_dir(p)
    raise BadInputError(f"{kind} files hold no weights vitconv converts", p)
