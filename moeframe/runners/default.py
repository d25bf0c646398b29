"""``default``: route, dispatch, run the kernel, combine."""

from __future__ import annotations

from typing import Any

import torch

from moeframe.context import BuildContext
from moeframe.kernels import ExpertWeights
from moeframe.runners import Runner


def route(
    router: Any, hidden_states: torch.Tensor, router_logits: torch.Tensor, tensors: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernel gets for these tokens: ``(hidden_states, topk_weights, topk_ids)``.

    A router with ``weight_on_input`` (Llama-4) has its weight multiply the tokens, and
    every expert output is then weighed by one.
    """
    topk_weights, topk_ids, on_input = router.select(router_logits, tensors)
    if on_input:
        hidden_states = hidden_states * topk_weights.to(hidden_states.dtype)
        topk_weights = torch.ones_like(topk_weights, dtype=torch.float32)
    return hidden_states, topk_weights, topk_ids


class DefaultRunner(Runner):
    """The plain path: ``combine(kernel(dispatch(x, router.select(logits))))``.

    A router with ``weight_on_input`` (Llama-4) has its weight multiply the tokens before
    dispatch, and the kernel then weighs every expert output by one.
    """

    def __init__(self, context: BuildContext, params: Any) -> None:
        super().__init__(context, params)
        self.router, self.kernel, self.dispatcher = context.built_parts()
        self.weights = context.weights
        self.expert_map = context.parallel.expert_map(context.model.num_experts, context.device)

    @property
    def output_reduced(self) -> bool:
        return self.dispatcher.output_reduced

    def experts(self) -> ExpertWeights:
        w = self.weights
        return ExpertWeights(
            w["experts.w13"], w["experts.w2"], w.get("experts.b13"), w.get("experts.b2"), self.expert_map
        )

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        hidden_states, topk_weights, topk_ids = route(self.router, hidden_states, router_logits, self.weights)
        dispatched = self.dispatcher.dispatch(hidden_states, topk_weights, topk_ids)
        expert_output = self.kernel.run(
            dispatched.hidden_states, dispatched.topk_weights, dispatched.topk_ids, self.experts()
        )
        return self.dispatcher.combine(expert_output, dispatched)
