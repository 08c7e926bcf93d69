"""``.safetensors`` read one tensor at a time with positional reads into memory of its own.

The Rust reader (``safe_open``) validates the header first (length, JSON, dtypes, offsets that
tile the data exactly) and every failure it reports becomes a :class:`BadInputError` naming
the file. The data is then read here, not through its memory map: a mapped tensor's pages stay
resident in the process for as long as the map lives, so reading a 13 GB checkpoint through it
ended with 12.4 GB of the file counted against the process (its RSS, a container's limit), where
``pread`` into a fresh array holds the tensors in flight only. Reading needs no torch either:
bfloat16 widens to float32 bit-exactly without it, as every reader does.
``__metadata__`` is handed on as strings (a vitconv config in it is the canonical layout's to
validate). Writing is :mod:`vitconv.formats.safetensors_stream`."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from safetensors import safe_open

from vitconv.errors import BadInputError, first_line
from vitconv.formats.base import TensorSource, bf16_bits_to_float32


#: safetensors' dtype codes as numpy-style names.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "U16": "uint16", "U32": "uint32", "U64": "uint64",
                      "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
#: Stored dtypes numpy lacks, read as their bits and widened to float32, which holds them exactly.
_WIDENED = {"bfloat16": np.dtype("<u2"), "float8_e4m3fn": np.dtype("u1"), "float8_e5m2": np.dtype("u1")}


def _widen(bits: np.ndarray, stored: str) -> np.ndarray:
    if stored == "bfloat16":
        return bf16_bits_to_float32(bits)
    import ml_dtypes  # noqa: PLC0415 (optional-speed import: float8 checkpoints are rare)

    return bits.view(getattr(ml_dtypes, stored)).astype(np.float32)


class SafetensorsSource(TensorSource):
    concurrent_reads = True  # positional reads of a descriptor nobody seeks

    def __init__(self, path: os.PathLike | str):
        self.path = os.fspath(path)
        try:
            with safe_open(self.path, framework="numpy") as f:  # validates the header
                self._keys = list(f.keys())
                self.metadata = dict(f.metadata() or {})
        except Exception as e:
            raise BadInputError(f"invalid safetensors file ({first_line(e)})", self.path) from None
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, n, 8))
        except (struct.error, ValueError) as e:  # changed since safe_open read it
            os.close(self._fd)
            raise BadInputError(f"invalid safetensors file ({first_line(e)})", self.path) from None
        self._data_start = 8 + n
        self._info: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        for key in self._keys:
            entry = header[key]
            code = entry["dtype"]
            if code not in SAFETENSORS_DTYPES:
                os.close(self._fd)
                raise BadInputError(f"tensor {key!r} has dtype {code}, which vitconv does not read", self.path)
            begin, end = entry["data_offsets"]
            self._info[key] = (SAFETENSORS_DTYPES[code], tuple(int(d) for d in entry["shape"]), begin, end)

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._info[key][1]

    def stored_dtype(self, key: str) -> str:
        return self._info[key][0]

    def dtype(self, key: str) -> np.dtype:
        stored = self._info[key][0]
        return np.dtype(np.float32) if stored in _WIDENED else np.dtype(stored)

    def get(self, key: str) -> np.ndarray:
        stored, shape, begin, end = self._info[key]
        raw = _WIDENED.get(stored) or np.dtype(stored).newbyteorder("<")
        out = np.empty(shape, raw)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done, offset = 0, self._data_start + begin
        while done < end - begin:  # pread may return less than asked (large reads, signals)
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise BadInputError(f"tensor {key!r} could not be read (the file ends before its data: "
                                    "truncated since it was opened?)", self.path)
            done += got
        if stored in _WIDENED:
            return _widen(out, stored)
        return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)


class ReadBack(TensorSource):
    """Every tensor of written data files (a file and its shards) as one source, with the
    first file's metadata: how a written output is read back for verification before it is
    renamed (no index names these files yet). Each tensor is read from its file when asked."""

    concurrent_reads = True

    def __init__(self, paths: Sequence[Path]):
        self.path = os.fspath(paths[0])
        self._files: List[SafetensorsSource] = []
        self._owner: Dict[str, SafetensorsSource] = {}
        try:
            for p in paths:
                f = SafetensorsSource(p)
                self._files.append(f)
                self._owner.update(dict.fromkeys(f.keys(), f))
        except BaseException:
            self.close()
            raise
        self.metadata = dict(self._files[0].metadata)

    def keys(self) -> List[str]:
        return list(self._owner)

    def files(self) -> List[Path]:
        return [Path(f.path) for f in self._files]

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._owner[key].shape(key)

    def stored_dtype(self, key: str) -> str:
        return self._owner[key].stored_dtype(key)

    def dtype(self, key: str) -> np.dtype:
        return self._owner[key].dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self._owner[key].get(key)

    def close(self) -> None:
        for f in self._files:
            f.close()


def read_back(paths: Sequence[Path]) -> ReadBack:
    """The written data files ``paths`` as one source (see :class:`ReadBack`)."""
    return ReadBack(paths)
