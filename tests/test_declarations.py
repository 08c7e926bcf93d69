"""A field declares itself once: each layout's :class:`Carry` rows say which config fields it
holds, which it fixes and (by having no row) which can only mean the default there, and
everything else is read off those rows. Two checks keep the declarations honest:

- a table that selects rows by a field its layout does not declare is refused when the layout is
  registered (the package import fails), and over every test variant here;
- a read whose inferred architecture has a value no row allows is refused, naming the field,
  instead of being passed on as if the layout's code computed it.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from test_registry import VARIANTS
from vitconv.config import SHAPE_FIELDS, ViTConfig
from vitconv.conversion.api import open_checkpoint
from vitconv.errors import MappingError, VitconvError
from vitconv.layouts import LAYOUTS, Probe
from vitconv.layouts.layout import register, undeclared_conditions
from vitconv.layouts.table import foreign_shapes
from vitconv.model import parameter_shapes
from vitconv.tools.inspection import _shape_sources

SMALL = ViTConfig(image_size=32, patch_size=8, width=64, depth=2, num_heads=2, head_dim=32, mlp_dim=96,
                  num_classes=10)


def _expressible(layout, cfg: ViTConfig) -> bool:
    try:
        return not layout.problems(cfg, parameter_shapes(cfg), True)
    except (KeyError, ValueError):
        return False


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_field_a_table_selects_rows_by_is_declared(name):
    layout = LAYOUTS[name]
    held = [cfg for cfg in VARIANTS.values() if _expressible(layout, cfg)] or [ViTConfig()]
    for cfg in held:
        assert undeclared_conditions(layout, cfg) == [], cfg.describe()


def test_a_row_selected_by_an_undeclared_field_fails_registration():
    timm = LAYOUTS["timm"]
    without = dataclasses.replace(timm, name="timm_without_qk_norm",
                                  carries=tuple(c for c in timm.carries if c.field != "qk_norm"))
    with pytest.raises(ValueError, match=r"timm_without_qk_norm.*qk_norm \(in the row for blocks\.\{i\}\.attn\.q_norm"):
        register(without)
    assert "timm_without_qk_norm" not in LAYOUTS


def test_declarations_are_what_the_rows_say():
    hf, timm, jeons = LAYOUTS["hf"], LAYOUTS["timm"], LAYOUTS["jeonsworld"]
    assert [hf.declaration(f) for f in ("width", "act", "classifier", "pos_resize", "rope")] == \
        ["shape", "held", "fixed", "fixed", "default"]
    assert timm.declaration("qk_norm") == "held" and jeons.declaration("final_norm") == "fixed"
    kinds = {layout.declaration(f.name) for layout in LAYOUTS.values() for f in dataclasses.fields(ViTConfig)}
    assert kinds == {"shape", "held", "fixed", "default"}
    assert all(layout.declaration(f) == "shape" for layout in LAYOUTS.values() for f in SHAPE_FIELDS)


def _shapes(layout: str, cfg: ViTConfig):
    return foreign_shapes(LAYOUTS[layout].rules(cfg), parameter_shapes(cfg), cfg)


def test_a_read_no_row_allows_is_refused_naming_the_field():
    # Hugging Face ViT always has its final layernorm: the shapes alone would read as final_norm='none'
    shapes = {k: v for k, v in _shapes("hf", SMALL).items() if not k.startswith("vit.layernorm.")}
    probe = Probe(shapes, num_heads=2)
    assert LAYOUTS["hf"].infer(probe).final_norm == "none"  # what the shapes alone say
    with pytest.raises(MappingError, match=r"hf layout holds: final_norm='none' \(Hugging Face ViT always has "
                                           r"its final layernorm\)"):
        LAYOUTS["hf"].read_config(probe)
    assert LAYOUTS["hf"].read_config(Probe(_shapes("hf", SMALL), num_heads=2)) == \
        LAYOUTS["hf"].infer(Probe(_shapes("hf", SMALL), num_heads=2))


def test_a_file_whose_layout_cannot_hold_it_is_refused_in_one_line(tmp_path):
    shapes = {k: v for k, v in _shapes("jeonsworld", SMALL).items() if "encoder_norm" not in k}
    path = tmp_path / "jeons.safetensors"
    save_file({k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}, str(path))
    with pytest.raises(VitconvError, match=r"jeonsworld layout holds: final_norm='none' \(jeonsworld always has "
                                           r"its encoder_norm\)"):
        open_checkpoint(path, num_heads=2)
    out = subprocess.run([sys.executable, "-m", "vitconv", "inspect", str(path)], capture_output=True, text=True)
    assert "final_norm='none'" in out.stdout + out.stderr and "Traceback" not in out.stderr


ROPE_AXIAL = VARIANTS["rope-axial ape"]


def _eva_probe(model_args):
    """A timm Eva directory's probe: the shapes of ``ROPE_AXIAL``, ``model_args`` in its config.json."""
    config = {"architecture": "vit_small_patch16_rope_224", "model_args": model_args}
    return Probe(_shapes("timm_eva", ROPE_AXIAL), config=config)


def test_the_rotary_rows_name_the_constructor_arguments_once():
    """timm Eva's rotary arguments are written from its Carry rows and read back by the same rows
    (timm itself builds these directories in test_eva.py's round trips)."""
    args = LAYOUTS["timm_eva"].directory_config(ROPE_AXIAL, None)["model_args"]
    assert {k: args[k] for k in args if k.startswith("rope_") or k == "ref_feat_shape"} == dict(
        rope_type="cat", rope_temperature=100.0, rope_rotate_half=False, rope_grid_offset=1.0,
        rope_grid_indexing="xy", ref_feat_shape=None)
    got = LAYOUTS["timm_eva"].read_config(_eva_probe({**args, "ref_feat_shape": 14}))
    assert (got.rope, got.rope_theta, got.rope_half, got.rope_grid_offset, got.rope_indexing, got.rope_ref_grid) == \
        ("cat", 100.0, False, 1.0, "xy", (14, 14))  # one size for both axes, as timm's to_2tuple


@pytest.mark.parametrize("key,value,says", [
    ("rope_grid_indexing", "zz", "rope_grid_indexing 'zz' is not one of 'ij', 'xy'"),
    ("rope_temperature", "100", "rope_temperature '100' is not a number"),
    ("rope_temperature", -1.0, "rope_temperature -1.0 is not a positive number"),
    ("rope_rotate_half", 1, "rope_rotate_half 1 is not true or false"),
    ("rope_grid_offset", None, "rope_grid_offset None is not a number"),
    ("ref_feat_shape", [16, 16, 2], "ref_feat_shape [16, 16, 2] is not a list of 2 integers"),
])
def test_a_bad_rotary_argument_is_refused_naming_key_and_value(key, value, says):
    args = {**LAYOUTS["timm_eva"].directory_config(ROPE_AXIAL, None)["model_args"], key: value}
    with pytest.raises(MappingError, match=re.escape("config.json: " + says)):
        LAYOUTS["timm_eva"].read_config(_eva_probe(args))


SIZES = ("width", "mlp_dim", "in_chans", "num_classes", "num_heads", "head_dim", "patch_size")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_inspect_names_a_tensor_axis_that_holds_each_size(name):
    """inspect's source of each size is read off the table (tools.inspection._shape_sources): the
    named key is in the file and its axis holds the size (a multiple of it: packed SwiGLU, p*p*C; or a
    part: DINOv3's head_dim / 4 rotary periods), and the blocks' count names blocks 0..depth-1."""
    layout = LAYOUTS[name]
    for cfg in [c for c in VARIANTS.values() if _expressible(layout, c)]:
        said = _shape_sources(layout, cfg)
        shapes = _shapes(name, cfg)
        assert {"width", "depth", "mlp_dim", "in_chans", "patch_size"} <= set(said), said
        for field in SIZES:
            if field not in said or not getattr(cfg, field) or said[field].startswith("no "):
                continue
            key, axis = re.fullmatch(r"(\S+) \[(\d+)\]( .*)?", said[field]).group(1, 2)
            held, size = shapes[key][int(axis)], getattr(cfg, field)  # a multiple, or a part (rotary periods)
            assert held % size == 0 or size % held == 0, (field, said[field], shapes[key])
        if not cfg.scan:  # blocks 0..depth-1 are there, and no more
            block = said["depth"].removeprefix("count of ").split(" ")[0]
            held = [any(k.startswith(re.sub(r"(?<![A-Za-z])N(?![A-Za-z])", str(i), block)) for k in shapes)
                    for i in range(cfg.depth + 1)]
            assert held == [True] * cfg.depth + [False], said["depth"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_inspect_reads_the_sizes_of_a_one_head_model(name):
    """One head cannot be halved: the head split is still found where a tensor shows it (Google's
    per-head query kernel), and nothing else is claimed or fails (the README's one-head models)."""
    layout = LAYOUTS[name]
    for cfg in [c for c in VARIANTS.values() if _expressible(layout, c)]:
        one = cfg.replace(num_heads=1, head_dim=cfg.attn_dim)
        if not _expressible(layout, one):
            continue
        said = _shape_sources(layout, one)
        if name in ("google", "big_vision"):
            assert said["num_heads"].endswith("query/kernel [1]") and said["head_dim"].endswith("query/kernel [2]")
