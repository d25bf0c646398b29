"""Resolution: plain data in the one shape -> a validated :class:`Config`, each strategy
looked up by name in a registry and its parameters structured into its ``Params``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moeframe.config.schema import Config, ModelConfig, ParallelConfig, StackConfig, StrategyConfig
from moeframe.config.shape import STACK_PARTS
from moeframe.config.structuring import convert, join_path, structure
from moeframe.errors import ConfigError, UserError, did_you_mean

if TYPE_CHECKING:
    from moeframe.plugins.manager import Registry

__all__ = ["TOP_KEYS", "STACK_KEYS", "DEFAULT_STRATEGIES", "resolve_strategy", "build_config"]

TOP_KEYS = ("seed", "model", "router", "stack", "parallel")
STACK_KEYS = (*STACK_PARTS, "wrappers")
#: the stack's strategies when the config names none
DEFAULT_STRATEGIES = {"runner": "default", "kernel": "torch", "dispatcher": "local"}
_STRATEGY_KEYS = ("name", "params")


def _unknown_key(path: str, key: Any, allowed: tuple[str, ...]) -> ConfigError:
    return ConfigError(
        join_path(path, str(key)), f"unknown key{did_you_mean(str(key), allowed)}; allowed keys: {', '.join(allowed)}"
    )


def resolve_strategy(kind: str, node: Any, path: str, registry: Registry, default: str | None = None) -> StrategyConfig:
    """The strategy ``node`` (``{name, params}``; the name ``default`` when it has none)
    of ``kind``, found in ``registry``, with its parameters validated against its
    ``Params``."""
    if not isinstance(node, Mapping):
        raise ConfigError(path, f"expected a {kind} name or a table {{ name = ..., params = {{...}} }}, got {node!r}")
    for key in node:
        if key not in _STRATEGY_KEYS:
            raise _unknown_key(path, key, _STRATEGY_KEYS)
    name_path, params_path = join_path(path, "name"), join_path(path, "params")
    if "name" not in node and default is None:
        raise ConfigError(name_path, "missing required key")
    name = node.get("name", default)
    if not isinstance(name, str):
        raise ConfigError(name_path, f"expected a {kind} name (a string), got {name!r}")
    try:
        entry = registry.get(kind, name)
    except UserError as exc:
        raise ConfigError(name_path, str(exc)) from None
    # each field is validated here; whether the part can serve the whole config (its
    # ``supports``) is asked when the stack is built (moeframe.composer.check_stack)
    params: Any = structure(entry.load().Params, node.get("params", {}), params_path)
    return StrategyConfig(name, params)


def build_config(raw: Any, label: str | None, registry: Registry) -> Config:
    """The validated :class:`Config` of ``raw`` (plain data in the one shape)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", "expected a table at the top level")
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown_key("", key, TOP_KEYS)
    seed = convert(int, raw.get("seed", 0), "seed")
    if "model" not in raw:
        raise ConfigError("model", "missing required table [model]")
    model = structure(ModelConfig, raw["model"], "model")
    parallel = structure(ParallelConfig, raw.get("parallel", {}), "parallel")
    if "router" not in raw:
        raise ConfigError("router", "missing required table [router] (with at least name = ...)")
    router = resolve_strategy("router", raw["router"], "router", registry)

    stack_raw = raw.get("stack", {})
    if not isinstance(stack_raw, Mapping):
        raise ConfigError("stack", f"expected a table of keys, got {stack_raw!r}")
    for key in stack_raw:
        if key not in STACK_KEYS:
            raise _unknown_key("stack", key, STACK_KEYS)
    parts = {
        kind: resolve_strategy(kind, stack_raw.get(kind, {}), f"stack.{kind}", registry, default)
        for kind, default in DEFAULT_STRATEGIES.items()
    }
    wrappers_raw = stack_raw.get("wrappers", [])
    if not isinstance(wrappers_raw, (list, tuple)):
        raise ConfigError("stack.wrappers", f"expected a list of wrappers (outermost first), got {wrappers_raw!r}")
    wrappers = tuple(
        resolve_strategy("wrapper", w, f"stack.wrappers[{i}]", registry) for i, w in enumerate(wrappers_raw)
    )
    stack = StackConfig(parts["runner"], parts["kernel"], parts["dispatcher"], wrappers)
    return Config(model=model, router=router, stack=stack, parallel=parallel, seed=seed, source=label)
