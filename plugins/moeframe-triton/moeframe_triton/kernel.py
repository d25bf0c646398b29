"""``triton``: the fused-MoE kernel strategy (see :mod:`moeframe_triton.fused_moe`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeframe.kernels import ExpertWeights, Kernel
from moeframe_triton._triton import INTERPRETER
from moeframe_triton.ops import fused_moe_op

if TYPE_CHECKING:
    from moeframe.config import Config

__all__ = ["TritonKernel"]


class TritonKernel(Kernel):
    """Align, two fused grouped GEMMs (bias, activation and routed weight in their
    epilogues) and a deterministic sum over top-k, in Triton.

    Computes what the ``torch`` reference kernel computes, within the dtype's tolerance,
    through the torch op ``torch.ops.moeframe_triton.fused_moe`` (so ``torch.compile``
    and CUDA graphs see one op with a fake implementation);
    on a machine without CUDA it runs through Triton's interpreter (slow: small token
    counts only).  Block sizes come from tuned files for the GPU or a heuristic
    (:mod:`moeframe_triton.configs`).
    """

    def __call__(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        act = self.activation
        return fused_moe_op(
            hidden_states,
            topk_weights,
            topk_ids,
            *experts,  # w13, w2, b13, b2, expert_map: the op's parameters in ExpertWeights' order
            act.name,
            float(act.alpha),
            float(act.limit),
        )

    def describe(self) -> dict[str, Any]:
        return {"mode": "interpreter" if INTERPRETER else "compiled"}

    @classmethod
    def tune(
        cls,
        config: Config,
        *,
        batch_sizes: Sequence[int] | None,
        output_dir: str | Path | None,
        device: str = "cuda",
        log: Callable[[str], None] | None = None,
    ) -> list[Path]:
        """Search block sizes, warps and stages for ``config``'s layer shape at each batch
        size on the GPU and write the tuned file into ``output_dir``; return its path.
        ``batch_sizes`` None: the default list; ``output_dir`` None: the current folder.
        The shape is one rank's: ``parallel.ep_size`` (unset: 1) and ``parallel.tp_size``
        divide the experts and the intermediate size.

        Raises :class:`~moeframe.errors.UserError` where no CUDA GPU is available.
        """
        from moeframe_triton.tune import tune_model

        return [
            tune_model(
                config.model,
                batch_sizes=batch_sizes,
                output_dir=Path("." if output_dir is None else output_dir),
                device=device,
                log=log,
                expert_parallel=config.parallel.ep_size or 1,
                tensor_parallel=config.parallel.tp_size,
            )
        ]
