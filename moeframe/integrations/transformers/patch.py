"""Whole MoE blocks of a transformers model replaced by :class:`moeframe.MoELayer` (the deep way).

:func:`patch_model` finds every MoE block of a model of a supported family, builds one
:class:`~moeframe.MoELayer` per block from :func:`config_from_hf` plus the user's
overrides, and puts a :class:`PatchedLayer` in the block's place.  The patched block:

* keeps the HF block's submodules under their names (``gate``, ``experts``,
  ``shared_expert``...), so ``state_dict()`` and ``save_pretrained`` are HF's names and
  layout, and a plain ``from_pretrained`` reads what a patched model saved;
* hands the layer the HF tensors themselves where the layouts agree (router, fused
  ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``): one copy of the experts.
  Layouts that differ by a transposition (Llama-4's experts) or a concatenation (the
  shared experts' separate gate and up projections) are rearranged in place: the HF
  parameters become views of the layer's tensors (same values, same state dict).
  GPT-OSS's experts (transposed, gate/up interleaved: no view can express it) are
  converted once, reported as copied, and converted again when the HF tensors change
  (``load_state_dict``, ``.to``);
* keeps the block's call convention (GPT-OSS returns ``(out, router_scores)``, Llama-4
  ``(out, router_logits)``);
* keeps HF's router-logit recording: while transformers records router logits
  (``output_router_logits=True``), the block runs HF's own router module, whose hooks
  record its output, and gives its logits to the moeframe layer; otherwise only
  moeframe's router runs.

The patched blocks are for inference: no gradient flows into their weights.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch

from moeframe.config import Config, load_config
from moeframe.errors import UserError
from moeframe.integrations.transformers.blocks import BLOCKS, BlockSpec, HFTensor
from moeframe.integrations.transformers.config import (
    _override_pairs,
    compose_wrappers,
    family_of,
    hf_text_config,
    moe_layer_indices,
    raw_config_from_hf,
)

__all__ = ["PatchedLayer", "PatchedBlock", "PatchReport", "patch_model", "unpatch_model"]


# -- taking the tensors from the block (where they are: blocks.BLOCKS) -----------------------------
def _fuse_rows_in_place(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[gate; up]`` as one ``[2I, H]`` tensor whose two halves ARE the HF weights.

    The first time, the two weights are concatenated and the HF parameters' data become
    the two halves (views, same values and names, so the state dict is unchanged); later,
    when they still are the halves of one tensor, that tensor is returned as it is."""
    rows = gate.shape[0]
    if (
        gate.dtype == up.dtype
        and gate.device == up.device
        and gate.is_contiguous()
        and up.is_contiguous()
        and gate.shape == up.shape
        and gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
        and up.storage_offset() == gate.storage_offset() + gate.numel()
    ):
        fused = gate.new_empty(0)
        return fused.set_(gate.untyped_storage(), gate.storage_offset(), (2 * rows, *gate.shape[1:]), gate.stride())
    fused = torch.cat([gate.detach(), up.detach()], dim=0)
    gate.data = fused[:rows]
    up.data = fused[rows:]
    return fused


_fuse_rows_in_place.in_place = True  # type: ignore[attr-defined]


def _transpose_in_place(t: torch.Tensor) -> torch.Tensor:
    """``t.transpose(1, 2)`` as a contiguous tensor that the HF weight IS a view of.

    The first time, the transposed copy is made and the HF parameter's data becomes its
    transposed view (same values and shape, so the state dict is unchanged); later, when
    it still is such a view, the contiguous tensor under it is returned as it is."""
    flipped = t.detach().transpose(1, 2)
    if flipped.is_contiguous():
        return flipped
    flipped = flipped.contiguous()
    t.data = flipped.transpose(1, 2)
    return flipped


_transpose_in_place.in_place = True  # type: ignore[attr-defined]


def _converted_copy(t: torch.Tensor, *, transposed: bool, interleaved: bool) -> torch.Tensor:
    """A copy of ``t`` in moeframe's layout: gate/up de-interleaved (last dimension), then
    ``[E, in, out]`` transposed to ``[E, out, in]``."""
    t = t.detach()
    if interleaved:
        t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
    if transposed:
        t = t.transpose(1, 2)
    return t.contiguous()


def _conversion(tensor: HFTensor, in_place: bool) -> Callable[..., torch.Tensor] | None:
    """How a live block's tensor becomes moeframe's: used as it is (None), rearranged in
    place (the HF tensors become views of the result), or converted into a copy."""
    if tensor.as_is:
        return None
    if len(tensor.paths) > 1:
        return _fuse_rows_in_place
    if in_place and not tensor.interleaved:
        return _transpose_in_place
    return functools.partial(_converted_copy, transposed=tensor.transposed, interleaved=tensor.interleaved)


# -- recording router logits as transformers does ----------------------------------------------------
_collector: list[Any] = []


def _recording_router_logits() -> bool:
    """Whether transformers is collecting router logits right now (``output_router_logits``)."""
    if not _collector:
        collector: Any
        try:
            from transformers.utils.output_capturing import _active_collector as collector
        except ImportError:  # pragma: no cover - another transformers layout: record always, correctly
            collector = None
        _collector.append(collector)
    if _collector[0] is None:  # pragma: no cover
        return True
    collected = _collector[0].get()
    return collected is not None and "router_logits" in collected


def _holder(module: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    """The module that holds the tensor at ``path`` and the tensor's name in it."""
    *parents, leaf = path.split(".")
    for p in parents:
        module = getattr(module, p)
    return module, leaf


def _get_tensor(module: torch.nn.Module, path: str) -> torch.Tensor:
    holder, leaf = _holder(module, path)
    return getattr(holder, leaf)


@attrs.frozen
class _Source:
    """Where one moeframe tensor comes from: the HF tensors at ``paths``, used as they are
    (``convert`` None), rearranged in place (the HF tensors become views of the result),
    or converted into a copy."""

    paths: tuple[str, ...]
    convert: Callable[..., torch.Tensor] | None

    @property
    def copies(self) -> bool:
        return self.convert is not None and not getattr(self.convert, "in_place", False)


# -- the patched block ---------------------------------------------------------------------------------
class PatchedLayer(torch.nn.Module):
    """An HF MoE block whose forward runs a :class:`moeframe.MoELayer`.

    Its submodules are the HF block's (same names, same tensors), so the state dict is
    the HF block's.  ``moe`` is the layer (not a submodule: its tensors are the HF ones,
    or converted from them, and are not saved twice); ``original`` the HF block, which
    :func:`unpatch_model` puts back.
    """

    #: kept in the instance's ``__dict__`` (not registered as submodules)
    moe: Any
    original: torch.nn.Module

    def __init__(self, original: torch.nn.Module, family: str, config: Config, parallel: Any, where: str) -> None:
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.__dict__["original"] = original
        self.__dict__["moe"] = None
        self.family = family
        self.where = where
        self._spec = BLOCKS[family]
        self._config = config
        self._parallel = parallel
        self._sources = {
            name: _Source(t.paths, _conversion(t, self._spec.in_place))
            for name, t in self._spec.tensors(config).items()
        }
        self._watch: list[tuple[torch.nn.Module, str, bool]] = []
        self._signature: tuple[Any, ...] = ()
        self._shared_bytes = 0
        self._copied_bytes = 0
        self._copied: tuple[str, ...] = ()
        self._build()

    # -- building the layer from the HF tensors -----------------------------------------------------
    def _hf_tensors(self) -> dict[str, tuple[torch.Tensor, ...]]:
        return {name: tuple(_get_tensor(self, p) for p in src.paths) for name, src in self._sources.items()}

    def _current_signature(self) -> tuple[Any, ...]:
        """What identifies the HF tensors the layer was built from: their storage (moved by
        ``.to``, replaced by a new tensor) and, for the converted ones, their version
        counter (bumped by in-place writes such as ``load_state_dict``; inference tensors
        have none, so an in-place write to them is not seen)."""
        sig: list[Any] = []
        for holder, leaf, converted in self._watch:
            t: torch.Tensor | None = holder._parameters.get(leaf)
            if t is None:
                t = holder._buffers.get(leaf)
            if t is None:  # removed: rebuild, which names what is missing
                return ()
            sig += (t.data_ptr(), t.dtype, t.get_device())
            if converted:
                # inference tensors (made under torch.inference_mode) keep no version counter
                sig.append(-1 if t.is_inference() else t._version)
        return tuple(sig)

    def _build(self) -> None:
        from moeframe.layer import MoELayer

        hf = self._hf_tensors()
        experts = hf["experts.w2"][0]
        dtype = str(experts.dtype).removeprefix("torch.")
        config = self._config
        try:
            if config.model.dtype != dtype:
                config = config.evolve({"model.dtype": dtype})
            tensors: dict[str, torch.Tensor] = {}
            with torch.no_grad():
                for name, src in self._sources.items():
                    parts = hf[name]
                    tensors[name] = src.convert(*parts) if src.convert is not None else parts[0].detach()
            layer = MoELayer(config, device=experts.device, parallel=self._parallel, tensors=tensors)
        except UserError as exc:
            raise type(exc)(f"{self.where}: {exc}") from None
        self.__dict__["moe"] = layer
        shared = copied = 0
        copied_names = []
        for name, tensor in layer.tensors.items():
            source = self._sources.get(name)
            same = (
                source is not None
                and not source.copies
                and tensor.data_ptr() == _get_tensor(self, source.paths[0]).data_ptr()
            )
            nbytes = tensor.numel() * tensor.element_size()
            if same:
                shared += nbytes
            else:
                copied += nbytes
                copied_names.append(name)
        self._shared_bytes, self._copied_bytes, self._copied = shared, copied, tuple(copied_names)
        self._config = config
        self._watch = [(*_holder(self, path), src.copies) for src in self._sources.values() for path in src.paths]
        self._signature = self._current_signature()

    def _layer(self) -> Any:
        if self._current_signature() != self._signature:
            self._build()  # the HF tensors moved (``.to``), were replaced or written in place
        return self.moe

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> Any:
        layer = self._layer()
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = scores = None
        if _recording_router_logits():
            router_out = getattr(self, self._spec.router)(x)  # HF's router: its hooks record its output
            logits = router_out[self._spec.logits_index]
            if self._spec.returns == "scores":
                scores = router_out[1]
        elif self._spec.returns != "plain":
            logits = layer.router_logits(x)
        out = layer(x, router_logits=logits).view(shape)
        if self._spec.returns == "scores":
            if scores is None:
                scores = layer.stack.router.select(logits, layer.tensors).weights
            return out, scores
        if self._spec.returns == "logits":
            return out, logits
        return out

    # -- description ------------------------------------------------------------------------------
    def report(self) -> PatchedBlock:
        return PatchedBlock(
            name=self.where,
            layer=_layer_index(self.where),
            block=type(self.original).__name__,
            stack=tuple(p.entry.strategy.display_name for p in self.moe.stack.parts),
            shared_bytes=self._shared_bytes,
            copied_bytes=self._copied_bytes,
            copied=self._copied,
        )

    def extra_repr(self) -> str:
        return f"family={self.family!r}, stack={' > '.join(self.report().stack)}"


# -- the report ------------------------------------------------------------------------------------
@attrs.frozen
class PatchedBlock:
    """One patched block: where it is, what it replaced, its stack and its tensors' bytes."""

    #: module path, e.g. ``model.layers.1.mlp``
    name: str
    #: decoder layer index (None when the path has none)
    layer: int | None
    #: the HF block's class
    block: str
    #: the composed stack, outermost first: wrappers, runner, router, dispatcher, kernel
    stack: tuple[str, ...]
    #: bytes of the layer's tensors that are the HF module's own tensors
    shared_bytes: int
    #: bytes of the layer's tensors converted from the HF ones (a second copy)
    copied_bytes: int
    #: names of the converted tensors
    copied: tuple[str, ...] = ()


@attrs.frozen
class PatchReport:
    """What :func:`patch_model` did.  ``str(report)`` is a short table."""

    family: str
    config: Config
    blocks: tuple[PatchedBlock, ...]

    @property
    def layers(self) -> list[int | None]:
        """The decoder layers patched."""
        return [b.layer for b in self.blocks]

    @property
    def shared_bytes(self) -> int:
        return sum(b.shared_bytes for b in self.blocks)

    @property
    def copied_bytes(self) -> int:
        return sum(b.copied_bytes for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "config": self.config.to_dict(),
            "blocks": [attrs.asdict(b) for b in self.blocks],
            "shared_bytes": self.shared_bytes,
            "copied_bytes": self.copied_bytes,
        }

    def __str__(self) -> str:
        lines = [
            (
                f"patched {len(self.blocks)} {self.family} MoE block(s): "
                f"{_mib(self.shared_bytes)} shared with the model, {_mib(self.copied_bytes)} copied"
            )
        ]
        for b in self.blocks:
            copied = f", copied: {', '.join(b.copied)}" if b.copied else ""
            lines.append(f"  {b.name} ({b.block}): {' > '.join(b.stack)}{copied}")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")


def _layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


# -- patching ------------------------------------------------------------------------------------
def _model_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise UserError(f"nothing to patch: {type(model).__name__} is not a transformers model (it has no .config)")
    return config


def _blocks(model: torch.nn.Module, spec: BlockSpec) -> list[tuple[str, torch.nn.Module]]:
    found = []
    for name, module in model.named_modules():
        if isinstance(module, PatchedLayer):
            continue
        if any(cls.__name__ in spec.classes for cls in type(module).__mro__):
            found.append((name, module))
    return found


def _patched(model: torch.nn.Module) -> list[tuple[str, PatchedLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PatchedLayer)]


def _check_overrides(pairs: Iterable[tuple[str, Any]]) -> None:
    for key, _ in pairs:
        head = key.strip().split(".")[0].split("[")[0]
        if head == "model":
            raise UserError(
                f"overrides: {key} comes from the transformers model and cannot be overridden in patch_model; "
                "override stack.*, router.* or parallel.* (model.dtype follows the model's tensors)"
            )


def _local_experts(block: torch.nn.Module, parallel: Any, num_experts: int) -> None:
    """Under expert parallelism: keep only this rank's experts in the HF experts module."""
    local = parallel.local_experts(num_experts)
    index = torch.tensor(local, dtype=torch.long)
    experts = block.get_submodule("experts")
    for name, param in list(experts.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == num_experts:
            kept = param.detach().index_select(0, index.to(param.device))
            setattr(experts, name, torch.nn.Parameter(kept, requires_grad=param.requires_grad))


def patch_model(
    model: torch.nn.Module,
    *,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> PatchReport:
    """Replace every MoE block of a transformers ``model`` with a :class:`PatchedLayer`.

    ``overrides``: dotted keys of the moeframe config, as in a TOML file or ``--set``
    (``{"stack.kernel": "fused_cpu", "stack.wrappers": ["chunking"]}``); a
    ``stack.wrappers`` list is composed with the parts the family needs (see
    :func:`~moeframe.integrations.transformers.config_from_hf`).  ``model.*`` keys are
    the model's and are refused.

    With ``parallel.ep_size > 1`` (under torchrun) each rank keeps only its experts: the
    HF experts module's tensors are cut to them, so the state dict then holds this
    rank's experts, and the model cannot be unpatched.

    Errors (one line each, :class:`~moeframe.errors.UserError`): a model that is not a
    transformers model or has no MoE blocks ("nothing to patch"), an unsupported
    family (the supported ones listed), an unknown override key (with a did-you-mean), a
    stack the composer refuses for the model's dtype or device (naming the block), and
    a model already patched (unpatch it first).
    """
    hf_config = _model_config(model)
    family = family_of(hf_config).name
    spec = BLOCKS[family]
    already = _patched(model)
    if already:
        raise UserError(
            f"{type(model).__name__} is already patched ({len(already)} block(s), e.g. {already[0][0]}); "
            "call unpatch_model(model) first to patch it again with other overrides"
        )
    blocks = _blocks(model, spec)
    if not blocks:
        dense = list(range(getattr(hf_text_config(hf_config), "num_hidden_layers", 0)))
        expected = moe_layer_indices(hf_config)
        raise UserError(
            f"nothing to patch: {type(model).__name__} ({family}) has no MoE blocks "
            f"(config: MoE layers {expected or 'none'} of {len(dense)})"
        )
    pairs = _override_pairs(overrides)
    _check_overrides(pairs)
    raw = raw_config_from_hf(hf_config)
    family_wrappers = list(raw["stack"]["wrappers"])
    pairs = [(k, compose_wrappers(family_wrappers, v) if k.strip() == "stack.wrappers" else v) for k, v in pairs]
    source = f"transformers:{family}"
    from moeframe.errors import ConfigError

    try:
        config = attrs.evolve(load_config(raw, overrides=dict(pairs)), source=source)
    except ConfigError as exc:
        raise exc.with_source(source) from None

    from moeframe.parallel import ParallelContext

    parallel = ParallelContext.from_config(config.parallel)
    patched: list[tuple[torch.nn.Module, str, PatchedLayer]] = []
    try:
        for name, block in blocks:
            if parallel.ep_size > 1:
                _local_experts(block, parallel, config.model.num_experts)
            replacement = PatchedLayer(block, family, config, parallel, name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, replacement)
            patched.append((parent, child, replacement))
    except BaseException:
        for parent, child, replacement in patched:  # all or nothing
            setattr(parent, child, replacement.original)
        raise
    model.__dict__["_moeframe_patched_ep"] = parallel.ep_size > 1
    return PatchReport(family, patched[0][2]._config, tuple(r.report() for _, _, r in patched))


def unpatch_model(model: torch.nn.Module) -> int:
    """Put the original HF blocks back; returns how many were restored (0 when the model
    was not patched).  The HF blocks hold their tensors throughout (the patched blocks
    shared them), so nothing is copied back."""
    patched = _patched(model)
    if patched and model.__dict__.get("_moeframe_patched_ep"):
        raise UserError(
            "unpatch_model: this model was patched with parallel.ep_size > 1 and each rank holds only its experts; "
            "load the model again to run it without moeframe"
        )
    for name, replacement in patched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement.original)
    model.__dict__.pop("_moeframe_patched_ep", None)
    return len(patched)
