"""Registry of foreign layouts: how to recognise one, infer its architecture, and map
it to and from the canonical state dict. Each layout is one rule table (``rules/``)
plus the few lines here that read the architecture off its shapes."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .config import ViTConfig
from .errors import MappingError
from .formats.base import TensorSource
from .rules.base import Rule, audit, expand_rules, map_from_canonical, map_to_canonical
from .rules.layout import all_finite

Shapes = Dict[str, Tuple[int, ...]]


def _nothing(*args) -> List[str]:
    return []


@dataclass(frozen=True)
class Layout:
    """One foreign layout. ``detect`` looks at key names/shapes only; ``infer`` returns the
    config; ``table`` (or ``table_for(cfg)``) is the rule table in both directions.
    ``strip`` removes a container prefix (``opt/target/``) and says which keys it ignored."""

    name: str
    description: str
    detect: Callable[[Shapes], bool]
    infer: Callable[[Shapes, Optional[str]], ViTConfig]
    table_for: Callable[[ViTConfig], Sequence[Rule]]
    strip: Optional[Callable[[Sequence[str], Optional[str]], str]] = None
    #: Inference that also sees the source's metadata (a Hugging Face ``config.json``);
    #: used instead of ``infer`` when set.
    infer_meta: Optional[Callable[[Shapes, Dict[str, str], Optional[str]], ViTConfig]] = None
    #: Writing: what the layout cannot express for a config (the conversion stops, naming
    #: each item), and what its code needs to compute the same function (report notes).
    write_problems: Callable[[ViTConfig], List[str]] = _nothing
    write_notes: Callable[[ViTConfig], List[str]] = _nothing
    #: Reading: what was assumed or changes the numbers (report notes), given the metadata.
    read_notes: Callable[[ViTConfig, Dict[str, str]], List[str]] = _nothing
    #: Whether the head count is in the shapes (Google's per-head kernels) or the file's own
    #: config; where it is not, 64-dim heads are assumed and ``--num-heads`` may override.
    heads_recorded: Callable[[Dict[str, str]], bool] = lambda metadata: True
    #: Whether the layout holds DeiT's distillation token and second head.
    holds_distillation: bool = False


LAYOUTS: Dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    LAYOUTS[layout.name] = layout
    return layout


def _google() -> Layout:
    from .rules import google

    return Layout(
        name="google",
        description="Google vit_jax .npz (HWIO kernels, per-head q/k/v)",
        detect=lambda shapes: any(k.endswith("embedding/kernel") for k in shapes)
        and any("encoderblock_" in k for k in shapes),
        infer=google.infer_config,
        table_for=lambda cfg: google.TABLE,
        strip=google.find_prefix,
        write_problems=google.write_problems,
    )


def _canonical() -> Layout:
    from .rules.canonical import TABLE, infer_config, detect

    return Layout(name="canonical", description="vitconv canonical state dict",
                  detect=detect, infer=infer_config, table_for=lambda cfg: TABLE, holds_distillation=True)


register(_google())
register(_canonical())


def _pytorch_layouts() -> List[Layout]:
    """timm, Hugging Face, jeonsworld and vit-pytorch: one rule table each (``rules/``)."""
    from .rules import hf, jeonsworld, lucidrains, timm

    def unrecorded(metadata: Dict[str, str]) -> bool:
        return False

    timm_like = dict(write_problems=timm.write_problems, write_notes=timm.write_notes, holds_distillation=True)
    hf_like = dict(write_problems=hf.write_problems, write_notes=hf.write_notes, read_notes=hf.read_notes)

    def vit_pytorch(name: str, description: str) -> Layout:
        return Layout(name, description, lucidrains.detect(name), lucidrains.infer(name), lucidrains.table_for(name),
                      write_problems=lambda cfg: lucidrains.write_problems(name, cfg),
                      write_notes=lucidrains.write_notes,
                      read_notes=lambda cfg, metadata: lucidrains.read_notes(name, cfg), heads_recorded=unrecorded)

    return [
        Layout("timm", "timm VisionTransformer state dict", timm.detect("timm"), timm.infer("timm"),
               timm.table_for("timm"), infer_meta=timm.infer_with_meta("timm"),
               heads_recorded=timm.config_records_heads, **timm_like),
        Layout("timm_posembs", "timm-derived ViT with a PositionEmbs wrapper (pos_embedding.pos_embedding)",
               timm.detect("timm_posembs"), timm.infer("timm_posembs"), timm.table_for("timm_posembs"),
               heads_recorded=unrecorded, **timm_like),
        Layout("hf", "Hugging Face ViTForImageClassification", hf.detect("hf"), hf.infer("hf"),
               hf.table_for("hf"), infer_meta=hf.infer_with_meta("hf"), **hf_like),
        Layout("hf_model", "Hugging Face ViTModel (no classifier)", hf.detect("hf_model"), hf.infer("hf_model"),
               hf.table_for("hf_model"), infer_meta=hf.infer_with_meta("hf_model"), **hf_like),
        Layout("jeonsworld", "jeonsworld ViT-pytorch (separate q/k/v Linears)", jeonsworld.detect,
               jeonsworld.infer_config, lambda cfg: jeonsworld.TABLE,
               write_problems=jeonsworld.write_problems, write_notes=jeonsworld.write_notes,
               read_notes=lambda cfg, metadata: jeonsworld.read_notes(cfg), heads_recorded=unrecorded),
        vit_pytorch("lucidrains", "vit-pytorch ViT (patch LayerNorms, final norm)"),
        vit_pytorch("lucidrains_prenorm", "older vit-pytorch ViT (PreNorm wrappers, LayerNorm in mlp_head)"),
    ]


for _layout in _pytorch_layouts():
    register(_layout)


def detect_layout(source: TensorSource) -> Layout:
    """The one layout whose ``detect`` accepts the source's keys; a clear error naming the
    candidates when none or several do. A vitconv config in the metadata means canonical."""
    if "vitconv_config" in source.metadata:
        return LAYOUTS["canonical"]
    shapes = {k: source.shape(k) for k in source.keys()}
    hits = [l for l in LAYOUTS.values() if l.name != "canonical" and l.detect(shapes)]
    if not hits and LAYOUTS["canonical"].detect(shapes):
        hits = [LAYOUTS["canonical"]]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise MappingError("not a ViT checkpoint in any known layout (known: "
                           + ", ".join(sorted(LAYOUTS)) + ")", source.path)
    raise MappingError("ambiguous layout: matches " + ", ".join(l.name for l in hits)
                       + "; pass the layout explicitly", source.path)


@dataclass
class ReadResult:
    """A source mapped onto the canonical model, not yet read: ``tensors()`` streams it."""

    layout: Layout
    config: ViTConfig
    source: TensorSource
    prefix: str
    rules: List
    ignored: List[str]

    def tensors(self, check_finite: bool = True, read_ahead: bool = False) -> Iterator[Tuple[str, np.ndarray]]:
        """Stream ``(canonical name, array)`` in rule order. ``read_ahead`` reads the next
        rules' sources on a background thread while this one is mapped, when the source
        allows concurrent reads (:mod:`vitconv.readahead`; flat memory, same bytes)."""
        from .shapes import expected_shapes

        with contextlib.ExitStack() as stack:
            get = (lambda k: self.source.get(self.prefix + k))
            if read_ahead and self.source.concurrent_reads:
                get = stack.enter_context(self._read_ahead()).get
            for name, t in map_to_canonical(self.rules, get, self.config, expected_shapes(self.config),
                                            self.source.path):
                if not np.issubdtype(t.dtype, np.floating):
                    raise MappingError(f"{name} has dtype {t.dtype}, expected floating point", self.source.path)
                if check_finite and not all_finite(t):
                    raise MappingError(f"{name} contains NaN or Inf values", self.source.path)
                yield name, t
                del t  # not kept alive while the next one is read and mapped

    def _read_ahead(self):
        from .readahead import ReadAhead

        src, prefix = self.source, self.prefix
        return ReadAhead(lambda k: src.get(prefix + k), [k for r in self.rules for k in r.source],
                         lambda k: src.nbytes(prefix + k))


def read_layout(source: TensorSource, layout: Optional[Layout] = None,
                config: Optional[ViTConfig] = None) -> ReadResult:
    """Recognise ``source``, infer its architecture and audit its keys strictly: every key
    consumed exactly once, every canonical tensor produced exactly once."""
    layout = layout or detect_layout(source)
    keys = source.keys()
    prefix = layout.strip(keys, source.path) if layout.strip else ""
    inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    ignored = [k for k in keys if not k.startswith(prefix)]
    if config is None:
        if layout.name == "canonical" and "vitconv_config" in source.metadata:
            import json

            config = ViTConfig.from_dict(json.loads(source.metadata["vitconv_config"]))
        else:
            shapes = {k: source.shape(prefix + k) for k in inner}
            if layout.infer_meta is not None:
                config = layout.infer_meta(shapes, source.metadata, source.path)
            else:
                config = layout.infer(shapes, source.path)
    rules = expand_rules(layout.table_for(config), config)
    audit(rules, inner, source.path)
    return ReadResult(layout, config, source, prefix, rules, ignored)


def write_layout(state: Mapping[str, np.ndarray], config: ViTConfig, layout: Layout) -> Dict[str, np.ndarray]:
    """Canonical state -> ``layout``'s ``{key: array}`` through the same table, inverted."""
    return map_from_canonical(expand_rules(layout.table_for(config), config), state, config)
