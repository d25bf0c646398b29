"""The composer: builds a stack from a config and refuses, at build time, any stack whose
parts do not fit.

A stack is the wrappers (outermost first) around one runner, which uses one router, one
dispatcher and one kernel.  Every check happens here, before any tensor is touched:
capabilities (dtype, device, activation, biases, expert map, distributed), each part's
own :meth:`~moeframe.plugins.contract.StrategyBase.supports` given its own parameters,
and the wrappers' ordering rules.  A refusal is one :class:`~moeframe.errors.StackError`
naming the config's source and key, saying which rule failed and what would work.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import attrs
import torch

from moeframe.config import Config, StrategyConfig, unstructure
from moeframe.context import BuildContext
from moeframe.dispatchers import Dispatcher
from moeframe.errors import PluginError, StackError
from moeframe.kernels import Kernel, KernelOutputError
from moeframe.plugins import Entry, Registry, get_registry
from moeframe.plugins.contract import StrategyBase
from moeframe.routers import Router
from moeframe.runners import Runner
from moeframe.weights import WeightSpec
from moeframe.workspace import Workspace
from moeframe.wrappers import Wrapper

__all__ = ["Part", "Stack", "check_stack", "build_stack", "check_wrapper_order", "reference_config"]


@attrs.define
class Part:
    """One built part of a stack."""

    kind: str
    entry: Entry
    params: Any
    instance: StrategyBase
    workspace_bytes: int = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.entry.strategy.display_name,
            "provider": str(self.entry.provider),
            "params": unstructure(self.params),
            "workspace_bytes": self.workspace_bytes,
        }
        extra = self.instance.describe()
        if extra:
            out["details"] = extra
        return out


@attrs.define
class Stack:
    """A composed stack: call :meth:`forward` like a runner."""

    #: the outermost part: the first wrapper, or the runner when there is none
    runner: Runner
    router: Router
    kernel: Kernel
    dispatcher: Dispatcher
    #: outermost first: the wrappers, the runner, then router, dispatcher, kernel
    parts: list[Part]
    #: the staging buffers the parts use (outputs never alias them)
    workspace: Workspace

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """The stack's output for ``hidden_states [T, H]`` (a new tensor).

        A part that exits (``sys.exit`` in plugin code) or a kernel that returns something
        other than its ``[T, H]`` output is a :class:`~moeframe.errors.PluginError`
        naming the part and its provider.
        """
        try:
            out = self.runner.forward(hidden_states, router_logits)
        except (SystemExit, KernelOutputError) as exc:
            raise self._blame(exc) from exc
        if self.workspace.holds(out):
            # a part handed back a view of a staging buffer, which the next call overwrites
            out = out.clone()
        return out

    @property
    def output_reduced(self) -> bool:
        return bool(self.runner.output_reduced)

    @property
    def workspace_bytes(self) -> int:
        return sum(p.workspace_bytes for p in self.parts)

    def router_logits(self, hidden_states: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The router's logits ``[T, E]`` for ``hidden_states`` (what the layer passes to
        :meth:`forward`); a router that calls ``sys.exit()`` is named like in :meth:`forward`."""
        try:
            return self.router.logits(hidden_states, tensors)
        except SystemExit as exc:
            raise self._blame(exc) from exc

    def _blame(self, exc: BaseException) -> PluginError:
        """The error naming the part in whose code ``exc`` was raised (the innermost frame
        of the traceback that runs a method of one of the parts)."""
        by_instance = {id(part.instance): part for part in self.parts}
        culprit: Part | None = None
        tb: TracebackType | None = exc.__traceback__
        while tb is not None:
            culprit = by_instance.get(id(tb.tb_frame.f_locals.get("self")), culprit)
            tb = tb.tb_next
        if isinstance(exc, SystemExit):
            what = f"called sys.exit({exc.code!r}) during a forward; a strategy raises an exception instead"
        else:
            what = str(exc)
        if culprit is None:  # pragma: no cover - raised outside every part's methods
            return PluginError(f"a part of the stack {what}")
        entry = culprit.entry
        return PluginError(f"{culprit.kind} {entry.strategy.display_name!r} from {entry.provider} {what}")

    def weight_specs(self) -> list[WeightSpec]:
        """Tensors owned by the runner and the wrappers (the router's and experts' aside)."""
        specs: list[WeightSpec] = []
        for part in self.parts:
            if part.kind in ("wrapper", "runner"):
                specs.extend(part.instance.weight_specs())
        return specs

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.parts]

    def release(self) -> None:
        """Ask every part to free the memory it keeps between calls (``release()``)."""
        for part in self.parts:
            part.instance.release()


# -- checks -------------------------------------------------------------------------------
def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device or "cpu").type


def _capability_problem(entry: Entry, config: Config, device_type: str, ep_size: int = 1) -> str | None:
    """Why ``entry``'s declared :class:`~moeframe.Capabilities` exclude this stack, or None."""
    caps = entry.capabilities
    m = config.model
    if caps.dtypes is not None and m.dtype not in caps.dtypes:
        return f"does not support model.dtype = {m.dtype!r} (supports {', '.join(sorted(caps.dtypes))})"
    if caps.devices is not None and device_type not in caps.devices:
        return f"does not run on device {device_type!r} (runs on {', '.join(sorted(caps.devices))})"
    if caps.activations is not None and m.activation not in caps.activations:
        return f"does not support model.activation = {m.activation!r} (supports {', '.join(sorted(caps.activations))})"
    if entry.kind == "kernel":
        if m.expert_bias and not caps.biases:
            return "does not support expert biases (model.expert_bias = true)"
        if ep_size > 1 and not caps.expert_map:
            return f"does not support an expert map, which expert parallelism (parallel.ep_size = {ep_size}) needs"
    if entry.kind == "dispatcher" and config.parallel.dp_size > 1 and not caps.distributed:
        return (
            f"cannot serve data parallelism (parallel.dp_size = {config.parallel.dp_size}): ranks hold different "
            "tokens and it does not move tokens between ranks (Capabilities(distributed=False))"
        )
    return None


def _strategy_problem(entry: Entry, config: Config, params: Any, device_type: str, ep_size: int) -> str | None:
    """Why the strategy of ``entry`` with ``params`` cannot serve ``config``: its
    capabilities, then its own :meth:`~moeframe.plugins.contract.StrategyBase.supports`."""
    problem = _capability_problem(entry, config, device_type, ep_size)
    if problem:
        return f"{entry.kind} {entry.strategy.display_name!r} {problem}"
    return entry.load().supports(config, params)


def _fitting(kind: str, chosen: str, config: Config, registry: Registry, device_type: str, ep_size: int) -> str:
    """``"; dispatchers that fit: a, b"``: the other strategies of ``kind`` that would
    serve ``config`` with their default parameters (kernels: by capabilities only, so
    that no kernel's implementation is imported for a suggestion)."""
    fits = []
    for entry in registry.entries(kind):
        if entry.name == chosen or _capability_problem(entry, config, device_type, ep_size):
            continue
        if kind != "kernel":
            try:
                cls = entry.load()
                if cls.supports(config, cls.Params()) is not None:
                    continue
            except Exception:  # a broken or unconfigurable alternative is not suggested
                continue
        fits.append(entry.name)
    return f"; {kind}s that fit: {', '.join(fits)}" if fits else ""


def _refusal(config: Config, path: str, message: str) -> StackError:
    """A :class:`StackError` at ``path``, prefixed with the config's source like a
    :class:`~moeframe.errors.ConfigError`."""
    where = f"{config.source}: " if config.source else ""
    return StackError(f"{where}{path}: {message}")


def check_wrapper_order(names: Sequence[str], entries: dict[str, Entry]) -> str | None:
    """Why the order ``names`` (outermost first) breaks a rule, or None if it is valid."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            return f"wrapper {name!r} appears twice (stack.wrappers[{seen[name]}] and stack.wrappers[{i}])"
        seen[name] = i
    last = len(names) - 1
    for i, name in enumerate(names):
        rules = entries[name].strategy.rules
        if rules.outermost and i != 0:
            return f"wrapper {name!r} must be outermost (stack.wrappers[0]) but is stack.wrappers[{i}]"
        if rules.innermost and i != last:
            return f"wrapper {name!r} must be innermost (last in stack.wrappers) but is stack.wrappers[{i}]"
        for other in sorted(rules.conflicts):
            if other in seen:
                return f"wrapper {name!r} cannot be used together with {other!r}"
        for other in sorted(rules.inside):
            if other in seen and seen[other] > i:
                return f"wrapper {name!r} must sit inside {other!r} (come after it in stack.wrappers)"
        for other in sorted(rules.outside):
            if other in seen and seen[other] < i:
                return f"wrapper {name!r} must sit outside {other!r} (come before it in stack.wrappers)"
    return None


def _suggest_order(names: Sequence[str], entries: dict[str, Entry]) -> list[str] | None:
    unique = list(dict.fromkeys(names))
    if len(unique) > 7:
        return None
    best: tuple[int, list[str]] | None = None
    for perm in itertools.permutations(unique):
        if check_wrapper_order(perm, entries) is None:
            # distance: pairs whose relative order changed
            pos = {n: i for i, n in enumerate(perm)}
            dist = sum(1 for a, b in itertools.combinations(unique, 2) if pos[a] > pos[b])
            if best is None or dist < best[0]:
                best = (dist, list(perm))
    return None if best is None else best[1]


def check_stack(
    config: Config,
    device: torch.device | str | None = None,
    registry: Registry | None = None,
    ep_size: int | None = None,
) -> None:
    """Raise :class:`StackError` if ``config``'s stack cannot be built on ``device`` with
    ``ep_size`` expert-parallel ranks (default: the config's, or 1).

    Every part is asked, with its own parameters: its record's capabilities, then its
    class's ``supports(config, params)``; then the wrappers' ordering rules.
    """
    registry = registry or get_registry()
    device_type = _device_type(device)
    stack = config.stack
    ep = ep_size if ep_size is not None else (config.parallel.ep_size or 1)

    singles = (
        ("kernel", "stack.kernel", stack.kernel),
        ("router", "router", config.router),
        ("dispatcher", "stack.dispatcher", stack.dispatcher),
        ("runner", "stack.runner", stack.runner),
    )
    for kind, path, chosen in singles:
        entry = registry.get(kind, chosen.name)
        problem = _strategy_problem(entry, config, chosen.params, device_type, ep)
        if problem:
            alternatives = "" if kind == "router" else _fitting(kind, chosen.name, config, registry, device_type, ep)
            raise _refusal(config, path, f"{problem}{alternatives}")

    names = [w.name for w in stack.wrappers]
    entries = {w.name: registry.get("wrapper", w.name) for w in stack.wrappers}
    problem = check_wrapper_order(names, entries)
    if problem:
        suggestion = _suggest_order(names, entries)
        if suggestion is not None and suggestion != names:
            hint = f"; an order that works: [{', '.join(suggestion)}]"
        elif suggestion is None:
            hint = "; no order of these wrappers satisfies every rule: remove one"
        else:
            hint = ""
        raise _refusal(config, "stack.wrappers", f"{problem}{hint}")
    for i, w in enumerate(stack.wrappers):
        problem = _strategy_problem(entries[w.name], config, w.params, device_type, ep)
        if problem:
            raise _refusal(config, f"stack.wrappers[{i}]", problem)


# -- building -----------------------------------------------------------------------------
def build_stack(context: BuildContext, registry: Registry | None = None) -> Stack:
    """Check and build the stack of ``context.config``; reserve its workspace.

    Fills ``context.router``, ``context.kernel`` and ``context.dispatcher`` on the way.
    The tensors (``context.weights``) may be filled in afterwards: parts look them up at
    forward time.
    """
    registry = registry or get_registry()
    config = context.config
    check_stack(config, context.device, registry, context.parallel.ep_size)
    stack_cfg = config.stack

    router_entry = registry.get("router", config.router.name)
    router = context.router = router_entry.load_as(Router)(context, config.router.params)
    kernel_entry = registry.get("kernel", stack_cfg.kernel.name)
    kernel = context.kernel = kernel_entry.load_as(Kernel)(context, stack_cfg.kernel.params)
    dispatcher_entry = registry.get("dispatcher", stack_cfg.dispatcher.name)
    dispatcher = context.dispatcher = dispatcher_entry.load_as(Dispatcher)(context, stack_cfg.dispatcher.params)
    runner_entry = registry.get("runner", stack_cfg.runner.name)
    runner = runner_entry.load_as(Runner)(context, stack_cfg.runner.params)

    inner_parts = [
        Part("runner", runner_entry, stack_cfg.runner.params, runner),
        Part("router", router_entry, config.router.params, router),
        Part("dispatcher", dispatcher_entry, stack_cfg.dispatcher.params, dispatcher),
        Part("kernel", kernel_entry, stack_cfg.kernel.params, kernel),
    ]
    wrapper_parts: list[Part] = []
    outer: Runner = runner
    for wrapper_cfg in reversed(stack_cfg.wrappers):
        entry = registry.get("wrapper", wrapper_cfg.name)
        outer = entry.load_as(Wrapper)(outer, context, wrapper_cfg.params)
        wrapper_parts.insert(0, Part("wrapper", entry, wrapper_cfg.params, outer))
    parts = wrapper_parts + inner_parts
    for part in parts:
        requests = part.instance.workspace_requests()
        if requests:
            part.workspace_bytes = context.workspace.reserve(requests, context.device)
    return Stack(outer, router, kernel, dispatcher, parts, context.workspace)


def reference_config(config: Config, registry: Registry | None = None) -> Config:
    """The reference stack for ``config``: its router, the ``torch`` kernel, the ``local``
    dispatcher, the ``default`` runner, one process, and only the wrappers that change the
    result (``transparent = False``, such as ``shared_experts``), in the same order."""
    from moeframe.config import ParallelConfig, StackConfig

    registry = registry or get_registry()
    kept = tuple(w for w in config.stack.wrappers if not _wrapper_class(registry, w.name).transparent)
    stack = StackConfig(
        runner=StrategyConfig("default"),
        kernel=StrategyConfig("torch"),
        dispatcher=StrategyConfig("local"),
        wrappers=kept,
    )
    return attrs.evolve(config, stack=stack, parallel=ParallelConfig())


def _wrapper_class(registry: Registry, name: str) -> type[Wrapper]:
    return registry.get("wrapper", name).load_as(Wrapper)
