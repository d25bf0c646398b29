"""``topk_softmax``: GPT-OSS routing -- a router with a bias, top-k on the raw logits,
then softmax over the K chosen."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from moeframe.routers import Router, TopKOutput
from moeframe.weights import WeightSpec


class TopKSoftmaxRouter(Router):
    """``logits = x @ W_r.T + b_r; v, idx = topk(logits, K); w = softmax(v)``."""

    def weight_specs(self) -> list[WeightSpec]:
        m = self.model
        return [*super().weight_specs(), WeightSpec("router.bias", (m.num_experts,), m.torch_dtype, std=0.1)]

    def logits(self, hidden_states: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return F.linear(hidden_states, weights["router.weight"], weights["router.bias"])

    def select(self, logits: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> TopKOutput:
        values, topk_ids = torch.topk(logits, self.model.top_k, dim=-1)
        topk_weights = torch.softmax(values, dim=-1, dtype=values.dtype)
        return TopKOutput(topk_weights, topk_ids)
