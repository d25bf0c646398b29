"""What every strategy is built with: the model, the device, the ranks, the weights."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs
import torch

if TYPE_CHECKING:
    from moeframe.config import Config, ModelConfig
    from moeframe.dispatchers import Dispatcher
    from moeframe.kernels import Kernel
    from moeframe.parallel import ParallelContext
    from moeframe.routers import Router
    from moeframe.workspace import Workspace


@attrs.define
class BuildContext:
    """Passed to every strategy's constructor as ``cls(context, params)``.

    ``weights`` maps the layer's tensor names (``"router.weight"``, ``"experts.w13"``,
    ``"shared.w13"``...) to its live parameters: look them up at forward time, they are
    the tensors the layer loads into.  ``router``, ``kernel`` and ``dispatcher`` are set
    by the composer as it builds them (in that order), so a runner finds them here.
    """

    config: Config
    device: torch.device
    parallel: ParallelContext
    workspace: Workspace
    weights: Mapping[str, torch.Tensor] = attrs.field(factory=dict)
    #: incremented by the layer at the start of every forward (wrappers that keep per-call
    #: state, e.g. statistics of the last call, compare it to know a new call began)
    forward_index: int = 0
    #: set by the composer (None until it has built that part)
    router: Router | None = None
    kernel: Kernel | None = None
    dispatcher: Dispatcher | None = None

    def built_parts(self) -> tuple[Router, Kernel, Dispatcher]:
        """The router, kernel and dispatcher the composer has built, for a runner's or a
        wrapper's constructor (they are built after those three)."""
        if self.router is None or self.kernel is None or self.dispatcher is None:
            missing = [n for n in ("router", "kernel", "dispatcher") if getattr(self, n) is None]
            raise RuntimeError(
                f"BuildContext: no {', '.join(missing)} built yet (the composer builds the router, the "
                "kernel and the dispatcher before runners and wrappers)"
            )
        return self.router, self.kernel, self.dispatcher

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def dtype(self) -> torch.dtype:
        return self.config.model.torch_dtype
