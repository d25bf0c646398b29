"""Entry point of the ``moeframe`` command (and ``python -m moeframe``)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from moeframe import __version__
from moeframe.errors import UserError

#: command modules, each with ``add_parser(subparsers)``; their ``run(args)`` returns the exit status
COMMANDS = (
    "moeframe.cli.plugins_cmd",
    "moeframe.cli.list_cmd",
    "moeframe.cli.explain",
    "moeframe.cli.run",
    "moeframe.cli.check",
    "moeframe.cli.tune",
    "moeframe.cli.bench",
)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2; options only by their full names (an
    abbreviation such as ``--np`` would slip past code that looks for ``--nproc``)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="moeframe", description="Mixture-of-Experts layers where every stage is a named, pluggable strategy.")
    parser.add_argument("--version", action="version", version=f"moeframe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None):  # type: ignore[no-untyped-def]
    return f"moeframe: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except UserError as exc:
        sys.stderr.write(f"moeframe: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("moeframe: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
