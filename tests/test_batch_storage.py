"""``vitconv batch`` and the single commands on object storage: an S3 API (moto's server, as
s3fs's own tests use it) and a range-capable HTTP server, both on 127.0.0.1 only; and the
same rows as Ray tasks on a local Ray instance with 2 CPUs."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from click.testing import CliRunner

from batch_helpers import RangeServer
from conftest import golden_path
from vitconv.formats import storage
from vitconv.conversion.batch import run_batch

TOKEN = golden_path("jax/tiny_token_p8_32.npz")
GAP = golden_path("jax/tiny_gap_p8_32.npz")


def _cli(*args):
    from _vitconv_cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1; fsspec's ``s3`` config (and the environment, for worker
    processes) points s3fs at it."""
    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir("zoo")
    fs.put_file(str(TOKEN), "zoo/src/token.npz")
    fs.put_file(str(GAP), "zoo/src/gap.npz")
    try:
        yield fs
    finally:
        fsspec.config.conf["s3"].pop("endpoint_url", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_single_commands_take_urls(s3, tmp_path):
    out = _cli("convert", "s3://zoo/src/token.npz", "s3://zoo/single/token_hf", "--verify")
    assert out.exit_code == 0, out.output
    assert "verified  OK: 9 stage(s)" in out.output and "s3://zoo/single/token_hf" in out.output
    assert sorted(p.rsplit("/", 1)[-1] for p in s3.ls("zoo/single/token_hf")) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    meta = storage.safetensors_metadata("s3://zoo/single/token_hf/model.safetensors")  # two range reads
    assert meta["source_sha256"] == _sha(TOKEN.read_bytes()) and meta["vitconv_verified"] == "true"
    ok = _cli("convert", "s3://zoo/src/token.npz", tmp_path / "t.safetensors")
    assert ok.exit_code == 0 and (tmp_path / "t.safetensors").is_file()
    check = _cli("verify", "s3://zoo/src/token.npz", tmp_path / "t.safetensors")
    assert check.exit_code == 0 and "OK:" in check.output
    assert _cli("inspect", "s3://zoo/src/token.npz").exit_code == 0
    missing = _cli("convert", "s3://zoo/src/nothing.npz", tmp_path / "n.safetensors")
    assert missing.exit_code == 2 and missing.stderr == "vitconv: error: s3://zoo/src/nothing.npz: no such object\n"
    bad = _cli("convert", "s3://zoo/src/gap.npz", "s3://zoo/single/gap_j.pth", "--to", "jeonsworld")
    assert bad.exit_code == 2 and bad.stderr.startswith("vitconv: error: s3://zoo/single/gap_j.pth: the jeonsworld")
    assert not s3.exists("zoo/single/gap_j.pth")


def test_batch_from_http_and_s3_to_s3_resumes_from_remote_metadata(s3, tmp_path):
    with RangeServer(golden_path("jax")) as http:
        rows = [
            {"src": f"{http.url}/tiny_token_p8_32.npz", "dst": "s3://zoo/out/http_token.safetensors"},
            {"src": "s3://zoo/src/token.npz", "dst": "s3://zoo/out/token_hf"},
            {"src": "s3://zoo/src/gap.npz", "dst": "s3://zoo/out/gap_timm", "to": "timm"},
            {"src": "s3://zoo/src/gap.npz", "dst": "local/gap.safetensors", "dtype": "bfloat16"},
            {"src": "s3://zoo/src/absent.npz", "dst": "s3://zoo/out/absent.safetensors"},
        ]
        (tmp_path / "local").mkdir()
        (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        first = run_batch(tmp_path / "m.jsonl", workers=2, report=tmp_path / "r.json")
        status = {r.dst.rsplit("/", 1)[-1]: r for r in first.rows}
        assert [status[n].status for n in ("http_token.safetensors", "token_hf", "gap_timm", "gap.safetensors")] == \
            ["ok"] * 4, [(r.dst, r.error) for r in first.rows]
        assert status["absent.safetensors"].status == "failed"
        assert status["absent.safetensors"].error == "line 5: s3://zoo/src/absent.npz: no such object"
        # the HTTP source was read in ranges, once: no byte of it twice
        got = [s for s in http.sent if s[0] == "/tiny_token_p8_32.npz"]
        assert got and all(r is not None for _, r, _ in got)
        assert sum(n for _, _, n in got) == TOKEN.stat().st_size
        assert status["http_token.safetensors"].source_sha256 == _sha(TOKEN.read_bytes())
        for r in first.rows:
            for url, digest in r.outputs.items() if r.dst.startswith("s3://") else ():
                assert url.startswith("s3://zoo/out/") and _sha(s3.cat_file(url[5:])) == digest
        sent = len(http.sent)
        again = run_batch(tmp_path / "m.jsonl", workers=2)
        assert [r.status for r in sorted(again.rows, key=lambda r: r.line)] == ["skipped"] * 4 + ["failed"]
        # decided from the ETag the outputs recorded: not one byte of the sources read again
        assert http.sent[sent:] == []
        assert [r.source_sha256 for r in sorted(again.rows, key=lambda r: r.line)][:4] == \
            [r.source_sha256 for r in sorted(first.rows, key=lambda r: r.line)][:4]


def test_the_same_rows_as_ray_tasks(s3, tmp_path):
    rows = [{"src": "s3://zoo/src/token.npz", "dst": "s3://zoo/ray/token.safetensors"},
            {"src": str(GAP), "dst": "gap_timm", "to": "timm"},
            {"src": str(TOKEN), "dst": "j.pth", "to": "jeonsworld"},  # computes otherwise: fails verify
            {"src": str(golden_path("README.md")), "dst": "x.safetensors"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_batch(tmp_path / "m.jsonl", ray=True, ray_num_cpus=2, report=tmp_path / "r.json")
    got = {r.line: (r.status, r.exit_code) for r in report.rows}
    assert got == {1: ("ok", 0), 2: ("ok", 0), 3: ("failed", 3), 4: ("failed", 2)}, report.rows
    assert report.workers == "ray (local)"
    assert s3.exists("zoo/ray/token.safetensors") and (tmp_path / "gap_timm" / "model.safetensors").is_file()
    assert not (tmp_path / "j.pth").exists()
    local = run_batch(tmp_path / "m.jsonl", workers=2)  # and locally: the same verdicts, the good rows skipped
    assert {r.line: r.status for r in local.rows} == {1: "skipped", 2: "skipped", 3: "failed", 4: "failed"}
    assert {r.error for r in local.rows if r.status == "failed"} == {r.error for r in report.rows
                                                                     if r.status == "failed"}
