"""moeframe's plugin mechanism: the hook contract, the records, loading and the registry.

Plugin authors need only :data:`hookimpl` and the records (:class:`Strategy`,
:class:`Capabilities`, :class:`OrderingRules`), all re-exported from :mod:`moeframe`,
and the base class of their strategy's kind (:mod:`moeframe.plugins.contract` holds what
the five kinds share).
"""

from __future__ import annotations

from moeframe.plugins.hookspecs import PLUGIN_API_VERSION, hookimpl
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
from moeframe.plugins.records import (
    KINDS,
    Capabilities,
    Entry,
    MoeframeDeprecationWarning,
    OrderingRules,
    Provider,
    Strategy,
)

__all__ = [
    "hookimpl",
    "MoeframeDeprecationWarning",
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
