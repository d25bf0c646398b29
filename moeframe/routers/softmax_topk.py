"""``softmax_topk``: softmax over all experts, then top-k (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from moeframe.config import option
from moeframe.routers import Router, TopKOutput


@attrs.frozen
class SoftmaxTopKParams:
    renormalize: bool = option(True, help="divide the K weights by their sum (Mixtral: true; Qwen: norm_topk_prob)")
    weights_dtype: str = option(
        "float32",
        help=(
            "dtype of the routing weights: 'float32' (Mixtral) or 'activation' "
            "(Qwen: cast back to the activation dtype)"
        ),
        choices=("float32", "activation"),
    )


class SoftmaxTopKRouter(Router):
    """``p = softmax(float32(x @ W_r.T)); w, idx = topk(p, K); w /= w.sum()`` (optional)."""

    Params = SoftmaxTopKParams

    def select(self, logits: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> TopKOutput:
        probs = torch.softmax(logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.model.top_k, dim=-1)
        if self.params.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        if self.params.weights_dtype == "activation":
            topk_weights = topk_weights.to(logits.dtype)
        return TopKOutput(topk_weights, topk_ids)

    def describe(self) -> dict[str, Any]:
        return attrs.asdict(self.params)
