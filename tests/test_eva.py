"""timm's other ``Eva`` forms: EVA's axial rotary embeddings (``rope_type='cat'``: the ``*_rope_*``
ViTs, EVA-02, Perception Encoder's spatial tower), with or without a position table, class token,
registers and LayerScale; against the real timm 1.0.31, offline.

Each model is built by timm at small width with every parameter seeded far from its init
(LayerScale ``gamma_1``/``gamma_2`` log-uniform over 2e-4..11); timm's own forward is the reference,
at the checkpoint's resolution, at another one and on non-square inputs (``dynamic_img_size=True``:
timm computes the rotary angles for each input's grid and resamples its table). Written back, each
loads strictly into timm and bit for bit; a timm directory rebuilds the same function from its
config.json alone. What a bare file cannot record of the rotation (its form, base, reference grid,
offset, axis order and layout) comes from the architectures whose keys fit, or ``--set``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import close_to, images, save_state, seeded
from timm_import import assert_timm_round_trip, import_timm
from vitconv.conversion.loading import load
from vitconv.errors import MappingError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = import_timm()

SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, dynamic_img_size=True)
#: the native size, another, and two non-square inputs (rows != columns both ways)
SIZES = ((32, 32), (48, 48), (32, 48), (56, 24))
# name -> (extra create_model arguments, --set for what a bare file cannot say, what must be read)
TIMM = {
    # RoPE-Axial (naver): class token, LayerScale, one full qkv bias (AttentionRope), 'xy' angles, base 100
    "vit_small_patch16_rope_224": (dict(), {}, dict(
        rope="cat", rope_theta=100.0, rope_indexing="xy", rope_half=False, rope_ref_grid=None,
        abs_pos_embed=False, key_bias=True, classifier="token", layer_scale=True, norm_eps=1e-6, act="gelu")),
    # ... with an absolute table as well, its rows for the patches only (no_embed_class)
    "vit_small_patch16_rope_ape_224": (dict(), {}, dict(
        rope="cat", rope_indexing="xy", abs_pos_embed=True, pos_embed_prefix="none", pos_resize="bicubic_aa")),
    # timm SBB: one register, no class token, mean pooling with fc_norm, angles rescaled to a 16x16 grid
    "vit_base_patch16_rope_reg1_gap_256": (dict(), {}, dict(
        rope="cat", rope_theta=10000.0, rope_ref_grid=(16, 16), rope_indexing="ij", class_token=False,
        num_reg_tokens=1, classifier="gap", final_norm="pooled", key_bias=False, qkv_bias=True)),
    # EVA-02: a table with a class row, q/v biases, packed SwiGLU (GluMlp), no LayerScale
    "eva02_tiny_patch14_224": (dict(), {}, dict(
        rope="cat", rope_ref_grid=(16, 16), abs_pos_embed=True, pos_embed_prefix="all", mlp="swiglu",
        act="silu", swiglu_unpacked=False, layer_scale=False, mlp_dim=341, final_norm="pooled")),
    # EVA-02 B: separate q/k/v projections (no key bias), a sub-LayerNorm in the (unpacked) SwiGLU
    "eva02_base_patch14_224": (dict(), {}, dict(
        rope="cat", qkv_unfused=True, key_bias=False, mlp_norm=True, attn_norm=False, swiglu_unpacked=True,
        mlp="swiglu", final_norm="pooled")),
    # EVA-02 CLIP B: the same and a sub-LayerNorm on the attention output, class-token pooling, a head
    "eva02_base_patch16_clip_224": (dict(num_classes=24), {}, dict(
        rope="cat", qkv_unfused=True, mlp_norm=True, attn_norm=True, classifier="token", num_classes=24)),
    # RoPE-Mixed (naver): learned frequencies per block and head (rope.freqs, a tensor), 'xy' indices
    "vit_small_patch16_rope_mixed_224": (dict(), {}, dict(
        rope="mixed", rope_indexing="xy", rope_half=False, key_bias=True, classifier="token", num_heads=2)),
    # Perception Encoder's core tower: the same angles, attention pooling with its own 8 heads, a projection
    "vit_pe_core_tiny_patch16_384": (dict(num_classes=24), {"rope_ref_grid": [24, 24]}, dict(
        rope="cat", rope_grid_offset=1.0, rope_indexing="xy", rope_ref_grid=(24, 24), classifier="map",
        pool_heads=8, norm_pre=True, final_norm="encoder", num_classes=24)),
    # Perception Encoder's spatial tower: grid offset 1, 'xy', a pre-norm and no patch bias, no final norm
    "vit_pe_spatial_tiny_patch16_512": (dict(), {}, dict(
        rope="cat", rope_grid_offset=1.0, rope_indexing="xy", rope_ref_grid=(32, 32), norm_pre=True,
        patch_bias=False, final_norm="none", norm_eps=1e-5, classifier="gap")),
}


def _seed(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`conftest.seeded`, weights N(0, 0.2^2)."""
    return seeded(model, scale=0.2)


def _timm(name: str, **extra):
    return _seed(timm.create_model(name, pretrained=False, **{**SMALL, **TIMM[name][0], **extra}))





@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_eva_reads_at_any_size_and_writes_back(name, tmp_path):
    extra, unsaid, expect = TIMM[name]
    model = _timm(name)
    save_state(model, tmp_path / "src.safetensors")
    report = convert(tmp_path / "src.safetensors", tmp_path / "c.safetensors", ConvertOptions(overrides=unsaid))
    assert report.layout == "timm_eva"
    for field, value in expect.items():
        assert getattr(report.config, field) == value, field
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        for h, w in SIZES:
            close_to(ours(images(h, w)), model(images(h, w)))
    assert_timm_round_trip(tmp_path, name, {**SMALL, **extra}, model, SIZES[1:3], report)


@pytest.mark.parametrize("wrong", [dict(rope_theta=1000.0), dict(rope_indexing="ij"), dict(rope_half=True),
                                   dict(rope_grid_offset=0.5), dict(rope_ref_grid=(8, 8)), dict(rope="none")])
def test_each_rotary_parameter_moves_the_output(wrong, tmp_path):
    """Every rotary field matters well above rounding on a seeded model (rotating the class token
    too, or another axis order, would break the exactness above)."""
    model = _timm("vit_pe_spatial_tiny_patch16_512")
    save_state(model, tmp_path / "src.safetensors")
    with torch.no_grad():
        want = model(images(32, 48))
        close_to(load(tmp_path / "src.safetensors")(images(32, 48)), want)
        assert (load(tmp_path / "src.safetensors", **wrong)(images(32, 48)) - want).abs().max() > 1e-3


def test_a_bare_state_dict_takes_its_rotation_from_the_architectures_that_fit(tmp_path):
    """A bare file records none of the rotary parameters: they come from the architectures whose
    keys fit (here every RoPE-Axial ViT: 'xy', base 100), named in the notes; --set says others."""
    model = _timm("vit_small_patch16_rope_224")
    save_state(model, tmp_path / "s.safetensors")
    with open_checkpoint(tmp_path / "s.safetensors") as c:
        assert (c.config.rope, c.config.rope_theta, c.config.rope_indexing) == ("cat", 100.0, "xy")
        assert any("rope_indexing='xy'" in n and "every architecture with these keys" in n
                   for n in c.notes), c.notes
        assert any("the native size 224 is assumed: timm's default img_size" in n for n in c.notes), c.notes
    with open_checkpoint(tmp_path / "s.safetensors", ReadOptions(overrides={"rope_theta": 10.0})) as c:
        assert c.config.rope_theta == 10.0


@pytest.mark.parametrize("name,args", [("vit_small_patch16_rope_224", dict(rope_temperature=7.0)),
                                       ("eva02_tiny_patch14_224", dict(rope_temperature=7.0, ref_feat_shape=[3, 3]))])
def test_a_directory_that_names_its_architecture_keeps_its_own_rotary_arguments(name, args, tmp_path):
    """A timm directory whose config.json names the architecture and records some rotary arguments
    but not ``rope_type`` (as timm writes only what differs): the form comes from the named
    architecture, the arguments it records from model_args, never the architecture's defaults."""
    model_args = {**{k: v for k, v in SMALL.items() if k != "dynamic_img_size"}, **args}
    model = _seed(timm.create_model(name, pretrained=False, **SMALL, **args))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"architecture": name, "model_args": model_args}))
    save_state(model, tmp_path / "src" / "model.safetensors")
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    assert (report.config.rope, report.config.rope_theta) == ("cat", 7.0)
    with torch.no_grad():
        close_to(load(tmp_path / "c.safetensors")(images(32, 32)), model(images(32, 32)))


@pytest.mark.parametrize("arch,kw,what", [
    ("vit_base_patch16_sapiens2", dict(num_kv_heads=1), "qk-norm (Sapiens2)"),
    ("vit_base_patch16_sapiens2", dict(num_kv_heads=1, qk_norm=False), "grouped-query attention"),
])
def test_other_eva_forms_are_refused_by_name(arch, kw, what, tmp_path):
    model = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, embed_dim=128, depth=1,
                              num_heads=2, **kw)
    save_state(model, tmp_path / "m.safetensors")
    with pytest.raises(MappingError) as e:
        convert(tmp_path / "m.safetensors", tmp_path / "c.safetensors")
    assert what in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "c.safetensors").exists()


def test_eva02_onnx_dynamic_size_follows_timm_at_unseen_sizes(tmp_path):
    """``vitconv export --onnx --dynamic-size`` of EVA-02: the graph computes the rescaled 'cat'
    angles and resamples the table from its input's grid, so sizes other than the export size (one
    of them non-square) give timm's output."""
    import onnxruntime as ort
    from click.testing import CliRunner

    from _vitconv_cli.main import main

    model = _timm("eva02_tiny_patch14_224")
    save_state(model, tmp_path / "t.safetensors")
    convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "c.safetensors"), "--onnx", str(tmp_path / "m.onnx"),
                                  "--dynamic-size"])
    assert r.exit_code == 0, r.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for h, w in ((48, 48), (40, 64)):
        got = session.run(None, {"pixel_values": images(h, w, 5).numpy()})[0]
        with torch.no_grad():
            want = model(images(h, w, 5))
        close_to(torch.from_numpy(got), want)


@pytest.mark.parametrize("name", ["eva02_base_patch16_clip_224", "vit_small_patch16_rope_mixed_224"])
def test_verify_runs_timm_as_the_reference(name, tmp_path):
    """``vitconv verify``'s reference is timm's Eva itself, built with what vitconv read (a bare
    file records none of it) or from a timm directory."""
    from vitconv.verification.verify import verify

    model = _timm(name, **TIMM[name][0])
    save_state(model, tmp_path / "t.safetensors")
    convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors")
    checked = verify(tmp_path / "t.safetensors", tmp_path / "c.safetensors")
    assert checked.ok, checked.verdict()
    convert(tmp_path / "c.safetensors", tmp_path / "tdir", ConvertOptions(to="timm"))
    checked = verify(tmp_path / "tdir", tmp_path / "c.safetensors")
    assert checked.ok, checked.verdict()
