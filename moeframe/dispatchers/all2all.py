"""``all2all``: each token goes only to the ranks that own one of its experts, and back.

Dispatch sends every token (with its whole routing row) once to each rank owning at
least one of its K experts, with an uneven ``all_to_all_single``; there the kernel
computes only the local experts (the expert map skips the others).  Combine sends the
partial outputs back and sums them in a fixed order (by source rank) into the original
token order: deterministic on every device, no atomics.
"""

from __future__ import annotations

from typing import Any

import torch

from moeframe.context import BuildContext
from moeframe.dispatchers import Dispatched, TokenExchangeDispatcher


class AllToAllDispatcher(TokenExchangeDispatcher):
    def __init__(self, context: BuildContext, params: Any) -> None:
        super().__init__(context, params)
        self.owner = self.parallel.expert_owner(context.model.num_experts).to(context.device)

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        par = self.parallel
        out = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype, device=send.device)
        return par.collectives.all_to_all_single(out, send, recv_counts, send_counts, par.groups.get("ep"))

    def _send(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        par = self.parallel
        world = par.world_size
        num_tokens = hidden_states.shape[0]
        dest = torch.zeros(num_tokens, world, dtype=torch.bool, device=hidden_states.device)
        dest.scatter_(1, self.owner[topk_ids], True)
        # send order: by destination rank, then token index
        rank_idx, token_idx = dest.T.nonzero(as_tuple=True)
        send_counts_t = dest.sum(0)
        recv_counts_t = torch.empty_like(send_counts_t)
        par.collectives.all_to_all_single(recv_counts_t, send_counts_t, [1] * world, [1] * world, par.groups.get("ep"))
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        x = self._exchange(hidden_states.index_select(0, token_idx), send_counts, recv_counts)
        w = self._exchange(topk_weights.float().index_select(0, token_idx), send_counts, recv_counts)
        ids = self._exchange(topk_ids.index_select(0, token_idx), send_counts, recv_counts)
        return Dispatched(x, w, ids, (rank_idx, token_idx, send_counts, recv_counts, num_tokens))

    def _return(self, expert_output: torch.Tensor, state: Any) -> torch.Tensor:
        _rank_idx, token_idx, send_counts, recv_counts, num_tokens = state
        back = self._exchange(expert_output.float(), recv_counts, send_counts)
        # `back` is in send order: by rank, then token, each token at most once per rank;
        # summing rank by rank fixes the order of the sum (deterministic, no atomics)
        out = torch.zeros(num_tokens, expert_output.shape[-1], dtype=torch.float32, device=back.device)
        start = 0
        for n in send_counts:
            if n:
                rows = token_idx[start : start + n]
                out[rows] += back[start : start + n]
            start += n
        return out.to(expert_output.dtype)
