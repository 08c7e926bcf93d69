"""Outputs appear complete or not at all: temp file in the target directory, renamed into
place only when whole; killed writers leave only hidden temporaries, which the next
write to the same target removes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from _vitconv_cli.main import main
from vitconv.errors import OutputError
from vitconv.formats.atomic import atomic_output, stale_temporaries
from conftest import golden_path


def _hidden_temps(d: Path) -> list:
    return sorted(n for n in os.listdir(d) if n.startswith("."))


# ---- the context manager itself -------------------------------------------------------------

def test_success_renames_and_leaves_no_temp(tmp_path):
    out = tmp_path / "a.bin"
    with atomic_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"hello")
        assert not out.exists()  # nothing under the final name until the block completes
    assert out.read_bytes() == b"hello" and os.listdir(tmp_path) == ["a.bin"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path):
    out = tmp_path / "a.bin"
    out.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            1 / 0
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_oserror_becomes_output_error(tmp_path):
    import errno

    with pytest.raises(OutputError, match="a.bin: writing failed: no space left on device"):
        with atomic_output(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert os.listdir(tmp_path) == []


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that existed and is gone
    stale = tmp_path / f".m.pt.{dead.pid}.abcd_123.tmp"
    live = tmp_path / f".m.pt.{os.getppid()}.abcd_456.tmp"  # our parent: alive
    other = tmp_path / f".n.pt.{dead.pid}.abcd_789.tmp"  # another target: not ours to judge
    user = tmp_path / ".m.pt.notes"  # a user's file that merely looks similar
    for p in (stale, live, other, user):
        p.write_bytes(b"x")
    assert stale_temporaries(tmp_path / "m.pt") == [stale]
    with atomic_output(tmp_path / "m.pt") as tmp:
        tmp.write_bytes(b"new")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.pt", live.name, other.name, user.name])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_an_input_named_like_a_stale_temporary_is_never_removed(suffix, tmp_path):
    """A killed run's leftover converted again, to the output it was meant for: the input is
    read, so it is not taken for a stale temporary (the writer used to delete it before reading
    it, or after, leaving no input); a real leftover beside it still goes."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    made = tmp_path / f"made{suffix}"
    if suffix == ".npz":
        made.write_bytes(golden_path("jax/tiny_token_p8_32.npz").read_bytes())
    else:
        assert CliRunner().invoke(main, ["-q", "convert", str(golden_path("jax/tiny_token_p8_32.npz")),
                                         str(made)]).exit_code == 0
    src = tmp_path / f".m.safetensors.{dead.pid}.abcdefgh.tmp"
    os.rename(made, src)
    before = src.read_bytes()
    leftover = tmp_path / f".m.safetensors.{dead.pid}.zyxwvut_.tmp"
    leftover.write_bytes(b"half")
    result = CliRunner().invoke(main, ["-q", "convert", str(src), str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0, result.output
    assert src.read_bytes() == before and (tmp_path / "m.safetensors").is_file()
    assert not leftover.exists()


def test_sigterm_unwinds_and_cleans_up(tmp_path):
    """The CLI turns SIGTERM into an exception, so the temp file goes as on Ctrl-C."""
    script = (
        "import os, signal, sys, time\n"
        "from pathlib import Path\n"
        "import _vitconv_cli.main as m\n"
        "import vitconv.formats.atomic as a\n"
        "def slow(*args, **kw):\n"
        "    with a.atomic_output(Path(sys.argv[1])) as tmp:\n"
        "        tmp.write_bytes(b'partial')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(600)\n"
        "import _vitconv_cli.npz2pt as n\n"
        "n.convert = slow\n"
        "m.main(['npz2pt', sys.argv[2], '-o', sys.argv[1]])\n")
    # a handler that did not unwind at once would sleep 600 s, past this timeout
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt"),
                        str(golden_path("jax/tiny_token_p8_32.npz"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 143 and r.stderr.strip() == "vitconv: terminated", r.stderr
    assert os.listdir(tmp_path) == []


def test_every_output_format_goes_through_a_temp(tmp_path, monkeypatch):
    """Each writer's bytes land under a hidden temporary name first (torch.save and
    safetensors' save_file included), never straight under the final name."""
    import vitconv.formats.atomic as atomic

    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", spy)
    for suffix in (".pt", ".safetensors", ".npz"):
        r = CliRunner().invoke(main, ["npz2pt", str(golden_path("jax/tiny_gap_p8_32.npz")),
                                      "-o", str(tmp_path / f"m{suffix}")])
        assert r.exit_code == 0, r.output
    finals = [d for _, d in renames]
    assert sorted(finals) == ["m.npz", "m.pt", "m.safetensors"]
    assert all(s.startswith(f".{d}.") and s.endswith(".tmp") for s, d in renames)
    assert sorted(os.listdir(tmp_path)) == ["m.npz", "m.pt", "m.safetensors"]


# ---- SIGKILL at every moment ----------------------------------------------------------------

def google_npz(path: Path, width: int, depth: int, heads: int, mlp: int, patch: int, image: int,
               classes: int, seed: int) -> None:
    """A synthetic checkpoint in Google's layout (key names and shapes of vit_jax), random
    weights from a seeded generator."""
    rng = np.random.default_rng(seed)
    hd, g = width // heads, image // patch

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    a = {"embedding/kernel": w(patch, patch, 3, width), "embedding/bias": w(width), "cls": w(1, 1, width),
         "Transformer/posembed_input/pos_embedding": w(1, g * g + 1, width),
         "Transformer/encoder_norm/scale": w(width), "Transformer/encoder_norm/bias": w(width),
         "head/kernel": w(width, classes), "head/bias": w(classes)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        at = b + "MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            a[at + n + "/kernel"], a[at + n + "/bias"] = w(width, heads, hd), w(heads, hd)
        a[at + "out/kernel"], a[at + "out/bias"] = w(heads, hd, width), w(width)
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[b + ln + "/scale"], a[b + ln + "/bias"] = w(width), w(width)
        a[b + "MlpBlock_3/Dense_0/kernel"], a[b + "MlpBlock_3/Dense_0/bias"] = w(width, mlp), w(mlp)
        a[b + "MlpBlock_3/Dense_1/kernel"], a[b + "MlpBlock_3/Dense_1/bias"] = w(mlp, width), w(width)
    with open(path, "wb") as f:
        np.savez(f, **a)


#: Imports the CLI once, then forks one ``vitconv -q npz2pt`` child per trial (a real process:
#: its own pid, killed by a real SIGKILL) so the trials do not pay the imports each time. Each
#: child kills itself from a hook at one chosen moment: after the writer thread has written
#: record K of the archive (K = 0 is data.pkl, then the small records, then the tensors), as the fsynced temporary is
#: about to be renamed into place, or just after the rename. No clock, no chance: every
#: moment of the write is reached on any machine, however loaded.
KILL_DRIVER = r"""
import json, os, signal, sys
from pathlib import Path
import vitconv.formats.torch_pt_stream as pt
from _vitconv_cli.main import main
src, outdir = sys.argv[1], Path(sys.argv[2])
moments = json.loads(sys.argv[3])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def child(out, moment):
    pid = os.fork()
    if pid == 0:
        if moment.startswith("record "):  # small records go through _record, tensors through _stored
            k, seen = int(moment.split()[1]), []
            def counting(real):
                def record(self, name, data):
                    got = real(self, name, data)
                    seen.append(name)
                    if len(seen) == k + 1:
                        die()
                    return got
                return record
            pt.PtStreamWriter._record = counting(pt.PtStreamWriter._record)
            pt.PtStreamWriter._stored = counting(pt.PtStreamWriter._stored)
        elif moment in ("before rename", "after rename"):
            real_replace = os.replace
            def replace(a, b):
                if moment == "before rename":
                    die()
                real_replace(a, b)
                die()
            os.replace = replace
        code = 70
        try:
            main(["-q", "npz2pt", src, "-o", str(out)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid

trials = []
for i, moment in enumerate(["none"] + moments):
    out = outdir / ("ref.pt" if i == 0 else f"out{i}.pt")
    _, status = os.waitpid(child(out, moment), 0)
    trials.append([out.name, moment, os.waitstatus_to_exitcode(status)])
print(json.dumps(trials))
"""


def test_sigkill_at_every_moment_of_the_write_never_leaves_a_partial_output(tmp_path):
    src = tmp_path / "src" / "big.npz"
    src.parent.mkdir()
    google_npz(src, width=256, depth=6, heads=4, mlp=1024, patch=16, image=64, classes=10, seed=0)
    outdir = tmp_path / "out"
    outdir.mkdir()
    # data.pkl and three small records, then the tensors: class token, position table, patch
    # kernel and bias, 12 per block, final norm and head; "version" comes last
    last_tensor = 4 + 4 + 6 * 12 + 4 - 1
    moments = [f"record {k}" for k in (0, 1, 3, 4, 10, 40, last_tensor)] + ["before rename", "after rename"]
    r = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(src), str(outdir), json.dumps(moments)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    trials = json.loads(r.stdout)
    assert trials[0] == ["ref.pt", "none", 0]
    ref = torch.load(outdir / "ref.pt", weights_only=True)["state_dict"]
    for name, moment, code in trials[1:]:
        assert code == -signal.SIGKILL, (moment, code)  # every hook was reached: the kill landed there
        out = outdir / name
        temps = [n for n in os.listdir(outdir) if n.startswith(f".{name}.")]
        if moment == "after rename":  # then it must be whole: loads and equals the uninterrupted output
            sd = torch.load(out, weights_only=True)["state_dict"]
            assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
        else:  # killed mid-write: no output, and the dead writer's temporary is still there
            assert not out.exists() and len(temps) == 1, (moment, temps)
    # SIGKILL cannot be cleaned up by the killed process: the next write to the same target
    # removes the dead writer's temporary
    target = outdir / "out1.pt"
    r = CliRunner().invoke(main, ["-q", "npz2pt", str(golden_path("jax/tiny_token_p8_32.npz")),
                                  "-o", str(target)])
    assert r.exit_code == 0, r.output
    assert not any(n.startswith(f".{target.name}.") for n in os.listdir(outdir))


#: A directory output (``convert … --to hf``) that signals its own process once the weights
#: file is half written inside the hidden temporary directory: from the main thread, as it
#: hands the fifth tensor to the writer thread (the fourth may still be in flight), so the
#: handler runs there and then, whatever the machine's load (a signal sent from the writer
#: thread is handled whenever the main thread next runs Python, which on a busy machine
#: could be after the conversion had finished).
SIGNAL_MID_DIRECTORY = (
    "import os, signal, sys\n"
    "import vitconv.conversion.pipeline as p\n"
    "real = p._Pipelined.write\n"
    "calls = []\n"
    "def write(self, name, array, nbytes):\n"
    "    calls.append(name)\n"
    "    if len(calls) == 5:\n"
    "        os.kill(os.getpid(), getattr(signal, sys.argv[3]))\n"
    "    real(self, name, array, nbytes)\n"
    "p._Pipelined.write = write\n"
    "import _vitconv_cli.main as m\n"
    "m.main(['convert', sys.argv[1], sys.argv[2], '--to', 'hf'])\n")


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143), ("SIGKILL", -9)])
def test_signal_while_a_directory_is_written(tmp_path, sig, code):
    """Ctrl-C and SIGTERM remove the half-written hidden directory; SIGKILL cannot, and the
    next write to the same target removes the dead writer's directory."""
    out = tmp_path / "out"
    out.mkdir()
    src = golden_path("jax/tiny_token_p8_32.npz")
    r = subprocess.run([sys.executable, "-c", SIGNAL_MID_DIRECTORY, str(src), str(out / "vit_hf"), sig],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    left = os.listdir(out)
    if sig != "SIGKILL":
        assert left == [] and r.stderr.strip() == f"vitconv: {'interrupted' if sig == 'SIGINT' else 'terminated'}"
        return
    assert len(left) == 1 and left[0].startswith(".vit_hf.") and (out / left[0]).is_dir()
    r = CliRunner().invoke(main, ["-q", "convert", str(src), str(out / "vit_hf"), "--to", "hf"])
    assert r.exit_code == 0, r.output
    assert os.listdir(out) == ["vit_hf"]
    assert sorted(os.listdir(out / "vit_hf")) == ["README.md", "config.json", "model.safetensors",
                                                  "preprocessor_config.json"]


def test_outputs_get_the_umask_mode(tmp_path, monkeypatch):
    """Every output, model directories and ONNX external data included, has the mode the
    user's umask gives a new file (mkstemp/mkdtemp make 0600/0700; onnx writes its external
    data 0600)."""
    import vitconv
    from vitconv.runtime.export import onnx_stream
    from vitconv.runtime.export import ExportPlan, run_export

    old = os.umask(0o027)
    try:
        src = golden_path("jax/tiny_token_p8_32.npz")
        vitconv.convert(src, tmp_path / "vit_hf", to="hf", hash_source=False)
        vitconv.convert(src, tmp_path / "m.safetensors", hash_source=False)
        monkeypatch.setattr(onnx_stream, "INLINE_LIMIT", 1000)  # external data at any size
        run_export(src, ExportPlan(onnx=tmp_path / "m.onnx"))
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"vit_hf": 0o750, "vit_hf/config.json": 0o640, "vit_hf/model.safetensors": 0o640,
                     "vit_hf/preprocessor_config.json": 0o640, "vit_hf/README.md": 0o640,
                     "m.safetensors": 0o640, "m.onnx": 0o640, "m.onnx.data": 0o640}
