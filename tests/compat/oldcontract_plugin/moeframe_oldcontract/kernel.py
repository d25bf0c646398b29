"""The guide's GatheredKernel, with the optional describe() and release()."""

import torch

import moeframe
from moeframe.kernels import apply_activation


class GatheredKernel(moeframe.Kernel):
    """Each (token, k) pair through its expert with batched matmuls (gathers the weights)."""

    def __init__(self, context, params):
        super().__init__(context, params)
        self.calls = 0

    def __call__(self, hidden_states, topk_weights, topk_ids, experts):
        self.calls += 1
        num_tokens, k = topk_ids.shape
        ids = topk_ids.flatten()
        local = ids if experts.expert_map is None else experts.expert_map[ids].long()
        keep = local >= 0
        x = hidden_states.repeat_interleave(k, dim=0)[keep].float()
        e = local[keep]
        h = torch.bmm(experts.w13[e].float(), x.unsqueeze(-1)).squeeze(-1)
        if experts.b13 is not None:
            h = h + experts.b13[e].float()
        y = torch.bmm(experts.w2[e].float(), apply_activation(h, self.activation).unsqueeze(-1)).squeeze(-1)
        if experts.b2 is not None:
            y = y + experts.b2[e].float()
        hidden = hidden_states.shape[1]
        out = torch.zeros(num_tokens * k, hidden)
        out[keep] = y * topk_weights.flatten()[keep].float().unsqueeze(-1)
        return out.view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)

    def describe(self):
        return {"calls": self.calls}

    def release(self):
        self.calls = 0
