"""Hostile and broken inputs through the CLI: one line on stderr naming the file and the
problem, exit 2 (bad input) or 1 (output cannot be written), no traceback, and nothing
left in the output directory, not even a hidden temporary file.

The corpus is generated here from the shipped golden checkpoint (no binary blobs): each
builder below makes one broken file and says which words the error must contain.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _vitconv_cli.main import main
from cli_children import fork_run
from conftest import golden_path

GOLDEN = golden_path("jax/tiny_token_p8_32.npz")


def _golden() -> dict:
    with np.load(GOLDEN, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _savez(path: Path, arrays: dict) -> Path:
    with open(path, "wb") as f:  # np.savez(path) would append .npz to odd names
        np.savez(f, **arrays)
    return path


def _edit(**changes):
    """A builder: the golden arrays with some keys replaced (value) or removed (None)."""
    def build(d: Path) -> Path:
        a = _golden()
        for k, v in changes.items():
            k = k.replace("__", "/")
            if v is None:
                del a[k]
            else:
                a[k] = v(a.get(k)) if callable(v) else v
        return _savez(d / "edited.npz", a)
    return build


def _with(value_fn):
    return lambda old: value_fn(np.array(old))


def _nan(a):
    a = a.copy(); a.flat[3] = np.nan; return a


def _inf(a):
    a = a.copy(); a.flat[0] = -np.inf; return a


def _file(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _bytes(name: str, fn):
    def build(d: Path) -> Path:
        p = d / name
        p.write_bytes(fn(GOLDEN.read_bytes()))
        return p
    return build


def _corrupt_middle(raw: bytes) -> bytes:
    b = bytearray(raw)
    mid = len(b) // 3
    b[mid:mid + 64] = bytes(64)
    return bytes(b)


def _object_array(d: Path) -> Path:
    a = _golden()
    a["cls"] = np.array([{"not": "a tensor"}], dtype=object)
    p = d / "objects.npz"
    with open(p, "wb") as f:
        np.savez(f, **a)  # savez pickles object arrays; vitconv must refuse to read them
    return p


def _forged_shape(d: Path) -> Path:
    """An .npz member whose .npy header claims ~1e14 floats: must fail before allocating."""
    p = d / "forged.npz"
    with zipfile.ZipFile(GOLDEN) as src, zipfile.ZipFile(p, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "cls.npy":  # format 1.0: magic(6) version(2) len(2) header
                hlen = struct.unpack("<H", data[8:10])[0]
                header = data[10:10 + hlen].decode("latin1")
                forged = header.replace("(1, 1, 48)", "(99999, 99999, 9999)").rstrip() + "\n"
                assert forged != header.rstrip() + "\n"
                forged = forged[:-1].ljust(hlen - 1) + "\n"
                data = data[:10] + forged.encode("latin1") + data[10 + hlen:]
            out.writestr(info.filename, data)
    return p


def _random_names(d: Path) -> Path:
    rng = np.random.default_rng(0)
    return _savez(d / "random_names.npz", {f"w{i}": rng.standard_normal((4, 5)).astype(np.float32)
                                           for i in range(6)})


def _resnet_pth(d: Path) -> Path:
    p = d / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                "bn1.running_mean": torch.zeros(64), "layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3),
                "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, p)
    return p


def _torch_bytes(name: str, fn):
    def build(d: Path) -> Path:
        good = d / "good.pth"
        torch.save({"w": torch.arange(4096, dtype=torch.float32)}, good)
        p = d / name
        p.write_bytes(fn(good.read_bytes()))
        good.unlink()
        return p
    return build


def _safetensors(name: str, mutate):
    """A valid one-tensor safetensors file whose header ``mutate(header_dict, raw)`` rewrites."""
    def build(d: Path) -> Path:
        from safetensors.torch import save

        raw = save({"w": torch.zeros(4, 4)})
        n = struct.unpack("<Q", raw[:8])[0]
        header, data = raw[8:8 + n], raw[8 + n:]
        p = d / name
        p.write_bytes(mutate(header, data))
        return p
    return build


def _st_offsets(header: bytes, data: bytes) -> bytes:
    h = json.loads(header)
    h["w"]["data_offsets"] = [0, 1 << 20]
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def _st_vitconv_config(header: bytes, data: bytes) -> bytes:
    h = json.loads(header)
    h["__metadata__"] = {"format": "pt", "vitconv_config": json.dumps({"width": "wide"})}
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + data


# name -> (builder, extra CLI args, words the one-line error must contain)
CORPUS = {
    "empty": (lambda d: _file(d / "empty.npz", b""), [], "empty"),
    "text": (lambda d: _file(d / "notes.npz", b"hello"), [], "not a checkpoint"),
    "truncated_npz": (_bytes("truncated.npz", lambda r: r[: len(r) // 2]), [], "truncated zip"),
    "corrupt_npz": (_bytes("corrupt.npz", _corrupt_middle), [], "could not be read"),
    "object_array": (_object_array, [], "allow_pickle=False"),
    "forged_shape": (_forged_shape, [], "declares"),
    "wrong_shape": (_edit(head__kernel=np.zeros((47, 10), np.float32)), [], "head/kernel (47, 10)"),
    "wrong_rank": (_edit(**{"Transformer__encoderblock_0__MlpBlock_3__Dense_0__kernel":
                            np.zeros(48, np.float32)}), [], "must have 2 dimensions"),
    "missing_key": (_edit(**{"Transformer__encoderblock_1__LayerNorm_0__scale": None}), [],
                    "missing 1 key(s): Transformer/encoderblock_1/LayerNorm_0/scale"),
    "extra_key": (_edit(**{"optimizer__momentum": np.zeros(3, np.float32)}), [],
                  "unused key(s): optimizer/momentum"),
    "nan": (_edit(head__kernel=_nan), [], "head.weight contains NaN or Inf"),
    "inf": (_edit(cls=_inf), [], "cls_token contains NaN or Inf"),
    "int_weights": (_edit(embedding__kernel=lambda a: a.astype(np.int32)), [], "expected floating point"),
    "hostile_key_name": (_edit(**{"evil\nkey\x1b[31m": np.zeros(2, np.float32)}), [], "evil\\nkey\\x1b[31m"),
    "random_names_npz": (_random_names, [], "not a ViT checkpoint"),
    "resnet_pth": (_resnet_pth, [], "not a ViT checkpoint"),
    "truncated_torch_zip": (_torch_bytes("trunc.pth", lambda r: r[: len(r) // 2]), [], "truncated zip"),
    "corrupt_torch_zip": (_torch_bytes("corrupt.pth", lambda r: r[:200] + b"\xff" * 64 + r[264:]), [],
                          "not a readable PyTorch checkpoint"),
    "no_state_dict": (lambda d: torch.save({"epoch": 3, "lr": 0.1}, d / "meta.pt") or d / "meta.pt", [],
                      "holds no state dict"),
    "st_bad_length": (_safetensors("len.safetensors", lambda h, x: struct.pack("<Q", 1 << 40) + h + x), [],
                      "invalid safetensors file"),
    "st_short_length": (_safetensors("short.safetensors", lambda h, x: struct.pack("<Q", len(h) - 5) + h + x),
                        [], "invalid safetensors file"),
    "st_bad_json": (_safetensors("json.safetensors",
                                 lambda h, x: struct.pack("<Q", len(h)) + b"{" + b"x" * (len(h) - 1) + x),
                    [], "invalid JSON"),
    "st_offsets": (_safetensors("offsets.safetensors", _st_offsets), [], "offset"),
    "st_bad_config": (_safetensors("config.safetensors", _st_vitconv_config), [], "wrong type: width"),
    "image_size": (lambda d: GOLDEN, ["--image-size", "33"], "not a positive multiple of the model's stride 8"),
    "directory": (lambda d: d, [], "is a directory"),
}


def _listing(d: Path) -> list:
    return sorted(os.listdir(d))


def _check_one_line(text: str, name: str, words: str) -> None:
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("vitconv: error: "), text
    assert "\x1b" not in lines[0]  # a hostile name cannot inject terminal escapes
    assert name in lines[0] and words in lines[0], text
    assert "Traceback" not in text


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_corpus_through_cli(case, tmp_path):
    build, extra, words = CORPUS[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    src = build(inputs)
    outdir = tmp_path / "out"
    outdir.mkdir()
    r = CliRunner().invoke(main, ["npz2pt", str(src), "-o", str(outdir / "model.pt"), *extra])
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == ""
    _check_one_line(r.stderr, Path(src).name if case != "directory" else str(src), words)
    assert _listing(outdir) == []  # no output, no hidden temporary file


def test_unsafe_pickle_never_runs_code_through_cli(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hook": Evil()}, src)
    r = CliRunner().invoke(main, ["npz2pt", str(src), "-o", str(tmp_path / "x.pt")])
    assert r.exit_code == 2
    _check_one_line(r.stderr, "evil.pth", "weights_only=True")
    assert "posix.system" in r.stderr
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


# ---- real processes: the stderr and exit code a user sees ------------------------------------

def test_real_process_one_line_exit_2(tmp_path):
    """The installed entry point itself, nothing in between."""
    src = CORPUS["object_array"][0](tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "vitconv", "npz2pt", str(src), "-o", str(out / "m.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    _check_one_line(r.stderr, src.name, "allow_pickle=False")
    assert _listing(out) == []


def test_child_processes_stderr_exit_codes_and_real_write_failures(tmp_path):
    """Child processes: bad inputs, ``--debug``, and a real write failure from the kernel
    with no mocking: RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG inside torch's
    C++ zip writer and the safetensors Rust writer (unprivileged, unlike a tiny tmpfs)."""
    cases = ["truncated_npz", "corrupt_torch_zip", "st_bad_json", "hostile_key_name", "image_size"]
    srcs = {}
    for c in cases:
        (tmp_path / c).mkdir()
        srcs[c] = CORPUS[c][0](tmp_path / c)
    big = tmp_path / "big.npz"
    a = _golden()
    a["head/kernel"] = np.ones((48, 10), np.float32)
    _savez(big, a)  # ~200 KB of weights: past the limit
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    jobs = [{"args": ["npz2pt", srcs[c], "-o", out / "m.pt", *CORPUS[c][1]]} for c in cases]
    jobs.append({"args": ["--debug", "npz2pt", srcs["truncated_npz"], "-o", out / "m.pt"]})
    jobs += [{"args": ["npz2pt", big, "-o", out / f"m{s}"], "fsize": 64 * 1024}
             for s in (".pt", ".safetensors", ".npz")]
    res = fork_run(jobs, logs)
    for c, (code, stdout, stderr) in zip(cases, res):
        assert code == 2, (c, stderr)
        assert stdout == ""
        _check_one_line(stderr, srcs[c].name, CORPUS[c][2])
    code, _, stderr = res[len(cases)]
    assert code == 1 and "Traceback" in stderr and "BadInputError" in stderr
    for suffix, (code, _, stderr) in zip((".pt", ".safetensors", ".npz"), res[len(cases) + 1:]):
        assert code == 1, stderr
        _check_one_line(stderr, f"m{suffix}", "writing failed")
    assert _listing(out) == []


# ---- outputs that cannot be written ------------------------------------------------------------

def test_output_into_missing_directory(tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "m.pt"
    r = CliRunner().invoke(main, ["npz2pt", str(GOLDEN), "-o", str(out)])
    assert r.exit_code == 1, r.output
    _check_one_line(r.stderr, "m.pt", f"directory {out.parent} does not exist")
    assert not (tmp_path / "no").exists()


def test_output_under_a_file_is_unwritable(tmp_path):
    """Unwritable without chmod (tests may run as root, which ignores permissions): the
    output's parent is a regular file, so no file can ever be created there."""
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    for out in (blocker / "m.pt", blocker / "sub" / "m.pt"):
        r = CliRunner().invoke(main, ["npz2pt", str(GOLDEN), "-o", str(out)])
        assert r.exit_code == 1, r.output
        _check_one_line(r.stderr, "m.pt", f"{blocker} is a file, not a directory")
    assert _listing(tmp_path) == ["blocker"] and blocker.read_text() == "I am a file"


def test_output_that_is_a_directory(tmp_path):
    (tmp_path / "m.pt").mkdir()
    r = CliRunner().invoke(main, ["npz2pt", str(GOLDEN), "-o", str(tmp_path / "m.pt")])
    assert r.exit_code in (1, 2), r.output
    assert len(r.stderr.splitlines()) == 1 and "m.pt" in r.stderr and "Traceback" not in r.stderr
    assert _listing(tmp_path) == ["m.pt"] and _listing(tmp_path / "m.pt") == []


def test_refuses_to_overwrite_its_own_source(tmp_path):
    src = tmp_path / "model.npz"
    src.write_bytes(GOLDEN.read_bytes())
    before = src.read_bytes()
    r = CliRunner().invoke(main, ["npz2pt", str(src), "-o", str(src)])
    assert r.exit_code != 0
    _check_one_line(r.stderr, "model.npz", "would overwrite the input")
    assert src.read_bytes() == before and _listing(tmp_path) == ["model.npz"]


def test_disk_full_in_process_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC at the last moment (fsync, as delayed allocation reports it): whichever
    writer ran, the temporary file is removed and the error is one line, exit 1."""
    import vitconv.formats.atomic as atomic

    seen = []

    def full(fd):
        seen.append(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    r = CliRunner().invoke(main, ["npz2pt", str(GOLDEN), "-o", str(tmp_path / "m.pt")])
    assert seen, "the writer never reached fsync"
    assert r.exit_code == 1, r.output
    _check_one_line(r.stderr, "m.pt", "no space left on device")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("dst", ["m.pt", "m.safetensors", "m.npz", "m_hf"])
def test_writers_report_a_full_disk_and_remove_the_temp(tmp_path, dst):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the kernel refuse a write part
    way through the output, as a full disk does: every writer reports it in one line, exit 1,
    and leaves no temporary file or directory."""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
              "import _vitconv_cli.main as m\n"
              "m.main(['convert', sys.argv[1], sys.argv[2]])\n")
    r = subprocess.run([sys.executable, "-c", script, str(golden_path("jax/tiny_token_p8_32.npz")),
                        str(tmp_path / dst)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "writing failed: file too large" in r.stderr, r.stderr
    assert str(tmp_path / dst) in r.stderr
    assert _listing(tmp_path) == []


def test_hybrid_width_not_divisible_by_groups(tmp_path):
    with np.load(golden_path("jax/tiny_r50_32.npz")) as z:
        a = {k: z[k] for k in z.files}
    a["conv_root/kernel"] = np.zeros((7, 7, 3, 40), np.float32)
    src = _savez(tmp_path / "r50_w40.npz", a)
    r = CliRunner().invoke(main, ["npz2pt", str(src), "-o", str(tmp_path / "m.pt")])
    assert r.exit_code == 2, r.stderr
    assert "not a multiple of GroupNorm's 32 groups" in r.stderr and "r50_w40.npz" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "m.pt").exists()


def test_closed_stdout_exits_quietly():
    """``vitconv inspect … | head``: when the reader has gone, no 'internal error' line and
    no traceback, exit 141 (128 + SIGPIPE, what a shell reports for such a pipeline)."""
    proc = subprocess.Popen([sys.executable, "-m", "_vitconv_cli.main", "inspect",
                             str(golden_path("jax/tiny_token_p8_32.npz"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141
    assert err == b""


def test_hf_directory_onto_its_own_weights_file(tmp_path):
    import vitconv

    src = tmp_path / "vit_hf"
    vitconv.convert(GOLDEN, src, to="hf", hash_source=False)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for dst, words in ((src / "model.safetensors", "would overwrite the input"),
                       (src, "would overwrite the input")):
        r = CliRunner().invoke(main, ["convert", str(src), str(dst)])
        assert r.exit_code == 1, r.output
        _check_one_line(r.stderr, dst.name, words)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # nothing else appeared


def test_long_and_undecodable_output_names(tmp_path, monkeypatch):
    """A legal 250-byte name works (its temporary's name is shortened); a name that is not
    UTF-8 is written and printed escaped, even where stdout encodes UTF-8 strictly."""
    monkeypatch.setenv("PYTHONIOENCODING", "utf-8")  # strict: a lone surrogate cannot be printed
    long = "v" * (250 - len(".safetensors")) + ".safetensors"
    odd = os.fsdecode(b"caf\xe9 \xff.pt")  # Latin-1 bytes on a UTF-8 system
    out = tmp_path / "out"
    out.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    res = fork_run([{"args": ["convert", GOLDEN, out / long]},
                    {"args": ["npz2pt", GOLDEN, "-o", out / odd]}], logs)
    for code, stdout, stderr in res:
        assert code == 0 and stderr == "", stderr
    assert len(os.fsencode(long)) == 250
    assert "caf\\xe9 \\xff.pt" in res[1][1]
    assert sorted(os.listdir(out)) == sorted([long, odd])
    assert vitconv_load_ok(out / long) and vitconv_load_ok(out / odd)


def vitconv_load_ok(p: Path) -> bool:
    import vitconv

    return vitconv.load(p).config.depth == 2


def test_export_refuses_an_unwritable_directory_before_any_work(tmp_path, monkeypatch):
    """The directory refuses new files (EACCES, as a read-only one does for a user; tests may
    run as root, which ignores modes, so the refusal is simulated at the one call that probes
    it): the error comes before the model is even built."""
    import errno as _errno
    import tempfile

    import vitconv.conversion.loading
    import vitconv.formats.atomic as atomic

    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):
        if dir is not None and Path(dir) == locked:
            raise PermissionError(_errno.EACCES, os.strerror(_errno.EACCES))
        return real(*args, dir=dir, **kw)

    built = []
    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(vitconv.conversion.loading, "build_model", lambda *a, **k: built.append(1))
    for flag in ("--onnx", "--torchscript", "--pt2", "--safetensors"):
        r = CliRunner().invoke(main, ["export", str(GOLDEN), flag, str(locked / "m.out")])
        assert r.exit_code == 1, r.output
        _check_one_line(r.stderr, "m.out", "cannot write here: permission denied")
    assert built == [] and os.listdir(locked) == []


@pytest.mark.parametrize("flag", ["--torchscript", "--pt2", "--onnx"])
def test_export_reports_a_full_disk_instead_of_aborting(tmp_path, flag):
    """torch's C++ zip writer calls std::terminate when a write fails inside it (a 15-line
    abort and a temporary left behind); the exporters write through a file that keeps the
    error, so a full disk is one line, exit 1, and nothing left."""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
              "import _vitconv_cli.main as m\n"
              "m.main(['-q', 'export', sys.argv[1], sys.argv[2], sys.argv[3], '--no-aoti'])\n")
    dst = tmp_path / "m.out"
    r = subprocess.run([sys.executable, "-c", script, str(GOLDEN), flag, str(dst)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    _check_one_line(r.stderr, "m.out", "writing failed: file too large")
    assert _listing(tmp_path) == []
