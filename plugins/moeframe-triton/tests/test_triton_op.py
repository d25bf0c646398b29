"""The kernel as a torch op: schema, fake implementation, ``torch.compile`` (through the
interpreter here; the GPU script checks Inductor and CUDA graphs on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moeframe
from moeframe.conformance import KernelCase, kernel_context, make_case_inputs
from moeframe.kernels.activations import Activation
from moeframe.kernels.torch_reference import reference_moe
from moeframe.numerics import compare, tolerance_for
from moeframe.testing import small_config
from moeframe_triton.kernel import TritonKernel
from moeframe_triton.ops import OP_NAME


def op_args(case: KernelCase, activation: str = "silu") -> tuple:
    inputs = make_case_inputs(case)
    e = inputs["experts"]
    return (
        inputs["hidden_states"],
        inputs["topk_weights"],
        inputs["topk_ids"],
        e.w13,
        e.w2,
        e.b13,
        e.b2,
        e.expert_map,
        activation,
        1.702,
        7.0,
    )


def test_op_is_registered_with_a_schema():
    op = torch.ops.moeframe_triton.fused_moe.default
    assert op.name() == OP_NAME
    schema = str(op._schema)
    assert schema.startswith(
        OP_NAME + "(Tensor hidden_states, Tensor topk_weights, Tensor topk_ids, Tensor w13, Tensor w2, "
        "Tensor? b13, Tensor? b2, Tensor? expert_map, str activation, float alpha, float limit)"
    )
    assert schema.endswith("-> Tensor")  # a new tensor: no alias annotation, no mutation
    assert not any(a.alias_info for a in op._schema.arguments)


@pytest.mark.parametrize("dtype,tokens", [("bfloat16", 7), ("float16", 0)])
def test_fake_implementation_gives_the_output_metadata(dtype, tokens):
    args = op_args(KernelCase("silu", True, True, dtype, tokens))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.moeframe_triton.fused_moe(*fake)
    assert tuple(out.shape) == (tokens, 64) and out.dtype == args[0].dtype and out.device == args[0].device
    assert out.is_contiguous()


def test_fake_implementation_checks_shapes_and_the_activation():
    args = op_args(KernelCase("silu", False, False, "float32", 3))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=r"w2 has shape"):
            torch.ops.moeframe_triton.fused_moe(*fake[:4], fake[3], *fake[5:])
        with pytest.raises(ValueError, match=r"unknown activation 'relu'"):
            torch.ops.moeframe_triton.fused_moe(*fake[:8], "relu", 1.702, 7.0)


def test_opcheck():
    """torch's own checks of a custom op: schema, fake against real, no aliasing."""
    torch.library.opcheck(
        torch.ops.moeframe_triton.fused_moe.default,
        op_args(KernelCase("gelu", True, True, "bfloat16", 5)),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_the_strategy_calls_the_op(monkeypatch):
    import moeframe_triton.kernel as kernel_module

    calls = []
    real = kernel_module.fused_moe_op

    def spy(*a):
        calls.append(a)
        return real(*a)

    monkeypatch.setattr(kernel_module, "fused_moe_op", spy)
    case = KernelCase("swigluoai", True, False, "float32", 3)
    kernel = TritonKernel(kernel_context(case.model()), None)
    inputs = make_case_inputs(case)
    out = kernel(**inputs)
    assert len(calls) == 1 and calls[0][8:] == ("swigluoai", 1.702, 7.0)
    assert compare(out, reference_moe(**inputs, activation=Activation("swigluoai")), tolerance_for("float32")).ok


def test_compile_fullgraph_through_the_kernel():
    """Routing and the kernel in one graph (``aot_eager``: Inductor would compile the
    surrounding ops for the CPU; the op itself runs through the interpreter)."""
    case = KernelCase("silu", True, True, "bfloat16", 6)
    kernel = TritonKernel(kernel_context(case.model()), None)
    inputs = make_case_inputs(case)
    experts = inputs["experts"]
    router = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def forward(x: torch.Tensor) -> torch.Tensor:
        weights, ids = torch.topk(torch.softmax((x @ router.T).float(), -1), 2, dim=-1)
        return kernel(x, weights / weights.sum(-1, keepdim=True), ids, experts)

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    x = inputs["hidden_states"]
    assert torch.equal(compiled(x), forward(x))
    assert torch.equal(compiled(x[:3]), forward(x[:3]))  # another token count: a recompile, not a break


def test_compiled_layer_with_the_triton_kernel_matches_eager():
    """A whole layer under ``torch.compile(fullgraph=True)``, wherever the core lets a layer
    compile at all: with the ``torch`` kernel as the control."""
    torch._dynamo.reset()
    control = moeframe.MoELayer(small_config())
    x = torch.randn(4, 32)
    try:
        with torch.inference_mode():
            torch.compile(control, backend="aot_eager", fullgraph=True)(x)
    except Exception as exc:  # the graph breaks in the core, before any kernel is reached
        pytest.skip(f"a layer with the torch kernel does not compile either: {type(exc).__name__}")
    layer = moeframe.MoELayer({**small_config(), "stack": {"kernel": "triton"}})
    torch._dynamo.reset()
    with torch.inference_mode():
        assert torch.equal(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))
