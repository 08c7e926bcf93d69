"""``vitconv golden check`` / ``golden add``: the golden regression suite runs in CI through
both the library and the CLI, and new cases are recorded with sha256 and provenance."""

from __future__ import annotations

import json
import shutil

import numpy as np
from click.testing import CliRunner

from _vitconv_cli.main import main
from conftest import CASES, GOLDEN, golden_path
from timm_import import import_timm
from vitconv.verification import golden
from vitconv.formats.base import sha256_file


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_library_check_runs_every_case_within_tolerance():
    import_timm()  # the timm cases' reference (the other libraries load without torchvision)
    report = golden.check(GOLDEN)
    assert report.ok, "\n".join(report.lines())
    assert [c.name for c in report.cases] == list(CASES)
    for c in report.cases:
        engines = {(f.engine, f.what) for f in c.figures}
        for what in CASES[c.name]["expected"]:
            assert ("converted", what) in engines and ("reference", what) in engines
        assert all(f.max_abs <= 2e-5 for f in c.figures)
    resize = next(c for c in report.cases if c.name == "tiny_token_p8_32_to_48")
    assert [f.max_abs for f in resize.figures if f.what == "posemb_resized"] == [0.0, 0.0]


def test_cli_check_prints_figures_and_exits_0():
    r = run("golden", "check", "--dir", GOLDEN)
    assert r.exit_code == 0, r.output
    assert f"OK: all {len(CASES)} golden case(s) reproduced" in r.output
    assert all(name in r.output for name in CASES) and "posemb_resized" in r.output


def copy_golden(tmp_path):
    d = tmp_path / "golden"
    shutil.copytree(GOLDEN, d)
    return d


def test_changed_expected_file_fails_with_exit_3(tmp_path):
    d = copy_golden(tmp_path)
    path = d / CASES["tiny_gap_p8_32"]["expected"]["logits"]
    arr = np.load(path)
    arr[0, 0] += 1e-3
    np.save(path, arr)
    r = run("golden", "check", "tiny_gap_p8_32", "tiny_token_p8_32", "--dir", d, "--json")
    assert r.exit_code == 3
    report = json.loads(r.stdout)
    bad = [c for c in report["cases"] if not c["ok"]]
    assert [c["name"] for c in bad] == ["tiny_gap_p8_32"] and "sha256 differs" in bad[0]["problems"][0]
    # with the digest updated (a deliberate edit), the numbers themselves now fail
    m = json.loads((d / "manifest.json").read_text())
    case = next(c for c in m["cases"] if c["name"] == "tiny_gap_p8_32")
    case["sha256"][case["expected"]["logits"]] = sha256_file(path)
    (d / "manifest.json").write_text(json.dumps(m, indent=1))
    res = golden.check(d, ["tiny_gap_p8_32"]).cases[0]
    assert not res.ok and {(f.engine, f.what) for f in res.figures if not f.ok} == {("converted", "logits"), ("reference", "logits")}


def test_add_records_copies_and_refuses_overwrite(tmp_path):
    d = tmp_path / "mine"  # a fresh suite: manifest created on first add
    case = CASES["tiny_prelogits_p8_32"]
    args = ["golden", "add", "rep", golden_path(case["checkpoint"]), "--input", golden_path(case["input"]),
            "--expected-logits", golden_path(case["expected"]["logits"]),
            "--expected-prelogits", golden_path(case["expected"]["prelogits"]),
            "--source", "vit_jax models_vit.py @c6de1e5, float32 CPU", "--dir", d]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "recorded  rep" in r.output
    m = json.loads((d / "manifest.json").read_text())
    (rec,) = m["cases"]
    assert rec["checkpoint"] == "cases/rep/tiny_prelogits_p8_32.npz"
    assert rec["expected"] == {"logits": "cases/rep/rep.logits.npy", "prelogits": "cases/rep/rep.prelogits.npy"}
    assert rec["provenance"]["source"] == "vit_jax models_vit.py @c6de1e5, float32 CPU"
    assert rec["num_params"] == case["num_params"] and rec["top1"] == case["top1"]
    for rel, digest in rec["sha256"].items():
        assert digest == sha256_file(d / rel) == sha256_file(golden_path(case["checkpoint"] if rel.endswith(".npz") else (
            case["input"] if "inputs" in rel else case["expected"][rel.split(".")[-2]])))
    assert golden.check(d).ok

    r = run(*args)  # same name again: refused, manifest untouched
    assert r.exit_code == 2 and "--accept" in r.output
    assert json.loads((d / "manifest.json").read_text()) == m
    r = run(*args, "--accept", "--source", "regenerated")
    assert r.exit_code == 0, r.output
    assert [c["provenance"]["source"] for c in json.loads((d / "manifest.json").read_text())["cases"]] == ["regenerated"]


def test_add_resize_case_and_files_inside_the_dir_are_referenced_not_copied(tmp_path):
    d = copy_golden(tmp_path)
    c = CASES["tiny_token_p8_32_to_48"]
    r = run("golden", "add", "again_48", d / c["checkpoint"], "--input", d / c["input"], "--image-size", 48,
            "--expected-logits", d / c["expected"]["logits"],
            "--expected-posemb-resized", d / c["expected"]["posemb_resized"], "--source", "same drop", "--dir", d)
    assert r.exit_code == 0, r.output
    rec = json.loads((d / "manifest.json").read_text())["cases"][-1]
    assert rec["checkpoint"] == c["checkpoint"] and rec["input"] == c["input"] and rec["image_size"] == 48
    assert not (d / "cases").exists()
    assert golden.check(d, ["again_48"]).ok


def test_add_refuses_expectations_vitconv_does_not_reproduce(tmp_path):
    d = tmp_path / "g"
    c = CASES["tiny_token_p8_32"]
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.load(golden_path(CASES["tiny_gap_p8_32"]["expected"]["logits"])))
    r = run("golden", "add", "x", golden_path(c["checkpoint"]), "--input", golden_path(c["input"]),
            "--expected-logits", wrong, "--source", "nowhere", "--dir", d)
    assert r.exit_code == 3 and "not recorded" in r.output
    assert not d.exists() or not any(d.iterdir())


def test_golden_add_records_what_a_bare_file_leaves_open(tmp_path):
    """A bare timm DINOv3 file with q/k/v biases fits two architectures that pool differently:
    ``golden add`` without ``--set`` refuses to record it, naming the choice; with
    ``--set classifier=gap`` it records the case with its ``set``, and the case passes."""
    case = CASES["timm_dinov3_qkvb_p8_32"]
    args = ["golden", "add", "again", str(golden_path(case["checkpoint"])), "--input", str(golden_path(case["input"])),
            "--expected-logits", str(golden_path(case["expected"]["logits"])), "--source", "timm 1.0.31 (test)",
            "--dir", str(tmp_path)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "classifier='token'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["--set", "classifier=gap"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cases"][0]["set"] == {"classifier": "gap"}
    r = CliRunner().invoke(main, ["golden", "check", "--dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
