"""``python -m vitconv``: the same CLI as the ``vitconv`` console script."""

import sys

try:
    from _vitconv_cli.main import main
except ImportError as e:  # the library works without click; the CLI does not
    main = None
    _missing = e


def _run() -> None:
    if main is None:
        sys.stderr.write(f"vitconv: the command line needs click and an installed vitconv ({_missing})\n")
        raise SystemExit(1)
    main()


if __name__ == "__main__":
    _run()
