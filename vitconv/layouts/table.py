"""Rule tables: one row per canonical tensor, read in both directions, and one row per
config field a layout carries.

A :class:`Rule` names a canonical parameter, the foreign key(s) it comes from and the
:class:`~vitconv.layouts.transforms.LayoutOp` between them. Templates use ``{i}`` for the
encoder block, ``{s}``/``{u}`` (and ``{s1}``/``{u1}``, one-based) for hybrid stem stages
and units. ``when`` selects rows by architecture in the config's own terms (a :class:`When` or an
:class:`All` of them), so the expanded table for a config is exactly the set of tensors that
model has: the strict audit compares key sets against it before a single weight is read.

A :class:`Carry` says how a layout holds one :class:`~vitconv.config.ViTConfig` field that
tensor shapes alone do not (:data:`~vitconv.config.SHAPE_FIELDS` are held by every layout's
shapes): which values it can hold, where its metadata records the field, or which
constructor argument its code takes for it. A field with no row can only hold the
config's default in that layout, which is how what a layout cannot express follows from
its table (:func:`vitconv.layouts.layout.Layout.problems`).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from vitconv.config import CHOICES, ViTConfig
from vitconv.errors import MappingError
from vitconv.layouts.transforms import LayoutOp

Shape = Tuple[int, ...]


#: What a :class:`When` asks of its field: truthy, falsy, equal to or other than ``value``.
_OPS = ("truthy", "falsy", "==", "!=")


@dataclass(frozen=True)
class When:
    """A row selector in the config's own terms, one test of one field: ``When("qkv_bias")`` (the
    field is truthy), ``~When("head_bias")`` (falsy), ``When("classifier", "==", "map")``,
    ``When("final_norm", "!=", "none")``. ``&`` joins tests into an :class:`All`.

    Typed, not text: a field that is not a :class:`~vitconv.config.ViTConfig` field, a value of
    the wrong type, or a text value the field cannot take fails where the table is built, not
    when a model happens to reach the row; and inspect and messages read the field and value
    off the object instead of parsing a string again."""

    field: str
    op: str = "truthy"
    value: Any = None

    def __post_init__(self) -> None:
        f = ViTConfig.__dataclass_fields__.get(self.field)
        if f is None:
            raise ValueError(f"rule condition {self.describe()}: {self.field!r} is not a ViTConfig field")
        if self.op not in _OPS:
            raise ValueError(f"rule condition on {self.field}: unknown test {self.op!r} (one of {', '.join(_OPS)})")
        if (self.value is None) != (self.op in ("truthy", "falsy")) and f.default is not None:
            raise ValueError(f"rule condition {self.describe()}: ==/!= need a value, truthy/falsy none")
        if self.op in ("==", "!=") and f.default is not None and type(self.value) is not type(f.default):
            raise ValueError(f"rule condition {self.describe()}: "
                             f"{self.field} holds {type(f.default).__name__} values")
        if self.op in ("==", "!=") and self.value not in CHOICES.get(self.field, (self.value,)):
            raise ValueError(f"rule condition {self.describe()}: {self.field} is one of {CHOICES[self.field]}")

    @property
    def parts(self) -> Tuple["When", ...]:
        return (self,)

    def holds(self, cfg: ViTConfig) -> bool:
        """Whether ``cfg`` meets the test: the one place a row condition is evaluated."""
        value = getattr(cfg, self.field)
        if self.op == "truthy":
            return bool(value)
        if self.op == "falsy":
            return not value
        return (value == self.value) == (self.op == "==")

    def describe(self) -> str:
        """The test in the config's words (``qk_norm``, ``not head_bias``, ``classifier='map'``):
        the one place a row condition is put into words."""
        if self.op == "truthy":
            return self.field
        if self.op == "falsy":
            return f"not {self.field}"
        return f"{self.field}{'=' if self.op == '==' else self.op}{self.value!r}"

    def __invert__(self) -> "When":
        flipped = {"truthy": "falsy", "falsy": "truthy", "==": "!=", "!=": "=="}[self.op]
        return When(self.field, flipped, self.value)

    def __and__(self, other: "Condition") -> "All":
        return All(self.parts + other.parts)


@dataclass(frozen=True)
class All:
    """Every one of ``parts`` holds (none: always)."""

    parts: Tuple[When, ...] = ()

    def holds(self, cfg: ViTConfig) -> bool:
        return all(p.holds(cfg) for p in self.parts)

    def describe(self) -> str:
        return " & ".join(p.describe() for p in self.parts) or "always"

    def __and__(self, other: "Condition") -> "All":
        return All(self.parts + other.parts)


Condition = Union[When, All]
#: The condition of a row every model has.
ALWAYS = All()
#: Conditions many tables share: a LayerNorm's bias (RMSNorm has a weight only), a final norm, an
#: attention-pooling head, the two MLP forms.
LAYERNORM = When("norm", "==", "layernorm")
FINAL_NORM = When("final_norm", "!=", "none")
MAP = When("classifier", "==", "map")
PLAIN_MLP = When("mlp", "==", "mlp")
SWIGLU = When("mlp", "==", "swiglu")


@dataclass(frozen=True)
class Rule:
    canonical: str
    source: Tuple[str, ...]
    op: LayoutOp
    scope: str = "model"  # "model", "block" ({i}), "unit" ({s},{u}), "proj" (unit with projection)
    when: Condition = ALWAYS

    def __post_init__(self) -> None:
        if not isinstance(self.when, (When, All)):
            raise TypeError(f"rule {self.canonical or self.source}: when must be a When or All, "
                            f"got {self.when!r}")


def fill(key: str, shape: Callable[[ViTConfig], Tuple[int, ...]], when: Condition, scope: str = "model") -> Rule:
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
    constructor keyword its code takes for it where nothing records it (a bare state dict);
    its code then assumes ``default``, and a model with another value needs the argument.
    ``hardcoded``: instead of an argument, code that fixes the value at ``default`` where nothing
    records it, in words: what to do about another value (patch the code; how it resizes).
    ``holds``: a condition on the whole config the value must meet (Hugging Face: the
    attention width is the hidden size). ``default`` may be a function of the config.
    ``why``: one phrase said with a refusal (why the layout cannot hold other values)."""

    field: str
    values: Optional[Tuple[Any, ...]] = None
    key: Optional[str] = None
    argument: Optional[str] = None
    hardcoded: Optional[str] = None
    default: Any = None
    holds: Optional[Callable[[ViTConfig], bool]] = None
    why: str = ""
    #: The values ``key`` can record (None: any); others stay the argument's to set.
    records: Optional[Tuple[Any, ...]] = None
    #: Why a model directory of this layout cannot hold a non-default value (its loader loses
    #: it), where a bare file can: said with the refusal.
    not_in_dir: str = ""
    #: For which models ``key`` is written to the layout's config.json (read back wherever it is): the
    #: rotary parameters only where the model rotates. Every model, by default.
    written: Condition = ALWAYS
    #: The layout's own spelling of a value where it differs from the config's (canonical value ->
    #: the layout's, as its config.json and constructor argument say it); read back through its inverse.
    spelling: Optional[Mapping[Any, Any]] = None
    #: Other spellings its config.json may use for a value (the layout's -> the config's), read
    #: but never written: transformers' ``gelu_new`` is the tanh GELU it writes ``gelu_pytorch_tanh``.
    aliases: Optional[Mapping[Any, Any]] = None
    #: What a recorded value must also be, beyond its type: ``(in words, test)``.
    check: Optional[Tuple[str, Callable[[Any], bool]]] = None
    #: Whether a file's tensors (key -> shape) record the value, so that nothing is assumed where
    #: its config.json is absent: BEiT's relative position tables have a column per head.
    shaped: Optional[Callable[[Mapping[str, Tuple[int, ...]]], bool]] = None

    def __post_init__(self) -> None:
        if self.argument is not None and not self.argument.isidentifier():
            raise ValueError(f"Carry({self.field!r}): argument {self.argument!r} is not a keyword "
                             "(code that fixes the value is said with hardcoded=)")
        if self.argument is not None and self.hardcoded is not None:
            raise ValueError(f"Carry({self.field!r}): an argument sets the value; hardcoded code fixes it: "
                             "not both")

    @property
    def set_by_code(self) -> bool:
        """Whether the layout's code, not its files, decides the value where nothing records it:
        through a constructor argument or hard-coded."""
        return self.argument is not None or self.hardcoded is not None

    def default_for(self, cfg: ViTConfig) -> Any:
        return self.default(cfg) if callable(self.default) else self.default

    def spelled(self, cfg: ViTConfig) -> Any:
        """``cfg``'s value of the field as the layout's config.json says it (a tuple as a list)."""
        value = getattr(cfg, self.field)
        value = (self.spelling or {}).get(value, value)
        return list(value) if isinstance(value, tuple) else value

    def decode(self, raw: Any, where: str, path: Optional[str]) -> Any:
        """The config's value for ``raw``, as the layout's config.json has it at ``where``: its
        spelling undone, then held to the field's type and choices, to ``values`` and to
        ``check``; anything else is a mapping error naming the key, the value and what it may be
        (in the layout's spelling)."""
        read_as = {**{v: k for k, v in (self.spelling or {}).items()}, **(self.aliases or {})}
        known = not read_as or (_hashable(raw) and raw in read_as)  # a spelled field: its spellings only
        value, what = _typed(self.field, read_as[raw] if read_as and known else raw)
        if what is None and self.values is not None and value not in self.values:
            what = "one of " + ", ".join(map(repr, self.values))
        if read_as and (what is not None or not known):
            what = "one of " + ", ".join(repr(k) for k, v in read_as.items() if self.values is None or v in self.values)
        if self.check is not None and (what is not None or not self.check[1](value)):
            what = self.check[0]
        if what is not None:
            raise MappingError(f"config.json: {where} {raw!r} is not {what}", path)
        return value

    def read(self, doc: Mapping[str, Any], path: Optional[str], like: Optional[ViTConfig] = None) -> Any:
        """The value ``doc`` (a config.json) records at ``key``, decoded (:meth:`decode`), else the
        code's default: what a reader of this layout gets. ``like``: the config so far, for a
        default that depends on it (the plain ViT's where not given)."""
        raw = lookup(doc, self.key) if self.key is not None else ABSENT
        if raw is not ABSENT:
            return self.decode(raw, found_at(doc, self.key), path)
        if not self.set_by_code:
            raise AssertionError(f"Carry({self.field!r}) has no default to read")
        return self.default_for(like if like is not None else ViTConfig())

    def recorded(self, cfg: ViTConfig, has_config: bool) -> bool:
        """Whether a container with (``has_config``) or without the layout's config.json keeps
        this field's value for ``cfg``."""
        return (has_config and self.key is not None
                and (self.records is None or getattr(cfg, self.field) in self.records))


#: What :func:`lookup` returns for a key a document does not hold (JSON's null is ``None``).
ABSENT = object()


def lookup(root: object, key: str) -> object:
    """The value at dotted ``key`` (first of its ``|`` alternatives found) in a JSON document."""
    for alternative in key.split("|"):
        node = root
        for part in alternative.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return ABSENT


def found_at(root: object, key: str) -> str:
    """Which of ``key``'s ``|`` alternatives ``root`` holds (the first)."""
    return next(a for a in key.split("|") if lookup(root, a) is not ABSENT)


@lru_cache(maxsize=None)
def _field_type(name: str) -> Any:
    return typing.get_type_hints(ViTConfig)[name]


def _hashable(raw: Any) -> bool:
    return not isinstance(raw, (dict, list))


def _typed(name: str, raw: Any) -> Tuple[Any, Optional[str]]:
    """``(value, None)`` where JSON's ``raw`` is a value of the config field ``name`` (its type,
    its choices), else ``(raw, what it should be)``."""
    kind = _field_type(name)
    args = typing.get_args(kind)
    if typing.get_origin(kind) is Union:  # Optional[X]
        if raw is None:
            return None, None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if kind is bool:
        return raw, None if type(raw) is bool else "true or false"
    if kind is int:
        return raw, None if type(raw) is int else "an integer"
    if kind is float:
        ok = type(raw) in (int, float) and math.isfinite(raw)
        return (float(raw), None) if ok else (raw, "a number")
    if kind is str:
        choices = CHOICES.get(name)
        if isinstance(raw, str) and (choices is None or raw in choices):
            return raw, None
        return raw, "one of " + ", ".join(map(repr, choices)) if choices else "a string"
    if typing.get_origin(kind) is tuple:  # Tuple[int, int]: a list of that many integers
        n = len(args) if Ellipsis not in args else None
        if type(raw) is int and n is not None and n > 1:  # one size for every axis (timm's to_2tuple)
            raw = [raw] * n
        if isinstance(raw, (list, tuple)) and all(type(v) is int for v in raw) and n in (None, len(raw)):
            return tuple(raw), None
        return raw, f"a list of {n or 'some'} integers"
    return raw, None


def recorded_arguments(carries: Sequence[Carry], cfg: ViTConfig, under: str) -> Dict[str, Any]:
    """The constructor arguments a layout's config.json records under ``under`` (timm's
    ``model_args.``) for ``cfg``: each row whose key is there and whose ``written`` holds, its
    value spelled the layout's way, in row order. The rows are the one place these keys are named."""
    return {c.key[len(under):]: c.spelled(cfg) for c in carries
            if c.key is not None and c.key.startswith(under) and c.written.holds(cfg)}


def read_arguments(carries: Sequence[Carry], args: Mapping[str, Any], under: str,
                   path: Optional[str]) -> Dict[str, Any]:
    """The fields ``args`` (what a config.json holds under ``under``) records, by the same rows as
    :func:`recorded_arguments`: field -> value, each decoded and checked (:meth:`Carry.decode`)."""
    out = {}
    for c in carries:
        name = c.key[len(under):] if c.key is not None and c.key.startswith(under) else None
        if name is not None and name in args:
            out[c.field] = c.decode(args[name], name, path)
    return out


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
        if not r.when.holds(cfg):
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
