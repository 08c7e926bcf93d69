"""The reader interface (:class:`TensorSource`), the writers' tensor description
(:class:`TensorSpec`), and small helpers every format shares. Picking a reader by content
is :mod:`vitconv.formats.open`'s job."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import mmap
import os
import stat
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vitconv.errors import BadInputError, OutputError, first_line
from vitconv.formats.json_doc import EMPTY

@functools.cache
def bfloat16() -> np.dtype:
    """bfloat16 as a numpy dtype (``ml_dtypes``, which onnx and jax use too); numpy has none.

    Loaded on first use: ``ml_dtypes``' extension takes 0.6-0.9 s to load here, longer than a
    whole small conversion, and most conversions never meet a bfloat16 tensor (big_vision's
    bfloat16 members arrive as 2-byte voids and widen without it)."""
    import ml_dtypes  # noqa: PLC0415 (deferred for start-up time, see above)

    return np.dtype(ml_dtypes.bfloat16)


def __getattr__(name: str):
    if name == "BFLOAT16":  # the dtype, for callers that name it as a constant
        return bfloat16()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (2-byte void or uint16) -> float32, exactly (the top 16 bits)."""
    return (np.ascontiguousarray(bits).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def numpy_dtype(name: str) -> np.dtype:
    """``np.dtype(name)``, with ``bfloat16`` too."""
    return bfloat16() if name == "bfloat16" else np.dtype(name)


class TensorSource:
    """Lazy, read-only mapping of tensor names to numpy arrays.

    ``metadata`` holds format-level strings (safetensors ``__metadata__``, the config a
    vitconv ``.pt`` carries); ``documents`` the JSON files beside the weights of a model
    directory, by file name (``config.json``), each parsed once where the directory was opened
    and read-only (:func:`~vitconv.formats.json_doc.read_only`); ``path`` names the file in
    every error."""

    path: Optional[str] = None
    metadata: Dict[str, str]
    documents: Mapping[str, Mapping[str, Any]] = EMPTY
    #: ``get`` may run on another thread while this one calls ``get`` too (positional
    #: reads, nothing shared moves); streaming conversion then reads ahead
    #: (:mod:`vitconv.formats.readahead`).
    concurrent_reads: bool = False

    def keys(self) -> List[str]:
        raise NotImplementedError

    def files(self) -> List[Path]:
        """The files this source reads (an output must never replace one of them)."""
        return [Path(self.path)] if self.path else []

    def shape(self, key: str) -> Tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> np.dtype:
        return self.get(key).dtype

    def get(self, key: str) -> np.ndarray:
        raise NotImplementedError

    def stored_dtype(self, key: str) -> str:
        """The dtype as the file stores it (readers widen bfloat16 to float32, exactly): what
        ``inspect`` and ``verify`` report. Readers that know better say so."""
        return np.dtype(self.dtype(key)).name

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


def sha256_file(path: os.PathLike | str, chunk: int = 16 << 20,
                stop: Optional[threading.Event] = None) -> str:
    """The file's SHA-256, hex. A regular file is hashed through a mapping of ``chunk`` bytes
    at a time (no copy into a buffer: a quarter of the work of reading it, here), anything
    else read into one reused buffer. Hashing releases the GIL, so it runs beside other work
    on another core. ``stop``, once set, ends it early (the digest is then of no use)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode):
            for offset in range(0, st.st_size, chunk):
                if stop is not None and stop.is_set():
                    break
                with mmap.mmap(f.fileno(), min(chunk, st.st_size - offset), access=mmap.ACCESS_READ,
                               offset=offset) as window:
                    h.update(window)
            return h.hexdigest()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while stop is None or not stop.is_set():
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class Deferred(str):
    """A metadata string known only once the output's bytes are written, such as the source's
    SHA-256 while another thread is still hashing it.

    Until then it *is* its placeholder (``length`` zeros), so a writer lays out its header or
    pickle with it, and the final value, of the same length, takes its place when the writer
    finishes (:func:`resolve`): the file's bytes are those the value would have given up front.
    Why: a conversion need not wait for the hash (a second read of the whole source) before
    it writes its first byte; the two run side by side."""

    future: "Future[str]"

    def __new__(cls, future: "Future[str]", length: int) -> "Deferred":
        self = super().__new__(cls, "0" * length)
        self.future = future
        return self

    def result(self) -> str:
        value = self.future.result()
        if len(value) != len(self):
            raise ValueError(f"a deferred value of {len(self)} characters came as {len(value)}")
        return value


def resolve(obj: Any) -> Any:
    """``obj`` with every :class:`Deferred` inside (dict values, lists, tuples) replaced by its value."""
    if isinstance(obj, Deferred):
        return obj.result()
    if isinstance(obj, dict):
        return {k: resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(resolve(v) for v in obj)
    return obj


def has_deferred(obj: Any) -> bool:
    if isinstance(obj, Deferred):
        return True
    if isinstance(obj, dict):
        return any(has_deferred(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_deferred(v) for v in obj)
    return False


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


@dataclass(frozen=True)
class TensorSpec:
    """What a streaming writer needs to know about a tensor before its data exists."""

    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def check(self, name: str, array: np.ndarray, path: os.PathLike | str) -> np.ndarray:
        """``array`` as an ndarray if it is the tensor this spec promised (name, dtype,
        shape); otherwise :class:`OutputError`. Streaming writers lay out bytes from specs
        before the data exists, so a producer that disagrees must fail here, not leave a
        file whose header or pickle lies about what follows."""
        a = np.asarray(array)
        if name != self.name or a.dtype != np.dtype(self.dtype) or tuple(a.shape) != tuple(self.shape):
            raise OutputError(f"tensor {name!r} {a.dtype}{tuple(a.shape)} does not match the declared "
                              f"{self.name!r} {np.dtype(self.dtype)}{tuple(self.shape)}", path)
        return a

    def check_parts(self, name: str, parts: Iterable[np.ndarray], path: os.PathLike | str) -> Iterator[np.ndarray]:
        """``parts`` (the tensor's slices along axis 0, in order), each checked as it comes
        against this spec, as :meth:`check` checks a whole tensor; too many or too few are an
        :class:`OutputError` too."""
        if name != self.name or not self.shape:
            raise OutputError(f"tensor {name!r} in parts does not match the declared {self.name!r} "
                              f"{tuple(self.shape)}", path)
        part = TensorSpec(name, self.dtype, tuple(self.shape[1:]))
        count = 0
        for count, a in enumerate(parts, 1):
            if count > self.shape[0]:
                break
            yield part.check(name, a, path)
        if count != self.shape[0]:
            raise OutputError(f"tensor {name!r}: {'more' if count > self.shape[0] else count} parts, "
                              f"declared {self.shape[0]}", path)


class StreamWriter:
    """The contract every streaming writer keeps: a ``with`` block opens the temporaries,
    ``write`` takes each tensor in the order of ``specs`` (checked against its spec), and
    leaving the block renames the finished files into place, or removes them on an error.
    ``temporaries()`` finishes the files early and returns their still-unrenamed paths, so a
    caller can check them first; ``outputs`` lists the final paths.

    Subclasses enter their temporaries on the given ``ExitStack`` in ``_open`` (so unwinding
    it with an exception removes them), write one tensor in ``_write`` and complete the files
    in ``_finish``."""

    def __init__(self, path: os.PathLike | str, specs: Sequence[TensorSpec]):
        self.path = Path(path)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in specs")
        self.outputs: List[Path] = [self.path]
        self._stack = contextlib.ExitStack()
        self._pos = 0
        self._done: Optional[List[Path]] = None

    def _open(self, stack: contextlib.ExitStack) -> None:
        raise NotImplementedError

    def _write(self, index: int, array: np.ndarray) -> None:
        raise NotImplementedError

    def _finish(self) -> List[Path]:
        raise NotImplementedError

    def __enter__(self) -> "StreamWriter":
        try:
            self._open(self._stack)
        except BaseException:
            # Unwind *with* the exception: atomic_output then deletes its temporary. A plain
            # close() would exit it as a success and rename a partial file into place.
            if not self._stack.__exit__(*sys.exc_info()):
                raise
        return self

    def write(self, name: str, array: np.ndarray) -> None:
        if self._pos >= len(self.specs):
            raise OutputError(f"unexpected extra tensor {name!r}", self.path)
        self._write(self._pos, self.specs[self._pos].check(name, array, self.path))
        self._pos += 1

    def write_parts(self, name: str, parts: Iterable[np.ndarray]) -> None:
        """The next tensor given as its slices along axis 0, in order (a stacked array), each
        checked against its spec as it comes. A writer that lays them out one at a time
        overrides ``_write_parts``; by default they are stacked, then written whole."""
        if self._pos >= len(self.specs):
            raise OutputError(f"unexpected extra tensor {name!r}", self.path)
        self._write_parts(self._pos, self.specs[self._pos].check_parts(name, parts, self.path))
        self._pos += 1

    def _write_parts(self, index: int, parts: Iterator[np.ndarray]) -> None:
        self._write(index, np.stack(list(parts)))

    def temporaries(self) -> List[Path]:
        if self._done is None:
            if self._pos != len(self.specs):
                raise OutputError(f"{len(self.specs) - self._pos} tensor(s) never written "
                                  f"(first: {self.specs[self._pos].name!r})", self.path)
            self._done = self._finish()
        return self._done

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.temporaries()
            except BaseException as e:
                self._stack.__exit__(type(e), e, e.__traceback__)
                raise
        self._stack.__exit__(exc_type, exc, tb)
