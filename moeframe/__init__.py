"""moeframe: Mixture-of-Experts layers for PyTorch where every stage is a named, pluggable
strategy.

``import moeframe`` is cheap: it scans no entry points and imports no plugin; the first
use of a registry does.  The public names::

    moeframe.MoELayer, moeframe.load_config, moeframe.Config, moeframe.list_presets
    moeframe.hookimpl, moeframe.Strategy, moeframe.Capabilities, moeframe.OrderingRules
    moeframe.Router, moeframe.Kernel, moeframe.Dispatcher, moeframe.Runner, moeframe.Wrapper
    moeframe.get_registry, moeframe.register_plugin, moeframe.compare, moeframe.UserError (and the other errors)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    # plugin contract
    "hookimpl": "moeframe.plugins",
    "Strategy": "moeframe.plugins",
    "Capabilities": "moeframe.plugins",
    "OrderingRules": "moeframe.plugins",
    "PLUGIN_API_VERSION": "moeframe.plugins",
    "get_registry": "moeframe.plugins",
    "register_plugin": "moeframe.plugins:register",
    # config
    "Config": "moeframe.config",
    "load_config": "moeframe.config",
    "list_presets": "moeframe.config",
    "option": "moeframe.config",
    # strategy base classes
    "Router": "moeframe.routers",
    "TopKOutput": "moeframe.routers",
    "Kernel": "moeframe.kernels",
    "ExpertWeights": "moeframe.kernels",
    "Dispatcher": "moeframe.dispatchers",
    "Runner": "moeframe.runners",
    "Wrapper": "moeframe.wrappers",
    "BuildContext": "moeframe.context",
    "WeightSpec": "moeframe.weights",
    "WorkspaceRequest": "moeframe.workspace",
    # the layer and its checks
    "MoELayer": "moeframe.layer",
    "compare": "moeframe.numerics",
    "tolerance_for": "moeframe.numerics",
    # errors
    "UserError": "moeframe.errors",
    "ConfigError": "moeframe.errors",
    "UnknownStrategyError": "moeframe.errors",
    "DuplicateStrategyError": "moeframe.errors",
    "StackError": "moeframe.errors",
    "PluginError": "moeframe.errors",
    "InputError": "moeframe.errors",
}

# A literal list, so that linters and type checkers see the public names (the TYPE_CHECKING
# imports below); tests/test_public_api.py checks that it names exactly _LAZY's keys.
__all__ = [
    "__version__",
    # plugin contract
    "hookimpl",
    "Strategy",
    "Capabilities",
    "OrderingRules",
    "PLUGIN_API_VERSION",
    "get_registry",
    "register_plugin",
    # config
    "Config",
    "load_config",
    "list_presets",
    "option",
    # strategy base classes
    "Router",
    "TopKOutput",
    "Kernel",
    "ExpertWeights",
    "Dispatcher",
    "Runner",
    "Wrapper",
    "BuildContext",
    "WeightSpec",
    "WorkspaceRequest",
    # the layer and its checks
    "MoELayer",
    "compare",
    "tolerance_for",
    # errors
    "UserError",
    "ConfigError",
    "UnknownStrategyError",
    "DuplicateStrategyError",
    "StackError",
    "PluginError",
    "InputError",
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'moeframe' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from moeframe.config import Config, list_presets, load_config, option
    from moeframe.context import BuildContext
    from moeframe.dispatchers import Dispatcher
    from moeframe.errors import (
        ConfigError,
        DuplicateStrategyError,
        InputError,
        PluginError,
        StackError,
        UnknownStrategyError,
        UserError,
    )
    from moeframe.kernels import ExpertWeights, Kernel
    from moeframe.layer import MoELayer
    from moeframe.numerics import compare, tolerance_for
    from moeframe.plugins import PLUGIN_API_VERSION, Capabilities, OrderingRules, Strategy, get_registry, hookimpl
    from moeframe.plugins import register as register_plugin
    from moeframe.routers import Router, TopKOutput
    from moeframe.runners import Runner
    from moeframe.weights import WeightSpec
    from moeframe.workspace import WorkspaceRequest
    from moeframe.wrappers import Wrapper
