"""Every example in README.md runs, in order, in a scratch directory (later examples use the
files earlier ones write, as a reader following the README would)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT, VITCONV

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, re.S)


def commands():
    """(language, script) for each block; in the set-up block only the conversion part runs
    (the installs are what CI itself does)."""
    out = []
    for i, (lang, body) in enumerate(BLOCKS):
        if i == 0:
            body = "\n".join(line.split("&& ", 1)[1] for line in body.splitlines() if "vitconv npz2pt" in line)
        out.append((lang, body))
    return out


def test_readme_has_the_two_setup_commands_first():
    lang, body = BLOCKS[0]
    lines = [l for l in body.splitlines() if l.strip()]
    assert lang == "bash" and len(lines) == 2
    assert lines[0].startswith("pip install torch==2.13.0 -e . && vitconv npz2pt golden/")
    assert "python -m pytest" in lines[1] and '".[test]"' in lines[1]


def test_every_readme_example_runs(tmp_path):
    (tmp_path / "golden").symlink_to(ROOT / "golden")
    # the examples call `vitconv`: the one installed beside this interpreter, PATH or not
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PATH=os.path.dirname(VITCONV) + os.pathsep + os.environ.get("PATH", ""))
    ran = 0
    for lang, body in commands():
        if lang == "python":
            r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
        else:
            r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"README example failed:\n{body}\n--- stderr ---\n{r.stderr[-3000:]}"
        ran += 1
    assert ran == len(BLOCKS) >= 12  # set-up, npz2pt, convert, export, verify, golden, inspect, bench, API, families,
    #                                  the 2025 generation, big_vision
    # the examples produced what they say they produce
    for name in ("tiny_vit.pt", "in21k_tiny.pt", "tiny48.safetensors", "tiny.onnx", "r50_ts.pt",
                 "r50.safetensors", "tiny_again.npz", "posembed.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "tiny_hf" / "config.json").is_file()
    for name in ("dinov2_reg_back", "clip_timm", "siglip_bv_hf", "beit_hf", "aimv2_hf", "siglip2_hf", "eva02_timm"):
        assert (tmp_path / name / "config.json").is_file(), name
    for name in ("siglip_bv.safetensors", "bf16_again.npz", "flexi_p4.safetensors"):
        assert (tmp_path / name).is_file(), name
