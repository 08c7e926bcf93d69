"""The reader interface and the dispatcher that picks a reader by content, not by name."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import BadInputError


class TensorSource:
    """Lazy, read-only mapping of tensor names to numpy arrays.

    ``metadata`` holds format-level strings (safetensors ``__metadata__``, the config a
    vitconv ``.pt`` carries); ``path`` names the file in every error."""

    path: Optional[str] = None
    metadata: Dict[str, str]

    def keys(self) -> List[str]:
        raise NotImplementedError

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        return self.get(key).dtype

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

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


def sniff(path: Path) -> str:
    """Format of ``path`` by its first bytes: ``zip`` (npz or torch zip), ``safetensors``,
    ``pickle`` (legacy torch), ``onnx``, ``dir``; raises :class:`BadInputError` otherwise."""
    if path.is_dir():
        return "dir"
    if not path.exists():
        raise BadInputError("no such file", path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise BadInputError(f"cannot read: {e.strerror or e}", path) from None
    if not head:
        raise BadInputError("file is empty", path)
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if path.suffix == ".onnx":
        return "onnx"
    raise BadInputError("not a checkpoint vitconv can read (expected .npz, .pt/.pth/.bin, "
                        ".safetensors)", path)


def open_source(path: os.PathLike | str) -> TensorSource:
    """Open any supported checkpoint file as a lazy :class:`TensorSource`."""
    p = Path(path)
    kind = sniff(p)
    if kind == "zip":
        import zipfile

        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise BadInputError(f"corrupt zip archive ({e})", p) from None
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
    if kind == "dir":
        raise BadInputError("is a directory; expected a checkpoint file", p)
    raise BadInputError(f"{kind} files hold no weights vitconv converts", p)
