"""The ``vitconv`` command group and its error handling.

Every :class:`vitconv.VitconvError` becomes one line on stderr (``vitconv: error: FILE:
problem``) and its exit code (2 for bad input); anything unexpected becomes one line too,
with ``--debug`` to see the traceback.
"""

from __future__ import annotations

import codecs
import contextlib
import importlib
import io
import os
import signal
import sys
import threading
from typing import List

#: numpy's OpenBLAS starts a thread per core when numpy is imported, and each spins about 0.1 s
#: of CPU waiting for work before it sleeps; vitconv's commands rarely give it any (the NumPy
#: references of verify do). 2^4 cycles of spinning instead: ViT-L/16 npz2pt used 0.1 s less
#: CPU, and on two cores finished 0.05-0.3 s sooner (four runs each, taking turns); a NumPy
#: matrix-product loop, the most it could cost, measured within noise (2026-12-07). Set here,
#: before anything imports numpy; a user's own setting wins. The library leaves it alone.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import click  # noqa: E402 (after the setting above, as is every import that may import numpy)

from vitconv import __version__  # noqa: E402
from vitconv.errors import VitconvError, failure, one_line  # noqa: E402

#: Each command lives in the module of its name in this package, and is imported only when it
#: runs: the library behind a command (numpy, torch, onnxruntime) is not loaded for another one
#: or for ``--help``. The line ``vitconv --help`` shows for each is kept here for that reason;
#: ``tests/test_cli_help.py`` checks it against the command's own docstring.
COMMANDS = {
    "batch": "Convert and verify every checkpoint a MANIFEST lists, each row exactly as `vitconv convert "
             "SRC DST --verify` would, in parallel; resumable; a failed row does not stop the rest.",
    "bench": "Measure inference per runtime, or conversion cost (--convert), side by side in one run.",
    "convert": "Convert a ViT checkpoint between layouts: Google .npz, canonical, timm, Hugging Face, "
               "jeonsworld, vit-pytorch.",
    "export": "Export a ViT checkpoint to ONNX, TorchScript, .pt2 and safetensors; every artifact is "
              "loaded back in its runtime and compared with the PyTorch model (exit 3 past tolerance).",
    "golden": "The golden regression suite: cases whose outputs come from independent code.",
    "inspect": "Show what a checkpoint or ONNX file holds, without converting it.",
    "npz2pt": "Convert a Google JAX/Flax ViT .npz (vit_jax or big_vision: SigLIP, FlexiViT, ...) into "
              "the canonical PyTorch ViT.",
    "predict": "What the model sees in each image: the top classes with probabilities (and labels when "
               "known), or the embedding of a model without a classifier.",
    "verify": "Check CONVERTED against SRC, stage by stage, and name the first stage past tolerance.",
}


class VitconvGroup(click.Group):
    """Turns every failure into one line on stderr and an exit code: a
    :class:`VitconvError` its own code (2 bad input, 1 unwritable output, 3 verification),
    anything else 1 as an internal error. ``--debug`` re-raises for the traceback.

    SIGTERM is turned into an exception while a command runs, so writers unwind and
    remove their temporary files as they do on Ctrl-C (SIGKILL cannot be caught; see
    :mod:`vitconv.formats.atomic` for how its leftovers are cleaned)."""

    #: Global flags a user may also write after the subcommand (``vitconv npz2pt X -q``).
    GLOBAL_FLAGS = ("-q", "--quiet", "--debug")

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        """The command ``name``, its module imported now (see :data:`COMMANDS`)."""
        if name not in COMMANDS:
            return None
        return getattr(importlib.import_module(f"{__package__}.{name}"), name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list, from :data:`COMMANDS`, without importing a command; each line
        shortened as click shortens a command's own help."""
        limit = formatter.width - 6 - max(map(len, COMMANDS))
        with formatter.section("Commands"):
            formatter.write_dl([(name, click.Command(name, help=text).get_short_help_str(limit))
                                for name, text in sorted(COMMANDS.items())])

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        """Global flags found after the subcommand (before a ``--``) move in front of it."""
        end = args.index("--") if "--" in args else len(args)
        flags = [a for a in args[:end] if a in self.GLOBAL_FLAGS]
        rest = [a for a in args[:end] if a not in self.GLOBAL_FLAGS] + args[end:]
        return super().parse_args(ctx, flags + rest)

    def invoke(self, ctx: click.Context):
        for stream in (sys.stdout, sys.stderr):  # a file name that is not text prints escaped
            with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
                stream.reconfigure(errors=_ESCAPE)
        with _sigterm_unwinds():
            return self._invoke(ctx)

    def _invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VitconvError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"vitconv: error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:  # bad arguments are bad input too: one line, exit 2
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{e.ctx.command_path} --help" if e.ctx else "vitconv --help"
            click.secho(f"vitconv: error: {one_line(e.format_message())} (see {where})",
                        fg="red", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except _Terminated:
            click.secho("vitconv: terminated", fg="red", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.secho("vitconv: interrupted", fg="red", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `vitconv inspect … | head`: the reader left; say nothing more
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the exit-time flush cannot fail again
            ctx.exit(141)
        except Exception as e:  # out of memory; or a bug in vitconv, not the user's fault: still one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            text, code = failure(e)  # the text a batch row's failure has too
            if isinstance(e, MemoryError) or code == 2:  # not vitconv's bug: no traceback to offer
                click.secho(f"vitconv: error: {text}", fg="red", err=True)
            else:
                click.secho(f"vitconv: {text} (run with --debug for a traceback)", fg="red", err=True)
            ctx.exit(code)


def _escape(e: UnicodeError):
    """Codec error handler: what the terminal cannot show, as escapes (``\\xff`` for an
    undecodable byte of a file name, ``\\u00e9`` for a character outside its encoding)."""
    bad = e.object[e.start:e.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("unicode_escape").decode("ascii") for c in bad), e.end


_ESCAPE = "vitconv-escape"
codecs.register_error(_ESCAPE, _escape)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so ``finally`` blocks and context managers run."""


@contextlib.contextmanager
def _sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except (ValueError, OSError):  # not allowed here (embedded interpreter): leave it be
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(cls=VitconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vitconv")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Convert Vision Transformer checkpoints exactly: Google .npz, PyTorch layouts, runtimes."""
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, quiet=quiet)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
