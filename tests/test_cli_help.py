"""Every command answers ``--help`` through the installed ``vitconv`` (found beside this
interpreter, PATH or not), says what it does and exits 0; the command list is the CLI's own."""

from __future__ import annotations

import os
import subprocess

import pytest

from _vitconv_cli.main import main
from conftest import VITCONV

COMMANDS = sorted(main.commands)
SUBCOMMANDS = [("golden", name) for name in sorted(main.commands["golden"].commands)]


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
