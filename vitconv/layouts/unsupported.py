"""Models vitconv recognises but does not compute, as data: each row names the feature and
how a checkpoint shows it. A source that shows one is refused with the feature named, before
any layout is tried (otherwise it would read as "unused keys" or "no known layout").

Rotary position embeddings have no tensor of their own (timm and transformers compute the
frequencies). timm's Eva class (DINOv3, EVA, EVA-02, ``*_rope_*``, Perception Encoder) is read by
:mod:`vitconv.layouts.timm_eva`, which refuses by name the Eva forms it does not compute.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, List, Optional, Tuple

Keys = List[str]


def _any(pattern: str) -> Callable[[Keys], bool]:
    rx = re.compile(pattern)
    return lambda keys: any(rx.search(k) for k in keys)


def _all(*tests: Callable[[Keys], bool]) -> Callable[[Keys], bool]:
    return lambda keys: all(t(keys) for t in tests)


def _none(pattern: str) -> Callable[[Keys], bool]:
    found = _any(pattern)
    return lambda keys: not found(keys)


#: (feature, what shows it), most specific first
UNSUPPORTED: Tuple[Tuple[str, Callable[[Keys], bool]], ...] = ()


def unsupported_feature(keys: Iterable[str]) -> Optional[str]:
    """The first out-of-scope feature ``keys`` show, or ``None``."""
    keys = list(keys)
    return next((feature for feature, shows in UNSUPPORTED if shows(keys)), None)
