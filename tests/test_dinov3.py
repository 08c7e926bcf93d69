"""DINOv3: rotary position embeddings (RoPE) computed from the patch grid at run time, no position
table, class + storage tokens left unrotated, LayerScale; against the real timm 1.0.31 (``Eva``
with ``rope_type='dinov3'``) and transformers (``DINOv3ViTModel``), offline.

Each model is built by its library at small width with every parameter seeded far from its init
(LayerScale log-uniform over 2e-4..11: timm's Eva names them ``gamma_1``/``gamma_2``); the
library's own forward is the reference, at the checkpoint's resolution, at another one and on a
non-square input (both libraries compute the angles per grid: timm with
``dynamic_img_size=True``, which the DINOv3 architectures set, and transformers always).
Written back, each loads strictly and bit for bit; timm -> Hugging Face -> timm computes the
same and returns the same bytes; an ONNX graph exported with ``--dynamic-size`` follows timm at
sizes it never saw; a bare state dict says what it assumed of the rotary parameters."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import close_to, images, save_state, seeded
from timm_import import assert_timm_round_trip, import_timm
from vitconv.conversion.loading import load
from vitconv.errors import BadInputError, MappingError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions, ReadOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = import_timm()
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
#: the native size, another, and two non-square inputs (rows != columns both ways)
SIZES = ((32, 32), (48, 48), (32, 48), (56, 24))
# name -> (extra create_model arguments, --set for what a bare file cannot say, --num-heads, what must be read)
TIMM = {
    "vit_small_patch16_dinov3": (dict(), {}, None, dict(
        classifier="gap", final_norm="encoder", qkv_bias=False, num_reg_tokens=4, abs_pos_embed=False,
        rope="dinov3", rope_theta=100.0, norm_eps=1e-5, act="gelu", layer_scale=True, mlp="mlp")),
    # upstream DINOv3 pools the class token (global_pool='token'), here with a classifier
    "vit_small_plus_patch16_dinov3": (dict(global_pool="token", num_classes=10), {"classifier": "token"}, None,
                                      dict(mlp="swiglu", act="silu", mlp_dim=512, classifier="token",
                                           num_classes=10)),
    # keys LingBot's (token pooling) share: a bare file's pooling must be said (or --arch)
    "vit_base_patch16_dinov3_qkvb": (dict(), {"classifier": "gap"}, None, dict(qkv_bias=True, key_bias=False)),
    # the 7B's block (SwiGLU aligned to 64, mlp_ratio 2, no qkv bias, 128-dim heads), narrowed
    "vit_7b_patch16_dinov3": (dict(num_heads=1), {"classifier": "gap"}, 1, dict(mlp="swiglu", mlp_dim=256, num_heads=1, head_dim=128,
                                                              qkv_bias=False)),
}


def _seed(model: torch.nn.Module) -> torch.nn.Module:
    """:func:`conftest.seeded`, weights N(0, 0.2^2)."""
    return seeded(model, scale=0.2)


def _timm(name: str, **extra):
    kw = {**SMALL, **TIMM[name][0], **extra}
    return _seed(timm.create_model(name, pretrained=False, **kw))





@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_dinov3_reads_at_any_size_and_writes_back(name, tmp_path):
    extra, unsaid, heads, expect = TIMM[name]
    model = _timm(name)
    save_state(model, tmp_path / "src.safetensors")
    report = convert(tmp_path / "src.safetensors", tmp_path / "c.safetensors",
                     ConvertOptions(overrides=unsaid, num_heads=heads))
    assert report.layout == "timm_eva"
    for field, value in expect.items():
        assert getattr(report.config, field) == value, field
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        for h, w in SIZES:  # timm computes the angles for each input's grid (dynamic_img_size=True)
            close_to(ours(images(h, w)), model(images(h, w)))
    assert_timm_round_trip(tmp_path, name, {**SMALL, **extra}, model, SIZES[1:3], report)


def test_the_rotation_and_its_base_move_the_output(tmp_path):
    """The RoPE parameters matter well above rounding on a seeded model: without the rotation, or
    with another base, timm's output moves by more than 1e-3 (rotating the class and storage
    tokens too would break the exactness above)."""
    model = _timm("vit_base_patch16_dinov3_qkvb")
    save_state(model, tmp_path / "src.safetensors")
    with torch.no_grad():
        want = model(images(32, 48))
        close_to(load(tmp_path / "src.safetensors", classifier="gap")(images(32, 48)), want)
        for wrong in (dict(rope_theta=10000.0), dict(rope="none")):
            assert (load(tmp_path / "src.safetensors", classifier="gap", **wrong)(images(32, 48)) - want).abs().max() > 1e-3


def test_the_key_bias_is_held_at_zero_and_written_as_attention_rope_where_there_is_one(tmp_path):
    """timm's Eva attention has no key bias (a zero buffer); a canonical value there is ignored by the
    model with key_bias=False. A model with a key bias (Hugging Face key_bias=True; with RoPE the
    rotated key bias changes the output) is written for timm's ``AttentionRope`` (``attn_type='rope'``,
    one full qkv bias), which computes what Hugging Face does."""
    model = _timm("vit_base_patch16_dinov3_qkvb")
    save_state(model, tmp_path / "src.safetensors")
    convert(tmp_path / "src.safetensors", tmp_path / "c.safetensors", ConvertOptions(overrides={"classifier": "gap"}))
    state = load_file(tmp_path / "c.safetensors")
    assert not state["blocks.0.attn.qkv.bias"][128:256].any()
    hf = _seed(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**HF, key_bias=True)))
    hf.save_pretrained(tmp_path / "kb")
    convert(tmp_path / "kb", tmp_path / "kb_timm", ConvertOptions(to="timm"))
    written = json.loads((tmp_path / "kb_timm" / "config.json").read_text())
    assert written["model_args"]["attn_type"] == "rope"
    built = timm.create_model(f"local-dir:{tmp_path / 'kb_timm'}", pretrained=True).eval()
    with torch.no_grad():
        close_to(built(images(32, 48)), hf(pixel_values=images(32, 48)).pooler_output)


HF = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
          patch_size=8, num_register_tokens=4)
HF_VARIANTS = {
    "plain": (dict(), dict(mlp="mlp", act="gelu", key_bias=False, qkv_bias=True)),
    "gated": (dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=96), dict(mlp="swiglu", act="silu")),
    "key bias, no registers": (dict(key_bias=True, num_register_tokens=0, rope_theta=50.0),
                               dict(key_bias=True, num_reg_tokens=0, rope_theta=50.0)),
    "no qkv bias": (dict(query_bias=False, value_bias=False), dict(qkv_bias=False)),
}


def test_a_bare_hf_dinov3_file_says_what_it_assumed_and_takes_what_it_cannot_say(tmp_path):
    """DINOv3ViTModel's weights without their config.json record neither the head count nor the
    activation, epsilon or rotary base (here a gated MLP with SiLU): a read says each value
    it took from DINOv3ViTConfig's defaults, computes something else with them, and given the
    model's own (--num-heads, --set) computes what transformers does."""
    extra = dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=96, layer_norm_eps=1e-2, rope_theta=7.0)
    model = _seed(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{**HF, **extra})))
    model.save_pretrained(tmp_path / "src")
    bare = tmp_path / "model.safetensors"
    bare.write_bytes((tmp_path / "src" / "model.safetensors").read_bytes())
    with open_checkpoint(bare) as c:
        assert (c.config.num_heads, c.config.act, c.config.norm_eps, c.config.rope_theta) == (1, "gelu", 1e-5, 100.0)
        said = " ".join(c.notes)
        assert "heads: 1 x 64 assumed" in said, c.notes
        assert "act='gelu', norm_eps=1e-05, rope_theta=100.0 assumed: the hf_dinov3 code's defaults" in said, c.notes
    with torch.no_grad():
        want = model(pixel_values=images(32, 48)).pooler_output
        convert(bare, tmp_path / "assumed.safetensors")
        assert (load(tmp_path / "assumed.safetensors")(images(32, 48)) - want).abs().max() > 1e-2
        told = ConvertOptions(num_heads=2, overrides={"act": "silu", "norm_eps": 1e-2, "rope_theta": 7.0})
        report = convert(bare, tmp_path / "told.safetensors", told)
        assert not any("assumed" in n for n in report.notes), report.notes
        close_to(load(tmp_path / "told.safetensors")(images(32, 48)), want)


@pytest.mark.parametrize("name", sorted(HF_VARIANTS))
def test_hf_dinov3_reads_at_any_size_and_writes_back(name, tmp_path):
    extra, expect = HF_VARIANTS[name]
    model = _seed(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{**HF, **extra})))
    model.save_pretrained(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "c.safetensors")
    assert report.layout == "hf_dinov3" and not report.notes
    for field, value in {"classifier": "token", "abs_pos_embed": False, "rope": "dinov3", **expect}.items():
        assert getattr(report.config, field) == value, field
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():  # pooler_output: the class token after the final norm
        for h, w in SIZES:
            close_to(ours(images(h, w)), model(pixel_values=images(h, w)).pooler_output)
    convert(tmp_path / "c.safetensors", tmp_path / "back")
    again, info = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        close_to(again.eval()(pixel_values=images(32, 48)).pooler_output, model(pixel_values=images(32, 48)).pooler_output)
    a = load_file(tmp_path / "src" / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["vit_small_plus_patch16_dinov3", "vit_base_patch16_dinov3_qkvb"])
def test_timm_to_hf_to_timm(name, tmp_path):
    """A timm DINOv3 pooling its class token (as upstream) becomes a DINOv3ViTModel whose
    pooler_output is timm's output; read back, it is timm's state dict byte for byte (HF's
    mask_token, masked training only, is written as zeros and left out again)."""
    model = _timm(name, global_pool="token", num_classes=0)
    save_state(model, tmp_path / "src.safetensors")
    report = convert(tmp_path / "src.safetensors", tmp_path / "hf",
                     ConvertOptions(overrides={"classifier": "token"}, to="hf"))
    assert report.target_layout == "hf_dinov3"
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["rope_theta"], written["layer_norm_eps"], written["key_bias"]) == (100.0, 1e-5, False)
    hf, info = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        for h, w in SIZES:
            close_to(hf.eval()(pixel_values=images(h, w)).pooler_output, model(images(h, w)))
    convert(tmp_path / "hf", tmp_path / "back.safetensors", ConvertOptions(to="timm"))
    a, b = load_file(tmp_path / "src.safetensors"), load_file(tmp_path / "back.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_onnx_dynamic_size_follows_timm_at_unseen_sizes(tmp_path):
    """``vitconv export --onnx --dynamic-size``: the graph computes the rotary angles from its
    input's grid, so sizes other than the export size (one of them non-square) give timm's output."""
    import onnxruntime as ort
    from click.testing import CliRunner

    from _vitconv_cli.main import main

    model = _timm("vit_small_plus_patch16_dinov3", qkv_bias=True)
    save_state(model, tmp_path / "t.safetensors")
    convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors",
            ConvertOptions(image_size=32, overrides={"classifier": "token"}))
    r = CliRunner().invoke(main, ["export", str(tmp_path / "c.safetensors"), "--onnx", str(tmp_path / "m.onnx"),
                                  "--dynamic-size"])
    assert r.exit_code == 0, r.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for h, w in ((48, 48), (40, 64)):
        got = session.run(None, {"pixel_values": images(h, w, 5).numpy()})[0]
        with torch.no_grad():
            want = model(images(h, w, 5))
        close_to(torch.from_numpy(got), want)


def test_a_bare_state_dict_says_where_its_rotary_parameters_came_from(tmp_path):
    """A bare timm Eva state dict records neither the rotary form nor its base (timm's
    rope_type/rope_temperature), the pooling or the epsilon: they come from the architectures whose
    keys and shapes fit (vitconv/archs/table.json), named in the notes, or are said with --set."""
    model = _timm("vit_small_patch16_dinov3")
    save_state(model, tmp_path / "s.safetensors")
    with open_checkpoint(tmp_path / "s.safetensors") as c:
        assert (c.config.rope, c.config.rope_theta, c.config.norm_eps) == ("dinov3", 100.0, 1e-5)
        said = " ".join(c.notes)
        assert "classifier='gap', norm_eps=1e-05, pool_heads=0, rope='dinov3', " in said, c.notes
        assert "rope_theta=100.0: what every architecture with these keys computes" in said, c.notes
        assert "native size 224 is assumed" in said, c.notes
    with open_checkpoint(tmp_path / "s.safetensors", ReadOptions(overrides={"rope_theta": 1000.0})) as c:
        assert c.config.rope_theta == 1000.0
    with pytest.raises(BadInputError, match="--set abs_pos_embed: the timm_eva layout reads it from the file"):
        open_checkpoint(tmp_path / "s.safetensors", ReadOptions(overrides={"abs_pos_embed": True}))


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3_qkvb", "vit_small_patch16_lingbot"])
def test_arch_names_what_keys_alone_cannot(name, tmp_path):
    """DINOv3-S with q/v biases and LingBot-S have the same keys and shapes but pool differently
    ('avg' and the class token): a bare file of either is refused naming both --arch choices, and
    --arch supplies the pooling, heads, epsilon and rotary base of the one named, timm's function."""
    model = _seed(timm.create_model(name, pretrained=False, img_size=32, depth=1))  # real width: 384, 6 heads
    save_state(model, tmp_path / "s.safetensors")
    with pytest.raises(MappingError, match=r"classifier='gap' \(--arch vit_small_patch16_dinov3_qkvb\); "
                                           r"classifier='token' \(--arch vit_small_patch16_lingbot\)"):
        open_checkpoint(tmp_path / "s.safetensors")
    report = convert(tmp_path / "s.safetensors", tmp_path / "c.safetensors", ConvertOptions(overrides={"arch": name}))
    assert any(f"rope_theta=100.0: from --arch {name}" in n for n in report.notes), report.notes
    assert (report.config.num_heads, report.config.rope_theta) == (6, 100.0)
    with torch.no_grad():
        close_to(load(tmp_path / "c.safetensors")(images(32, 48)), model(images(32, 48)))
    other = ({"vit_small_patch16_dinov3_qkvb", "vit_small_patch16_lingbot"} - {name}).pop()
    with torch.no_grad():
        assert (load(tmp_path / "s.safetensors", arch=other)(images(32, 48)) - model(images(32, 48))).abs().max() > 1e-3


@pytest.mark.parametrize("arch,kw,what", [
    ("vit_base_patch16_sapiens2", dict(num_kv_heads=1), "qk-norm (Sapiens2)"),
])
def test_other_eva_forms_are_refused_in_one_line(arch, kw, what, tmp_path):
    model = timm.create_model(arch, pretrained=False, img_size=32, patch_size=8, embed_dim=128, depth=1,
                              num_heads=2, **kw)
    save_state(model, tmp_path / "m.safetensors")
    with pytest.raises(MappingError) as e:
        convert(tmp_path / "m.safetensors", tmp_path / "c.safetensors")
    assert what in str(e.value) and "does not compute this feature yet" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "c.safetensors").exists()


def test_verify_runs_the_library_as_the_reference(tmp_path):
    """``vitconv verify``'s reference is the source's own library: timm's Eva (built with what
    vitconv read, or from a timm directory) and transformers' DINOv3ViTModel."""
    from vitconv.verification.verify import verify

    model = _timm("vit_base_patch16_dinov3_qkvb")
    save_state(model, tmp_path / "t.safetensors")
    convert(tmp_path / "t.safetensors", tmp_path / "c.safetensors", ConvertOptions(overrides={"classifier": "gap"}))
    assert verify(tmp_path / "t.safetensors", tmp_path / "c.safetensors", overrides={"classifier": "gap"}).ok
    convert(tmp_path / "c.safetensors", tmp_path / "tdir", ConvertOptions(to="timm"))
    assert verify(tmp_path / "tdir", tmp_path / "c.safetensors").ok
    hf = _seed(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**HF, use_gated_mlp=True, hidden_act="silu")))
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "h.safetensors")
    checked = verify(tmp_path / "hf", tmp_path / "h.safetensors")
    assert checked.ok, checked.verdict()


def test_coordinate_augmentations_are_training_only(tmp_path):
    """DINOv3 was trained with its rotary coordinates randomly rescaled (Hugging Face's default
    pos_embed_rescale=2.0; timm's rope_rescale_coords): in eval mode neither library applies it,
    and the canonical model (eval behaviour only) computes what they compute there; in training
    mode they draw another function each call (far above float32 rounding, 1e-7 here)."""
    hf = _seed(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**HF)))
    assert hf.config.pos_embed_rescale == 2.0
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "h.safetensors")
    ours = load(tmp_path / "h.safetensors")
    model = _timm("vit_small_patch16_dinov3", rope_rescale_coords=2.0, rope_jitter_coords=1.5, rope_shift_coords=0.2)
    save_state(model, tmp_path / "t.safetensors")
    convert(tmp_path / "t.safetensors", tmp_path / "t_c.safetensors")
    ours_t = load(tmp_path / "t_c.safetensors")
    with torch.no_grad():
        close_to(ours(images(32, 48)), hf(pixel_values=images(32, 48)).pooler_output)
        close_to(ours_t(images(32, 48)), model(images(32, 48)))
        torch.manual_seed(0)
        assert (hf.train()(pixel_values=images(32, 48)).pooler_output - ours(images(32, 48))).abs().max() > 1e-5
        assert (model.train()(images(32, 48)) - ours_t(images(32, 48))).abs().max() > 1e-5
