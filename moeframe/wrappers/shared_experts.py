"""``shared_experts``: a dense gated MLP every token goes through, added to the routed output.

``out = routed + shared(x)`` (DeepSeek-V3), or with ``gated = true``
``out = routed + sigmoid(x @ shared.gate.weight.T) * shared(x)`` (Qwen2-MoE), where
``shared(x) = linear(act(gate) * up, shared.w2)`` and ``gate, up = linear(x, shared.w13)``
split in halves, with the model's activation.

On CUDA the shared MLP runs on a side stream, overlapping the routed experts; the main
stream waits for it before the sum, and ``record_stream`` keeps the allocator from
reusing the input or the shared output while the side stream still uses them.  On other
devices it runs in order.

Reduce exactly once: when the inner output is a partial sum (the layer will all-reduce
it over the ranks sharing the tokens), the shared output is added on one replica only
(EP rank 0; under TP each TP rank adds its slice), so the reduction counts it once.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.nn.functional as F

from moeframe.config import Config, option
from moeframe.context import BuildContext
from moeframe.kernels import Activation, apply_activation
from moeframe.runners import Runner
from moeframe.weights import WeightSpec, tp_cols, tp_gate_up_rows
from moeframe.wrappers import Wrapper


@attrs.frozen
class SharedExpertsParams:
    intermediate_size: int | None = option(
        None, help="intermediate size Is of the shared MLP (default: model.intermediate_size)", min=1
    )
    gated: bool = option(False, help="multiply by sigmoid(x @ shared.gate.weight.T) (Qwen2-MoE); false: DeepSeek-V3")


class SharedExpertsWrapper(Wrapper):
    Params = SharedExpertsParams
    transparent = False

    def __init__(self, inner: Runner, context: BuildContext, params: SharedExpertsParams) -> None:
        super().__init__(inner, context, params)
        model = context.model
        self.model = model
        self.weights = context.weights
        self.parallel = context.parallel
        self.intermediate_size = params.intermediate_size or model.intermediate_size
        self.activation = Activation.from_model(model)
        self._side_stream = torch.cuda.Stream(context.device) if context.device.type == "cuda" else None

    @classmethod
    def supports(cls, config: Config, params: SharedExpertsParams) -> str | None:
        size = params.intermediate_size or config.model.intermediate_size
        if size % config.parallel.tp_size:
            return (
                f"shared_experts: intermediate_size {size} is not divisible by "
                f"parallel.tp_size {config.parallel.tp_size}"
            )
        return None

    def weight_specs(self) -> list[WeightSpec]:
        m, Is = self.model, self.intermediate_size
        tp_rank, tp_size = self.parallel.tp_rank, self.parallel.tp_size
        specs = [
            WeightSpec(
                "shared.w13",
                (2 * Is, m.hidden_size),
                m.torch_dtype,
                std=m.hidden_size**-0.5,
                shard=tp_gate_up_rows(tp_rank, tp_size),
            ),
            WeightSpec("shared.w2", (m.hidden_size, Is), m.torch_dtype, std=Is**-0.5, shard=tp_cols(tp_rank, tp_size)),
        ]
        if self.params.gated:
            specs.append(WeightSpec("shared.gate.weight", (1, m.hidden_size), m.torch_dtype, std=m.hidden_size**-0.5))
        return specs

    @property
    def _contributes(self) -> bool:
        """Whether this rank adds the shared output (see the module docstring)."""
        return self.inner.output_reduced or self.parallel.ep_rank == 0

    def shared(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weights
        h = apply_activation(F.linear(hidden_states, w["shared.w13"]), self.activation)
        out = F.linear(h, w["shared.w2"])
        if self.params.gated:
            out = torch.sigmoid(F.linear(hidden_states, w["shared.gate.weight"])) * out
        return out

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if not self._contributes:
            return self.inner.forward(hidden_states, router_logits)
        if self._side_stream is None or hidden_states.shape[0] == 0:
            routed = self.inner.forward(hidden_states, router_logits)
            return routed + self.shared(hidden_states)
        main = torch.cuda.current_stream(hidden_states.device)
        side = self._side_stream
        side.wait_stream(main)  # the input is ready before the side stream reads it
        with torch.cuda.stream(side):
            shared = self.shared(hidden_states)
        hidden_states.record_stream(side)
        routed = self.inner.forward(hidden_states, router_logits)
        main.wait_stream(side)  # the shared output is complete before the sum
        shared.record_stream(main)
        return routed + shared

    def describe(self) -> dict[str, Any]:
        return {
            "intermediate_size": self.intermediate_size,
            "overlap": "side stream" if self._side_stream else "in order",
        }
