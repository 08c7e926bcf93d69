"""Sharded checkpoints, Hugging Face's convention: ``NAME.safetensors.index.json`` (or
``pytorch_model.bin.index.json``) maps each tensor to the shard file that holds it.

vitconv writes this layout above 5 GB (``npz2pt``, ``export --safetensors``) and Hugging Face
writes it for any model above ``max_shard_size``, so the index is read as one lazy source:
shards are opened by the ordinary readers (``weights_only`` for torch shards), each tensor
is read from the shard the index names. The index is checked against the shards before any
weight is read, because a stale index (a shard rewritten, a file missing) would otherwise
surface as a wrong or missing tensor far from its cause. Shard names must be plain file
names beside the index: an index cannot point outside its directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from vitconv.errors import BadInputError
from vitconv.formats.base import TensorSource
from vitconv.formats.json_doc import read_json


def _is_file(p: Path) -> bool:
    """``p.is_file()``, False for a name the file system refuses (past 255 bytes: Python 3.11
    raises there)."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


class ShardedSource(TensorSource):
    """``open_shard`` opens one shard file (:func:`vitconv.formats.open.open_source`)."""

    def __init__(self, index: os.PathLike | str, open_shard: Callable[[Path], TensorSource]):
        self.path = os.fspath(index)
        idx = Path(index)
        doc = read_json(idx, "shard index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInputError("shard index has no weight_map", idx)
        for k, f in weight_map.items():
            if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
                raise BadInputError(f"shard index maps {k!r} to {f!r}, not a file name beside the index", idx)
            if f.endswith(".index.json"):  # itself, or a cycle of indexes: shards hold weights
                raise BadInputError(f"shard index maps {k!r} to {f!r}, another index, not a weights file", idx)
        meta = doc.get("metadata") or {}
        if not isinstance(meta, dict):
            raise BadInputError("shard index metadata is not an object", idx)
        self._where: Dict[str, str] = dict(weight_map)
        self._shards: Dict[str, TensorSource] = {}
        names = sorted(set(weight_map.values()))
        absent = [n for n in names if not _is_file(idx.parent / n)]
        if absent:
            raise BadInputError(f"shard {absent[0]} named by the index is missing"
                                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""), idx)
        try:
            for name in names:
                src = open_shard(idx.parent / name)
                self._shards[name] = src
                held = set(src.keys())
                listed = {k for k, f in weight_map.items() if f == name}
                if held != listed:
                    extra, missing = sorted(held - listed), sorted(listed - held)
                    raise BadInputError(f"index and shard {name} disagree: "
                                        + (f"{len(missing)} listed but absent ({', '.join(missing[:3])})"
                                           if missing else f"{len(extra)} not in the index "
                                           f"({', '.join(extra[:3])})"), idx)
        except BaseException:
            self.close()
            raise
        first = self._shards[min(self._shards)]
        self.metadata = dict(first.metadata)
        for k, v in meta.items():  # the shards' own metadata (parsed, checked) wins
            if k != "total_size":
                self.metadata.setdefault(str(k), str(v))

    def keys(self) -> List[str]:
        return list(self._where)

    def files(self) -> List[Path]:
        return [Path(self.path)] + [f for s in self._shards.values() for f in s.files()]

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._shards[self._where[key]].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._shards[self._where[key]].get(key)

    def stored_dtype(self, key: str) -> str:
        return self._shards[self._where[key]].stored_dtype(key)

    def close(self) -> None:
        for s in self._shards.values():
            s.close()
        self._shards = {}
