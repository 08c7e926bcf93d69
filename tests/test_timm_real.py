"""The timm layout against the real ``timm`` (1.0.x): files vitconv writes load into timm's
own ``VisionTransformer`` / DeiT ``VisionTransformerDistilled`` with ``strict=True`` and give
the same logits; timm's own state dicts read into the canonical model give timm's logits; and
Google's golden logits come out of timm when it runs weights vitconv converted."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CASES, golden_expected, golden_input, golden_path, seeded
from timm_import import import_timm
from vitconv.conversion.loading import load
from vitconv.errors import MappingError
from vitconv.formats.npz import NpzSource
from vitconv.conversion.pipeline import convert
from vitconv.conversion.options import ConvertOptions

timm = import_timm()
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=7)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _x(size=32, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("name", ["token_p8_32", "gap_p8_32", "token_p4_48"])
def test_google_golden_logits_come_out_of_real_timm(name, tmp_path):
    """npz -> timm state dict -> timm's own model (built by hand with Google's semantics:
    tanh GELU) -> Google's Flax logits."""
    case = CASES["tiny_" + name]
    convert(golden_path(case["checkpoint"]), tmp_path / "t.safetensors", ConvertOptions(to="timm"))
    kw = dict(img_size=golden_input(case).shape[-1], patch_size=int(name.split("_p")[1].split("_")[0]),
              embed_dim=48, depth=2, num_heads=3,
              mlp_ratio=2.0, num_classes=10, act_layer="gelu_tanh")
    if name.startswith("gap"):
        kw.update(class_token=False, global_pool="avg", fc_norm=False)
    model = VisionTransformer(**kw).eval()
    model.load_state_dict(load_file(tmp_path / "t.safetensors"), strict=True)
    with torch.no_grad():
        got = model(golden_input(case)).numpy()
    assert np.abs(got - golden_expected(case, "logits")).max() <= 2e-5


def test_timm_directory_loads_with_create_model_and_keeps_heads(tmp_path):
    """A timm directory (config.json + model.safetensors) builds through
    ``timm.create_model('local-dir:…')``; its config.json carries the head count, so reading
    it back needs no --num-heads and reproduces the golden .npz bit for bit."""
    case = CASES["tiny_token_p8_32"]
    src = golden_path(case["checkpoint"])
    report = convert(src, tmp_path / "tdir", ConvertOptions(to="timm"))
    assert f"timm.create_model('local-dir:{tmp_path / 'tdir'}', pretrained=True)" in " ".join(report.notes)
    cfg = json.loads((tmp_path / "tdir" / "config.json").read_text())
    assert cfg["model_args"]["act_layer"] == "gelu_tanh" and cfg["pretrained_cfg"]["mean"] == [0.5] * 3
    model = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    with torch.no_grad():
        got = model(golden_input(case)).numpy()
    assert np.abs(got - golden_expected(case, "logits")).max() <= 2e-5
    back = convert(tmp_path / "tdir", tmp_path / "back.npz")
    assert back.config.num_heads == 3 and not any(n.startswith("heads:") for n in back.notes)
    a, b = NpzSource(src), NpzSource(tmp_path / "back.npz")
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(np.array_equal(a.get(k), b.get(k)) for k in a.keys())


@pytest.mark.parametrize("kw", [
    dict(),
    dict(qkv_bias=False),
    dict(class_token=False, global_pool="avg", fc_norm=True),
    dict(class_token=False, global_pool="avg", fc_norm=False),
    dict(final_norm=False),
    dict(act_layer="gelu_tanh"),
], ids=["token", "no_qkv_bias", "avg_fc_norm", "avg_norm", "no_final_norm", "gelu_tanh"])
def test_timm_state_dicts_round_trip_and_match_timm_logits(kw, tmp_path):
    model = _randomize(VisionTransformer(**SMALL, **kw))
    _save(model, tmp_path / "src.safetensors")
    # timm's mean-pooled towers without fc_norm (plain and SigLIP) use exact or tanh GELU: said
    unsaid = {"act": "gelu"} if kw.get("fc_norm") is False else None
    convert(tmp_path / "src.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2, overrides=unsaid))
    ours = load(tmp_path / "c.safetensors")
    if kw.get("act_layer") == "gelu_tanh":  # a bare state dict cannot say so: what every named
        # architecture with these keys computes (exact GELU) is read; no table knows a custom call
        assert ours.config.act == "gelu"
        return
    with torch.no_grad():
        assert (ours(_x()) - model(_x())).abs().max().item() <= 1e-5
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(tmp_path / "src.safetensors"), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = VisionTransformer(**SMALL, **kw).eval()
    again.load_state_dict(b, strict=True)


def test_deit_distilled_reads_writes_and_matches_timm(tmp_path):
    """DeiT: dist_token after the class token, two heads averaged in eval mode."""
    model = _randomize(VisionTransformerDistilled(**SMALL))
    _save(model, tmp_path / "deit.safetensors")
    report = convert(tmp_path / "deit.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2))
    assert report.config.distilled and report.config.num_prefix_tokens == 2
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        want = model(_x())
        assert (ours(_x()) - want).abs().max().item() <= 1e-5
        # the mean of two different heads, not either head alone
        assert (model.head(model.forward_features(_x())[:, 0]) - want).abs().max().item() > 1e-2
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(tmp_path / "deit.safetensors"), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    convert(tmp_path / "c.safetensors", tmp_path / "ddir", ConvertOptions(to="timm"))
    built = timm.create_model(f"local-dir:{tmp_path / 'ddir'}", pretrained=True).eval()
    assert isinstance(built, VisionTransformerDistilled)
    with torch.no_grad():
        assert (built(_x()) - want).abs().max().item() <= 1e-5


def test_deit_at_another_resolution_resizes_both_prefix_tokens_out(tmp_path):
    """--image-size keeps both prefix rows (class and distillation) and resizes the grid;
    timm at the new size with the same table gives the same logits."""
    model = _randomize(VisionTransformerDistilled(**SMALL))
    _save(model, tmp_path / "deit.safetensors")
    convert(tmp_path / "deit.safetensors", tmp_path / "c48.safetensors", ConvertOptions(num_heads=2, image_size=48))
    ours = load(tmp_path / "c48.safetensors")
    pos = ours.pos_embed.detach()
    assert pos.shape == (1, 2 + 36, 128)
    assert torch.equal(pos[:, :2], model.pos_embed.detach()[:, :2])
    convert(tmp_path / "c48.safetensors", tmp_path / "t48.safetensors", ConvertOptions(to="timm"))
    big = VisionTransformerDistilled(**dict(SMALL, img_size=48)).eval()
    big.load_state_dict(load_file(tmp_path / "t48.safetensors"), strict=True)
    with torch.no_grad():
        assert (ours(_x(48)) - big(_x(48))).abs().max().item() <= 1e-5


@pytest.mark.parametrize("to", ["npz", "hf", "jeonsworld", "lucidrains"])
def test_deit_refused_by_layouts_without_a_distillation_token(to, tmp_path):
    model = _randomize(VisionTransformerDistilled(**SMALL))
    _save(model, tmp_path / "deit.safetensors")
    dst = tmp_path / ("out.npz" if to == "npz" else "out" if to == "hf" else "out.pth")
    with pytest.raises(MappingError, match="distillation"):
        convert(tmp_path / "deit.safetensors", dst, ConvertOptions(to=to, num_heads=2))
    assert not dst.exists()


def test_inspect_says_where_heads_and_activation_come_from(tmp_path):
    """A bare timm state dict does not record heads or activation: inspect says the heads are
    assumed and the activation is what every named architecture with its keys computes; a timm
    directory's config.json records both, and inspect names it."""
    from vitconv.tools.inspection import inspect_checkpoint

    model = _randomize(VisionTransformer(**SMALL))
    _save(model, tmp_path / "t.safetensors")
    bare = {a["name"]: a for a in inspect_checkpoint(tmp_path / "t.safetensors").to_dict()["architecture"]}
    assert bare["num_heads"]["source"].startswith("assumed: 64-dim heads")
    assert bare["act"]["source"].startswith("the architecture table: every architecture with these keys")
    convert(golden_path(CASES["tiny_token_p8_32"]["checkpoint"]), tmp_path / "tdir", ConvertOptions(to="timm"))
    rows = {a["name"]: a for a in inspect_checkpoint(tmp_path / "tdir").to_dict()["architecture"]}
    assert rows["num_heads"]["value"] == 3 and rows["num_heads"]["source"] == "config.json model_args.num_heads"
    assert rows["act"]["source"] == "config.json model_args.act_layer"
    assert rows["act"]["value"] == "gelu_tanh"


@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, global_pool="avg", fc_norm=True)],
                         ids=["token", "avg_fc_norm"])
def test_layer_scale_reads_writes_and_matches_timm(kw, tmp_path):
    """timm's init_values (DeiT-3, DINOv2): ls1/ls2.gamma read onto the canonical LayerScale
    give timm's logits; back to timm they load strictly and bit for bit; a timm directory
    rebuilds with create_model; layouts without LayerScale refuse it by name."""
    model = seeded(VisionTransformer(**SMALL, init_values=1e-5, **kw), scale=0.2, seed=3)
    _save(model, tmp_path / "ls.safetensors")
    report = convert(tmp_path / "ls.safetensors", tmp_path / "c.safetensors", ConvertOptions(num_heads=2))
    assert report.config.layer_scale
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        want = model(_x())
        assert (ours(_x()) - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
        flat = VisionTransformer(**SMALL, **kw).eval()  # the same weights without the scales
        flat.load_state_dict({k: v for k, v in model.state_dict().items() if ".ls" not in k})
        assert (flat(_x()) - want).abs().max().item() > 1e-2
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(tmp_path / "ls.safetensors"), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    VisionTransformer(**SMALL, init_values=1e-5, **kw).load_state_dict(b, strict=True)
    convert(tmp_path / "c.safetensors", tmp_path / "ldir", ConvertOptions(to="timm"))
    built = timm.create_model(f"local-dir:{tmp_path / 'ldir'}", pretrained=True).eval()
    with torch.no_grad():
        assert (built(_x()) - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    # HF ViT has no LayerScale; HF BEiT has, and is then the nearest HF layout: the refusal names
    # what BEiT lacks instead (no key bias; and for the avg model, its class token)
    for to, dst, said in (("npz", "x.npz", "layer_scale=True"), ("hf", "xhf", r"nearest, hf: layer_scale=True|nearest, hf_beit: .*key_bias=True"),
                          ("jeonsworld", "x.pth", "layer_scale=True")):
        with pytest.raises(MappingError, match=said):
            convert(tmp_path / "c.safetensors", tmp_path / dst, ConvertOptions(to=to))
