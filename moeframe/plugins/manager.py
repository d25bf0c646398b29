"""Discovering, loading and isolating plugins; building the strategy registry.

Nothing here runs on ``import moeframe``: the first call of :func:`get_registry` (or
:func:`get_host`) scans the ``moeframe`` entry-point group, loads the plugins, calls
their hooks and builds the registry.  Environment variables (read at that moment):

``MOEFRAME_DISABLE_PLUGIN_AUTOLOAD=1``
    load moeframe's builtin strategies only.
``MOEFRAME_PLUGINS=dist-a,dist-b``
    load only these distributions' plugins (names compared case-insensitively, with
    ``_`` and ``-`` treated alike).
``MOEFRAME_STRICT_PLUGINS=1``
    a plugin that fails to load, fails validation or raises in a hook is fatal
    (:class:`~moeframe.errors.PluginError`) instead of being reported and skipped.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as importlib_metadata
import os
import re
import threading
import warnings
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import attrs
import pluggy

from moeframe.errors import DuplicateStrategyError, PluginError, UnknownStrategyError
from moeframe.plugins import hookspecs
from moeframe.plugins.commands import CommandEntry, CommandTable, collect_commands
from moeframe.plugins.records import (
    _WARNED,
    KINDS,
    Entry,
    MoeframeDeprecationWarning,
    Provider,
    Strategy,
    _describe_exception,
)

__all__ = [
    "PluginWarning",
    "PluginRecord",
    "Registry",
    "PluginHost",
    "get_host",
    "get_registry",
    "register",
    "reset",
    "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "moeframe"
BUILTIN_PROVIDER = Provider(name="moeframe", version=None, builtin=True)
#: moeframe's own plugins, named as data and imported by name when the host loads (as
#: pytest's ``default_plugins``): the host does not import them, so there is no cycle.
BUILTIN_PLUGINS: tuple[str, ...] = ("moeframe.builtin", "moeframe.cli.commands")
#: the hook through which plugins add commands to the ``moeframe`` command line
COMMANDS_HOOK = "register_commands"


class PluginWarning(UserWarning):
    """A plugin failed to load or to register its strategies and was skipped."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def normalize_dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@attrs.define
class PluginRecord:
    """What ``moeframe plugins`` shows for one plugin distribution (or the builtins)."""

    name: str
    version: str | None
    builtin: bool = False
    entry_points: list[str] = attrs.field(factory=list)
    hooks: list[str] = attrs.field(factory=list)
    provides: dict[str, list[str]] = attrs.field(factory=dict)
    #: the ``moeframe`` commands it registered (``register_commands``)
    commands: list[str] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)

    @property
    def provider(self) -> Provider:
        if self.builtin:
            return BUILTIN_PROVIDER
        return Provider(name=self.name, version=self.version)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "builtin": self.builtin,
            "entry_points": list(self.entry_points),
            "hooks": sorted(self.hooks),
            "provides": {k: sorted(v) for k, v in self.provides.items() if v},
            "commands": sorted(self.commands),
            "status": "ok" if self.ok else "failed",
            "errors": list(self.errors),
        }


class Registry:
    """Every registered strategy, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._conflicts: dict[tuple[str, str], list[Entry]] = {}
        #: appended to "unknown strategy" errors (set when MOEFRAME_PLUGINS limits the plugins)
        self.unknown_note = ""

    def add(self, entry: Entry) -> DuplicateStrategyError | None:
        """Add an entry; return the conflict it creates, if any."""
        table = self._entries[entry.kind]
        key = (entry.kind, entry.name)
        if key in self._conflicts:
            self._conflicts[key].append(entry)
        elif entry.name in table:
            self._conflicts[key] = [table.pop(entry.name), entry]
        else:
            table[entry.name] = entry
            return None
        return self.conflict_error(entry.kind, entry.name)

    def conflict_error(self, kind: str, name: str) -> DuplicateStrategyError:
        entries = self._conflicts[(kind, name)]
        return DuplicateStrategyError(kind, name, [str(e.provider) for e in entries])

    def get(self, kind: str, name: str) -> Entry:
        """Return the entry for ``name``; raise a helpful error when there is none."""
        _check_kind(kind)
        if (kind, name) in self._conflicts:
            raise self.conflict_error(kind, name)
        try:
            return self._entries[kind][name]
        except (KeyError, TypeError):
            error = UnknownStrategyError(kind, str(name), self.names(kind))
            if self.unknown_note:
                error.args = (f"{error.args[0]}; {self.unknown_note}",)
            raise error from None

    def names(self, kind: str) -> list[str]:
        _check_kind(kind)
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = KINDS if kind is None else (_check_kind(kind),)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]

    @property
    def conflicts(self) -> list[DuplicateStrategyError]:
        return [self.conflict_error(kind, name) for kind, name in self._conflicts]


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise UnknownStrategyError("strategy kind", kind, KINDS)
    return kind


class PluginHost:
    """Loads plugins through pluggy and builds the :class:`Registry` from their hooks.

    The arguments default to the environment variables described in this module's
    docstring; tests and embedding applications may pass them explicitly.
    """

    def __init__(
        self,
        *,
        autoload: bool | None = None,
        allow: Sequence[str] | None = None,
        strict: bool | None = None,
        specs: ModuleType | type = hookspecs,
    ) -> None:
        env = os.environ
        self.autoload = not _truthy(env.get("MOEFRAME_DISABLE_PLUGIN_AUTOLOAD")) if autoload is None else autoload
        if allow is None and env.get("MOEFRAME_PLUGINS", "").strip():
            allow = [a for a in env["MOEFRAME_PLUGINS"].split(",") if a.strip()]
        self.allow = None if allow is None else {normalize_dist_name(a.strip()) for a in allow}
        self.strict = _truthy(env.get("MOEFRAME_STRICT_PLUGINS")) if strict is None else strict
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(specs)
        self.plugins: list[PluginRecord] = []
        self.registry = Registry()
        #: the ``moeframe`` commands registered through ``register_commands``
        self.commands = CommandTable()
        self._records_by_plugin_name: dict[str, PluginRecord] = {}
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading -------------------------------------------------------------------
    def load(self) -> PluginHost:
        """Load builtins and (unless disabled) installed plugins, then call their hooks."""
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            builtin_record = PluginRecord(name="moeframe", version=_version("moeframe"), builtin=True)
            for module in BUILTIN_PLUGINS:
                self._register(importlib.import_module(module), module, builtin_record)
            self.plugins.append(builtin_record)
            if self.autoload:
                self._load_entry_points()
            self._collect()
        return self

    def _load_entry_points(self) -> None:
        by_dist: dict[str, PluginRecord] = {}
        installed: dict[str, str] = {}
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else ep.name
            installed[normalize_dist_name(dist_name)] = dist_name
            if self.allow is not None and normalize_dist_name(dist_name) not in self.allow:
                continue
            record = by_dist.get(dist_name)
            if record is None:
                record = PluginRecord(name=dist_name, version=dist.version if dist else None)
                by_dist[dist_name] = record
                self.plugins.append(record)
            record.entry_points.append(f"{ep.name} = {ep.value}")
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # KeyboardInterrupt stays an interrupt
                self._fail(record, f"import of {ep.value!r} failed: {_describe_exception(exc)}")
                continue
            version_problem = _check_api_version(plugin)
            if version_problem:
                self._fail(record, version_problem)
                continue
            self._register(plugin, f"{dist_name}:{ep.name}", record)
        if self.allow is not None:
            self._check_allow_list(installed)

    def _check_allow_list(self, installed: dict[str, str]) -> None:
        """Warn about MOEFRAME_PLUGINS names that match no installed plugin distribution
        (with a did-you-mean), and make "unknown strategy" errors mention the list."""
        from moeframe.errors import did_you_mean

        for name in sorted(self.allow or ()):
            if name not in installed:
                hint = did_you_mean(name, sorted(installed.values()))
                _warn(
                    f"MOEFRAME_PLUGINS names {name!r}, but no installed plugin distribution has that name{hint}; "
                    f"installed: {', '.join(sorted(installed.values())) or 'none'}"
                )
        self.registry.unknown_note = (
            f"MOEFRAME_PLUGINS allows only {', '.join(sorted(self.allow or ())) or 'no plugin'}; "
            "add the distribution that provides it, or unset MOEFRAME_PLUGINS"
        )

    def _register(self, plugin: object, plugin_name: str, record: PluginRecord) -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.pm.register(plugin, name=plugin_name)
        except ValueError as exc:  # already registered (the same module via two entry points)
            self._fail(record, str(exc))
            return
        except pluggy.PluginValidationError as exc:
            self._fail(record, f"invalid hook implementation: {exc}")
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=plugin_name)
            known = set(hookspecs.HOOK_FOR_KIND.values()) | {COMMANDS_HOOK}
            unknown = [
                name
                for name in dir(plugin)
                if name not in known and self.pm.parse_hookimpl_opts(plugin, name) is not None
            ]
            if not unknown:  # pragma: no cover - pluggy reported something else
                self._fail(record, f"invalid hook implementation: {exc}")
                return
            self._fail(
                record,
                f"implements unknown hook {unknown[0]!r}"
                f"{_hook_suggestion(unknown[0])}; known hooks: {', '.join(sorted(known))}",
            )
            return
        for warning in caught:  # pluggy's warn_on_impl / warn_on_impl_args: say whose hook it is
            if issubclass(warning.category, DeprecationWarning):
                warnings.warn(
                    MoeframeDeprecationWarning(f"moeframe plugin {record.name!r}: {warning.message}"), stacklevel=4
                )
            else:
                warnings.warn(warning.message, stacklevel=4)
        self._records_by_plugin_name[plugin_name] = record

    def add_plugin(self, plugin: object, name: str, version: str | None = None) -> PluginRecord:
        """Register an in-process plugin (a module or any object with hook implementations).

        Its strategies are added to the registry at once (or when the host loads, if it
        has not yet); ``name`` is the provider shown for them.
        """
        with self._lock:
            record = PluginRecord(name=name, version=version)
            self.plugins.append(record)
            plugin_name = f"{name}:in-process:{len(self.plugins)}"
            self._register(plugin, plugin_name, record)
            if self._loaded and plugin_name in self._records_by_plugin_name:
                self._collect(only=plugin_name)
            return record

    def verify(self) -> PluginHost:
        """Load every registered strategy's class (which imports the plugins' lazily named
        implementations) and check it against its kind's contract; a failure is added to
        the errors of the plugin that registered the strategy (``moeframe plugins`` shows
        them), or raised in strict mode."""
        self.load()
        records = {record.provider: record for record in self.plugins}
        for entry in self.registry.entries():
            try:
                entry.load()
            except PluginError as exc:
                if self.strict:
                    raise
                record = records.get(entry.provider)
                if record is not None and str(exc) not in record.errors:
                    record.errors.append(str(exc))
        return self

    def hook_arguments(self, hook_name: str) -> dict[str, Any]:
        """The arguments this host passes to ``hook_name`` (besides ``register``, which
        :meth:`_collect_commands` makes for each implementation of ``register_commands``).
        pluggy gives each implementation only those it names, so an argument added to a
        hook later does not break implementations written before it (the strategy hooks
        of plugin API 3 take none)."""
        return {}

    def _call(self, hook_name: str, impl: pluggy.HookImpl, **extra: Any) -> Any:
        """Call one plugin's implementation of ``hook_name`` on its own, with the arguments
        it names: ``impl.argnames`` is pluggy's reading of its signature, checked against
        the hook's specification when the plugin registered (what pluggy's own hook
        calling passes).  Called one by one, so that a failing plugin is reported by name
        and skipped while the others' strategies are kept."""
        arguments = {**self.hook_arguments(hook_name), **extra}
        return impl.function(*(arguments[name] for name in impl.argnames))

    def _collect(self, only: str | None = None) -> None:
        for kind, hook_name in hookspecs.HOOK_FOR_KIND.items():
            # Call each implementation on its own so that one raising plugin does not
            # take the others' strategies with it.
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if only is not None and impl.plugin_name != only:
                    continue
                record = self._records_by_plugin_name.get(impl.plugin_name)
                if record is None:
                    continue
                record.hooks.append(hook_name)
                try:
                    result = self._call(hook_name, impl)
                    items = list(result) if result is not None else []
                except (Exception, SystemExit) as exc:  # KeyboardInterrupt stays an interrupt
                    self._fail(record, f"hook {hook_name} raised {_describe_exception(exc)}")
                    continue
                bad = [item for item in items if not isinstance(item, Strategy)]
                if bad:
                    self._fail(
                        record,
                        f"hook {hook_name} returned {type(bad[0]).__name__} where a moeframe.Strategy was expected",
                    )
                    continue
                for strategy in items:
                    conflict = self.registry.add(Entry(kind, strategy, record.provider))
                    record.provides.setdefault(kind, []).append(strategy.name)
                    if conflict is not None:
                        if self.strict:
                            raise PluginError(str(conflict))
                        _warn(str(conflict))
        self._collect_commands(only)

    def _collect_commands(self, only: str | None) -> None:
        """Call each ``register_commands`` implementation with a ``register`` of its own
        and add its commands to :attr:`commands`; a clash is an error of the plugin that
        came second (both plugins, for two plugins' commands)."""
        impls = []
        for impl in getattr(self.pm.hook, COMMANDS_HOOK).get_hookimpls():
            record = self._records_by_plugin_name.get(impl.plugin_name)
            if record is not None and (only is None or impl.plugin_name == only):
                impls.append((impl, record))
        impls.sort(
            key=lambda pair: not pair[1].builtin
        )  # builtins first, whatever tryfirst says: they keep their names
        for impl, record in impls:
            record.hooks.append(COMMANDS_HOOK)
            try:
                commands = collect_commands(functools.partial(self._call, COMMANDS_HOOK, impl))
            except (Exception, SystemExit) as exc:  # KeyboardInterrupt stays an interrupt
                self._fail(record, f"hook {COMMANDS_HOOK} raised {_describe_exception(exc)}")
                continue
            for command in commands:
                problem = self.commands.add(CommandEntry(command, record.provider))
                kept = self.commands.get(command.name)
                refused = problem is not None and kept is not None and kept.provider.builtin
                if not refused:
                    record.commands.append(command.name)
                if problem is None:
                    continue
                clashing = (
                    [record] if refused else [r for r in self.plugins if command.name in r.commands and not r.builtin]
                )
                for r in clashing:
                    if problem not in r.errors:
                        r.errors.append(problem)
                if self.strict:
                    raise PluginError(problem + " (MOEFRAME_STRICT_PLUGINS is set)")
                _warn(problem)

    def _fail(self, record: PluginRecord, message: str) -> None:
        record.errors.append(message)
        text = f"moeframe plugin {record.name!r}{' ' + record.version if record.version else ''} was skipped: {message}"
        if self.strict:
            raise PluginError(text + " (MOEFRAME_STRICT_PLUGINS is set)")
        _warn(text + "; other plugins keep working (MOEFRAME_STRICT_PLUGINS=1 makes this fatal)")


def _warn(message: str) -> None:
    warnings.warn(PluginWarning(message), stacklevel=4)


def _hook_suggestion(name: str) -> str:
    from moeframe.errors import did_you_mean

    return did_you_mean(name, [*hookspecs.HOOK_FOR_KIND.values(), COMMANDS_HOOK])


def _check_api_version(plugin: object) -> str | None:
    declared = getattr(plugin, "moeframe_plugin_api", None)
    if declared is None:
        return None
    if not isinstance(declared, int) or isinstance(declared, bool):
        return f"moeframe_plugin_api must be an int, not {declared!r}"
    if declared > hookspecs.PLUGIN_API_VERSION:
        return (
            f"written for plugin API {declared}, but this moeframe provides API "
            f"{hookspecs.PLUGIN_API_VERSION}; upgrade moeframe"
        )
    if declared < hookspecs.OLDEST_SUPPORTED_PLUGIN_API:
        return (
            f"written for plugin API {declared}, which this moeframe no longer supports "
            f"(oldest: {hookspecs.OLDEST_SUPPORTED_PLUGIN_API}); see the plugin guide's "
            "'Changes to the contract' section for what to change"
        )
    return None


def _version(dist: str) -> str | None:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def _entry_points() -> Iterable[importlib_metadata.EntryPoint]:
    """The group's entry points in a stable order (by distribution, then name)."""
    eps = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for ep in eps:  # a distribution found twice on sys.path is loaded once
        key = (_dist_key(ep), ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            unique.append(ep)
    return sorted(unique, key=lambda ep: (_dist_key(ep), ep.name))


def _dist_key(ep: importlib_metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return normalize_dist_name(dist.name) if dist is not None else ""


_host: PluginHost | None = None
_host_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _host
    with _host_lock:
        if _host is None:
            _host = PluginHost()
        host = _host
    return host.load()


def get_registry() -> Registry:
    """The process-wide strategy registry, built on first use."""
    return get_host().registry


def register(plugin: object, name: str, version: str | None = None) -> PluginRecord:
    """Register ``plugin`` (an object or module with ``@moeframe.hookimpl`` functions) in
    this process, as if it were installed; its strategies are usable by name at once.

    A failure is reported like an installed plugin's (a :class:`PluginWarning`, or a
    :class:`~moeframe.errors.PluginError` in strict mode).
    """
    return get_host().add_plugin(plugin, name, version)


def reset() -> None:
    """Forget the loaded plugins; the next registry use loads them again (for tests)."""
    global _host
    with _host_lock:
        _host = None
        _WARNED.clear()
