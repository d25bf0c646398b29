"""Runners: the route -> dispatch -> kernel -> combine orchestration, and the small
interface every wrapper uses to talk to the runner it wraps.

The runner interface is exactly:

* ``forward(hidden_states [T, H], router_logits [T, E]) -> [T, H]`` (a new tensor);
* ``output_reduced``: whether that output is already summed over the ranks that share
  the tokens (the layer all-reduces once when it is not);
* ``workspace_requests()``: staging buffers needed during ``forward``;
* ``weight_specs()``: tensors the part owns (the layer creates and loads them);
* ``describe()``: parameters to show in ``moeframe explain``;
* ``report()`` and ``release()``, like every part (see
  :class:`~moeframe.plugins.contract.StrategyBase`).

Nothing else is reached through a wrapper: there is no attribute forwarding.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

import torch

from moeframe.plugins.contract import StrategyBase

if TYPE_CHECKING:
    from moeframe.context import BuildContext

__all__ = ["Runner"]


class Runner(StrategyBase):
    """Base class of runner strategies; built as ``cls(context, params)``.

    A runner implements :meth:`forward` and :attr:`output_reduced`; it finds the router,
    kernel and dispatcher the composer built in ``context`` (``context.router``...) and
    calls the kernel through :meth:`moeframe.Kernel.run`.
    """

    def __init__(self, context: BuildContext, params: Any) -> None:
        self.params = params

    @abc.abstractmethod
    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """``[T, H], [T, E] -> [T, H]``; T may be 0."""

    @property
    @abc.abstractmethod
    def output_reduced(self) -> bool:
        """Whether :meth:`forward`'s output is already summed over the token group."""
