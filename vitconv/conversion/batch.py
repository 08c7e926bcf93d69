"""``vitconv batch``: a manifest of conversions, each converted and verified by the same
library call as ``vitconv convert --verify`` (:func:`run_row`), in worker processes or as Ray
tasks, resumable, with a report.

A row fails alone, with the single command's one-line error; its outputs appear only once
verified. Each output with metadata records the source's sha256, vitconv's version, the row's
options and that it was verified, so a rerun skips a row whose output already holds that
(``force`` redoes it). A Google ``.npz`` or a foreign ``.pt`` state dict has no metadata: for
those the previous report is the record (the output's sha256 must still match it).

A rerun does not read a source to decide: each output also records the source's
fingerprint (:func:`vitconv.formats.storage.fingerprint`: its location, size and ETag or
modification time, from one metadata request), and a row whose fingerprint is unchanged is
skipped on it. Only a changed or unknown fingerprint costs a read of the source, to hash it.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import io
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from vitconv import __version__
from vitconv.formats import storage
from vitconv.conversion.service import convert
from vitconv.conversion.options import ConvertOptions
from vitconv.config import parse_settings
from vitconv.errors import BadInputError, OutputError, VitconvError, failure, first_line, one_line
from vitconv.formats.atomic import atomic_output, check_writable
from vitconv.formats.base import sha256_file
from vitconv.formats.open import open_source
from vitconv.conversion.pipeline import DTYPES
from vitconv.conversion.targets import candidates
from vitconv.formats.provenance import CONFIG_KEY, KEY_OF, Provenance

PathLike = Union[str, os.PathLike]

#: Columns a manifest row may have, and their types (``src`` and ``dst`` are required).
COLUMNS: Dict[str, type] = {"src": str, "dst": str, "to": str, "image_size": int, "patch_size": int,
                            "dtype": str, "verify": bool, "num_heads": int, "labels": str, "arch": str, "set": str}
#: The options that make two conversions of one source different outputs.
OPTIONS = ("to", "image_size", "patch_size", "dtype", "num_heads", "labels", "verify", "arch", "set")
MAX_MANIFEST_BYTES = 64 << 20
ROW_KEY = KEY_OF["batch_row"]  # the row's options, in the output's metadata
FINGERPRINT_KEY = KEY_OF["source_fingerprint"]  # storage.fingerprint of the source, in the output's metadata


@dataclass(frozen=True)
class Row:
    line: int
    src: str
    dst: str
    to: Optional[str] = None
    image_size: Optional[int] = None
    patch_size: Optional[int] = None
    dtype: Optional[str] = None
    verify: bool = True
    num_heads: Optional[int] = None
    labels: Optional[str] = None
    arch: Optional[str] = None  # the architecture of a bare state dict (--arch)
    set: Optional[str] = None  # fields a bare state dict cannot record: "act=gelu norm_eps=1e-5" (--set)

    def overrides(self) -> Dict[str, Any]:
        """``set`` and ``arch`` as :func:`vitconv.conversion.pipeline.open_checkpoint` takes them."""
        return {**parse_settings((self.set or "").split()), **({"arch": self.arch} if self.arch else {})}

    def converting(self, **write: Any) -> ConvertOptions:
        """The row as the convert service's options (``write``: what the run adds, its provenance)."""
        return ConvertOptions(to=self.to, image_size=self.image_size, patch_size=self.patch_size, dtype=self.dtype,
                              num_heads=self.num_heads, labels=self.labels, overrides=self.overrides(),
                              verify=self.verify, **write)

    def options(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) is not None}


@dataclass
class RowResult:
    line: int
    src: str
    dst: str
    status: str  # ok | skipped | failed
    error: str = ""
    exit_code: int = 0
    source_sha256: str = ""
    source_fingerprint: str = ""
    source_bytes: int = 0
    outputs: Dict[str, str] = field(default_factory=dict)  # path -> sha256
    verified: Optional[bool] = None
    verify: Optional[Dict[str, Any]] = None  # the verification figures
    options: Dict[str, Any] = field(default_factory=dict)
    vitconv_version: str = __version__
    wall_s: float = 0.0
    cpu_s: float = 0.0  # the worker process's CPU time (all threads) on this row
    peak_rss_bytes: Optional[int] = None
    worker: str = ""

    def line_text(self) -> str:
        if self.status == "failed":
            return f"failed   {self.error}"
        what = f"{self.src} -> {self.dst}"
        if self.status == "skipped":
            how = " and verified" if self.verified else "; not verified, as the row asks"
            return f"skipped  {what} (already converted from the same source{how})"
        figures = f", {self.verify['verdict']}" if self.verify else ", not verified"
        return f"ok       {what} ({self.wall_s:.1f} s{figures})"


# --------------------------------------------------------------------------- the manifest
def _value(name: str, raw: Any, csv_text: bool, where: str) -> Any:
    want = COLUMNS[name]
    if raw is None or (csv_text and raw == ""):
        return None
    if csv_text and want is int:
        try:
            return int(raw)
        except ValueError:
            raise BadInputError(f"{where}: {name} must be an integer, got {one_line(raw, 40)!r}") from None
    if csv_text and want is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise BadInputError(f"{where}: {name} must be true or false, got {one_line(raw, 40)!r}")
    if not isinstance(raw, want) or (want is int and isinstance(raw, bool)):
        raise BadInputError(f"{where}: {name} must be {want.__name__}, got {type(raw).__name__}")
    if want is str and "\x00" in raw:  # no path or name holds one; os calls would raise on it
        raise BadInputError(f"{where}: {name} contains a NUL byte")
    if want is int and raw <= 0:
        raise BadInputError(f"{where}: {name} must be positive, got {raw}")
    return raw


def _resolve(text: str, base: Path) -> str:
    if storage.is_url(text) or os.path.isabs(text):
        return text
    return os.fspath(base / text)


def read_manifest(path: PathLike) -> List[Row]:
    """Rows of a JSON Lines manifest (one object a line; blank and ``#`` lines skipped) or a
    CSV one with a header (``.csv``). Every row is checked before any work: an unknown column,
    a wrong type, a missing ``src``/``dst`` or two rows writing one output refuse the whole
    manifest, naming the line. Relative paths are relative to the manifest's directory."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError("no such manifest file" if not p.exists() else "not a regular file", p)
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise BadInputError(f"manifest is larger than {MAX_MANIFEST_BYTES:,} bytes", p)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"manifest is not UTF-8 text (byte {e.start})", p) from None
    base = p.parent
    raw_rows: List[tuple] = []
    is_csv = p.suffix.lower() == ".csv"
    if is_csv:
        reader = csv.DictReader(io.StringIO(text))
        unknown = [c for c in (reader.fieldnames or []) if c not in COLUMNS]
        if unknown:
            raise BadInputError(f"line 1: unknown column(s) {', '.join(map(repr, unknown))} "
                                f"(known: {', '.join(COLUMNS)})", p)
        try:
            for rec in reader:
                if None in rec:
                    raise BadInputError(f"line {reader.line_num}: more fields than the header names", p)
                raw_rows.append((reader.line_num, rec))
        except csv.Error as e:  # a field past csv's limit (131,072 characters), a NUL
            raise BadInputError(f"line {reader.line_num}: not CSV ({first_line(e)})", p) from None
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                rec = json.loads(line)
            except RecursionError:
                raise BadInputError(f"line {n}: not usable JSON (nested deeper than the parser's limit)", p) from None
            except ValueError as e:
                raise BadInputError(f"line {n}: not JSON ({one_line(str(e), 80)}); a manifest is JSON Lines, "
                                    "or CSV named .csv", p) from None
            if not isinstance(rec, dict):
                raise BadInputError(f"line {n}: a row must be a JSON object", p)
            unknown = [k for k in rec if k not in COLUMNS]
            if unknown:
                raise BadInputError(f"line {n}: unknown key(s) {', '.join(repr(one_line(k, 40)) for k in unknown)} "
                                    f"(known: {', '.join(COLUMNS)})", p)
            raw_rows.append((n, rec))
    rows, seen = [], _Places()
    for n, rec in raw_rows:
        where = f"line {n}"
        try:
            values = {k: _value(k, v, is_csv, where) for k, v in rec.items()}
        except BadInputError as e:
            raise BadInputError(e.message, p) from None
        for need in ("src", "dst"):
            if not values.get(need):
                raise BadInputError(f"{where}: {need} is missing", p)
        values["src"], values["dst"] = _resolve(values["src"], base), _resolve(values["dst"], base)
        try:  # an unknown target, or one the output's container cannot hold: said before any work
            candidates(values["dst"], values.get("to"))
            if values.get("dtype") is not None and values["dtype"] not in DTYPES:
                raise BadInputError(f"unknown dtype {values['dtype']!r} (known: {', '.join(DTYPES)})")
        except BadInputError as e:
            raise BadInputError(f"{where}: {e.message}", p) from None
        if values.get("verify") is None:
            values.pop("verify", None)
        try:
            parse_settings((values.get("set") or "").split())
        except ValueError as e:
            raise BadInputError(f"{where}: set: {e}", p) from None
        other = seen.find(values["dst"])
        if other is not None:
            raise BadInputError(f"{where}: dst {values['dst']} is also {other}", p)
        seen.add(values["dst"], f"line {n}'s output")
        rows.append(Row(line=n, **{k: v for k, v in values.items() if v is not None}))
    if not rows:
        raise BadInputError("manifest has no rows", p)
    sources = _Places((r.src, f"line {r.line}'s src") for r in rows)
    sources.add(os.fspath(p), "the manifest itself")
    for row in rows:  # a row writing over a source (its own or another row's), or the manifest
        hit = sources.find(row.dst)
        if hit is not None:
            raise BadInputError(f"line {row.line}: dst {row.dst} is {hit}", p)
    return rows


class _Places:
    """Paths by where they land, however spelled: a URL without its trailing slash; a local
    path resolved (``./``, ``..``, symlinked directories on the way) and, when it exists, by
    its inode (a hard link). One pass over a 50,000-row manifest, no pairwise comparison."""

    def __init__(self, items=()):
        self.by_place: Dict[str, str] = {}
        self.by_inode: Dict[tuple, str] = {}
        for path, what in items:
            self.add(path, what)

    @staticmethod
    def _keys(path: str) -> tuple:
        if storage.is_url(path):
            return path.rstrip("/"), None
        try:
            st = os.stat(path)
            inode = (st.st_dev, st.st_ino)
        except OSError:
            inode = None
        return os.path.realpath(path), inode

    def add(self, path: str, what: str) -> None:
        place, inode = self._keys(path)
        self.by_place.setdefault(place, what)
        if inode is not None:
            self.by_inode.setdefault(inode, what)

    def find(self, path: str) -> Optional[str]:
        place, inode = self._keys(path)
        return self.by_place.get(place) or (self.by_inode.get(inode) if inode is not None else None)


def output_provenance(dst: str) -> Optional[Dict[str, str]]:
    """The provenance metadata an existing output holds (a safetensors header, a shard index,
    a vitconv ``.pt``), None where it has none or does not exist."""
    url = dst.rstrip("/")
    name = url.rsplit("/", 1)[-1]
    candidates: List[str]
    if name.endswith(".safetensors"):
        candidates = [url + ".index.json", url]
    elif "." not in name:  # a model directory
        candidates = [url + "/model.safetensors.index.json", url + "/model.safetensors"]
    elif name.endswith((".pt", ".pth", ".bin")) and not storage.is_url(url) and Path(url).is_file():
        try:
            with open_source(url) as src:
                return dict(src.metadata) if CONFIG_KEY in src.metadata else None
        except VitconvError:
            return None
    else:
        return None
    for c in candidates:
        if c.endswith(".index.json"):
            doc = storage.read_json(c)
            if doc is not None and isinstance(doc.get("metadata"), dict):
                return {str(k): str(v) for k, v in doc["metadata"].items()}
        else:
            meta = storage.safetensors_metadata(c)
            if meta is not None:
                return meta
    return None


def _same_source(record: Dict[str, Any], sha: Optional[str], fp: Optional[str], sha_key: str, fp_key: str) -> bool:
    """The record names this source: by sha256, or by fingerprint when no sha256 is at hand."""
    if sha is not None:
        return record.get(sha_key) == sha
    return bool(fp) and record.get(fp_key) == fp


def _current(row: Row, meta: Optional[Dict[str, str]], sha: Optional[str] = None, fp: Optional[str] = None) -> bool:
    """The output's own provenance says it is this row's conversion of this source, by this vitconv."""
    if meta is None:
        return False
    own = Provenance.from_metadata(meta)
    return (_same_source(meta, sha, fp, KEY_OF["source_sha256"], FINGERPRINT_KEY) and own.version == __version__
            and own.batch_row == json.dumps(row.options(), sort_keys=True) and (not row.verify or own.verified))


def _recorded(row: Row, previous: Optional[Dict[str, Any]], sha: Optional[str] = None,
              fp: Optional[str] = None) -> bool:
    """A previous report's row for the same output, source, options and version, whose files
    are still the ones it wrote (local: same sha256)."""
    if not previous or previous.get("status") not in ("ok", "skipped") or not previous.get("outputs"):
        return False
    if (not _same_source(previous, sha, fp, "source_sha256", "source_fingerprint")
            or previous.get("vitconv_version") != __version__
            or previous.get("options") != json.loads(json.dumps(row.options()))):
        return False
    if row.verify and not previous.get("verified"):
        return False
    for path, digest in previous["outputs"].items():
        if storage.is_url(path):
            if not storage.exists(path):
                return False
        elif not Path(path).is_file() or sha256_file(path) != digest:
            return False
    return True


def _output_files(written: Sequence[str]) -> List[Path]:
    out = []
    for w in written:
        p = Path(w)
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


# --------------------------------------------------------------------------- one row
def _reset_peak() -> None:
    try:  # 5: reset the peak resident set size (VmHWM), Linux >= 4.0
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_bytes(path: str, field: str) -> Optional[int]:
    """A ``Field:  N kB`` line of a /proc file, in bytes (None where there is none)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak() -> Optional[int]:
    return _proc_bytes("/proc/self/status", "VmHWM")


def row_error(row: Row, message: str) -> str:
    """A row's one-line error, naming the row: its line and (unless the message starts with
    it) its ``src``."""
    src = one_line(row.src, 300)
    return f"line {row.line}: {message}" if message.startswith(src) else f"line {row.line} ({src}): {message}"


def run_row(row: Row, force: bool = False, previous: Optional[Dict[str, Any]] = None,
            command: str = "vitconv batch") -> RowResult:
    """Convert (and verify) one row, or skip it if its output is current; never raises for a
    problem with the row: the result says ``failed`` with the single command's message."""
    start, cpu = time.perf_counter(), time.process_time()
    _reset_peak()
    result = RowResult(row.line, row.src, row.dst, "ok", options=row.options(), worker=f"pid {os.getpid()}")
    try:
        _convert_row(row, force, previous, command, result)
    except BaseException as e:  # noqa: BLE001 - a row's failure is its own
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        result.status = "failed"
        result.error, result.exit_code = failure(e)
        result.error = row_error(row, result.error)
    result.wall_s = time.perf_counter() - start
    result.cpu_s = time.process_time() - cpu
    result.peak_rss_bytes = _peak()
    return result


def _convert_row(row: Row, force: bool, previous: Optional[Dict[str, Any]], command: str,
                 result: RowResult) -> None:
    """:func:`run_row`'s work, filling in ``result``. The output is current when it (or the
    previous report) records this source, these options, this version and, if asked, a
    verification: by fingerprint first, from metadata alone; failing that by the sha256 of the
    source, read (a download's is taken as it streams)."""
    def skipped(recorded_sha: str) -> None:
        result.status, result.verified, result.source_sha256 = "skipped", row.verify, recorded_sha
        if previous and previous.get("dst") == row.dst:
            result.outputs = dict(previous.get("outputs") or {})
            result.verify = previous.get("verify")

    fp, result.source_bytes = storage.fingerprint(row.src) or ("", 0)
    result.source_fingerprint = fp
    meta_now = None if force else output_provenance(row.dst)
    if not force and fp:
        if _current(row, meta_now, fp=fp):
            return skipped(meta_now.get("source_sha256", ""))
        if _recorded(row, previous, fp=fp):
            return skipped(previous.get("source_sha256", ""))
    with storage.local_input(row.src) as (src, digest):
        if digest is None:
            digest = sha256_file(src if src.is_file() else _weights_of(src))
        result.source_sha256 = digest
        result.source_bytes = sum(f.stat().st_size for f in _output_files([os.fspath(src)]))
        if not force and (_current(row, meta_now, sha=digest) or _recorded(row, previous, sha=digest)):
            return skipped(digest)
        meta = Provenance(batch_row=json.dumps(row.options(), sort_keys=True), source_fingerprint=fp or None)
        if not storage.is_url(row.dst):  # a zoo's tree of outputs: its folders are made
            Path(row.dst).parent.mkdir(parents=True, exist_ok=True)
        with storage.local_output(row.dst) as dst:
            report = convert(src, dst, row.converting(metadata=meta, source_sha256=digest,
                                                      command=f"{command} (line {row.line})"))
            hashes = {f: sha256_file(f) for f in _output_files(report.files)}
    if storage.is_url(row.dst):  # named where they now are
        base = row.dst.rstrip("/").rsplit("/", 1)[0]
        hashes = {base + "/" + f.relative_to(dst.parent).as_posix(): h for f, h in hashes.items()}
    result.outputs = {os.fspath(k): v for k, v in hashes.items()}
    result.verified = bool(row.verify)
    if report.checked is not None:
        result.verify = {k: v for k, v in report.checked.to_dict().items()
                         if k in ("ok", "verdict", "reference", "tolerance", "image_size", "batch", "note", "stages")}


def _weights_of(directory: Path) -> Path:
    """The file a model directory's sha256 is taken of, as conversion takes it."""
    with open_source(directory) as s:
        return Path(s.files()[0]) if hasattr(s, "files") else directory


# --------------------------------------------------------------------------- scheduling
def estimate_bytes(row: Row) -> int:
    """Memory one row needs at most, from its source's size: the converted float32 model, the
    reference's copy (a library's model, or big_vision's arrays) and the read-back, plus the
    interpreter with torch (measured in BENCHMARKS.md: ~2.5x the weights + 0.4 GiB)."""
    size = 0
    if not storage.is_url(row.src):
        p = Path(row.src)
        size = sum(f.stat().st_size for f in _output_files([row.src])) if p.exists() else 0
    else:
        try:
            # an estimate: the scheduler waits on it, so a silent server is given less time
            fs, remote = storage.filesystem(row.src, timeout=min(5.0, storage.network_timeout()))
            info = fs.info(remote)  # (not isdir: over HTTP that GETs the whole object to look for links)
            size = int(fs.du(remote) if info.get("type") == "directory" else info.get("size") or 0)
        except Exception:
            size = 0
    if row.dtype in ("float16", "bfloat16"):
        size *= 2  # the float32 model is verified too
    return 3 * size + (512 << 20)


def _available() -> int:
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else 8 << 30


#: Thread-count variables of the BLAS libraries under numpy (the NumPy reference's matmuls):
#: set for the workers, which would otherwise each start a thread per CPU and contend.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class _Terminated(KeyboardInterrupt):
    pass


def _worker_init(threads: int) -> None:
    """In each worker: SIGTERM unwinds like Ctrl-C (writers remove their temporaries), and the
    CPUs are shared out instead of every worker's torch taking them all."""
    def _raise(signum, frame):
        raise _Terminated()
    signal.signal(signal.SIGTERM, _raise)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass


@dataclass
class BatchReport:
    manifest: str
    rows: List[RowResult]
    workers: str
    wall_s: float
    interrupted: bool = False
    total_rows: int = 0

    @property
    def failed(self) -> List[RowResult]:
        return [r for r in self.rows if r.status == "failed"]

    def totals(self) -> Dict[str, Any]:
        count = {s: sum(r.status == s for r in self.rows) for s in ("ok", "skipped", "failed")}
        peaks = [r.peak_rss_bytes for r in self.rows if r.peak_rss_bytes]
        return {**count, "rows": self.total_rows, "not_run": self.total_rows - len(self.rows),
                "wall_s": round(self.wall_s, 3), "source_bytes": sum(r.source_bytes for r in self.rows),
                "row_seconds": round(sum(r.wall_s for r in self.rows), 3),
                "row_cpu_seconds": round(sum(r.cpu_s for r in self.rows), 3),
                "max_peak_rss_bytes": max(peaks) if peaks else None,
                "rows_per_s": round(sum(r.status != "skipped" for r in self.rows) / self.wall_s, 4)
                if self.wall_s else None}

    def to_dict(self) -> Dict[str, Any]:
        return {"manifest": self.manifest, "vitconv_version": __version__, "workers": self.workers,
                "interrupted": self.interrupted, "totals": self.totals(),
                "rows": [dataclasses.asdict(r) for r in sorted(self.rows, key=lambda r: r.line)]}

    def write(self, path: PathLike) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


def previous_rows(report: Optional[PathLike]) -> Dict[str, Dict[str, Any]]:
    """A previous report's rows by output (an unreadable or foreign file: none)."""
    if report is None or not Path(report).is_file():
        return {}
    try:
        doc = json.loads(Path(report).read_text(encoding="utf-8"))
        return {r["dst"]: r for r in doc.get("rows", []) if isinstance(r, dict) and "dst" in r}
    except (ValueError, OSError, AttributeError, TypeError, RecursionError):
        return {}


OnResult = Callable[[RowResult, int, int], None]


def run_local(rows: Sequence[Row], *, workers: Optional[int] = None, force: bool = False,
              previous: Optional[Dict[str, Dict[str, Any]]] = None, on_result: Optional[OnResult] = None,
              memory_budget: Optional[int] = None, command: str = "vitconv batch",
              task: Callable[..., RowResult] = run_row) -> tuple:
    """Rows in ``workers`` processes (default: the CPU count), started as many at a time as
    the memory budget (80% of what is available) holds by :func:`estimate_bytes`, at least one.
    A worker that dies (killed, out of memory) breaks the pool: the rows that were running
    are retried one at a time in a fresh pool; a row that kills its worker twice while
    running alone fails. Returns
    ``(results, interrupted)``; Ctrl-C stops the workers (their writers remove their
    temporaries) and returns what finished. ``task``: :func:`run_row`, or a module-level
    function with its signature (the tests' stand-ins for rows that kill their worker)."""
    workers = max(1, workers or os.cpu_count() or 1)
    budget = memory_budget if memory_budget is not None else int(_available() * 0.8)
    threads = max(1, (os.cpu_count() or 1) // workers)
    previous = previous or {}
    queue = list(rows)
    solo: List[Row] = []  # rows that were running when a worker died: each runs alone next
    deaths: Dict[int, int] = {}  # line -> times the row killed its worker while running alone
    results: List[RowResult] = []
    interrupted = False

    def report(res: RowResult) -> None:
        results.append(res)
        if on_result is not None:
            on_result(res, len(results), len(rows))

    def new_pool(n: int) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_worker_init, initargs=(threads,))

    size = min(workers, len(queue)) or 1
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: str(threads) for k in THREAD_VARS})  # read by each worker's numpy/BLAS at import
    pool = new_pool(size)
    running: Dict[cf.Future, Row] = {}
    in_use = 0
    try:
        while queue or solo or running:
            alone = bool(solo)
            while (solo or queue) and (not running or (not alone and len(running) < workers)):
                row = solo[0] if solo else queue[0]
                need = estimate_bytes(row)
                if running and (alone or in_use + need > budget):
                    break
                (solo if solo else queue).pop(0)
                fut = pool.submit(task, row, force, previous.get(row.dst), command)
                running[fut] = row
                fut.need = need  # type: ignore[attr-defined]
                in_use += need
                if alone:
                    break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            broken = False
            for fut in done:
                row = running.pop(fut)
                in_use -= fut.need  # type: ignore[attr-defined]
                try:
                    report(fut.result())
                except KeyboardInterrupt:  # the worker was signalled, not this process
                    report(RowResult(row.line, row.src, row.dst, "failed", exit_code=130, options=row.options(),
                                     error=row_error(row, "worker process interrupted")))
                except cf.process.BrokenProcessPool:
                    broken = True
                    if alone:  # it was the only row: its own doing
                        deaths[row.line] = deaths.get(row.line, 0) + 1
                    if deaths.get(row.line, 0) >= 2:
                        report(RowResult(row.line, row.src, row.dst, "failed", exit_code=1, options=row.options(),
                                         error=row_error(row, "worker process died (killed, or out of memory); "
                                                              "retried alone, it died again")))
                    else:
                        solo.append(row)
            if broken:
                for fut, row in list(running.items()):  # the pool is gone: these run again, alone
                    solo.append(row)
                running.clear()
                in_use = 0
                pool.shutdown(wait=False, cancel_futures=True)
                size = 1 if solo else min(workers, len(queue)) or 1
                pool = new_pool(size)
            elif not solo and not running and size == 1 and queue and workers > 1:  # back to a full pool
                pool.shutdown(wait=True)
                size = min(workers, len(queue))
                pool = new_pool(size)
    except KeyboardInterrupt:
        interrupted = True
        for fut in running:
            fut.cancel()
        procs = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # SIGTERM: each worker unwinds, its temporaries removed
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    else:
        pool.shutdown(wait=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results, interrupted


def run_ray(rows: Sequence[Row], *, address: Optional[str] = None, force: bool = False,
            previous: Optional[Dict[str, Dict[str, Any]]] = None, on_result: Optional[OnResult] = None,
            num_cpus: Optional[int] = None, command: str = "vitconv batch") -> tuple:
    """The same :func:`run_row` as Ray tasks: one CPU each and the memory :func:`estimate_bytes`
    gives (capped at the cluster's), retried up to 3 times when a node or worker is lost;
    results as they finish. ``address``: ``auto``, ``ray://host:port``, or None (a local Ray
    instance, ``num_cpus`` CPUs). Sources and outputs must be reachable from every node:
    object-storage URLs, or a shared filesystem."""
    try:
        import ray
    except ImportError:
        raise BadInputError('--ray needs Ray, an optional extra: pip install "vitconv[ray]"') from None
    previous = previous or {}
    started = not ray.is_initialized()
    if started:
        kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        ray.init(**kwargs)
    results: List[RowResult] = []
    interrupted = False
    try:
        cap = int(ray.cluster_resources().get("memory", 0)) or None
        task = ray.remote(run_row)
        refs = {}
        for row in rows:
            need = estimate_bytes(row)
            opts: Dict[str, Any] = {"num_cpus": 1, "max_retries": 3, "retry_exceptions": False}
            if cap:
                opts["memory"] = min(need, cap)
            refs[task.options(**opts).remote(row, force, previous.get(row.dst), command)] = row
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            row = refs.pop(done[0])
            try:
                res = ray.get(done[0])
            except Exception as e:  # the task itself was lost (every retry failed)
                text, code = failure(e)
                res = RowResult(row.line, row.src, row.dst, "failed", error=row_error(row, f"Ray task lost: {text}"),
                                exit_code=code, options=row.options())
            results.append(res)
            if on_result is not None:
                on_result(res, len(results), len(rows))
    except KeyboardInterrupt:
        interrupted = True
        for ref in refs:
            ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()
    return results, interrupted


def run_batch(manifest: PathLike, *, workers: Optional[int] = None, ray: Union[bool, str, None] = None,
              force: bool = False, report: Optional[PathLike] = None, on_result: Optional[OnResult] = None,
              on_start: Optional[Callable[[List[Row]], None]] = None, ray_num_cpus: Optional[int] = None,
              command: str = "vitconv batch") -> BatchReport:
    """Read ``manifest`` (:func:`read_manifest`), run every row locally or on Ray
    (``ray``: True for a local instance, or an address), write ``report`` (also when
    interrupted, for what finished) and return it. A previous report at ``report`` is the
    record of outputs that cannot hold metadata."""
    rows = read_manifest(manifest)
    if report is not None:
        taken = _Places([(os.fspath(manifest), "the manifest"), *((r.src, f"line {r.line}'s src") for r in rows),
                         *((r.dst, f"line {r.line}'s dst") for r in rows)])
        hit = taken.find(os.fspath(report))
        if hit is not None:
            raise OutputError(f"the report would overwrite {hit}; pick another name", report)
        check_writable(report)
    if on_start is not None:
        on_start(rows)
    previous = previous_rows(report)
    start = time.perf_counter()
    if ray:
        results, interrupted = run_ray(rows, address=None if ray is True else str(ray), force=force,
                                       previous=previous, on_result=on_result, num_cpus=ray_num_cpus,
                                       command=command)
        how = f"ray ({'local' if ray is True else ray})"
    else:
        results, interrupted = run_local(rows, workers=workers, force=force, previous=previous,
                                         on_result=on_result, command=command)
        how = f"{max(1, workers or os.cpu_count() or 1)} local worker process(es)"
    out = BatchReport(os.fspath(manifest), results, how, time.perf_counter() - start, interrupted, len(rows))
    if report is not None:
        out.write(report)
    return out


__all__ = ["Row", "RowResult", "BatchReport", "read_manifest", "run_row", "run_local", "run_ray", "run_batch",
           "output_provenance", "estimate_bytes", "COLUMNS"]
