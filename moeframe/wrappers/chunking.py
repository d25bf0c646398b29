"""``chunking``: run the inner runner on chunks of at most ``max_num_tokens`` tokens.

Each chunk's hidden states and router logits are staged in buffers from the process
workspace (shared by every layer; same addresses on every call, as CUDA graphs need).
The output is a fresh tensor, never a view of the workspace.

Data-parallel lock-step: ranks that run collectives together must run the same number
of chunks.  The count is ``ceil(max tokens over those ranks / max_num_tokens)``; a rank
whose tokens are used up runs its remaining iterations on zero tokens and writes
nothing.  The guard is on the *unclamped* chunk start (``start < num_tokens``), so it
really skips those iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from moeframe.config import option
from moeframe.context import BuildContext
from moeframe.runners import Runner
from moeframe.workspace import WorkspaceRequest
from moeframe.wrappers import Wrapper


@attrs.frozen
class ChunkingParams:
    max_num_tokens: int = option(256, help="tokens per chunk (the staging buffers' size)", min=1)


class ChunkingWrapper(Wrapper):
    Params = ChunkingParams

    def __init__(self, inner: Runner, context: BuildContext, params: ChunkingParams) -> None:
        super().__init__(inner, context, params)
        self.chunk = params.max_num_tokens
        self.device = context.device
        self.workspace = context.workspace
        self.parallel = context.parallel
        model = context.model
        router, _, _ = context.built_parts()
        self._requests = (
            WorkspaceRequest("chunking.hidden_states", (self.chunk, model.hidden_size), model.torch_dtype),
            WorkspaceRequest("chunking.router_logits", (self.chunk, model.num_experts), router.logits_dtype),
        )

    def workspace_requests(self) -> Sequence[WorkspaceRequest]:
        return self._requests

    def num_iterations(self, num_tokens: int) -> int:
        """Chunks this rank runs: enough for the largest token count among its peers."""
        most = self.parallel.max_tokens(num_tokens, self.device)
        return -(-most // self.chunk)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        staged_states, staged_logits = self.workspace.views(self._requests, self.device)
        iterations = self.num_iterations(num_tokens)
        if iterations == 1 and num_tokens:
            # one chunk holds every token: its result is the output, no second copy (the
            # stack copies a result that is a view of a staging buffer)
            states, logits = staged_states[:num_tokens], staged_logits[:num_tokens]
            states.copy_(hidden_states)
            logits.copy_(router_logits)
            return self.inner.forward(states, logits)
        out = torch.empty_like(hidden_states)
        for i in range(iterations):
            start = i * self.chunk
            end = min(start + self.chunk, num_tokens)
            n = max(0, end - start)
            states, logits = staged_states[:n], staged_logits[:n]
            if n:
                states.copy_(hidden_states[start:end])
                logits.copy_(router_logits[start:end])
            result = self.inner.forward(states, logits)
            if start < num_tokens:  # unclamped start: past this rank's tokens nothing is written
                out[start:end].copy_(result)
        return out

    def describe(self) -> dict[str, Any]:
        return {"staging": [f"{r.name} {list(r.shape)} {str(r.dtype).removeprefix('torch.')}" for r in self._requests]}
