"""Named architectures (vitconv/archs): a bare timm file is converted exactly, or refused naming
``--arch``; never converted to another function. The reference is timm's own forward on the
model that wrote the file; the table is checked against a fresh run of its generator."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import seeded
from timm_import import import_timm
from vitconv import archs, load
from vitconv.archs import generate
from vitconv.errors import BadInputError, MappingError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions
from vitconv.verification.verify import verify

timm = import_timm()

#: timm name -> depth kept (reduced; widths, patches and heads are the architecture's own)
CLIP = ("vit_base_patch16_clip_224", "vit_base_patch16_clip_quickgelu_224", "vit_large_patch14_clip_224")
PE = ("vit_pe_core_tiny_patch16_384", "vit_pe_spatial_tiny_patch16_512")
PLAIN = ("vit_base_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_dinov2", "vit_base_patch16_siglip_224",
         "vit_so400m_patch14_siglip_224")  # so400m: 16 heads of 72 from the table, not 18 of 64


def _bare(name, tmp_path, **kw):
    """A seeded timm model at depth 1 (weights, norms and biases far from init), saved bare. The
    embedding is small, as in trained CLIP towers, so the LayerNorm epsilon moves the output."""
    model = seeded(timm.create_model(name, pretrained=False, depth=1, **kw), scale=0.5)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k in ("patch_embed.proj.weight", "pos_embed", "cls_token", "reg_token"):
                p.mul_(0.01)
    src = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    return model, src


def _images(model):
    size = model.patch_embed.img_size[0]
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _gap(path, model, **kw):
    """max |vitconv(path) - timm| / max(1, |timm|) on the same images."""
    x = _images(model)
    with torch.no_grad():
        want = model(x)
        got = load(path, **kw)(x)
    return ((got - want).abs().max() / max(1.0, want.abs().max().item())).item()


@pytest.mark.parametrize("name", CLIP + PE)
def test_bare_file_is_refused_naming_arch_or_converted_exactly(name, tmp_path):
    model, src = _bare(name, tmp_path)
    try:
        convert(src, tmp_path / "c.safetensors")
    except MappingError as e:  # naming the choices, or what vitconv does not compute (PE core's pool)
        assert ("--arch" in e.message and "fit" in e.message) or "does not compute this feature" in e.message, \
            e.message
    else:  # converted: it must be timm's function
        assert _gap(tmp_path / "c.safetensors", model) <= 1e-5


@pytest.mark.parametrize("name", CLIP)
def test_clip_with_arch_converts_exactly_and_verifies(name, tmp_path):
    model, src = _bare(name, tmp_path)
    report = convert(src, tmp_path / "c.safetensors", ConvertOptions(overrides={"arch": name}))
    assert _gap(tmp_path / "c.safetensors", model) <= 1e-5
    assert any(f"from --arch {name}" in n for n in report.notes), report.notes
    with open_checkpoint(tmp_path / "c.safetensors") as ckpt:
        assert ckpt.source.metadata["vitconv_arch"] == name  # the output records it
    checked = verify(src, tmp_path / "c.safetensors", overrides={"arch": name})
    assert checked.ok, checked.verdict()
    assert checked.semantics["act"]["from"] == "--arch" and checked.semantics["norm_eps"]["from"] == "--arch"
    # the epsilon the file cannot record matters: timm's 1e-6 default would be another function
    wrong = _gap(src, model, act=archs.lookup(name).act, norm_eps=1e-6)
    assert wrong > 1e-3, wrong


@pytest.mark.parametrize("name", PE)
def test_perception_encoder_with_arch_converts_exactly(name, tmp_path):
    """Perception Encoder (timm Eva: EVA's 'cat' rotary angles offset by one, 'xy'; the core tower's
    attention pool with its own 8 heads): --arch supplies what the file cannot say."""
    model, src = _bare(name, tmp_path)
    convert(src, tmp_path / "c.safetensors", ConvertOptions(overrides={"arch": name}))
    assert _gap(tmp_path / "c.safetensors", model) <= 1e-5


def test_an_arch_vitconv_does_not_compute_is_refused_by_name(tmp_path):
    """Sapiens2 normalises queries and keys and shares key/value heads: refused naming that."""
    _, src = _bare("vit_base_patch16_sapiens2", tmp_path, num_kv_heads=6)
    with pytest.raises(MappingError, match="qk-norm"):
        convert(src, tmp_path / "c.safetensors", ConvertOptions(overrides={"arch": "vit_base_patch16_sapiens2"}))
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("name", PLAIN)
def test_plain_families_convert_exactly_without_flags(name, tmp_path):
    model, src = _bare(name, tmp_path)
    report = convert(src, tmp_path / "c.safetensors")
    assert _gap(tmp_path / "c.safetensors", model) <= 1e-5
    assert any("every architecture whose keys and shapes fit" in n and "none has this file's sizes" not in n
               for n in report.notes), report.notes


def test_convert_verify_fails_without_arch_and_passes_with_it(tmp_path):
    """The planted case of the issue: a bare CLIP tower whose eps and activation no weight records."""
    from _vitconv_cli.main import main

    name = "vit_base_patch16_clip_quickgelu_224"
    model, src = _bare(name, tmp_path)
    cli = CliRunner()
    bare = cli.invoke(main, ["convert", str(src), str(tmp_path / "a.safetensors"), "--verify"])
    assert bare.exit_code == 2 and "--arch vit_base_patch16_clip_quickgelu_224" in bare.output, bare.output
    assert not (tmp_path / "a.safetensors").exists()
    ok = cli.invoke(main, ["convert", str(src), str(tmp_path / "b.safetensors"), "--verify", "--arch", name])
    assert ok.exit_code == 0 and "verified  OK" in ok.output, ok.output
    assert _gap(tmp_path / "b.safetensors", model) <= 1e-5
    v = cli.invoke(main, ["verify", str(src), str(tmp_path / "b.safetensors"), "--arch", name, "--json"])
    assert v.exit_code == 0, v.output
    doc = json.loads(v.stdout)
    assert doc["ok"] and doc["arch"] == name and doc["semantics"]["act"] == {"value": "quick_gelu", "from": "--arch"}
    shown = cli.invoke(main, ["inspect", str(src), "--json"])
    assert shown.exit_code == 2 and name in json.loads(shown.stdout)["candidates"]


def test_verify_is_not_ok_where_the_reference_assumed(tmp_path):
    """Keys no table row has (class token + registers, no LayerScale): the activation and the
    pooling (a class token without fc_norm: 'token' or 'avg') are the timm code's defaults, and
    other timm architectures compute otherwise, so the stages agreeing proves nothing about
    them: not OK, naming the fields; with --set it is certified."""
    model = seeded(timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=1, reg_tokens=2, num_classes=10), 0.5)
    src = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    assert archs.fitting("timm", model.state_dict(), load(src).config)[0] == []
    report = verify(src)
    # timm's test_vit has width 64 with 2 heads: the 64-dim-head convention is unconfirmed too
    assert report.stages_ok and not report.ok and report.assumed == ["act", "classifier", "norm_eps", "num_heads"]
    assert report.verdict().startswith("NOT CERTIFIED") and "act='gelu'" in report.verdict()
    assert report.to_dict()["semantics"]["act"] == {"value": "gelu", "from": "assumed"}
    told = verify(src, overrides={"act": "gelu", "classifier": "token", "norm_eps": 1e-6}, num_heads=1)
    assert told.ok and told.semantics["act"]["from"] == "--set", told.verdict()


def test_arch_contradicting_the_tensors_is_refused_naming_both(tmp_path):
    _, src = _bare("vit_base_patch16_clip_224", tmp_path)
    with pytest.raises(BadInputError, match=r"has width 1024 \(the file: 768\)"):
        open_checkpoint(src, ReadOptions(overrides={"arch": "vit_large_patch14_clip_224"}))
    with pytest.raises(BadInputError, match="contradicts the file's keys: the file has norm_pre"):
        open_checkpoint(src, ReadOptions(overrides={"arch": "vit_base_patch16_224"}))
    with pytest.raises(BadInputError, match="nearest: vit_base_patch16_clip_224"):
        open_checkpoint(src, ReadOptions(overrides={"arch": "vit_base_patch16_clip_22"}))
    with pytest.raises(BadInputError, match="clip layout"):
        open_checkpoint(src, ReadOptions(overrides={"arch": "open_clip:ViT-B-16"}))


def test_set_decides_what_the_candidates_differ_in(tmp_path):
    """--set act picks the CLIP towers with that activation; their common eps (1e-5) follows."""
    model, src = _bare("vit_base_patch16_clip_quickgelu_224", tmp_path)
    with open_checkpoint(src, ReadOptions(overrides={"act": "quick_gelu"})) as ckpt:
        assert ckpt.config.norm_eps == 1e-5 and ckpt.semantics.sources["norm_eps"] == "table"
    assert _gap(src, model, act="quick_gelu") <= 1e-5


def test_shipped_table_matches_a_fresh_run_on_a_sample():
    """The generator, run now on a sample, gives the shipped rows (rerun it when a library adds models)."""
    doc = json.loads(archs.TABLE.read_text())
    shipped = {r["name"]: generate.unpack_row(doc, r) for r in doc["archs"]}
    assert doc["versions"]["timm"] == timm.__version__
    sample = ["vit_base_patch16_224", "vit_base_patch16_clip_quickgelu_224", "vit_pe_core_tiny_patch16_384",
              "vit_giant_patch14_dinov2", "deit_base_distilled_patch16_224", "vit_so400m_patch14_siglip_224"]
    for row in generate.timm_rows(sample):
        assert shipped[row["name"]] == row, row["name"]
    assert len([n for n in shipped if shipped[n]["source"] == "timm"]) == len(
        {n for m in generate.TIMM_MODULES for n in timm.list_models(module=m)})
    for row in generate.openclip_rows(["ViT-B-16", "ViT-B-16-quickgelu"]):
        assert shipped[row["name"]] == row, row["name"]


def test_batch_row_takes_arch(tmp_path):
    from vitconv.conversion.batch import read_manifest, run_row

    name = "vit_base_patch16_clip_224"
    model, src = _bare(name, tmp_path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"src": str(src), "dst": str(tmp_path / "o.safetensors"), "arch": name}) + "\n"
                        + json.dumps({"src": str(src), "dst": str(tmp_path / "p.safetensors")}) + "\n")
    rows = {r.line: run_row(r) for r in read_manifest(manifest)}
    assert rows[1].status == "ok" and rows[2].status == "failed" and "--arch" in rows[2].error
    assert _gap(tmp_path / "o.safetensors", model) <= 1e-5


def test_a_hub_directory_is_read_as_the_architecture_its_config_names(tmp_path):
    """A timm hub directory's config.json names the architecture and seldom its arguments: what
    the name implies (QuickGELU, eps 1e-5) comes from the table, as for --arch, with no flag."""
    name = "vit_base_patch16_clip_quickgelu_224"
    model, src = _bare(name, tmp_path)
    hub = tmp_path / "hub"
    hub.mkdir()
    src.rename(hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": name, "num_classes": model.num_classes,
                                                 "pretrained_cfg": {"input_size": [3, 224, 224]}}))
    with open_checkpoint(hub) as ckpt:
        assert ckpt.semantics.arch == name and ckpt.semantics.sources["act"] == "config"
    assert _gap(hub, model) <= 1e-5
    with pytest.raises(BadInputError, match="the file's config names vit_base_patch16_clip_quickgelu_224"):
        open_checkpoint(hub, ReadOptions(overrides={"arch": "vit_base_patch16_clip_224"}))


def test_a_google_file_leaves_nothing_open():
    """Google's code fixes its GELU and epsilon; the tensors say the rest: every field certified."""
    report = verify(archs.TABLE.parents[2] / "golden/jax/tiny_token_p8_32.npz")
    assert report.ok and not report.assumed and report.arch is None
    assert report.semantics["act"] == {"value": "gelu_tanh", "from": "fixed"}
    assert report.semantics["norm_eps"] == {"value": 1e-6, "from": "fixed"}
    assert report.semantics["num_heads"]["from"] == "file" and report.semantics["classifier"]["from"] == "file"


def test_predict_export_and_npz2pt_take_arch(tmp_path):
    from _vitconv_cli.main import main

    name = "vit_base_patch16_clip_224"
    _, src = _bare(name, tmp_path)
    image = archs.TABLE.parents[2] / "golden/images/shapes_64x48.png"
    cli = CliRunner()
    bare = cli.invoke(main, ["predict", str(src), str(image)])
    assert bare.exit_code == 2 and f"--arch {name}" in bare.output, bare.output
    named = cli.invoke(main, ["predict", str(src), str(image), "--arch", name, "--json"])
    assert named.exit_code == 0, named.output
    out = tmp_path / "e.safetensors"
    exported = cli.invoke(main, ["export", str(src), "--safetensors", str(out), "--arch", name])
    assert exported.exit_code == 0 and out.is_file(), exported.output
    assert load(out).config.norm_eps == 1e-5
    npz = archs.TABLE.parents[2] / "golden/jax/tiny_token_p8_32.npz"  # Google's code fixes all: nothing to name
    r = cli.invoke(main, ["npz2pt", str(npz), "-o", str(tmp_path / "g.pt"), "--arch", name])
    assert r.exit_code == 2 and "records its architecture's semantics" in r.output, r.output
