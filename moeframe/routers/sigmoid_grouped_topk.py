"""``sigmoid_grouped_topk``: DeepSeek-V3 routing.

Sigmoid scores in fp32; a correction bias that only chooses experts; experts in
``n_group`` groups of which the ``topk_group`` best (by the sum of their two best biased
scores, or by their best score without bias) are eligible; weights are the *unbiased*
scores, renormalised with a 1e-20 epsilon, times ``routed_scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from moeframe.config import Config, option
from moeframe.routers import Router, TopKOutput
from moeframe.weights import WeightSpec


@attrs.frozen
class SigmoidGroupedTopKParams:
    n_group: int = option(1, help="number of expert groups (must divide num_experts)", min=1)
    topk_group: int = option(1, help="groups kept per token", min=1)
    routed_scaling_factor: float = option(1.0, help="multiplies the routing weights", min=0.0, exclusive_min=True)
    renormalize: bool = option(True, help="divide the K weights by their sum + 1e-20 (norm_topk_prob)")
    correction_bias: bool = option(
        True,
        help=(
            "own router.e_score_correction_bias [E] (used to choose experts only); "
            "without it a group scores by its best expert"
        ),
    )


class SigmoidGroupedTopKRouter(Router):
    Params = SigmoidGroupedTopKParams

    @classmethod
    def supports(cls, config: Config, params: Any) -> str | None:
        model = config.model
        if model.num_experts % params.n_group:
            return f"n_group = {params.n_group} must divide model.num_experts ({model.num_experts})"
        if params.topk_group > params.n_group:
            return f"topk_group = {params.topk_group} must be <= n_group ({params.n_group})"
        per_group = model.num_experts // params.n_group
        if params.correction_bias and per_group < 2:
            return (
                f"n_group = {params.n_group}: groups need at least 2 experts to be scored by their top-2 "
                f"(have {per_group})"
            )
        if model.top_k > params.topk_group * per_group:
            return (
                f"topk_group = {params.topk_group}: {params.topk_group} groups of {per_group} experts cannot "
                f"supply top_k = {model.top_k} experts"
            )
        return None

    def weight_specs(self) -> list[WeightSpec]:
        specs = super().weight_specs()
        if self.params.correction_bias:
            specs.append(
                WeightSpec("router.e_score_correction_bias", (self.model.num_experts,), torch.float32, std=0.05)
            )
        return specs

    @property
    def logits_dtype(self) -> torch.dtype:
        return torch.float32

    def logits(self, hidden_states: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.linear(hidden_states.float(), weights["router.weight"].float())

    def select(self, logits: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> TopKOutput:
        p = self.params
        scores = torch.sigmoid(logits.float())
        T, E = scores.shape
        if p.correction_bias:
            choice = scores + weights["router.e_score_correction_bias"]
            group_scores = choice.view(T, p.n_group, E // p.n_group).topk(2, dim=-1).values.sum(dim=-1)
        else:
            choice = scores
            group_scores = choice.view(T, p.n_group, E // p.n_group).amax(dim=-1)
        group_ids = torch.topk(group_scores, p.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_ids, True)
        expert_mask = group_mask.unsqueeze(-1).expand(T, p.n_group, E // p.n_group).reshape(T, E)
        masked = choice.masked_fill(~expert_mask, float("-inf"))
        topk_ids = torch.topk(masked, self.model.top_k, dim=-1).indices
        topk_weights = scores.gather(1, topk_ids)
        if p.renormalize:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weights = topk_weights * p.routed_scaling_factor
        return TopKOutput(topk_weights, topk_ids)

    def describe(self) -> dict[str, Any]:
        return attrs.asdict(self.params)
