"""Every moeframe kernel as a transformers experts implementation (the light way).

transformers 5 routes the experts computation of its MoE blocks through
``transformers.integrations.moe.ExpertsInterface``: an experts module decorated with
``@use_experts_implementation`` calls ``fn(module, hidden_states [T, H], top_k_index
[T, K], top_k_weights [T, K]) -> [T, H]``, chosen by ``config._experts_implementation``.
:func:`register_experts` adds to that interface:

* ``"moeframe"``: the fast kernel for the device of the hidden states (``fused_cpu`` on
  the CPU, ``triton`` on CUDA when the plugin is installed), else the ``torch`` reference;
* ``"moeframe:<kernel>"`` for every kernel in moeframe's registry, third parties' included.

HF's router, shared experts and block stay as they are; only the experts computation
changes.  The experts' weights are used in place where their layout is moeframe's
canonical one (``gate_up_proj [E, 2I, H]`` concatenated, not transposed: Mixtral,
Qwen2/3-MoE, DeepSeek-V3); other layouts (GPT-OSS: transposed, gate/up interleaved, with
biases) are converted once per module and kept with it, and converted again only when
the module's tensors change (a new tensor, or an in-place write such as
``load_state_dict``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import torch

from moeframe.errors import UserError, did_you_mean
from moeframe.kernels import ExpertWeights

__all__ = [
    "PREFIX",
    "FAST_KERNELS",
    "register_experts",
    "experts_keys",
    "kernel_for_key",
    "check_experts_implementation",
]

#: the name under which moeframe registers; kernels are ``"moeframe:<kernel>"``
PREFIX = "moeframe"
#: the kernels ``"moeframe"`` tries first on each device type, before the ``torch`` reference
FAST_KERNELS: dict[str, tuple[str, ...]] = {"cpu": ("fused_cpu",), "cuda": ("triton",)}
#: the attribute of an experts module that holds moeframe's state for it (kernels and,
#: where the layout differs, the converted weights); never part of the state dict
STATE_ATTRIBUTE = "_moeframe_experts"

_lock = threading.Lock()
_registered: list[str] = []


def experts_keys() -> list[str]:
    """The experts implementations :func:`register_experts` adds now: ``"moeframe"`` and
    ``"moeframe:<kernel>"`` for each registered kernel."""
    from moeframe.plugins import get_registry

    return [PREFIX] + [f"{PREFIX}:{name}" for name in get_registry().names("kernel")]


def kernel_for_key(key: str) -> str | None:
    """``"moeframe:fused_cpu"`` -> ``"fused_cpu"``; ``"moeframe"`` -> ``None`` (the
    device's fast kernel).  Other keys are a :class:`~moeframe.errors.UserError` with
    moeframe's did-you-mean."""
    if key == PREFIX:
        return None
    prefix, sep, name = key.partition(":")
    if prefix == PREFIX and sep:
        from moeframe.plugins import get_registry

        if name in get_registry().names("kernel"):
            return name
    raise UserError(f"{key!r} is not a moeframe experts implementation{_hint(key)}")


def register_experts() -> list[str]:
    """Register ``"moeframe"`` and ``"moeframe:<kernel>"`` (every kernel registered now,
    plugins' included) in transformers' ``ExpertsInterface``; return the keys.

    Afterwards ``AutoModelForCausalLM.from_config(cfg, experts_implementation=
    "moeframe:fused_cpu")`` or ``model.set_experts_implementation("moeframe")`` run
    moeframe's kernels under HF's routing.  An unknown name raises transformers' own
    error, which lists every registered name (moeframe's included); transformers' classes
    are not altered, so moeframe's did-you-mean comes from
    :func:`check_experts_implementation`.  Calling it again is harmless, and registers
    kernels added since (``moeframe.register_plugin``).
    """
    # the registry first: a plugin may need to act before transformers imports its
    # dependencies (moeframe-triton selects Triton's interpreter on a machine without CUDA)
    keys = experts_keys()
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        raise UserError(
            "the transformers integration needs transformers >= 5.24 (pip install 'moeframe[transformers]')"
        ) from None
    with _lock:
        for stale in [k for k in _registered if k not in keys]:  # a kernel no longer registered
            ExpertsInterface._global_mapping.pop(stale, None)
            _registered.remove(stale)
        for key in keys:
            ExpertsInterface.register(key, _make_forward(key, kernel_for_key(key)))
            if key not in _registered:
                _registered.append(key)
    return keys


def check_experts_implementation(name: str) -> str:
    """``name`` when transformers' ``ExpertsInterface`` knows it (moeframe's keys once
    :func:`register_experts` has run, transformers' own, ``"eager"``); otherwise a
    one-line :class:`~moeframe.errors.UserError` with moeframe's did-you-mean.

    transformers 5 checks the name itself (``from_config``, ``from_pretrained``,
    ``set_experts_implementation``) with a fixed membership test and no hook, and moeframe
    does not patch it; pass the name through this function first to get the did-you-mean:
    ``from_config(cfg, experts_implementation=check_experts_implementation(name))``."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        raise UserError(
            "the transformers integration needs transformers >= 5.24 (pip install 'moeframe[transformers]')"
        ) from None
    if not isinstance(name, str):
        raise UserError(f"experts implementation: expected a name (str), got {name!r}")
    known = ["eager", *ALL_EXPERTS_FUNCTIONS.keys()]
    if name in known:
        return name
    ours = experts_keys()
    if name in ours:
        raise UserError(
            f"experts implementation {name!r} is moeframe's but not registered in transformers yet; "
            "call moeframe.integrations.transformers.register_experts() first"
        )
    candidates = list(dict.fromkeys([*ours, *known]))
    raise UserError(
        f"{name!r} is not an experts implementation transformers knows{did_you_mean(name, candidates)}; "
        f"known: {', '.join(candidates)} (moeframe kernels registered later need register_experts() again)"
    )


# -- the experts function -------------------------------------------------------------------
def _make_forward(key: str, kernel: str | None) -> Callable[..., torch.Tensor]:
    def moeframe_experts_forward(
        self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        state = _state_of(self)
        runner = state.runner(self, key, kernel, hidden_states, top_k_index)
        return runner(hidden_states, top_k_index, top_k_weights)

    moeframe_experts_forward.__qualname__ = moeframe_experts_forward.__name__ = f"moeframe_experts_forward[{key}]"
    moeframe_experts_forward.__doc__ = f"transformers experts implementation {key!r} (moeframe)."
    return moeframe_experts_forward


class _ModuleState:
    """What moeframe keeps on one experts module: one runner per (key, device, dtype)."""

    def __init__(self) -> None:
        self.runners: dict[tuple[str, str, torch.dtype], _Runner] = {}
        self.layout: _Layout | None = None

    def runner(
        self, module: torch.nn.Module, key: str, kernel: str | None, x: torch.Tensor, ids: torch.Tensor
    ) -> _Runner:
        cache_key = (key, x.device.type, x.dtype)
        found = self.runners.get(cache_key)
        if found is None:
            if self.layout is None:
                self.layout = _Layout.of(module)
            found = self.runners[cache_key] = _Runner.build(module, self.layout, kernel, x, ids)
        return found

    def __repr__(self) -> str:
        return f"<moeframe experts state: {', '.join(k[0] for k in self.runners) or 'unused'}>"


def _state_of(module: torch.nn.Module) -> _ModuleState:
    state = module.__dict__.get(STATE_ATTRIBUTE)
    if state is None:
        state = _ModuleState()
        object.__setattr__(module, STATE_ATTRIBUTE, state)
    return state


@attrs.frozen
class _Layout:
    """How one HF experts module stores its weights, and what it computes."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    activation: str
    swiglu_alpha: float
    swiglu_limit: float
    has_bias: bool
    transposed: bool
    interleaved: bool
    expert_parallel: bool
    where: str

    @property
    def in_place(self) -> bool:
        return not (self.transposed or self.interleaved)

    @classmethod
    def of(cls, module: torch.nn.Module) -> _Layout:
        where = f"{type(module).__name__}"
        if not getattr(module, "has_gate", True):
            raise UserError(
                f"{where}: experts without a gate projection (has_gate = False) are not supported by moeframe's kernels"
            )
        if getattr(module, "has_post_expert_norm", False):
            raise UserError(f"{where}: experts with a post-expert norm are not supported by moeframe's kernels")
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
            raise UserError(
                f"{where}: expected 3-d gate_up_proj and down_proj tensors, which this module does not have"
            )
        transposed = bool(getattr(module, "is_transposed", False))
        interleaved = not bool(getattr(module, "is_concatenated", True))
        E = gate_up.shape[0]
        hidden, two_i = (gate_up.shape[1], gate_up.shape[2]) if transposed else (gate_up.shape[2], gate_up.shape[1])
        activation, alpha, limit = _activation_of(module, where)
        return cls(
            num_experts=E,
            hidden_size=hidden,
            intermediate_size=two_i // 2,
            activation=activation,
            swiglu_alpha=alpha,
            swiglu_limit=limit,
            has_bias=bool(getattr(module, "has_bias", False)),
            transposed=transposed,
            interleaved=interleaved,
            expert_parallel=bool(getattr(module, "_is_expert_parallel", False)),
            where=where,
        )


def _activation_of(module: torch.nn.Module, where: str) -> tuple[str, float, float]:
    """The activation the module's gate computes, found from what it computes (not from
    ``hidden_act``, which GPT-OSS's config sets to ``silu`` for a ``swigluoai`` gate)."""
    from transformers.integrations.moe import _default_apply_gate

    apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if apply_gate is not _default_apply_gate:
        alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
        if alpha is not None and limit is not None and _is_swigluoai(module, float(alpha), float(limit)):
            return "swigluoai", float(alpha), float(limit)
        raise UserError(
            f"{where}: its gate ({type(module).__name__}._apply_gate) is not one moeframe's kernels compute "
            "(silu, gelu, swigluoai)"
        )
    act = getattr(module, "act_fn", None)
    if act is None:
        raise UserError(f"{where}: no act_fn; moeframe's kernels compute silu, gelu or swigluoai")
    probe = torch.linspace(-8.0, 8.0, 161, dtype=torch.float32)
    with torch.no_grad():
        got = act(probe)
    for name, fn in (("silu", torch.nn.functional.silu), ("gelu", torch.nn.functional.gelu)):
        if torch.allclose(got, fn(probe), atol=1e-6, rtol=1e-5):
            return name, 1.702, 7.0
    raise UserError(f"{where}: its activation {act!r} is not one moeframe's kernels compute (silu, gelu, swigluoai)")


def _is_swigluoai(module: Any, alpha: float, limit: float) -> bool:
    """Whether ``module._apply_gate`` computes GPT-OSS's gate on interleaved columns."""
    from moeframe.kernels.activations import Activation, apply_activation

    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(3, 16, generator=g) * 4
    with torch.no_grad():
        got = module._apply_gate(gate_up)
    concatenated = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=-1)
    want = apply_activation(concatenated, Activation("swigluoai", alpha, limit))
    return got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


_SOURCES = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


def _source_tensors(module: torch.nn.Module, layout: _Layout) -> list[torch.Tensor]:
    names = _SOURCES if layout.has_bias else ("gate_up_proj", "down_proj")
    return [getattr(module, n) for n in names]


def _version(t: torch.Tensor) -> int:
    """``t._version`` (it counts in-place writes); -1 for an inference tensor, which has no
    counter (created under ``torch.inference_mode``)."""
    return -1 if t.is_inference() else t._version


def _fingerprint(tensors: list[torch.Tensor]) -> tuple[Any, ...]:
    """Changes when a tensor is replaced or written in place."""
    return tuple((t.data_ptr(), _version(t), tuple(t.shape), t.dtype) for t in tensors)


def _canonical(module: Any, layout: _Layout) -> ExpertWeights:
    """The module's experts in moeframe's canonical layout: its own tensors where the
    layout agrees (no copy), converted copies otherwise."""
    gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    b13 = module.gate_up_proj_bias.detach() if layout.has_bias else None
    b2 = module.down_proj_bias.detach() if layout.has_bias else None
    if layout.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    if layout.interleaved:
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        if b13 is not None:
            b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1)
    return ExpertWeights(
        gate_up.contiguous(),
        down.contiguous(),
        None if b13 is None else b13.contiguous(),
        None if b2 is None else b2.contiguous(),
    )


class _Runner:
    """One kernel bound to one experts module: the kernel instance, and the experts'
    canonical tensors, kept until the module's tensors change."""

    def __init__(self, module: torch.nn.Module, layout: _Layout, kernel: Any, name: str) -> None:
        self.module = module
        self.layout = layout
        self.kernel = kernel
        self.name = name
        self._fingerprint: tuple[Any, ...] | None = None
        self._experts: ExpertWeights | None = None
        self._expert_map: torch.Tensor | None = None
        self.conversions = 0
        self._warned_grad = False

    @classmethod
    def build(
        cls, module: torch.nn.Module, layout: _Layout, kernel: str | None, x: torch.Tensor, ids: torch.Tensor
    ) -> _Runner:
        from moeframe.composer import check_stack
        from moeframe.config import load_config
        from moeframe.context import BuildContext
        from moeframe.errors import StackError
        from moeframe.numerics import dtype_name
        from moeframe.parallel import ParallelContext
        from moeframe.plugins import get_registry
        from moeframe.workspace import current_workspace

        registry = get_registry()
        weight_dtype = _source_tensors(module, layout)[0].dtype
        top_k = getattr(getattr(module, "config", None), "num_experts_per_tok", None) or (
            ids.shape[-1] if ids.dim() else 1
        )
        model = {
            "num_experts": layout.num_experts,
            "top_k": max(1, min(int(top_k), layout.num_experts)),
            "hidden_size": layout.hidden_size,
            "intermediate_size": layout.intermediate_size,
            "activation": layout.activation,
            "swiglu_alpha": layout.swiglu_alpha,
            "swiglu_limit": layout.swiglu_limit,
            "expert_bias": layout.has_bias,
            "dtype": dtype_name(weight_dtype),
        }
        if kernel is None:
            fits = [k for k in FAST_KERNELS.get(x.device.type, ()) if k in registry.names("kernel")] + ["torch"]
        else:
            fits = [kernel]
        problem: Exception | None = None
        for name in fits:
            try:
                config = load_config({"model": model, "router": {"name": "softmax_topk"}, "stack": {"kernel": name}})
                check_stack(config, x.device, registry)
            except UserError as exc:
                problem = exc
                continue
            context = BuildContext(config, x.device, ParallelContext.single(), current_workspace())
            kernel_class: Any = registry.get("kernel", name).load()
            instance = kernel_class(context, config.stack.kernel.params)
            return cls(module, layout, instance, name)
        raise StackError(
            f"{layout.where} (experts implementation {PREFIX + (':' + kernel if kernel else '')!r}): {problem}"
        )

    def experts(self) -> ExpertWeights:
        sources = _source_tensors(self.module, self.layout)
        fingerprint = _fingerprint(sources)
        if fingerprint != self._fingerprint or self._experts is None:
            with torch.no_grad():
                self._experts = _canonical(self.module, self.layout)
            if not self.layout.in_place:
                self.conversions += 1
            self._fingerprint = fingerprint
        return self._experts

    def __call__(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        experts = self.experts()
        if torch.is_grad_enabled() and not self._warned_grad and self.module.gate_up_proj.requires_grad:
            self._warned_grad = True
            warnings.warn(
                f"{self.layout.where}: moeframe experts implementations compute without gradients to the experts' "
                "weights (inference); run under torch.no_grad() or use transformers' own for training",
                stacklevel=3,
            )
        ids = top_k_index
        if self.layout.expert_parallel:
            # HF's expert parallelism marks tokens of other ranks' experts with ids >= num_experts
            # (and weight 0): map them to an expert that is not local
            E = experts.w13.shape[0]
            if self._expert_map is None or self._expert_map.device != ids.device:
                self._expert_map = torch.cat(
                    [torch.arange(E, dtype=torch.int32), torch.tensor([-1], dtype=torch.int32)]
                ).to(ids.device)
            ids = ids.clamp(max=E)
            experts = experts._replace(expert_map=self._expert_map)
        return self.kernel(hidden_states, top_k_weights, ids, experts)


# -- moeframe's did-you-mean ------------------------------------------------------------------
def _hint(key: str) -> str:
    """``"; did you mean 'moeframe:fused_cpu'? (moeframe's: ...)"``"""
    keys = experts_keys()
    return (
        f"{did_you_mean(key, keys)} (moeframe's: {', '.join(keys)}; "
        "kernels registered later need register_experts() again)"
    )
