"""``vitconv batch``: a zoo of 21 checkpoints in six layouts (Google and big_vision ``.npz``
with Google's own outputs, timm, original-DINOv2 and OpenAI-CLIP files, Hugging Face
directories saved by transformers) plus a truncated and a hostile file, through real worker
processes. Every good row is verified against its source's independent reference; some
outputs are loaded by the target library itself and compared with Google's logits."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import vitconv
from batch_helpers import dies_on_marked_rows, slow_writer, with_timm
from conftest import CASES, golden_expected, golden_input, golden_path, seeded
from vitconv.conversion.batch import BatchReport, read_manifest, run_local
from vitconv.errors import BadInputError


def _cli(*args):
    from _vitconv_cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _write_manifest(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _Payload:  # unpickling it would create the marker
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Sources (absolute) and a manifest of 21 good rows and 2 bad ones, outputs relative to it."""
    import transformers

    root = tmp_path_factory.mktemp("zoo")
    src = root / "src"
    src.mkdir()
    for name, make in {
        "hf_vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
            intermediate_size=96, num_labels=5)),
        "hf_dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(
            image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2)),
        "hf_siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=96)),
    }.items():
        seeded(make()).save_pretrained(src / name)
    truncated = src / "truncated.npz"
    data = golden_path("jax/tiny_token_p8_32.npz").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    hostile = src / "hostile.pt"  # a torch.save archive whose pickle would run a command
    torch.save({"state_dict": {"patch_embed.weight": torch.zeros(4, 3, 2, 2)}, "x": _Payload(root / "PWNED")},
               hostile)
    g = lambda rel: str(golden_path(rel))  # noqa: E731
    good = [
        {"src": g("jax/tiny_token_p8_32.npz"), "dst": "out/token.safetensors"},
        {"src": g("jax/tiny_token_p8_32.npz"), "dst": "out/token_hf"},
        {"src": g("jax/tiny_token_p8_32.npz"), "dst": "out/token_timm.pth", "to": "timm"},
        {"src": g("jax/tiny_token_p8_32.npz"), "dst": "out/token_48.safetensors", "image_size": 48},
        {"src": g("jax/tiny_gap_p8_32.npz"), "dst": "out/gap_timm", "to": "timm"},
        {"src": g("jax/tiny_gap_p8_32.npz"), "dst": "out/gap_f16.pt", "dtype": "float16"},
        {"src": g("jax/tiny_prelogits_p8_32.npz"), "dst": "out/prelogits_bf16.npz", "dtype": "bfloat16"},
        {"src": g("jax/tiny_token_p4_48.npz"), "dst": "out/p4.safetensors"},
        {"src": g("jax/tiny_r50_32.npz"), "dst": "out/r50.npz"},
        {"src": g("bv/tiny_flexi_p8_32.npz"), "dst": "out/flexi.safetensors"},
        {"src": g("bv/tiny_gap_scan_p8_32.npz"), "dst": "out/scan_timm.safetensors", "to": "timm"},
        {"src": g("bv/tiny_map_head_p8_32.npz"), "dst": "out/map.safetensors", "dtype": "bfloat16"},
        {"src": g("bv/tiny_siglip_map_bf16_p8_32.npz"), "dst": "out/siglip_timm", "to": "timm"},
        {"src": g("bv/tiny_sincos_gap_p8_32.npz"), "dst": "out/sincos.pt"},
        {"src": g("bv/tiny_rep_gap_p8_32.npz"), "dst": "out/rep_gap.safetensors", "verify": True},
        {"src": g("jax/tiny_token_p4_48.npz"), "dst": "out/p4_hf"},
        {"src": g("bv/tiny_sincos_gap_p8_32.npz"), "dst": "out/sincos_timm", "to": "timm"},
        {"src": g("families/dinov2_swiglu_p8_32.pth"), "dst": "out/dinov2_swiglu.safetensors"},
        {"src": str(src / "hf_vit"), "dst": "out/hf_vit_f16.safetensors", "dtype": "float16"},
        {"src": str(src / "hf_dinov2"), "dst": "out/hf_dinov2_timm.safetensors", "to": "timm"},
        {"src": str(src / "hf_siglip"), "dst": "out/hf_siglip.pt", "dtype": "float16"},
    ]
    bad = [{"src": str(truncated), "dst": "out/truncated.safetensors"},
           {"src": str(hostile), "dst": "out/hostile.safetensors"}]
    (root / "out").mkdir()
    manifest = _write_manifest(root / "zoo.jsonl", good[:10] + bad[:1] + good[10:] + bad[1:])
    return root, manifest, good, bad


@pytest.fixture(scope="module")
def first_run(zoo):
    root, manifest, good, bad = zoo
    result = _cli("batch", manifest, "--workers", "2", "--report", root / "report.json")
    return result, json.loads((root / "report.json").read_text())


def test_every_good_row_converted_and_verified_and_the_bad_ones_fail_alone(zoo, first_run):
    root, manifest, good, bad = zoo
    result, report = first_run
    assert result.exit_code == 2, result.output  # both failures are bad input
    rows = {Path(r["dst"]).name: r for r in report["rows"]}
    assert len(rows) == len(good) + len(bad) == 23
    assert report["totals"] == {**report["totals"], "ok": 21, "skipped": 0, "failed": 2, "rows": 23, "not_run": 0}
    for g in good:
        r = rows[Path(g["dst"]).name]
        assert r["status"] == "ok" and r["verified"] is True and r["verify"]["ok"], r
        assert r["source_sha256"] == _sha(Path(g["src"]) if Path(g["src"]).is_file() else
                                          Path(g["src"]) / "model.safetensors")
        assert r["outputs"] and all(_sha(Path(p)) == h for p, h in r["outputs"].items())
        assert r["peak_rss_bytes"] > 100 << 20 and r["wall_s"] > 0
    # the references are the sources' own: Google's NumPy forward, big_vision's, each library's model
    refs = {Path(g["dst"]).name: rows[Path(g["dst"]).name]["verify"]["reference"] for g in good}
    assert "vit_jax" in refs["token.safetensors"] and "big_vision" in refs["flexi.safetensors"]
    assert "DINOv2" in refs["dinov2_swiglu.safetensors"]
    assert "transformers" in refs["hf_vit_f16.safetensors"]
    for b in bad:
        r = rows[Path(b["dst"]).name]
        single = _cli("convert", b["src"], root / "single.safetensors", "--verify")
        assert r["status"] == "failed" and r["exit_code"] == single.exit_code == 2
        # the single command's one line, naming the row
        assert r["error"].startswith(f"line {r['line']}: {b['src']}: ")
        assert single.stderr == f"vitconv: error: {r['error'].split(': ', 1)[1]}\n"
        assert not (root / Path(b["dst"])).exists()
        assert f"vitconv: error: {r['error']}" in result.stderr
    assert not (root / "PWNED").exists()  # the hostile pickle ran nothing
    assert sorted(p.name for p in (root / "out").iterdir() if p.name.startswith(".")) == []  # no temporaries


def test_outputs_run_in_their_own_libraries_as_google_computed(zoo, first_run):
    import transformers

    from timm_import import import_timm

    root = zoo[0]
    case = CASES["tiny_token_p8_32"]
    x = golden_input(case)  # NCHW
    want = golden_expected(case, "logits")
    hf = transformers.ViTForImageClassification.from_pretrained(root / "out/token_hf").eval()
    with torch.no_grad():
        assert np.abs(hf(pixel_values=x).logits.numpy() - want).max() < 2e-5
    timm = import_timm()
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, mlp_ratio=2, num_classes=10, act_layer="gelu_tanh")
    model.load_state_dict(torch.load(root / "out/token_timm.pth", weights_only=True), strict=True)
    with torch.no_grad():
        assert np.abs(model.eval()(x).numpy() - want).max() < 2e-5
    with vitconv.open_checkpoint(root / "out/token.safetensors") as c:  # provenance in the header
        assert c.source.metadata["source_sha256"] == _sha(golden_path("jax/tiny_token_p8_32.npz"))
        assert c.source.metadata["vitconv_verified"] == "true"


def test_rerun_skips_every_good_row_and_force_redoes_them(zoo, first_run):
    root, manifest, good, bad = zoo
    again = _cli("batch", manifest, "--workers", "2", "--report", root / "report.json")
    report = json.loads((root / "report.json").read_text())
    assert again.exit_code == 2
    assert report["totals"]["skipped"] == 21 and report["totals"]["failed"] == 2 and report["totals"]["ok"] == 0
    assert again.output.count("skipped  ") == 21
    # the .npz and foreign .pt outputs have no metadata: the previous report is their record,
    # and a changed output is no longer current
    victim = root / "out/prelogits_bf16.npz"
    data = bytearray(victim.read_bytes())
    data[-100] ^= 1
    victim.write_bytes(bytes(data))
    one = _write_manifest(root / "one.jsonl", [good[6], good[2]])
    res = _cli("batch", one, "--workers", "1", "--report", root / "report.json")
    statuses = {Path(r["dst"]).name: r["status"] for r in json.loads((root / "report.json").read_text())["rows"]}
    assert res.exit_code == 0 and statuses == {"prelogits_bf16.npz": "ok", "token_timm.pth": "skipped"}
    before = (root / "out/token_timm.pth").stat()
    forced = _cli("batch", one, "--force", "-q")
    assert forced.exit_code == 0 and forced.output == ""
    after = (root / "out/token_timm.pth").stat()  # written again: a new file renamed into place
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)


def test_a_changed_source_or_option_is_converted_again(tmp_path):
    src = tmp_path / "m.npz"
    shutil.copy(golden_path("jax/tiny_token_p8_32.npz"), src)
    manifest = _write_manifest(tmp_path / "m.jsonl", [{"src": "m.npz", "dst": "m.safetensors"}])
    assert _cli("batch", manifest, "--workers", "1").exit_code == 0
    assert "skipped" in _cli("batch", manifest, "--workers", "1").output
    _write_manifest(manifest, [{"src": "m.npz", "dst": "m.safetensors", "dtype": "float16"}])
    out = _cli("batch", manifest, "--workers", "1")
    assert out.exit_code == 0 and "ok       " in out.output
    with vitconv.open_checkpoint(tmp_path / "m.safetensors") as c:
        assert c.specs()[0].dtype == np.float16
    arrays = dict(np.load(src))
    arrays["Transformer/encoder_norm/bias"] = arrays["Transformer/encoder_norm/bias"] + 1
    np.savez(src, **arrays)
    out = _cli("batch", manifest, "--workers", "1")
    assert out.exit_code == 0 and "ok       " in out.output
    with vitconv.open_checkpoint(tmp_path / "m.safetensors") as c:
        assert c.source.metadata["source_sha256"] == _sha(src)


def test_a_rerun_reads_a_source_only_when_its_fingerprint_changed(tmp_path, monkeypatch):
    """The output records the source's fingerprint (size and modification time, from
    metadata): a rerun skips on it without reading the source; a touched file (same bytes) is
    hashed once, and still skipped; changed bytes are converted again."""
    import vitconv.conversion.batch as batch
    from vitconv.conversion.batch import FINGERPRINT_KEY, Row, run_row

    src = tmp_path / "m.npz"
    shutil.copy(golden_path("jax/tiny_token_p8_32.npz"), src)
    row = Row(line=1, src=str(src), dst=str(tmp_path / "m.safetensors"))
    first = run_row(row)
    assert first.status == "ok" and first.source_fingerprint and first.source_sha256 == _sha(src)
    with vitconv.open_checkpoint(row.dst) as c:
        assert c.source.metadata[FINGERPRINT_KEY] == first.source_fingerprint
    hashed = []
    real = batch.sha256_file
    monkeypatch.setattr(batch, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    again = run_row(row)
    assert (again.status, again.source_sha256, hashed) == ("skipped", first.source_sha256, [])
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))  # touched: same bytes
    touched = run_row(row)
    assert touched.status == "skipped" and touched.source_fingerprint != first.source_fingerprint
    assert hashed == ["m.npz"]
    arrays = dict(np.load(src))
    arrays["Transformer/encoder_norm/bias"] = arrays["Transformer/encoder_norm/bias"] + 1
    np.savez(src, **arrays)  # other bytes
    changed = run_row(row)
    assert changed.status == "ok" and changed.source_sha256 == _sha(src) != first.source_sha256


def test_csv_manifest(tmp_path):
    (tmp_path / "m.csv").write_text(
        "src,dst,to,dtype,verify\n"
        f"{golden_path('jax/tiny_token_p8_32.npz')},a.safetensors,,,\n"
        f"{golden_path('jax/tiny_gap_p8_32.npz')},b,timm,float16,false\n")
    rows = read_manifest(tmp_path / "m.csv")
    assert [(r.to, r.dtype, r.verify) for r in rows] == [(None, None, True), ("timm", "float16", False)]
    out = _cli("batch", tmp_path / "m.csv", "--workers", "2", "--report", tmp_path / "r.json")
    assert out.exit_code == 0, out.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["verified"] for r in report["rows"]] == [True, False]
    assert (tmp_path / "b" / "config.json").is_file()


@pytest.mark.parametrize("name,text,message", [
    ("m.jsonl", '{"src": "a.npz", "dst": "b.pt"}\n{"src": "a.npz", "dsts": "c.pt"}\n',
     "m.jsonl: line 2: unknown key(s) 'dsts' (known: src, dst,"),
    ("m.jsonl", '{"src": "a.npz", "dst": "b.pt", "image_size": "224"}\n', "m.jsonl: line 1: image_size must be int"),
    ("m.jsonl", '{"src": "a.npz", "dst": "b.pt"}\n\n{"src": "c.npz", "dst": "./b.pt"}\n',
     "m.jsonl: line 3: dst"),
    ("m.jsonl", '{"src": "a.npz"}\n', "m.jsonl: line 1: dst is missing"),
    ("m.jsonl", "[1, 2]\n", "m.jsonl: line 1: a row must be a JSON object"),
    ("m.jsonl", "src,dst\n", "m.jsonl: line 1: not JSON"),
    ("m.jsonl", "# nothing\n\n", "m.jsonl: manifest has no rows"),
    ("m.csv", "src,dst,image_size\na.npz,b.pt,big\n", "m.csv: line 2: image_size must be an integer, got 'big'"),
    ("m.csv", "src,dst,colour\na.npz,b.pt,red\n", "m.csv: line 1: unknown column(s) 'colour'"),
    ("m.csv", "src,dst,verify\na.npz,b.pt,maybe\n", "m.csv: line 2: verify must be true or false"),
])
def test_a_bad_manifest_is_refused_before_any_work(name, text, message, tmp_path):
    (tmp_path / name).write_text(text)
    out = _cli("batch", tmp_path / name)
    assert out.exit_code == 2 and out.stderr.count("\n") == 1, out.output
    assert message in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_row_that_kills_its_worker_fails_alone_and_one_that_dies_once_is_retried(tmp_path):
    g = str(golden_path("jax/tiny_token_p8_32.npz"))
    rows = read_manifest(_write_manifest(tmp_path / "m.jsonl", [
        {"src": g, "dst": "a.safetensors"}, {"src": g, "dst": "dies.safetensors"},
        {"src": g, "dst": "dies-once.safetensors"}, {"src": g, "dst": "b.safetensors"},
        {"src": g, "dst": "c.safetensors"}]))
    results, interrupted = run_local(rows, workers=2, task=dies_on_marked_rows)
    status = {Path(r.dst).name: (r.status, r.error) for r in results}
    assert not interrupted and len(results) == 5
    assert status["dies.safetensors"][0] == "failed"
    assert "worker process died" in status["dies.safetensors"][1] and "died again" in status["dies.safetensors"][1]
    assert all(status[n][0] == "ok" for n in ("a.safetensors", "dies-once.safetensors", "b.safetensors",
                                              "c.safetensors")), status
    assert not (tmp_path / "dies.safetensors").exists()


def test_interrupt_stops_workers_leaves_no_partial_output_and_reports_what_finished(tmp_path, monkeypatch):
    """Ctrl-C reaches the batch while it waits for its workers, once the first row is in and a
    slow row holds its half-written temporary: raised there from a hook, not by a timer, so the
    moment is the same on any machine, however loaded."""
    import vitconv.conversion.batch as batch

    g = str(golden_path("jax/tiny_token_p8_32.npz"))
    rows = read_manifest(_write_manifest(tmp_path / "m.jsonl", [
        {"src": g, "dst": "a.safetensors"}, {"src": g, "dst": "slow1.safetensors"},
        {"src": g, "dst": "slow2.safetensors"}, {"src": g, "dst": "b.safetensors"}]))
    finished = []
    real_wait = batch.cf.wait

    def wait(fs, **kw):
        if finished:  # the first row is in: Ctrl-C once a slow row is mid-write
            for _ in range(1200):
                if any(p.name.startswith(".slow") for p in tmp_path.iterdir()):
                    raise KeyboardInterrupt
                time.sleep(0.1)
            raise AssertionError("no slow row started writing within 120 s")
        return real_wait(fs, **kw)

    monkeypatch.setattr(batch.cf, "wait", wait)
    results, interrupted = run_local(rows, workers=2, task=slow_writer, on_result=lambda r, d, t: finished.append(r))
    assert interrupted
    assert [Path(r.dst).name for r in results] == ["a.safetensors"]
    report = BatchReport(str(tmp_path / "m.jsonl"), results, "2", 1.0, interrupted, len(rows))
    report.write(tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["interrupted"] is True and doc["totals"]["not_run"] == 3
    # the workers were joined before run_local returned: their writers removed the temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "m.jsonl", "r.json"]


def test_ray_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from vitconv.conversion.batch import run_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BadInputError, match=r'--ray needs Ray, an optional extra: pip install "vitconv\[ray\]"'):
        run_ray([])


def test_rows_whose_reference_is_timm_run_in_workers(tmp_path):
    rows = read_manifest(_write_manifest(tmp_path / "m.jsonl", [
        {"src": str(golden_path("families/timm_siglip_map_p8_32.safetensors")), "dst": "siglip.safetensors",
         "set": "act=gelu"},  # timm's SigLIP towers use exact or tanh GELU: said, as --set says it
        {"src": str(golden_path("families/timm_dinov2_reg4_p8_32.safetensors")), "dst": "dinov2_timm", "to": "timm",
         "image_size": 48}]))
    results, _ = run_local(rows, workers=2, task=with_timm)
    assert [(r.status, r.verify["reference"].split(" ")[0].rstrip(",")) for r in sorted(results, key=lambda r: r.line)] == \
        [("ok", "timm"), ("ok", "timm")], [r.error for r in results]
