"""The project's own error types.

Every problem with a user's input surfaces as a :class:`VitconvError` carrying the
file it concerns, so the CLI can print one line (``vitconv: error: FILE: problem``)
and exit with a stable code instead of a traceback.

Messages quote text that comes from hostile files (key names, library messages); a key
named ``"a\\nb"`` or holding terminal escapes must not break the one-line promise or
repaint the user's terminal, so :func:`one_line` escapes control characters and caps
the length.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

#: Longest message the CLI prints; key lists are already shortened, this is the backstop.
MAX_MESSAGE = 1500


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` with newlines, tabs and other control characters escaped, cut at ``limit``."""
    out = []
    for ch in str(text):
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append(" ")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000
              or ch in "\u2028\u2029"):  # controls, lone surrogates
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    s = "".join(out)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of a library exception's message (or its type name)."""
    for line in str(exc).splitlines():
        if line.strip():
            return one_line(line.strip(), limit)
    return type(exc).__name__


def failure(exc: BaseException) -> "tuple[str, int]":
    """``(one-line message, exit code)`` for an exception, as the CLI prints it: a
    :class:`VitconvError` its own; out of memory; a file name the system refuses as too long (exit 2);
    anything else an internal error (exit 1)."""
    if isinstance(exc, VitconvError):
        return str(exc), exc.exit_code
    if isinstance(exc, MemoryError):
        return "out of memory", 1
    if (isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG
            and isinstance(exc.filename, (str, bytes, os.PathLike))):  # a path given, or one a file names
        return f"{one_line(os.fsdecode(exc.filename), 120)}: file name too long", 2
    return f"internal error: {type(exc).__name__}: {first_line(exc, 300)}", 1


class VitconvError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, path: Optional[os.PathLike | str] = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return one_line(text)


class BadInputError(VitconvError):
    """The input file is unreadable, corrupt, unsafe, or not a ViT checkpoint (exit 2)."""

    exit_code = 2


class MappingError(BadInputError):
    """Keys or shapes do not fit the layout: missing, unused or mis-shaped tensors."""


class VerificationError(VitconvError):
    """A converted or exported model disagrees with its reference past tolerance (exit 3)."""

    exit_code = 3


class OutputError(VitconvError):
    """The output cannot be written (unwritable or missing directory, full disk) (exit 1).

    Not exit 2: the input was fine; retrying with another ``-o`` or more space works."""

    exit_code = 1
