"""A source whose blocks are stacked along a leading axis (big_vision's ``scan=True``: one
``Transformer/encoderblock/LayerNorm_0/scale`` of shape ``(depth, D)`` for all blocks), seen
as one key per block (``Transformer/encoderblock_{i}/LayerNorm_0/scale``), so the layout's
per-block table reads it unchanged.

Each per-block key reads its slice alone where the source can (:meth:`NpzSource.get_index`):
the stacked array is read once over all its slices, never whole, and memory stays that of
one block's tensor.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

from vitconv.formats.base import TensorSource


class StackedSource(TensorSource):
    """``source`` with every key under ``stacked`` (a key prefix) split along axis 0 into
    ``per_block`` keys (the same prefix with ``{i}``)."""

    def __init__(self, source: TensorSource, stacked: str, per_block: str):
        self.inner, self.path, self.metadata, self.documents = source, source.path, source.metadata, source.documents
        self.concurrent_reads = source.concurrent_reads
        self._split: Dict[str, Tuple[str, int]] = {}
        self._keys: List[str] = []
        for k in source.keys():
            if not k.startswith(stacked):
                self._keys.append(k)
                continue
            rest = k[len(stacked):]
            for i in range(source.shape(k)[0] if source.shape(k) else 0):
                name = per_block.format(i=i) + rest
                self._split[name] = (k, i)
                self._keys.append(name)

    def keys(self) -> List[str]:
        return list(self._keys)

    def files(self):
        return self.inner.files()

    def shape(self, key: str) -> Tuple[int, ...]:
        if key in self._split:
            return tuple(self.inner.shape(self._split[key][0])[1:])
        return self.inner.shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self.inner.dtype(self._split[key][0] if key in self._split else key)

    def stored_dtype(self, key: str) -> str:
        inner = self._split[key][0] if key in self._split else key
        return self.inner.stored_dtype(inner)

    def get(self, key: str) -> np.ndarray:
        if key not in self._split:
            return self.inner.get(key)
        stacked, index = self._split[key]
        get_index = getattr(self.inner, "get_index", None)
        return get_index(stacked, index) if get_index else self.inner.get(stacked)[index]

    def close(self) -> None:
        self.inner.close()
