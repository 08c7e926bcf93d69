"""An output, a report and an input are never one file, however spelled (``./``, ``..``, a
trailing slash, relative and absolute, a symlinked directory, a symlink, a hard link), for every
command that writes: ``convert``, ``npz2pt``, ``export``, ``batch`` (rows and ``--report``),
``golden add`` and ``inspect --plot-posembed``. Each refusal is one stderr line naming the file,
exit 1 (the output cannot go there) or 2 (a manifest that contradicts itself), and every input
is byte for byte as it was.

Also here: the batch manifest's other hostile rows (a NUL byte, an unknown target: the line is
named) and a source URL whose server accepts the connection and never answers (the row fails
by the network timeout; the good rows run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import VITCONV, golden_path

GOLDEN = golden_path("jax/tiny_token_p8_32.npz")


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _run(*args, cwd: Path, timeout: int = 240, env=None):
    return subprocess.run([VITCONV, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _one_line_error(r, code: int, *names: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitconv: error: "), r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr and "\x1b" not in r.stderr
    for n in names:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def tree(tmp_path):
    """``real/src.npz`` (the golden model), ``link`` -> ``real``, ``alias.npz`` -> the source, a
    hard link ``hard.npz`` to it, and ``real/sub/``."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    shutil.copy(GOLDEN, real / "src.npz")
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "alias.npz").symlink_to(real / "src.npz")
    os.link(real / "src.npz", tmp_path / "hard.npz")
    return tmp_path


SPELLINGS = ["real/src.npz", "./real/src.npz", "real/sub/../src.npz", "link/src.npz", "alias.npz", "hard.npz",
             "{abs}/real/src.npz", "{abs}/link/./src.npz"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_convert_npz2pt_export_refuse_to_write_over_their_source(tree, spelling):
    before = _sha(tree / "real/src.npz")
    out = spelling.format(abs=tree)
    for args in (("convert", "real/src.npz", out, "--to", "npz"), ("npz2pt", "link/src.npz", "-o", out),
                 ("export", "real/src.npz", "--torchscript", out)):
        r = _run(*args, cwd=tree)
        _one_line_error(r, 1, str(Path(out)), "would overwrite the input")
        assert _sha(tree / "real/src.npz") == before
    assert sorted(p.name for p in (tree / "real").iterdir()) == ["src.npz", "sub"]  # no temporaries


def test_export_refuses_two_artifacts_at_one_path(tree):
    r = _run("export", "real/src.npz", "--torchscript", "out.pt", "--safetensors", "./link/../out.pt", cwd=tree)
    _one_line_error(r, 1, "is also the output")
    assert not (tree / "out.pt").exists()


def test_convert_refuses_a_model_directory_over_its_own_source(tree):
    assert _run("convert", "real/src.npz", "hf", cwd=tree).returncode == 0
    before = {p.name: _sha(p) for p in (tree / "hf").iterdir()}
    for out in ("hf", "hf/", "./hf", "link/../hf"):
        r = _run("convert", "hf", out, "--to", "hf", cwd=tree)
        _one_line_error(r, 1, "would overwrite the input")
        assert {p.name: _sha(p) for p in (tree / "hf").iterdir()} == before


@pytest.mark.parametrize("spelling", ["real/src.npz", "link/src.npz", "hard.npz", "alias.npz", "real/sub/../src.npz"])
def test_inspect_plot_refuses_its_source(tree, spelling):
    pytest.importorskip("matplotlib")
    before = _sha(tree / "real/src.npz")
    r = _run("inspect", "real/src.npz", "--plot-posembed", spelling, cwd=tree)
    _one_line_error(r, 1, str(Path(spelling)), "would overwrite the input")
    assert _sha(tree / "real/src.npz") == before


@pytest.mark.parametrize("spelling", ["g/manifest.json", "./g/manifest.json", "glink/manifest.json", "mhard.json"])
def test_golden_add_refuses_an_input_that_is_its_manifest(tree, spelling):
    """The case's input named as the manifest ``golden add`` rewrites."""
    g = tree / "g"
    g.mkdir()
    (tree / "glink").symlink_to(g)
    shutil.copy(golden_path("jax/inputs_32.npy"), g / "manifest.json")
    os.link(g / "manifest.json", tree / "mhard.json")
    m = _sha(g / "manifest.json")
    r = _run("golden", "add", "case", "real/src.npz", "--input", spelling, "--expected-logits",
             "real/src.npz", "--source", "test", "--dir", "g", cwd=tree)
    _one_line_error(r, 1, "manifest.json", "would overwrite the input")
    assert _sha(g / "manifest.json") == m and sorted(p.name for p in g.iterdir()) == ["manifest.json"]


# --------------------------------------------------------------------------- batch
def _manifest(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("report", ["m.jsonl", "./m.jsonl", "link/../m.jsonl", "mlink.jsonl", "mhard.jsonl",
                                    "real/src.npz", "link/src.npz", "hard.npz", "out/a.safetensors",
                                    "out/./a.safetensors"])
def test_batch_report_is_never_the_manifest_a_source_or_an_output(tree, report):
    m = _manifest(tree / "m.jsonl", [{"src": "real/src.npz", "dst": "out/a.safetensors"}])
    (tree / "mlink.jsonl").symlink_to(m)
    os.link(m, tree / "mhard.jsonl")
    before = {p: _sha(tree / p) for p in ("m.jsonl", "real/src.npz")}
    r = _run("batch", "m.jsonl", "--workers", "1", "--report", report, cwd=tree)
    _one_line_error(r, 1, str(Path(report)), "the report would overwrite")
    assert {p: _sha(tree / p) for p in before} == before
    assert not (tree / "out").exists()  # refused before any row ran


@pytest.mark.parametrize("rows,said", [
    ([{"src": "real/src.npz", "dst": "real/x.safetensors"}, {"src": "real/src.npz", "dst": "link/x.safetensors"}],
     "line 2: dst"),
    ([{"src": "real/src.npz", "dst": "real/x.safetensors"}, {"src": "real/src.npz", "dst": "real/sub/../x.safetensors"}],
     "line 2: dst"),
    ([{"src": "real/src.npz", "dst": "link/src.npz"}], "line 1: dst"),
    ([{"src": "real/src.npz", "dst": "hard.npz"}], "line 1: dst"),
    ([{"src": "real/src.npz", "dst": "a.safetensors"}, {"src": "a.safetensors", "dst": "b.safetensors"}],
     "line 1: dst"),
    ([{"src": "real/src.npz", "dst": "x.safetensors", "to": "nonesuch"}], "line 1: unknown target"),
    ([{"src": "real/src.npz", "dst": "x.safetensors", "dtype": "float8"}], "line 1: unknown dtype"),
    ([{"src": "real/src\u0000.npz", "dst": "x.safetensors"}], "line 1: src contains a NUL byte"),
])
def test_batch_manifest_contradictions_are_refused_naming_the_line(tree, rows, said):
    _manifest(tree / "m.jsonl", rows)
    before = _sha(tree / "real/src.npz")
    r = _run("batch", "m.jsonl", "--workers", "1", cwd=tree)
    _one_line_error(r, 2, "m.jsonl", said)
    assert _sha(tree / "real/src.npz") == before
    assert not list(tree.glob("*.safetensors")) and not list((tree / "real").glob("*.safetensors"))


@pytest.mark.parametrize("dst", ["zoo.pt", "./zoo.pt", "link/../zoo.pt", "zlink.pt"])
def test_batch_row_writing_over_its_manifest_is_refused(tree, dst):
    """A JSON Lines manifest may have any name, a ``.pt`` one included."""
    m = _manifest(tree / "zoo.pt", [{"src": "real/src.npz", "dst": dst}])
    (tree / "zlink.pt").symlink_to(m)
    before = _sha(m)
    r = _run("batch", "zoo.pt", "--workers", "1", cwd=tree)
    _one_line_error(r, 2, "zoo.pt", "line 1: dst", "is the manifest itself")
    assert _sha(m) == before


def test_batch_csv_with_a_nul_byte_names_the_line(tree):
    (tree / "m.csv").write_bytes(b"src,dst\nreal/src.npz,a.safetensors\nreal/src.npz,b\x00.safetensors\n")
    r = _run("batch", "m.csv", "--workers", "1", cwd=tree)
    _one_line_error(r, 2, "m.csv", "line 3: dst contains a NUL byte")


class _SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def __exit__(self, *exc):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_batch_row_whose_server_never_answers_fails_by_timeout_and_the_others_run(tree):
    pytest.importorskip("aiohttp")
    with _SilentServer() as server:
        _manifest(tree / "m.jsonl", [{"src": f"{server.url}/a.npz", "dst": "out/h.safetensors"},
                                     {"src": "real/src.npz", "dst": "out/a.safetensors"},
                                     {"src": f"{server.url}/dir/b.npz", "dst": "out/h2.safetensors"},
                                     {"src": "link/src.npz", "dst": "out/b.safetensors"}])
        start = time.monotonic()
        r = _run("batch", "m.jsonl", "--workers", "2", "--report", "report.json", cwd=tree,
                 env={"VITCONV_NETWORK_TIMEOUT": "1"})
        took = time.monotonic() - start
    assert r.returncode == 2, r.stderr
    assert took < 120, took  # 1 s timeouts: a few per row; without them this never returns
    errors = [l for l in r.stderr.splitlines() if l.startswith("vitconv: error: line")]
    assert len(errors) == 2 and "Traceback" not in r.stderr
    for line, name in zip(errors, ("a.npz", "b.npz")):
        assert "no answer within 1 s" in line and name in line
    assert {e.split(":")[2].strip() for e in errors} == {"line 1", "line 3"}
    report = {row["line"]: row for row in json.loads((tree / "report.json").read_text())["rows"]}
    assert [report[n]["status"] for n in (1, 2, 3, 4)] == ["failed", "ok", "failed", "ok"]
    assert (tree / "out/a.safetensors").is_file() and (tree / "out/b.safetensors").is_file()
    assert not (tree / "out/h.safetensors").exists()


def test_golden_add_refuses_two_files_copied_to_one_name(tree):
    """A checkpoint and an input from different folders with one name would both be copied to
    ``cases/NAME/x.npy``: the second would replace the first."""
    (tree / "a").mkdir()
    (tree / "b").mkdir()
    shutil.copy(GOLDEN, tree / "a" / "x.npy")  # an .npz by its bytes, whatever its name
    shutil.copy(golden_path("jax/inputs_32.npy"), tree / "b" / "x.npy")
    r = _run("golden", "add", "case", "a/x.npy", "--input", "b/x.npy", "--expected-logits",
             golden_path("jax/tiny_token_p8_32.logits.npy"), "--source", "test", "--dir", "g", cwd=tree)
    _one_line_error(r, 1, "cases/case/x.npy", "is also the output")
    assert not (tree / "g" / "manifest.json").exists() and not (tree / "g" / "cases" / "case" / "x.npy").exists()
