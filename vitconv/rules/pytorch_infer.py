"""Shape-reading helpers the PyTorch layouts share (timm, Hugging Face, jeonsworld, vit-pytorch).

PyTorch layouts store attention as ``(heads * head_dim, width)`` matrices, so the number of
heads is not in any shape. Every one of these code bases defaults to 64-dimensional heads
(timm's and Google's ViT-Ti/S/B/L/H, jeonsworld's configs, vit-pytorch's ``dim_head=64``);
:func:`heads_from_attn_dim` assumes that and the conversion report says so. Callers that
know better pass ``num_heads`` (``vitconv convert --num-heads``).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Dict, Iterator, Optional, Tuple

from ..errors import MappingError

Shapes = Dict[str, Tuple[int, ...]]
#: The head size every supported PyTorch code base uses by default.
DEFAULT_HEAD_DIM = 64
HEADS_NOTE = ("heads: {h} x {d} assumed (64-dim heads, the timm/Google/vit-pytorch default; "
              "the weights do not record it); override with --num-heads")


def count_blocks(shapes: Shapes, pattern: str, what: str, path: Optional[str]) -> int:
    """Number of encoder blocks, requiring them to be numbered ``0..N-1``."""
    rx = re.compile(pattern)
    idx = sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})
    if not idx:
        raise MappingError(f"no {what} tensors: not a ViT checkpoint in this layout", path)
    if idx != list(range(len(idx))):
        raise MappingError(f"encoder blocks are not numbered 0..N-1 (found {idx[:8]}…)", path)
    return len(idx)


_HEADS: "contextvars.ContextVar[Optional[int]]" = contextvars.ContextVar("vitconv_num_heads", default=None)


@contextlib.contextmanager
def given_heads(num_heads: Optional[int]) -> Iterator[None]:
    """Within this block, inference uses ``num_heads`` instead of assuming 64-dim heads."""
    token = _HEADS.set(num_heads)
    try:
        yield
    finally:
        _HEADS.reset(token)


def heads_given() -> Optional[int]:
    """The head count a caller passed with :func:`given_heads`, if any."""
    return _HEADS.get()


def heads_from_attn_dim(attn_dim: int, path: Optional[str]) -> Tuple[int, int]:
    given = _HEADS.get()
    if given is not None:
        if given <= 0 or attn_dim % given:
            raise MappingError(f"--num-heads {given} does not divide the attention width {attn_dim}", path)
        return given, attn_dim // given
    if attn_dim % DEFAULT_HEAD_DIM:
        raise MappingError(f"attention width {attn_dim} is not a multiple of 64, so the number of "
                           "heads cannot be assumed; pass --num-heads", path)
    return attn_dim // DEFAULT_HEAD_DIM, DEFAULT_HEAD_DIM


def grid_from_tokens(n_tokens: int, prefix: int, key: str, path: Optional[str]) -> int:
    """Side of the square patch grid held by a position table of ``n_tokens`` rows."""
    n = n_tokens - prefix
    g = int(round(max(n, 0) ** 0.5))
    if n <= 0 or g * g != n:
        raise MappingError(f"{key} has {n_tokens} rows, which is not {prefix} prefix token(s) plus "
                           "a square grid", path)
    return g


def need(shapes: Shapes, key: str, layout: str, path: Optional[str]) -> Tuple[int, ...]:
    if key not in shapes:
        raise MappingError(f"not a {layout} checkpoint: missing {key!r}", path)
    return shapes[key]


def final_norm_is(cfg, want: str) -> bool:
    """Whether ``cfg``'s final norm computes what ``want`` does: for a class-token model,
    normalising every token and then taking the first equals normalising the first."""
    if cfg.final_norm == want:
        return True
    return cfg.classifier == "token" and {cfg.final_norm, want} == {"encoder", "pooled"}
