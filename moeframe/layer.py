"""``MoELayer``: the composed stack as a ``torch.nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moeframe.composer import Stack, build_stack, reference_config
from moeframe.config import Config, load_config
from moeframe.context import BuildContext
from moeframe.errors import InputError, UserError
from moeframe.parallel import ParallelContext
from moeframe.weights import WeightSpec, expert_weight_specs, load_safetensors, materialize, save_safetensors
from moeframe.workspace import Workspace, current_workspace

__all__ = ["MoELayer"]


class _Tensors(torch.nn.Module):
    """Holds a group of the layer's tensors so that their names read ``router.weight``..."""


class MoELayer(torch.nn.Module):
    """A Mixture-of-Experts layer whose every stage is a named strategy.

    ``MoELayer(load_config("qwen3-moe", overrides={"stack.kernel": "torch"}))`` builds the
    configured stack (refusing, with a :class:`~moeframe.errors.StackError`, parts that do
    not fit), owns the router's and experts' tensors in the canonical layout (initialised
    deterministically from ``config.seed``) and maps hidden states ``[..., H]`` to the
    same shape and dtype.  The tensors are inference weights (``requires_grad=False``).

    ``parallel``: this process's ranks (default: from ``config.parallel`` and the default
    process group); ``workspace``: staging buffers shared with other layers (default: the
    process-wide one).
    """

    def __init__(
        self,
        config: Config | str | Path | Mapping[str, Any],
        *,
        overrides: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        parallel: ParallelContext | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, Config) or overrides:
            config = load_config(config, overrides)
        self.config: Config = config
        self.device = torch.device(device or "cpu")
        self.parallel = parallel or ParallelContext.from_config(config.parallel)
        self.parallel.check_same_config(config)
        self.workspace = workspace or current_workspace()
        self._tensors: dict[str, torch.nn.Parameter] = {}
        self._context = BuildContext(config, self.device, self.parallel, self.workspace, self._tensors)
        self.stack: Stack = build_stack(self._context)
        self._router = self.stack.router
        self.weight_specs: list[WeightSpec] = (
            self._router.weight_specs() + expert_weight_specs(config.model, self.parallel) + self.stack.weight_specs()
        )
        for spec in self.weight_specs:
            self._add_tensor(spec.name, materialize(spec, config.seed, self.device))

    def _add_tensor(self, name: str, value: torch.Tensor) -> None:
        *path, leaf = name.split(".")
        holder: torch.nn.Module = self
        for part in path:
            child = holder._modules.get(part)
            if child is None:
                child = _Tensors()
                holder.add_module(part, child)
            holder = child
        param = torch.nn.Parameter(value, requires_grad=False)
        holder.register_parameter(leaf, param)
        self._tensors[name] = param

    # -- forward -----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        model = self.config.model
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != model.hidden_size:
            raise InputError(
                f"hidden_states has shape {list(hidden_states.shape)}; expected [..., {model.hidden_size}] (model.hidden_size)"
            )
        if hidden_states.dtype != model.torch_dtype:
            raise InputError(f"hidden_states is {hidden_states.dtype}, but the layer is {model.dtype} (model.dtype)")
        x = hidden_states.reshape(-1, model.hidden_size)
        self._context.forward_index += 1
        router_logits = self._router.logits(x, self._tensors)
        out = self.stack.forward(x, router_logits)
        if not self.stack.output_reduced:
            out = self.parallel.reduce_output(out)  # the one reduction of this layer
        return out.view(hidden_states.shape)

    # -- weights -----------------------------------------------------------------------------
    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The layer's tensors by their documented names (this rank's part of each)."""
        return dict(self._tensors)

    def load_weights(self, path: str | Path) -> None:
        """Load this rank's part of every tensor from a safetensors file."""
        loaded = load_safetensors(path, self.weight_specs, self.device)
        with torch.no_grad():
            for name, tensor in loaded.items():
                self._tensors[name].copy_(tensor)

    def save_weights(self, path: str | Path) -> None:
        """Write every tensor to a safetensors file (one process only), atomically."""
        if self.parallel.world_size > 1:
            raise UserError("save_weights works in one process; save from a single-process layer with the same seed")
        save_safetensors(self._tensors, path, metadata={"format": "moeframe", "config": self.config.fingerprint()})

    @classmethod
    def load_hf(
        cls,
        checkpoint_dir: str | Path,
        layer: int | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        parallel: ParallelContext | None = None,
        workspace: Workspace | None = None,
    ) -> MoELayer:
        """The MoE block of decoder layer ``layer`` (default: the first MoE layer) of a
        transformers checkpoint directory (``config.json`` and ``*.safetensors``, sharded
        or not), with its config from :func:`~moeframe.integrations.transformers.config_from_hf`
        plus ``overrides``; this rank reads only its own experts' tensors.  See
        ``docs/transformers.md``."""
        from moeframe.integrations.transformers.checkpoint import load_hf

        return load_hf(cls, checkpoint_dir, layer, overrides=overrides, device=device, parallel=parallel,
                       workspace=workspace)

    def reference(self) -> MoELayer:
        """The reference layer for this config (router + ``torch`` kernel, one process),
        holding the same weights."""
        ref = MoELayer(reference_config(self.config), device=self.device, parallel=ParallelContext.single(),
                       workspace=self.workspace)
        if self.parallel.world_size == 1:
            with torch.no_grad():
                for name, tensor in ref._tensors.items():
                    tensor.copy_(self._tensors[name])
        return ref

    def explain(self) -> dict[str, Any]:
        """The resolved config, the composed stack and the memory each part holds."""
        return {
            "config": self.config.to_dict(),
            "source": self.config.source,
            "stack": self.stack.describe(),
            "parallel": self.parallel.describe(),
            "weights": [
                {"name": s.name, "shape": list(s.local_shape()), "dtype": str(s.dtype).removeprefix("torch."), "bytes": s.nbytes()}
                for s in self.weight_specs
            ],
            "weight_bytes": sum(s.nbytes() for s in self.weight_specs),
            "expert_weight_bytes": sum(s.nbytes() for s in self.weight_specs if s.name.startswith("experts.")),
            "workspace_bytes": self.stack.workspace_bytes,
        }

    def extra_repr(self) -> str:
        names = [p.entry.strategy.display_name for p in self.stack.parts]
        return f"source={self.config.source!r}, stack={' > '.join(names)}"
