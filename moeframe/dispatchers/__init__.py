"""Dispatchers: move routed tokens to the ranks that own their experts, and back.

``dispatch`` returns the tokens (and their routing) this rank's kernel must compute;
``combine`` turns this rank's kernel output back into ``[T, H]`` in the original token
order.  ``output_reduced`` says whether that result is already summed over the ranks
that share the tokens; if not, the layer all-reduces it exactly once.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch

from moeframe.config import NoParams

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


class Dispatcher(abc.ABC):
    """Base class of dispatcher strategies; built as ``cls(context, params)``."""

    Params: ClassVar[type] = NoParams

    def __init__(self, context: BuildContext, params: Any) -> None:
        self.model = context.model
        self.params = params
        self.parallel = context.parallel

    @classmethod
    def check_stack(cls, config: Config) -> str | None:
        """Return why this dispatcher cannot serve ``config`` (its parallel layout), or None."""
        return None

    @property
    @abc.abstractmethod
    def output_reduced(self) -> bool:
        """Whether :meth:`combine`'s result is already summed over the token group."""

    @abc.abstractmethod
    def dispatch(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        ...

    @abc.abstractmethod
    def combine(self, expert_output: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        ...

    def describe(self) -> dict[str, Any]:
        return {}


class TokenExchangeDispatcher(Dispatcher):
    """Base of dispatchers that move whole tokens between expert-parallel ranks.

    Their ``combine`` sums the experts' shares back on the token's own rank, so the
    output is reduced; they need every expert whole on its rank (no tensor parallelism).
    """

    #: the strategy's name, for messages
    name: ClassVar[str] = ""

    @classmethod
    def check_stack(cls, config: Config) -> str | None:
        if config.parallel.tp_size > 1:
            return (
                f"dispatcher {cls.name!r} moves whole tokens between ranks and does not combine with "
                "tensor parallelism (parallel.tp_size must be 1)"
            )
        return None

    @property
    def output_reduced(self) -> bool:
        return True
