"""Every command answers ``--help`` through the installed ``vitconv`` (found beside this
interpreter, PATH or not), says what it does and exits 0; the command list is the CLI's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from _vitconv_cli.main import COMMANDS as COMMANDS_HELP
from _vitconv_cli.main import main
from conftest import VITCONV

COMMANDS = main.list_commands(None)
SUBCOMMANDS = [("golden", name) for name in sorted(main.get_command(None, "golden").commands)]


def _help(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PATH"}  # nothing may depend on PATH
    return subprocess.run([VITCONV, *args, "--help"], capture_output=True, text=True, timeout=60, env=env)


def test_the_command_is_installed_beside_the_interpreter():
    assert os.access(VITCONV, os.X_OK), VITCONV


def test_top_level_help_lists_every_command():
    r = _help()
    assert r.returncode == 0 and r.stderr == ""
    for name in COMMANDS:
        assert f"  {name}" in r.stdout, name


@pytest.mark.parametrize("args", [(c,) for c in COMMANDS] + SUBCOMMANDS, ids=lambda a: " ".join(a))
def test_every_command_has_help(args):
    r = _help(*args)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"Usage: vitconv {' '.join(args)} "), r.stdout[:200]
    described = r.stdout.split("\n\n")[1].strip()  # the command's own docstring, first paragraph
    assert len(described) > 20, r.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_the_command_list_shows_each_command_s_own_first_line(name):
    """``vitconv --help`` lists the commands without importing them (COMMANDS keeps each one's
    first paragraph): what it shows, at any width, must be what the command itself says."""
    command = main.get_command(None, name)
    for limit in (30, 45, 67, 113, 10**6):
        ours = click.Command(name, help=COMMANDS_HELP[name]).get_short_help_str(limit)
        assert ours == command.get_short_help_str(limit), limit


def test_help_imports_no_command_and_no_library():
    code = ("import sys\nfrom _vitconv_cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('_vitconv_cli.') or m in "
            "('numpy', 'torch', 'onnx', 'onnxruntime')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['_vitconv_cli.main']"


@pytest.mark.parametrize("args", [["npz2pt", "{src}", "-o", "{out}/a.pt"],
                                  ["convert", "{src}", "{out}/b.safetensors"],
                                  ["convert", "{src}", "{out}/t.pth", "--to", "timm"],
                                  ["inspect", "{src}"]], ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_a_conversion_never_waits_for_torch(tmp_path, args):
    """Importing torch costs more than converting a small model: the commands that read and
    write weights must not import it, nor onnx or onnxruntime. (A model directory is another
    matter: its model card holds the figures of verify, which runs the model.)"""
    src = str(Path(__file__).resolve().parent.parent / "golden" / "jax" / "tiny_token_p8_32.npz")
    assert _heavy_imports([a.format(src=src, out=tmp_path) for a in args]) == "[]"


def _heavy_imports(argv) -> str:
    """Run the CLI with ``argv`` in a fresh interpreter: which of torch, onnx, onnxruntime and
    scipy it imported (printed as a sorted list)."""
    code = ("import sys\nfrom _vitconv_cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'scipy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [["convert", "{src}", "{out}/t.safetensors", "--to", "timm"],
                                  ["convert", "{src}", "{out}/c.pt"],
                                  ["inspect", "{src}"]], ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_a_safetensors_source_never_waits_for_torch(tmp_path, args):
    """The same for a ``.safetensors`` source: its tensors are read with positional reads
    (bfloat16 widened without torch), not through safetensors' torch frontend."""
    golden = Path(__file__).resolve().parent.parent / "golden" / "jax" / "tiny_token_p8_32.npz"
    src = tmp_path / "src.safetensors"
    from _vitconv_cli.main import main
    with pytest.raises(SystemExit) as e:
        main(["convert", str(golden), str(src), "--dtype", "bfloat16"])
    assert not e.value.code
    assert _heavy_imports([a.format(src=src, out=tmp_path) for a in args]) == "[]"
