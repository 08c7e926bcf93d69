"""SigLIP 2 / NaFlex against the real libraries, offline: Hugging Face ``Siglip2VisionModel`` and
timm ``NaFlexVit`` (``naflexvit_base_patch16_siglip``, ``naflexvit_so150m2_patch16_reg1_gap``),
each built small with every parameter seeded far from its init.

The reference is the library's own NaFlex forward on patches: ``pixel_values`` (B, N, p*p*C)
in its patch order with ``pixel_attention_mask`` and ``spatial_shapes`` (HF), or timm's dict of
``patches``, ``patch_coord`` and ``patch_valid``; images of another aspect ratio than the table
(12 x 20 patches against an 8 x 8 table: the table resized per image), fewer patches than the
table (the resize shrinks, antialiased), the table's own square grid, and padding slots that
only the mask keeps out. The canonical model runs on each image itself, at its own H x W.
Written back, each loads strictly with bitwise-equal tensors; HF and timm convert into each
other; an ONNX graph exported with ``--dynamic-size`` computes HF's output at two non-square
sizes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from conftest import STRUCTURAL_EDIT_KINDS, close_to, golden_path, seeded, structurally_edited
from vitconv.conversion.loading import load
from vitconv.errors import MappingError
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions, ReadOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

P = 4  # patch; the table is 8 x 8 patches (32 px)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=P,
              num_patches=64)
NAFLEX = dict(embed_dim=64, depth=2, num_heads=2, patch_size=P, pos_embed_grid_size=(8, 8))
#: patch grids (rows, columns): another aspect ratio (the table grows), fewer patches (it shrinks,
#: antialiased), the table's own square grid
GRIDS = ((12, 20), (3, 6), (8, 8))
SLOTS = 256  # patch slots per image in a NaFlex batch: more than any image has, the rest padding


def _image(rows, cols, seed=0):
    return torch.randn(1, 3, rows * P, cols * P, generator=torch.Generator().manual_seed(seed + 100 * rows + cols))


def _patches(x):
    """An NCHW image as (1, rows*cols, p*p*C) patches, each flattened (row, column, channel) as HF's
    ``convert_image_to_patches`` and timm's ``batch_patchify`` do."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // P, P, w // P, P).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // P) * (w // P), -1)


def _naflex_batch(images):
    """Every image's patches in one batch, padded to :data:`SLOTS`: values, validity, (row, col)."""
    values = torch.zeros(len(images), SLOTS, 3 * P * P)
    valid = torch.zeros(len(images), SLOTS, dtype=torch.bool)
    coord = torch.zeros(len(images), SLOTS, 2, dtype=torch.long)
    for i, x in enumerate(images):
        rows, cols = x.shape[-2] // P, x.shape[-1] // P
        values[i, :rows * cols] = _patches(x)[0]
        valid[i, :rows * cols] = True
        coord[i, :rows * cols] = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols),
                                                            indexing="ij"), -1).reshape(-1, 2)
    return values, valid, coord



def _same_files(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.fixture
def hf_siglip2(tmp_path):
    model = seeded(transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION)))
    model.save_pretrained(tmp_path / "src")
    return model


def _hf_pooled(model, images):
    values, valid, _ = _naflex_batch(images)
    shapes = torch.tensor([[x.shape[-2] // P, x.shape[-1] // P] for x in images])
    with torch.no_grad():
        return model(pixel_values=values, pixel_attention_mask=valid.long(), spatial_shapes=shapes).pooler_output


def test_hf_siglip2_reads_every_aspect_ratio_and_writes_back(hf_siglip2, tmp_path):
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    assert report.layout == "hf_siglip2"
    cfg = report.config
    assert (cfg.classifier, cfg.class_token, cfg.pos_resize, cfg.act, cfg.patch_size, cfg.image_size) == \
        ("map", False, "bilinear", "gelu_tanh", P, 32)
    assert not any("assumed" in n for n in report.notes), report.notes  # config.json records them
    ours = load(tmp_path / "c.safetensors")
    images = [_image(r, c) for r, c in GRIDS]
    want = _hf_pooled(hf_siglip2, images)  # one padded batch: three grids, 256 slots each
    with torch.no_grad():
        for i, x in enumerate(images):
            close_to(ours(x), want[i:i + 1])
    convert(tmp_path / "c.safetensors", tmp_path / "back", ConvertOptions(to="hf_siglip2"))
    again, info = transformers.Siglip2VisionModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    close_to(_hf_pooled(again.eval(), images), want)
    _same_files(tmp_path / "src" / "model.safetensors", tmp_path / "back" / "model.safetensors")


def test_hf_siglip2_without_padding_matches_at_12_by_20(hf_siglip2, tmp_path):
    """Every slot an image patch (no padding, mask all ones), as a processor with
    ``max_num_patches`` equal to the image's patches gives it."""
    convert(tmp_path / "src", tmp_path / "c.safetensors")
    x = _image(12, 20, seed=1)
    shapes = torch.tensor([[12, 20]])
    with torch.no_grad():
        want = hf_siglip2(pixel_values=_patches(x), pixel_attention_mask=torch.ones(1, 240, dtype=torch.long),
                          spatial_shapes=shapes).pooler_output
        close_to(load(tmp_path / "c.safetensors")(x), want)


def test_a_two_tower_siglip2_converts_its_vision_tower(tmp_path):
    model = transformers.Siglip2Model(transformers.Siglip2Config(
        vision_config=VISION, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=1)))
    seeded(model).save_pretrained(tmp_path / "full")
    report = convert(tmp_path / "full", tmp_path / "v.safetensors")
    assert report.layout == "hf_siglip2"
    assert any("left out (the text tower)" in n for n in report.notes), report.notes
    x = _image(12, 20)
    close_to(load(tmp_path / "v.safetensors")(x), _hf_pooled(model.vision_model, [x]))


def test_a_bare_siglip2_state_dict_says_what_it_assumed(hf_siglip2, tmp_path):
    """No config.json: the activation and epsilon are the code's defaults (said), the patch is
    read as 3 channels (said); given through --set where the model differs."""
    save_file({k: v.contiguous() for k, v in hf_siglip2.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    report = convert(tmp_path / "bare.safetensors", tmp_path / "c.safetensors")
    assert report.layout == "hf_siglip2"
    notes = " | ".join(report.notes)
    assert "act='gelu_tanh'" in notes and "norm_eps=1e-06" in notes and "assumed" in notes, notes
    assert "heads: 1 x 64 assumed" in notes, notes  # the weights do not record the heads
    assert "3 channels assumed" in notes, notes
    report = convert(tmp_path / "bare.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2,
                     overrides={"act": "gelu"}))
    assert report.config.act == "gelu" and "act='gelu' (given)" in " | ".join(report.notes)
    with pytest.raises(MappingError, match="pos_embed_prefix|class_token"):  # SigLIP 2 has no class token
        convert(golden_path("jax/tiny_token_p8_32.npz"), tmp_path / "x", ConvertOptions(to="hf_siglip2"))


def test_bad_siglip2_files_are_one_line_mapping_errors(hf_siglip2, tmp_path):
    """The source of the old ``internal error: IndexError``: SigLIP's rules read a 2-D patch
    kernel as a 4-D one. Malformed files of either shape are named in one line."""
    sd = {k: v.contiguous() for k, v in hf_siglip2.state_dict().items()}
    for name, change in (("odd", {"embeddings.patch_embedding.weight": torch.zeros(64, 47)}),
                         ("rank3", {"embeddings.patch_embedding.weight": torch.zeros(64, 3, 4)}),
                         ("table", {"embeddings.position_embedding.weight": torch.zeros(63, 64)})):
        save_file({**sd, **change}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(MappingError) as e:
            convert(tmp_path / f"{name}.safetensors", tmp_path / "c.safetensors")
        assert "\n" not in str(e.value) and f"{name}.safetensors" in str(e.value), e.value


# --------------------------------------------------------------------------- timm NaFlexVit
def _timm():
    from timm_import import import_timm

    return import_timm()


#: architecture -> (what the bare state dict cannot say, what the read must find)
NAFLEXVIT = {
    "naflexvit_base_patch16_siglip": ({"act": "gelu_tanh", "pos_resize": "bilinear"},
                                      dict(classifier="map", num_reg_tokens=0, num_classes=0)),
    "naflexvit_so150m2_patch16_reg1_gap": ({}, dict(classifier="gap", final_norm="pooled", num_reg_tokens=1,
                                                    pos_embed_prefix="none", layer_scale=True, qkv_bias=False,
                                                    pos_resize="bicubic_aa", num_classes=5)),
}


@pytest.mark.parametrize("arch", sorted(NAFLEXVIT))
def test_timm_naflexvit_reads_images_and_naflex_batches_and_writes_back(arch, tmp_path):
    unsaid, expect = NAFLEXVIT[arch]
    model = seeded(_timm().create_model(arch, pretrained=False, num_classes=expect["num_classes"], **NAFLEX))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    report = convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors",
                     ConvertOptions(num_heads=2, overrides=unsaid))
    assert report.layout == "timm_naflexvit"
    for field, value in expect.items():
        assert getattr(report.config, field) == value, field
    ours = load(tmp_path / "c.safetensors")
    images = [_image(r, c, seed=2) for r, c in GRIDS]
    values, valid, coord = _naflex_batch(images)
    with torch.no_grad():
        batch = model({"patches": values, "patch_valid": valid, "patch_coord": coord})
        for i, x in enumerate(images):
            close_to(ours(x), model(x))  # timm on the image: its own patchify and resize
            close_to(ours(x), batch[i:i + 1])  # timm's NaFlex batch, padded and masked
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm_naflexvit"))
    fresh = _timm().create_model(arch, pretrained=False, num_classes=expect["num_classes"], **NAFLEX)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(tmp_path / "back.safetensors")).items()},
                          strict=True)
    _same_files(tmp_path / "t.safetensors", tmp_path / "back.safetensors")


def test_a_bare_naflexvit_state_dict_takes_what_its_architectures_agree_on(tmp_path):
    """A bare NaFlexVit state dict records neither the activation nor the interpolation: where
    every timm architecture with its keys agrees (the two SigLIP ones: tanh GELU, bilinear) the
    table says them; where the fitting architectures differ (naflexvit_base_patch16_gap and its
    aspect-preserving twin, the same keys) the read is refused in one line naming both (--arch
    picks one at full size); factorized tables are refused by name."""
    timm = _timm()
    model = seeded(timm.create_model("naflexvit_base_patch16_siglip", pretrained=False, **NAFLEX))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    report = convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2))
    assert (report.config.act, report.config.pos_resize) == ("gelu_tanh", "bilinear")
    assert any("naflexvit_base_patch16_siglip" in n for n in report.notes), report.notes
    assert any("3 channels assumed" in n for n in report.notes), report.notes  # p*p*C is one number
    x = _image(12, 20, seed=5)
    with torch.no_grad():
        close_to(load(tmp_path / "c.safetensors")(x), model(x))
    report = convert(tmp_path / "c.safetensors", tmp_path / "w.safetensors", ConvertOptions(to="timm_naflexvit"))
    assert any("pos_embed_interp_mode='bilinear'" in n and "act_layer='gelu_tanh'" in n
               for n in report.notes), report.notes

    gap = seeded(timm.create_model("naflexvit_base_patch16_gap", pretrained=False, **NAFLEX))
    save_file({k: v.contiguous() for k, v in gap.state_dict().items()}, str(tmp_path / "g.safetensors"))
    with pytest.raises(MappingError, match="aspect-preserving position resize") as e:
        convert(tmp_path / "g.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2))
    assert "naflexvit_base_patch16_par_gap" in str(e.value) and "\n" not in str(e.value)

    fac = timm.create_model("naflexvit_base_patch16_parfac_gap", pretrained=False, **NAFLEX)
    save_file({k: v.contiguous() for k, v in fac.state_dict().items()}, str(tmp_path / "f.safetensors"))
    with pytest.raises(MappingError, match="factorized position embeddings"):
        convert(tmp_path / "f.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2))


def test_hf_siglip2_and_timm_naflexvit_convert_into_each_other(hf_siglip2, tmp_path):
    """The same SigLIP 2 tower in both libraries: HF's directory -> a timm NaFlexVit state dict
    that timm's own model (tanh GELU, bilinear resize) loads strictly and that computes HF's
    output on the same NaFlex batch; and back, bitwise."""
    convert(tmp_path / "src", tmp_path / "t.safetensors", ConvertOptions(to="timm_naflexvit"))
    model = _timm().create_model("naflexvit_base_patch16_siglip", pretrained=False, mlp_ratio=2, **NAFLEX)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(tmp_path / "t.safetensors")).items()},
                          strict=True)
    images = [_image(r, c, seed=3) for r, c in GRIDS]
    values, valid, coord = _naflex_batch(images)
    with torch.no_grad():
        close_to(model.eval()({"patches": values, "patch_valid": valid, "patch_coord": coord}),
               _hf_pooled(hf_siglip2, images))
    convert(tmp_path / "t.safetensors", tmp_path / "hf", ConvertOptions(to="hf_siglip2", num_heads=2,
            overrides={"act": "gelu_tanh", "pos_resize": "bilinear"}))
    _same_files(tmp_path / "src" / "model.safetensors", tmp_path / "hf" / "model.safetensors")


def test_onnx_dynamic_size_export_computes_siglip2_at_non_square_sizes(hf_siglip2, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from vitconv.runtime.export import ExportPlan, run_export

    convert(tmp_path / "src", tmp_path / "c.safetensors")
    (result,) = run_export(tmp_path / "c.safetensors", ExportPlan(onnx=tmp_path / "m.onnx", dynamic_size=True))
    assert result.ok, result
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for rows, cols in ((12, 20), (10, 6)):
        x = _image(rows, cols, seed=4)
        got = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])
        close_to(got, _hf_pooled(hf_siglip2, [x]))


# --------------------------------------------------------------------------- verify
def test_verify_runs_siglip2_and_naflexvit_as_their_own_references(hf_siglip2, tmp_path):
    """``vitconv verify``: the library's model is the reference (from_pretrained on NaFlex patches;
    timm's NaFlexVit built from what vitconv read), stage by stage, at the table's grid and at
    another one that each library resizes its own way; a fault planted in block 1 is named there."""
    from safetensors import safe_open

    from vitconv.verification.references.library import open_reference
    from vitconv.conversion.pipeline import open_checkpoint
    from vitconv.verification.verify import seeded_images, verify

    model = seeded(_timm().create_model("naflexvit_so150m2_patch16_reg1_gap", pretrained=False, num_classes=5,
                                        **NAFLEX))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    convert(tmp_path / "src", tmp_path / "c.safetensors")
    told = dict(num_heads=2, overrides={"pos_resize": "bicubic_aa"})  # what the bare file cannot say, said
    convert(tmp_path / "t.safetensors", tmp_path / "tc.safetensors", ConvertOptions(**told))
    library = {"Siglip2VisionModel": lambda x: _hf_pooled(hf_siglip2, list(x.split(1))), "NaFlexVit": model}
    for src, converted, told, what in ((tmp_path / "src", tmp_path / "c.safetensors", {}, "Siglip2VisionModel"),
                                       (tmp_path / "t.safetensors", tmp_path / "tc.safetensors", told, "NaFlexVit")):
        for size in (32, 56):
            report = verify(src, converted, image_size=size, **told)
            assert report.ok, report.lines()
            assert [s.name for s in report.stages] == ["embed", "blocks.0.mlp", "blocks.1.mlp", "logits"]
            assert what in report.reference
            # the reference is the library's function, not vitconv's: against the test's own model
            images = seeded_images(2, size, 3, 0)
            with open_checkpoint(src,
                                 ReadOptions(num_heads=told.get("num_heads"), overrides=told.get("overrides"))) as ckpt:
                got = open_reference(src, ckpt).forward_stages(images)["logits"]
            with torch.no_grad():
                want = library[what](torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
            close_to(torch.from_numpy(got), want, rel=1e-6)
        with safe_open(str(converted), "pt") as f:
            metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        state["blocks.1.mlp.fc2.bias"] = state["blocks.1.mlp.fc2.bias"] + 0.5
        save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
        bad = verify(src, tmp_path / "bad.safetensors", **told)
        assert not bad.ok and bad.first_failure.name == "blocks.1.mlp"


# --------------------------------------------------------------------------- bad inputs, edited
def _state(which):
    if which == "hf_siglip2":
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION))
    else:
        model = _timm().create_model("naflexvit_so150m2_patch16_reg1_gap", pretrained=False, num_classes=5, **NAFLEX)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


_STATES: dict = {}


@pytest.mark.parametrize("which", ["hf_siglip2", "timm_naflexvit"])
def test_edited_siglip2_and_naflexvit_state_dicts_fail_in_one_line(which):
    """A wrong or hand-edited file (a dimension, the rank, a missing or renamed key) is read to
    the end or refused with a one-line error naming it: never an internal error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from vitconv.errors import VitconvError
    from vitconv.formats.base import DictSource
    from vitconv.conversion.pipeline import open_checkpoint

    base = _STATES.setdefault(which, _state(which))

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(STRUCTURAL_EDIT_KINDS),
                                    st.integers(0, 70)), min_size=1, max_size=3))
    def run(edits):
        a = structurally_edited(base, edits)
        try:
            open_checkpoint("edited.safetensors",
                            ReadOptions(num_heads=2), source=DictSource(a, path="edited.safetensors")).state_dict()
        except VitconvError as e:
            assert str(e).startswith("edited.safetensors: ") and "\n" not in str(e), e

    run()


def test_a_siglip2_without_its_pooling_head_is_refused_by_name(tmp_path):
    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION, vision_use_head=False))
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(MappingError, match=r"without its attention-pooling head \(vision_use_head=False\)"):
        convert(tmp_path / "src", tmp_path / "c.safetensors")


@pytest.mark.parametrize("arch", sorted(NAFLEXVIT))
def test_a_timm_naflexvit_directory_builds_itself(arch, tmp_path):
    """Written as a directory, config.json records what a bare file cannot (the activation, the
    interpolation, the heads): ``timm.create_model('local-dir:…', pretrained=True)`` builds the
    model by itself and computes the source's NaFlex output; read back, nothing is assumed."""
    unsaid, expect = NAFLEXVIT[arch]
    timm = _timm()
    model = seeded(timm.create_model(arch, pretrained=False, num_classes=expect["num_classes"], **NAFLEX))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2, overrides=unsaid))
    convert(tmp_path / "c.safetensors", tmp_path / "dir", ConvertOptions(to="timm_naflexvit"))
    built = timm.create_model(f"local-dir:{tmp_path / 'dir'}", pretrained=True).eval()
    images = [_image(r, c, seed=6) for r, c in GRIDS]
    values, valid, coord = _naflex_batch(images)
    with torch.no_grad():
        close_to(built({"patches": values, "patch_valid": valid, "patch_coord": coord}),
               model({"patches": values, "patch_valid": valid, "patch_coord": coord}))
    report = convert(tmp_path / "dir", tmp_path / "again.safetensors")
    assert report.layout == "timm_naflexvit" and not any("assumed" in n for n in report.notes), report.notes
    assert (report.config.act, report.config.pos_resize, report.config.num_heads) == \
        (load(tmp_path / "c.safetensors").config.act, expect.get("pos_resize", "bilinear"), 2)
    _same_files(tmp_path / "t.safetensors", tmp_path / "dir" / "model.safetensors")
