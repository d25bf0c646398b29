"""moeframe's plugin mechanism: the hook contract, the records, loading and the registry.

Plugin authors need only :data:`hookimpl` and the records (:class:`Strategy`,
:class:`Capabilities`, :class:`OrderingRules`), all re-exported from :mod:`moeframe`.
"""

from __future__ import annotations

import pluggy

from moeframe.plugins.hookspecs import PLUGIN_API_VERSION, PROJECT_NAME
from moeframe.plugins.manager import (
    ENTRY_POINT_GROUP,
    PluginHost,
    PluginRecord,
    PluginWarning,
    Registry,
    get_host,
    get_registry,
    register,
    reset,
)
from moeframe.plugins.records import KINDS, Capabilities, Entry, OrderingRules, Provider, Strategy

#: Marks a function of a plugin module as the implementation of a moeframe hook.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = [
    "hookimpl",
    "PLUGIN_API_VERSION",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "Capabilities",
    "OrderingRules",
    "Strategy",
    "Provider",
    "Entry",
    "PluginHost",
    "PluginRecord",
    "PluginWarning",
    "Registry",
    "get_host",
    "get_registry",
    "register",
    "reset",
]
