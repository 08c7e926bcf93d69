"""Never a half-written file under the final name: write to a temporary file beside
the target (same filesystem, so the rename is atomic), fsync, then rename into place.

Temporary names are hidden and say whose they are: ``.{name}.{pid}.{random}.tmp`` (or
``{suffix}`` instead of ``.tmp`` where a library picks its format by extension). A
process killed with SIGKILL (or a power cut) cannot remove its own temporary file, so
the next write to the same target removes those whose process no longer runs on this
machine; a live writer's file is never touched, nor one this process reads (an input the
user named so, :func:`reading`). SIGTERM and Ctrl-C unwind normally
(the CLI turns SIGTERM into an exception), so they clean up after themselves.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Set, Tuple

from vitconv.errors import OutputError

_SUFFIX = ".tmp"


#: Longest output name kept whole in its temporary's name: the temporary adds about 30 bytes,
#: and no file name may pass 255 bytes.
_NAME_BYTES = 200


def _tmp_prefix(final: Path) -> str:
    """``.{name}.``; a name too long to fit is cut (on a character boundary) and given a
    digest of the whole, so the temporary of a legal 250-byte name is legal too."""
    name = final.name
    if len(os.fsencode(name)) > _NAME_BYTES:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        while len(os.fsencode(name)) > 100:
            name = name[:-1]
        name = f"{name}~{digest}"
    return f".{name}."


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


#: What this process reads (device, inode): never removed as a stale temporary, whatever its name.
_READING: Set[Tuple[int, int]] = set()


def reading(path: os.PathLike | str) -> None:
    """Say that this process reads ``path`` (a file or directory): an input named like a
    temporary of an output (``.out.safetensors.999.abcdefgh.tmp``, a killed run's leftover the user
    converts again) is then never taken for a stale one and removed."""
    try:
        st = os.stat(path)
    except OSError:
        return
    _READING.add((st.st_dev, st.st_ino))


def _read_here(path: Path) -> bool:
    for look in (os.lstat, os.stat):
        try:
            st = look(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in _READING:
            return True
    return False


def stale_temporaries(path: os.PathLike | str) -> List[Path]:
    """Temporary files for ``path`` left by writers that no longer run (POSIX only), less
    anything this process reads (:func:`reading`)."""
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
        if m and not _pid_alive(int(m.group(1))) and not _read_here(directory / name):
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
    missing, is a file or refuses a new file, or ``path`` itself is a directory. Returns the
    directory."""
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
    try:  # the one true test (a read-only directory or file system; root ignores modes)
        fd, probe = tempfile.mkstemp(prefix=f"{_tmp_prefix(final)}{os.getpid()}.", suffix=_SUFFIX, dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write here: {_explain(e)}", final) from None
    return directory


def same_file(a: os.PathLike | str, b: os.PathLike | str) -> bool:
    """``a`` and ``b`` name one file or directory, however spelled: ``./``, ``..``, a trailing
    slash, a relative or absolute path, a symlink on the way (resolved), a hard link (same
    inode, when both exist)."""
    try:
        if os.path.lexists(a) and os.path.lexists(b) and os.path.samefile(a, b):
            return True
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: os.PathLike | str, folder: os.PathLike | str) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def refuse_clobber(outputs: Sequence[os.PathLike | str], inputs: Sequence[os.PathLike | str]) -> None:
    """Every command that writes calls this before any work: an output may not be one of its
    inputs (or a directory that holds one: a model directory written over its own source), nor
    another output, however either is spelled (:func:`same_file`); URLs are not compared."""
    def local(paths):
        return [os.fspath(p) for p in paths if p is not None and "://" not in os.fspath(p)]
    outs, ins = local(outputs), local(inputs)
    for i, out in enumerate(outs):
        for inp in ins:
            if same_file(out, inp) or (os.path.isdir(out) and _inside(inp, out)):
                raise OutputError(f"would overwrite the input {inp}; pick another name", out)
        for other in outs[:i]:
            if same_file(out, other):
                raise OutputError(f"is also the output {other}; give each output its own name", out)


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
def atomic_files(paths: Sequence[os.PathLike | str]) -> Iterator[Path]:
    """One output of several files (an ONNX graph and its external ``.data``): yield a hidden
    temporary directory beside them, in which the writer creates each under its final name
    (so the files may refer to each other by name); on success each is fsynced and renamed
    into place, the first path last, and the directory removed. On failure nothing appears."""
    finals = [Path(p) for p in paths]
    main = finals[0]
    directory = check_writable(main)
    for p in finals[1:]:
        check_writable(p)
        if p.parent.resolve() != directory.resolve():
            raise OutputError(f"{p.name} must be written beside {main.name}", p)

    def create(prefix: str, where: Path) -> str:
        return tempfile.mkdtemp(prefix=prefix, suffix=_SUFFIX, dir=where)

    def commit(tmp: Path) -> None:
        for p in finals[1:] + finals[:1]:
            made = tmp / p.name
            if made.exists():
                with open(made, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(made, _mode(0o666))  # onnx writes external data 0600
                os.replace(made, p)
        shutil.rmtree(tmp)

    with _replaced(main, directory, create, 0o777, commit) as tmp:
        yield tmp


class _Guarded(io.RawIOBase):
    """A file that never raises on write: the first ``OSError`` is kept, later writes are
    dropped. For torch's C++ zip writer, which aborts the whole process (``std::terminate``)
    when a write fails inside it; :func:`guarded_file` raises the kept error afterwards."""

    def __init__(self, f):
        super().__init__()
        self._f, self.error = f, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def write(self, b) -> int:
        if self.error is None:
            try:
                self._f.write(b)
            except OSError as e:
                self.error = e
        return len(b)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._f.flush()
            except OSError as e:
                self.error = e


def write_in_child(write: Callable[[object], None], path: os.PathLike | str) -> None:
    """``write(path)`` in a forked child process, for torch writers that stream only when
    given a path (given a file object, ``torch.jit.save`` builds the whole archive in memory,
    then copies it into bytes: three times the weights at once) and that abort the process
    when a write fails inside them. The child shares this process's memory copy-on-write and
    only reads it, so the weights are not copied; if it dies, the cause is read off the file
    system (the file-size limit, free space) and raised here as the ``OSError`` the write met.
    Without ``fork`` (Windows), ``write`` gets a :func:`guarded_file` instead."""
    if not hasattr(os, "fork"):
        with guarded_file(path) as f:
            write(f)
        return
    import resource

    pid = os.fork()
    if pid == 0:  # the child: no core file, and torch's dying words are not the user's one line
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            write(os.fspath(path))
            code = 0
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C, SIGTERM: the writer goes too, before the temporary is removed
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    if status == 0:
        return
    size = Path(path).stat().st_size if Path(path).exists() else 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size >= limit:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    st = os.statvfs(Path(path).parent)
    if st.f_bavail * st.f_frsize < (1 << 20):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    raise OSError(errno.EIO, f"the writer process died ({how}) after {size:,} bytes")


@contextlib.contextmanager
def guarded_file(path: os.PathLike | str) -> Iterator[io.RawIOBase]:
    """``path`` opened for a torch writer (``torch.jit.save``, ``torch.export.save``, the
    AOTInductor packager) so that a full disk is an ``OSError`` here, not a process abort."""
    with open(path, "wb") as f:
        g = _Guarded(f)
        yield g
        g.flush()
        if g.error is not None:
            raise g.error


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
        os.chmod(tmp, _mode(mode))
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


def _mode(mode: int) -> int:
    """``mode`` under the user's umask: what ``open`` or ``mkdir`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


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
