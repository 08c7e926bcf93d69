"""``vitconv npz2pt`` through click's runner: outputs, summaries, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import vitconv
from _vitconv_cli.main import main
from conftest import CASES, golden_expected, golden_input, golden_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_default_output_is_beside_the_source_and_loads_weights_only(tmp_path):
    src = tmp_path / "ViT-tiny.npz"
    shutil.copy(golden_path("jax/tiny_prelogits_p8_32.npz"), src)
    r = run("npz2pt", src)
    assert r.exit_code == 0, r.output
    out = tmp_path / "ViT-tiny.pt"
    assert out.exists() and f"wrote   {out}" in r.output
    assert "pre_logits 48" in r.output and "50,986" in r.output
    payload = torch.load(out, weights_only=True)
    assert payload["format"] == "vitconv" and payload["config"]["representation_size"] == 48
    case = CASES["tiny_prelogits_p8_32"]
    with torch.no_grad():
        logits = vitconv.load(out)(golden_input(case)).numpy()
    assert np.abs(logits - golden_expected(case, "logits")).max() <= 2e-5


def test_safetensors_output_with_resize(tmp_path):
    out = tmp_path / "vit48.safetensors"
    r = run("npz2pt", golden_path("jax/tiny_token_p8_32.npz"), "--image-size", 48, "-o", out)
    assert r.exit_code == 0, r.output
    assert "4x4 -> 6x6" in r.output
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["vitconv_config"])["image_size"] == 48
    case = CASES["tiny_token_p8_32_to_48"]
    with torch.no_grad():
        logits = vitconv.load(out)(golden_input(case)).numpy()
    assert np.abs(logits - golden_expected(case, "logits")).max() <= 2e-5


@pytest.mark.parametrize("convert_args", [["npz2pt", "{src}", "-o", "{out}"], ["convert", "{src}", "{out}"]])
def test_no_source_hash_names_the_source_without_a_digest(tmp_path, convert_args):
    from safetensors import safe_open

    src = golden_path("jax/tiny_token_p8_32.npz")
    metas = {}
    for flags in ([], ["--no-source-hash"]):
        out = tmp_path / f"vit{len(flags)}.safetensors"
        r = run(*[a.format(src=src, out=out) for a in convert_args], *flags)
        assert r.exit_code == 0, r.output
        with safe_open(str(out), "pt") as f:
            metas[bool(flags)] = f.metadata()
    # hashed as sha256sum hashes it, by default
    assert metas[False]["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert "source_sha256" not in metas[True]
    assert metas[True]["source"] == metas[False]["source"] == src.name
    # nothing else differs: the weights' bytes and every other key
    assert {k: v for k, v in metas[False].items() if k != "source_sha256"} == metas[True]
    assert ((tmp_path / "vit0.safetensors").read_bytes()[-4096:] == (tmp_path / "vit1.safetensors").read_bytes()[-4096:])


def test_python_dash_m_is_the_same_cli():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vitconv", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "npz2pt" in r.stdout


def test_bad_image_size_is_one_line_exit_2(tmp_path):
    out = tmp_path / "x.pt"
    r = run("npz2pt", golden_path("jax/tiny_token_p8_32.npz"), "--image-size", 50, "-o", out)
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "tiny_token_p8_32.npz" in r.output and "stride 8" in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_and_non_checkpoint_inputs(tmp_path):
    r = run("npz2pt", tmp_path / "nope.npz")
    assert r.exit_code == 2 and "no such file" in r.output
    txt = tmp_path / "notes.npz"
    txt.write_text("hello")
    r = run("npz2pt", txt)
    assert r.exit_code == 2 and "notes.npz" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_prints_nothing(tmp_path, where):
    args = ["npz2pt", golden_path("jax/tiny_gap_p8_32.npz"), "-o", tmp_path / "g.pt"]
    r = run(*(["-q"] + args if where == "before" else args + ["--quiet"]))
    assert r.exit_code == 0 and r.output == "" and (tmp_path / "g.pt").exists()


def test_a_url_converts_as_with_convert(tmp_path):
    """npz2pt is the convert service with the Google layouts required: a URL is staged, not
    taken for a local path (``http:/127.0.0.1…: no such file``)."""
    from batch_helpers import RangeServer

    with RangeServer(golden_path("jax")) as http:
        url = f"{http.url}/tiny_token_p8_32.npz"
        r = CliRunner().invoke(main, ["-q", "npz2pt", url, "-o", str(tmp_path / "h.pt")])
        assert r.exit_code == 0, r.output
        assert CliRunner().invoke(main, ["-q", "npz2pt", url.replace(".npz", ".nothing"),
                                         "-o", str(tmp_path / "x.pt")]).exit_code == 2
    local = CliRunner().invoke(main, ["-q", "npz2pt", str(golden_path("jax/tiny_token_p8_32.npz")),
                                      "-o", str(tmp_path / "l.pt")])
    assert local.exit_code == 0, local.output
    assert (tmp_path / "h.pt").read_bytes() == (tmp_path / "l.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.pt", "l.pt"]
