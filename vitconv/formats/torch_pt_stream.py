"""vitconv's ``.pt`` written one tensor at a time, without torch and without holding the
state dict.

A ``torch.save`` file is a zip archive: ``data.pkl`` (the pickled object, whose tensors
refer to storages by key), one uncompressed ``data/<key>`` record per storage, and a few
small records (``version``, ``byteorder``, ``.format_version``, ``.storage_alignment``).
Everything in ``data.pkl`` follows from the tensors' names, dtypes and shapes
(:mod:`vitconv.formats.torch_pickle`), so it is written first and each tensor's bytes
are appended as the caller produces them; ``zipfile`` computes every CRC-32 on the way
and writes the central directory at the end. Records start on 64-byte boundaries as
torch's own writer places them (so ``torch.load(..., mmap=True)`` maps aligned data).

The payload is the ``{"format": "vitconv", "config", "state_dict"}`` dict
:func:`~vitconv.formats.torch_pt.save_vitconv_pt` writes, loadable with
``torch.load(weights_only=True)``. Not importing torch saves ~185 MiB of resident memory,
more than the rest of a streaming conversion uses.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import zipfile
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np

from ..errors import OutputError
from .atomic import atomic_output
from .safetensors_stream import TensorSpec
from .torch_pickle import StoredTensor, dumps
from .torch_pt import FORMAT_NAME, FORMAT_VERSION
from .writeback import Writeback

#: The archive's top folder. torch.load accepts any one name; torch itself uses "archive"
#: when it has no file name to go by.
ARCHIVE = "archive"
#: torch's record alignment (what it writes into ``.storage_alignment``).
ALIGNMENT = 64
#: The ``extra`` field id torch's writer pads local headers with.
_PAD_FIELD = 0x4246


class PtStreamWriter:
    """Write vitconv's ``.pt`` tensor by tensor, in ``specs`` order (the state-dict order)."""

    def __init__(self, path: os.PathLike | str, specs: Sequence[TensorSpec], config: dict,
                 extra: Optional[Mapping[str, str]] = None):
        self.path = Path(path)
        self.specs = list(specs)
        self.config = config
        self.extra = dict(extra or {})
        self.outputs: List[Path] = [self.path]
        self._stack = contextlib.ExitStack()
        self._pos = 0

    def payload_pickle(self) -> bytes:
        """``data.pkl``: storage keys are the tensors' positions, in state-dict order."""
        state = {s.name: StoredTensor(str(i), np.dtype(s.dtype), tuple(s.shape))
                 for i, s in enumerate(self.specs)}
        payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                   "config": dict(self.config), "state_dict": state}
        payload.update(self.extra)
        return dumps(payload)

    def __enter__(self) -> "PtStreamWriter":
        try:
            tmp = self._stack.enter_context(atomic_output(self.path))
            self._zip = self._stack.enter_context(zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED))
            self._writeback = Writeback(self._zip.fp)
            self._record("data.pkl", self.payload_pickle())
            self._record(".format_version", b"1")
            self._record(".storage_alignment", str(ALIGNMENT).encode())
            self._record("byteorder", sys.byteorder.encode())
        except BaseException:
            # Unwind *with* the exception: atomic_output then deletes its temporary. A plain
            # close() would exit it as a success and rename a partial file into place.
            if not self._stack.__exit__(*sys.exc_info()):
                raise
        return self

    def _record(self, name: str, data) -> None:
        """One stored record, its data starting on an ``ALIGNMENT`` boundary."""
        buf = memoryview(data).cast("B")
        info = zipfile.ZipInfo(f"{ARCHIVE}/{name}")
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = buf.nbytes
        info.CRC = info.compress_size = 0  # zipfile fills both in; FileHeader() reads them
        zip64 = buf.nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule, stated up front
        # The header is written where the central directory would start; pad its extra
        # field so the data after it is aligned. FileHeader() is the exact bytes zipfile
        # writes, so its length (with a 4-byte pad field) fixes the padding.
        info.extra = struct.pack("<HH", _PAD_FIELD, 0)
        start = self._zip.start_dir + len(info.FileHeader(zip64))
        pad = -start % ALIGNMENT
        info.extra = struct.pack("<HH", _PAD_FIELD, pad) + b"Z" * pad
        with self._zip.open(info, "w", force_zip64=zip64) as f:
            if self._zip.fp.tell() % ALIGNMENT:
                raise OutputError(f"record {name} would start unaligned", self.path)
            f.write(buf)
        self._writeback.advance()  # after zipfile has rewritten the header and moved to the end

    def write(self, name: str, array: np.ndarray) -> None:
        if self._pos >= len(self.specs):
            raise OutputError(f"unexpected extra tensor {name!r}", self.path)
        a = self.specs[self._pos].check(name, array, self.path)
        self._record(f"data/{self._pos}", np.ascontiguousarray(a).reshape(-1))
        self._pos += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                if self._pos != len(self.specs):
                    raise OutputError(f"{len(self.specs) - self._pos} tensor(s) never written "
                                      f"(first: {self.specs[self._pos].name!r})", self.path)
                self._record("version", b"3\n")
            except BaseException as e:
                self._stack.__exit__(type(e), e, e.__traceback__)
                raise
        self._stack.__exit__(exc_type, exc, tb)
