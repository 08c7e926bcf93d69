"""BEiT's relative position bias against the real libraries: timm 1.0.31's ``Beit`` (BEiT, BEiT-v2,
a shared table with an absolute one) and transformers' ``BeitModel`` / ``Data2VecVisionModel``.

Each model is built by its library at small width with every parameter seeded far from its
init (``seeded``: ``gamma_1``/``gamma_2`` and ``lambda_1``/``lambda_2`` log-uniform over 2e-4..11;
the relative tables N(0, 0.3^2)), and its own forward is the
reference: at the checkpoint's resolution, and at others where the library resizes the tables
its own way. timm's ``Beit`` has no dynamic size: a model built for the other ``img_size``
loads the weights through timm's ``checkpoint_filter_fn`` (geometric resize of the relative
tables); transformers resizes bilinearly at run time. Written back, the weights load strictly
and bit for bit."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import close_to, save_state, seeded
from timm_import import import_timm
from vitconv.conversion.loading import load
from vitconv.errors import MappingError
from vitconv.model import VisionTransformer
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions

timm = import_timm()
from timm.models.beit import checkpoint_filter_fn  # noqa: E402 (after the torchvision placeholder)

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
#: name -> (timm architecture, extra arguments, what must be read)
TIMM = {
    "beit": ("beit_base_patch16_224", dict(num_classes=10),
             dict(rel_pos_bias=True, abs_pos_embed=False, layer_scale=True, classifier="gap", final_norm="pooled")),
    "beitv2": ("beitv2_base_patch16_224", dict(num_classes=0), dict(rel_pos_bias=True, num_classes=0)),
    "shared_abs_token": ("beit_base_patch16_224", dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                       use_abs_pos_emb=True, global_pool="token", num_classes=10),
                         dict(rel_pos_bias=False, rel_pos_bias_shared=True, abs_pos_embed=True, classifier="token",
                              final_norm="encoder", pos_resize="bicubic_aa")),
    "both_tables": ("beit_base_patch16_224", dict(use_shared_rel_pos_bias=True, init_values=0.0, num_classes=10),
                    dict(rel_pos_bias=True, rel_pos_bias_shared=True, layer_scale=False)),
}
#: other inputs (height, width): larger, smaller, not square
SIZES = [(48, 48), (24, 24), (32, 48)]




def _x(h, w=None):
    return torch.randn(2, 3, h, w or h, generator=torch.Generator().manual_seed(h * 100 + (w or h)))



def _timm_at(arch, extra, state, size):
    """timm's own model for another input size: built for it, the weights loaded through
    ``checkpoint_filter_fn`` (which resizes the tables as timm does for a pretrained model)."""
    model = timm.create_model(arch, pretrained=False, **{**SMALL, "img_size": size}, **extra).eval()
    model.load_state_dict(checkpoint_filter_fn(dict(state), model), strict=True)
    return model



@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_beit_reads_resizes_and_writes_back(name, tmp_path):
    arch, extra, expect = TIMM[name]
    model = seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra))
    save_state(model, tmp_path / "src.safetensors")
    report = convert(tmp_path / "src.safetensors", tmp_path / "c.safetensors")
    assert report.layout == "timm_beit"
    for field, value in expect.items():
        assert getattr(report.config, field) == value, field
    assert (report.config.num_heads, report.config.rel_pos_resize) == (2, "geometric")
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        close_to(ours(_x(32)), model(_x(32)))
        for size in SIZES:  # timm resizing its tables its own way
            want = _timm_at(arch, extra, model.state_dict(), size)(_x(*size))
            close_to(ours(_x(*size)), want)
        # converted for 48 px, as timm loads it into a 48 px model
        want = _timm_at(arch, extra, model.state_dict(), 48)(_x(48))
        close_to(load(tmp_path / "c.safetensors", image_size=48)(_x(48)), want)
    # back to timm: strict, bit for bit
    back = convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    assert back.target_layout == "timm_beit"
    a, b = load_file(str(tmp_path / "src.safetensors")), load_file(str(tmp_path / "back.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timm.create_model(arch, pretrained=False, **SMALL, **extra).load_state_dict(b, strict=True)


def test_the_resize_is_the_sources_own():
    """At another grid, the two libraries' resizes of one table differ far beyond rounding: the
    converted model must follow its source's (``rel_pos_resize``)."""
    arch, extra, _ = TIMM["beit"]
    model = seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra))
    with open_checkpoint_of(model) as ckpt:
        cfg, state = ckpt.config, {k: torch.from_numpy(v) for k, v in ckpt.state_dict().items()}
    want = _timm_at(arch, extra, model.state_dict(), 48)(_x(48)).detach()
    for mode, close in (("geometric", True), ("bilinear", False)):
        ours = VisionTransformer(cfg.replace(rel_pos_resize=mode)).eval()
        ours.load_state_dict(state, strict=True)
        with torch.no_grad():
            err = (ours(_x(48)) - want).abs().max().item()
        assert (err <= 1e-5 * max(1.0, want.abs().max().item())) == close, (mode, err)
        assert close or err > 1e-3


class open_checkpoint_of:
    """A timm model's state dict, saved to a temporary file and opened (a context manager)."""

    def __init__(self, model):
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "m.safetensors")
        save_state(model, self.path)

    def __enter__(self):
        self.ckpt = open_checkpoint(self.path)
        return self.ckpt

    def __exit__(self, *exc):
        self.ckpt.close()
        self.dir.cleanup()


def test_a_bare_timm_beit_state_dict_says_what_it_assumes(tmp_path):
    """The file records the heads (the tables' columns) and the grid (their rows), not the
    LayerNorm epsilon: 1e-6 (timm's LayerNorm, what every timm BEiT architecture uses) is taken and
    said, and ``--set norm_eps`` reads a
    model built with another ``norm_layer`` (here 1e-2, far enough to move the output). timm's Beit always uses exact GELU: another activation
    can be neither set nor written, and neither can the head count."""
    from functools import partial

    from torch import nn

    from vitconv.errors import BadInputError

    arch, extra, _ = TIMM["beit"]
    model = seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra,
                                    norm_layer=partial(nn.LayerNorm, eps=1e-2)))
    save_state(model, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as c:
        assert c.config.norm_eps == 1e-6
        # said, with the timm architectures whose keys fit (every one of them 1e-6)
        assert any("norm_eps=1e-06: what every architecture with these keys computes (7: beit_base"
                   in n for n in c.notes), c.notes
    with torch.no_grad():
        want = model(_x(32))
        assert (load(tmp_path / "m.safetensors")(_x(32)) - want).abs().max().item() > 1e-4
        close_to(load(tmp_path / "m.safetensors", norm_eps=1e-2)(_x(32)), want)
    for field, value in (("act", "gelu_tanh"), ("rel_pos_resize", "bilinear")):
        with pytest.raises(BadInputError, match=f"--set {field}: the timm_beit layout reads it from the file"):
            open_checkpoint(tmp_path / "m.safetensors", ReadOptions(overrides={field: value}))
    with pytest.raises(BadInputError, match="num_heads|heads"):
        open_checkpoint(tmp_path / "m.safetensors", ReadOptions(num_heads=4))
    # written, the notes name the norm_layer timm needs
    report = convert(tmp_path / "m.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm",
                     overrides={"norm_eps": 1e-2}))
    assert any("norm_layer=partial(nn.LayerNorm, eps=0.01)" in n for n in report.notes), report.notes


def test_a_key_bias_beit_cannot_hold_is_refused_by_name(tmp_path):
    """BEiT's key projection has no bias: canonical ``qkv.bias`` holds a zero key third, and a
    model whose key third is not zero is refused when written as BEiT, naming the tensor."""
    arch, extra, _ = TIMM["beit"]
    save_state(seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra)), tmp_path / "src.safetensors")
    convert(tmp_path / "src.safetensors", tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["blocks.1.attn.qkv.bias"][64 + 3] = 0.5
    save_file(tensors, str(tmp_path / "k.safetensors"), metadata=meta)
    with pytest.raises(MappingError, match=r"blocks\.1\.attn\.qkv\.bias.*key third is not zero") as e:
        convert(tmp_path / "k.safetensors", tmp_path / "out.safetensors", ConvertOptions(to="timm"))
    assert "\n" not in str(e.value) and not (tmp_path / "out.safetensors").exists()


def test_a_plain_vit_is_not_written_as_beit(tmp_path):
    """``--to timm`` writes a model without relative tables as timm's VisionTransformer."""
    from conftest import golden_path

    report = convert(golden_path("jax/tiny_gap_p8_32.npz"), tmp_path / "t.safetensors", ConvertOptions(to="timm"))
    assert report.target_layout == "timm"


# ---------------------------------------------------------------------------- Hugging Face
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
                patch_size=8)
#: name -> (model class, config class, config, output, --to, layout, what must be read)
HF = {
    "beit": ("BeitModel", "BeitConfig", dict(use_relative_position_bias=True), "pooler_output", "hf", "hf_beit",
             dict(rel_pos_bias=True, classifier="gap", final_norm="pooled", layer_scale=True, num_classes=0)),
    "beit_shared_abs_token": ("BeitModel", "BeitConfig", dict(use_shared_relative_position_bias=True,
                              use_absolute_position_embeddings=True, use_mean_pooling=False), "pooler_output", "hf",
                              "hf_beit", dict(rel_pos_bias_shared=True, abs_pos_embed=True, classifier="token",
                                              final_norm="encoder", pos_resize="bicubic")),
    "beit_cls_both_tables": ("BeitForImageClassification", "BeitConfig", dict(
        use_relative_position_bias=True, use_shared_relative_position_bias=True, layer_scale_init_value=0.0,
        num_labels=7), "logits", "hf", "hf_beit_cls", dict(rel_pos_bias=True, rel_pos_bias_shared=True,
                                                             layer_scale=False, num_classes=7)),
    # Data2VecVisionModel has no pooler by default: with mean pooling, no final norm at all
    "data2vec": ("Data2VecVisionModel", "Data2VecVisionConfig", dict(use_relative_position_bias=True),
                 "last_hidden_state", "hf_data2vec_vision", "hf_data2vec_vision",
                 dict(rel_pos_bias=True, classifier="gap", final_norm="none")),
    "data2vec_pooler": ("Data2VecVisionModel", "Data2VecVisionConfig", dict(use_relative_position_bias=True),
                        "pooler_output", "hf_data2vec_vision", "hf_data2vec_vision",
                        dict(rel_pos_bias=True, classifier="gap", final_norm="pooled")),
    "data2vec_cls_shared": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig", dict(
        use_shared_relative_position_bias=True, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_labels=7),
        "logits", "hf_data2vec_vision", "hf_data2vec_vision_cls", dict(rel_pos_bias_shared=True, act="gelu_tanh",
                                                                       norm_eps=1e-6, num_classes=7)),
}


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_beit_reads_resizes_and_writes_back(name, tmp_path):
    cls, config_cls, kw, output, to, layout, expect = HF[name]
    pooler = {"add_pooling_layer": True} if name == "data2vec_pooler" else {}
    model = seeded(getattr(transformers, cls)(getattr(transformers, config_cls)(**HF_SMALL, **kw), **pooler))
    model.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    assert report.layout == layout and not any("assumed" in n for n in report.notes), report.notes
    for field, value in expect.items():
        assert getattr(report.config, field) == value, field
    assert report.config.rel_pos_resize == "bilinear"
    canonical = load(tmp_path / "c.safetensors")
    ours = canonical.forward_features if output == "last_hidden_state" else canonical
    with torch.no_grad():
        close_to(ours(_x(32)), getattr(model(pixel_values=_x(32)), output))
        for size in SIZES:  # transformers resizing its tables its own way
            want = getattr(model(pixel_values=_x(*size), interpolate_pos_encoding=True), output)
            close_to(ours(_x(*size)), want)
            close_to(ours(_x(*size)), getattr(model(pixel_values=_x(*size)), output))  # the flag changes nothing
        at48 = load(tmp_path / "c.safetensors", image_size=48)
        close_to((at48.forward_features if output == "last_hidden_state" else at48)(_x(48)),
               getattr(model(pixel_values=_x(48), interpolate_pos_encoding=True), output))
    back = convert(tmp_path / "c.safetensors", tmp_path / "back", ConvertOptions(to=to))
    assert back.target_layout == layout
    again, info = type(model).from_pretrained(tmp_path / "back", output_loading_info=True, **pooler)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        close_to(getattr(again.eval()(pixel_values=_x(32)), output), getattr(model(pixel_values=_x(32)), output))
    a = load_file(str(tmp_path / "src" / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bare_hf_beit_file_without_relative_tables_says_its_heads_are_assumed(tmp_path):
    """BeitModel's weights alone: the relative tables record the head count (a column per head);
    with an absolute table only nothing does, so a read says the 64-dim heads it assumed and takes
    --num-heads; with tables --num-heads must agree with them."""
    model = seeded(transformers.BeitModel(transformers.BeitConfig(**HF_SMALL, use_absolute_position_embeddings=True)))
    model.save_pretrained(tmp_path / "src")
    bare = tmp_path / "model.safetensors"
    bare.write_bytes((tmp_path / "src" / "model.safetensors").read_bytes())
    with open_checkpoint(bare) as c:
        assert c.config.num_heads == 1 and any("heads: 1 x 64 assumed" in n for n in c.notes), c.notes
    convert(bare, tmp_path / "c.safetensors", ConvertOptions(num_heads=2))
    with torch.no_grad():
        close_to(load(tmp_path / "c.safetensors")(_x(32)), model(pixel_values=_x(32)).pooler_output)
    tables = seeded(transformers.BeitModel(transformers.BeitConfig(**HF_SMALL, use_relative_position_bias=True)))
    tables.save_pretrained(tmp_path / "rel")
    with open_checkpoint(tmp_path / "rel" / "model.safetensors") as c:
        assert c.config.num_heads == 2 and not any("heads" in n for n in c.notes), c.notes
    with pytest.raises(MappingError, match="num_heads=3, but the checkpoint records 2 heads"):
        open_checkpoint(tmp_path / "rel" / "model.safetensors", ReadOptions(num_heads=3))


def test_timm_beit_and_hf_beit_convert_into_each_other(tmp_path):
    """timm's BEiT written as a Hugging Face directory computes timm's logits in transformers
    (config.json carries timm's epsilon and exact GELU; transformers' defaults would be 1e-12);
    a transformers BEiT written for timm loads strictly into a timm Beit built with its epsilon
    and computes its pooler_output. At other grids each library resizes its own way, and the
    notes say the written model will resize as its new library does."""
    from functools import partial

    from torch import nn

    arch, extra, _ = TIMM["beit"]
    tm = seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra))
    save_state(tm, tmp_path / "t.safetensors")
    report = convert(tmp_path / "t.safetensors", tmp_path / "hf", ConvertOptions(to="hf"))
    assert report.target_layout == "hf_beit_cls"
    assert any("rel_pos_resize='geometric'" in n for n in report.notes), report.notes
    hf, info = transformers.BeitForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        close_to(hf.eval()(pixel_values=_x(32)).logits, tm(_x(32)))
    # and back: bit for bit
    convert(tmp_path / "hf", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(str(tmp_path / "t.safetensors")), load_file(str(tmp_path / "back.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    cls, config_cls, kw, output, _, _, _ = HF["beit"]
    hm = seeded(transformers.BeitModel(transformers.BeitConfig(**HF_SMALL, **kw)))
    hm.save_pretrained(tmp_path / "h")
    report = convert(tmp_path / "h", tmp_path / "h.safetensors", ConvertOptions(to="timm"))
    assert any("norm_layer=partial(nn.LayerNorm, eps=1e-12)" in n for n in report.notes), report.notes
    built = timm.create_model(arch, pretrained=False, **SMALL, num_classes=0, mlp_ratio=2,
                              norm_layer=partial(nn.LayerNorm, eps=1e-12)).eval()
    built.load_state_dict(load_file(str(tmp_path / "h.safetensors")), strict=True)
    with torch.no_grad():
        close_to(built(_x(32)), hm(pixel_values=_x(32)).pooler_output)


# ---------------------------------------------------------------------------- ONNX
def _ort(path, x):
    import onnxruntime as ort

    return torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})[0])


def test_timm_beit_exports_to_onnx_and_torchscript_with_dynamic_size(tmp_path):
    """One graph builds the index and resizes the tables for any grid, timm's way: its bisection of
    the offsets' ratio is unrolled in the graph (it takes the same number of steps for every
    size). At sizes it never saw, square or not, the ONNX and TorchScript artifacts compute what
    timm computes with a model built for that size."""
    pytest.importorskip("onnxruntime")
    from vitconv.runtime.export import ExportPlan, run_export

    arch, extra, _ = TIMM["beit"]
    model = seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra))
    save_state(model, tmp_path / "t.safetensors")
    results = run_export(tmp_path / "t.safetensors", ExportPlan(onnx=tmp_path / "m.onnx", torchscript=tmp_path / "m.ts",
                                                                dynamic_size=True))
    assert all(r.ok for r in results) and {p.size for r in results for p in r.parity} == {32, 40, 56}
    traced = torch.jit.load(str(tmp_path / "m.ts"))
    with torch.no_grad():
        for size in ((32, 32), (48, 48), (32, 48), (24, 40)):
            want = _timm_at(arch, extra, model.state_dict(), size)(_x(*size))
            close_to(_ort(tmp_path / "m.onnx", _x(*size)), want)
            close_to(traced(_x(*size)), want)


def test_hf_beit_exports_to_onnx_with_dynamic_size(tmp_path):
    """transformers' bilinear resize follows symbolic sizes: one graph builds the index and
    resizes both tables (and the absolute one) for any grid, and computes transformers' output
    at sizes it never saw, square or not."""
    pytest.importorskip("onnxruntime")
    from vitconv.runtime.export import ExportPlan, run_export

    model = seeded(transformers.BeitForImageClassification(transformers.BeitConfig(
        **HF_SMALL, use_relative_position_bias=True, use_shared_relative_position_bias=True,
        use_absolute_position_embeddings=True, num_labels=7)))
    model.save_pretrained(tmp_path / "src")
    (result,) = run_export(tmp_path / "src", ExportPlan(onnx=tmp_path / "m.onnx", dynamic_size=True))
    assert result.ok and {p.size for p in result.parity} == {32, 40, 56}
    with torch.no_grad():
        for size in ((32, 32), (48, 48), (32, 48)):
            want = model(pixel_values=_x(*size), interpolate_pos_encoding=True).logits
            close_to(_ort(tmp_path / "m.onnx", _x(*size)), want)


# ---------------------------------------------------------------------------- verify
@pytest.mark.parametrize("name", ["timm", "beit", "data2vec"])
def test_verify_runs_the_source_library_and_names_a_planted_table(name, tmp_path):
    """``vitconv verify`` takes the source's own library as its reference (timm's Beit built with
    what vitconv read, at its own size only; transformers' from_pretrained, also at 48 px, with
    data2vec's pooler-less model as it loads by default); one offset of block 1's relative table
    moved in the converted file is named as block 1."""
    from vitconv.verification.verify import verify

    if name == "timm":
        arch, extra, _ = TIMM["beit"]
        save_state(seeded(timm.create_model(arch, pretrained=False, **SMALL, **extra)), tmp_path / "src.safetensors")
        src, sizes, says = tmp_path / "src.safetensors", (32,), "timm's Beit"
    else:
        cls, config_cls, kw, *_ = HF[name]
        seeded(getattr(transformers, cls)(getattr(transformers, config_cls)(**HF_SMALL, **kw))).save_pretrained(
            tmp_path / "src")
        src, sizes, says = tmp_path / "src", (32, 48), f"{cls}.from_pretrained"
    convert(src, tmp_path / "c.safetensors")
    for size in sizes:
        report = verify(src, tmp_path / "c.safetensors", image_size=size)
        assert report.ok and says in report.reference, report.lines()
        assert [s.name for s in report.stages] == ["embed", "blocks.0.mlp", "blocks.1.mlp", "logits"]
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state["blocks.1.attn.rel_pos_table"][0] += 2.0  # one offset (the same shift everywhere cancels in softmax)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=meta)
    bad = verify(src, tmp_path / "bad.safetensors")
    assert not bad.ok and bad.first_failure.name == "blocks.1.mlp"
