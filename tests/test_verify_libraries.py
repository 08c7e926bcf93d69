"""``verify`` for the sources that are not Google ``.npz`` files: the library's own model is the
reference (transformers' ``from_pretrained``, timm, the original DINOv2 code, OpenAI's
``clip/model.py``). Each source is built by its library at small width with every parameter
seeded far from init.

What makes these tests able to fail: the reference's final output is checked against the
library model the test built (not against vitconv), a fault planted in one block of the
converted file is named at that block and not before, and a resolution the library resizes
its own way is compared against that resize.

Weaker than the Google path, said here and in the report: a bare state dict (timm, DINOv2,
OpenAI CLIP) records no constructor arguments, so its library class is built with the
arguments vitconv read; a misreading of the file's *shapes* would make the strict load fail,
but semantics the file cannot record (epsilon, activation) come from vitconv on both sides.
Hugging Face and timm directories carry their config and are loaded by the library alone."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from cli.main import main as cli
from conftest import seeded
from test_original_families import _dinov2, _openai_clip, _openclip_transformer
from timm_import import import_timm
from vitconv.errors import BadInputError
from vitconv.verification.references.library import open_reference
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions
from vitconv.verification.verify import seeded_images, verify

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
timm = import_timm()

HF_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
STAGES = ["embed", "blocks.0.mlp", "blocks.1.mlp", "logits"]


def _nchw(size, seed=0):
    return torch.from_numpy(seeded_images(2, size, 3, seed).transpose(0, 3, 1, 2).copy())


def _planted(path, out, key="blocks.1.mlp.fc2.bias", by=0.5):
    """The converted file with one tensor of block 1 moved: verify must name block 1."""
    with safe_open(str(path), "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state[key] = state[key] + by
    save_file(state, str(out), metadata=metadata)
    return out


def _check(src, converted, size=None, reference="", **told):
    report = verify(src, converted, image_size=size, **told)
    assert report.ok, report.lines()
    assert [s.name for s in report.stages] == STAGES
    assert reference in report.reference
    return report


# (factory, transformers output that is the model's output, flag at another resolution)
HF = {
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, mlp_ratio=2)),
        lambda o: o.pooler_output, {}),
    "clip_proj": (lambda: transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **HF_VISION, projection_dim=24)), lambda o: o.image_embeds, {"interpolate_pos_encoding": True}),
    "siglip": (lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**HF_VISION)),
               lambda o: o.pooler_output, {"interpolate_pos_encoding": True}),
}


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_directory_is_its_own_reference(name, tmp_path):
    make, output, flag = HF[name]
    model = seeded(make()).eval()
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "c.safetensors")
    for size in (32, 48):  # 48: transformers' own resize of the table against vitconv's
        report = _check(tmp_path / "src", tmp_path / "c.safetensors", size, "from_pretrained")
        with torch.no_grad():
            want = output(model(pixel_values=_nchw(size), **(flag if size != 32 else {}))).numpy()
        with open_checkpoint(tmp_path / "src") as ckpt:
            ref = open_reference(tmp_path / "src", ckpt)
        got = ref.forward_stages(seeded_images(2, size, 3, 0))["logits"]
        assert np.abs(got - want).max() <= 1e-6 * max(1, np.abs(want).max())
        assert report.stages[-1].max_abs <= 1e-5 * max(1, np.abs(want).max())
    bad = verify(tmp_path / "src", _planted(tmp_path / "c.safetensors", tmp_path / "bad.safetensors"))
    assert not bad.ok and bad.first_failure.name == "blocks.1.mlp"
    assert all(s.ok for s in bad.stages[:2])


def _timm(arch, **kw):
    return seeded(timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, embed_dim=128, depth=2,
                                    num_heads=2, **kw), scale=0.2).eval()


#: what a bare file of each cannot record and its keys leave open at this width (timm's SigLIP
#: towers use exact or tanh GELU)
UNSAID = {"vit_base_patch16_siglip_224": {"act": "gelu"}}


@pytest.mark.parametrize("arch", ["vit_small_patch14_reg4_dinov2", "vit_base_patch16_siglip_224",
                                  "deit3_small_patch16_224"])
def test_timm_state_dict_and_directory(arch, tmp_path):
    model = _timm(arch)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    told = {"overrides": UNSAID[arch]} if arch in UNSAID else {}
    convert(tmp_path / "m.safetensors", tmp_path / "c.safetensors", ConvertOptions(**told))
    for size in (32, 48):  # timm's dynamic_img_size resize at 48
        report = _check(tmp_path / "m.safetensors", tmp_path / "c.safetensors", size, "arguments vitconv read",
                        **told)
        with torch.no_grad():
            want = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, embed_dim=128, depth=2,
                                     num_heads=2, dynamic_img_size=True)
            want.load_state_dict(model.state_dict())
            want = want.eval()(_nchw(size)).numpy()
        assert report.stages[-1].max_abs <= 1e-5 * max(1, np.abs(want).max())
    convert(tmp_path / "c.safetensors", tmp_path / "dir",
            ConvertOptions(to="timm"))  # config.json names the architecture
    _check(tmp_path / "dir", tmp_path / "c.safetensors", None, "local-dir")
    bad = verify(tmp_path / "dir", _planted(tmp_path / "c.safetensors", tmp_path / "bad.safetensors"))
    assert bad.first_failure.name == "blocks.1.mlp"


def test_original_dinov2_and_openai_clip(tmp_path):
    dino = seeded(_dinov2(ffn_layer="swiglufused")).eval()
    torch.save(dino.state_dict(), tmp_path / "dinov2.pth")
    convert(tmp_path / "dinov2.pth", tmp_path / "d.safetensors")
    for size in (32, 48):  # 48: DINOv2's own interpolate_pos_encoding (+0.1 offset)
        report = _check(tmp_path / "dinov2.pth", tmp_path / "d.safetensors", size, "DinoVisionTransformer")
        with torch.no_grad():
            want = dino(_nchw(size)).numpy()
        assert report.stages[-1].max_abs <= 1e-5 * max(1, np.abs(want).max())
    clip = seeded(_openai_clip()).eval()
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    openai = {"act": "quick_gelu"}  # OpenCLIP's GELU towers have these keys too
    convert(tmp_path / "clip.pt", tmp_path / "c.safetensors", ConvertOptions(overrides=openai))
    report = _check(tmp_path / "clip.pt", tmp_path / "c.safetensors", None, "clip/model.py", overrides=openai)
    with torch.no_grad():
        want = clip(_nchw(32)).numpy()
    assert report.stages[-1].max_abs <= 1e-5 * max(1, np.abs(want).max())
    with pytest.raises(BadInputError, match="runs at the checkpoint's 32px only"):
        verify(tmp_path / "clip.pt", tmp_path / "c.safetensors", image_size=48, overrides=openai)
    bad = verify(tmp_path / "clip.pt", _planted(tmp_path / "c.safetensors", tmp_path / "bad.safetensors",
                                                 "blocks.0.attn.proj.weight", 0.1), overrides=openai)
    assert bad.first_failure.name == "blocks.0.mlp"


def test_cli_verifies_a_directory_and_says_what_the_reference_is(tmp_path):
    model = seeded(HF["siglip"][0]()).eval()
    model.save_pretrained(tmp_path / "src")
    runner = CliRunner()
    r = runner.invoke(cli, ["verify", str(tmp_path / "src")])
    assert r.exit_code == 0, r.output
    assert "transformers SiglipVisionModel.from_pretrained" in r.output and "OK: 4 stage(s)" in r.output
    assert "Loading weights" not in r.output


def test_no_reference_and_missing_library_are_one_line_errors(tmp_path, monkeypatch):
    model = seeded(HF["siglip"][0]()).eval()
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "c.safetensors")
    runner = CliRunner()
    r = runner.invoke(cli, ["verify", str(tmp_path / "c.safetensors")])  # a canonical file has no other model
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "no reference for the canonical layout" in r.output
    monkeypatch.setitem(sys.modules, "transformers", None)
    r = runner.invoke(cli, ["verify", str(tmp_path / "src"), str(tmp_path / "c.safetensors")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "the source's own library, transformers, and it is not importable" in r.output and "pip install transformers" in r.output


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_openclip_tower_needs_what_the_file_cannot_say(pool, tmp_path):
    """OpenCLIP's exact GELU and mean pooling are in no weight: converted with --set, verified
    with the same --set against OpenCLIP's own VisionTransformer. Unsaid, the activation is the
    one every OpenCLIP tower with LayerScale has (exact GELU, from the table); a wrong --set
    act=quick_gelu is what the reference then computes, and the converted file fails at block 0."""
    oct = _openclip_transformer()
    model = seeded(oct.VisionTransformer(image_size=32, patch_size=8, width=128, layers=2, heads=2, mlp_ratio=4.0,
                                         output_dim=24, ls_init_value=0.5, pool_type=pool)).eval()
    torch.save(model.state_dict(), tmp_path / "oc.pt")
    overrides = {"act": "gelu", **({"classifier": "gap"} if pool == "avg" else {})}
    convert(tmp_path / "oc.pt", tmp_path / "c.safetensors", ConvertOptions(overrides=overrides))
    report = verify(tmp_path / "oc.pt", tmp_path / "c.safetensors", overrides=overrides)
    assert report.ok and "OpenCLIP's VisionTransformer" in report.reference, report.lines()
    with torch.no_grad():
        want = model(_nchw(32)).numpy()
    assert report.stages[-1].max_abs <= 1e-5 * max(1, np.abs(want).max())
    if pool == "tok":
        unsaid = verify(tmp_path / "oc.pt", tmp_path / "c.safetensors")
        assert unsaid.ok and unsaid.semantics["act"] == {"value": "gelu", "from": "table"}, unsaid.verdict()
        wrong = verify(tmp_path / "oc.pt", tmp_path / "c.safetensors", overrides={"act": "quick_gelu"})
        assert wrong.first_failure.name == "blocks.0.mlp"
        r = CliRunner().invoke(cli, ["verify", str(tmp_path / "oc.pt"), str(tmp_path / "c.safetensors"),
                                     "--set", "act=gelu"])
        assert r.exit_code == 0 and "OK: 4 stage(s)" in r.output, r.output
