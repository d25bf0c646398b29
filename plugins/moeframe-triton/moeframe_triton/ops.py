"""The fused MoE as a torch op: ``torch.ops.moeframe_triton.fused_moe``.

Registered with :func:`torch.library.custom_op` (a schema, no aliasing, no mutation) and
a fake implementation that computes the output's metadata from the inputs' (and checks
their shapes and dtypes), so that ``torch.compile(..., fullgraph=True)`` traces a layer
through the kernel without breaking the graph, and CUDA graphs capture its launches (no
host synchronisation: the rows the GEMMs cover are a bound computed on the host).  The
:class:`~moeframe_triton.kernel.TritonKernel` strategy calls the op; tests, the tuner and
the GPU script call :func:`~moeframe_triton.fused_moe.fused_moe` directly when they pass
an explicit block-size config.

An opaque custom op rather than :func:`torch.library.triton_op`: the align step and the
config lookup run host code (tuned files, warnings) that Inductor need not trace, and the
same op runs through Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import torch

from moeframe.kernels.activations import Activation
from moeframe_triton.fused_moe import ACTIVATION_CODES, check_inputs, fused_moe

__all__ = ["OP_NAME", "fused_moe_op"]

#: the op's qualified name: ``torch.ops.moeframe_triton.fused_moe``
OP_NAME = "moeframe_triton::fused_moe"


@torch.library.custom_op(OP_NAME, mutates_args=())
def fused_moe_op(
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
    """``out[t] = sum_k w[t,k] * f_{ids[t,k]}(x[t])``: a new ``[T, H]`` tensor in the
    activation dtype (see :func:`~moeframe_triton.fused_moe.fused_moe`)."""
    return fused_moe(
        hidden_states,
        topk_weights,
        topk_ids,
        w13,
        w2,
        b13,
        b2,
        activation=Activation(activation, alpha, limit),
        expert_map=expert_map,
    )


@fused_moe_op.register_fake
def _fused_moe_fake(
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
    check_inputs(hidden_states, topk_weights, topk_ids, w13, w2, b13, b2, expert_map)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"unknown activation {activation!r}; the triton kernel supports {', '.join(ACTIVATION_CODES)}")
    return hidden_states.new_empty(hidden_states.shape)
