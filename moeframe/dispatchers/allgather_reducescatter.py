"""``allgather_reducescatter``: every rank sees every rank's tokens.

Dispatch all-gathers the hidden states and routing of the expert-parallel group (padded
to the largest token count, the padding dropped before the kernel); each rank computes
its own experts' share for all of them; combine reduce-scatters the shares (in fp32)
back to the ranks that own the tokens.  Ranks may hold different numbers of tokens,
zero included.
"""

from __future__ import annotations

from typing import Any

import torch

from moeframe.dispatchers import Dispatched, TokenExchangeDispatcher


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


class AllGatherReduceScatterDispatcher(TokenExchangeDispatcher):
    def _send(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        par = self.parallel
        coll, group = par.collectives, par.groups.get("ep")
        num_tokens = hidden_states.shape[0]
        counts = torch.cat(coll.all_gather(torch.tensor([num_tokens], device=hidden_states.device), group)).tolist()
        rows = max(counts)
        gathered = []
        for t in (hidden_states, topk_weights.float(), topk_ids):
            gathered.append(torch.cat(coll.all_gather(_pad_rows(t, rows), group)))
        valid = torch.cat([torch.arange(c, device=hidden_states.device) + r * rows for r, c in enumerate(counts)])
        x, w, ids = (g.index_select(0, valid) for g in gathered)
        return Dispatched(x, w, ids, (counts, rows, valid))

    def _return(self, expert_output: torch.Tensor, state: Any) -> torch.Tensor:
        par = self.parallel
        counts, rows, valid = state
        world = len(counts)
        hidden = expert_output.shape[-1]
        padded = torch.zeros(world * rows, hidden, dtype=torch.float32, device=expert_output.device)
        padded.index_copy_(0, valid, expert_output.float())
        mine = torch.empty(rows, hidden, dtype=torch.float32, device=expert_output.device)
        par.collectives.reduce_scatter(mine, list(padded.chunk(world)), par.groups.get("ep"))
        return mine[: counts[par.rank]].to(expert_output.dtype)
