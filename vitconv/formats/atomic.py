"""Never a half-written file under the final name: write to a temporary file beside
the target (same filesystem, so the rename is atomic), fsync, then rename into place.

Temporary names are hidden and say whose they are: ``.{name}.{pid}.{random}.tmp`` (or
``{suffix}`` instead of ``.tmp`` where a library picks its format by extension). A
process killed with SIGKILL (or a power cut) cannot remove its own temporary file, so
the next write to the same target removes those whose process no longer runs on this
machine; a live writer's file is never touched. SIGTERM and Ctrl-C unwind normally
(the CLI turns SIGTERM into an exception), so they clean up after themselves.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List

from ..errors import OutputError

_SUFFIX = ".tmp"


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}."


def _tmp_pattern(final: Path) -> "re.Pattern[str]":
    # mkstemp's random part: 8 characters from [a-z0-9_]
    return re.compile(re.escape(_tmp_prefix(final)) + r"(\d+)\.[a-z0-9_]{8}(\.[^/]*)?\Z")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def stale_temporaries(path: os.PathLike | str) -> List[Path]:
    """Temporary files for ``path`` left by writers that no longer run (POSIX only)."""
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    pattern = _tmp_pattern(final)
    if os.name != "posix":
        return []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    stale = []
    for name in names:
        m = pattern.match(name)
        if m and not _pid_alive(int(m.group(1))):
            stale.append(directory / name)
    return stale


def _explain(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    return (e.strerror or str(e) or type(e).__name__).lower()


def check_writable(path: os.PathLike | str) -> Path:
    """Fail early, with a plain reason, when ``path`` cannot be created: its directory is
    missing or is a file, or ``path`` itself is a directory. Returns the directory."""
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.exists():
        # a parent that is a file shows up as "does not exist" to exists(); say which
        for anc in [directory, *directory.parents]:
            if anc.exists():
                if not anc.is_dir():
                    raise OutputError(f"cannot write here: {anc} is a file, not a directory", final)
                break
        raise OutputError(f"cannot write here: directory {directory} does not exist", final)
    if not directory.is_dir():
        raise OutputError(f"cannot write here: {directory} is a file, not a directory", final)
    if final.is_dir():
        raise OutputError("is a directory; give a file name", final)
    return directory


@contextlib.contextmanager
def atomic_output(path: os.PathLike | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success fsync it and rename it
    to ``path``. On any exception (a full disk included) the temporary file is removed
    and nothing appears under ``path``; an ``OSError`` becomes :class:`OutputError`.

    Writers whose libraries report I/O failures as other exception types (``torch.save``:
    ``RuntimeError``; safetensors: ``SafetensorError``) translate them themselves."""
    final = Path(path)

    def create(prefix: str, directory: Path) -> str:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix or _SUFFIX, dir=directory)
        os.close(fd)
        return name

    def commit(tmp: Path) -> None:
        if tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)

    with _replaced(final, check_writable(final), create, 0o666, commit) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_directory(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success rename it to ``path``
    (an existing ``path`` must be an empty directory, which it replaces). On any exception
    the temporary directory and everything in it are removed. Its name follows
    :func:`atomic_output`'s pattern, so a killed writer's leftover is removed by the next
    write to the same target."""
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"cannot write here: directory {directory} does not exist", final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise OutputError("exists and is not an empty directory; remove it or pick another name", final)

    def create(prefix: str, where: Path) -> str:
        return tempfile.mkdtemp(prefix=prefix, suffix=_SUFFIX, dir=where)

    def commit(tmp: Path) -> None:
        if final.exists():
            final.rmdir()
        os.rename(tmp, final)

    with _replaced(final, directory, create, 0o777, commit) as tmp:
        yield tmp


@contextlib.contextmanager
def _replaced(final: Path, directory: Path, create: Callable[[str, Path], str], mode: int,
              commit: Callable[[Path], None]) -> Iterator[Path]:
    """The skeleton both share: remove stale temporaries, ``create`` a hidden temporary with
    the mode the user's umask gives any new file or directory (``mkstemp``/``mkdtemp`` make
    0600/0700), yield it, ``commit`` it on success and fsync the directory; on any failure
    remove it, an ``OSError`` becoming an :class:`OutputError` naming ``final``."""
    for old in stale_temporaries(final):
        _remove(old)
    try:
        tmp = Path(create(f"{_tmp_prefix(final)}{os.getpid()}.", directory))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
    except OSError as e:
        raise OutputError(f"cannot write here: {_explain(e)}", final) from None
    try:
        yield tmp
        commit(tmp)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"writing failed: {_explain(e)}", final) from None
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
