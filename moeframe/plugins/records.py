"""The typed records a plugin returns from its hooks, and what the registry adds to them."""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

if TYPE_CHECKING:
    from moeframe.plugins.contract import StrategyBase

    _Base = TypeVar("_Base", bound=StrategyBase)

__all__ = ["Capabilities", "OrderingRules", "Strategy", "Provider", "Entry", "KINDS", "MoeframeDeprecationWarning"]


class MoeframeDeprecationWarning(DeprecationWarning):
    """A plugin uses a hook, an argument or a member that a later release removes; the
    message says what to do instead."""


#: deprecated members already warned about: (provider, kind, name, member)
_WARNED: set[tuple[str, str, str, str]] = set()


def _describe_exception(exc: BaseException) -> str:
    """``SystemExit: 3`` / ``ValueError: bad``: an exception as one line."""
    if isinstance(exc, SystemExit):
        return f"SystemExit({exc.code!r}): a plugin called sys.exit()"
    return f"{type(exc).__name__}: {exc}"


#: The strategy kinds, in the order data flows through a stack.
KINDS: tuple[str, ...] = ("router", "kernel", "dispatcher", "runner", "wrapper")

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")


def _frozen_names(value: Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    return frozenset(str(v) for v in value)


def _frozen_set(value: Iterable[str] | None) -> frozenset[str]:
    return _frozen_names(value) or frozenset()


@attrs.frozen
class Capabilities:
    """What a strategy supports; the composer checks a stack against these at build time.

    ``None`` means "anything".  Device entries are device *types* (``"cpu"``, ``"cuda"``),
    dtypes are config names (``"float32"``, ``"bfloat16"``, ``"float16"``).
    """

    dtypes: frozenset[str] | None = attrs.field(default=None, converter=_frozen_names)
    devices: frozenset[str] | None = attrs.field(default=None, converter=_frozen_names)
    activations: frozenset[str] | None = attrs.field(default=None, converter=_frozen_names)
    #: The kernel can skip experts that are not local (expert map with -1 entries).
    expert_map: bool = True
    #: The kernel supports the expert biases ``b13`` / ``b2``.
    biases: bool = True
    #: The dispatcher moves tokens between ranks (needs an expert-parallel group).
    distributed: bool = False

    def describe(self) -> dict[str, Any]:
        def show(v: frozenset[str] | None) -> list[str] | str:
            return "any" if v is None else sorted(v)

        return {
            "dtypes": show(self.dtypes),
            "devices": show(self.devices),
            "activations": show(self.activations),
            "expert_map": self.expert_map,
            "biases": self.biases,
            "distributed": self.distributed,
        }


@attrs.frozen
class OrderingRules:
    """Where a wrapper may sit in ``stack.wrappers`` (outermost first).

    ``inside``: when one of these wrappers is also in the stack, this one must be nested
    inside it (appear later in the list).  ``outside``: the reverse.  ``conflicts``: may
    not appear together.  A wrapper never appears twice.
    """

    outermost: bool = False
    innermost: bool = False
    inside: frozenset[str] = attrs.field(factory=frozenset, converter=_frozen_set)
    outside: frozenset[str] = attrs.field(factory=frozenset, converter=_frozen_set)
    conflicts: frozenset[str] = attrs.field(factory=frozenset, converter=_frozen_set)

    def describe(self) -> dict[str, Any]:
        return {
            "outermost": self.outermost,
            "innermost": self.innermost,
            "inside": sorted(self.inside),
            "outside": sorted(self.outside),
            "conflicts": sorted(self.conflicts),
        }


def _check_name(_: Any, __: Any, value: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"strategy name {value!r} must be lower case letters, digits, '_' or '-', starting with a letter"
        )


def _check_impl(_: Any, __: Any, value: Any) -> None:
    if isinstance(value, str):
        if value.count(":") != 1:
            raise ValueError(f"impl {value!r} must be 'module:attribute' or a class")
    elif not callable(value):
        raise TypeError(f"impl must be a class or 'module:attribute', not {value!r}")


@attrs.frozen
class Strategy:
    """One named strategy, as returned by a ``register_*`` hook.

    ``impl`` is the implementing class, or ``"package.module:ClassName"`` so that the
    plugin's heavy imports (triton, say) happen only when the strategy is first used.
    """

    name: str = attrs.field(validator=_check_name)
    impl: Any = attrs.field(validator=_check_impl)
    description: str = ""
    capabilities: Capabilities = attrs.field(factory=Capabilities)
    #: Wrappers only: where the wrapper may sit.
    rules: OrderingRules = attrs.field(factory=OrderingRules)
    #: Shown next to the name, e.g. ``"interpreter"`` for a Triton kernel without a GPU.
    variant: str | None = None

    @property
    def display_name(self) -> str:
        return f"{self.name} ({self.variant})" if self.variant else self.name


@attrs.frozen
class Provider:
    """Who registered a strategy: a distribution with its version, or moeframe's builtins."""

    name: str
    version: str | None = None
    builtin: bool = False

    def __str__(self) -> str:
        if self.builtin:
            return "builtin"
        return f"{self.name} {self.version}" if self.version else self.name


@attrs.frozen
class Entry:
    """A registered strategy: the plugin's record plus its kind and provider."""

    kind: str
    strategy: Strategy
    provider: Provider

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def description(self) -> str:
        return self.strategy.description

    @property
    def capabilities(self) -> Capabilities:
        return self.strategy.capabilities

    def load(self) -> type[StrategyBase]:
        """Import and return the implementing class, checked against its kind's contract.

        A failing import (``SystemExit`` included), an ``impl`` that does not subclass the
        kind's base class or a ``Params`` that is not an attrs class is a
        :class:`~moeframe.errors.PluginError` naming the strategy and its provider, so one
        broken plugin shows up as that plugin's fault.  A class that still defines a
        deprecated member gets a :class:`MoeframeDeprecationWarning` saying what to do.
        """
        from moeframe.errors import PluginError
        from moeframe.plugins.contract import DEPRECATED_MEMBERS, contract_problem, deprecated_members

        impl = self.strategy.impl
        where = f"{self.kind} {self.name!r} from {self.provider}"
        if isinstance(impl, str):
            module_name, _, attr = impl.partition(":")
            try:
                obj: Any = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            except (Exception, SystemExit) as exc:  # a plugin's import may raise anything
                raise PluginError(f"{where} failed to load ({impl}): {_describe_exception(exc)}") from exc
            impl = obj
        problem = contract_problem(self.kind, impl)
        if problem:
            raise PluginError(f"{where} breaks the plugin contract: {problem}")
        for member in deprecated_members(impl):
            key = (str(self.provider), self.kind, self.name, member)
            if key in _WARNED:  # once per process (plugins.reset() forgets)
                continue
            _WARNED.add(key)
            warnings.warn(
                MoeframeDeprecationWarning(
                    f"{where}: {impl.__qualname__}.{member} is deprecated and will stop working in a later "
                    f"release; {DEPRECATED_MEMBERS[member]} (see 'Changes to the contract' in the plugin guide)"
                ),
                stacklevel=2,
            )
        return impl

    def load_as(self, base: type[_Base]) -> type[_Base]:
        """:meth:`load`, typed as ``base`` (the kind's base class, e.g. :class:`moeframe.Kernel`):
        for callers that construct the strategy with that kind's signature."""
        cls = self.load()
        if not issubclass(cls, base):
            raise TypeError(f"{self.kind} {self.name!r} is a {cls.__qualname__}, not a {base.__qualname__}")
        return cls

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "variant": self.strategy.variant,
            "provider": str(self.provider),
            "description": self.description,
            "capabilities": self.capabilities.describe(),
            **({"rules": self.strategy.rules.describe()} if self.kind == "wrapper" else {}),
        }
