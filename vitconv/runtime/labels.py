"""Class names for a classifier's outputs: the lists vitconv ships (ImageNet-1k, Google's
ImageNet-21k) or a user's text file, one label per line.

Labels are not weights: a checkpoint seldom carries them (a Hugging Face ``config.json``'s
``id2label``, a timm directory's ``label_names``, vitconv's own ``vitconv_labels`` metadata do).
They travel with a conversion into every output that has a place for them, and when a head's
size is that of a shipped list but none was given, the report says so.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from vitconv.errors import BadInputError
from vitconv.formats.json_doc import parse_json

DATA = Path(__file__).resolve().parent.parent / "data" / "labels"
#: name -> (file, number of classes)
SHIPPED = {"imagenet-1k": ("imagenet-1k.tsv", 1000), "imagenet-21k": ("imagenet-21k.tsv.gz", 21843)}
#: Longest label file read (an ImageNet-21k list is about 800 KB).
MAX_BYTES = 16 << 20


@lru_cache(maxsize=None)
def _shipped(name: str) -> tuple:
    file, n = SHIPPED[name]
    raw = (DATA / file).read_bytes()
    text = (gzip.decompress(raw) if file.endswith(".gz") else raw).decode("utf-8")
    names = tuple(line.split("\t", 1)[1] for line in text.splitlines())
    assert len(names) == n, (name, len(names))
    return names


def load_labels(spec: Union[str, os.PathLike, Sequence[str]], where: Optional[os.PathLike | str] = None) -> List[str]:
    """``imagenet-1k``, ``imagenet-21k``, a UTF-8 text file with one label per line (a
    trailing empty line is ignored; an empty label is not), or a list of labels (the Python
    API), held to what a label file can say: non-empty strings without line breaks, so every
    output that records them reads back."""
    if not isinstance(spec, (str, os.PathLike)):
        try:
            names = list(spec)
        except TypeError:
            raise BadInputError(f"labels must be a list of strings or a file, got {type(spec).__name__}",
                                where) from None
        for i, name in enumerate(names):
            if not isinstance(name, str):
                raise BadInputError(f"labels[{i}] is {type(name).__name__} {name!r:.40}, not a string", where)
            if not name.strip() or any(c in name for c in "\r\n\x00"):
                raise BadInputError(f"labels[{i}] {name!r:.40}: a label is a non-empty line of text", where)
        if not names:
            raise BadInputError("labels is an empty list", where)
        return [name.strip() for name in names]
    spec = os.fspath(spec)
    if spec in SHIPPED:
        return list(_shipped(spec))
    p = Path(spec)
    if not p.is_file():
        raise BadInputError(f"--labels: neither {', '.join(SHIPPED)} nor a file", p)
    if p.stat().st_size > MAX_BYTES:
        raise BadInputError(f"label file is larger than {MAX_BYTES:,} bytes", p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"label file is not readable UTF-8 text ({e})", p) from None
    lines = text.splitlines()
    if not lines:
        raise BadInputError("label file is empty", p)
    if any(not line.strip() for line in lines):
        raise BadInputError("label file has an empty line: one label per line", p)
    return [line.strip() for line in lines]


def check_count(labels: Sequence[str], num_classes: int, where: Optional[os.PathLike | str] = None,
                what: str = "--labels") -> None:
    if len(labels) != num_classes:
        raise BadInputError(f"{what} gives {len(labels):,} labels, but the model has {num_classes:,} "
                            "classes", where)


def suggest(num_classes: int) -> Optional[str]:
    """The shipped list whose size is the head's, if any (the report mentions it)."""
    return next((name for name, (_, n) in SHIPPED.items() if n == num_classes), None)


def shipped_name(labels: Sequence[str]) -> Optional[str]:
    """The shipped list ``labels`` is, if it is one (kept by name in vitconv's metadata)."""
    for name, (_, n) in SHIPPED.items():
        if len(labels) == n and tuple(labels) == _shipped(name):
            return name
    return None


def placeholder(labels: Optional[Sequence[str]]) -> bool:
    """True for no labels or Hugging Face's ``LABEL_0 … LABEL_N`` defaults."""
    return not labels or all(label == f"LABEL_{i}" for i, label in enumerate(labels))


def to_metadata(labels: Sequence[str]) -> str:
    """The ``vitconv_labels`` metadata string: a shipped list's name, else a JSON list."""
    return shipped_name(labels) or json.dumps(list(labels), ensure_ascii=False)


def from_metadata(text: str, where: Optional[os.PathLike | str] = None) -> List[str]:
    if text in SHIPPED:
        return list(_shipped(text))
    value = parse_json(text, "vitconv_labels metadata", where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInputError("vitconv_labels metadata is not a list of strings", where)
    return value


def from_id2label(id2label: object, where: Optional[os.PathLike | str] = None) -> Optional[List[str]]:
    """A Hugging Face ``id2label`` (``{"0": "tench, …", …}``) as a list, None for placeholders."""
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        items: Dict[int, str] = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise BadInputError("config.json: id2label keys are not class indices", where) from None
    if sorted(items) != list(range(len(items))):
        raise BadInputError("config.json: id2label does not number the classes 0..N-1", where)
    labels = [items[i] for i in range(len(items))]
    return None if placeholder(labels) else labels
