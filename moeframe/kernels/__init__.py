"""Expert kernels: the experts computation for routed tokens.

Every kernel has one call signature (the ``torch`` reference defines its meaning)::

    kernel(hidden_states [N, H], topk_weights [N, K], topk_ids [N, K], experts) -> [N, H]

``out[t] = sum_k w[t, k] * f_{ids[t, k]}(x[t])`` over the experts that are local
(``experts.expert_map[id] >= 0``); other experts contribute zero.  The output is a new
tensor in the activation dtype: it never aliases the input or a workspace buffer.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from moeframe.kernels.activations import Activation, apply_activation
from moeframe.plugins.contract import StrategyBase

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from moeframe.config import Config
    from moeframe.context import BuildContext

__all__ = ["Activation", "apply_activation", "ExpertWeights", "Kernel", "KernelOutputError", "expert_mlp"]


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


class KernelOutputError(RuntimeError):
    """A kernel returned something that is not its ``[N, H]`` output (see :meth:`Kernel.run`)."""


class Kernel(StrategyBase):
    """Base class of kernel strategies; built as ``cls(context, params)``.

    A kernel must implement :meth:`__call__`.  ``self.activation`` holds the model's
    activation; runners call :meth:`run`, which checks the output's metadata.
    """

    def __init__(self, context: BuildContext, params: Any) -> None:
        self.model = context.model
        self.params = params
        self.activation = Activation.from_model(context.model)

    @abc.abstractmethod
    def __call__(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        """Compute the routed experts' output for ``hidden_states``.

        ``hidden_states [N, H]`` in the activation dtype; ``topk_weights [N, K]`` float32
        or the activation dtype (all 1.0 for a router with ``weight_on_input``, whose
        weight the runner has already applied to ``hidden_states``); ``topk_ids [N, K]``
        global expert ids (int64 or int32).  Return a new ``[N, H]`` tensor in the dtype
        and on the device of ``hidden_states``; N may be 0.
        """

    def run(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        """Call the kernel and check what it returned (type, shape, dtype, device, not
        the input itself: metadata only); a mismatch raises :class:`KernelOutputError`.
        Runners call this rather than the kernel directly."""
        out = self(hidden_states, topk_weights, topk_ids, experts)
        if not isinstance(out, torch.Tensor):
            raise KernelOutputError(f"returned {type(out).__name__} instead of a tensor")
        expected = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        if (tuple(out.shape), out.dtype, out.device) != expected:
            raise KernelOutputError(
                f"returned a {list(out.shape)} {out.dtype} tensor on {out.device} where "
                f"{list(expected[0])} {expected[1]} on {expected[2]} was expected"
            )
        # (data pointers do not exist while torch.compile traces; an op's output never aliases)
        if out.numel() and not torch.compiler.is_compiling() and out.data_ptr() == hidden_states.data_ptr():
            raise KernelOutputError("returned its input tensor; a kernel returns a new tensor")
        return out

    def derived_weight_bytes(self, num_experts: int, hidden: int, intermediate: int) -> int:
        """Bytes of derived copies of the expert weights this kernel keeps beside the
        canonical tensors (a repacked layout, made once and cached) for ``num_experts``
        local experts of this shape in the model's dtype; 0 (the default) for kernels that
        read the canonical tensors only.  The layer's memory estimate, ``moeframe explain``
        and ``bench --memory`` count it."""
        return 0

    @classmethod
    def tunable(cls) -> bool:
        """Whether this kernel defines :meth:`tune` (``moeframe tune`` lists those that do)."""
        return cls.tune.__func__ is not Kernel.tune.__func__  # type: ignore[attr-defined]

    @classmethod
    def tune(
        cls,
        config: Config,
        *,
        batch_sizes: Sequence[int] | None,
        output_dir: str | None,
        device: str,
        log: Callable[[str], None],
    ) -> list[Path]:
        """Search launch parameters for ``config``'s shapes and write them where the
        kernel finds them; return the files written (``moeframe tune`` calls it).
        ``batch_sizes``: token counts to tune (None: the kernel's own list);
        ``output_dir``: where to write (None: the kernel's default folder); ``log``
        prints one progress line.  Kernels with nothing to tune do not override it."""
        raise NotImplementedError(f"kernel {cls.__name__} has nothing to tune")
