"""moeframe-expert-stats: tokens per expert, per layer.

``collect(module)`` returns the statistics of every ``MoELayer`` in ``module`` (or of the
layer itself) whose stack has the ``expert_stats`` wrapper.
"""

from __future__ import annotations

from moeframe_expert_stats.wrapper import ExpertStats, ExpertStatsWrapper, collect

__all__ = ["ExpertStats", "ExpertStatsWrapper", "collect"]
