"""``torch.compile(layer, fullgraph=True)``: the router, runner, local dispatcher and the
``torch`` and ``fused_cpu`` kernels trace into one graph (the kernels as the registered ops
``moeframe::reference_experts`` and ``moeframe::fused_cpu_experts``), and the compiled
layer computes what the eager one does."""

from __future__ import annotations

import pytest
import torch

import moeframe
from moeframe.conformance import KernelCase, kernel_context, make_case_inputs
from moeframe.kernels.fused_cpu import FusedCpuKernel, FusedCpuParams
from moeframe.kernels.torch_reference import TorchReferenceKernel


def native_available() -> bool:
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, load_native

    try:
        load_native()
    except NativeUnavailable:
        return False
    return True


STACKS = {
    "torch": {"stack.kernel": "torch"},
    "fused_cpu-native": {"stack.kernel": "fused_cpu", "stack.kernel_params.backend": "native"},
    "fused_cpu-torch": {"stack.kernel": "fused_cpu", "stack.kernel_params.backend": "torch"},
}


def make_layer(stack: str, dtype: str = "float32", **overrides) -> moeframe.MoELayer:
    if stack == "fused_cpu-native" and not native_available():
        pytest.skip("the native core cannot be built here")
    return moeframe.MoELayer(moeframe.load_config("qwen3-moe", overrides={**STACKS[stack], "model.dtype": dtype, **overrides}))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("stack, dtype", [(stack, "float32") for stack in STACKS] + [("fused_cpu-native", "bfloat16")])
def test_fullgraph_aot_eager_equals_eager(stack, dtype):
    layer = make_layer(stack, dtype)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 256), (2, 3, 256)]:  # leading dims flattened
        x = torch.randn(*shape, generator=g).to(getattr(torch, dtype))
        with torch.inference_mode():
            expected = layer(x)
            got = compiled(x)
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert torch.equal(got, expected), (stack, dtype, shape, (got.float() - expected.float()).abs().max())


def test_fullgraph_with_dynamic_token_counts():
    layer = make_layer("fused_cpu-torch")
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    g = torch.Generator().manual_seed(1)
    for tokens in (1, 17, 64):
        x = torch.randn(tokens, 256, generator=g)
        with torch.inference_mode():
            assert torch.equal(compiled(x), layer(x))


@pytest.mark.slow
def test_fullgraph_inductor_equals_eager():
    """One case through inductor (it generates and compiles C++ for the router's ops)."""
    layer = make_layer("fused_cpu-native" if native_available() else "fused_cpu-torch")
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got, expected = compiled(x), layer(x)
    # inductor may compute the router's softmax in another order: close, not bitwise
    cmp = moeframe.compare(got, expected)
    assert cmp.ok, cmp


def test_the_compiled_graph_holds_the_ops():
    """Each kernel is one node: the registered op, not its Python."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    for stack, op in [("torch", "reference_experts"), ("fused_cpu-torch", "fused_cpu_experts")]:
        torch._dynamo.reset()
        backend = EagerAndRecordGraphs()
        layer = make_layer(stack)
        torch.compile(layer, fullgraph=True, backend=backend)(torch.randn(4, 256))
        code = backend.graphs[0].code
        assert f"torch.ops.moeframe.{op}" in code, code


def kernel_op_args(case: KernelCase, kernel) -> tuple:
    inputs = make_case_inputs(case)
    ex = inputs["experts"]
    return inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"], ex.w13, ex.w2, ex.b13, ex.b2, ex.expert_map


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_fused_cpu_op_passes_opcheck(backend):
    """Schema, fake implementation (shape and dtype), and AOT dispatch, as torch checks them."""
    if backend == "native" and not native_available():
        pytest.skip("the native core cannot be built here")
    for case in [
        KernelCase("silu", True, True, "bfloat16", 7, num_experts=8, top_k=2, hidden_size=32, intermediate_size=16),
        KernelCase("swigluoai", True, False, "float32", 3, num_experts=4, top_k=2, hidden_size=24, intermediate_size=8),
    ]:
        kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(backend=backend))
        args = (*kernel_op_args(case, kernel), kernel._op_key)
        torch.library.opcheck(torch.ops.moeframe.fused_cpu_experts.default, args)


def test_reference_op_passes_opcheck():
    case = KernelCase("gelu", True, True, "float32", 6, num_experts=8, top_k=3, hidden_size=16, intermediate_size=8)
    kernel = TorchReferenceKernel(kernel_context(case.model()), None)
    act = kernel.activation
    args = (*kernel_op_args(case, kernel), act.name, act.alpha, act.limit)
    torch.library.opcheck(torch.ops.moeframe.reference_experts.default, args)
    # and the op computes what the eager kernel does
    inputs = make_case_inputs(case)
    ex = inputs["experts"]
    via_op = torch.ops.moeframe.reference_experts(inputs["hidden_states"], inputs["topk_weights"], inputs["topk_ids"],
                                                  ex.w13, ex.w2, ex.b13, ex.b2, ex.expert_map, act.name, act.alpha, act.limit)
    assert torch.equal(via_op, kernel(**inputs))


def test_an_op_call_for_a_deleted_kernel_says_so():
    case = KernelCase("silu", False, False, "float32", 2, num_experts=4, top_k=2, hidden_size=16, intermediate_size=8)
    kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(backend="torch"))
    key = kernel._op_key
    args = kernel_op_args(case, kernel)
    del kernel
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match=f"no live fused_cpu kernel '{key}'"):
        torch.ops.moeframe.fused_cpu_experts(*args, key)


def test_the_ops_take_the_expert_weights_in_their_field_order():
    """Kernels pass ``*experts`` to their ops: the ops' parameters 3..7 must be ExpertWeights'
    fields, in order."""
    import moeframe.kernels.fused_cpu  # noqa: F401  -- registers moeframe::fused_cpu_experts
    import moeframe.kernels.torch_reference  # noqa: F401  -- registers moeframe::reference_experts
    from moeframe.kernels import ExpertWeights

    for op in (torch.ops.moeframe.fused_cpu_experts, torch.ops.moeframe.reference_experts):
        names = tuple(a.name for a in op.default._schema.arguments)
        assert names[3 : 3 + len(ExpertWeights._fields)] == ExpertWeights._fields, names
