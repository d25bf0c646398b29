"""moeframe-expert-stats: tokens per expert, per layer.

``collect(module)`` returns the statistics of every ``MoELayer`` in ``module`` (or of the
layer itself) whose stack has the ``expert_stats`` wrapper.

The names are imported lazily: loading the plugin (``moeframe_expert_stats.plugin``)
imports neither torch nor the wrapper.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExpertStats", "ExpertStatsWrapper", "collect"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from moeframe_expert_stats import wrapper

        return getattr(wrapper, name)
    raise AttributeError(f"module 'moeframe_expert_stats' has no attribute {name!r}")
