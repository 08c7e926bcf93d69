"""The one conversion path: read -> map onto the canonical model -> (resample) -> ask the target
whether it can express the model -> write. ``npz2pt``, ``convert``, the weight outputs of
``export`` and :func:`vitconv.load` all come through here, so two commands cannot disagree.

Reading (:func:`open_checkpoint`) recognises the layout, infers the architecture and audits
the keys strictly (every source key consumed exactly once, every canonical tensor produced
exactly once) without reading a weight. :meth:`Checkpoint.tensors` then streams canonical
tensors, each source tensor read once, optionally on a read-ahead thread.

Writing (:func:`convert`) first asks the target layout what it cannot express
(:meth:`vitconv.layouts.layout.Layout.problems`) and refuses, naming each field, before a byte
is written. Every output streams: the writer's header (or pickle, or zip members) is laid out
from shapes alone (:func:`vitconv.layouts.table.foreign_shapes`), then each tensor is mapped,
written and dropped, so memory stays flat in the model's size. A second thread writes
tensor *i* while tensor *i + 1* is read and mapped (:class:`_Pipelined`). Outputs appear under
their final names only when complete (:mod:`vitconv.formats.atomic`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from vitconv import __version__, archs
from vitconv.runtime import preprocess
from vitconv.config import MAX_IMAGE_SIZE, SHAPE_FIELDS, ViTConfig, parameter_shapes
from vitconv.errors import BadInputError, MappingError, OutputError, first_line
from vitconv.formats.atomic import atomic_directory, atomic_output, check_writable, refuse_clobber
from vitconv.formats.base import Deferred, TensorSource, TensorSpec, numpy_dtype, resolve, sha256_file
from vitconv.formats.npz import NpzStreamWriter
from vitconv.formats.open import open_source
from vitconv.formats.safetensors_stream import DEFAULT_SHARD_BYTES, SafetensorsStreamWriter, safetensors_order
from vitconv.formats.stacked import StackedSource
from vitconv.formats.torch_pt_stream import PtStreamWriter, vitconv_payload
from vitconv.formats.provenance import Provenance
from vitconv.formats.hf_dir import CONFIG_JSON, PREPROCESSOR_JSON
from vitconv.runtime.labels import check_count, from_id2label, load_labels, suggest
from vitconv.runtime.labels import from_metadata as labels_from_metadata
from vitconv.ops import resample_patch_embed, resize_pos_embed, resize_rel_pos_table
from vitconv.runtime.preprocess import Usage
from vitconv.formats.readahead import ReadAhead
from vitconv.layouts import LAYOUTS, Layout, Probe, detect_layout
from vitconv.layouts.layout import has_key
from vitconv.layouts.table import ExpandedRule, audit, foreign_shapes, map_from_canonical, map_to_canonical, short_list
from vitconv.layouts.inference import DEFAULT_HEAD_DIM
from vitconv.layouts.transforms import all_finite
from vitconv.conversion.targets import candidates
from vitconv.conversion.options import ConvertOptions, ReadOptions

PathLike = Union[str, os.PathLike]
#: ``progress(done_bytes, total_bytes, tensor_name)``, called after each tensor is written.
Progress = Callable[[int, int, str], None]
#: How each ``pos_resize`` mode is said in a report.
RESIZE_WORDS = {"zoom": "Google's order-1 zoom", "bicubic": "bicubic, as transformers",
                "bicubic_aa": "bicubic with antialiasing, as timm", "dinov2": "bicubic with DINOv2's +0.1 offset",
                "sincos2d": "big_vision's sincos2d table generated for the new grid",
                "bilinear": "bilinear with antialiasing, as FlexiViT's jax.image.resize and SigLIP 2 (NaFlex)",
                "sincos2d_aimv2": "AIMv2's native sin-cos table generated for the new grid"}
#: Weight dtypes an output may be cast to (``dtype=``): exact where the source has it already.
DTYPES = ("float32", "float16", "bfloat16")
#: The dtypes a source's weights may be stored in: every writer takes them.
WEIGHT_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: The canonical modules a new classifier replaces (``num_classes=``): the head, DeiT's
#: distillation head, and Google's ``pre_logits``, which vit_jax drops when fine-tuning.
HEAD_MODULES = ("head", "head_dist", "pre_logits")


# --------------------------------------------------------------------------- reading
@dataclass
class Checkpoint:
    """A source mapped onto the canonical model: the config plus a lazy tensor stream.
    Close it (or use it as a context manager) to release the source."""

    path: str
    layout: Layout
    source_config: ViTConfig  # as the source holds it
    config: ViTConfig  # as it will be written (resized when asked)
    source: TensorSource
    prefix: str
    rules: List[ExpandedRule]
    ignored: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    resized_from: Optional[int] = None  # source grid size when the position table is resized
    repatched_from: Optional[int] = None  # source patch size when FlexiViT-resampled (--patch-size)
    dtype: Optional[np.dtype] = None  # cast every tensor to this (None: keep the source's)
    owns_source: bool = True  # opened here, so closed here; a source handed in stays open
    overridden: Tuple[str, ...] = ()  # fields the caller set (--set)
    usage: Usage = field(default_factory=Usage)  # preprocessing and class names, as far as known
    new_head: bool = False  # the classifier (and pre_logits) replaced by a zero one (num_classes=)
    #: Where each semantic field came from, the architecture named (--arch) and the candidates.
    semantics: archs.Semantics = field(default_factory=archs.Semantics)

    def _generated(self) -> List[str]:
        """Canonical tensors made here, not read: a replacement head's (zeros)."""
        if not self.new_head:
            return []
        return [n for n in parameter_shapes(self.config) if n.split(".")[0] in HEAD_MODULES]

    def _read_rules(self) -> List[ExpandedRule]:
        """The rules whose tensors are read: all, less a replaced head's."""
        if not self.new_head:
            return self.rules
        return [r for r in self.rules if r.canonical.split(".")[0] not in HEAD_MODULES]

    def specs(self) -> List[TensorSpec]:
        """Name, dtype and shape of every canonical tensor, in state-dict order, before a byte
        of weight data is read: shapes from the model, dtypes from the source's headers (a
        rule's output has the common type of its inputs)."""
        shapes = parameter_shapes(self.config)
        out = []
        for r in self._read_rules():
            stored = [np.dtype(self.source.dtype(self.prefix + k)) for k in r.source]
            dtype = self.dtype or (np.result_type(*stored) if stored else np.float32)  # generated: float32
            out.append(TensorSpec(r.canonical, np.dtype(dtype), tuple(shapes[r.canonical])))
        return out + [TensorSpec(n, np.dtype(self.dtype or np.float32), tuple(shapes[n])) for n in self._generated()]

    def tensors(self, order: Optional[Sequence[str]] = None, read_ahead: bool = False,
                check_finite: bool = True) -> Iterator[Tuple[str, np.ndarray]]:
        """Stream ``(canonical name, array)`` in ``order`` (default: state-dict order), each
        source tensor read once. ``read_ahead`` reads the next rules' sources on a background
        thread while this one is mapped, when the source allows concurrent reads
        (:mod:`vitconv.formats.readahead`: flat memory, same bytes)."""
        by_name = {r.canonical: r for r in self._read_rules()}
        made = set(self._generated())
        names = [*by_name, *self._generated()] if order is None else list(order)
        rules = [by_name[n] for n in names if n not in made]
        read = self._read(rules, read_ahead, check_finite)
        shapes = parameter_shapes(self.config)
        for name in names:  # read tensors and a new head's zeros, in the order asked
            if name in made:
                yield name, np.zeros(shapes[name], self.dtype or np.float32)
            else:
                got, t = next(read)
                assert got == name, (got, name)
                yield name, t
                del t
        for _ in read:
            raise AssertionError("tensors left over")

    def _read(self, rules: Sequence[ExpandedRule], read_ahead: bool, check_finite: bool
              ) -> Iterator[Tuple[str, np.ndarray]]:
        src, prefix = self.source, self.prefix
        with contextlib.ExitStack() as stack:
            get: Callable[[str], np.ndarray] = lambda k: src.get(prefix + k)
            if read_ahead and src.concurrent_reads:
                get = stack.enter_context(ReadAhead(get, [k for r in rules for k in r.source],
                                                    lambda k: src.nbytes(prefix + k))).get
            for name, t in map_to_canonical(rules, get, self.source_config,
                                            parameter_shapes(self.source_config), self.path):
                if check_finite and not all_finite(t):
                    raise MappingError(f"{name} contains NaN or Inf values", self.path)
                if name == "pos_embed" and self.resized_from is not None:  # the source family's own way
                    t = resize_pos_embed(t, self.config.grid_size, self.source_config.num_pos_prefix,
                                         self.config.pos_resize if self.repatched_from else
                                         self.source_config.pos_resize)
                if name.endswith("rel_pos_table") and self.resized_from is not None:  # BEiT: likewise
                    t = resize_rel_pos_table(t, self.resized_from, self.config.grid_size,
                                             self.source_config.rel_pos_resize)
                if name == "patch_embed.weight" and self.repatched_from is not None:
                    t = resample_patch_embed(t, self.config.patch_size)
                if self.dtype is not None and t.dtype != self.dtype:
                    t = t.astype(self.dtype)
                yield name, t
                del t  # not kept alive while the next one is read and mapped

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Every canonical tensor, in the model's own ``state_dict`` order."""
        return dict(self.tensors(order=list(parameter_shapes(self.config))))

    def close(self) -> None:
        if self.owns_source:
            self.source.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def takes_num_heads(layout: Layout) -> bool:
    """Whether ``layout``'s files leave the head count to the caller (a bare state dict)."""
    heads = layout.carry("num_heads")
    return heads is not None and heads.argument is not None


def left_open(path: PathLike) -> Set[str]:
    """The config fields the checkpoint at ``path`` leaves to its code, from its headers alone
    (``num_heads`` where it records no head count; constructor arguments no ``config.json``
    records): what ``num_heads`` and ``overrides`` may set when it is read."""
    with open_source(path) as source:
        shapes = {k: tuple(source.shape(k)) for k in source.keys()}
        probe = Probe.of(source, shapes, source.path or os.fspath(path))
        layout = detect_layout(probe)
        opened = set(layout.assumed(probe))
        return opened | ({ARCH, f"{ARCH}:{layout.name}"} if opened else set())


def open_checkpoint(path: PathLike, options: ReadOptions = ReadOptions(), *,
                    source: Optional[TensorSource] = None) -> Checkpoint:
    """``path`` read as ``options`` say, returned as a :class:`Checkpoint` (close it, or use it as a
    context manager): its layout recognised, its architecture inferred (``source_config`` as the
    file holds it, ``config`` as it will be written), its keys audited against the canonical
    model's shapes, and its tensors left in the file, read one at a time when asked. Nothing
    beyond headers is read here (but the few values a layout's ``from_values`` reads: the
    original DINOv3's rotary periods). ``source``, a :class:`~vitconv.formats.base.TensorSource`
    already open, is read instead of opening ``path``, and stays the caller's to close. A file
    that cannot be read so is a one-line :class:`~vitconv.errors.BadInputError` or
    :class:`~vitconv.errors.MappingError` naming it.

    ``options`` (:class:`~vitconv.conversion.options.ReadOptions`):

    - ``require_layout``: the layout must be one of these names.
    - ``num_heads``: for layouts whose files do not record the head count (64-dim heads are
      assumed otherwise); layouts that record it refuse it, and a file's own record must agree.
    - ``overrides`` (``--set act=quick_gelu``): config fields the file leaves to its code's
      constructor (timm's ``act_layer``, ``norm_layer``), only those, and not where a
      ``config.json`` records them. Its key ``arch`` (``--arch vit_base_patch16_clip_224``)
      names the architecture (:mod:`vitconv.archs`), which supplies every such field the others
      leave. Without it, those fields are taken from the architectures whose keys and shapes fit
      the file when they all agree, and the read is refused, naming them, when they do not.
      Where each field came from is the checkpoint's ``semantics``.
    - ``image_size``: the position table resized to it as the source's family does (Google's
      ``load_pretrained`` for its files); ``config`` says the new size, ``resized_from`` the grid read.
    - ``patch_size``: the model resampled to another patch size as FlexiViT does (the patch
      kernel by its pseudo-inverse resize, the position table bilinearly to the new grid at
      ``image_size``, default the source's); the model then resizes that way at other sizes too.
    - ``num_classes``: the classifier replaced by a new zero-initialised one of that many
      classes (0: none, the model returns its pooled features), and a ``pre_logits`` layer
      dropped as vit_jax's ``load_pretrained`` does for a fine-tuning config without one.
    - ``dtype``: every tensor cast to it as it is read (one of :data:`DTYPES`).
    - ``labels``: the classifier's outputs named, over what the file records: a list, or what
      :func:`vitconv.runtime.labels.load_labels` reads (``imagenet-1k``, ``imagenet-21k``, a file);
      with the preprocessing, the checkpoint's ``usage``."""
    image_size, patch_size, num_heads, dtype = options.image_size, options.patch_size, options.num_heads, options.dtype
    labels = load_labels(options.labels, path) if options.labels is not None else None
    if dtype is not None and dtype not in DTYPES:
        raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    opened = source is None
    source = source or open_source(path)
    try:
        where = source.path or os.fspath(path)
        keys = source.keys()
        shapes = {k: tuple(source.shape(k)) for k in keys}
        layout = detect_layout(Probe.of(source, shapes, where))
        if num_heads is not None and not takes_num_heads(layout):
            raise BadInputError(f"--num-heads: the {layout.name} layout records the heads", path)
        prefix = layout.prefix(keys, where)
        stacked = layout.stacked and any(k.startswith(prefix + layout.stacked[0]) for k in keys)
        if stacked:  # one key per block from here on, each read as its slice
            source = StackedSource(source, prefix + layout.stacked[0], prefix + layout.stacked[1])
            keys = source.keys()
            shapes = {k: tuple(source.shape(k)) for k in keys}
        kept = [k for k in keys if k.startswith(prefix) and not k.startswith(layout.ignore or ("\0",))]
        inner = [k[len(prefix):] for k in kept]
        probe = Probe.of(source, {k: shapes[prefix + k] for k in inner}, where, num_heads)
        told = dict(options.overrides)
        arch = told.pop(ARCH, None)
        semantics, probe = _semantics(layout, probe, told, arch, path)
        cfg = _override(layout.read_config(probe), layout, probe, {**semantics.values, **told}, path)
        if layout.from_values is not None:  # a few values, not weights (DINOv3's rotary periods)
            cfg = layout.from_values(cfg, lambda k: source.get(prefix + k), where)
        contradictions = layout.contradictions(cfg, probe)
        if contradictions:
            raise MappingError("config.json contradicts the weights: " + short_list(contradictions, 4), path)
        for name, came in list(semantics.sources.items()):  # nothing to assume where no other value is possible
            if came in ("assumed", "default") and name != "num_heads" and not _can_differ(cfg, name):
                semantics.sources[name] = "fixed"
        if stacked:
            cfg = cfg.replace(scan=True)
        # (a corrupt file is named as such above, before a layout complaint below)
        allowed = options.require_layout
        if allowed and layout.name not in allowed:
            raise BadInputError(f"expected a {' or '.join(allowed)} checkpoint, found the {layout.name} layout", path)
        try:
            canonical = parameter_shapes(cfg)
        except (RuntimeError, ValueError, OverflowError) as e:  # sizes past int64, say
            raise BadInputError(f"the architecture {cfg.describe()} cannot be built ({first_line(e)})",
                                path) from None
        rules = layout.rules(cfg)
        audit(rules, probe.shapes, canonical, cfg, where)
        for k in (k for r in rules if r.canonical for k in r.source):  # before a writer lays out a header
            stored = np.dtype(source.dtype(prefix + k))
            if stored.name not in WEIGHT_DTYPES:
                raise MappingError(f"{prefix + k} has dtype {stored}, expected floating point "
                                   f"({', '.join(WEIGHT_DTYPES)})", path)
        ckpt = Checkpoint(where, layout, cfg, cfg, source, prefix, rules,
                          ignored=sorted(set(keys) - set(kept)),
                          dtype=numpy_dtype(dtype) if dtype else None, owns_source=opened)
        if patch_size is not None and patch_size != cfg.patch_size:
            _repatch(ckpt, patch_size, image_size or cfg.image_size, path)
        elif image_size is not None and image_size != cfg.image_size:
            if not 0 < image_size <= MAX_IMAGE_SIZE or image_size % cfg.total_stride:
                raise BadInputError(f"--image-size {image_size} is not a positive multiple of the "
                                    f"model's stride {cfg.total_stride} up to {MAX_IMAGE_SIZE}", path)
            ckpt.resized_from, ckpt.config = cfg.grid_size, cfg.replace(image_size=image_size)
        ckpt.overridden = tuple(told)
        ckpt.semantics = semantics
        num_classes = options.num_classes
        if num_classes is not None:
            if num_classes < 0:
                raise BadInputError(f"--num-classes must be 0 or more, got {num_classes}", path)
            ckpt.new_head = True
            ckpt.config = ckpt.config.replace(num_classes=num_classes, representation_size=None, head_bias=True)
        ckpt.usage, unfit = _usage(layout, probe.metadata, source.documents, ckpt.config, labels, path)
        ckpt.notes = _read_notes(ckpt, probe)
        if unfit and not ckpt.new_head:  # (a replaced head's classes are new: its old names go unsaid)
            ckpt.notes.append(f"the file's {unfit} class names do not fit its {ckpt.config.num_classes} classes: "
                              "left out (name them with --labels)")
    except BaseException:
        if opened:
            source.close()
        raise
    return ckpt


def _repatch(ckpt: Checkpoint, patch_size: int, image_size: int, path: PathLike) -> None:
    """FlexiViT's resample to ``patch_size`` at ``image_size`` (see :func:`open_checkpoint`)."""
    cfg = ckpt.source_config
    if not 0 < image_size <= MAX_IMAGE_SIZE:
        raise BadInputError(f"--image-size {image_size} is not a positive size up to {MAX_IMAGE_SIZE}", path)
    if patch_size <= 0 or image_size % patch_size:
        raise BadInputError(f"--patch-size {patch_size} does not divide the image size {image_size}", path)
    if cfg.resnet_layers is not None or cfg.patch_norm:
        raise BadInputError("--patch-size resamples a plain patch projection; this model has "
                            "a ResNet stem or patch LayerNorms", path)
    if cfg.pos_resize in ("sincos2d", "sincos2d_aimv2"):
        raise BadInputError("--patch-size: a sincos2d table is generated for any grid; convert with "
                            "--image-size instead", path)
    ckpt.repatched_from, ckpt.resized_from = cfg.patch_size, cfg.grid_size
    ckpt.config = cfg.replace(patch_size=patch_size, image_size=image_size, pos_resize="bilinear")


#: The key of ``overrides`` that names an architecture (``--arch``) rather than a config field.
ARCH = "arch"


def _semantics(layout: Layout, probe: Probe, given: Dict[str, object], arch: Optional[str],
               path: PathLike) -> Tuple[archs.Semantics, Probe]:
    """What the fields the source leaves open are (:func:`vitconv.archs.resolve`), and the probe
    to infer with (the head count decided, where the table or ``--arch`` decided it)."""
    blank = dataclasses.replace(probe, num_heads=None)
    open_fields = layout.assumed(blank)
    # the code fixes it: a value no file of the layout can change (no place for another, one value
    # only, or an argument the code hard-codes); otherwise, unless open, the tensors say it
    fixed = [f.name for f in dataclasses.fields(ViTConfig) if layout.declaration(f.name) in ("fixed", "default")]
    recorded = [c.field for c in layout.carries if c.key is not None and has_key(probe.config, c.key)]
    if not open_fields:
        if arch is not None:
            raise BadInputError(f"--arch {arch}: the {layout.name} file records its architecture's semantics", path)
        sources = {**{f.name: "file" for f in dataclasses.fields(ViTConfig) if f.name not in SHAPE_FIELDS},
                   **{f: "fixed" for f in fixed}, **{f: "config" for f in recorded}}
        return archs.Semantics(sources=sources), probe
    try:
        shaped = layout.read_config(probe)
    except MappingError as e:
        if probe.num_heads is not None:
            raise
        try:
            shaped = layout.read_config(dataclasses.replace(probe, num_heads=1))  # the shapes, whatever the heads
        except MappingError:
            raise e from None  # not the heads: the file's own problem, not the retry's
    semantics = archs.resolve(layout.name, probe.shapes, shaped, open_fields, fixed, recorded, given,
                              probe.num_heads, arch, path, named=layout.names_arch(probe))
    for f in dataclasses.fields(ViTConfig):  # the rest the tensors say (their keys and shapes)
        if f.name not in SHAPE_FIELDS:
            semantics.sources.setdefault(f.name, "file")
    heads = semantics.values.pop("num_heads", None)
    if heads is not None:
        probe = dataclasses.replace(probe, num_heads=heads)
    return semantics, probe


def _override(cfg: ViTConfig, layout: Layout, probe: Probe, overrides: Dict[str, object],
              path: PathLike) -> ViTConfig:
    """``cfg`` with the given fields set; each must be one the source leaves to its code's
    constructor (an assumed value), so an override can never contradict what the file says."""
    if not overrides:
        return cfg
    assumed = set(layout.assumed(dataclasses.replace(probe, num_heads=None))) - {"num_heads"}
    bad = sorted(set(overrides) - assumed)
    if bad:
        say = ", ".join(sorted(assumed)) or "none"
        raise BadInputError(f"--set {', '.join(bad)}: the {layout.name} layout reads it from the file "
                            f"(fields this file leaves open: {say})", path)
    try:
        return cfg.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"--set: {e}", path) from None


def _usage(layout: Layout, metadata: Dict[str, str], documents: Mapping[str, Mapping[str, Any]], cfg: ViTConfig,
           given: Optional[Sequence[str]], path: PathLike) -> Tuple[Usage, int]:
    """The model's preprocessing and class names: vitconv's own metadata, else what a model
    directory records (its ``documents``: ``preprocessor_config.json``, ``config.json``'s
    ``id2label`` or timm's ``pretrained_cfg``), else the layout's family; ``given`` labels win
    over recorded ones. And how many recorded names were left out for not fitting the head (0: none)."""
    hc = documents.get(CONFIG_JSON, {})
    timm_cfg = hc.get("pretrained_cfg") if isinstance(hc.get("pretrained_cfg"), dict) else {}
    pre, own = None, Provenance.from_metadata(metadata)
    if own.preprocessing is not None:
        pre = preprocess.from_json(own.preprocessing, path)
    elif PREPROCESSOR_JSON in documents:
        pre = preprocess.from_hf_processor(documents[PREPROCESSOR_JSON], path)
    elif "mean" in timm_cfg and "std" in timm_cfg:
        pre = preprocess.from_timm_cfg(timm_cfg, path)
    names: Optional[Sequence[str]] = None
    if given is not None:
        check_count(given, cfg.num_classes, path)
        names = given
    elif own.labels is not None:
        names = labels_from_metadata(own.labels, path)
    elif "id2label" in hc:
        names = from_id2label(hc["id2label"], path)
    elif isinstance(timm_cfg.get("label_names"), list):
        names = [str(n) for n in timm_cfg["label_names"]]
    unfit = 0
    if names is not None and len(names) != cfg.num_classes:
        names, unfit = None, len(names)  # the file's own names do not fit its head: not guessed at
    return Usage(pre or layout.preprocessing or preprocess.TIMM_DEFAULT, tuple(names) if names else None), unfit


def _can_differ(cfg: ViTConfig, name: str) -> bool:
    """Whether another value of the field ``name`` would make another model of ``cfg``: not one the
    config spells one way for this model (``map_prefix`` without an attention-pooling head or
    prefix tokens, ``pool_heads`` without a pooling head), which no file needs to say."""
    value = getattr(cfg, name)
    other = (not value) if type(value) is bool else (value + 1 if type(value) is int else None)
    if other is None:
        return True
    try:
        return getattr(cfg.replace(**{name: other}), name) != value
    except (TypeError, ValueError):
        return True


def _read_notes(ckpt: Checkpoint, probe: Probe) -> List[str]:
    """What a user must know about this read: assumptions, what was left out, resizing."""
    cfg, layout = ckpt.source_config, ckpt.layout
    notes = []
    sem = ckpt.semantics
    by: Dict[str, List[str]] = {}
    for f, where in sem.sources.items():
        by.setdefault(where, []).append(f)
    said = lambda fields: ", ".join(f"{f}={getattr(cfg, f)!r}" for f in sorted(fields))  # noqa: E731
    if sem.sources.get("num_heads") in ("assumed", "default"):
        notes.append(f"heads: {cfg.num_heads} x {cfg.head_dim} assumed ({DEFAULT_HEAD_DIM}-dim heads, the "
                     "timm/Google/vit-pytorch default; the weights do not record it); override with --num-heads")
    if "--num-heads" in by:
        notes.append(f"heads: {cfg.num_heads} (given)")
    if "--set" in by:
        notes.append(said(by["--set"]) + " (given)")
    if "--arch" in by:
        notes.append(f"{said(by['--arch'])}: from --arch {sem.arch}")
    elif sem.arch:
        notes.append(f"read as --arch {sem.arch}")
    if "table" in by:
        names = sem.candidates
        notes.append(f"{said(by['table'])}: what every architecture {sem.fit} computes "
                     f"({len(names)}: {', '.join(names[:3])}{', …' if len(names) > 3 else ''}){sem.caveat}")
    rest = [f for f in by.get("assumed", []) + by.get("default", []) if f != "num_heads"]
    if rest:
        contested = [f for f in rest if sem.sources[f] == "assumed" and f in archs.FIELDS]  # the table says so
        notes.append(f"{said(rest)} assumed: the {layout.name} code's defaults, which the file does not record"
                     + ("" if not contested else " and other architectures with these keys do not share "
                        "(name it with --arch, or --set)"))
    notes += layout.read_notes(cfg, probe)
    if ckpt.usage.labels is None and suggest(cfg.num_classes):
        notes.append(f"{cfg.num_classes} classes, as {suggest(cfg.num_classes)}: name them with "
                     f"--labels {suggest(cfg.num_classes)} (or a file, one label per line)")
    if ckpt.ignored:
        what = layout.ignored_what(ckpt.prefix) if callable(layout.ignored_what) else layout.ignored_what
        notes.append(f"{len(ckpt.ignored)} keys outside the model left out ({what})")
    if ckpt.repatched_from is not None:
        notes.append(f"patch {ckpt.repatched_from} -> {ckpt.config.patch_size}: the kernel resampled by "
                     "FlexiViT's pseudo-inverse resize")
    if ckpt.resized_from is not None:
        a, b = ckpt.resized_from, ckpt.config.grid_size
        how = RESIZE_WORDS[ckpt.config.pos_resize if ckpt.repatched_from else cfg.pos_resize]
        notes.append(f"position embeddings resized {a}x{a} -> {b}x{b} ({how}, prefix rows kept)")
    if ckpt.new_head:
        new = ckpt.config.num_classes
        what = "heads" if cfg.distilled and cfg.num_classes else "head"
        notes.append(f"classifier replaced: {cfg.num_classes} -> {new} classes, zero-initialised {what}"
                     if new else f"classifier removed ({cfg.num_classes} classes): the model returns "
                     "its pooled features")
        if cfg.representation_size:
            notes.append(f"pre_logits ({cfg.representation_size}) dropped, as vit_jax's load_pretrained "
                         "does for a fine-tuning config without a representation layer")
    return notes


# --------------------------------------------------------------------------- choosing a target
def choose_layout(layouts: Sequence[Layout], cfg: ViTConfig, container: str, target: str,
                  dst: Optional[PathLike] = None) -> Layout:
    """The first of ``layouts`` that can express ``cfg`` in ``container``; otherwise a
    :class:`MappingError` naming every reason (per layout when there are several)."""
    names = list(parameter_shapes(cfg))
    found = []
    for layout in layouts:
        problems = layout.problems(cfg, names, recorded=container == "dir")
        if not problems:
            return layout
        found.append((layout.name, problems))
    if len(found) == 1:
        detail = "; ".join(found[0][1])
    else:  # the nearest of the target's layouts, and which others were tried
        name, problems = min(found, key=lambda f: len(f[1]))
        others = ", ".join(n for n, _ in found if n != name)
        detail = f"nearest, {name}: {'; '.join(problems)} (also tried: {others})"
    raise MappingError(f"the {target} layout cannot express this model: {detail}", dst)


def map_state(state: Dict[str, np.ndarray], cfg: ViTConfig, layout: Layout) -> Dict[str, np.ndarray]:
    """A canonical state dict in memory -> ``layout``'s ``{key: array}`` (sorted keys),
    through the same table that reads it."""
    rules = layout.rules(cfg)
    have, want = set(state) - set(layout.dropped(cfg)), {r.canonical for r in rules if r.canonical}
    if have != want:
        raise MappingError(f"canonical state does not match the {layout.name} table: missing "
                           f"{sorted(want - have)[:8]}; unexpected {sorted(have - want)[:8]}")
    dtype = next(iter(state.values())).dtype
    out: Dict[str, np.ndarray] = {}
    for r in rules:
        out.update(map_from_canonical(r, state[r.canonical] if r.canonical else np.zeros((), dtype), cfg))
    return {k: out[k] for k in sorted(out)}


def to_layout(state: Dict[str, np.ndarray], cfg: ViTConfig, to: str, container: str = "safetensors"
              ) -> Tuple[str, Dict[str, np.ndarray]]:
    """``(layout name, {key: array})`` of ``to`` for a canonical state dict in memory, refusing
    as :func:`convert` does when the target cannot express the model."""
    suffix = {"dir": "", "npz": ".npz", "pt": ".pt", "safetensors": ".safetensors"}[container]
    name, container, layouts = candidates(Path("out" + suffix), to)
    layout = choose_layout(layouts, cfg, container, name)
    return layout.name, map_state(state, cfg, layout)


# --------------------------------------------------------------------------- writing
@dataclass
class ConversionReport:
    source: str
    layout: str
    source_sha256: str
    config: ViTConfig
    num_params: int
    output: str
    output_kind: str
    target_layout: str = "canonical"
    resized: Optional[Tuple[int, int]] = None
    notes: List[str] = field(default_factory=list)
    #: Every path written (shards, then their index; or the directory).
    files: List[str] = field(default_factory=list)
    #: What :func:`convert`'s hook returned: :mod:`vitconv.conversion.service`'s verification of the written files.
    checked: Any = None

    def rows(self) -> List[Tuple[str, str]]:
        digest = f", sha256 {self.source_sha256[:12]}…" if self.source_sha256 else ""
        rows = [("read", f"{self.source} ({self.layout} layout{digest})"),
                ("model", self.config.describe()),
                ("params", f"{self.num_params:,}")]
        rows += [("note", n) for n in self.notes]
        rows.append(("wrote", f"{self.output} ({self.output_kind})"))
        if self.checked is not None and hasattr(self.checked, "verdict"):
            rows.append(("verified", f"{self.checked.verdict()}, on the written files before they were "
                                     "renamed into place"))
            if self.checked.note:
                rows.append(("verified", self.checked.note))
        return rows


class _Pipelined:
    """``writer.write`` on one background thread, at most one call in flight.

    Why: the writer spends its time in ``write`` and ``zlib.crc32`` (``.pt``), which release
    the GIL, so reading and transposing need not wait for the disk; it costs no memory, as
    the generator chain already keeps the previous tensor alive while it reads the next.
    ``write`` returns as soon as the tensor is handed over, once the previous write has
    finished; its errors surface on the next ``write`` or on leaving the ``with`` block.
    Leaving always waits for the thread, so the writer's own ``__exit__`` (which renames
    or deletes the temporaries) never runs under a write. ``progress`` is called in
    the caller's thread, in order, once each tensor's write has returned."""

    def __init__(self, writer, total: int, progress: Optional[Progress]):
        self.writer, self.total, self.progress = writer, total, progress
        self.done = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vitconv-write")
        self._pending: Optional[Future] = None
        self._pending_info: Optional[tuple] = None

    def __enter__(self) -> "_Pipelined":
        return self

    def _finish(self) -> None:
        if self._pending is None:
            return
        fut, (name, nbytes) = self._pending, self._pending_info
        self._pending = self._pending_info = None
        fut.result()  # re-raises the writer's error here, in the caller's thread
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, name)

    def write(self, name: str, array: np.ndarray, nbytes: int) -> None:
        self._finish()
        self._pending = self._pool.submit(self.writer.write, name, array)
        self._pending_info = (name, nbytes)

    def write_parts(self, name: str, parts: Iterator[np.ndarray], nbytes: int) -> None:
        """A tensor whose parts the caller's stream produces as they are written
        (``writer.write_parts``): in this thread, once the write in flight is done."""
        self._finish()
        self.writer.write_parts(name, parts)
        self.done += nbytes
        if self.progress is not None:
            self.progress(self.done, self.total, name)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
            elif self._pending is not None:
                self._pending.exception()  # wait; the error already on its way wins
                self._pending = None
        finally:
            self._pool.shutdown(wait=True)


#: Outputs of a row with several (q, k and v from one fused qkv) kept for their turn: at most
#: this many bytes. Past it, the row is read again when their turn comes. Sorted orders put
#: them within one block; big_vision's ``scan=True`` members put every block's key before any
#: block's query, which would otherwise hold two thirds of every qkv kernel (ViT-g/14: 630 MB).
HELD_BYTES = 64 << 20


def _foreign_stream(ckpt: Checkpoint, rules: Sequence[ExpandedRule], order: Sequence[str],
                    nbytes: Dict[str, int]) -> Iterator[Tuple[str, np.ndarray]]:
    """``(foreign key, array)`` in the writer's ``order``. Canonical tensors are read in the
    order their keys are first needed; a row with several outputs keeps the others for their
    turn while they fit in :data:`HELD_BYTES` (``nbytes``: each foreign key's size), and is
    read again for those that did not: memory stays flat in the model's depth."""
    rule_of = {k: r for r in rules for k in r.source}
    by_name = {r.canonical: r for r in rules}
    turn = {k: i for i, k in enumerate(order)}
    reads: List[Tuple[str, Set[str]]] = []  # each read: the canonical tensor, the outputs kept
    held: Set[str] = set()
    held_bytes = 0
    for key in order:
        if key in held:
            held.discard(key)
            held_bytes -= nbytes[key]
        elif rule_of[key].canonical:
            keep = set()
            for k in sorted(rule_of[key].source, key=turn.get):  # the soonest first
                if turn[k] > turn[key] and k not in held and held_bytes + nbytes[k] <= HELD_BYTES:
                    keep.add(k)
                    held_bytes += nbytes[k]
            held |= keep
            reads.append((rule_of[key].canonical, keep))
    stream = ckpt.tensors(order=[name for name, _ in reads], read_ahead=True)
    plan = iter(reads)
    pending: Dict[str, np.ndarray] = {}
    dtype = ckpt.specs()[0].dtype
    for key in order:
        if key in pending:
            yield key, pending.pop(key)
        elif rule_of[key].canonical:
            (name, t), (_, keep) = next(stream), next(plan)
            out = map_from_canonical(by_name[name], t, ckpt.config)
            del t
            pending.update((k, v) for k, v in out.items() if k in keep)
            yield key, out.pop(key)
            del out
        else:  # a fill row: zeros in the model's dtype
            pending.update(map_from_canonical(rule_of[key], np.zeros((), dtype), ckpt.config))
            yield key, pending.pop(key)
    for _ in stream:  # nothing may be left: every canonical tensor was asked for
        raise AssertionError("canonical tensors left over after the last foreign key")


def _order(specs: List[TensorSpec], container: str) -> List[TensorSpec]:
    """The order each container lays tensors out in. safetensors: ``save_file``'s own (widest
    dtype, then name), so the bytes equal its output; ``.npz``: sorted keys, as Google's saver
    writes. A ``.pt``'s records take the safetensors order too, while its state dict keeps the
    layout's own order (:func:`write`): small tensors between the large ones keep fewer MLP
    kernels alive at once (ViT-H/14: 290 MiB peak, against 327-345 MiB in the source table's
    order, whose runs of 26 MB kernels fill reader, mapper and writer together)."""
    if container in ("safetensors", "dir", "pt"):
        return safetensors_order(specs)
    return sorted(specs, key=lambda s: s.name)


def write(ckpt: Checkpoint, layout: Layout, container: str, dst: PathLike, *,
          extra: Union[Provenance, Mapping[str, str], None] = None, shard_bytes: Optional[int] = DEFAULT_SHARD_BYTES,
          progress: Optional[Progress] = None,
          before_commit: Optional[Callable[[List[Path]], None]] = None) -> List[Path]:
    """Stream ``ckpt`` into ``dst`` in ``layout`` and ``container``; returns the final paths
    (a sharded file's index last; a directory's path). ``extra``: provenance (source hash and
    name, vitconv's version ...), kept wherever the container has metadata: every safetensors
    header, a shard index's ``metadata``, a canonical ``.pt`` (a Google ``.npz`` and a foreign
    ``.pt`` state dict have no place for it). A canonical output adds what its model's users
    need (config, preprocessing, labels), for the conversions after it. ``before_commit(temporary
    paths)`` runs once every byte is written and before anything is renamed into place: an
    exception there leaves nothing."""
    cfg, canonical = ckpt.config, layout.name == "canonical"
    prov = Provenance.of(extra)
    if canonical:  # a vitconv file keeps what its users need, for the conversions after it
        prov = ckpt.usage.provenance(config=cfg.to_json()).updated(prov)
    canon = {s.name: s for s in ckpt.specs()}
    rules = layout.rules(cfg)
    shapes = foreign_shapes(rules, {n: s.shape for n, s in canon.items()}, cfg)
    fill_dtype = next(iter(canon.values())).dtype
    specs = _order([TensorSpec(k, canon[r.canonical].dtype if r.canonical else fill_dtype, shapes[k])
                    for r in rules for k in r.source], container)
    nbytes = {s.name: s.nbytes for s in specs}  # each foreign key's, before any stacking
    groups: Dict[str, List[str]] = {}
    if layout.stacked and cfg.scan:  # big_vision scan=True: one array per tensor of all blocks
        specs, groups = _stacked_specs(specs, layout.stacked, cfg.depth)
        specs = _order(specs, container)
    # a .pt's state dict: the model's own order for a canonical file, sorted keys otherwise
    state_order = [k for r in rules for k in r.source] if canonical else sorted(s.name for s in specs)
    prefix = layout.write_prefix
    stored = [TensorSpec(prefix + s.name, s.dtype, s.shape) for s in specs]  # the names the file holds
    dst = Path(dst)
    with contextlib.ExitStack() as stack:
        if container == "dir":
            folder = stack.enter_context(atomic_directory(dst))
            stack.enter_context(_named_as(dst, folder))
            files = {"config.json": layout.directory_config(cfg, ckpt.usage),
                     **layout.directory_files(cfg, ckpt.usage)}
            for name, doc in files.items():
                with atomic_output(folder / name) as tmp:
                    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
            writer = SafetensorsStreamWriter(folder / "model.safetensors", stored,
                                             {"format": "pt", **prov.metadata()}, shard_bytes=shard_bytes)
        elif container == "safetensors":
            writer = SafetensorsStreamWriter(dst, stored, {"format": "pt", **prov.metadata()}, shard_bytes=shard_bytes)
        elif container == "pt":  # the config as a dict beside the state dict
            wrap = vitconv_payload(cfg.to_dict(), prov.metadata(without=("config",))) if canonical else None
            writer = PtStreamWriter(dst, stored, wrap, state_order)
        else:
            writer = NpzStreamWriter(dst, stored)
        with writer:
            with _Pipelined(writer, sum(s.nbytes for s in specs), progress) as out:
                order = [k for s in specs for k in groups.get(s.name, [s.name])]
                stream = _foreign_stream(ckpt, rules, order, nbytes)
                for spec in specs:
                    if spec.name in groups:  # the blocks' arrays, consecutive in the stream: one at a time
                        out.write_parts(prefix + spec.name, (next(stream)[1] for _ in groups[spec.name]),
                                        spec.nbytes)
                    else:
                        out.write(prefix + spec.name, next(stream)[1], spec.nbytes)
            if before_commit is not None:
                before_commit(writer.temporaries())
        outputs = [dst] if container == "dir" else list(writer.outputs)
    return outputs


def _stacked_specs(specs: List[TensorSpec], stacked: Tuple[str, str], depth: int
                   ) -> Tuple[List[TensorSpec], Dict[str, List[str]]]:
    """Per-block specs -> one stacked spec per tensor (``(depth, *shape)``), and for each the
    per-block keys it gathers, block 0 first."""
    head, tail = stacked[1].split("{i}")
    per_block = re.compile(re.escape(head) + r"\d+" + re.escape(tail) + "(.*)")
    out, groups = [], {}
    for s in specs:
        m = per_block.fullmatch(s.name)
        if m is None:
            out.append(s)
        elif stacked[0] + m.group(1) not in groups:
            name = stacked[0] + m.group(1)
            groups[name] = [stacked[1].format(i=i) + m.group(1) for i in range(depth)]
            out.append(TensorSpec(name, s.dtype, (depth, *s.shape)))
    return out, groups


@contextlib.contextmanager
def _named_as(final: Path, folder: Path) -> Iterator[None]:
    """Errors about files inside a directory's temporary folder name the directory the user asked for."""
    try:
        yield
    except OutputError as e:
        if e.path is not None and Path(e.path).is_relative_to(folder):
            raise OutputError(e.message, final) from None
        raise


@contextlib.contextmanager
def _hashing(path: Path) -> Iterator["Future[str]"]:
    """The SHA-256 of ``path``, computed on a thread of its own; leaving stops it early."""
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="vitconv-hash") as pool:
        try:
            yield pool.submit(sha256_file, path, stop=stop)
        finally:
            stop.set()


@dataclass(frozen=True)
class Written:
    """What a conversion's hook is handed once every byte is written, before anything is
    renamed into place: the checkpoint read, the layout and container written, the weights'
    temporary files (shards, then their index; a directory's files inside its temporary
    folder) and the source's SHA-256 ("" when not hashed)."""

    ckpt: Checkpoint
    layout: Layout
    container: str
    temporaries: List[Path]
    source_sha256: str


#: ``hook(written)``: see :func:`convert`; what it returns is the report's ``checked``.
Hook = Callable[[Written], Any]


def convert(src: PathLike, dst: PathLike, options: ConvertOptions = ConvertOptions(),
            hook: Optional[Hook] = None, *, progress: Optional[Progress] = None) -> ConversionReport:
    """Read ``src`` in any layout vitconv knows and write ``dst`` as ``options`` say
    (:class:`~vitconv.conversion.options.ConvertOptions`: the layout ``to``, default from
    ``dst``: :mod:`vitconv.conversion.targets`), streaming, atomically; refuses, naming each reason,
    a target that cannot express the model. ``hash_source=False`` skips the source's SHA-256
    (one more read of the file). Above ``shard_bytes`` a ``.safetensors`` output is sharded
    with a ``.index.json`` (the report's ``output`` is then the index). ``hook(`` :class:`Written`
    ``)`` runs once every byte is written, before anything is renamed into place
    (:mod:`vitconv.conversion.service` verifies the files there and writes a model directory's
    ``README.md``); what it returns is the report's ``checked``, and an exception leaves nothing.
    ``metadata``: more provenance, recorded with the source's hash and vitconv's version
    wherever the output has metadata (:func:`write`), and with what a vitconv source's own
    provenance hands on (:meth:`~vitconv.formats.provenance.Provenance.carried`).
    ``source_sha256``: the source's hash when the caller already has it (a download hashed as it
    streamed, a batch row that hashed it to decide whether to skip), so the file is not read
    again for it.

    >>> vitconv.convert("ViT-B_16.npz", "vit_hf")   # doctest: +SKIP
    """
    src, dst = Path(src), Path(dst)
    hash_source, source_sha256 = options.hash_source, options.source_sha256
    target, container, layouts = candidates(dst, options.to)
    refuse_clobber([dst], [src])
    if container != "dir":
        check_writable(dst)  # fail before reading a multi-GB source, not after
    with contextlib.ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(src, options))
        refuse_clobber([dst], [src, *ckpt.source.files()])
        layout = choose_layout(layouts, ckpt.config, container, target, dst)
        # The source's hash is a second read of the whole file: it runs on its own thread
        # beside the conversion, and the writers put it in place of its placeholder at the end.
        digest: str = source_sha256 or ""
        if hash_source and not source_sha256:
            digest = Deferred(stack.enter_context(_hashing(ckpt.source.files()[0])), 64)
        # what the source's own provenance hands on (a vitconv output's architecture, keys a
        # newer vitconv recorded), then this write's
        extra = Provenance.from_metadata(ckpt.source.metadata).carried().updated(Provenance(
            source_sha256=digest if hash_source else None, source=src.name,
            version=__version__, arch=ckpt.semantics.arch)).updated(options.metadata)
        specs = ckpt.specs()
        checked: List[Any] = []

        def commit(temporaries: List[Path]) -> None:
            nonlocal digest
            digest = resolve(digest)
            if hook is not None:
                checked.append(hook(Written(ckpt, layout, container, temporaries, digest)))
        outputs = write(ckpt, layout, container, dst, extra=extra, shard_bytes=options.shard_bytes,
                        progress=progress, before_commit=commit)
    notes = list(ckpt.notes) + layout.argument_notes(ckpt.config, recorded=container == "dir")
    notes += [f"{t} left out: the {layout.name} layout has none, and only training reads it"
              for t in layout.dropped(ckpt.config)]
    notes += layout.write_notes(ckpt.config)
    if container != "dir" and len(outputs) > 1:
        notes.append(f"sharded into {len(outputs) - 1} files of at most {options.shard_bytes:,} bytes "
                     f"({', '.join(p.name for p in outputs[:-1])})")
    kind = f"{layout.name} layout: {layout.description}"
    if container in layout.loads_with:
        notes.append("load with " + layout.loads_with[container].format(path=dst))
    if options.dtype is not None:
        notes.append(f"weights written as {options.dtype}")
    resized = (ckpt.resized_from, ckpt.config.grid_size) if ckpt.resized_from is not None else None
    return ConversionReport(str(src), ckpt.layout.name, digest, ckpt.config, sum(s.numel for s in specs),
                            str(outputs[-1]), kind, layout.name, resized, notes, [str(p) for p in outputs],
                            checked[0] if checked else None)


__all__ = ["Checkpoint", "ConversionReport", "Written", "Hook", "open_checkpoint", "convert", "write", "choose_layout",
           "map_state", "to_layout", "DEFAULT_SHARD_BYTES", "LAYOUTS"]
