"""Rule tables: one row per canonical tensor, read in both directions, and one row per
config field a layout carries.

A :class:`Rule` names a canonical parameter, the foreign key(s) it comes from and the
:class:`~vitconv.layouts.transforms.LayoutOp` between them. Templates use ``{i}`` for the
encoder block, ``{s}``/``{u}`` (and ``{s1}``/``{u1}``, one-based) for hybrid stem stages
and units. ``when`` selects rows by architecture in the config's own words (see
:func:`condition`), so the expanded table for a config is exactly the set of tensors that
model has: the strict audit compares key sets against it before a single weight is read.

A :class:`Carry` says how a layout holds one :class:`~vitconv.config.ViTConfig` field that
tensor shapes alone do not (:data:`~vitconv.config.SHAPE_FIELDS` are held by every layout's
shapes): which values it can hold, where its metadata records the field, or which
constructor argument its code takes for it. A field with no row can only hold the
config's default in that layout, which is how what a layout cannot express follows from
its table (:func:`vitconv.layouts.layout.Layout.problems`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.layouts.transforms import LayoutOp

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    canonical: str
    source: Tuple[str, ...]
    op: LayoutOp
    scope: str = "model"  # "model", "block" ({i}), "unit" ({s},{u}), "proj" (unit with projection)
    when: str = "always"


def fill(key: str, shape: Callable[[ViTConfig], Tuple[int, ...]], when: str, scope: str = "model") -> Rule:
    """A write-only row: a tensor the layout's code always has and the canonical model does not,
    written as zeros where zeros compute the same function (a zero bias; a mask token that
    only masked training reads). It has no canonical name, is never read, and is active only
    when the canonical model lacks the tensor (``when``)."""
    zeros = LayoutOp("zeros", lambda a, cfg: None, lambda a, cfg: [np.zeros(shape(cfg), a.dtype)], 1,
                     shapes=lambda s, cfg: [shape(cfg)])
    return Rule("", (key,), zeros, scope, when)


@dataclass(frozen=True)
class ExpandedRule:
    canonical: str
    source: Tuple[str, ...]
    op: LayoutOp


@dataclass(frozen=True)
class Carry:
    """How a layout carries the config field ``field``.

    ``values``: the values it can hold (None: any). ``key``: where the layout's own metadata
    (``config.json``) records it, when the container has such a file. ``argument``: the
    constructor argument its code takes for it where nothing records it (a bare state dict);
    its code then assumes ``default``, and a model with another value needs the argument
    (not an identifier: what to do instead, for code that hard-codes the value).
    ``holds``: a condition on the whole config the value must meet (Hugging Face: the
    attention width is the hidden size). ``default`` may be a function of the config.
    ``why``: one phrase said with a refusal (why the layout cannot hold other values)."""

    field: str
    values: Optional[Tuple[Any, ...]] = None
    key: Optional[str] = None
    argument: Optional[str] = None
    default: Any = None
    holds: Optional[Callable[[ViTConfig], bool]] = None
    why: str = ""
    #: The values ``key`` can record (None: any); others stay the argument's to set.
    records: Optional[Tuple[Any, ...]] = None
    #: Why a model directory of this layout cannot hold a non-default value (its loader loses
    #: it), where a bare file can: said with the refusal.
    not_in_dir: str = ""

    def default_for(self, cfg: ViTConfig) -> Any:
        return self.default(cfg) if callable(self.default) else self.default

    def recorded(self, cfg: ViTConfig, has_config: bool) -> bool:
        """Whether a container with (``has_config``) or without the layout's config.json keeps
        this field's value for ``cfg``."""
        return (has_config and self.key is not None
                and (self.records is None or getattr(cfg, self.field) in self.records))


@functools.lru_cache(maxsize=None)
def condition(when: str) -> Callable[[ViTConfig], bool]:
    """A row selector in the config's own terms: ``always``; ``FIELD`` (true when the field
    is truthy: ``qkv_bias``, ``representation_size``, ``num_classes``); ``FIELD=VALUE`` and
    ``FIELD!=VALUE`` (compared as text: ``classifier=token``, ``final_norm!=none``); several
    joined by ``&``. Unknown field names fail when the table is first used."""
    if when == "always":
        return lambda cfg: True
    names = {f.name for f in dataclasses.fields(ViTConfig)}
    tests = []
    for part in when.split("&"):
        part = part.strip()
        if "!=" in part:
            name, value = part.split("!=", 1)
            test = (lambda n, v: lambda c: str(getattr(c, n)) != v)(name, value)
        elif "=" in part:
            name, value = part.split("=", 1)
            test = (lambda n, v: lambda c: str(getattr(c, n)) == v)(name, value)
        else:
            name = part
            test = (lambda n: lambda c: bool(getattr(c, n)))(name)
        if name not in names:
            raise ValueError(f"rule condition {when!r}: {name!r} is not a ViTConfig field")
        tests.append(test)
    return lambda cfg: all(t(cfg) for t in tests)


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
        if not condition(r.when)(cfg):
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
        if not r.canonical:  # a fill: written, never read
            continue
        for k in r.source:
            if k in needed:
                raise AssertionError(f"rule table consumes {k!r} twice ({needed[k]}, {r.canonical})")
            needed[k] = r.canonical
    have = set(source_keys)
    return sorted(set(needed) - have), sorted(have - set(needed))


def audit(rules: Sequence[ExpandedRule], shapes: Mapping[str, Shape], canonical: Mapping[str, Shape],
          cfg: ViTConfig, path: Optional[str]) -> None:
    """Strict audit: every source key consumed exactly once, every rule's keys present, each
    with the shape the architecture needs. Lists the offending keys in the error."""
    missing, unused = audit_report(rules, list(shapes))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {short_list(missing)}")
    if unused:
        problems.append(f"{len(unused)} unused key(s): {short_list(unused)}")
    if problems:
        raise MappingError("; ".join(problems), path)
    wrong = shape_mismatches(rules, shapes, canonical, cfg)
    if wrong:
        raise MappingError(f"{len(wrong)} tensor(s) disagree with the architecture {cfg.describe()}: "
                           + short_list(wrong, 4), path)


def shape_mismatches(rules: Sequence[ExpandedRule], shapes: Mapping[str, Shape],
                     canonical: Mapping[str, Shape], cfg: ViTConfig) -> List[str]:
    """Source keys whose stored shape is not what the architecture ``cfg`` (canonical
    shapes ``canonical``) puts there, each as ``key (have), expected (want)``: the header-only
    half of the audit, so a config that disagrees with the tensors is refused before a weight
    is read or a model built. Axes of length 1 are not compared: readers reshape across them,
    and the conversion checks each tensor's exact shape as it maps it."""

    def squeezed(s: Shape) -> Shape:  # (64,) and (1, 1, 1, 64) both hold a GroupNorm scale
        return tuple(n for n in s if n != 1)

    out = []
    for r in rules:
        if not r.canonical:
            continue
        for k, want in zip(r.source, r.op.foreign_shapes(canonical[r.canonical], cfg)):
            if k in shapes and squeezed(shapes[k]) != squeezed(want):
                out.append(f"{k} {tuple(shapes[k])}, expected {tuple(want)}")
    return out


def short_list(keys: Sequence[str], n: int = 8) -> str:
    s = ", ".join(keys[:n])
    return s + (f", … (+{len(keys) - n} more)" if len(keys) > n else "")


def map_to_canonical(rules: Sequence[ExpandedRule], get: Callable[[str], np.ndarray], cfg: ViTConfig,
                     expected: Mapping[str, Shape], path: Optional[str] = None
                     ) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield ``(canonical name, array)`` one at a time, reading each source key once.

    ``expected`` (canonical shapes of the model) turns a shape mismatch into an error
    naming the source key instead of a failure deep inside ``load_state_dict``."""
    for r in rules:
        if not r.canonical:  # a fill: written, never read
            continue
        arrays = [get(k) for k in r.source]
        try:
            t = r.op.to_canonical(arrays, cfg)
        except ValueError as e:
            shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in zip(r.source, arrays))
            raise MappingError(f"cannot map {shapes} to {r.canonical} ({e})", path) from None
        if tuple(t.shape) != tuple(expected[r.canonical]):
            shapes = ", ".join(f"{k} {tuple(a.shape)}" for k, a in zip(r.source, arrays))
            raise MappingError(f"{shapes} gives {r.canonical} shape {tuple(t.shape)}, but the "
                               f"inferred architecture needs {tuple(expected[r.canonical])}", path)
        # Drop the inputs now: held across the yield they would still be alive while the
        # next rule's inputs are read, one more rule's worth of peak memory when streaming.
        del arrays
        yield r.canonical, t
        del t


def map_from_canonical(rule: ExpandedRule, array: np.ndarray, cfg: ViTConfig) -> Dict[str, np.ndarray]:
    """One row inverted: a canonical tensor -> its foreign ``{key: array}``; a tensor the layout
    cannot hold (BEiT's key projection has no bias) is refused naming it."""
    try:
        return dict(zip(rule.source, rule.op.from_canonical(np.asarray(array), cfg)))
    except ValueError as e:
        raise MappingError(f"cannot write {rule.canonical or 'a fill'} as {', '.join(rule.source)}: {e}") from None


def foreign_shapes(rules: Sequence[ExpandedRule], canonical: Mapping[str, Shape],
                   cfg: ViTConfig) -> Dict[str, Shape]:
    """Foreign key -> shape, from canonical shapes alone (no tensor is read or made)."""
    out: Dict[str, Shape] = {}
    for r in rules:
        for k, s in zip(r.source, r.op.foreign_shapes(canonical.get(r.canonical, ()), cfg)):
            out[k] = s
    return out
