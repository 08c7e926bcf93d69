"""The layout registry: every foreign layout declares itself here, with one signature.

A :class:`Layout` is a rule table (tensors, both directions), the :class:`~.base.Carry`
rows for the config fields it holds, how to recognise it (``detect``) and how to read
its architecture (``infer``), plus the notes it owes a user. Each ``layouts/<family>.py``
module registers its layouts when imported; :mod:`vitconv.layouts` imports them all.

What a layout cannot express is not a hand-kept list: :meth:`Layout.problems` walks the
config's fields against the layout's carries (a field without a row holds only its
default there) and the model's tensors against the table's rows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from vitconv.config import SHAPE_FIELDS, ViTConfig, describe_field, parameter_shapes, storage_only, training_only
from vitconv.errors import MappingError
from vitconv.runtime.preprocess import Preprocessing, Usage
from vitconv.layouts.table import (ABSENT, Carry, ExpandedRule, Rule, expand_rules, foreign_shapes, found_at, lookup,
                                   short_list)
from vitconv.layouts.unsupported import unsupported_feature
from vitconv.formats.provenance import CONFIG_KEY
from vitconv.formats.base import TensorSource
from vitconv.formats.hf_dir import CONFIG_JSON
from vitconv.formats.json_doc import EMPTY, ReadOnlyDict

Shape = Tuple[int, ...]

#: Containers a layout can be written as: one file of either kind, a Google ``.npz``, or a
#: model directory (``config.json`` beside ``model.safetensors``).
CONTAINERS = ("safetensors", "pt", "npz", "dir")


@dataclass(frozen=True)
class Probe:
    """What recognition and inference see: tensor shapes (model prefix stripped for
    ``infer``), the source's metadata strings, its path for messages, a head count the caller
    gave (``--num-heads``), and the ``config.json`` beside the weights (a model directory;
    parsed once when it was opened, read-only; empty for a single file)."""

    shapes: Dict[str, Shape]
    metadata: Dict[str, str] = field(default_factory=dict)
    path: Optional[str] = None
    num_heads: Optional[int] = None
    config: Mapping[str, Any] = field(default_factory=ReadOnlyDict)

    @classmethod
    def of(cls, source: TensorSource, shapes: Dict[str, Shape], path: Optional[str] = None,
           num_heads: Optional[int] = None) -> "Probe":
        """The probe of what ``source`` holds (``path``: default the source's)."""
        return cls(shapes, dict(source.metadata), path if path is not None else source.path, num_heads,
                   source.documents.get(CONFIG_JSON, EMPTY))


def _nothing(*args) -> List[str]:
    return []


def _no_prefix(keys: Sequence[str], path: Optional[str]) -> str:
    return ""


@dataclass(frozen=True)
class Layout:
    """One layout. ``table(cfg)`` gives its rows for a config; ``carries`` how it holds
    each config field beyond the shapes; ``containers`` what it can be written as;
    ``target`` the ``--to`` name that selects it (several layouts may share one: the first
    that can express the model is written)."""

    name: str
    description: str
    table: Callable[[ViTConfig], Sequence[Rule]]
    detect: Callable[[Probe], bool]
    infer: Callable[[Probe], ViTConfig]
    carries: Tuple[Carry, ...] = ()
    containers: Tuple[str, ...] = ("safetensors", "pt")
    target: Optional[str] = None
    #: Among the layouts of one ``--to`` name, lower ranks are tried first (BEiT's 1: a plain ViT is
    #: written to the plain layout even where BEiT's could hold it too).
    write_rank: int = 0
    #: The model's prefix among the keys (Google's ``opt/target/``), or a MappingError; keys
    #: outside it, and keys starting with one of ``ignore``, are left out (what they are:
    #: ``ignored_what``, said in the notes).
    prefix: Callable[[Sequence[str], Optional[str]], str] = _no_prefix
    ignore: Tuple[str, ...] = ()
    ignored_what: Union[str, Callable[[str], str]] = "optimizer state"  # or a function of the prefix
    #: ``(stacked prefix, per-block prefix with {i})``: the layout may store every block's tensors
    #: stacked along a leading axis (big_vision ``scan=True``); the table names them per block,
    #: read through :class:`~vitconv.formats.stacked.StackedSource` and written stacked when the
    #: config's ``scan`` says so.
    stacked: Optional[Tuple[str, str]] = None
    #: Written under this prefix (big_vision's saver nests everything in ``params/``).
    write_prefix: str = ""
    #: ``config.json`` of a model directory in this layout, for a model and its :class:`Usage`
    #: (None: what the layout assumes by default).
    directory_config: Optional[Callable[[ViTConfig, Optional[Usage]], dict]] = None
    #: Other JSON files of such a directory (``preprocessor_config.json``): name -> document.
    directory_files: Callable[[ViTConfig, Usage], Dict[str, dict]] = lambda cfg, usage: {}
    #: What images the models of this layout expect; None: not known (timm's defaults are
    #: assumed, and said to be).
    preprocessing: Optional[Preprocessing] = None
    #: ``config.json`` keys (dotted; ``a|b``: alternatives, first found wins) that restate what
    #: the weights' shapes say. Read, each must equal what ``directory_config`` writes for the
    #: architecture inferred from the shapes: the layout's own code builds its model from them.
    restates: Tuple[str, ...] = ()
    #: What a user must know when reading (assumptions) or writing (how to run it) this layout.
    read_notes: Callable[[ViTConfig, Probe], List[str]] = _nothing
    write_notes: Callable[[ViTConfig], List[str]] = _nothing
    #: For ``inspect``: config field -> the tensor (or convention) its value was read from.
    sources: Callable[[ViTConfig], Dict[str, str]] = lambda cfg: {}
    #: container -> the call that loads a written output in the layout's own code (``{path}``).
    loads_with: Dict[str, str] = field(default_factory=dict)
    #: The architecture the file's own metadata names (timm's config.json ``architecture``), if any:
    #: what it implies comes from :mod:`vitconv.archs`, as for ``--arch``.
    names_arch: Callable[[Probe], Optional[str]] = lambda probe: None
    #: Fields a small tensor's values record where no shape does (the original DINOv3's
    #: ``rope_embed.periods`` buffer holds ``rope_theta`` and its precision): ``(cfg, read, path) ->
    #: cfg``, with ``read(key)`` that tensor's values, called once after ``infer``. None: shapes say all.
    from_values: Optional[Callable[[ViTConfig, Callable[[str], Any], Optional[str]], ViTConfig]] = None

    @property
    def target_name(self) -> str:
        return self.target or self.name

    def read_config(self, probe: Probe) -> ViTConfig:
        """The architecture ``infer`` reads from ``probe``, held to the layout's declarations: a
        value no row of this layout allows (:meth:`undeclared`) is refused, naming the field, never
        passed on as if the layout's code computed it."""
        cfg = self.infer(probe)
        bad = self.undeclared(cfg)
        if bad:
            raise MappingError(f"not a model the {self.name} layout holds: {'; '.join(bad)}", probe.path)
        return cfg

    def rules(self, cfg: ViTConfig) -> List[ExpandedRule]:
        return expand_rules(self.table(cfg), cfg)

    def carry(self, name: str) -> Optional[Carry]:
        return next((c for c in self.carries if c.field == name), None)

    def declaration(self, name: str) -> str:
        """How this layout declares the config field ``name``, read off its rows: ``"shape"`` (its
        tensors' shapes hold it, :data:`~vitconv.config.SHAPE_FIELDS`), ``"held"`` (a :class:`Carry`
        row that lets it vary), ``"fixed"`` (a row with one value, or code that fixes it where nothing
        records it) or ``"default"`` (no row: it can only mean the config's default here)."""
        if name in SHAPE_FIELDS:
            return "shape"
        c = self.carry(name)
        if c is None:
            return "default"
        return "fixed" if c.hardcoded is not None or (c.values is not None and len(c.values) == 1) else "held"

    def undeclared(self, cfg: ViTConfig) -> List[str]:
        """Values of ``cfg`` its declarations do not allow (a field with no row away from the
        default, or one outside its row's values), each naming the field and value: what a read
        must never produce. :meth:`problems` says the same, and more, of a model to be written."""
        return self._field_problems(cfg, None)

    def problems(self, cfg: ViTConfig, canonical: Iterable[str], recorded: bool) -> List[str]:
        """What this layout cannot express of ``cfg`` (a model with tensors ``canonical``),
        each naming the field and value; empty when it can. ``recorded``: the container
        keeps this layout's ``config.json`` (a model directory), so fields carried only
        there survive."""
        out = self._field_problems(cfg, recorded)
        if out:
            return out
        rows = {r.canonical for r in self.rules(cfg) if r.canonical}  # fills are not model tensors
        names = list(canonical)
        dropped = set(self.dropped(cfg))
        missing = [n for n in names if n not in rows and n not in dropped]
        extra = sorted(rows - set(names))
        if missing:
            out.append(f"no {self.name} row for {short_list(missing)}")
        if extra:
            out.append(f"the {self.name} layout always has {short_list(extra)}, which this model lacks")
        return out

    def _field_problems(self, cfg: ViTConfig, recorded: Optional[bool]) -> List[str]:
        """The fields of ``cfg`` this layout's rows cannot hold; ``recorded`` None: only what the
        declarations forbid outright (a read), else also what a container of this kind loses."""
        out = []
        for f in dataclasses.fields(ViTConfig):
            if f.name in SHAPE_FIELDS:
                continue
            value, c = getattr(cfg, f.name), self.carry(f.name)
            if c is None and (training_only(f.name) or storage_only(f.name)):
                continue  # left out when written (dropped(): a note), or stored the layout's way
            if c is None:
                if value != f.default:
                    out.append(f"{f.name}={value!r} ({describe_field(f.name)}; the {self.name} layout has "
                               f"no place for it: it always means {f.default!r})")
            elif c.values is not None and value not in c.values:
                out.append(f"{f.name}={value!r} ({c.why or 'it holds ' + ', '.join(map(repr, c.values))})")
            elif recorded is None:
                continue
            elif c.holds is not None and not c.holds(cfg):
                out.append(f"{f.name}={value!r} ({c.why})")
            elif c.not_in_dir and recorded and value != f.default:
                out.append(f"{f.name}={value!r} in a model directory ({c.not_in_dir})")
            elif (c.key is not None and not c.set_by_code and not c.recorded(cfg, recorded)
                  and value != c.default_for(cfg)):
                out.append(f"{f.name}={value!r} (recorded only in config.json: write a model directory)")
        return out

    def dropped(self, cfg: ViTConfig) -> List[str]:
        """Training-only canonical tensors of ``cfg`` this layout has no place for: left out
        when it is written (inference never reads them)."""
        return [t for f in dataclasses.fields(ViTConfig) if getattr(cfg, f.name) and self.carry(f.name) is None
                for t in training_only(f.name)]

    def shows(self, c: Carry, cfg: ViTConfig) -> bool:
        """Whether this layout's file of ``cfg`` holds ``c``'s value in its tensors' keys and
        shapes (:attr:`Carry.shaped`: timm's pooling where fc_norm or no class token shows it),
        so that no reader needs telling."""
        if c.shaped is None:
            return False
        return c.shaped(foreign_shapes(self.rules(cfg), parameter_shapes(cfg), cfg))

    def argument_notes(self, cfg: ViTConfig, recorded: bool) -> List[str]:
        """Constructor arguments the layout's code needs for this model, where the file does
        not record them (a bare state dict): the value and the argument that sets it."""
        out = []
        for c in self.carries:
            if not c.set_by_code or c.recorded(cfg, recorded) or self.shows(c, cfg):
                continue
            value, default = getattr(cfg, c.field), c.default_for(cfg)
            if value == default:
                continue
            if c.hardcoded is not None:  # code that fixes the value: what to do about it
                out.append(f"{c.field}={value!r}, but the {self.name} code assumes {default!r}: {c.hardcoded}")
                continue
            how = f"pass {c.argument}={(c.spelling or {}).get(value, value)!r}"  # as the code spells it
            if c.field == "num_heads":  # vitconv itself assumes 64-dim heads when reading
                how += f", and --num-heads {value} when vitconv reads the file"
            out.append(f"{c.field}={value!r} is not recorded in a bare {self.name} state dict: {how}")
        return out

    def arguments(self, cfg: ViTConfig, recorded: bool) -> Dict[str, Any]:
        """What a reader must be told of ``cfg`` to read a file of this layout back: each
        field the container does not record (``recorded``: it has the layout's config.json)
        that the layout's code takes as a constructor argument, with ``cfg``'s value."""
        return {c.field: getattr(cfg, c.field) for c in self.carries
                if c.argument is not None and not c.recorded(cfg, recorded) and not self.shows(c, cfg)}

    def assumed(self, probe: Probe) -> List[str]:
        """Fields a read took from the layout's conventions because the source does not
        record them (no config.json key, no head count given)."""
        out = []
        for c in self.carries:
            if c.argument is None:  # nothing to pass, or not per model: the code fixes it
                continue
            if c.key is not None and has_key(probe.config, c.key):
                continue
            if c.field == "num_heads" and probe.num_heads is not None:
                continue
            if c.shaped is not None and c.shaped(probe.shapes):
                continue
            out.append(c.field)
        return out


    def contradictions(self, cfg: ViTConfig, probe: Probe) -> List[str]:
        """``restates`` keys of the source's ``config.json`` that disagree with the weights
        (``cfg``, as inferred from their shapes), each as ``key=value (the weights: value)``."""
        root = probe.config
        if not root or self.directory_config is None or not self.restates:
            return []
        written = self.directory_config(cfg, None)
        out = []
        for key in self.restates:
            have, want = lookup(root, key), lookup(written, key)
            if have is ABSENT or want is ABSENT:
                continue
            if have != want or isinstance(have, bool) != isinstance(want, bool):
                out.append(f"{found_at(root, key)}={json.dumps(have)[:40]} (the weights: {json.dumps(want)})")
        return out


def has_key(config: Mapping[str, Any], key: str) -> bool:
    """Whether the ``config.json`` a source carries (:attr:`Probe.config`) holds ``key``
    (dotted: ``model_args.x``; alternatives joined by ``|``: ``hidden_act|vision_config.hidden_act``)."""
    return lookup(config, key) is not ABSENT


LAYOUTS: Dict[str, Layout] = {}


def undeclared_conditions(layout: Layout, cfg: ViTConfig) -> List[str]:
    """Fields the rows of ``layout``'s table for ``cfg`` are selected by that the layout has no
    row for (declared default-only, so the condition could never change): a field it handles
    without declaring, each as ``field (in the row for key)``. Training-only and storage-only
    fields are the layout's own to leave out."""
    out = []
    for r in layout.table(cfg):
        for part in r.when.parts:
            f = part.field
            if layout.declaration(f) == "default" and not (training_only(f) or storage_only(f)):
                out.append(f"{f} (in the row for {r.source[0] if r.source else r.canonical})")
    return sorted(set(out))


def register(layout: Layout) -> Layout:
    """Add ``layout`` to :data:`LAYOUTS`; a table that selects rows by a field the layout does not
    declare fails here, when the package is imported."""
    if layout.name in LAYOUTS:
        raise ValueError(f"layout {layout.name!r} registered twice")
    gaps = undeclared_conditions(layout, ViTConfig())
    if gaps:
        raise ValueError(f"layout {layout.name!r}: rows selected by fields it has no Carry row for: "
                         + ", ".join(gaps))
    for c in layout.containers:
        if c not in CONTAINERS:
            raise ValueError(f"layout {layout.name!r}: unknown container {c!r}")
    LAYOUTS[layout.name] = layout
    return layout


def targets() -> Dict[str, List[Layout]]:
    """``--to`` name -> the layouts it may write, by ``write_rank``, then in registration order."""
    out: Dict[str, List[Layout]] = {}
    for layout in sorted(LAYOUTS.values(), key=lambda layout: layout.write_rank):
        out.setdefault(layout.target_name, []).append(layout)
    return out


def detect_layout(probe: Probe) -> Layout:
    """The one layout whose ``detect`` accepts the source's keys; a clear error naming the
    candidates when none or several do. The canonical layout (a vitconv config in the
    metadata, or bare canonical names) is tried last: foreign tables win a tie."""
    canonical = LAYOUTS.get("canonical")
    if canonical is not None and CONFIG_KEY in probe.metadata:
        return canonical
    feature = unsupported_feature(probe.shapes)
    if feature is not None:
        raise MappingError(f"a ViT with {feature}: vitconv does not compute this feature yet", probe.path)
    hits = [l for l in LAYOUTS.values() if l is not canonical and l.detect(probe)]
    if not hits and canonical is not None and canonical.detect(probe):
        hits = [canonical]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise MappingError("not a ViT checkpoint in any known layout (known: "
                           + ", ".join(sorted(LAYOUTS)) + ")", probe.path)
    raise MappingError("ambiguous layout: matches " + ", ".join(l.name for l in hits), probe.path)
