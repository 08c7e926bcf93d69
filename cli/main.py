"""The ``vitconv`` command group and its error handling.

Every :class:`vitconv.VitconvError` becomes one line on stderr (``vitconv: error: FILE:
problem``) and its exit code (2 for bad input); anything unexpected becomes one line too,
with ``--debug`` to see the traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from vitconv import __version__
from vitconv.errors import VitconvError

#: (module in this package, command object name). Each command lives in its own module.
COMMANDS = (
    ("npz2pt", "npz2pt"),
)


class VitconvGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VitconvError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.secho(f"vitconv: error: {e}", fg="red", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.secho("vitconv: interrupted", fg="red", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug in vitconv, not the user's fault: still one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.secho(f"vitconv: internal error: {type(e).__name__}: {msg} "
                        "(run with --debug for a traceback)", fg="red", err=True)
            ctx.exit(1)


@click.group(cls=VitconvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vitconv")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Convert Vision Transformer checkpoints exactly: Google .npz, PyTorch layouts, runtimes."""
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, quiet=quiet)


for _module, _name in COMMANDS:
    main.add_command(getattr(importlib.import_module(f"{__package__}.{_module}"), _name))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
