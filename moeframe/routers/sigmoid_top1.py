"""``sigmoid_top1``: Llama-4 routing -- the best expert by logit, weighted by the sigmoid of
that logit, the weight applied to the expert's *input*."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moeframe.config import Config
from moeframe.routers import Router, TopKOutput


class SigmoidTop1Router(Router):
    """``v, idx = topk(logits, 1); w = sigmoid(float32(v)).to(x.dtype)``; output ``f_idx(w * x)``."""

    weight_on_input = True

    @classmethod
    def supports(cls, config: Config, params: Any) -> str | None:
        if config.model.top_k != 1:
            return (
                f"sigmoid_top1 applies the weight to the expert input and needs model.top_k = 1 "
                f"(got {config.model.top_k})"
            )
        return None

    def select(self, logits: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> TopKOutput:
        values, topk_ids = torch.topk(logits, 1, dim=-1)
        topk_weights = torch.sigmoid(values.float()).to(logits.dtype)
        return TopKOutput(topk_weights, topk_ids, weight_on_input=True)
