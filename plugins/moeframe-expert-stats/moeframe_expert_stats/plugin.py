"""The plugin module named by the ``moeframe`` entry point: registration only, no imports
of the implementation (moeframe loads it when the wrapper is first used)."""

from __future__ import annotations

from moeframe import Strategy, hookimpl

moeframe_plugin_api = 1


@hookimpl
def register_wrappers() -> list[Strategy]:
    return [
        Strategy(
            "expert_stats",
            "moeframe_expert_stats.wrapper:ExpertStatsWrapper",
            "counts tokens per expert, per layer (cumulative and last call)",
        )
    ]
