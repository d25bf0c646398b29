"""Commands of the ``moeframe`` command line, registered through the ``register_commands``
hook: the record, and the table the host builds from every plugin's registrations.

moeframe's own commands (``run``, ``list``, ...) are registered through the same hook by
the builtin plugin :mod:`moeframe.cli.commands`; the commands of a distribution that does
not keep its name to itself (a builtin's name, or another plugin's) are refused with an
error naming both distributions.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable
from typing import Any

import attrs

from moeframe.errors import PluginError
from moeframe.plugins.records import Provider, _describe_exception

__all__ = ["Command", "CommandEntry", "CommandTable", "Register", "collect_commands"]

#: ``run(args) -> exit status`` of a command
RunFunction = Callable[[argparse.Namespace], "int | None"]
#: ``add_arguments(parser)``: adds the command's arguments to its argparse parser
AddArguments = Callable[[argparse.ArgumentParser], None]

_COMMAND_NAME = re.compile(r"^[a-z][a-z0-9\-]*$")


def _check_name(_: Any, __: Any, value: Any) -> None:
    if not isinstance(value, str) or not _COMMAND_NAME.match(value):
        raise ValueError(f"command name {value!r} must be lower case letters, digits or '-', starting with a letter")


def _check_function(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None and attribute.name == "add_arguments":
        return
    if isinstance(value, str):
        if value.count(":") != 1:
            raise ValueError(f"{attribute.name} {value!r} must be 'module:function' or a function")
    elif not callable(value):
        raise TypeError(f"{attribute.name} must be a function or 'module:function', not {value!r}")


def _check_help(_: Any, __: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("help must be a one-line description of the command (shown by `moeframe --help`)")


@attrs.frozen
class Command:
    """One command of the ``moeframe`` command line, as a plugin registers it.

    ``run`` and ``add_arguments`` are functions, or ``"module:function"`` strings imported
    only when the command is used (so that ``moeframe --help`` imports nothing heavy).
    ``run(args)`` receives the parsed :class:`argparse.Namespace` and returns the exit
    status (``None`` counts as 0); a :class:`moeframe.errors.UserError` it raises is shown
    as one line, exit status 2.
    """

    name: str = attrs.field(validator=_check_name)
    run: RunFunction | str = attrs.field(validator=_check_function)
    help: str = attrs.field(validator=_check_help)
    add_arguments: AddArguments | str | None = attrs.field(default=None, validator=_check_function)
    #: shown by ``moeframe NAME --help`` (default: ``help``)
    description: str | None = None


#: the ``register`` argument of ``register_commands``
Register = Callable[..., None]


def collect_commands(hook: Callable[..., Any]) -> list[Command]:
    """Call one ``register_commands`` implementation with a ``register`` that collects
    its commands; return them (a bad registration raises ``ValueError``/``TypeError``)."""
    found: list[Command] = []

    def register(
        name: str,
        run: RunFunction | str,
        *,
        help: str,
        add_arguments: AddArguments | str | None = None,
        description: str | None = None,
    ) -> None:
        found.append(Command(name, run, help, add_arguments, description))

    hook(register=register)
    return found


def _resolve(ref: Any, what: str, command: str, provider: Provider) -> Any:
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (Exception, SystemExit) as exc:  # KeyboardInterrupt stays an interrupt
        raise PluginError(
            f"command {command!r} from {provider} cannot be loaded: its {what} {ref!r} failed: "
            f"{_describe_exception(exc)}"
        ) from None


@attrs.frozen
class CommandEntry:
    """A registered command and the distribution that provides it."""

    command: Command
    provider: Provider

    @property
    def name(self) -> str:
        return self.command.name

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the command's arguments to ``parser``; a plugin's failure is a
        :class:`~moeframe.errors.PluginError` naming the distribution."""
        if self.command.add_arguments is None:
            return
        function = _resolve(self.command.add_arguments, "add_arguments", self.name, self.provider)
        try:
            function(parser)
        except (Exception, SystemExit) as exc:
            if self.provider.builtin:
                raise
            raise PluginError(
                f"command {self.name!r} from {self.provider} cannot add its arguments: {_describe_exception(exc)}"
            ) from None

    def run(self, args: argparse.Namespace) -> int:
        """Run the command; its exit status (``None`` counts as 0)."""
        function = _resolve(self.command.run, "run", self.name, self.provider)
        status = function(args)
        if status is None:
            return 0
        if isinstance(status, bool) or not isinstance(status, int):
            raise PluginError(
                f"command {self.name!r} from {self.provider} returned {status!r} where an exit "
                "status (an int, or None for 0) was expected"
            )
        return status


class CommandTable:
    """Every registered command by name; a name claimed twice is a conflict."""

    def __init__(self) -> None:
        self._entries: dict[str, CommandEntry] = {}
        self._conflicts: dict[str, list[CommandEntry]] = {}

    def add(self, entry: CommandEntry) -> str | None:
        """Add ``entry``; return the error it causes, if any.  A builtin's name stays the
        builtin's (the plugin's command is refused); two plugins claiming one name make it
        unusable until one goes."""
        name = entry.name
        current = self._entries.get(name)
        if name in self._conflicts:
            self._conflicts[name].append(entry)
        elif current is None:
            self._entries[name] = entry
            return None
        elif current.provider.builtin:
            return (
                f"command {name!r} from {entry.provider} clashes with moeframe's builtin command {name!r}; "
                "the builtin is kept: rename the plugin's command"
            )
        else:
            self._conflicts[name] = [self._entries.pop(name), entry]
        return self.conflict_error(name)

    def conflict_error(self, name: str) -> str:
        providers = " and ".join(str(e.provider) for e in self._conflicts[name])
        return (
            f"command {name!r} is registered by both {providers}; it is unusable until one of them is "
            "uninstalled (or left out with MOEFRAME_PLUGINS)"
        )

    def get(self, name: str) -> CommandEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[CommandEntry]:
        """In the order registered: moeframe's own first, then the plugins' (by distribution)."""
        return list(self._entries.values())

    @property
    def conflicts(self) -> dict[str, str]:
        """Each conflicting name and its error."""
        return {name: self.conflict_error(name) for name in sorted(self._conflicts)}
