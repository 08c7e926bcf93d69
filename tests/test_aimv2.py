"""AIMv2 (RMSNorm, bias-free projections, SwiGLU stored unpacked, a norm on the patch embeddings,
Hugging Face's attention-pooling head) and qk-norm, against the real timm 1.0.31 and transformers.

Each model is built by its library at small width with every parameter seeded far from its init;
its own forward is the reference (timm ``model(x)``; Hugging Face ``pooler_output``, the head, or
``last_hidden_state`` for a model without one), at the checkpoint's resolution and at another,
non-square one where the library resizes (timm ``dynamic_img_size=True``). Written back, each
loads strictly and holds the original tensors bit for bit."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import close_to, images, save_state, seeded
from timm_import import import_timm
from vitconv.conversion.loading import load
from vitconv.errors import BadInputError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = import_timm()

SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
AIMV2 = "aimv2_large_patch14_224"




def _timm(arch, **kw):
    return seeded(timm.create_model(arch, pretrained=False, **{**SMALL, **kw}), scale=0.2)



def _bitwise(a_path, b_path):
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_timm_aimv2_reads_resizes_writes_back_and_rebuilds(tmp_path):
    """timm's AIMv2: RmsNorm eps 1e-5 everywhere (the blocks, the patch embedding's norm, the
    final norm), no q/k/v, projection or MLP biases, SwiGLU as fc1_g/fc1_x, no class token,
    the mean of the normalised tokens. A bare state dict does not record the eps or the
    activation: every timm architecture with these keys is an AIMv2, and they agree."""
    model = _timm(AIMV2, dynamic_img_size=True, num_classes=10)
    src = save_state(model, tmp_path / "aimv2.safetensors")
    report = convert(src, tmp_path / "c.safetensors")
    c = report.config
    assert (c.norm, c.norm_eps, c.act, c.mlp, c.swiglu_unpacked) == ("rmsnorm", 1e-5, "silu", "swiglu", True)
    assert (c.qkv_bias, c.proj_bias, c.mlp_bias, c.patch_embed_norm, c.patch_bias) == (False, False, False, True, True)
    assert (c.classifier, c.class_token, c.final_norm, c.mlp_dim) == ("gap", False, "encoder", 352)
    assert any("what every architecture with these keys computes" in n for n in report.notes), report.notes
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        close_to(ours(images(32)), model(images(32)))
        close_to(ours(images(48, 40)), model(images(48, 40)))  # timm resamples its table bicubic, antialiased
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    _bitwise(src, tmp_path / "back.safetensors")
    timm.create_model(AIMV2, pretrained=False, **SMALL, num_classes=10).load_state_dict(
        load_file(str(tmp_path / "back.safetensors")), strict=True)
    convert(tmp_path / "c.safetensors", tmp_path / "tdir", ConvertOptions(to="timm"))
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    with torch.no_grad():
        close_to(built(images(32)), model(images(32)))
    with open_checkpoint(tmp_path / "tdir") as again:
        assert again.config == c


def test_bare_aimv2_epsilon_is_the_architecture_s_and_the_norm_is_the_file_s(tmp_path):
    """RMSNorm's eps moves the output past the tolerance (1e-6, timm's own default, would be
    wrong); the norm kind is in the tensors (a weight only), so --set cannot contradict it."""
    model = _timm(AIMV2)
    src = save_state(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        want = model(images())
        wrong = load(src, norm_eps=1e-6)(images())
        assert (wrong - want).abs().max().item() > 1e-5 * max(1.0, want.abs().max().item())
        close_to(load(src)(images()), want)
    with pytest.raises(BadInputError, match="--set norm: the timm layout reads it from the file"):
        open_checkpoint(src, ReadOptions(overrides={"norm": "layernorm"}))
    with open_checkpoint(src, ReadOptions(overrides={"norm_eps": 1e-6})) as c:  # open: the user may say otherwise
        assert c.config.norm_eps == 1e-6


@pytest.mark.parametrize("kw", [dict(qk_norm=True), dict(qk_norm=True, global_pool="avg", class_token=False,
                                                         qkv_bias=False, proj_bias=False),
                                dict(qk_norm=True, norm_layer="rmsnorm")])
def test_timm_qk_norm_both_ways(kw, tmp_path):
    """timm VisionTransformer ``qk_norm=True``: its norm_layer (LayerNorm, eps 1e-6) over each
    head's queries and keys; with proj_bias=False the attention projection and MLP lose their
    biases together."""
    model = _timm("vit_base_patch16_224", dynamic_img_size=True, num_classes=10, **kw)
    src = save_state(model, tmp_path / "q.safetensors")
    report = convert(src, tmp_path / "c.safetensors")
    assert report.config.qk_norm and report.config.proj_bias == kw.get("proj_bias", True)
    assert report.config.norm == kw.get("norm_layer", "layernorm")
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        close_to(ours(images(32)), model(images(32)))
        close_to(ours(images(40, 56)), model(images(40, 56)))
        q_off = load(tmp_path / "c.safetensors")
        for blk in q_off.blocks:  # the feature moves the output: without it the logits differ
            blk.attn.q_norm = blk.attn.k_norm = None
        assert (q_off(images(32)) - model(images(32))).abs().max().item() > 1e-3
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    _bitwise(src, tmp_path / "back.safetensors")
    convert(tmp_path / "c.safetensors", tmp_path / "tdir", ConvertOptions(to="timm"))
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=True).eval()
    with torch.no_grad():
        close_to(built(images(32)), model(images(32)))


# ------------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
HF = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=2, image_size=32,
          patch_size=8)


def _hf(**kw):
    return seeded(transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**{**HF, **kw})))


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True, mlp_bias=True, rms_norm_eps=1e-6)])
def test_hf_aimv2_with_its_head_reads_and_writes_back(kw, tmp_path):
    """``pooler_output`` is Aimv2AttentionPoolingHead's: the probe as the query, k/v projections,
    output_proj, nothing after; the epsilon and the biases come from config.json."""
    model = _hf(**kw)
    model.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    c = report.config
    assert report.layout == "hf_aimv2" and (c.classifier, c.pool_head, c.norm) == ("map", "aimv2", "rmsnorm")
    assert (c.norm_eps, c.qkv_bias, c.proj_bias, c.mlp_bias) == (
        kw.get("rms_norm_eps", 1e-5), kw.get("qkv_bias", False), kw.get("qkv_bias", False), kw.get("mlp_bias", False))
    with torch.no_grad():
        close_to(load(tmp_path / "c.safetensors")(images(32)), model(pixel_values=images(32)).pooler_output)
    convert(tmp_path / "c.safetensors", tmp_path / "back")
    again, info = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        close_to(again.eval()(pixel_values=images(32)).pooler_output, model(pixel_values=images(32)).pooler_output)
    _bitwise(tmp_path / "src" / "model.safetensors", tmp_path / "back" / "model.safetensors")


def test_hf_aimv2_head_is_not_timm_s_and_is_refused_there_by_name(tmp_path):
    _hf().save_pretrained(tmp_path / "src")
    from vitconv.errors import MappingError

    with pytest.raises(MappingError, match="pool_head='aimv2'"):
        convert(tmp_path / "src", tmp_path / "t.safetensors", ConvertOptions(to="timm"))
    assert not (tmp_path / "t.safetensors").exists()


def test_timm_and_hf_aimv2_convert_into_each_other(tmp_path):
    """timm's AIMv2 (no classifier) is Aimv2VisionModel without a head: its output is the mean of
    HF's last_hidden_state. timm -> HF loads strictly; HF -> timm gives timm's tensors bit for bit."""
    model = _timm(AIMV2, num_classes=0, dynamic_img_size=True)
    src = save_state(model, tmp_path / "t.safetensors")
    report = convert(src, tmp_path / "hf")
    assert report.target_layout == "hf_aimv2"
    hf, info = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.use_head is False and hf.config.rms_norm_eps == 1e-5
    with torch.no_grad():
        want = model(images(32))
        close_to(hf.eval()(pixel_values=images(32)).last_hidden_state.mean(1), want)
        close_to(load(tmp_path / "hf")(images(32)), want)
        # transformers never resizes Aimv2's learned table; read from HF, the model resizes as timm does
        with pytest.raises((RuntimeError, ValueError)):
            hf(pixel_values=images(48))
        close_to(load(tmp_path / "hf")(images(48, 40)), model(images(48, 40)))
    convert(tmp_path / "hf", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    _bitwise(src, tmp_path / "back.safetensors")


@pytest.mark.parametrize("use_head", [True, False])
def test_hf_aimv2_native_generates_its_table_for_any_grid(use_head, tmp_path):
    """``is_native=True``: no table is stored; transformers generates a 2-D sin-cos one for each
    grid ([sin x, cos x, sin y, cos y], 1/10000^(k/(D/4)), float64), so it runs at any size, and
    so does the converted model; written back, the directory again holds no table."""
    model = _hf(is_native=True, use_head=use_head)
    model.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    assert report.config.pos_resize == "sincos2d_aimv2" and report.config.image_size == 32

    def want(x):
        o = model(pixel_values=x)
        return o.pooler_output if use_head else o.last_hidden_state.mean(1)

    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        close_to(ours(images(32)), want(images(32)))
        close_to(ours(images(48, 40)), want(images(48, 40)))
    convert(tmp_path / "c.safetensors", tmp_path / "back")
    again, info = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert again.config.is_native
    with torch.no_grad():
        close_to(want(images(40)), again.eval()(pixel_values=images(40)).pooler_output if use_head
               else again(pixel_values=images(40)).last_hidden_state.mean(1))
    _bitwise(tmp_path / "src" / "model.safetensors", tmp_path / "back" / "model.safetensors")


@pytest.mark.parametrize("source", ["timm", "hf native"])
def test_aimv2_exports_to_onnx_with_dynamic_size(source, tmp_path):
    """The graph (RMSNorm as pow/mean/rsqrt, the unpacked SwiGLU packed, the patch norm; for a
    native HF model the sin-cos table generated for the input's grid, in float64) verified by
    run_export at unseen sizes, and against the library itself at one more."""
    import onnxruntime as ort

    from vitconv.runtime.export import ExportPlan, run_export

    if source == "timm":
        model = _timm(AIMV2, num_classes=8, dynamic_img_size=True)
        convert(save_state(model, tmp_path / "t.safetensors"), tmp_path / "c.safetensors")
    else:
        hf = _hf(is_native=True)
        hf.save_pretrained(tmp_path / "src")
        convert(tmp_path / "src", tmp_path / "c.safetensors")
        model = lambda x: hf(pixel_values=x).pooler_output  # noqa: E731
    (result,) = run_export(tmp_path / "c.safetensors", ExportPlan(onnx=tmp_path / "m.onnx", dynamic_size=True))
    assert result.ok and max(p.max_abs for p in result.parity) <= 1e-4
    x = images(48, seed=5)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        assert abs(got - model(x).numpy()).max() <= 1e-4


@pytest.mark.parametrize("source", ["timm bare", "hf head", "hf no head", "hf native"])
def test_verify_runs_the_source_library_as_reference(source, tmp_path):
    """``verify``: timm's AIMv2 built from the bare file (RmsNorm and the patch norm as vitconv read
    them), or Aimv2VisionModel.from_pretrained; every stage within the tolerance, and a tensor
    moved in block 1 is named there."""
    from vitconv.verification.verify import verify

    if source == "timm bare":
        src = save_state(_timm(AIMV2, num_classes=8), tmp_path / "t.safetensors")
    else:
        _hf(use_head=source != "hf no head", is_native=source == "hf native").save_pretrained(tmp_path / "src")
        src = tmp_path / "src"
    convert(src, tmp_path / "c.safetensors")
    report = verify(src, tmp_path / "c.safetensors")
    assert report.ok, report.lines()
    if source == "hf native":  # transformers generates its table for another grid too
        assert verify(src, tmp_path / "c.safetensors", image_size=48).ok
    assert {"embed", "blocks.1.mlp", "logits"} <= {s.name for s in report.stages}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state["blocks.1.mlp.fc2.weight"] = state["blocks.1.mlp.fc2.weight"] * 1.5
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    bad = verify(src, tmp_path / "bad.safetensors")
    assert not bad.ok and bad.first_failure.name == "blocks.1.mlp"


def test_a_bare_hf_aimv2_file_says_what_it_assumes(tmp_path):
    """model.safetensors without its config.json: the activation and RMSNorm's eps are
    transformers' defaults, said as assumed; the head count must be given or is assumed too."""
    import shutil

    model = _hf(rms_norm_eps=1e-6)
    model.save_pretrained(tmp_path / "src")
    shutil.copy(tmp_path / "src" / "model.safetensors", tmp_path / "bare.safetensors")
    with open_checkpoint(tmp_path / "bare.safetensors", ReadOptions(num_heads=2)) as c:
        assert (c.layout.name, c.config.norm_eps, c.config.act) == ("hf_aimv2", 1e-5, "silu")
        assert any("norm_eps=1e-05 assumed" in n for n in c.notes), c.notes
    with torch.no_grad():
        want = model(pixel_values=images(32)).pooler_output
        assert (load(tmp_path / "bare.safetensors", num_heads=2)(images(32)) - want).abs().max().item() > 1e-5
        close_to(load(tmp_path / "bare.safetensors", num_heads=2, norm_eps=1e-6)(images(32)), want)


def test_packed_swiglu_is_written_apart_for_hugging_face(tmp_path):
    """swiglu_unpacked is storage only: a model whose fc1 is stored packed (as DINOv2's) is written
    to Aimv2 as gate_proj/up_proj all the same, the same function."""
    from safetensors import safe_open

    from vitconv.config import ViTConfig

    model = _timm(AIMV2, num_classes=0)
    convert(save_state(model, tmp_path / "t.safetensors"), tmp_path / "c.safetensors")
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cfg = ViTConfig.from_json(metadata["vitconv_config"]).replace(swiglu_unpacked=False)
    save_file(state, str(tmp_path / "packed.safetensors"), metadata={**metadata, "vitconv_config": cfg.to_json()})
    with open_checkpoint(tmp_path / "packed.safetensors") as c:
        assert c.config.swiglu_unpacked is False
    convert(tmp_path / "packed.safetensors", tmp_path / "hf")
    hf, info = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        close_to(hf.eval()(pixel_values=images(32)).last_hidden_state.mean(1), model(images(32)))
