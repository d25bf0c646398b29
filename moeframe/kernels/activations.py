"""The gated activations, on the concatenated ``[N, 2I]`` GEMM-1 output (gate | up)."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

__all__ = ["Activation", "apply_activation"]


@attrs.frozen
class Activation:
    """``silu``: ``silu(g) * u``; ``gelu``: ``gelu(g) * u`` (exact erf form);
    ``swigluoai``: ``(clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with
    ``g = clamp(g, max=limit)`` (GPT-OSS)."""

    name: str
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def from_model(cls, model: object) -> Activation:
        return cls(model.activation, model.swiglu_alpha, model.swiglu_limit)  # type: ignore[attr-defined]


def apply_activation(gate_up: torch.Tensor, act: Activation) -> torch.Tensor:
    """``[..., 2I] -> [..., I]`` in the input's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    if act.name == "silu":
        return F.silu(gate) * up
    if act.name == "gelu":
        return F.gelu(gate) * up
    if act.name == "swigluoai":
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
        return (up + 1) * gate * torch.sigmoid(act.alpha * gate)
    raise ValueError(f"unknown activation {act.name!r}")
