"""Hugging Face transformers' MoE experts implementations, as peers in the benchmark.

They are built through transformers' public classes (``Qwen3MoeConfig`` and
``Qwen3MoeSparseMoeBlock``, whose experts follow our canonical layout: ``gate_up_proj
[E, 2I, H]``, ``down_proj [E, H, I]``) and share the very tensors of our layer, so that
they read the same weights and see the same routing.  ``experts_implementation`` selects
``eager`` (a loop over experts), ``grouped_mm`` (sort by expert, ``torch.nn.functional.
grouped_mm``) or ``batched_mm`` (gathers every (token, k) pair's expert weights; skipped
where that copy would exceed :data:`BATCHED_MM_BUDGET`).

transformers is optional (``pip install 'moeframe[peers]'``): without it
:func:`build_peers` returns no peers and says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from moeframe.config import Config

__all__ = ["IMPLEMENTATIONS", "BATCHED_MM_BUDGET", "Peer", "transformers_version", "unsupported_reason", "build_peers"]

IMPLEMENTATIONS: tuple[str, ...] = ("eager", "grouped_mm", "batched_mm")

#: bytes that batched_mm's gathered copy of the weights may take
BATCHED_MM_BUDGET = 2 * 1024**3


def transformers_version() -> str | None:
    """The installed transformers version, or None (read from its metadata: importing
    transformers takes a second)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


@attrs.define
class Peer:
    """One transformers experts implementation wrapped around our layer's tensors."""

    implementation: str
    block: Any

    @property
    def name(self) -> str:
        return f"hf-{self.implementation}"

    def experts(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The experts alone, with our routing: the same contract as a moeframe kernel."""
        return self.block.experts(hidden_states, topk_ids, topk_weights.to(hidden_states.dtype))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The whole block (transformers' own router, then the experts): ``[T, H] -> [T, H]``."""
        return self.block(hidden_states.unsqueeze(0)).squeeze(0)

    def memory_needed(self, num_tokens: int) -> int:
        """Bytes of the gathered weights batched_mm would allocate for ``num_tokens`` (0 for the others)."""
        if self.implementation != "batched_mm":
            return 0
        experts = self.block.experts
        per_pair = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
        return num_tokens * self.block.gate.top_k * per_pair * experts.gate_up_proj.element_size()


def unsupported_reason(config: Config) -> str | None:
    """Why transformers' Qwen3-MoE block cannot stand in for ``config``'s experts, or None."""
    m = config.model
    if m.activation not in ("silu", "gelu"):
        return f"model.activation = {m.activation!r} has no Qwen3-MoE equivalent in transformers"
    if m.expert_bias:
        return "expert biases (model.expert_bias) have no Qwen3-MoE equivalent in transformers"
    p = config.parallel
    if p.dp_size > 1 or p.tp_size > 1 or (p.ep_size or 1) > 1:
        return "peers run in one process"
    return None


def full_block_comparable(config: Config) -> bool:
    """Whether transformers' own router computes what ``config``'s router does."""
    return config.router.name == "softmax_topk"


def build_peers(
    config: Config, tensors: Mapping[str, torch.Tensor], implementations: Sequence[str] = IMPLEMENTATIONS
) -> tuple[list[Peer], str | None]:
    """Peers sharing ``tensors`` (our layer's), or ``([], why)`` when there can be none."""
    if transformers_version() is None:
        return [], "transformers is not installed (pip install 'moeframe[peers]')"
    why = unsupported_reason(config)
    if why:
        return [], why
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError as exc:  # an old or a future transformers
        return [], f"this transformers has no Qwen3-MoE block ({exc})"
    m = config.model
    renormalize = bool(getattr(config.router.params, "renormalize", True))
    peers = []
    for implementation in implementations:
        hf_config = Qwen3MoeConfig(  # type: ignore[call-arg]  # transformers types fewer fields than it takes
            hidden_size=m.hidden_size,
            moe_intermediate_size=m.intermediate_size,
            num_experts=m.num_experts,
            num_experts_per_tok=m.top_k,
            norm_topk_prob=renormalize,
            hidden_act=m.activation,
            experts_implementation=implementation,
        )
        with torch.device("meta"):
            block = Qwen3MoeSparseMoeBlock(hf_config)
        block.experts.gate_up_proj = torch.nn.Parameter(tensors["experts.w13"], requires_grad=False)
        block.experts.down_proj = torch.nn.Parameter(tensors["experts.w2"], requires_grad=False)
        block.gate.weight = torch.nn.Parameter(tensors["router.weight"], requires_grad=False)
        block.eval()
        peers.append(Peer(implementation, block))
    return peers, None
