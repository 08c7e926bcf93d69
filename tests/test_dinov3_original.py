"""The original DINOv3 checkpoint layout (``facebookresearch/dinov3``'s ``DinoVisionTransformer``,
the hub's ``*.pth``), read and written, against transformers' ``DINOv3ViTModel``, offline.

The original code is not installed. Its state dicts are built here FROM a seeded
``DINOv3ViTModel`` by inverting transformers' own conversion script
(``models/dinov3_vit/convert_dinov3_vit_to_hf.py``: its ``ORIGINAL_TO_CONVERTED_KEY_MAPPING``,
``split_qkv`` and the keys it drops), written out below in this file and independent of vitconv's
table: ``q/k/v_proj`` concatenated into ``attn.qkv`` (the key bias the script drops is a zero third,
with the ``bias_mask`` buffer [1; 0; 1] of the original's ``LinearKMaskedBias``), ``mask_token``
(1, 1, D) -> (1, D), and ``rope_embed.periods`` (dropped by the script; transformers recomputes
``inv_freq``) made by the original's formula ``base ** (2 * arange(D_head // 4) / (D_head // 2))``
in torch. transformers' ``pooler_output`` is the reference (the original's ``forward`` returns the
class token after ``norm``), at the native size, another and two non-square inputs.
"""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import close_to, images, seeded
from timm_import import import_timm
from vitconv.conversion.loading import load
from vitconv.errors import BadInputError, MappingError
from vitconv.conversion.pipeline import convert, open_checkpoint
from vitconv.conversion.options import ConvertOptions

timm = import_timm()
transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

HF = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
          patch_size=8, num_register_tokens=4)
#: the native size, another, and two non-square inputs (transformers computes the angles per grid)
SIZES = ((32, 32), (48, 48), (32, 48), (56, 24))
VARIANTS = {
    "vits16 form": (dict(), dict(mlp="mlp", act="gelu", key_bias=False, qkv_bias=True, num_reg_tokens=4)),
    "vits16plus form (SwiGLU)": (dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=96),
                                 dict(mlp="swiglu", act="silu", mlp_dim=96)),
    "live key bias, no storage tokens, theta 50": (
        dict(key_bias=True, num_register_tokens=0, rope_theta=50.0), dict(key_bias=True, num_reg_tokens=0,
                                                                          rope_theta=50.0)),
    "vit7b16 form (no qkv bias, 4 heads)": (dict(query_bias=False, value_bias=False, num_attention_heads=4,
                                                 use_gated_mlp=True, hidden_act="silu"),
                                            dict(qkv_bias=False, num_heads=4, head_dim=16)),
}

# transformers' ORIGINAL_TO_CONVERTED_KEY_MAPPING, read the other way (transformers 5 nests the
# encoder's layers under ``model.``, which the script predates)
_INVERSE = (
    (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "storage_tokens"), (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
    (r"^layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layer\.(\d+)\.attention\.", r"blocks.\1.attn."),
    (r"^layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^layer\.(\d+)\.mlp\.", r"blocks.\1.mlp."), (r"\.mlp\.gate_proj\.", ".mlp.w1."),
    (r"^layer\.(\d+)\.norm", r"blocks.\1.norm"),
)


def _original(hf) -> dict:
    """The original DINOv3 state dict whose conversion by transformers' script is ``hf``."""
    cfg = hf.config
    gated = cfg.use_gated_mlp
    out = {}
    for key, t in hf.state_dict().items():
        key = re.sub(r"^model\.", "", key)
        if cfg.num_register_tokens == 0 and key == "embeddings.register_tokens":
            continue  # the original has no storage_tokens parameter without storage tokens
        for pattern, repl in _INVERSE:
            key = re.sub(pattern, repl, key)
        key = re.sub(r"\.mlp\.up_proj\.", ".mlp.w2." if gated else ".mlp.fc1.", key)
        key = re.sub(r"\.mlp\.down_proj\.", ".mlp.w3." if gated else ".mlp.fc2.", key)
        out[key] = t.clone()
    out["mask_token"] = out["mask_token"][:, 0]
    for i in range(cfg.num_hidden_layers):  # split_qkv, inverted
        a = f"blocks.{i}.attn."
        out[a + "qkv.weight"] = torch.cat([out.pop(a + f"{n}_proj.weight") for n in "qkv"])
        if cfg.query_bias:
            k = out.pop(a + "k_proj.bias", None)
            masked = k is None  # the script drops attn.k_proj.bias and bias_mask: a LinearKMaskedBias
            q = out.pop(a + "q_proj.bias")
            out[a + "qkv.bias"] = torch.cat([q, torch.zeros_like(q) if masked else k, out.pop(a + "v_proj.bias")])
            if masked:
                mask = torch.ones(3 * cfg.hidden_size)
                mask[cfg.hidden_size:2 * cfg.hidden_size] = 0
                out[a + "qkv.bias_mask"] = mask
    d_head = cfg.hidden_size // cfg.num_attention_heads  # RopePositionEmbedding._init_weights (base form)
    out["rope_embed.periods"] = cfg.rope_theta ** (2 * torch.arange(d_head // 4, dtype=torch.float32) / (d_head // 2))
    return out


def _hf(**extra):
    return seeded(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**{**HF, **extra})))




def _bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_original_reads_like_transformers_and_writes_back(name, tmp_path):
    extra, expect = VARIANTS[name]
    hf = _hf(**extra)
    src = _original(hf)
    save_file(src, str(tmp_path / "orig.safetensors"))
    report = convert(tmp_path / "orig.safetensors", tmp_path / "c.safetensors")
    assert report.layout == "dinov3_original"
    for field, value in {"classifier": "token", "abs_pos_embed": False, "rope": "dinov3", "rope_theta": 100.0,
                         "rope_periods": "float32", "layer_scale": True, "norm_eps": 1e-5, **expect}.items():
        assert getattr(report.config, field) == value, field
    ours = load(tmp_path / "c.safetensors")
    with torch.no_grad():
        for h, w in SIZES:
            close_to(ours(images(h, w)), hf(pixel_values=images(h, w)).pooler_output)
    # back to the original layout: every key, bit for bit (the periods regenerated from theta)
    convert(tmp_path / "c.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="dinov3"))
    _bitwise(src, load_file(tmp_path / "back.safetensors"))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_original_to_transformers_to_original(name, tmp_path):
    """original -> hf_dinov3 (a model directory transformers loads strictly, computing the same)
    -> original: the same bytes (the key third and the mask rebuilt, the periods from theta)."""
    hf = _hf(**VARIANTS[name][0])
    src = _original(hf)
    save_file(src, str(tmp_path / "orig.safetensors"))
    report = convert(tmp_path / "orig.safetensors", tmp_path / "hf", ConvertOptions(to="hf"))
    assert report.target_layout == "hf_dinov3"
    again, info = transformers.DINOv3ViTModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        close_to(again.eval()(pixel_values=images(32, 48)).pooler_output, hf(pixel_values=images(32, 48)).pooler_output)
    convert(tmp_path / "hf", tmp_path / "back.safetensors", ConvertOptions(to="dinov3"))
    _bitwise(src, load_file(tmp_path / "back.safetensors"))


@pytest.mark.parametrize("name", ["vits16 form", "vits16plus form (SwiGLU)", "vit7b16 form (no qkv bias, 4 heads)"])
def test_original_to_timm_eva(name, tmp_path):
    """original -> timm_eva: timm's Eva loads it strictly and computes transformers' output
    (class-token pooling, as upstream), at every size."""
    hf = _hf(**VARIANTS[name][0])
    save_file(_original(hf), str(tmp_path / "orig.safetensors"))
    report = convert(tmp_path / "orig.safetensors", tmp_path / "tdir", ConvertOptions(to="timm"))
    assert report.target_layout == "timm_eva"
    built = timm.create_model(f"local-dir:{tmp_path / 'tdir'}", pretrained=False).eval()
    state = load_file(tmp_path / "tdir" / "model.safetensors")
    built.load_state_dict(state, strict=True)
    with torch.no_grad():
        for h, w in SIZES:
            close_to(built(images(h, w)), hf(pixel_values=images(h, w)).pooler_output)


def test_bfloat16_periods_are_computed_with_as_stored(tmp_path):
    """The released checkpoints hold ``rope_embed.periods`` in bfloat16 and the original model
    computes with those rounded values: read so (``rope_periods='bfloat16'``), against
    transformers with its ``inv_freq`` set to the stored periods' reciprocals; the rounding moves
    the output well above 1e-5, so transformers' and timm's float32 periods are refused as a
    target rather than silently changing the function."""
    hf = _hf()
    src = _original(hf)
    src["rope_embed.periods"] = src["rope_embed.periods"].to(torch.bfloat16)
    save_file(src, str(tmp_path / "orig.safetensors"))
    torch.save(src, tmp_path / "orig.pth")  # as released: a torch pickle
    with open_checkpoint(tmp_path / "orig.pth") as c:
        assert (c.config.rope_theta, c.config.rope_periods) == (100.0, "bfloat16")
        assert any("stored in bfloat16" in n for n in c.notes), c.notes
    ours = load(tmp_path / "orig.safetensors")
    rope = next(m for m in hf.modules() if hasattr(m, "inv_freq"))
    with torch.no_grad():
        fp32 = hf(pixel_values=images(32, 48)).pooler_output
        rope.inv_freq.copy_(1 / src["rope_embed.periods"].float())
        for h, w in SIZES:
            close_to(ours(images(h, w)), hf(pixel_values=images(h, w)).pooler_output)
        assert (ours(images(32, 48)) - fp32).abs().max() > 1e-4
    convert(tmp_path / "orig.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="dinov3"))
    back = load_file(tmp_path / "back.safetensors")
    assert torch.equal(back.pop("rope_embed.periods"), src.pop("rope_embed.periods").float())  # values, float32
    _bitwise(src, back)
    with pytest.raises(MappingError, match="rope_periods='bfloat16'"):
        convert(tmp_path / "orig.safetensors", tmp_path / "hf", ConvertOptions(to="hf"))


def test_periods_and_masks_of_another_form_are_refused(tmp_path):
    """The periods must be ``base ** (4k / head_dim)`` (not the min/max-period form, not edited) and
    the bias mask [1; 0; 1]; a class/storage-token norm of its own (``cls_norm``) is refused by name."""
    src = _original(_hf())
    for key, value, match in (
            ("rope_embed.periods", torch.linspace(0.5, 4.0, 8), "min_period/max_period form"),
            ("rope_embed.periods", src["rope_embed.periods"] * torch.tensor([1.0] * 7 + [1.01]), "any base"),
            ("blocks.1.attn.qkv.bias_mask", torch.ones(192), "bias_mask"),
            ("cls_norm.weight", torch.ones(64), "untie_cls_and_patch_norms")):
        bad = {**src, key: value}
        save_file(bad, str(tmp_path / "bad.safetensors"))
        with pytest.raises(MappingError, match=match):
            convert(tmp_path / "bad.safetensors", tmp_path / "out.safetensors")


def test_local_cls_norm_is_left_out_and_inspect_names_the_layout(tmp_path):
    """``local_cls_norm`` (the local crops' class norm, training only; transformers' script drops it)
    is left out with a note, the output unchanged; ``vitconv inspect`` names the layout and what
    the periods said."""
    from _vitconv_cli.main import main

    hf = _hf()
    src = _original(hf)
    src.update({"local_cls_norm.weight": torch.randn(64), "local_cls_norm.bias": torch.randn(64)})
    save_file(src, str(tmp_path / "orig.safetensors"))
    report = convert(tmp_path / "orig.safetensors", tmp_path / "c.safetensors")
    assert any("local_cls_norm" in n for n in report.notes), report.notes
    with torch.no_grad():
        close_to(load(tmp_path / "c.safetensors")(images(32, 32)), hf(pixel_values=images(32, 32)).pooler_output)
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "orig.safetensors")])
    assert r.exit_code == 0, r.output
    for said in ("dinov3_original", "RoPE dinov3 (theta 100)", "rope_embed.periods", "no key bias"):
        assert said in r.output, (said, r.output)


def test_the_dead_key_bias_is_not_computed_and_the_file_says_its_heads_and_theta(tmp_path):
    """``LinearKMaskedBias`` multiplies the key third of ``qkv.bias`` by 0: a non-zero value stored
    there changes nothing (read as zero, written back as zero). The head count and the base are
    the periods', so ``--num-heads`` and ``--set rope_theta`` are refused rather than contradicting
    the file."""
    hf = _hf()
    src = _original(hf)
    src["blocks.0.attn.qkv.bias"][64:128] = torch.randn(64)
    save_file(src, str(tmp_path / "orig.safetensors"))
    with torch.no_grad():
        close_to(load(tmp_path / "orig.safetensors")(images(32, 48)), hf(pixel_values=images(32, 48)).pooler_output)
    convert(tmp_path / "orig.safetensors", tmp_path / "back.safetensors", ConvertOptions(to="dinov3"))
    assert not load_file(tmp_path / "back.safetensors")["blocks.0.attn.qkv.bias"][64:128].any()
    with pytest.raises(BadInputError, match="records the heads"):
        convert(tmp_path / "orig.safetensors", tmp_path / "x.safetensors", ConvertOptions(num_heads=4))
    with pytest.raises(BadInputError, match="reads it from the file"):
        convert(tmp_path / "orig.safetensors", tmp_path / "x.safetensors",
                ConvertOptions(overrides={"rope_theta": 50.0}))


def test_verify_names_the_original_library_it_needs(tmp_path):
    """``verify``'s reference for this layout is the original code (not installed here, nor on
    PyPI): without it the reply says what to install, in one line."""
    from vitconv.verification.verify import verify

    save_file(_original(_hf()), str(tmp_path / "orig.safetensors"))
    convert(tmp_path / "orig.safetensors", tmp_path / "c.safetensors")
    if importlib.util.find_spec("dinov3") is not None:  # the original code: it is the reference
        report = verify(tmp_path / "orig.safetensors", tmp_path / "c.safetensors")
        assert report.ok and "original DINOv3" in report.reference
        return
    with pytest.raises(BadInputError, match=r"dinov3, and it is not importable here .*facebookresearch/dinov3"):
        verify(tmp_path / "orig.safetensors", tmp_path / "c.safetensors")
