"""The ``expert_stats`` wrapper."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from moeframe import BuildContext, Runner, Wrapper, option


@attrs.frozen
class ExpertStatsParams:
    name: str | None = option(None, help="label of this layer in reports (default: the layer's module name)")


class ExpertStats:
    """Token counts per expert of one layer: ``cumulative`` and ``last_call`` (int64 ``[E]``)."""

    def __init__(self, num_experts: int, label: str | None = None) -> None:
        self.label = label
        self.cumulative = torch.zeros(num_experts, dtype=torch.int64)
        self.last_call = torch.zeros(num_experts, dtype=torch.int64)
        self.calls = 0

    def reset(self) -> None:
        self.cumulative.zero_()
        self.last_call.zero_()
        self.calls = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "calls": self.calls,
            "cumulative": self.cumulative.tolist(),
            "last_call": self.last_call.tolist(),
        }

    def imbalance(self) -> float:
        """max / mean of the cumulative counts (1.0 is perfect balance; 0 when no tokens)."""
        total = int(self.cumulative.sum())
        if total == 0:
            return 0.0
        return float(self.cumulative.max()) / (total / self.cumulative.numel())


class ExpertStatsWrapper(Wrapper):
    """Counts, per expert, the (token, k) pairs routed to it, then runs the inner runner.

    It reads the routing decision from the stack's router (the same call the runner
    makes) and does not change the output.  A "call" is one forward of the layer, even
    when the wrapper sits inside ``chunking`` and sees the tokens chunk by chunk.
    """

    Params = ExpertStatsParams

    def __init__(self, inner: Runner, context: BuildContext, params: ExpertStatsParams) -> None:
        super().__init__(inner, context, params)
        self.context = context
        self.router, _, _ = context.built_parts()
        self.weights = context.weights
        self.stats = ExpertStats(context.model.num_experts, params.name)
        self._seen_forward = -1

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.context.forward_index != self._seen_forward:
            self._seen_forward = self.context.forward_index
            self.stats.last_call.zero_()
            self.stats.calls += 1
        if hidden_states.shape[0]:
            ids = self.router.select(router_logits, self.weights).ids
            counts = torch.bincount(ids.flatten(), minlength=self.stats.cumulative.numel()).cpu()
            self.stats.last_call += counts
            self.stats.cumulative += counts
        return self.inner.forward(hidden_states, router_logits)

    def report(self) -> dict[str, Any]:
        """What ``moeframe run`` prints."""
        s = self.stats
        last = s.last_call.tolist()
        return {
            **s.as_dict(),
            "summary": f"tokens per expert (last call) {last}; imbalance max/mean {s.imbalance():.2f}",
        }


def collect(module: torch.nn.Module) -> dict[str, ExpertStats]:
    """The statistics of every MoE layer under ``module`` that has an ``expert_stats`` wrapper."""
    from moeframe import MoELayer

    out: dict[str, ExpertStats] = {}
    for name, sub in module.named_modules():
        if not isinstance(sub, MoELayer):
            continue
        for part in sub.stack.parts:
            if isinstance(part.instance, ExpertStatsWrapper):
                label = part.instance.stats.label or name or "layer"
                out[label] = part.instance.stats
    return out
