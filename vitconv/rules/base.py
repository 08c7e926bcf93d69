"""Rule tables: one row per canonical tensor, read in both directions.

A :class:`Rule` names a canonical parameter, the foreign key(s) it comes from and the
:class:`~vitconv.rules.layout.LayoutOp` between them. Templates use ``{i}`` for the
encoder block, ``{s}``/``{u}`` (and ``{s1}``/``{u1}``, one-based) for hybrid stem stages
and units. ``when`` selects rows by architecture, so the expanded table for a config
is exactly the set of tensors that model has: the strict audit compares key sets
against it before a single weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import ViTConfig
from ..errors import MappingError
from .layout import LayoutOp

#: Row selectors: which architectures a rule applies to.
WHEN: Dict[str, Callable[[ViTConfig], bool]] = {
    "always": lambda c: True,
    "token": lambda c: c.classifier == "token",
    "qkv_bias": lambda c: c.qkv_bias,
    "final_norm": lambda c: c.final_norm != "none",
    "pre_logits": lambda c: bool(c.representation_size),
    "head": lambda c: c.num_classes > 0,
    "hybrid": lambda c: c.resnet_layers is not None,
    "patch_norm": lambda c: c.patch_norm,
    "distilled": lambda c: c.distilled,
    "distilled_head": lambda c: c.distilled and c.num_classes > 0,
}


@dataclass(frozen=True)
class Rule:
    canonical: str
    source: Tuple[str, ...]
    op: LayoutOp
    scope: str = "model"  # "model", "block" ({i}), "unit" ({s},{u}), "proj" (unit with projection)
    when: str = "always"


@dataclass(frozen=True)
class ExpandedRule:
    canonical: str
    source: Tuple[str, ...]
    op: LayoutOp


def _units(cfg: ViTConfig, projection_only: bool) -> Iterator[Dict[str, int]]:
    for s, n in enumerate(cfg.resnet_layers or ()):
        for u in range(n):
            if projection_only and u != 0:  # only a stage's first unit changes shape
                continue
            yield {"s": s, "u": u, "s1": s + 1, "u1": u + 1}


def expand_rules(table: Sequence[Rule], cfg: ViTConfig) -> List[ExpandedRule]:
    """The concrete rows for ``cfg``: templates filled for every block and stem unit."""
    out: List[ExpandedRule] = []
    for r in table:
        if not WHEN[r.when](cfg):
            continue
        if r.scope == "model":
            envs: List[Dict[str, int]] = [{}]
        elif r.scope == "block":
            envs = [{"i": i} for i in range(cfg.depth)]
        elif r.scope in ("unit", "proj"):
            envs = list(_units(cfg, r.scope == "proj"))
        else:
            raise ValueError(f"unknown rule scope {r.scope!r}")
        for env in envs:
            out.append(ExpandedRule(r.canonical.format(**env), tuple(s.format(**env) for s in r.source), r.op))
    return out


def audit_report(rules: Sequence[ExpandedRule], source_keys: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(missing, unused)`` source keys, sorted, without raising: what ``inspect`` reports
    and what :func:`audit` turns into an error."""
    needed: Dict[str, str] = {}
    for r in rules:
        for k in r.source:
            if k in needed:
                raise AssertionError(f"rule table consumes {k!r} twice ({needed[k]}, {r.canonical})")
            needed[k] = r.canonical
    have = set(source_keys)
    return sorted(set(needed) - have), sorted(have - set(needed))


def audit(rules: Sequence[ExpandedRule], source_keys: Sequence[str], path: Optional[str]) -> None:
    """Strict audit: every source key consumed exactly once, every rule's keys present.
    Lists the offending keys in the error."""
    missing, unused = audit_report(rules, source_keys)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_short(missing)}")
    if unused:
        problems.append(f"{len(unused)} unused key(s): {_short(unused)}")
    if problems:
        raise MappingError("; ".join(problems), path)


def _short(keys: Sequence[str], n: int = 8) -> str:
    s = ", ".join(keys[:n])
    return s + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


def map_to_canonical(rules: Sequence[ExpandedRule], get: Callable[[str], np.ndarray], cfg: ViTConfig,
                     expected: Optional[Mapping[str, Tuple[int, ...]]] = None,
                     path: Optional[str] = None) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(canonical name, array)`` one at a time, reading each source key once.

    ``expected`` (canonical shapes of the model) turns a shape mismatch into an error
    naming the source key instead of a failure deep inside ``load_state_dict``."""
    for r in rules:
        arrays = [get(k) for k in r.source]
        try:
            t = r.op.to_canonical(arrays, cfg)
        except ValueError as e:
            shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in zip(r.source, arrays))
            raise MappingError(f"cannot map {shapes} to {r.canonical} ({e})", path) from None
        if expected is not None and tuple(t.shape) != tuple(expected[r.canonical]):
            shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in zip(r.source, arrays))
            raise MappingError(f"{shapes} gives {r.canonical} shape {tuple(t.shape)}, but the "
                               f"inferred architecture needs {tuple(expected[r.canonical])}", path)
        # Drop the inputs now: held across the yield they would still be alive while the
        # next rule's inputs are read, one more rule's worth of peak memory when streaming.
        del arrays
        yield r.canonical, t
        del t


def map_from_canonical(rules: Sequence[ExpandedRule], state: Mapping[str, np.ndarray],
                       cfg: ViTConfig) -> Dict[str, np.ndarray]:
    """Invert the table: canonical state dict -> foreign ``{key: array}``."""
    have, want = set(state), {r.canonical for r in rules}
    if have != want:
        raise MappingError(f"canonical state does not match the layout: missing "
                           f"{_short(sorted(want - have))}; unexpected {_short(sorted(have - want))}")
    out: Dict[str, np.ndarray] = {}
    for r in rules:
        parts = r.op.from_canonical(np.asarray(state[r.canonical]), cfg)
        for k, a in zip(r.source, parts):
            out[k] = a
    return out
