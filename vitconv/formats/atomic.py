"""Never a half-written file under the final name: write to a temporary file beside
the target (same filesystem, so the rename is atomic), fsync, then rename into place."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError


@contextlib.contextmanager
def atomic_output(path: os.PathLike | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success rename it to ``path``.

    On any exception the temporary file is removed and nothing appears under ``path``.
    """
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=(suffix or ".tmp"),
                                        dir=directory)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write here: {e.strerror or e}", final) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists() and tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        _remove(tmp)
        raise OutputError(f"writing failed: {e.strerror or e}", final) from None
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()
