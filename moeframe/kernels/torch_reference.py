"""``torch``: the reference kernel -- a loop over experts, everything in fp32.

It is the ground truth every other kernel is checked against: simple enough to read
against the formula, not fast.
"""

from __future__ import annotations

import torch

from moeframe.kernels import Activation, ExpertWeights, Kernel, expert_mlp


def reference_moe(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: ExpertWeights,
    activation: Activation,
) -> torch.Tensor:
    """What the ``torch`` kernel computes, for callers that have an activation but no
    model config (a tuner, a benchmark script)."""
    num_tokens, hidden = hidden_states.shape
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=hidden_states.device)
    if num_tokens == 0:
        return out.to(hidden_states.dtype)
    x = hidden_states.float()
    weights = topk_weights.float()
    for expert in torch.unique(topk_ids).tolist():
        local = expert if experts.expert_map is None else int(experts.expert_map[expert])
        if local < 0:
            continue
        token_idx, k_idx = torch.where(topk_ids == expert)
        y = expert_mlp(x[token_idx], experts, local, activation)
        out.index_add_(0, token_idx, y * weights[token_idx, k_idx].unsqueeze(-1))
    return out.to(hidden_states.dtype)


@torch.library.custom_op("moeframe::reference_experts", mutates_args=())
def reference_experts(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """:func:`reference_moe` as a torch op (its loop over the experts present depends on the
    data, which ``torch.compile`` cannot trace into one graph): a new ``[T, H]`` tensor."""
    experts = ExpertWeights(w13, w2, b13, b2, expert_map)
    return reference_moe(hidden_states, topk_weights, topk_ids, experts, Activation(activation, alpha, limit))


@reference_experts.register_fake
def _reference_experts_fake(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    return hidden_states.new_empty(hidden_states.shape)


class TorchReferenceKernel(Kernel):
    """``out[t] = sum_k w[t,k] * (down_e(act(gate_e x) * up_e x) + b2_e)``, accumulated in fp32.

    Eager calls run :func:`reference_moe` directly (differentiable, like any torch code);
    under ``torch.compile`` the call is the op ``moeframe::reference_experts``, one node of
    the graph with the same result."""

    def __call__(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            act = self.activation
            return torch.ops.moeframe.reference_experts(
                hidden_states,
                topk_weights,
                topk_ids,
                *experts,  # w13, w2, b13, b2, expert_map: the op's parameters in ExpertWeights' order
                act.name,
                act.alpha,
                act.limit,
            )
        return reference_moe(hidden_states, topk_weights, topk_ids, experts, self.activation)
