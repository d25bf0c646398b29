"""The bf16 kernels of the amx_bf16 and avx512_bf16 variants (csrc/bf16_experts.c) and the
repacked weights they read (moeframe.kernels.bf16_packing): layout, cache, and every path
against the reference at tile boundaries, odd sizes, biases, activations and thread counts."""

from __future__ import annotations

import gc

import pytest
import torch

from moeframe.conformance import KernelCase, kernel_context, make_case_inputs
from moeframe.kernels import ExpertWeights, bf16_packing, cpu_isa
from moeframe.kernels.fused_cpu import FusedCpuKernel, FusedCpuParams
from moeframe.kernels.torch_reference import TorchReferenceKernel
from moeframe.numerics import compare, tolerance_for
from moeframe.testing import torch_threads

BF16_VARIANTS = ["amx_bf16", "avx512_bf16"]


def _why_not(isa: str) -> str | None:
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, load_native

    lacks = cpu_isa.missing_flags(cpu_isa.VARIANTS[isa])
    if lacks:
        return f"this CPU lacks {', '.join(lacks)}"
    try:
        lib = load_native(isa)
    except NativeUnavailable as exc:
        return str(exc)
    if isa == "amx_bf16" and lib.bf16 is not None and not lib.bf16.amx:
        return lib.bf16.amx_refused
    return None


@pytest.fixture(params=BF16_VARIANTS)
def variant(request, monkeypatch) -> str:
    why = _why_not(request.param)
    if why is not None:
        pytest.skip(f"variant {request.param}: {why}")
    monkeypatch.setenv("MOEFRAME_CPU_ISA", request.param)
    return request.param


def kernel(case: KernelCase, matmul_tokens: int = 1) -> FusedCpuKernel:
    return FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(backend="native", matmul_tokens=matmul_tokens))


def check(case: KernelCase, inputs: dict, matmul_tokens: int = 1) -> torch.Tensor:
    out = kernel(case, matmul_tokens)(**inputs)
    expected = TorchReferenceKernel(kernel_context(case.model()), None)(**inputs)
    cmp = compare(out, expected, tolerance_for(case.dtype))
    assert cmp.ok, (case.id, cmp)
    return out


# -- the packed layout -------------------------------------------------------------------
@pytest.mark.parametrize("H, I", [(64, 32), (61, 35), (100, 16)])
def test_packing_puts_every_weight_where_the_tiles_read_it(H, I):
    E = 3
    w13 = torch.randn(E, 2 * I, H).bfloat16()
    w2 = torch.randn(E, H, I).bfloat16()
    p = bf16_packing.pack_experts(w13, w2)
    hp, ip = p.hidden_padded, p.intermediate_padded
    assert hp % 32 == 0 and ip % 32 == 0 and hp >= H and ip >= I
    assert p.w13.data_ptr() % 64 == 0 and p.w2.data_ptr() % 64 == 0
    assert p.nbytes == bf16_packing.packed_bytes(E, H, I) == 2 * (2 * ip * hp + hp * ip) * E
    for e, half, n, k in [(0, 0, 0, 0), (2, 1, I - 1, H - 1), (1, 0, I // 2, H // 3), (1, 1, 5, 33 % H)]:
        # w13p[e, n // 16, half, k // 32, (k % 32) // 2, n % 16, k % 2] = w13[e, half * I + n, k]
        got = p.w13[e, n // 16, half, k // 32, (k % 32) // 2, n % 16, k % 2]
        assert torch.equal(got, w13[e, half * I + n, k])
    for e, r, k in [(0, 0, 0), (2, H - 1, I - 1), (1, H // 2, I // 3)]:
        assert torch.equal(p.w2[e, r // 16, k // 32, (k % 32) // 2, r % 16, k % 2], w2[e, r, k])
    # the padding is zeros: the packed copies hold exactly the weights' sum of squares
    assert torch.allclose(p.w13.float().square().sum(), w13.float().square().sum())
    assert torch.allclose(p.w2.float().square().sum(), w2.float().square().sum())


def test_the_cache_packs_once_and_again_when_weights_change():
    cache = bf16_packing.PackCache()
    w13, w2 = torch.randn(2, 64, 32).bfloat16(), torch.randn(2, 32, 32).bfloat16()
    first = cache.get(w13, w2)
    assert cache.get(w13, w2) is first and cache.packs == 1
    assert cache.nbytes == first.nbytes == cache.bytes_for(w13, w2)
    with torch.no_grad():
        w13[0, 0, 0] += 1  # in place: the version counter moves
    second = cache.get(w13, w2)
    assert second is not first and cache.packs == 2
    assert torch.equal(second.w13[0, 0, 0, 0, 0, 0, 0], w13[0, 0, 0])
    w2b = w2.clone()  # replaced by another tensor: packed for that one
    assert cache.get(w13, w2b) is not second and cache.packs == 3
    del w2b
    gc.collect()
    assert cache.nbytes == second.nbytes  # the copy of a freed weight is dropped with it
    del w13, w2
    gc.collect()
    assert cache.nbytes == 0


def test_the_cache_follows_the_weights_not_the_tensor_objects():
    """A new tensor object over the same weights (patch_model rebuilt after unpatch_model, a
    view made per call) finds the packed copy; the copy lives while any of them does."""
    cache = bf16_packing.PackCache()
    w13, w2 = torch.randn(2, 64, 32).bfloat16(), torch.randn(2, 32, 32).bfloat16()
    first = cache.get(w13, w2)
    a13, a2 = w13.detach(), w2[:]  # new objects, same memory and version counters
    assert cache.get(a13, a2) is first and cache.packs == 1
    assert cache.bytes_for(a13, a2) == first.nbytes
    del w13, w2
    gc.collect()
    assert cache.get(a13, a2) is first and cache.packs == 1  # still alive through a13, a2
    with torch.no_grad():
        a13.mul_(2)  # an in-place write through a view: packed again
    assert cache.get(a13, a2) is not first and cache.packs == 2
    other = a13.clone()  # the same values in other memory: its own copy
    cache.get(other, a2)
    assert cache.packs == 3
    del a13, a2, other
    gc.collect()
    assert cache.nbytes == 0


# -- the kernels against the reference ---------------------------------------------------
def _routed(case: KernelCase, counts: list[int], seed: int = 0) -> dict:
    """Inputs where local expert e receives exactly counts[e] tokens (top_k = 1)."""
    inputs = make_case_inputs(case, seed=seed)
    ids = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))]
    inputs["topk_ids"] = ids.view(-1, 1)
    return inputs


@pytest.mark.parametrize("counts", [[1, 0, 15, 16], [17, 31, 0, 32], [33, 0, 0, 48], [64, 1, 2, 81]])
def test_tile_boundaries(variant, counts):
    case = KernelCase("silu", True, False, "bfloat16", sum(counts), num_experts=4, top_k=1, hidden_size=96,
                      intermediate_size=64)  # fmt: skip
    check(case, _routed(case, counts, seed=len(counts)))


def test_k_chunks_and_row_chunks(variant):
    """AMX GEMM 1 runs k in chunks of 8 tile blocks (256 bf16) and rows in chunks of 128,
    C kept in fp32 between chunks: H = 300 gives 10 k blocks (a chunk and a part), experts
    of 129 and 200 tokens a row chunk and a part, 16 and 0 none."""
    counts = [129, 16, 0, 200]
    case = KernelCase("silu", True, False, "bfloat16", sum(counts), num_experts=4, top_k=1, hidden_size=300,
                      intermediate_size=48)  # fmt: skip
    check(case, _routed(case, counts, seed=5))


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("H, I", [(61, 35), (130, 17), (32, 96)])
def test_odd_sizes_activations_and_biases(variant, activation, bias, H, I):
    case = KernelCase(activation, bias, False, "bfloat16", 90, num_experts=5, top_k=2, hidden_size=H,
                      intermediate_size=I)  # fmt: skip
    check(case, make_case_inputs(case, seed=H + I))


@pytest.mark.parametrize("T", [0, 1, 2, 40])
def test_few_tokens_expert_maps_and_the_mixed_path(variant, T):
    case = KernelCase("swigluoai", True, True, "bfloat16", T, num_experts=8, top_k=3, hidden_size=64,
                      intermediate_size=48)  # fmt: skip
    inputs = make_case_inputs(case, seed=T)
    check(case, inputs)  # every expert on the bf16 kernel
    check(case, inputs, matmul_tokens=5)  # the native core takes the experts with fewer than 5


def test_nothing_local_and_the_default_threshold(variant):
    case = KernelCase("silu", False, True, "bfloat16", 300, num_experts=6, top_k=2, hidden_size=64,
                      intermediate_size=32)  # fmt: skip
    inputs = make_case_inputs(case, seed=3)
    check(case, inputs, matmul_tokens=0)  # the table's threshold for this variant
    inputs["topk_ids"][:] = 5  # expert 5 is not local
    assert torch.count_nonzero(kernel(case)(**inputs)) == 0


def test_result_does_not_depend_on_threads(variant):
    case = KernelCase("gelu", True, False, "bfloat16", 200, num_experts=8, top_k=4, hidden_size=256,
                      intermediate_size=192)  # fmt: skip
    inputs = make_case_inputs(case, seed=2)
    k = kernel(case)
    with torch_threads(1):
        one = k(**inputs)
    with torch_threads(max(3, torch.get_num_threads())):
        several = k(**inputs)
    assert torch.equal(one, several)


def test_weights_changed_in_place_are_seen(variant):
    case = KernelCase("silu", False, False, "bfloat16", 64, num_experts=4, top_k=2, hidden_size=64,
                      intermediate_size=32)  # fmt: skip
    inputs = make_case_inputs(case, seed=4)
    k = kernel(case)
    before = k(**inputs)
    assert k.packed_weight_bytes >= bf16_packing.packed_bytes(4, 64, 32)
    with torch.no_grad():
        inputs["experts"].w2.mul_(2)
    after = check(case, inputs)
    assert torch.allclose(after.float(), 2 * before.float(), rtol=0.02, atol=0.02)


def test_nan_in_a_token_stays_in_that_token(variant):
    case = KernelCase("silu", False, False, "bfloat16", 40, num_experts=4, top_k=2, hidden_size=64,
                      intermediate_size=32)  # fmt: skip
    inputs = make_case_inputs(case, seed=5)
    inputs["hidden_states"][7, 3] = float("nan")
    out = kernel(case)(**inputs)
    assert torch.isnan(out[7]).all()
    assert not torch.isnan(out[torch.arange(40) != 7]).any()


def test_fp32_and_fp16_are_not_packed(variant):
    for dtype in ("float32", "float16"):
        case = KernelCase("silu", False, False, dtype, 64, num_experts=4, top_k=2, hidden_size=64,
                          intermediate_size=32)  # fmt: skip
        inputs = make_case_inputs(case, seed=6)
        k = kernel(case)
        check(case, inputs)
        assert k._bf16_kernels(getattr(torch, dtype)) is None
        assert k.packed_weight_bytes_for(getattr(torch, dtype), 4, 64, 32) == 0


def test_the_describe_line_names_the_bf16_kernel(variant):
    case = KernelCase("silu", False, False, "bfloat16", 1)
    info = kernel(case, matmul_tokens=0).describe()
    assert info["isa"] == variant
    assert info["bf16_experts"] == ("amx" if variant == "amx_bf16" else "avx512_bf16")
    assert "bf16 experts from" in info["summary"]


def test_amx_refused_falls_back_to_vdpbf16ps(monkeypatch):
    if _why_not("amx_bf16") is not None:
        pytest.skip(f"variant amx_bf16: {_why_not('amx_bf16')}")
    monkeypatch.setenv("MOEFRAME_CPU_ISA", "amx_bf16")
    case = KernelCase("silu", True, False, "bfloat16", 50, num_experts=4, top_k=2, hidden_size=64,
                      intermediate_size=32)  # fmt: skip
    inputs = make_case_inputs(case, seed=7)
    k = kernel(case)
    monkeypatch.setattr(k._native.bf16, "amx", False)  # as if Linux had refused the tile state
    out = k(**inputs)
    expected = TorchReferenceKernel(kernel_context(case.model()), None)(**inputs)
    assert compare(out, expected, tolerance_for("bfloat16")).ok


@pytest.mark.parametrize("isa", BF16_VARIANTS)
def test_the_bf16_variants_compile_everywhere_on_x86(isa):
    """Built (not run) whatever this CPU has: the sources compile with their flags."""
    if cpu_isa.machine_arch() != "x86_64":
        pytest.skip("x86-64 variants are built on x86-64 machines")
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, build_native

    try:
        path = build_native(isa)
    except NativeUnavailable as exc:
        if "no C compiler" in str(exc):
            pytest.skip(str(exc))
        raise
    assert path.is_file()


def test_experts_weights_is_what_the_kernel_reads():
    # the canonical tensors are what users keep: the kernel never replaces them
    case = KernelCase("silu", False, False, "bfloat16", 8, num_experts=2, top_k=1, hidden_size=32, intermediate_size=32)
    inputs = make_case_inputs(case)
    ex: ExpertWeights = inputs["experts"]
    w13 = ex.w13.clone()
    FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(matmul_tokens=1))(**inputs)
    assert torch.equal(ex.w13, w13) and ex.w13.shape == (2, 64, 32)
