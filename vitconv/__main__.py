"""``python -m vitconv``: the same CLI as the ``vitconv`` console script."""

import sys


def _run() -> None:
    try:
        from _vitconv_cli.main import main
    except ImportError as e:  # the library works without click; the CLI does not
        sys.stderr.write(f"vitconv: the command line needs click and an installed vitconv ({e})\n")
        raise SystemExit(1)
    main()


if __name__ == "__main__":
    _run()
