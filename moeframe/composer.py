"""The composer: builds a stack from a config and refuses, at build time, any stack whose
parts do not fit.

A stack is the wrappers (outermost first) around one runner, which uses one router, one
dispatcher and one kernel.  Every check happens here, before any tensor is touched:
capabilities (dtype, device, activation, biases, expert map), each part's own
``check_stack``, and the wrappers' ordering rules.  A refusal is one
:class:`~moeframe.errors.StackError` saying which rule failed and what would work.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from moeframe.config import Config, StrategyConfig, unstructure
from moeframe.context import BuildContext
from moeframe.errors import StackError
from moeframe.plugins import Entry, Registry, get_registry
from moeframe.workspace import Workspace, layout_bytes

__all__ = ["Part", "Stack", "check_stack", "build_stack", "check_wrapper_order", "reference_config"]


@attrs.define
class Part:
    """One built part of a stack."""

    kind: str
    entry: Entry
    params: Any
    instance: Any
    workspace_bytes: int = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "name": self.entry.strategy.display_name,
            "provider": str(self.entry.provider),
            "params": unstructure(self.params),
            "workspace_bytes": self.workspace_bytes,
        }
        extra = self.instance.describe() if hasattr(self.instance, "describe") else {}
        if extra:
            out["details"] = extra
        return out


@attrs.define
class Stack:
    """A composed stack: call :meth:`forward` like a runner."""

    runner: Any
    router: Any
    kernel: Any
    dispatcher: Any
    #: outermost first: the wrappers, the runner, then router, dispatcher, kernel
    parts: list[Part]
    #: the staging buffers the parts use (outputs never alias them)
    workspace: Workspace

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        out = self.runner.forward(hidden_states, router_logits)
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

    def weight_specs(self) -> list[Any]:
        """Tensors owned by the runner and the wrappers (the router's and experts' aside)."""
        specs: list[Any] = []
        for part in self.parts:
            if part.kind in ("wrapper", "runner"):
                specs.extend(part.instance.weight_specs())
        return specs

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.parts]

    def release(self) -> None:
        """Ask every part that keeps memory between calls (a ``release()`` method, as
        kernels have) to free it."""
        for part in self.parts:
            release = getattr(part.instance, "release", None)
            if callable(release):
                release()


# -- checks -------------------------------------------------------------------------------
def _device_type(device: torch.device | str | None) -> str:
    return torch.device(device or "cpu").type


def _kernel_problem(entry: Entry, config: Config, device_type: str, ep_size: int = 1) -> str | None:
    caps = entry.capabilities
    m = config.model
    if caps.dtypes is not None and m.dtype not in caps.dtypes:
        return f"does not support model.dtype = {m.dtype!r} (supports {', '.join(sorted(caps.dtypes))})"
    if caps.devices is not None and device_type not in caps.devices:
        return f"does not run on device {device_type!r} (runs on {', '.join(sorted(caps.devices))})"
    if caps.activations is not None and m.activation not in caps.activations:
        return f"does not support model.activation = {m.activation!r} (supports {', '.join(sorted(caps.activations))})"
    if m.expert_bias and not caps.biases:
        return "does not support expert biases (model.expert_bias = true)"
    if ep_size > 1 and not caps.expert_map:
        return f"does not support an expert map, which expert parallelism (parallel.ep_size = {ep_size}) needs"
    return None


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
    ``ep_size`` expert-parallel ranks (default: the config's, or 1)."""
    registry = registry or get_registry()
    device_type = _device_type(device)
    stack = config.stack
    ep = ep_size if ep_size is not None else (config.parallel.ep_size or 1)

    kernel_entry = registry.get("kernel", stack.kernel.name)
    problem = _kernel_problem(kernel_entry, config, device_type, ep)
    if problem:
        fits = [e.name for e in registry.entries("kernel") if _kernel_problem(e, config, device_type, ep) is None]
        alternatives = f"; kernels that fit: {', '.join(fits)}" if fits else ""
        raise StackError(f"stack.kernel: kernel {kernel_entry.strategy.display_name!r} {problem}{alternatives}")

    for kind, chosen in (("runner", stack.runner), ("dispatcher", stack.dispatcher)):
        entry = registry.get(kind, chosen.name)
        cls = entry.load()
        why = cls.check_stack(config) if hasattr(cls, "check_stack") else None
        if why:
            fits = [
                e.name for e in registry.entries(kind)
                if e.name != chosen.name and not (getattr(e.load(), "check_stack", lambda c: None)(config))
            ]
            alternatives = f"; {kind}s that fit: {', '.join(fits)}" if fits else ""
            raise StackError(f"stack.{kind}: {why}{alternatives}")

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
        raise StackError(f"stack.wrappers: {problem}{hint}")
    for i, w in enumerate(stack.wrappers):
        cls = entries[w.name].load()
        why = cls.check_stack(config) if hasattr(cls, "check_stack") else None
        if why:
            raise StackError(f"stack.wrappers[{i}]: {why}")


# -- building -----------------------------------------------------------------------------
def _instantiate(kind: str, chosen: StrategyConfig, registry: Registry, *args: Any) -> tuple[Entry, Any]:
    entry = registry.get(kind, chosen.name)
    return entry, entry.load()(*args, chosen.params)


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

    router_entry, context.router = _instantiate("router", config.router, registry, context)
    kernel_entry, context.kernel = _instantiate("kernel", stack_cfg.kernel, registry, context)
    dispatcher_entry, context.dispatcher = _instantiate("dispatcher", stack_cfg.dispatcher, registry, context)
    runner_entry, runner = _instantiate("runner", stack_cfg.runner, registry, context)

    inner_parts = [
        Part("runner", runner_entry, stack_cfg.runner.params, runner),
        Part("router", router_entry, config.router.params, context.router),
        Part("dispatcher", dispatcher_entry, stack_cfg.dispatcher.params, context.dispatcher),
        Part("kernel", kernel_entry, stack_cfg.kernel.params, context.kernel),
    ]
    wrapper_parts: list[Part] = []
    outer = runner
    for wrapper_cfg in reversed(stack_cfg.wrappers):
        entry = registry.get("wrapper", wrapper_cfg.name)
        outer = entry.load()(outer, context, wrapper_cfg.params)
        wrapper_parts.insert(0, Part("wrapper", entry, wrapper_cfg.params, outer))
    parts = wrapper_parts + inner_parts
    for part in parts:
        requests = part.instance.workspace_requests() if hasattr(part.instance, "workspace_requests") else ()
        if requests:
            part.workspace_bytes = context.workspace.reserve(requests, context.device)
    return Stack(outer, context.router, context.kernel, context.dispatcher, parts, context.workspace)


def reference_config(config: Config, registry: Registry | None = None) -> Config:
    """The reference stack for ``config``: its router, the ``torch`` kernel, the ``local``
    dispatcher, the ``default`` runner, one process, and only the wrappers that change the
    result (``transparent = False``, such as ``shared_experts``), in the same order."""
    from moeframe.config import ParallelConfig, StackConfig

    registry = registry or get_registry()
    kept = tuple(w for w in config.stack.wrappers if not getattr(registry.get("wrapper", w.name).load(), "transparent", True))
    stack = StackConfig(runner=StrategyConfig("default"), kernel=StrategyConfig("torch"),
                        dispatcher=StrategyConfig("local"), wrappers=kept)
    return attrs.evolve(config, stack=stack, parallel=ParallelConfig())
