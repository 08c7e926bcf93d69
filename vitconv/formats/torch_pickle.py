"""The pickle inside a ``torch.save`` archive, written without importing torch.

Importing torch costs ~185 MiB of resident memory and a second of start-up, more than a
streaming conversion needs for everything else. Yet the pickle torch writes for a state
dict is small and regular: plain dicts, strings and numbers, and for each tensor a call
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
whose ``storage`` is a *persistent id* ``("storage", torch.<Type>Storage, key, "cpu",
numel)`` naming the zip record ``data/<key>`` that holds the bytes. That is all
``torch.load(weights_only=True)`` accepts anyway, so this module emits exactly those
opcodes (protocol 2, as torch uses) and nothing else: no memo, no other globals.

Anything outside that vocabulary raises ``TypeError`` rather than being pickled some
other way, so the output stays loadable under ``weights_only``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np

#: numpy dtype name -> the ``torch.<Name>Storage`` class torch names in a tensor's persistent id
#: (by name: ``bfloat16`` is ``ml_dtypes``' dtype, which loads only where one is met).
STORAGE_TYPES: Dict[str, str] = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage", "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage", "bfloat16": "BFloat16Storage",
}


@dataclass(frozen=True)
class StoredTensor:
    """A contiguous CPU tensor whose bytes live in the archive's ``data/<key>`` record."""

    key: str
    dtype: np.dtype
    shape: Tuple[int, ...]

    def strides(self) -> Tuple[int, ...]:
        """C-contiguous strides in elements, as ``torch.Tensor.stride()`` reports them."""
        out, step = [], 1
        for n in reversed(self.shape):
            out.append(step)
            step *= max(int(n), 1)
        return tuple(reversed(out))


_PROTO2, _STOP, _MARK = b"\x80\x02", b".", b"("
_EMPTY_DICT, _SETITEMS, _EMPTY_LIST, _APPENDS = b"}", b"u", b"]", b"e"
_EMPTY_TUPLE, _TUPLE, _TUPLES = b")", b"t", {1: b"\x85", 2: b"\x86", 3: b"\x87"}
_NONE, _TRUE, _FALSE = b"N", b"\x88", b"\x89"
_REDUCE, _BINPERSID = b"R", b"Q"


def dumps(obj: Any) -> bytes:
    """``obj`` pickled as ``torch.save`` would, where each :class:`StoredTensor` stands for
    a tensor. Dicts keep their insertion order (torch numbers storages in that order too)."""
    out = bytearray(_PROTO2)
    _emit(obj, out)
    out += _STOP
    return bytes(out)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"


def _emit(obj: Any, out: bytearray) -> None:
    # bool before int: True is an int to isinstance.
    if obj is None:
        out += _NONE
    elif obj is True or obj is False:
        out += _TRUE if obj else _FALSE
    elif isinstance(obj, (int, np.integer)):
        _emit_int(int(obj), out)
    elif isinstance(obj, (float, np.floating)):
        out += b"G" + struct.pack(">d", float(obj))
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        out += b"X" + struct.pack("<I", len(data)) + data
    elif isinstance(obj, StoredTensor):
        _emit_tensor(obj, out)
    elif isinstance(obj, dict):
        out += _EMPTY_DICT
        if obj:
            out += _MARK
            for k, v in obj.items():
                _emit(k, out)
                _emit(v, out)
            out += _SETITEMS
    elif isinstance(obj, list):
        out += _EMPTY_LIST
        if obj:
            out += _MARK
            for v in obj:
                _emit(v, out)
            out += _APPENDS
    elif isinstance(obj, tuple):
        _emit_tuple(obj, out)
    else:
        raise TypeError(f"cannot write {type(obj).__name__} into a weights-only torch pickle")


def _emit_int(n: int, out: bytearray) -> None:
    if 0 <= n < 256:
        out += b"K" + bytes([n])
    elif 0 <= n < 65536:
        out += b"M" + struct.pack("<H", n)
    elif -2**31 <= n < 2**31:
        out += b"J" + struct.pack("<i", n)
    else:  # LONG1: little-endian two's complement, shortest form
        data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
        out += b"\x8a" + bytes([len(data)]) + data


def _emit_tuple(items: tuple, out: bytearray) -> None:
    if not items:
        out += _EMPTY_TUPLE
        return
    if len(items) not in _TUPLES:
        out += _MARK
    for v in items:
        _emit(v, out)
    out += _TUPLES.get(len(items), _TUPLE)


def _emit_tensor(t: StoredTensor, out: bytearray) -> None:
    dtype = np.dtype(t.dtype)
    if not dtype.isnative or dtype.name not in STORAGE_TYPES:
        raise TypeError(f"no torch storage type for numpy dtype {dtype}")
    numel = int(np.prod(t.shape, dtype=np.int64))
    out += _global("torch._utils", "_rebuild_tensor_v2") + _MARK
    # The storage, as a persistent id the loader resolves to record data/<key>.
    out += _MARK
    _emit("storage", out)
    out += _global("torch", STORAGE_TYPES[dtype.name])
    _emit(t.key, out)
    _emit("cpu", out)
    _emit(numel, out)
    out += _TUPLE + _BINPERSID
    _emit(0, out)  # storage offset
    _emit_tuple(tuple(int(n) for n in t.shape), out)
    _emit_tuple(t.strides(), out)
    out += _FALSE  # requires_grad
    out += _global("collections", "OrderedDict") + _EMPTY_TUPLE + _REDUCE  # backward hooks
    out += _TUPLE + _REDUCE
