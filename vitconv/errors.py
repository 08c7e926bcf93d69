"""The project's own error types.

Every problem with a user's input surfaces as a :class:`VitconvError` carrying the
file it concerns, so the CLI can print one line (``vitconv: error: FILE: problem``)
and exit with a stable code instead of a traceback.
"""

from __future__ import annotations

import os
from typing import Optional


class VitconvError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, path: Optional[os.PathLike | str] = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class BadInputError(VitconvError):
    """The input file is unreadable, corrupt, unsafe, or not a ViT checkpoint (exit 2)."""

    exit_code = 2


class MappingError(BadInputError):
    """Keys or shapes do not fit the layout: missing, unused or mis-shaped tensors."""


class VerificationError(VitconvError):
    """A converted or exported model disagrees with its reference past tolerance (exit 3)."""

    exit_code = 3


class OutputError(VitconvError):
    """The output cannot be written (unwritable directory, full disk) (exit 1)."""

    exit_code = 1
