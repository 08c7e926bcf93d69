"""The canonical layout itself: one identity row per tensor of the canonical model's
``state_dict`` (:func:`vitconv.config.parameter_shapes`, held to the model by a test), so a
canonical file is audited like any other and a module added to the model needs no row written here.

A canonical file carries its whole :class:`~vitconv.config.ViTConfig` as the
``vitconv_config`` metadata string (safetensors ``__metadata__``, the ``config`` entry of a
vitconv ``.pt``); that string is untrusted input and is validated field by field here.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

from vitconv.config import ViTConfig, parameter_shapes
from vitconv.errors import BadInputError, MappingError, first_line
from vitconv.formats.json_doc import parse_json
from vitconv.layouts.table import Carry, Rule
from vitconv.layouts.inference import count_blocks
from vitconv.layouts.transforms import IDENTITY
from vitconv.layouts.layout import Layout, Probe, register
from vitconv.formats.provenance import CONFIG_KEY


def table(cfg: ViTConfig) -> Tuple[Rule, ...]:
    return tuple(Rule(name, (name,), IDENTITY) for name in parameter_shapes(cfg))


def parse_config(text: str, path=None) -> ViTConfig:
    """The ``vitconv_config`` a file carries, checked down to each field's type and range."""
    d = parse_json(text, "vitconv_config metadata", path)
    try:
        return ViTConfig.from_dict(d)
    except ValueError as e:
        raise BadInputError(f"invalid vitconv_config ({first_line(e)})", path) from None


def detect(probe: Probe) -> bool:
    s = probe.shapes
    return "patch_embed.weight" in s and "blocks.0.attn.qkv.weight" in s and "pos_embed" in s


def infer_config(probe: Probe) -> ViTConfig:
    """The config the file carries. A bare canonical state dict has none, and the heads
    cannot be read off a fused qkv weight: refused rather than guessed."""
    if CONFIG_KEY in probe.metadata:
        cfg = parse_config(probe.metadata[CONFIG_KEY], probe.path)
        # checked before the table is built from it: a forged depth would build that many blocks
        blocks = count_blocks(probe.shapes, r"^blocks\.(\d+)\.", "blocks.N", probe.path)
        if blocks != cfg.depth:
            raise BadInputError(f"vitconv_config says depth {cfg.depth}, but the file holds {blocks} blocks",
                                probe.path)
        return cfg
    raise MappingError("canonical state dict without a vitconv config: the number of heads "
                       "cannot be read off a fused qkv weight; use a file written by vitconv", probe.path)


register(Layout(
    name="canonical", description="vitconv canonical state dict (config in the metadata)",
    table=table, detect=detect, infer=infer_config,
    carries=tuple(Carry(f.name) for f in dataclasses.fields(ViTConfig)),  # all, in the metadata
    sources=lambda cfg: {f.name: f"{CONFIG_KEY} metadata" for f in dataclasses.fields(ViTConfig)}))
