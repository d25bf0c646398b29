"""Runners: the route -> dispatch -> kernel -> combine orchestration, and the small
interface every wrapper uses to talk to the runner it wraps.

The runner interface is exactly:

* ``forward(hidden_states [T, H], router_logits [T, E]) -> [T, H]`` (a new tensor);
* ``output_reduced``: whether that output is already summed over the ranks that share
  the tokens (the layer all-reduces once when it is not);
* ``workspace_requests()``: staging buffers needed during ``forward``;
* ``weight_specs()``: tensors the part owns (the layer creates and loads them);
* ``describe()``: parameters to show in ``moeframe explain``.

Nothing else is reached through a wrapper: there is no attribute forwarding.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from moeframe.config import NoParams
from moeframe.weights import WeightSpec
from moeframe.workspace import WorkspaceRequest

if TYPE_CHECKING:
    from moeframe.config import Config
    from moeframe.context import BuildContext

__all__ = ["Runner"]


class Runner(abc.ABC):
    """Base class of runner strategies; built as ``cls(context, params)``."""

    Params: ClassVar[type] = NoParams

    def __init__(self, context: BuildContext, params: Any) -> None:
        self.params = params

    @classmethod
    def check_stack(cls, config: Config) -> str | None:
        """Return why this part cannot be used in ``config``'s stack, or None."""
        return None

    @abc.abstractmethod
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """``[T, H], [T, E] -> [T, H]``; T may be 0."""

    @property
    @abc.abstractmethod
    def output_reduced(self) -> bool:
        """Whether :meth:`forward`'s output is already summed over the token group."""

    def workspace_requests(self) -> Sequence[WorkspaceRequest]:
        return ()

    def weight_specs(self) -> list[WeightSpec]:
        return []

    def describe(self) -> dict[str, Any]:
        return {}
