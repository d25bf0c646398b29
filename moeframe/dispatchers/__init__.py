"""Dispatchers: move routed tokens to the ranks that own their experts, and back.

``dispatch`` returns the tokens (and their routing) this rank's kernel must compute;
``combine`` turns this rank's kernel output back into ``[T, H]`` in the original token
order.  ``output_reduced`` says whether that result is already summed over the ranks
that share the tokens; if not, the layer all-reduces it exactly once.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from moeframe.plugins.contract import StrategyBase

if TYPE_CHECKING:
    from moeframe.config import Config
    from moeframe.context import BuildContext

__all__ = ["Dispatched", "Dispatcher", "TokenExchangeDispatcher"]


class Dispatched(NamedTuple):
    """What the kernel computes on this rank, plus the dispatcher's own state for combine."""

    hidden_states: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    state: Any = None


class Dispatcher(StrategyBase):
    """Base class of dispatcher strategies; built as ``cls(context, params)``.

    A dispatcher implements :meth:`dispatch`, :meth:`combine` and :attr:`output_reduced`;
    :meth:`~moeframe.plugins.contract.StrategyBase.supports` says which parallel layouts
    it cannot serve.  ``self.parallel`` is the :class:`~moeframe.parallel.ParallelContext`
    (ranks, groups, collectives).
    """

    def __init__(self, context: BuildContext, params: Any) -> None:
        self.model = context.model
        self.params = params
        self.parallel = context.parallel

    @property
    @abc.abstractmethod
    def output_reduced(self) -> bool:
        """Whether :meth:`combine`'s result is already summed over the token group."""

    @abc.abstractmethod
    def dispatch(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        """The tokens ``[T, H]`` and their routing ``[T, K]`` -> what this rank's kernel
        computes, plus any state :meth:`combine` needs (in :attr:`Dispatched.state`)."""

    @abc.abstractmethod
    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        """This rank's kernel output -> ``[T, H]`` in the original token order."""


class TokenExchangeDispatcher(Dispatcher):
    """Base of dispatchers that move whole tokens between expert-parallel ranks.

    Their ``combine`` sums the experts' shares back on the token's own rank, so the
    output is reduced; they need every expert whole on its rank (no tensor parallelism).
    """

    @classmethod
    def supports(cls, config: Config, params: Any) -> str | None:
        if config.parallel.tp_size > 1:
            return (
                f"dispatcher {config.stack.dispatcher.name!r} moves whole tokens between ranks and does not combine "
                "with tensor parallelism (parallel.tp_size must be 1)"
            )
        return None

    @property
    def output_reduced(self) -> bool:
        return True

    def dispatch(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        if not self.parallel.distributed:  # one process: nothing to move
            return Dispatched(hidden_states, topk_weights, topk_ids)
        return self._send(hidden_states, topk_weights, topk_ids)

    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        if dispatched.state is None:
            return expert_output
        return self._return(expert_output, dispatched.state)

    @abc.abstractmethod
    def _send(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        """Move the tokens to the ranks that compute them (in a distributed run)."""

    @abc.abstractmethod
    def _return(self, expert_output: torch.Tensor, state: Any) -> torch.Tensor:
        """Bring this rank's shares back to the tokens' own ranks and sum them there."""

    def describe(self) -> dict[str, Any]:
        return {"ranks": self.parallel.world_size}
