"""Named architectures (timm model names, OpenCLIP / OpenAI CLIP towers, Hugging Face
``model_type``s) and what a bare state dict of each cannot record: the activation, the LayerNorm
epsilon, the head count, and the features vitconv does not compute (rotary positions, qk-norm…).

The table (``table.json``) is generated from the libraries by :mod:`vitconv.archs.generate`, each
row with the key signature its state dict has (block indices folded to ``{i}``, classifier keys
left out). A bare file is looked up by its layout, its signature and its shapes
(:func:`fitting`); :func:`resolve` then decides each field the file leaves open: from the user
(``--set``, ``--num-heads``, ``--arch``), from the table when every fitting architecture agrees,
or refuses, naming the candidates grouped by what differs, when they do not.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import BadInputError, MappingError

TABLE = Path(__file__).with_name("table.json")
#: The config fields a table row supplies to a file that leaves them open.
FIELDS = ("act", "norm_eps", "num_heads", "classifier", "final_norm", "pos_resize", "map_prefix", "rope_theta", "rope",
          "rope_ref_grid", "rope_grid_offset", "rope_indexing", "rope_half", "pool_heads")
#: The fields only a timm Eva row records: its rotary form and parameters (where vitconv computes
#: them) and its attention pool's head count
ROPE_FIELDS = ("rope", "rope_ref_grid", "rope_grid_offset", "rope_indexing", "rope_half", "pool_heads")
#: Where a semantic field's value came from (``Semantics.sources``).
SOURCES = {"file": "the tensors", "config": "the file's config.json", "--arch": "--arch", "--set": "--set",
           "--num-heads": "--num-heads", "table": "every architecture whose keys and shapes fit agrees",
           "fixed": "the layout's code fixes it (no alternative)",
           "default": "the layout code's default; no architecture in the table with these keys computes otherwise",
           "assumed": "assumed: the layout code's default, which nothing confirms"}
#: Keys left out of a signature: a classifier's presence follows ``num_classes``, not the architecture.
_HEAD = re.compile(r"^(head|head_dist)\.(weight|bias)$|^proj$")
_BLOCK = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class Arch:
    """One named architecture: what its code computes that its weights do not record."""

    name: str
    source: str  # timm, open_clip, openai, transformers
    layout: str  # the vitconv layout its state dict reads as
    act: Optional[str]
    norm_eps: float
    width: Optional[int]
    heads: Optional[int]
    mlp_dim: Optional[int]
    patch: Optional[int]
    image_size: Optional[int]
    features: Tuple[str, ...] = ()  # what vitconv does not compute (rotary positions, qk-norm…)
    keys: Optional[FrozenSet[str]] = None  # the key signature (None: always read with a config)
    why: str = ""  # a hand-written row: why
    swiglu: bool = False  # fc1 holds gate and up (timm SwiGLUPacked)
    classifier: Optional[str] = None  # the pooling (OpenCLIP's pool_type, timm's global_pool)
    final_norm: Optional[str] = None  # likewise (OpenCLIP final_ln_after_pool)
    pos_resize: Optional[str] = None  # where the layout's code takes it as an argument (timm NaFlexVit)
    rope_theta: Optional[float] = None  # the rotary base (timm Eva's rope_temperature), where vitconv computes it
    #: the rest of a timm Eva's rotary parameters (:data:`ROPE_FIELDS`), where vitconv computes them
    rope: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: whether its attention pool attends to the prefix tokens, where it has both (timm's
    #: ``pool_include_prefix``; None: no pool, no prefix token, or timm Eva's, which always does)
    map_prefix: Optional[bool] = None


    def math(self, fields: Sequence[str]) -> Tuple[Any, ...]:
        """What this row says of ``fields``, and what it computes beyond vitconv."""
        return tuple(self.value(f) for f in fields) + (self.features,)

    def says(self, name: str) -> bool:
        """Whether this row decides ``name``: a value, or for a rotary field one recorded even
        where it is None (no reference grid is a value)."""
        return name in self.rope if name in ROPE_FIELDS else self.value(name) is not None

    def value(self, name: str) -> Any:
        if name in ROPE_FIELDS:
            value = self.rope.get(name)
            return tuple(value) if isinstance(value, list) else value
        return {"act": self.act, "norm_eps": self.norm_eps, "num_heads": self.heads, "classifier": self.classifier,
                "final_norm": self.final_norm, "pos_resize": self.pos_resize, "rope_theta": self.rope_theta,
                "map_prefix": self.map_prefix}[name]


@lru_cache(maxsize=1)
def table() -> Dict[str, Arch]:
    """Every shipped architecture by name (read once)."""
    doc = json.loads(TABLE.read_text(encoding="utf-8"))
    sigs = [frozenset(s) for s in doc["signatures"]]
    out = {}
    for r in doc["archs"]:
        out[r["name"]] = Arch(r["name"], r["source"], r["layout"], r.get("act"), float(r.get("norm_eps") or 0.0),
                              r.get("width"), r.get("heads"), r.get("mlp_dim"), r.get("patch"), r.get("image_size"),
                              tuple(r.get("features") or ()), sigs[r["sig"]] if "sig" in r else None, r.get("why", ""),
                              bool(r.get("swiglu")), r.get("classifier"), r.get("final_norm"),
                              r.get("pos_resize"), r.get("rope_theta"),
                              {f: r[f] for f in ROPE_FIELDS if f in r}, r.get("map_prefix"))
    return out


def versions() -> Dict[str, str]:
    """The library versions the shipped table was generated with."""
    return json.loads(TABLE.read_text(encoding="utf-8"))["versions"]


def signature(keys: Iterable[str]) -> FrozenSet[str]:
    """A state dict's key signature: block indices folded to ``{i}``, classifier keys left out."""
    return frozenset(_BLOCK.sub(".{i}.", k) for k in keys if not _HEAD.search(k))


@lru_cache(maxsize=1)
def _layouts_by_signature() -> Dict[FrozenSet[str], FrozenSet[str]]:
    out: Dict[FrozenSet[str], set] = {}
    for a in table().values():
        if a.keys is not None:
            out.setdefault(a.keys, set()).add(a.layout)
    return {k: frozenset(v) for k, v in out.items()}


def layouts_with(keys: Iterable[str]) -> FrozenSet[str]:
    """The layouts of the named architectures whose state dict has exactly these keys (block
    indices folded, classifier keys aside): how a file whose keys any of several layouts could
    read (Perception Encoder's Eva has a plain timm ViT's keys) is told apart by what it is."""
    return _layouts_by_signature().get(signature(keys), frozenset())


def lookup(name: str, path: Any = None) -> Arch:
    """The architecture called ``name``, or a one-line error with the nearest names."""
    rows = table()
    if name in rows:
        return rows[name]
    near = difflib.get_close_matches(name, list(rows), n=3, cutoff=0.6)
    raise BadInputError(f"--arch {name}: not an architecture vitconv knows"
                        + (f" (nearest: {', '.join(near)})" if near else " (names: timm model names, "
                           "open_clip:NAME, openai:NAME, hf:MODEL_TYPE)"), path)


def _shape_fit(a: Arch, cfg: ViTConfig) -> bool:
    return a.width == cfg.width and a.patch == cfg.patch_size and a.mlp_dim == cfg.mlp_dim


def fitting(layout: str, keys: Iterable[str], cfg: ViTConfig) -> Tuple[List[Arch], bool]:
    """The architectures whose state dict has these keys in ``layout`` (and the same MLP form),
    narrowed to those of the same width, patch and MLP size when there are any; and whether
    that narrowing held (only then does a row's head count apply)."""
    sig = signature(keys)
    by_keys = [a for a in table().values() if a.layout == layout and a.keys == sig
               and a.swiglu == (cfg.mlp == "swiglu")]
    by_shape = [a for a in by_keys if _shape_fit(a, cfg)]
    return (by_shape, True) if by_shape else (by_keys, False)


@dataclass
class Semantics:
    """What a read decided for the fields a file leaves open: the values to set (``values``),
    where each semantic field came from (``sources``: field -> a :data:`SOURCES` tag), the
    architecture named (``arch``) and the fitting candidates (``candidates``, ``by_shape``)."""

    values: Dict[str, Any] = field(default_factory=dict)
    sources: Dict[str, str] = field(default_factory=dict)
    arch: Optional[str] = None
    candidates: List[str] = field(default_factory=list)
    #: whether the candidates have the file's width, patch and MLP size too, not only its keys
    by_shape: bool = True

    @property
    def fit(self) -> str:
        """How the candidates fit the file, in words."""
        return "whose keys and shapes fit" if self.by_shape else "with these keys"

    @property
    def caveat(self) -> str:
        """What a value from candidates that fit by keys alone cannot promise ('' where the shapes fit)."""
        return "" if self.by_shape else "; none has this file's sizes, and a model of its own may differ"

    @property
    def assumed(self) -> List[str]:
        """Fields whose value nothing but the layout code's default supports."""
        return sorted(f for f, s in self.sources.items() if s == "assumed")


def _describe(fields: Sequence[str], math: Tuple[Any, ...]) -> str:
    parts = [f"{f}={v!r}" if f != "norm_eps" else f"eps {v:g}" for f, v in zip(fields, math[:-1])
             if v is not None]
    if math[-1]:
        parts.append(", ".join(math[-1]) + ", which vitconv does not compute yet")
    return "; ".join(parts)


def _names(group: Sequence[Arch]) -> str:
    names = sorted(a.name for a in group)
    shown = ", ".join(names[:3])
    return f"--arch {shown}" + (f", … ({len(names)} in all)" if len(names) > 3 else "")


def ambiguity(candidates: Sequence[Arch], fields: Sequence[str]) -> Optional[str]:
    """Why ``candidates`` leave ``fields`` (and the features) undecided, grouped by what differs;
    ``None`` when they all compute the same function there and vitconv computes it."""
    groups: Dict[Tuple[Any, ...], List[Arch]] = {}
    for a in candidates:
        groups.setdefault(a.math(fields), []).append(a)
    if len(groups) == 1 and not next(iter(groups))[-1]:
        return None
    differ = [f for i, f in enumerate(fields) if len({m[i] for m in groups}) > 1]

    def what(math: Tuple[Any, ...]) -> str:
        return _describe(differ, tuple(math[fields.index(f)] for f in differ) + (math[-1],))

    said = [f"{what(m)} ({_names(g)})" for m, g in sorted(groups.items(), key=lambda kv: (bool(kv[0][-1]), kv[1][0].name))]
    settable = [f"--set {f}=…" for f in differ if f != "num_heads"]
    how = "; pick one with --arch" + (f", or say {' and '.join(settable)}"
                                      if settable and not any(m[-1] for m in groups) else "")
    if all(m[-1] for m in groups):
        how = "; vitconv cannot convert it until it computes " + ("that" if len(groups) == 1 else "those")
    if len(groups) == 1:
        return "its keys and shapes fit only architectures with " + said[0] + how
    return "its keys and shapes fit architectures that compute different functions: " + "; ".join(said) + how


def resolve(layout: str, keys: Iterable[str], cfg: ViTConfig, open_fields: Sequence[str],
            fixed: Sequence[str], recorded: Sequence[str], given: Mapping[str, Any], num_heads: Optional[int],
            arch: Optional[str], path: Any = None, named: Optional[str] = None) -> Semantics:
    """Decide the open fields of a file of ``layout`` with ``keys`` whose shapes gave ``cfg``
    (read with the layout's defaults): ``given`` (``--set``) and ``num_heads`` win; then
    ``arch`` (``--arch``: its row must be of this layout, fit the keys and shapes, and compute
    nothing vitconv cannot); then the table, when every fitting architecture agrees. Fitting
    architectures that disagree on an undecided field, or compute what vitconv does not, are
    refused (:class:`MappingError`, naming each group and its ``--arch``). ``fixed``: fields the
    layout's code fixes; ``recorded``: fields its config.json records; ``named``: the architecture
    the file's own config names (a timm hub directory), whose row decides the fields it knows
    (the head count where the widths agree: the config may change the sizes)."""
    sem = Semantics()
    for f in recorded:
        sem.sources[f] = "config"
    for f in fixed:
        sem.sources[f] = "fixed"
    open_fields = [f for f in open_fields if f not in recorded]
    for f, v in given.items():
        sem.sources[f] = "--set"
    if num_heads is not None:
        sem.sources["num_heads"] = "--num-heads"
    undecided = [f for f in FIELDS if f in open_fields and f not in sem.sources]
    row = table().get(named or "")
    if row is not None and row.layout == layout:
        if row.features:
            raise MappingError(f"its config names {row.name}: {', '.join(row.features)}: not supported yet", path)
        if arch is not None and arch != row.name:
            raise BadInputError(f"--arch {arch}, but the file's config names {row.name}", path)
        for f in undecided:
            if row.says(f) and (f != "num_heads" or row.width == cfg.width):
                sem.values[f], sem.sources[f] = row.value(f), "config"
        undecided = [f for f in undecided if f not in sem.values]
        sem.arch, arch = row.name, None
    if arch is not None:
        a = lookup(arch, path)
        _check_arch(a, layout, keys, cfg, path)
        sem.arch = a.name
        for f in undecided:
            if a.says(f):
                sem.values[f], sem.sources[f] = a.value(f), "--arch"
        undecided = [f for f in undecided if f not in sem.values]
    else:
        candidates, by_shape = fitting(layout, keys, cfg)
        if sem.arch is not None:  # the file's config names its architecture: not one of the others
            candidates = [a for a in candidates if a.name == sem.arch] or candidates
        told = {**{f: tuple(v) if isinstance(v, list) else v for f, v in given.items()},  # JSON lists: tuples
                **({"num_heads": num_heads} if num_heads is not None else {})}
        agreeing = [a for a in candidates if all(a.value(f) == v for f, v in told.items()
                                                 if f in FIELDS and (f != "num_heads" or by_shape))]
        candidates = agreeing or candidates
        sem.candidates, sem.by_shape = sorted(a.name for a in candidates), by_shape
        fields = [f for f in undecided if (f != "num_heads" or by_shape)
                  and any(a.says(f) for a in candidates)]
        why = ambiguity(candidates, fields) if candidates else None
        if why is not None:
            raise MappingError(f"a bare {layout} state dict: {why}", path)
        if candidates:
            for f in fields:
                sem.values[f], sem.sources[f] = candidates[0].value(f), "table"
            undecided = [f for f in undecided if f not in fields]
    for f in undecided:  # the code's default: unconfirmed where another known architecture differs
        others = {a.value(f) for a in table().values() if a.layout == layout
                  and (f != "num_heads" or a.width == cfg.width)} - {None, getattr(cfg, f)}
        sem.sources[f] = "assumed" if others else "default"
    for f in open_fields:
        sem.sources.setdefault(f, "assumed")
    return sem


def _check_arch(a: Arch, layout: str, keys: Iterable[str], cfg: ViTConfig, path: Any) -> None:
    """``--arch`` must name an architecture vitconv computes, of this file's layout, keys and shapes."""
    if a.features:
        raise BadInputError(f"--arch {a.name}: {', '.join(a.features)}: not supported yet; vitconv does not "
                            "compute this architecture", path)
    if a.layout != layout:
        raise BadInputError(f"--arch {a.name} is a {a.source} architecture of the {a.layout} layout; this file "
                            f"is the {layout} layout", path)
    if a.keys is not None:
        sig = signature(keys)
        extra, missing = sorted(sig - a.keys), sorted(a.keys - sig)
        if extra or missing:
            said = "; ".join(p for p in (f"the file has {', '.join(extra[:4])}" if extra else "",
                                         f"{a.name} has {', '.join(missing[:4])}" if missing else "") if p)
            raise BadInputError(f"--arch {a.name} contradicts the file's keys: {said}", path)
    wrong = [f"{what} {mine} (the file: {theirs})" for what, mine, theirs in
             (("width", a.width, cfg.width), ("patch", a.patch, cfg.patch_size), ("MLP size", a.mlp_dim, cfg.mlp_dim))
             if mine is not None and mine != theirs]
    if (cfg.mlp == "swiglu") != a.swiglu:
        wrong.append(f"MLP {'SwiGLU' if a.swiglu else 'GELU-style'} (the file: {cfg.mlp})")
    if wrong:
        raise BadInputError(f"--arch {a.name} contradicts the file's tensors: {a.name} has " + ", ".join(wrong), path)
