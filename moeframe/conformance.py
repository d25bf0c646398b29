"""The conformance kit: checks a kernel against the ``torch`` reference kernel.

:func:`kernel_cases` enumerates the cases a kernel's capabilities admit (activations,
biases, expert map, dtypes, token counts 0, 1, 7 and 64, a tie-free routing);
:func:`check_kernel` runs them.  The test suite runs it for every registered kernel and
``moeframe check`` runs it for an installed plugin's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch

from moeframe.config import ModelConfig, NoParams, load_config
from moeframe.context import BuildContext
from moeframe.kernels import ExpertWeights, Kernel
from moeframe.numerics import DTYPES, Comparison, compare, tolerance_for
from moeframe.parallel import ParallelContext
from moeframe.plugins import Entry, get_registry
from moeframe.workspace import Workspace

__all__ = [
    "kernel_context",
    "KernelCase",
    "CaseResult",
    "kernel_cases",
    "scale_cases",
    "make_case_inputs",
    "run_kernel_case",
    "check_kernel",
]

TOKEN_COUNTS = (0, 1, 7, 64)
#: input scales (standard deviation of the hidden states) of the precision sweep, per dtype:
#: large enough that 16-bit intermediates lose precision (bf16) or range (fp16 overflows
#: beyond 65504: at 200 the reference itself has a few inf outputs)
SCALES = {"float32": (10.0, 200.0), "bfloat16": (10.0, 50.0, 200.0), "float16": (10.0, 50.0, 200.0)}
#: a gate this many times larger than usual (gelu's and silu's linear region, large products)
LARGE_GATE = 1000.0


@attrs.frozen
class KernelCase:
    activation: str
    bias: bool
    expert_map: bool
    dtype: str
    num_tokens: int
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 64
    intermediate_size: int = 32
    #: standard deviation of the hidden states (1: the usual scale)
    input_scale: float = 1.0
    #: factor on the gate rows of ``w13`` (1: the usual scale)
    gate_scale: float = 1.0

    @property
    def id(self) -> str:
        scale = f"-x{self.input_scale:g}" if self.input_scale != 1.0 else ""
        gate = f"-gate{self.gate_scale:g}" if self.gate_scale != 1.0 else ""
        return (
            f"{self.activation}-{'bias' if self.bias else 'nobias'}-{'map' if self.expert_map else 'nomap'}"
            f"-{self.dtype}-T{self.num_tokens}-E{self.num_experts}K{self.top_k}{scale}{gate}"
        )

    def model(self) -> ModelConfig:
        return ModelConfig(
            num_experts=self.num_experts,
            top_k=self.top_k,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            activation=self.activation,
            expert_bias=self.bias,
            dtype=self.dtype,
        )


@attrs.frozen
class CaseResult:
    case: KernelCase
    comparison: Comparison | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.comparison is not None and self.comparison.ok


def kernel_cases(
    entry: Entry, token_counts: Sequence[int] = TOKEN_COUNTS, dtypes: Sequence[str] | None = None
) -> Iterator[KernelCase]:
    """Every case ``entry``'s capabilities admit."""
    caps = entry.capabilities
    activations = [a for a in ("silu", "gelu", "swigluoai") if caps.activations is None or a in caps.activations]
    dtype_names = [d for d in (dtypes or DTYPES) if caps.dtypes is None or d in caps.dtypes]
    for activation in activations:
        for bias in (False, True) if caps.biases else (False,):
            for expert_map in (False, True) if caps.expert_map else (False,):
                for dtype in dtype_names:
                    for t in token_counts:
                        yield KernelCase(activation, bias, expert_map, dtype, t)


def scale_cases(entry: Entry, num_tokens: int = 16, dtypes: Sequence[str] | None = None) -> Iterator[KernelCase]:
    """The precision sweep ``entry``'s capabilities admit: hidden states at the
    :data:`SCALES` of each dtype, and a :data:`LARGE_GATE` for each activation, with
    biases and an expert map where supported.  A kernel that keeps its intermediates in
    the activation dtype fails here, and one whose output is NaN or inf where the
    reference's is finite fails every dtype."""
    caps = entry.capabilities
    activations = [a for a in ("silu", "gelu", "swigluoai") if caps.activations is None or a in caps.activations]
    dtype_names = [d for d in (dtypes or DTYPES) if caps.dtypes is None or d in caps.dtypes]
    for dtype in dtype_names:
        scales = SCALES[dtype]
        for i, scale in enumerate(scales):  # the largest scale with the first activation (silu)
            activation = activations[(len(scales) - 1 - i) % len(activations)]
            yield KernelCase(activation, bool(caps.biases), bool(caps.expert_map), dtype, num_tokens, input_scale=scale)
        for activation in activations:
            yield KernelCase(activation, False, False, dtype, num_tokens, gate_scale=LARGE_GATE)


def make_case_inputs(case: KernelCase, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Seeded inputs for ``case``: hidden states, tie-free routing, expert tensors."""
    g = torch.Generator().manual_seed(seed)
    E, K, H, I = case.num_experts, case.top_k, case.hidden_size, case.intermediate_size
    dtype = DTYPES[case.dtype]
    T = case.num_tokens
    x = torch.randn(T, H, generator=g) * case.input_scale
    # a tie-free routing: distinct ids per row, weights from a softmax
    scores = torch.rand(T, E, generator=g)
    topk_ids = torch.topk(scores, K, dim=-1).indices
    topk_weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    w13 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5
    if case.gate_scale != 1.0:
        w13[:, :I] *= case.gate_scale
    w2 = torch.randn(E, H, I, generator=g) * I**-0.5
    b13 = torch.randn(E, 2 * I, generator=g) * 0.1 if case.bias else None
    b2 = torch.randn(E, H, generator=g) * 0.1 if case.bias else None
    expert_map = None
    if case.expert_map:
        # even experts local (as in vLLM's align test), odd ones elsewhere
        local = list(range(0, E, 2))
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(len(local), dtype=torch.int32)
        w13, w2 = w13[local], w2[local]
        b13 = b13[local] if b13 is not None else None
        b2 = b2[local] if b2 is not None else None

    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def maybe(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else to(t)

    experts = ExpertWeights(
        to(w13), to(w2), maybe(b13), maybe(b2), None if expert_map is None else expert_map.to(device)
    )
    return {
        "hidden_states": to(x),
        "topk_weights": topk_weights.to(device),
        "topk_ids": topk_ids.to(device),
        "experts": experts,
    }


def kernel_context(model: ModelConfig, device: torch.device | str = "cpu") -> BuildContext:
    """A build context for constructing a kernel of ``model`` on its own (outside a layer)."""
    config = load_config({"model": _model_dict(model), "router": {"name": "softmax_topk"}})
    return BuildContext(config, torch.device(device), ParallelContext.single(), Workspace())


def _model_dict(model: ModelConfig) -> dict[str, Any]:
    return {f.name: getattr(model, f.name) for f in attrs.fields(ModelConfig)}


def run_kernel_case(
    entry: Entry, case: KernelCase, device: torch.device | str = "cpu", params: Any = None
) -> CaseResult:
    """Run one case; the result holds the comparison with the reference kernel."""
    from moeframe.kernels.torch_reference import TorchReferenceKernel

    model = case.model()
    context = kernel_context(model, device)
    cls = entry.load_as(Kernel)
    kernel = cls(context, params if params is not None else cls.Params())
    reference = TorchReferenceKernel(context, NoParams())
    inputs = make_case_inputs(case, device)
    try:
        out = kernel(**inputs)
    except Exception as exc:  # report, do not stop the other cases
        return CaseResult(case, None, f"{type(exc).__name__}: {exc}")
    expected = reference(**inputs)
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return CaseResult(
            case, None, f"returned {tuple(out.shape)} {out.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
        )
    if out.numel() and any(out.data_ptr() == t.data_ptr() for t in (inputs["hidden_states"],)):
        return CaseResult(case, None, "output aliases the input")
    comparison = compare(out, expected, tolerance_for(case.dtype))
    new_nonfinite = int((~torch.isfinite(out) & torch.isfinite(expected)).sum()) if out.numel() else 0
    if new_nonfinite:
        return CaseResult(
            case, comparison, f"{new_nonfinite} output values are NaN or inf where the reference's are finite"
        )
    return CaseResult(case, comparison)


def check_kernel(
    name: str,
    device: torch.device | str = "cpu",
    token_counts: Sequence[int] = TOKEN_COUNTS,
    dtypes: Sequence[str] | None = None,
) -> list[CaseResult]:
    """Run every admissible case for kernel ``name``."""
    entry = get_registry().get("kernel", name)
    return [run_kernel_case(entry, case, device) for case in kernel_cases(entry, token_counts, dtypes)]
