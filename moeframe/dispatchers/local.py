"""``local``: no movement; every rank computes its own experts on the tokens it holds.

In one process that is the whole computation.  With experts spread over ranks that share
their tokens (EP without DP, or TP), each rank's result is a partial sum that the layer
all-reduces once.
"""

from __future__ import annotations

import torch

from moeframe.dispatchers import Dispatched, Dispatcher


class LocalDispatcher(Dispatcher):
    """Registered with ``Capabilities(distributed=False)``: the composer refuses it under
    data parallelism, where ranks hold different tokens."""

    @property
    def output_reduced(self) -> bool:
        return self.parallel.token_group_size == 1

    def dispatch(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        return Dispatched(hidden_states, topk_weights, topk_ids)

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        return expert_output
