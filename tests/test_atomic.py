"""Outputs appear complete or not at all: temp file in the target directory, renamed into
place only when whole; killed writers leave only hidden temporaries, which the next
write to the same target removes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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
        "        time.sleep(30)\n"
        "import _vitconv_cli.npz2pt as n\n"
        "n.convert = slow\n"
        "m.main(['npz2pt', sys.argv[2], '-o', sys.argv[1]])\n")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt"),
                        str(golden_path("jax/tiny_token_p8_32.npz"))],
                       capture_output=True, text=True, timeout=120)
    assert time.time() - t0 < 25  # it did not sleep through the signal
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


# ---- SIGKILL at random moments --------------------------------------------------------------

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
#: its own pid, killed by a real SIGKILL) so the 20 trials do not pay torch's import 20 times.
#: Trial 0 runs to completion and times when the temp file appears and when the output does;
#: odd trials are killed at a random moment of the whole run, even ones at a random moment
#: after the temp file appeared (the write itself), seeded; the last trial is left to finish.
KILL_DRIVER = r"""
import json, os, random, signal, sys, time
from pathlib import Path
from _vitconv_cli.main import main
src, outdir, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rng = random.Random(20240607)

def child(out):
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            main(["-q", "npz2pt", src, "-o", str(out)])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid

def temp_of(out):
    # a temporary holding bytes: not the empty probe check_writable makes and removes first
    found = []
    for x in os.listdir(outdir):
        if x.startswith("." + out.name + "."):
            try:
                if os.path.getsize(os.path.join(outdir, x)) > 0:
                    found.append(x)
            except OSError:
                pass
    return found

out = outdir / "ref.pt"
t0 = time.monotonic(); pid = child(out); t_tmp = None
while True:
    if t_tmp is None and temp_of(out):
        t_tmp = time.monotonic() - t0
    if os.waitpid(pid, os.WNOHANG)[0]:
        break
    time.sleep(0.0005)
t_done = time.monotonic() - t0
trials = []
for i in range(1, n + 1):
    out = outdir / f"out{i}.pt"
    t0 = time.monotonic(); pid = child(out)
    if i == n:
        pass  # the last trial is never killed: both outcomes are always seen, whatever the load
    elif i % 2:
        time.sleep(rng.uniform(0, 1.1 * t_done))
    else:
        while not temp_of(out) and not os.waitpid(pid, os.WNOHANG)[0] and time.monotonic() - t0 < 60:
            time.sleep(0.0005)
        # one in four dies the instant its temp file appears (surely mid-write), the others
        # at a random moment of the write
        time.sleep(0 if i % 4 == 0 else rng.uniform(0, t_done - (t_tmp or 0)))
    if i != n:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = 0
    trials.append([out.name, time.monotonic() - t0, os.waitstatus_to_exitcode(status) if status else 0])
print(json.dumps({"t_tmp": t_tmp, "t_done": t_done, "trials": trials}))
"""


def test_sigkill_at_random_moments_never_leaves_a_partial_output(tmp_path):
    src = tmp_path / "src" / "big.npz"
    src.parent.mkdir()
    google_npz(src, width=256, depth=6, heads=4, mlp=1024, patch=16, image=64, classes=10, seed=0)
    assert os.path.getsize(src) > 15e6
    outdir = tmp_path / "out"
    outdir.mkdir()
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(src), str(outdir), "20"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["t_tmp"] is not None and (outdir / "ref.pt").exists()
    ref = torch.load(outdir / "ref.pt", weights_only=True)["state_dict"]
    complete = killed_mid_write = 0
    for name, _, code in res["trials"]:
        out = outdir / name
        temps = [n for n in os.listdir(outdir) if n.startswith(f".{name}.")]
        if out.exists():  # then it must be whole: loads and equals the uninterrupted output
            sd = torch.load(out, weights_only=True)["state_dict"]
            assert sd.keys() == ref.keys()
            assert all(torch.equal(sd[k], ref[k]) for k in ref)
            complete += 1
        elif temps:
            assert code == -signal.SIGKILL
            killed_mid_write += 1
    # the kills did land inside the write, and some runs finished: the test saw both sides
    assert killed_mid_write >= 3 and complete >= 1, res
    leftovers = _hidden_temps(outdir)
    assert leftovers  # SIGKILL cannot be cleaned up by the killed process ...
    # ... the next write to the same target removes the dead writer's temporary
    victim = next(n for n in leftovers)
    target = outdir / victim[1:].split(".pt.")[0]
    target = target.with_name(target.name + ".pt")
    r = CliRunner().invoke(main, ["-q", "npz2pt", str(golden_path("jax/tiny_token_p8_32.npz")),
                                  "-o", str(target)])
    assert r.exit_code == 0, r.output
    assert not any(n.startswith(f".{target.name}.") for n in os.listdir(outdir))
    print(f"sigkill: t_tmp {res['t_tmp']:.2f}s t_done {res['t_done']:.2f}s; {complete} complete, "
          f"{killed_mid_write} killed mid-write of 20; {time.time() - t0:.1f}s")


#: A directory output (``convert … --to hf``) whose writer signals its own process once the
#: weights file is half written inside the hidden temporary directory (the writes run on a
#: worker thread; the signal reaches the main thread, which unwinds and joins it).
SIGNAL_MID_DIRECTORY = (
    "import os, signal, sys\n"
    "import vitconv.formats.safetensors_stream as s\n"
    "real = s.SafetensorsStreamWriter._write\n"
    "def write(self, index, a):\n"
    "    real(self, index, a)\n"
    "    if index == 3:\n"
    "        os.kill(os.getpid(), getattr(signal, sys.argv[3]))\n"
    "s.SafetensorsStreamWriter._write = write\n"
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
    from vitconv.export import onnx_stream
    from vitconv.export import ExportPlan, run_export

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
