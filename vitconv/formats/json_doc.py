"""JSON that comes with a checkpoint (``config.json``, a shard index, a ``vitconv_config``
string) is untrusted: it is read with a size cap, and every way the parser can fail
(invalid text, integers past Python's digit limit, nesting past its recursion limit)
becomes one :class:`~vitconv.errors.BadInputError` naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NoReturn, Optional, Type

from vitconv.errors import BadInputError, first_line

#: Largest JSON document read: an ImageNet-21k ``config.json`` with labels is about 1 MB, a
#: shard index of a 100-shard model about 100 KB.
MAX_JSON_BYTES = 64 << 20


def parse_json(text: str | bytes, what: str, path: Optional[os.PathLike | str] = None,
               error: Type[BadInputError] = BadInputError) -> Any:
    """``json.loads(text)``; a failure is ``error("{what} is not valid JSON (…)", path)``."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{what} is not usable JSON (nested deeper than the parser's limit)", path) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the int digit limit
        raise error(f"{what} is not valid JSON ({first_line(e)})", path) from None


class _ReadOnly:
    """What :class:`ReadOnlyDict` and :class:`ReadOnlyList` share: mutators that raise, and
    copies (pickled, ``copy``) that stay read-only."""

    _plain: type = object  # the builtin it is a read-only kind of

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a parsed checkpoint document is read-only: change a copy (dict(d), list(a))")

    def __reduce__(self):
        return type(self), (self._plain(self),)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo: dict):
        return self


class ReadOnlyDict(_ReadOnly, dict):
    """A JSON object parsed once and handed to every reader of it, none of which may change it
    for the others. A ``dict`` (so ``isinstance``, equality, ``repr`` and ``json.dumps`` are a
    parsed document's) whose every mutator raises."""

    _plain = dict
    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _ReadOnly._read_only


class ReadOnlyList(_ReadOnly, list):
    """A JSON array of a :class:`ReadOnlyDict`: a ``list`` whose every mutator raises."""

    _plain = list
    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = extend = insert = pop = remove = \
        clear = sort = reverse = _ReadOnly._read_only


#: The document of a file that is not there: nothing recorded.
EMPTY = ReadOnlyDict()


def read_only(doc: Any) -> Any:
    """A parsed JSON document with every object and array in it read-only."""
    if isinstance(doc, dict):
        return ReadOnlyDict((k, read_only(v)) for k, v in doc.items())
    if isinstance(doc, list):
        return ReadOnlyList(read_only(v) for v in doc)
    return doc


def read_json(path: os.PathLike | str, what: str) -> Any:
    """The parsed JSON document at ``path``, refused beyond :data:`MAX_JSON_BYTES`."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise BadInputError(f"{what} is {size:,} bytes, more than the {MAX_JSON_BYTES:,} "
                                    "a JSON document of a checkpoint can need", p)
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise BadInputError(f"cannot read {what}: {e.strerror or e}", p) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{what} is not UTF-8 text ({first_line(e)})", p) from None
    return parse_json(text, what, p)
