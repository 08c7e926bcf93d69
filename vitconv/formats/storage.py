"""Checkpoints at fsspec URLs (``s3://``, ``gs://``, ``https://``, ...) for every command.

A source is streamed once, in 8 MiB range reads, to a local temporary file, hashing it in the
same pass (the readers then work on a local file, as they always do: memory stays bounded by
the chunk, disk needs the file's size, checked before the first byte). An output is written
locally, verified if asked, and uploaded only once complete; the file that carries the
provenance (a directory's ``model.safetensors`` or a shard index) goes last, so its presence
means the rest is there. Filesystems come from fsspec's registry: ``s3fs``, ``gcsfs`` and
``aiohttp`` (``https://``) are optional extras (``pip install "vitconv[s3]"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from vitconv.errors import BadInputError, OutputError, VitconvError, first_line

PathLike = Union[str, os.PathLike]

CHUNK = 8 << 20
#: A safetensors header longer than this is refused (as the local reader does).
MAX_HEADER = 100 << 20
#: The extra that brings each protocol's filesystem, for the message when it is missing.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


def is_url(path: PathLike) -> bool:
    """``proto://...`` other than ``file://``; a local path never is."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


#: Seconds to wait for a connection, and for each read (silence between bytes, not a whole
#: download), before a remote source or output is given up (its row fails; a batch's other
#: rows run): a server that accepts the connection and never answers must not hang a zoo.
#: ``VITCONV_NETWORK_TIMEOUT`` overrides it.
NETWORK_TIMEOUT_S = 15.0


def network_timeout() -> float:
    try:
        value = float(os.environ.get("VITCONV_NETWORK_TIMEOUT", NETWORK_TIMEOUT_S))
    except ValueError:
        return NETWORK_TIMEOUT_S
    return value if value > 0 else NETWORK_TIMEOUT_S


def _timeouts(proto: str, t: float) -> Dict[str, object]:
    """Each filesystem's own spelling of connect and read timeouts of ``t`` seconds, under what
    the user's fsspec configuration says for the protocol (which wins)."""
    import fsspec

    ours: Dict[str, Dict[str, object]] = {}
    if proto in ("http", "https"):
        import aiohttp

        ours = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t,
                                                                   sock_read=t)}}
    elif proto in ("s3", "s3a"):
        ours = {"config_kwargs": {"connect_timeout": t, "read_timeout": t}}
    elif proto in ("gs", "gcs"):
        return {"timeout": t}
    conf = fsspec.config.conf.get(proto, {})
    return {k: {**v, **(conf.get(k) or {})} for k, v in ours.items()}


def filesystem(url: str, timeout: Optional[float] = None):
    """``(fsspec filesystem, path inside it)``, with connect and read timeouts (``timeout``,
    default :func:`network_timeout`); a missing protocol package is named with its extra."""
    import fsspec

    proto = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url, **_timeouts(proto, timeout or network_timeout()))
    except ImportError as e:
        extra = EXTRAS.get(proto)
        how = f'pip install "vitconv[{extra}]"' if extra else "install the fsspec filesystem for it"
        raise BadInputError(f"{proto}:// needs a package that is not installed ({first_line(e)}): {how}",
                            url) from None
    except ValueError as e:  # unknown protocol
        raise BadInputError(f"not a URL fsspec knows ({first_line(e)})", url) from None
    except OSError as e:  # filesystems that connect when made (ftp://): a host that does not resolve
        raise (_remote_error(e, url) if _timed_out(e) else
               BadInputError(f"cannot connect ({type(e).__name__}: {first_line(e)})", url)) from None


def _timed_out(e: Optional[BaseException]) -> bool:
    """``e`` or an exception it was raised from is a timeout (fsspec's HTTP ``info`` turns a
    read timeout into ``FileNotFoundError``)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, TimeoutError):  # asyncio's and aiohttp's timeouts, socket.timeout
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _remote_error(e: BaseException, url: str) -> VitconvError:
    if isinstance(e, VitconvError):
        return e
    if _timed_out(e):
        return BadInputError(f"no answer within {network_timeout():g} s (connect or read timeout; "
                             "VITCONV_NETWORK_TIMEOUT sets it)", url)
    if isinstance(e, FileNotFoundError):
        return BadInputError("no such object", url)
    return BadInputError(f"cannot read ({type(e).__name__}: {first_line(e)})", url)


def _download(fs, remote: str, local: Path, url: str) -> str:
    """Stream ``remote`` to ``local`` in :data:`CHUNK` reads; its sha256."""
    h = hashlib.sha256()
    try:
        with fs.open(remote, "rb", block_size=CHUNK) as f, open(local, "wb") as out:
            while True:
                block = f.read(CHUNK)
                if not block:
                    break
                h.update(block)
                out.write(block)
    except OSError as e:
        if isinstance(e, FileNotFoundError) or e.errno is None:
            raise _remote_error(e, url) from None
        raise OutputError(f"cannot stage {url} here ({first_line(e)})", local) from None
    except Exception as e:  # a filesystem's own errors (botocore, aiohttp)
        raise _remote_error(e, url) from None
    return h.hexdigest()


def _listing(fs, remote: str) -> Dict[str, dict]:
    """``{path: info}`` of the object at ``remote``, or of every file under it (a directory),
    from one ``info`` and, for a directory, one ``find``."""
    info = fs.info(remote)
    if info.get("type") != "directory":
        return {remote: info}
    return {f: i for f, i in fs.find(remote, detail=True).items() if i.get("type") != "directory"}


#: What a store's ``info()`` says that changes with an object's bytes: S3's and HTTP's ETag,
#: GCS's md5Hash and generation, HTTP's Content-MD5 and Digest, and modification times.
VALIDATORS = ("ETag", "etag", "md5Hash", "generation", "Content-MD5", "Digest", "LastModified",
              "Last-Modified", "mtime", "updated")


def fingerprint(src: PathLike) -> Optional[Tuple[str, int]]:
    """``(digest, bytes)``: a stand-in for ``src``'s sha256 on a rerun, from metadata alone,
    no byte of it read. The digest covers where it is, each file's size and what its store
    says changes with its bytes (a local file: its modification time in ns). None when the
    store says nothing of the kind or cannot be asked (then only the sha256 can decide)."""
    try:
        if not is_url(src):
            p = Path(src)
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
            entries = [[os.fspath(f.resolve()), st.st_size, {"mtime_ns": st.st_mtime_ns}]
                       for f in files for st in (f.stat(),)]
        else:
            fs, remote = filesystem(os.fspath(src))
            entries = [[name, int(i.get("size") or 0), {k: str(i[k]) for k in VALIDATORS if i.get(k)}]
                       for name, i in sorted(_listing(fs, remote).items())]
    except Exception as e:  # noqa: BLE001 - the conversion's own reading reports what is wrong
        if is_url(src) and _timed_out(e):  # but a silent server would only be waited on again
            raise _remote_error(e, os.fspath(src)) from None
        return None
    if not entries or not all(e[2] for e in entries):
        return None
    doc = json.dumps({"src": os.fspath(src), "files": entries}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest(), sum(e[1] for e in entries)


@contextlib.contextmanager
def local_input(src: PathLike, workdir: Optional[PathLike] = None) -> Iterator[Tuple[Path, Optional[str]]]:
    """``(a local path, its sha256 if computed here)`` for ``src``: itself when local; for a
    URL a staged copy (a file, or a model directory's files), removed afterwards. Errors
    about the copy name the URL."""
    if not is_url(src):
        yield Path(src), None
        return
    url = os.fspath(src)
    fs, remote = filesystem(url)
    try:
        found = _listing(fs, remote)
        files = list(found)
        sizes = [int(i.get("size") or 0) for i in found.values()]
    except Exception as e:
        raise _remote_error(e, url) from None
    with tempfile.TemporaryDirectory(prefix="vitconv-stage-", dir=workdir) as tmp:
        free = shutil.disk_usage(tmp).free
        if sum(sizes) > free:
            raise OutputError(f"staging {url} needs {sum(sizes):,} bytes; {free:,} are free here", tmp)
        name = remote.rstrip("/").rsplit("/", 1)[-1] or "source"
        local = Path(tmp) / name
        if files == [remote]:  # one object, not a directory
            digest: Optional[str] = _download(fs, remote, local, url)
        else:
            digest = None
            for f in files:
                rel = f[len(remote.rstrip("/")) + 1:]
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                _download(fs, f, local / rel, url + "/" + rel)
        try:
            yield local, digest
        except VitconvError as e:  # the staged copy is the user's URL
            if e.path is not None and Path(e.path).is_relative_to(tmp):
                raise type(e)(e.message, url + os.fspath(e.path)[len(os.fspath(local)):]) from None
            raise


@contextlib.contextmanager
def local_output(dst: PathLike, workdir: Optional[PathLike] = None) -> Iterator[Path]:
    """A local path to write ``dst`` at: itself when local; for a URL a path in a private
    temporary directory, whose every file (a directory's, or shards beside their index) is
    uploaded beside ``dst`` when the block succeeds, and nothing when it fails."""
    if not is_url(dst):
        yield Path(dst)
        return
    url = os.fspath(dst).rstrip("/")
    filesystem(url)  # a missing package is said before any work
    with tempfile.TemporaryDirectory(prefix="vitconv-out-", dir=workdir) as tmp:
        local = Path(tmp) / (url.rsplit("/", 1)[-1] or "output")
        try:
            yield local
        except VitconvError as e:  # the local stand-in is the user's URL
            if e.path is not None and Path(e.path).is_relative_to(tmp):
                raise type(e)(e.message, url + os.fspath(e.path)[len(os.fspath(local)):]) from None
            raise
        upload(Path(tmp), url.rsplit("/", 1)[0])


def upload(folder: Path, parent_url: str) -> List[str]:
    """Put every file under ``folder`` at the same relative path under ``parent_url``; the
    provenance-bearing file last (a shard index; a directory's weights or index), so a reader
    who finds it finds the rest. Returns the URLs written."""
    fs, remote = filesystem(parent_url)

    def last(p: Path) -> Tuple[int, str]:
        rel = p.relative_to(folder)
        final = p.name.endswith(".index.json") or (len(rel.parts) > 1 and p.name == "model.safetensors")
        return (1 if final else 0, rel.as_posix())
    done = []
    for p in sorted((p for p in folder.rglob("*") if p.is_file()), key=last):
        target = remote.rstrip("/") + "/" + p.relative_to(folder).as_posix()
        try:
            fs.put_file(os.fspath(p), target)
        except Exception as e:
            raise OutputError(f"upload failed ({type(e).__name__}: {first_line(e)})",
                              parent_url + "/" + p.relative_to(folder).as_posix()) from None
        done.append(parent_url.rstrip("/") + "/" + p.relative_to(folder).as_posix())
    return done


def safetensors_metadata(url: str) -> Optional[Dict[str, str]]:
    """The ``__metadata__`` of a safetensors file at ``url``, from two range reads (the length,
    then the header); None when there is no such object or it is not safetensors."""
    fs, remote = filesystem(url)
    try:
        with fs.open(remote, "rb", block_size=1 << 16) as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                return None
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return None
    except Exception:
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def read_json(url: str, limit: int = 16 << 20) -> Optional[dict]:
    """A JSON object at ``url`` (a shard index), or None."""
    fs, remote = filesystem(url)
    try:
        with fs.open(remote, "rb") as f:
            doc = json.loads(f.read(limit + 1)[:limit])
    except Exception:
        return None
    return doc if isinstance(doc, dict) else None


def exists(url: str) -> bool:
    fs, remote = filesystem(url)
    try:
        return bool(fs.exists(remote))
    except Exception:
        return False
