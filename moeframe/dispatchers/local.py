"""``local``: no movement; every rank computes its own experts on the tokens it holds.

In one process that is the whole computation.  With experts spread over ranks that share
their tokens (EP without DP, or TP), each rank's result is a partial sum that the layer
all-reduces once.
"""

from __future__ import annotations

import torch

from moeframe.config import Config
from moeframe.dispatchers import Dispatched, Dispatcher


class LocalDispatcher(Dispatcher):
    @classmethod
    def check_stack(cls, config: Config) -> str | None:
        p = config.parallel
        if p.dp_size > 1:
            return (
                f"dispatcher 'local' cannot serve data parallelism (parallel.dp_size = {p.dp_size}): "
                "ranks hold different tokens; use 'all2all' or 'allgather_reducescatter'"
            )
        return None

    @property
    def output_reduced(self) -> bool:
        return self.parallel.token_group_size == 1

    def dispatch(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        return Dispatched(hidden_states, topk_weights, topk_ids)

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return expert_output
