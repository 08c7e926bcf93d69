"""Models vitconv recognises but does not compute, as data: each row names the feature and
how a checkpoint shows it. A source that shows one is refused with the feature named, before
any layout is tried (otherwise it would read as "unused keys" or "no known layout").

Rotary position embeddings have no tensor of their own (timm and transformers compute the
frequencies), so they are recognised by what comes with them: timm's Eva class (EVA-02,
``*_rope_*``) by its separate query/value biases. DINOv3's form (class and storage tokens,
LayerScale, no position table) is computed (:mod:`vitconv.rules.timm_eva`,
:mod:`vitconv.rules.hf_dinov3`, and the original checkpoints, :mod:`vitconv.rules.dinov3`) and
left out here.
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


def _dinov3_eva(keys: Keys) -> bool:
    """timm's Eva in DINOv3's form: class and storage tokens, LayerScale, no position table."""
    have = set(keys)
    return ({"cls_token", "reg_token", "blocks.0.gamma_1"} <= have and "pos_embed" not in have)


#: (feature, what shows it), most specific first
UNSUPPORTED: Tuple[Tuple[str, Callable[[Keys], bool]], ...] = (
    # BEiT has separate query/value biases too: its relative position tables tell it apart
    ("rotary position embeddings with separate query/value biases (timm Eva: EVA-02, *_rope_* models)",
     _all(_any(r"(^|\.)attn\.q_bias$"), lambda keys: not _dinov3_eva(keys), _none(r"relative_position_bias_table$"))),
)


def unsupported_feature(keys: Iterable[str]) -> Optional[str]:
    """The first out-of-scope feature ``keys`` show, or ``None``."""
    keys = list(keys)
    return next((feature for feature, shows in UNSUPPORTED if shows(keys)), None)
