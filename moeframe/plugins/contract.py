"""The contract every strategy class fulfils: the members all five kinds share, with
their defaults, and the checks run when a strategy's class is loaded.

The kinds' base classes (:class:`moeframe.Router`, :class:`moeframe.Kernel`,
:class:`moeframe.Dispatcher`, :class:`moeframe.Runner`, :class:`moeframe.Wrapper`)
derive from :class:`StrategyBase` and add what is particular to each kind.  Every
member a strategy *may* define is declared on its base class, with its default: the
host calls members, it never asks whether they exist.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from moeframe.config import NoParams

if TYPE_CHECKING:
    from moeframe.config import Config, ModelConfig
    from moeframe.weights import WeightSpec
    from moeframe.workspace import WorkspaceRequest

__all__ = [
    "StrategyBase",
    "BASE_FOR_KIND",
    "base_class",
    "contract_problem",
    "DEPRECATED_MEMBERS",
    "deprecated_members",
]

#: The base class each kind's ``impl`` must subclass, as ``"module:Class"``.
BASE_FOR_KIND: dict[str, str] = {
    "router": "moeframe.routers:Router",
    "kernel": "moeframe.kernels:Kernel",
    "dispatcher": "moeframe.dispatchers:Dispatcher",
    "runner": "moeframe.runners:Runner",
    "wrapper": "moeframe.wrappers:Wrapper",
}

#: Members of plugin API 1 that still work for one more release, each with what to do
#: instead (the warning says it when a strategy that defines one is loaded).
DEPRECATED_MEMBERS: dict[str, str] = {
    "check_config": (
        "replace the classmethod check_config(model, params), which raises ValueError, with "
        "supports(cls, config, params) returning the reason as a string, or None (the model is config.model)"
    ),
    "check_stack": (
        "rename the classmethod check_stack(cls, config) to supports(cls, config, params); "
        "params are this part's own parameters"
    ),
}


class StrategyBase(abc.ABC):
    """What every strategy class has, whatever its kind.

    A strategy is built as ``cls(context, params)`` (a wrapper as ``cls(inner, context,
    params)``), where ``params`` is an instance of :attr:`Params`.
    """

    #: The attrs class of this strategy's parameters (the keys of its ``params`` table);
    #: fields made with :func:`moeframe.option` are validated with errors naming the key.
    Params: ClassVar[type] = NoParams

    params: Any

    @classmethod
    def supports(cls, config: Config, params: Any) -> str | None:
        """Why this strategy cannot serve ``config`` with ``params`` (its own parameters,
        an instance of :attr:`Params`), as one line -- or ``None`` when it can.

        Called by the composer for every part of a stack before anything is built,
        after the record's :class:`~moeframe.Capabilities` (dtype, device, activation,
        biases, expert map) have been checked: use it for what data cannot say
        (``n_group`` must divide the number of experts; ``local`` refuses data
        parallelism).  Keep it cheap and free of side effects: it may be called for
        every registered strategy of a kind, to list the ones that would fit.

        The default asks the deprecated ``check_config`` and ``check_stack`` (plugin API
        1), so that strategies written for them keep working.
        """
        try:
            cls.check_config(config.model, params)
        except ValueError as exc:
            return str(exc)
        return cls.check_stack(config)

    @classmethod
    def check_config(cls, model: ModelConfig, params: Any) -> None:
        """Deprecated (plugin API 1): raise ``ValueError`` when ``params`` do not fit
        ``model``.  Define :meth:`supports` instead."""

    @classmethod
    def check_stack(cls, config: Config) -> str | None:
        """Deprecated (plugin API 1): why this part cannot serve ``config``, or None.
        Define :meth:`supports` instead."""
        return None

    def weight_specs(self) -> list[WeightSpec]:
        """The tensors this part owns (:class:`moeframe.WeightSpec`); the layer creates,
        initialises and loads them under their names.  None by default."""
        return []

    def workspace_requests(self) -> Sequence[WorkspaceRequest]:
        """Staging buffers this part uses during a forward
        (:class:`moeframe.WorkspaceRequest`); reserved when the stack is built, handed out
        by ``context.workspace.views(requests, device)``.  None by default."""
        return ()

    def describe(self) -> dict[str, Any]:
        """Details shown by ``moeframe explain`` and ``moeframe run`` (JSON-able)."""
        return {}

    def report(self) -> dict[str, Any] | None:
        """What this part observed during the forwards it ran (statistics, timings), as a
        JSON-able dict; ``moeframe run`` prints it (its ``"summary"`` key as one line).
        ``None`` (the default): nothing to report."""
        return None

    def release(self) -> None:
        """Free memory kept between calls (scratch buffers); it is taken again on the
        next call.  ``Stack.release()`` asks every part.  Nothing by default."""


def base_class(kind: str) -> type[StrategyBase]:
    """The base class a strategy of ``kind`` must subclass."""
    module, _, name = BASE_FOR_KIND[kind].partition(":")
    cls: type[StrategyBase] = getattr(importlib.import_module(module), name)
    return cls


def contract_problem(kind: str, impl: Any) -> str | None:
    """Why ``impl`` cannot be a strategy of ``kind`` (not a subclass of the kind's base
    class, or a ``Params`` that is not an attrs class), or None."""
    base = base_class(kind)
    if not isinstance(impl, type):
        return f"impl must be a class subclassing moeframe.{base.__name__}, not {type(impl).__name__} {impl!r}"
    if not issubclass(impl, base):
        return f"impl {impl.__module__}.{impl.__qualname__} does not subclass moeframe.{base.__name__}"
    params = impl.Params
    if not (isinstance(params, type) and attrs.has(params)):
        return f"{impl.__qualname__}.Params must be an attrs class (decorate it with @attrs.frozen), not {params!r}"
    return None


def deprecated_members(cls: type) -> list[str]:
    """The deprecated members (:data:`DEPRECATED_MEMBERS`) that ``cls`` defines itself
    rather than inherits from :class:`StrategyBase`."""
    found = []
    for name in DEPRECATED_MEMBERS:
        owner = next(klass for klass in cls.__mro__ if name in vars(klass))
        if owner is not StrategyBase:
            found.append(name)
    return found
