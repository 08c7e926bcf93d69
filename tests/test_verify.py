"""``vitconv verify``: correct conversions pass; each deliberately broken conversion is caught
and named at the stage where the fault is (judged by the independent NumPy reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from _vitconv_cli.main import main
from conftest import golden_path
from vitconv.conversion.loading import build_model
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.conversion.options import ReadOptions
from vitconv.verification.verify import DEFAULT_TOLERANCE, describe_stage, verify


def canonical(name: str, **kw):
    with open_checkpoint(golden_path(f"jax/{name}.npz"), ReadOptions(**kw)) as c:
        return c.config, c.state_dict()


def src(name: str):
    return golden_path(f"jax/{name}.npz")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_caught_at(report, stage: str, words: str):
    assert not report.ok
    bad = report.first_failure
    assert (bad.name, bad.what) == (stage, words), report.verdict()
    assert words in report.verdict()
    earlier = report.stages[: [s.name for s in report.stages].index(stage)]
    assert all(s.ok for s in earlier)


@pytest.mark.parametrize("name", ["tiny_token_p8_32", "tiny_gap_p8_32", "tiny_prelogits_p8_32",
                                  "tiny_token_p4_48", "tiny_r50_32"])
def test_on_the_fly_conversion_passes_every_stage(name):
    r = verify(src(name))
    assert r.ok, r.verdict()
    assert r.kind == "canonical vitconv model" and not r.only_final
    assert [s.name for s in r.stages][:2] == (["stem", "embed"] if "r50" in name else ["embed", "blocks.0.attn"])
    # float32 model vs float64 reference: far inside the bound on every stage
    assert max(s.max_abs / s.bound for s in r.stages) < 0.25


def test_pt_written_by_npz2pt_passes_and_cli_exits_0(tmp_path):
    out = tmp_path / "tiny.pt"
    assert run("npz2pt", src("tiny_prelogits_p8_32"), "-o", out).exit_code == 0
    r = run("verify", src("tiny_prelogits_p8_32"), out, "--batch", 3, "--seed", 7)
    assert r.exit_code == 0, r.output
    assert "block 1 attention" in r.output and "pre_logits" in r.output
    assert "3 x 32x32" in r.output and "seed 7" in r.output and r.output.rstrip().splitlines()[-1].startswith("OK")


def test_resized_safetensors_verified_at_its_resolution(tmp_path):
    out = tmp_path / "vit48.safetensors"
    assert run("npz2pt", src("tiny_token_p8_32"), "--image-size", 48, "-o", out).exit_code == 0
    r = verify(src("tiny_token_p8_32"), out)
    assert r.ok and r.image_size == 48, r.verdict()


# ---- deliberately broken conversions: one per fault -----------------------------------
def test_swapped_heads_in_one_blocks_qkv_is_that_blocks_attention():
    cfg, sd = canonical("tiny_token_p8_32")
    w, b = sd["blocks.1.attn.qkv.weight"].copy(), sd["blocks.1.attn.qkv.bias"].copy()
    hd = cfg.head_dim
    for part in range(3):  # q, k and v: heads 0 and 1 exchanged, proj left alone
        h0, h1 = slice(part * cfg.attn_dim, part * cfg.attn_dim + hd), slice(part * cfg.attn_dim + hd, part * cfg.attn_dim + 2 * hd)
        w[h0], w[h1] = w[h1].copy(), w[h0].copy()
        b[h0], b[h1] = b[h1].copy(), b[h0].copy()
    sd.update({"blocks.1.attn.qkv.weight": w, "blocks.1.attn.qkv.bias": b})
    assert_caught_at(verify(src("tiny_token_p8_32"), build_model(cfg, sd)), "blocks.1.attn", "block 1 attention")


def test_mlp_kernel_reshaped_instead_of_transposed_is_that_blocks_mlp():
    """Google's Dense_0 kernel is (in, out) = (48, 96); a converter that reshapes it to
    (96, 48) instead of transposing keeps every shape right and every number wrong."""
    cfg, sd = canonical("tiny_token_p8_32")
    w = sd["blocks.1.mlp.fc1.weight"]  # (96, 48) == google_kernel.T
    sd["blocks.1.mlp.fc1.weight"] = np.ascontiguousarray(w.T).reshape(w.shape)
    assert_caught_at(verify(src("tiny_token_p8_32"), build_model(cfg, sd)), "blocks.1.mlp", "block 1 MLP")


def test_dropped_pre_logits_is_the_pre_logits_stage():
    cfg, sd = canonical("tiny_prelogits_p8_32")
    sd = {k: v for k, v in sd.items() if not k.startswith("pre_logits.")}
    model = build_model(cfg.replace(representation_size=None), sd)
    assert_caught_at(verify(src("tiny_prelogits_p8_32"), model), "head_input", "pre_logits")


def test_exact_gelu_instead_of_tanh_is_the_first_blocks_mlp():
    cfg, sd = canonical("tiny_token_p8_32")
    r = verify(src("tiny_token_p8_32"), build_model(cfg.replace(act="gelu"), sd))
    assert_caught_at(r, "blocks.0.mlp", "block 0 MLP")
    assert r.stages[2].max_abs > 2 * r.stages[2].bound  # 2.2e-3 vs 7.6e-4: not a marginal catch


def test_half_pixel_position_resize_is_the_patch_embedding():
    cfg, sd = canonical("tiny_token_p8_32")
    pe = torch.from_numpy(sd["pos_embed"])
    grid = pe[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 6), mode="bilinear", align_corners=False)
    sd["pos_embed"] = torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 36, -1)], 1).numpy()
    r = verify(src("tiny_token_p8_32"), build_model(cfg.replace(image_size=48), sd))
    assert r.image_size == 48
    assert_caught_at(r, "embed", "patch embedding")


def test_corrupt_stem_is_the_resnet_stem():
    cfg, sd = canonical("tiny_r50_32")
    sd["stem.gn_root.weight"] = sd["stem.gn_root.weight"][::-1].copy()
    r = verify(src("tiny_r50_32"), build_model(cfg, sd))
    assert not r.ok and r.first_failure.what == "ResNet stem" and r.stages[0].name == "stem"


def test_broken_pt_through_the_cli_exits_3_with_json(tmp_path):
    cfg, sd = canonical("tiny_token_p8_32")
    sd["blocks.0.attn.proj.weight"] = sd["blocks.0.attn.proj.weight"].T.copy()  # square: 48x48
    bad = tmp_path / "bad.pt"  # vitconv's .pt format, written by torch.save
    torch.save({"format": "vitconv", "format_version": 1, "config": cfg.to_dict(),
                "state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, bad)
    r = CliRunner().invoke(main, ["verify", str(src("tiny_token_p8_32")), str(bad), "--json"])
    assert r.exit_code == 3
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["first_failure"] == {"stage": "blocks.0.attn", "what": "block 0 attention"}
    assert report["tolerance"] == DEFAULT_TOLERANCE and len(report["stages"]) == 9
    assert "block 0 attention" in r.stderr and r.stderr.count("\n") == 1


def test_tolerance_flag_is_applied():
    r = run("verify", src("tiny_gap_p8_32"), "--tolerance", "1e-9")
    assert r.exit_code == 3 and "FAILED" in r.output


# ---- exported artifacts: only the final output is comparable --------------------------
def test_torchscript_and_onnx_artifacts_compare_logits_only(tmp_path):
    import vitconv

    model = vitconv.load(src("tiny_token_p8_32"))
    x = torch.zeros(1, 3, 32, 32)
    ts = tmp_path / "tiny_ts.pt"
    torch.jit.trace(model, x).save(str(ts))
    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), input_names=["pixel_values"], output_names=["logits"],
                      dynamo=False)  # static batch 1: verify runs the batch image by image
    for path, kind in ((ts, "torchscript"), (onnx_path, "onnx")):
        r = verify(src("tiny_token_p8_32"), path, batch=3)
        assert r.ok and r.kind == kind and r.only_final, r.verdict()
        assert [s.name for s in r.stages] == ["logits"] and "only logits compared" in r.note
        assert r.stages[0].max_abs < 2e-5
    # a broken export is caught, though not localised
    broken = vitconv.load(src("tiny_token_p8_32"))
    with torch.no_grad():
        broken.head.bias.add_(0.01)
    torch.jit.trace(broken, x).save(str(ts))
    r = run("verify", src("tiny_token_p8_32"), ts)
    assert r.exit_code == 3 and "only logits compared" in r.output


def test_bad_source_is_one_line_exit_2(tmp_path):
    r = run("verify", tmp_path / "missing.npz")
    assert r.exit_code == 2 and "no such file" in r.output
    notnpz = tmp_path / "x.npz"
    np.savez(notnpz, a=np.zeros(3))
    r = run("verify", notnpz)
    assert r.exit_code == 2 and "not a ViT checkpoint" in r.output and r.output.count("\n") == 1


def test_stage_names_in_words():
    assert describe_stage("blocks.7.attn") == "block 7 attention"
    assert describe_stage("blocks.3.mlp") == "block 3 MLP"
    assert [describe_stage(n) for n in ("stem", "embed", "encoded", "head_input", "logits")] == \
        ["ResNet stem", "patch embedding", "final norm", "pre_logits", "head"]
