"""Google ``.npz`` checkpoints, read lazily one member at a time and written in Google's layout.

``np.load`` would also work lazily, but it offers no way to read a member's header
without its data; reading headers straight from the zip lets architecture inference
look at every shape without touching a single weight. Pickled (object) members are
refused: ``allow_pickle=False`` everywhere.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import numpy as np

from ..errors import BadInputError
from .atomic import atomic_output
from .base import TensorSource


class NpzSource(TensorSource):
    """A ``.npz`` file as a lazy tensor source; keys are the member names without ``.npy``."""

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        self.metadata = {}
        try:
            self._zip = zipfile.ZipFile(self.path)
            members = [m for m in self._zip.namelist() if not m.endswith("/")]
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise BadInputError(f"corrupt .npz archive ({e})", self.path) from None
        self._members: Dict[str, str] = {}
        for m in members:
            key = m[:-4] if m.endswith(".npy") else m
            self._members[key] = m
        self._headers: Dict[str, Tuple[Tuple[int, ...], np.dtype, bool]] = {}

    def keys(self) -> List[str]:
        return list(self._members)

    def _header(self, key: str) -> Tuple[Tuple[int, ...], np.dtype, bool]:
        if key not in self._headers:
            try:
                with self._zip.open(self._members[key]) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            except KeyError:
                raise
            except Exception as e:  # zlib/zip/format errors all mean the same to the user
                raise BadInputError(f"member {key!r} is not a valid .npy array ({e})", self.path) from None
            if dtype.hasobject:
                raise BadInputError(f"member {key!r} holds Python objects (a pickle); refusing to "
                                    "load it", self.path)
            self._headers[key] = (tuple(int(s) for s in shape), dtype, fortran)
        return self._headers[key]

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._header(key)[0]

    def dtype(self, key: str) -> np.dtype:
        return self._header(key)[1]

    def get(self, key: str) -> np.ndarray:
        self._header(key)
        try:
            with self._zip.open(self._members[key]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except Exception as e:
            raise BadInputError(f"member {key!r} could not be read ({e})", self.path) from None

    def close(self) -> None:
        self._zip.close()


def write_npz(arrays: Mapping[str, np.ndarray], path: os.PathLike | str, compress: bool = False) -> None:
    """Write ``arrays`` as a ``.npz`` (the layout ``np.savez`` gives), atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **{k: np.ascontiguousarray(v)
                                                                   for k, v in arrays.items()})
