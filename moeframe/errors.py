"""Errors raised by moeframe.

Every error a *user* can cause (a bad config value, an unknown strategy name, a missing
file, a tensor of the wrong shape) derives from :class:`UserError`.  Its message is one
line that says what was wrong, where, and what would work; the CLI prints it and exits
with status 2, without a traceback.  Anything else is a bug (in moeframe or in a plugin)
and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "UserError",
    "ConfigError",
    "UnknownStrategyError",
    "DuplicateStrategyError",
    "StackError",
    "PluginError",
    "InputError",
    "did_you_mean",
]


class UserError(Exception):
    """An error caused by the user's input; its message is a complete, single line."""


class ConfigError(UserError, ValueError):
    """A config value is missing, of the wrong type or not allowed.

    ``path`` is the key path in the config (``stack.wrappers[1].name``); ``source`` the
    file or preset the config came from, when known.
    """

    def __init__(self, path: str, message: str, source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        at = f"{path}: " if path else ""
        super().__init__(f"{where}{at}{message}")

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(self.path, self.message, source) if self.source is None else self


class UnknownStrategyError(UserError, LookupError):
    """No strategy of that kind is registered under that name."""

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.available = sorted(available)
        hint = did_you_mean(name, self.available)
        listing = ", ".join(self.available) if self.available else "none"
        super().__init__(
            f"unknown {kind} {name!r}{hint}; available {kind}s: {listing} (`moeframe plugins` lists installed plugins)"
        )

    def __str__(self) -> str:  # LookupError would repr() the message
        return str(self.args[0])


class DuplicateStrategyError(UserError):
    """Two providers registered the same name for the same kind."""

    def __init__(self, kind: str, name: str, providers: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.providers = list(providers)
        super().__init__(
            f"{kind} {name!r} is registered by more than one provider: "
            + " and ".join(self.providers)
            + "; uninstall one of them or restrict loading with MOEFRAME_PLUGINS"
        )


class StackError(UserError):
    """The configured parts do not compose into a valid stack."""


class PluginError(UserError):
    """A plugin failed to load and strict plugin mode is on."""


class InputError(UserError):
    """A file or tensor given to moeframe is missing or has the wrong shape or dtype."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    matches = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]!r}?" if matches else ""
