"""Entry point of the ``moeframe`` command (and ``python -m moeframe``)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moeframe import __version__
from moeframe.errors import UserError

if TYPE_CHECKING:
    from moeframe.plugins.commands import CommandEntry
    from moeframe.plugins.manager import PluginHost

#: commands that the project's own plugin distributions add, for the one line that says how
#: to get one that is not installed
PLUGIN_COMMANDS: dict[str, str] = {"bench": "moeframe-bench", "e2e": "moeframe-bench", "tune": "moeframe-triton"}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2; options only by their full names (an
    abbreviation such as ``--np`` would slip past code that looks for ``--nproc``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _command_word(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the first word that is not an option: the
    top-level options take no value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def _builtin_entries() -> list[CommandEntry]:
    """moeframe's own commands, without loading any plugin (the hook's implementation
    called directly, as the host would call it)."""
    from moeframe.cli import commands
    from moeframe.plugins.commands import CommandEntry, collect_commands
    from moeframe.plugins.manager import BUILTIN_PROVIDER

    return [CommandEntry(c, BUILTIN_PROVIDER) for c in collect_commands(commands.register_commands)]


def _missing_command(word: str, host: PluginHost) -> UserError | None:
    """One line for a command that a plugin distribution of this project would add, when
    it is not there: not installed, not loaded, or broken."""
    from moeframe.errors import PluginError
    from moeframe.plugins.manager import normalize_dist_name

    conflict = host.commands.conflicts.get(word)
    if conflict is not None:
        return PluginError(conflict)
    dist = PLUGIN_COMMANDS.get(word)
    if dist is None:
        return None
    record = next((r for r in host.plugins if normalize_dist_name(r.name) == dist), None)
    if record is not None and record.errors:
        return PluginError(f"`moeframe {word}` comes with {dist}, which failed to load: {record.errors[0]}")
    if record is None and _installed(dist):
        why = (
            "MOEFRAME_DISABLE_PLUGIN_AUTOLOAD is set"
            if not host.autoload
            else f"MOEFRAME_PLUGINS allows only {', '.join(sorted(host.allow or ()))}"
        )
        return UserError(f"`moeframe {word}` comes with the plugin {dist}, which is installed but not loaded: {why}")
    return UserError(
        f"`moeframe {word}` comes with the plugin distribution {dist}, which is not installed; "
        f"in a moeframe checkout: pip install -e plugins/{dist} (or ./dev.sh setup)"
    )


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``moeframe`` parser: every command, moeframe's and the plugins' (registered
    through the ``register_commands`` hook).  Given ``argv``, only the command it names
    gets its arguments (imported lazily: ``moeframe --help`` and ``moeframe run`` import no
    other command's module), and a builtin command loads no plugin to parse."""
    parser = _Parser(
        prog="moeframe", description="Mixture-of-Experts layers where every stage is a named, pluggable strategy."
    )
    parser.add_argument("--version", action="version", version=f"moeframe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    word = None if argv is None else _command_word(argv)
    entries = _builtin_entries()
    if word not in {e.name for e in entries}:
        from moeframe.plugins import get_host

        host = get_host()
        if word is not None and host.commands.get(word) is None:
            missing = _missing_command(word, host)
            if missing is not None:
                raise missing
        entries = host.commands.entries()
    for entry in entries:
        p = sub.add_parser(
            entry.name, help=entry.command.help, description=entry.command.description or entry.command.help
        )
        p.set_defaults(command_entry=entry)
        if argv is None or entry.name == word:
            entry.add_arguments(p)
    return parser


def _format_warning(message: Any, category: Any, filename: Any, lineno: Any, line: Any = None) -> str:
    return f"moeframe: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    try:
        parser = build_parser(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = None if argv is None else list(argv)
        entry = getattr(args, "command_entry", None)
        if entry is None:
            parser.print_help()
            return 2
        return entry.run(args)
    except UserError as exc:
        sys.stderr.write(f"moeframe: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("moeframe: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
