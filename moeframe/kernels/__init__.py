"""Expert kernels: the experts computation for routed tokens.

Every kernel has one call signature (the ``torch`` reference defines its meaning)::

    kernel(hidden_states [N, H], topk_weights [N, K], topk_ids [N, K], experts) -> [N, H]

``out[t] = sum_k w[t, k] * f_{ids[t, k]}(x[t])`` over the experts that are local
(``experts.expert_map[id] >= 0``); other experts contribute zero.  The output is a new
tensor in the activation dtype: it never aliases the input or a workspace buffer.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from moeframe.config import NoParams
from moeframe.kernels.activations import Activation, apply_activation

if TYPE_CHECKING:
    from moeframe.config import ModelConfig
    from moeframe.context import BuildContext

__all__ = ["Activation", "apply_activation", "ExpertWeights", "Kernel", "expert_mlp"]


class ExpertWeights(NamedTuple):
    """This rank's expert tensors in the canonical layout, and how global ids map to them.

    ``expert_map [E]`` int32: global id -> local index, -1 for experts that are not
    local; ``None`` when every expert is local and local index == global id.
    """

    w13: torch.Tensor
    w2: torch.Tensor
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    expert_map: torch.Tensor | None = None


def expert_mlp(x: torch.Tensor, experts: ExpertWeights, local: int, activation: Activation) -> torch.Tensor:
    """Local expert ``local`` on the fp32 rows ``x``, in fp32 (the formula every kernel
    computes): ``w2 . act(w13 . x + b13) + b2``."""
    import torch.nn.functional as F

    b13 = None if experts.b13 is None else experts.b13[local].float()
    b2 = None if experts.b2 is None else experts.b2[local].float()
    h = apply_activation(F.linear(x, experts.w13[local].float(), b13), activation)
    return F.linear(h, experts.w2[local].float(), b2)


class Kernel(abc.ABC):
    """Base class of kernel strategies; built as ``cls(context, params)``."""

    Params: ClassVar[type] = NoParams

    def __init__(self, context: BuildContext, params: Any) -> None:
        self.model = context.model
        self.params = params
        self.activation = Activation.from_model(context.model)

    @classmethod
    def check_config(cls, model: ModelConfig, params: Any) -> None:
        """Raise ``ValueError`` when ``params`` do not fit ``model``."""

    @abc.abstractmethod
    def __call__(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        """Compute the routed experts' output for ``hidden_states``."""

    def describe(self) -> dict[str, Any]:
        return {}

    def release(self) -> None:
        """Free memory the kernel keeps between calls (scratch buffers, say); it is taken
        again on the next call.  Nothing by default."""
