"""What is in a checkpoint or ONNX file, without converting it: ``vitconv inspect``.

For weights (``.npz``, ``.pt``, ``.safetensors``, and whatever else ``open_source``
reads) the report names the detected layout, the inferred architecture with the tensor
each value was read from, the parameter count, dtypes, size and sha256, and the key
audit. Conversion stops at the first unmapped key; inspect instead *reports* missing
and unused keys, because "which keys are wrong" is exactly what a user with a file
that does not convert needs to see. For ``.onnx`` it lists inputs (with symbolic dims),
outputs, opsets, metadata and the op mix, reading only the graph
(``load_external_data=False``), so a multi-gigabyte model is inspected in a moment.

Nothing here needs click; :func:`format_text` renders the report for the CLI.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vitconv import archs
from vitconv.config import ViTConfig, parameter_shapes
from vitconv.errors import BadInputError, MappingError, first_line
from vitconv.formats.base import TensorSource
from vitconv.formats.open import open_source, sniff
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.conversion.options import ReadOptions
from vitconv.layouts import LAYOUTS, Layout, Probe, detect_layout
from vitconv.layouts.table import audit_report, foreign_shapes
from vitconv.layouts.layout import has_key
from vitconv.layouts.canonical import CONFIG_KEY

#: Version of the ``--json`` document; bump when a field changes meaning or disappears.
SCHEMA = "vitconv.tools.inspection/1"

Progress = Optional[Callable[[int], None]]

#: Config fields shown only for hybrid models (they mean nothing without a ResNet stem).
_HYBRID_FIELDS = ("resnet_layers", "resnet_width", "resnet_groups", "resnet_gn_eps", "resnet_ws_eps")

@dataclass
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass
class Audit:
    """Key audit against the layout's rule table. ``ok`` means the file converts as is."""

    ok: bool
    missing: List[str] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)  # outside the model prefix (optimizer state)
    error: Optional[str] = None


@dataclass
class CheckpointReport:
    path: str
    format: str
    files: List[FileEntry]
    num_tensors: int
    num_params: int
    dtypes: Dict[str, int]
    layout: Optional[str]
    audit: Audit
    config: Optional[ViTConfig] = None
    architecture: List[Tuple[str, Any, str]] = field(default_factory=list)  # (field, value, read from)
    prefix: str = ""
    kind: str = "checkpoint"
    notes: List[str] = field(default_factory=list)  # what a read assumes or leaves out
    arch: Optional[str] = None  # the architecture it was read as (--arch)
    #: The named architectures whose keys and shapes fit a file that leaves fields open (vitconv.archs).
    candidates: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": SCHEMA, "kind": self.kind, "path": self.path, "format": self.format,
            **_file_fields(self.files),
            "layout": self.layout, "prefix": self.prefix, "notes": self.notes,
            "arch": self.arch, "candidates": self.candidates,
            "num_tensors": self.num_tensors, "num_params": self.num_params, "dtypes": self.dtypes,
            "config": self.config.to_dict() if self.config else None,
            "architecture": [{"name": n, "value": _jsonable(v), "source": s}
                             for n, v, s in self.architecture],
            "audit": {"ok": self.audit.ok, "missing": self.audit.missing, "unused": self.audit.unused,
                      "ignored": self.audit.ignored, "error": self.audit.error},
        }


@dataclass
class OnnxReport:
    path: str
    files: List[FileEntry]
    ir_version: int
    producer: str
    opsets: Dict[str, int]
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    metadata: Dict[str, str]
    num_nodes: int
    num_functions: int
    op_types: List[Tuple[str, int]]
    num_initializers: int
    num_params: int
    dtypes: Dict[str, int]
    external_data: bool
    format: str = "onnx"
    kind: str = "onnx"

    def to_dict(self) -> Dict[str, Any]:
        return {
            "schema": SCHEMA, "kind": self.kind, "path": self.path, "format": self.format,
            **_file_fields(self.files),
            "ir_version": self.ir_version, "producer": self.producer, "opsets": self.opsets,
            "inputs": self.inputs, "outputs": self.outputs, "metadata": self.metadata,
            "num_nodes": self.num_nodes, "num_functions": self.num_functions,
            "op_types": [{"op": o, "count": c} for o, c in self.op_types],
            "num_initializers": self.num_initializers, "num_params": self.num_params,
            "dtypes": self.dtypes, "external_data": self.external_data,
        }


def inspect_path(path: os.PathLike | str, progress: Progress = None, arch: Optional[str] = None):
    """Inspect ``path``: an :class:`OnnxReport` for ``.onnx``, else a :class:`CheckpointReport`.

    ``progress(n)`` is called with the number of bytes hashed as hashing advances (the
    only step that reads a large file end to end). Unreadable files raise
    :class:`BadInputError`; a checkpoint that would fail conversion does not raise."""
    p = Path(path)
    if not p.exists():
        raise BadInputError("no such file or directory", p)
    if p.is_file() and p.suffix.lower() == ".onnx":
        return inspect_onnx(p, progress)
    return inspect_checkpoint(p, progress, arch)


def total_bytes(path: os.PathLike | str) -> int:
    """Bytes :func:`inspect_path` will hash (for a progress bar's length)."""
    return sum(f.stat().st_size for f in _files_of(Path(path)))


# ---------------------------------------------------------------------------- checkpoints
def inspect_checkpoint(path: os.PathLike | str, progress: Progress = None,
                       arch: Optional[str] = None) -> CheckpointReport:
    """Everything ``inspect`` says of a checkpoint; ``arch``: read as that architecture (``--arch``)."""
    p = Path(path)
    kind = sniff(p)
    source = open_source(p)
    try:
        keys = source.keys()
        shapes = {k: tuple(source.shape(k)) for k in keys}
        dtypes = _dtypes(source, p, kind)
        layout, cfg, prefix, audit, notes, semantics = _read(source, keys, shapes, arch)
        model_keys = [k for k in keys if k.startswith(prefix)]
        num_params = sum(math.prod(shapes[k]) for k in model_keys)  # Python ints: a lying header cannot wrap
        probe = Probe.of(source, {k[len(prefix):]: shapes[k] for k in model_keys})
        rows = architecture_rows(cfg, layout, probe, semantics) if cfg is not None else []
        candidates = semantics.candidates
        if layout is not None and cfg is not None and not candidates and layout.assumed(probe):
            candidates = sorted(a.name for a in archs.fitting(layout.name, probe.shapes, cfg)[0])
        fmt = {"zip": "npz" if type(source).__name__ == "NpzSource" else "pt", "pickle": "pt",
               "safetensors": "safetensors", "dir": "directory"}.get(kind, kind)
    finally:
        source.close()
    files = _hash_files(p, progress)
    return CheckpointReport(str(p), fmt, files, len(keys), num_params,
                            dict(sorted(collections.Counter(dtypes.values()).items())),
                            layout.name if layout else None, audit, cfg, rows, prefix, notes=notes,
                            arch=semantics.arch, candidates=candidates)


def _read(source: TensorSource, keys: Sequence[str], shapes: Dict[str, Tuple[int, ...]], arch: Optional[str] = None):
    """``(layout, config, prefix, audit, notes, semantics)`` through the conversion's own reader; where that
    fails, its steps one by one, keeping whatever succeeds, so the report can list the
    missing and unused keys instead of only the first complaint."""
    try:
        with open_checkpoint(source.path, ReadOptions(overrides={"arch": arch} if arch else {}), source=source) as ckpt:
            return (ckpt.layout, ckpt.source_config, ckpt.prefix, Audit(ok=True, ignored=sorted(ckpt.ignored)),
                    list(ckpt.notes), ckpt.semantics)
    except MappingError as error:
        layout = cfg = None
        prefix = ""
        try:
            layout = detect_layout(Probe.of(source, shapes))
            prefix = layout.prefix(keys, source.path)
            kept = [k for k in keys if k.startswith(prefix) and not k.startswith(layout.ignore or ("\0",))]
            inner = [k[len(prefix):] for k in kept]
            ignored = sorted(set(keys) - set(kept))
            cfg = layout.read_config(Probe.of(source, {k: shapes[prefix + k] for k in inner}))
            missing, unused = audit_report(layout.rules(cfg), inner)
            return layout, cfg, prefix, Audit(False, missing, unused, ignored, error.message), [], archs.Semantics()
        except MappingError as e:
            return layout, cfg, prefix, Audit(False, error=e.message), [], archs.Semantics()


def architecture_rows(cfg: ViTConfig, layout: Layout, probe: Probe,
                      semantics: Optional[archs.Semantics] = None) -> List[Tuple[str, Any, str]]:
    """``(field, value, where it came from)`` for every config field.

    A config stored in the file is named as such; otherwise the layout's ``sources`` (the
    tensor each shape-read value came from), its carries (a ``config.json`` key, or a
    convention of its code that the file does not record), and for every other field the
    layout's fixed meaning."""
    if CONFIG_KEY in probe.metadata:
        sources: Dict[str, str] = {}
        fallback = f"{CONFIG_KEY} metadata"
    else:
        sources = {**_row_sources(layout, cfg), **_shape_sources(layout, cfg), **layout.sources(cfg)}
        fallback = f"{layout.name} layout: inferred from tensor shapes"
        assumed = layout.assumed(probe)
        for c in layout.carries:
            told = (semantics.sources.get(c.field) if semantics else None) or "assumed"
            if c.field in assumed and told not in ("assumed", "default"):
                table = (f"the architecture table: every architecture {semantics.fit} "
                         f"({len(semantics.candidates)}) has it{semantics.caveat}")
                sources[c.field] = f"--arch {semantics.arch}" if told == "--arch" else table if told == "table" else told
            elif c.field in assumed:
                sources[c.field] = (f"assumed: {'64-dim heads' if c.field == 'num_heads' else layout.name + ' default'}"
                                    f" (not stored in the file; {'--num-heads' if c.field == 'num_heads' else c.argument})")
            elif c.field in sources:
                continue
            elif c.key is not None and c.recorded(cfg, True) and has_key(probe.config, c.key):
                sources[c.field] = f"config.json {c.key.split('|')[0]}"
            elif c.hardcoded is not None:
                sources[c.field] = f"{layout.name} code: {c.hardcoded}"
        for f in dataclasses.fields(ViTConfig):
            if layout.declaration(f.name) in ("fixed", "default") and f.name not in sources:
                sources[f.name] = f"{layout.name} layout convention (not stored in the file)"
        if "num_heads" in assumed:
            sources.setdefault("head_dim", sources["num_heads"])
            if sources["head_dim"] == fallback:
                sources["head_dim"] = sources["num_heads"]
    names = [f.name for f in dataclasses.fields(ViTConfig)
             if cfg.resnet_layers is not None or f.name not in _HYBRID_FIELDS]
    rows = [(n, getattr(cfg, n), sources.get(n, fallback)) for n in names]
    rows.append(("grid_size", cfg.grid_size, f"image_size / stride {cfg.total_stride}"))
    return rows


def _varied(cfg: ViTConfig) -> List[Tuple[Tuple[str, ...], Dict[str, Any]]]:
    """``(fields, the change that varies only those sizes)``: one trade of twice the heads of half the
    size for both, so the attention width stays (which tensor shows the split, if any: the axis
    that doubles holds the heads, the one that halves the head size), the patch with the image (the
    grid stays). A change the config refuses (an odd head size) is skipped by the caller."""
    out = [((f,), {f: 2 * getattr(cfg, f)}) for f in ("width", "depth", "mlp_dim", "image_size")]
    out += [(("in_chans",), dict(in_chans=cfg.in_chans + 1)),
            (("num_classes",), dict(num_classes=cfg.num_classes + 1)),
            (("patch_size",), dict(patch_size=2 * cfg.patch_size, image_size=2 * cfg.image_size)),
            (("num_heads", "head_dim"), dict(num_heads=2 * cfg.num_heads, head_dim=cfg.head_dim // 2))]
    return out


def _shape_sources(layout: Layout, cfg: ViTConfig) -> Dict[str, str]:
    """Which tensor, and which axis, holds each size, read off the layout's table: the first of its
    keys whose shape changes when only that size does (for the head split, the axis that changes
    as the field does); the blocks' count from the table's first block row. A size no key shows
    (heads in a fused projection, a head that is not there) is not claimed here."""
    def shapes(c: ViTConfig) -> Dict[str, Tuple[int, ...]]:
        return foreign_shapes(layout.rules(c), parameter_shapes(c), c)

    base, out = shapes(cfg), {}
    block = next((r.source[0] for r in layout.table(cfg) if r.scope == "block" and r.source and r.when.holds(cfg)),
                 None)
    for names, change in _varied(cfg):
        try:
            other = cfg.replace(**change)
            now = shapes(other)
        except (ValueError, KeyError, ZeroDivisionError):
            continue  # not a model the config or this table describes (one head, an odd split)
        for name in names:
            ratio = getattr(other, name) / getattr(cfg, name) if getattr(cfg, name) else None
            for key, shape in base.items():
                if key not in now or len(now[key]) != len(shape) or now[key] == shape:
                    continue
                axes = [i for i, (a, b) in enumerate(zip(shape, now[key])) if a != b]
                if len(names) > 1:  # a trade of two sizes: the one axis that scales as this field does
                    axes = [i for i in axes if now[key][i] == shape[i] * ratio]
                    if not axes:
                        continue
                out[name] = f"{key} [{axes[0]}]" + (f" (grid x {cfg.total_stride})" if name == "image_size" else "")
                break
            else:  # no shape changed: more blocks (a head where there is none is the rows' absence of it)
                new = next((k for k in now if k not in base), None)
                if name == "depth" and block is not None:
                    out[name] = "count of " + block.replace("{i}", "N")
                elif name == "depth" and new is not None:  # a table of concrete names: the new block's index
                    out[name] = "count of " + re.sub(rf"(?<=[._/]){cfg.depth}(?=[._/])", "N", new, count=1)
    return out


def _row_sources(layout: Layout, cfg: ViTConfig) -> Dict[str, str]:
    """Where a feature was read from, for the fields a table's rows are conditioned on: the
    presence (or absence) of the first key of the first such row (``layer_scale``: presence of
    ``blocks.0.ls1.gamma``)."""
    out: Dict[str, str] = {}
    for r in layout.table(cfg):
        if not r.when.parts or not r.source or not r.canonical:
            continue
        key = r.source[0].format(i=0, s=0, u=0, s1=1, u1=1)
        for part in r.when.parts:
            if part.field not in out:
                out[part.field] = f"{'presence' if r.when.holds(cfg) else 'absence'} of {key}"
    return out


def _dtypes(source, path: Path, kind: str) -> Dict[str, str]:
    """dtype name per key. safetensors: from the header, so bfloat16 stays bfloat16 and no
    tensor is read; an ``.npz``: as stored (big_vision's 2-byte void members: bfloat16);
    otherwise what the reader reports (a ``.pt``'s bfloat16 arrives as float32)."""
    return {k: source.stored_dtype(k) for k in source.keys()}


# ---------------------------------------------------------------------------- onnx
_ONNX_DTYPES = {"FLOAT": "float32", "DOUBLE": "float64", "FLOAT16": "float16", "BFLOAT16": "bfloat16",
                "INT64": "int64", "INT32": "int32", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def inspect_onnx(path: os.PathLike | str, progress: Progress = None, top: int = 10) -> OnnxReport:
    """Graph-level facts of an ONNX model; weights stored outside the file are not read."""
    import onnx

    p = Path(path)
    try:
        model = onnx.load(os.fspath(p), load_external_data=False)
    except Exception as e:
        raise BadInputError(f"not a readable ONNX model ({first_line(e)})", p) from None
    g = model.graph
    if not g.node and not g.input:  # what onnx.load makes of an empty file: a model of defaults
        raise BadInputError("not an ONNX model: it holds no graph", p)
    init_names = {t.name for t in g.initializer}

    def value_info(v) -> Dict[str, Any]:
        t = v.type.tensor_type
        shape = None
        if t.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in t.shape.dim]
        return {"name": v.name, "dtype": _onnx_dtype(t.elem_type), "shape": shape}

    params, dtypes, external = 0, collections.Counter(), False
    for t in g.initializer:
        params += math.prod(t.dims)
        dtypes[_onnx_dtype(t.data_type)] += 1
        external |= t.data_location == onnx.TensorProto.EXTERNAL
    ops = collections.Counter(n.op_type for n in g.node)
    files = _hash_files(p, progress)
    return OnnxReport(
        path=str(p), files=files, ir_version=int(model.ir_version),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        opsets={(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        inputs=[value_info(v) for v in g.input if v.name not in init_names],
        outputs=[value_info(v) for v in g.output],
        metadata={m.key: m.value for m in model.metadata_props},
        num_nodes=len(g.node), num_functions=len(model.functions),
        op_types=sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))[:top],
        num_initializers=len(g.initializer), num_params=params,
        dtypes=dict(sorted(dtypes.items())), external_data=bool(external))


def _onnx_dtype(code: int) -> str:
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(code)
    except ValueError:
        return f"type{code}"
    return _ONNX_DTYPES.get(name, name.lower())


# ---------------------------------------------------------------------------- files
def _files_of(p: Path) -> List[Path]:
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [p]


def _hash_files(p: Path, progress: Progress) -> List[FileEntry]:
    out = []
    for f in _files_of(p):
        h = hashlib.sha256()
        try:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
                    if progress:
                        progress(len(block))
        except OSError as e:
            raise BadInputError(f"cannot read: {e.strerror or e}", f) from None
        name = f.name if f == p else os.fspath(f.relative_to(p))
        out.append(FileEntry(name, f.stat().st_size, h.hexdigest()))
    return out


def _file_fields(files: List[FileEntry]) -> Dict[str, Any]:
    single = len(files) == 1
    return {"file_size": sum(f.size for f in files),
            "sha256": files[0].sha256 if single else None,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files]}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------------- posembed
def read_pos_embed(path: os.PathLike | str) -> Tuple[np.ndarray, ViTConfig, str]:
    """The canonical ``(1, N, D)`` position table, the config and the layout name, read
    through the layout's own rule (only that tensor is loaded). Works on a file whose
    audit fails elsewhere, as long as the layout, architecture and this tensor are there."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".onnx":
        raise BadInputError("position-embedding plot needs a checkpoint (.npz, .pt, "
                            ".safetensors), not an ONNX graph", p)
    source = open_source(p)
    try:
        keys = source.keys()
        layout, cfg, prefix, _, _, _ = _read(source, keys, {k: tuple(source.shape(k)) for k in keys})
        if cfg is None:
            raise BadInputError("no architecture could be read from this checkpoint", p)
        rule = next((r for r in layout.rules(cfg) if r.canonical == "pos_embed"), None)
        keys = [prefix + k for k in rule.source] if rule else []
        if rule is None or any(k not in source for k in keys):
            raise BadInputError("no position embedding in this checkpoint", p)
        pe = rule.op.to_canonical([source.get(k) for k in keys], cfg)
    finally:
        source.close()
    return np.asarray(pe), cfg, layout.name


# ---------------------------------------------------------------------------- text
def format_text(report) -> List[str]:
    """Human-readable lines for a report (what ``vitconv inspect`` prints without ``--json``)."""
    d = report.to_dict()
    rows: List[Tuple[str, str]] = [("file", d["path"]), ("format", d["format"])]
    size = f"{d['file_size']:,} bytes"
    rows.append(("size", size + (f" in {len(d['files'])} files" if len(d["files"]) > 1 else "")))
    if d["sha256"]:
        rows.append(("sha256", d["sha256"]))
    if isinstance(report, OnnxReport):
        return _lines(rows + _onnx_rows(d))
    described = f" ({LAYOUTS[d['layout']].description})" if d["layout"] in LAYOUTS else ""
    rows.append(("layout", (d["layout"] or "unknown") + described
                 + (f", model under '{d['prefix']}'" if d["prefix"] else "")))
    if report.config is not None:
        rows.append(("model", report.config.describe()))
    rows += [("tensors", f"{d['num_tensors']:,}"), ("params", f"{d['num_params']:,}"),
             ("dtypes", _counts(d["dtypes"]))]
    a = report.audit
    if a.ok:
        rows.append(("audit", "ok: every key mapped exactly once, nothing missing"
                     + (f" ({len(a.ignored)} keys outside the model ignored)" if a.ignored else "")))
    else:
        rows.append(("audit", f"FAILED: {a.error}"))
        rows += [("  missing", k) for k in a.missing] + [("  unused", k) for k in a.unused]
    rows += [("note", n) for n in d.get("notes") or []]
    if d.get("arch"):
        rows.append(("arch", f"read as {d['arch']} (--arch)"))
    if d.get("candidates"):
        names = d["candidates"]
        rows.append(("fits", f"{len(names)} named architecture(s): " + ", ".join(names[:12])
                     + (", …" if len(names) > 12 else "")))
    lines = _lines(rows)
    if report.architecture:
        lines += ["", *_table(("field", "value", "read from"),
                              [(n, _show(v), s) for n, v, s in report.architecture])]
    return lines


def _onnx_rows(d: Dict[str, Any]) -> List[Tuple[str, str]]:
    def io(v):
        shape = "?" if v["shape"] is None else "[" + ", ".join(
            "?" if s is None else str(s) for s in v["shape"]) + "]"
        return f"{v['name']}: {v['dtype']} {shape}"

    rows = [("producer", f"{d['producer']} (IR {d['ir_version']})"),
            ("opsets", ", ".join(f"{k} {v}" for k, v in d["opsets"].items()))]
    rows += [("input", io(v)) for v in d["inputs"]] + [("output", io(v)) for v in d["outputs"]]
    rows += [("metadata", f"{k} = {v}") for k, v in d["metadata"].items()]
    rows += [("nodes", f"{d['num_nodes']:,}" + (f" (+{d['num_functions']} functions)"
                                               if d["num_functions"] else "")),
             ("top ops", ", ".join(f"{o['op']} {o['count']}" for o in d["op_types"])),
             ("weights", f"{d['num_params']:,} in {d['num_initializers']} initializers"
                         + (" (external data, not read)" if d["external_data"] else "")),
             ("dtypes", _counts(d["dtypes"]) or "-")]
    return rows


def _counts(c: Dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in c.items())


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, tuple):
        return "(" + ", ".join(map(str, v)) + ")"
    return str(v)


def _lines(rows: List[Tuple[str, str]]) -> List[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k.ljust(width)}  {v}" for k, v in rows]


def _table(header: Tuple[str, ...], rows: List[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [fmt(header), fmt(tuple("-" * w for w in widths)), *[fmt(r) for r in rows]]
