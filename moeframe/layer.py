"""``MoELayer``: the composed stack as a ``torch.nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from moeframe.composer import Stack, build_stack, reference_config
from moeframe.config import Config, load_config
from moeframe.context import BuildContext
from moeframe.errors import InputError, UserError
from moeframe.memory import Need, check_fits
from moeframe.parallel import ParallelContext
from moeframe.weights import WeightSpec, expert_weight_specs, load_safetensors, materialize, save_safetensors
from moeframe.workspace import Workspace, current_workspace

__all__ = ["MoELayer", "describe_layer", "describe_layout"]


def layer_weight_specs(config: Config, parallel: ParallelContext, stack: Stack) -> list[WeightSpec]:
    """Every tensor a layer of ``config`` holds on this rank: the router's, the experts'
    and those of the stack's runner and wrappers."""
    return stack.router.weight_specs() + expert_weight_specs(config.model, parallel) + stack.weight_specs()


def layer_needs(config: Config, specs: list[WeightSpec], stack: Stack) -> list[Need]:
    """The bytes a layer allocates on its device (its weights and its stack's
    workspace), with the config keys that drive each."""
    m = config.model
    expert_keys = (
        f"model.num_experts={m.num_experts}, model.hidden_size={m.hidden_size}, "
        f"model.intermediate_size={m.intermediate_size}"
    )
    other = [s for s in specs if not s.name.startswith("experts.")]
    needs = [Need("weights", sum(s.nbytes() for s in specs if s.name.startswith("experts.")), expert_keys)]
    if other:
        needs.append(
            Need(
                "other weights",
                sum(s.nbytes() for s in other),
                f"model.num_experts={m.num_experts}, model.hidden_size={m.hidden_size}"
                f"{', stack.wrappers' if stack.weight_specs() else ''}",
            )
        )
    w13 = next((s for s in specs if s.name == "experts.w13"), None)
    if w13 is not None:  # a repacked copy the kernel keeps beside the canonical weights (fused_cpu, bf16)
        e_local, two_i, hidden = w13.local_shape()
        derived = stack.kernel.derived_weight_bytes(e_local, hidden, two_i // 2)
        if derived:
            needs.append(
                Need("repacked expert weights", derived, f"stack.kernel, {expert_keys}, model.dtype={m.dtype}")
            )
    wrappers = [p for p in stack.parts if p.kind == "wrapper"]
    for part in stack.parts:
        if part.workspace_bytes:
            where = (
                f"stack.wrappers[{wrappers.index(part)}].params"
                if part.kind == "wrapper"
                else f"stack.{part.kind}_params"
                if part.kind in ("kernel", "runner", "dispatcher")
                else part.kind
            )
            needs.append(
                Need(
                    f"workspace of {part.entry.name}",
                    part.workspace_bytes,
                    f"{where}, model.hidden_size={m.hidden_size}",
                )
            )
    return needs


def _explain(config: Config, stack: Stack, parallel: ParallelContext, specs: list[WeightSpec]) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "source": config.source,
        "stack": stack.describe(),
        "parallel": parallel.describe(),
        "weights": [
            {
                "name": s.name,
                "shape": list(s.local_shape()),
                "dtype": str(s.dtype).removeprefix("torch."),
                "bytes": s.nbytes(),
            }
            for s in specs
        ],
        "weight_bytes": sum(s.nbytes() for s in specs),
        "expert_weight_bytes": sum(s.nbytes() for s in specs if s.name.startswith("experts.")),
        "workspace_bytes": stack.workspace_bytes,
    }


def describe_layer(
    config: Config | str | Path | Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    parallel: ParallelContext | None = None,
) -> dict[str, Any]:
    """What :meth:`MoELayer.explain` returns, without allocating the layer's tensors or
    its workspace: the stack is built (and checked) as the layer would build it, shapes
    and bytes come from the config.  ``parallel`` may describe any rank of a layout that
    is not launched (``ParallelContext(config.parallel, rank=r, world_size=w)``)."""
    if not isinstance(config, Config) or overrides:
        config = load_config(config, overrides)
    parallel = parallel or ParallelContext.single(config.parallel)
    context = BuildContext(config, torch.device(device or "cpu"), parallel, Workspace(), {})
    stack = build_stack(context)
    specs = layer_weight_specs(config, parallel, stack)
    info = _explain(config, stack, parallel, specs)
    info["needs"] = [attrs.asdict(n) for n in layer_needs(config, specs, stack)]
    return info


def describe_layout(config: Config, world_size: int, device: torch.device | str | None = None) -> list[dict[str, Any]]:
    """:func:`describe_layer` for every rank of a ``world_size``-rank layout of ``config``,
    without launching anything (each rank's stack is built and checked, its bytes come
    from the shapes).  A config that does not fit ``world_size`` ranks is a
    :class:`~moeframe.errors.ConfigError`."""
    from moeframe.parallel import CountingCollectives, validate_world

    validate_world(config.parallel, world_size)
    return [
        describe_layer(
            config,
            device=device,
            parallel=ParallelContext(
                config.parallel, rank=rank, world_size=world_size, collectives=CountingCollectives()
            ),
        )
        for rank in range(world_size)
    ]


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
    process-wide one); ``tensors``: the layer's tensors by name (``layer.weight_specs``,
    this rank's part of each) to hold instead of the seeded initialisation -- used as
    they are, not copied, when their dtype and device are the layer's (this is how the
    transformers integration shares a model's experts).
    """

    def __init__(
        self,
        config: Config | str | Path | Mapping[str, Any],
        *,
        overrides: Mapping[str, Any] | None = None,
        device: torch.device | str | None = None,
        parallel: ParallelContext | None = None,
        workspace: Workspace | None = None,
        tensors: Mapping[str, torch.Tensor] | None = None,
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
        self.weight_specs: list[WeightSpec] = layer_weight_specs(config, self.parallel, self.stack)
        # the bytes about to be allocated, checked before any tensor is (given tensors exist already)
        allocated = [s for s in self.weight_specs if tensors is None or s.name not in tensors]
        check_fits(layer_needs(config, allocated, self.stack), self.device, "the layer")
        for spec in self.weight_specs:
            self._add_tensor(spec.name, self._initial_tensor(spec, tensors))

    def _initial_tensor(self, spec: WeightSpec, tensors: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """``tensors[spec.name]`` (used as it is when its dtype and device are the layer's,
        converted otherwise; a float32 router tensor stays float32 when the router computes
        in float32), or the seeded initialisation when no tensors are given."""
        if tensors is None:
            return materialize(spec, self.config.seed, self.device)
        unknown = sorted(set(tensors) - {s.name for s in self.weight_specs})
        if unknown:
            raise InputError(
                f"tensors: unexpected {unknown[0]!r}; this layer has: {', '.join(s.name for s in self.weight_specs)}"
            )
        if spec.name not in tensors:
            raise InputError(f"tensors: missing {spec.name!r} of shape {list(spec.local_shape())}")
        given = tensors[spec.name]
        if tuple(given.shape) != spec.local_shape():
            raise InputError(
                f"tensors: {spec.name!r} has shape {list(given.shape)}, expected {list(spec.local_shape())}"
            )
        dtype = spec.dtype
        if spec.name.startswith("router.") and given.dtype == torch.float32 == self._router.logits_dtype:
            dtype = torch.float32
        return given.detach().to(device=self.device, dtype=dtype)

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
    def router_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The router's logits ``[T, E]`` for hidden states ``[T, H]`` (what :meth:`forward`
        computes first; give them back to it as ``router_logits``)."""
        return self._router.logits(hidden_states, self._tensors)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., H] -> [..., H]``; ``router_logits [T, E]`` (T the tokens of ``hidden_states``),
        when given, are used instead of the router's own (e.g. from :meth:`router_logits`)."""
        model = self.config.model
        if hidden_states.dim() == 0 or hidden_states.shape[-1] != model.hidden_size:
            raise InputError(
                f"hidden_states has shape {list(hidden_states.shape)}; "
                f"expected [..., {model.hidden_size}] (model.hidden_size)"
            )
        if hidden_states.dtype != model.torch_dtype:
            raise InputError(f"hidden_states is {hidden_states.dtype}, but the layer is {model.dtype} (model.dtype)")
        x = hidden_states.reshape(-1, model.hidden_size)
        if router_logits is None:
            router_logits = self.stack.router_logits(x, self._tensors)
        elif router_logits.shape != (x.shape[0], model.num_experts):
            raise InputError(
                f"router_logits has shape {list(router_logits.shape)}; expected [{x.shape[0]}, {model.num_experts}] "
                "(tokens, model.num_experts)"
            )
        self._context.forward_index += 1
        out = self.stack.forward(x, router_logits)
        if not self.stack.output_reduced:
            out = self.parallel.reduce_output(out)  # the one reduction of this layer
        return out.view(hidden_states.shape)

    # -- weights -----------------------------------------------------------------------------
    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The layer's tensors by their documented names (this rank's part of each)."""
        return dict(self._tensors)

    def load_weights(self, path: str | Path, *, strict: bool | None = None, check_values: bool = True) -> None:
        """Load this rank's part of every tensor from a safetensors file.

        Names, shapes and dtypes are checked (only floating-point tensors convert);
        tensors holding NaN or inf are named in one warning, or refused when ``strict``
        (default: ``MOEFRAME_STRICT_WEIGHTS``)."""
        loaded = load_safetensors(path, self.weight_specs, self.device, strict=strict, check_values=check_values)
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

        return load_hf(
            cls, checkpoint_dir, layer, overrides=overrides, device=device, parallel=parallel, workspace=workspace
        )

    def reference(self) -> MoELayer:
        """The reference layer for this config (router + ``torch`` kernel, one process),
        holding the same weights."""
        ref = MoELayer(
            reference_config(self.config),
            device=self.device,
            parallel=ParallelContext.single(),
            workspace=self.workspace,
        )
        if self.parallel.world_size == 1:
            with torch.no_grad():
                for name, tensor in ref._tensors.items():
                    tensor.copy_(self._tensors[name])
        return ref

    def explain(self) -> dict[str, Any]:
        """The resolved config, the composed stack and the memory each part holds."""
        return _explain(self.config, self.stack, self.parallel, self.weight_specs)

    def extra_repr(self) -> str:
        names = [p.entry.strategy.display_name for p in self.stack.parts]
        return f"source={self.config.source!r}, stack={' > '.join(names)}"
