"""A router: softmax over logits / temperature, top-k, renormalised."""

import attrs
import torch

import moeframe


@attrs.frozen
class TemperatureParams:
    temperature: float = moeframe.option(1.0, help="divides the logits before the softmax")
    max_top_k: int = moeframe.option(8, help="refuse models with a larger top_k", min=1)


class TemperatureSoftmaxRouter(moeframe.Router):
    Params = TemperatureParams

    @classmethod
    def check_config(cls, model, params):
        if params.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {params.temperature})")
        if model.top_k > params.max_top_k:
            raise ValueError(f"old_softmax chooses at most {params.max_top_k} experts (model.top_k = {model.top_k})")

    def select(self, logits, weights):
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.model.top_k, dim=-1)
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return moeframe.TopKOutput(topk_weights, topk_ids)
