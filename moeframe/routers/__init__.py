"""Routers: router logits -> :class:`TopKOutput` (the top-k weights and expert ids).

A router owns its tensors (``router.weight`` and, for some, a bias) and two steps:
:meth:`Router.logits` (hidden states -> logits, computed once per forward by the layer,
so that chunking stages logits rather than recomputing them) and :meth:`Router.select`
(logits -> :class:`TopKOutput`, called by the runner).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from moeframe.plugins.contract import StrategyBase
from moeframe.weights import WeightSpec

if TYPE_CHECKING:
    from moeframe.context import BuildContext

__all__ = ["TopKOutput", "Router"]


class TopKOutput(NamedTuple):
    """The routing decision for T tokens.

    ``weights [T, K]`` (float32 or the activation dtype, as the model's reference does),
    ``ids [T, K]`` int64 global expert ids, distinct within a row.  When
    ``weight_on_input`` the weight multiplies the expert's *input* (Llama-4) rather than
    its output.
    """

    weights: torch.Tensor
    ids: torch.Tensor
    weight_on_input: bool = False


class Router(StrategyBase):
    """Base class of router strategies; built as ``cls(context, params)``.

    ``Params`` holds the keys of ``[router]`` besides ``name``.  A router must implement
    :meth:`select`; :meth:`logits`, :meth:`weight_specs` and :attr:`logits_dtype` have
    defaults for the usual ``linear(x, router.weight)``.
    """

    #: the chosen weight scales the expert input, not its output (needs top_k == 1)
    weight_on_input: ClassVar[bool] = False

    def __init__(self, context: BuildContext, params: Any) -> None:
        self.model = context.model
        self.params = params

    def weight_specs(self) -> list[WeightSpec]:
        """The tensors this router owns: ``router.weight [E, H]`` and any bias."""
        m = self.model
        return [WeightSpec("router.weight", (m.num_experts, m.hidden_size), m.torch_dtype, std=m.hidden_size**-0.5)]

    @property
    def logits_dtype(self) -> torch.dtype:
        """The dtype :meth:`logits` returns (staging buffers are allocated in it)."""
        return self.model.torch_dtype

    def logits(self, hidden_states: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[T, H] -> [T, E]``; by default ``linear(x, router.weight)`` in the activation dtype."""
        return F.linear(hidden_states, weights["router.weight"])

    @abc.abstractmethod
    def select(self, logits: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> TopKOutput:
        """Choose ``top_k`` experts per token from ``logits [T, E]`` (T may be 0).

        ``weights`` are the layer's tensors by name.  Return a :class:`TopKOutput`:
        ``ids`` int64 ``[T, K]``, distinct within a row; ``weights [T, K]`` float32 or the
        activation dtype; ``weight_on_input=True`` when the weight scales the expert's
        input (then the runner scales the tokens and the kernel gets weights of 1.0).
        """
