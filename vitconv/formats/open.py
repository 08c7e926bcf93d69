"""Pick a reader by a file's structure, not its name, and open it as a :class:`TensorSource`.

Why structure: a legacy torch pickle starts with ``0x80`` (PROTO), and so does a
safetensors file whose 8-byte header length has ``0x80`` as its low byte (one file in 256,
from any tool). A safetensors file is recognised first, by a header length that fits the
file and a JSON object right after it; a pickle needs PROTO plus a protocol number torch
writes (2 to 5).
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from vitconv.errors import BadInputError, first_line
from vitconv.formats.atomic import reading
from vitconv.formats.base import TensorSource
from vitconv.formats.hf_dir import open_hf_dir
from vitconv.formats.npz import NpzSource
from vitconv.formats.safetensors_io import SafetensorsSource
from vitconv.formats.sharded import ShardedSource
from vitconv.formats.torch_pt import open_torch

#: A safetensors header longer than this is not one (the format's own reader refuses 100 MB).
_MAX_HEADER = 100_000_000


def sniff(path: Path) -> str:
    """Format of ``path`` by its first bytes: ``zip`` (npz or torch zip), ``safetensors``,
    ``pickle`` (legacy torch), ``onnx``, ``dir``, ``index`` (a shard index); raises
    :class:`BadInputError` otherwise."""
    reading(path)  # an input is never removed as an output's stale temporary
    if path.is_dir():
        return "dir"
    if not path.exists():
        raise BadInputError("no such file", path)
    if not path.is_file():  # FIFOs and devices would block or never end
        raise BadInputError("not a regular file", path)
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise BadInputError(f"cannot read: {e.strerror or e}", path) from None
    if not head:
        raise BadInputError("file is empty", path)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= min(size - 8, _MAX_HEADER) and head[8:9] == b"{":
            return "safetensors"
    if path.name.endswith(".index.json"):
        return "index"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    if head[8:9] == b"{":  # a safetensors file whose length is wrong: let its reader say so
        return "safetensors"
    if path.suffix == ".onnx":
        return "onnx"
    raise BadInputError("not a checkpoint vitconv can read (expected .npz, .pt/.pth/.bin, "
                        ".safetensors, a shard index .index.json)", path)


def open_source(path: os.PathLike | str) -> TensorSource:
    """Open any supported checkpoint file or model directory as a lazy :class:`TensorSource`."""
    p = Path(path)
    kind = sniff(p)
    if kind == "zip":
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except Exception as e:  # BadZipFile, NotImplementedError ("zip file version 10.9"), ...
            raise BadInputError(f"corrupt or truncated zip archive ({first_line(e)})", p) from None
        if any(n.endswith(".npy") for n in names) and not any(n.endswith("data.pkl") for n in names):
            return NpzSource(p)
        return open_torch(p)
    if kind == "pickle":
        return open_torch(p)
    if kind == "safetensors":
        return SafetensorsSource(p)
    if kind == "index":
        return ShardedSource(p, open_source)
    if kind == "dir":
        return open_hf_dir(p, open_source)
    raise BadInputError(f"{kind} files hold no weights vitconv converts", p)
