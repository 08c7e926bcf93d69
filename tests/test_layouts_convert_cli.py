"""``vitconv convert``: the CLI path to Google .npz, the default target from DST, refusals."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner

from vitconv.conversion.loading import load
from vitconv.formats.npz import NpzSource
from conftest import CASES, golden_expected, golden_input, golden_path


def _vitconv(*args):
    from _vitconv_cli.main import main

    from types import SimpleNamespace

    r = CliRunner().invoke(main, [str(a) for a in args])
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_npz_to_canonical_to_npz_via_cli_is_bitwise(tmp_path):
    for name in ("tiny_prelogits_p8_32", "tiny_r50_32"):
        src = golden_path(CASES[name]["checkpoint"])
        r1 = _vitconv("convert", src, tmp_path / f"{name}.safetensors")
        r2 = _vitconv("convert", tmp_path / f"{name}.safetensors", tmp_path / f"{name}.npz")
        assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
        assert "google layout" in r2.stdout
        a, b = NpzSource(src), NpzSource(tmp_path / f"{name}.npz")
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert a.get(k).dtype == b.get(k).dtype and a.get(k).tobytes() == b.get(k).tobytes(), k


def test_npz_written_from_a_pytorch_layout_reproduces_golden_logits(tmp_path):
    """golden .npz -> jeonsworld .pth -> .npz (heads given): read again, Google's logits."""
    case = CASES["tiny_token_p8_32"]
    r = _vitconv("convert", golden_path(case["checkpoint"]), tmp_path / "j.pth", "--to", "jeonsworld")
    assert r.returncode == 0, r.stderr
    assert "exact GELU" in r.stdout  # the report says jeonsworld's own code would differ
    # a jeonsworld file means exact GELU: writing it as .npz is refused ...
    r = _vitconv("convert", tmp_path / "j.pth", tmp_path / "j.npz", "--num-heads", "3")
    assert r.returncode == 2 and "tanh GELU" in r.stderr and not (tmp_path / "j.npz").exists()
    # ... while a canonical file (which records Google semantics) goes back to .npz exactly
    r = _vitconv("convert", golden_path(case["checkpoint"]), tmp_path / "c.pt")
    r2 = _vitconv("convert", tmp_path / "c.pt", tmp_path / "c.npz")
    assert r.returncode == 0 and r2.returncode == 0, r.stderr + r2.stderr
    with torch.no_grad():
        got = load(tmp_path / "c.npz")(golden_input(case)).numpy()
    assert np.abs(got - golden_expected(case, "logits")).max() <= 2e-5


def test_convert_refusals_are_one_line(tmp_path):
    r = _vitconv("convert", golden_path(CASES["tiny_token_p8_32"]["checkpoint"]), tmp_path / "x.pth",
                 "--to", "lucidrains")
    assert r.returncode != 0 and "qkv_bias=True (vit-pytorch's to_qkv has no bias)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pth").exists()
    r = _vitconv("convert", golden_path(CASES["tiny_token_p8_32"]["checkpoint"]), tmp_path / "x.onnx")
    assert r.returncode == 2 and "cannot tell the output format from the extension '.onnx'" in r.stderr
