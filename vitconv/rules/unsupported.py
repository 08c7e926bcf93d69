"""Models vitconv recognises but does not compute, as data: each row names the feature and
how a checkpoint shows it. A source that shows one is refused with the feature named, before
any layout is tried (otherwise it would read as "unused keys" or "no known layout").

Rotary position embeddings have no tensor of their own (timm and transformers compute the
frequencies), so they are recognised by what comes with them: timm's Eva class (EVA-02,
``*_rope_*``) by its separate query/value biases, DINOv3 by q/k/v projections with no
position table.
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
UNSUPPORTED: Tuple[Tuple[str, Callable[[Keys], bool]], ...] = (
    # BEiT has separate query/value biases too: its relative position tables tell it apart
    ("rotary position embeddings with separate query/value biases (timm Eva: EVA-02, *_rope_* models)",
     _all(_any(r"(^|\.)attn\.q_bias$"), _none(r"relative_position_bias_table$"))),
    ("rotary position embeddings (DINOv3: no position table)",
     _all(_any(r"(^|\.)layer\.\d+\.attention\.q_proj\.weight$"), _any(r"embeddings\.patch_embeddings\.weight$"),
          _none(r"position_embedding"))),
    ("qk-norm (a LayerNorm on queries and keys)", _any(r"(^|\.)(q_norm|k_norm)\.weight$")),
)


def unsupported_feature(keys: Iterable[str]) -> Optional[str]:
    """The first out-of-scope feature ``keys`` show, or ``None``."""
    keys = list(keys)
    return next((feature for feature, shows in UNSUPPORTED if shows(keys)), None)
