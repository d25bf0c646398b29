"""The native core's ISA variants: detection and forcing (``MOEFRAME_CPU_ISA``), every variant
built, every variant this CPU runs checked against the reference with the conformance and
edge-case sweeps, and the per-expert hand-over to torch's matmul (``matmul_tokens``)."""

from __future__ import annotations

import pytest
import torch

from moeframe.conformance import (
    KernelCase,
    kernel_cases,
    kernel_context,
    make_case_inputs,
    run_kernel_case,
    scale_cases,
)
from moeframe.kernels import ExpertWeights, cpu_isa
from moeframe.kernels.cpu_isa import VARIANTS, CpuIsaError, Variant
from moeframe.kernels.fused_cpu import FusedCpuKernel, FusedCpuParams
from moeframe.kernels.torch_reference import TorchReferenceKernel
from moeframe.numerics import compare, tolerance_for
from moeframe.plugins import get_registry
from moeframe.testing import torch_threads

AVX2 = frozenset({"avx2", "fma", "f16c", "sse4_2"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.fixture
def on_x86(monkeypatch):
    monkeypatch.setattr(cpu_isa, "machine_arch", lambda: "x86_64")
    monkeypatch.delenv(cpu_isa.ENV_VAR, raising=False)


# -- detection ---------------------------------------------------------------------------
def test_supported_is_best_first_and_follows_the_flags(on_x86):
    assert cpu_isa.supported(AVX512) == ["avx512", "avx2"]
    assert cpu_isa.supported(AVX2) == ["avx2"]
    assert cpu_isa.supported(frozenset({"sse4_2"})) == []
    assert cpu_isa.detect(AVX512) == "avx512" and cpu_isa.detect(AVX2) == "avx2"


def test_the_environment_variable_forces_a_variant(on_x86, monkeypatch):
    monkeypatch.setenv("MOEFRAME_CPU_ISA", "avx2")
    assert cpu_isa.detect(AVX512) == "avx2"
    monkeypatch.setenv("MOEFRAME_CPU_ISA", " AVX2 ")
    assert cpu_isa.detect(AVX512) == "avx2"


@pytest.mark.parametrize(
    "forced, flags, message",
    [
        (
            "avx21",
            AVX512,
            (
                "MOEFRAME_CPU_ISA='avx21' is not a CPU variant; did you mean 'avx2'?; "
                "variants: {variants} (this CPU runs: avx512, avx2)"
            ),
        ),
        ("sse", AVX2, "MOEFRAME_CPU_ISA='sse' is not a CPU variant; variants: {variants} (this CPU runs: avx2)"),
        (
            "avx512",
            AVX2,
            (
                "MOEFRAME_CPU_ISA='avx512': variant 'avx512' needs avx512bw, avx512dq, avx512f, avx512vl, "
                "which this CPU lacks; this CPU runs: avx2"
            ),
        ),
    ],
)
def test_a_forced_variant_that_cannot_run_is_one_clear_line(on_x86, monkeypatch, forced, flags, message):
    monkeypatch.setenv("MOEFRAME_CPU_ISA", forced)
    with pytest.raises(CpuIsaError) as info:
        cpu_isa.detect(flags)
    assert str(info.value) == message.replace("{variants}", ", ".join(VARIANTS))


def test_a_variant_for_another_architecture_says_so(monkeypatch):
    monkeypatch.setattr(cpu_isa, "machine_arch", lambda: "aarch64")
    monkeypatch.setenv("MOEFRAME_CPU_ISA", "avx2")
    with pytest.raises(CpuIsaError, match="variant 'avx2' is for x86_64 and this is aarch64"):
        cpu_isa.detect(AVX512)


def test_no_variant_for_this_cpu_names_what_is_missing(on_x86):
    with pytest.raises(
        CpuIsaError,
        match=r"no native variant runs on this CPU \(.*\): .*\bavx512 needs .*avx512f.*; avx2 needs avx2, f16c, fma",
    ):
        cpu_isa.detect(frozenset())


def test_this_cpu_is_described():
    model = cpu_isa.cpu_model()
    assert isinstance(model, str) and model.strip() and "\n" not in model
    assert isinstance(cpu_isa.cpu_flags(), frozenset)
    if cpu_isa.machine_arch() == "x86_64" and cpu_isa.cpu_flags():
        assert "sse2" in cpu_isa.cpu_flags()


def test_variants_are_well_formed():
    for name, variant in VARIANTS.items():
        assert variant.name == name and variant.path.is_file(), name
        assert "-shared" in variant.cflags and "-fPIC" in variant.cflags
    with pytest.raises(ValueError):
        Variant("x", "x.c", (), frozenset(), arch="riscv64")


def test_matmul_thresholds_follow_the_cpu(monkeypatch):
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX2)
    assert [cpu_isa.matmul_min_tokens(d) for d in ("float32", "bfloat16", "float16")] == [None, None, None]
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX512 | {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert cpu_isa.matmul_min_tokens("bfloat16") == cpu_isa._MATMUL_MIN["amx_bf16"]  # the amx_bf16 variant's kernel
    assert cpu_isa.matmul_min_tokens("bfloat16", "avx512") == cpu_isa._MATMUL_MIN["amx_bf16_torch"]  # torch.mm
    assert cpu_isa.matmul_min_tokens("float32", "amx_bf16") == cpu_isa._MATMUL_MIN["avx512_f32"]
    assert cpu_isa.matmul_min_tokens("float16") is None  # fp16 GEMMs would overflow: never handed over
    assert cpu_isa.matmul_min_tokens("float32", "avx512") == cpu_isa._MATMUL_MIN["avx512_f32"]
    assert cpu_isa.matmul_min_tokens("float32", "avx2") == cpu_isa._MATMUL_MIN["avx512_f32_avx2_core"]
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX512 | {"avx512_bf16"})
    assert cpu_isa.matmul_min_tokens("bfloat16") == cpu_isa._MATMUL_MIN["avx512_bf16"]
    assert cpu_isa.matmul_min_tokens("bfloat16", "avx512") == cpu_isa._MATMUL_MIN["avx512_bf16_torch"]


# -- sources and builds ------------------------------------------------------------------
def test_the_x86_variants_are_one_source_with_the_panel_kernel_chosen_by_the_target():
    """avx2 and avx512 compile the same driver; the ISA is the micro-kernel header's business
    (ukernel_x86.h chooses by __AVX512F__), never the portable driver's."""
    assert VARIANTS["avx512"].path == VARIANTS["avx2"].path
    driver = VARIANTS["avx2"].path.read_text()
    for isa_specific in ("immintrin.h", "arm_neon.h", "__AVX", "__ARM", "__aarch64__", "_mm256_", "_mm512_"):
        assert isa_specific not in driver, isa_specific
    assert '#include "ukernel.h"' in driver
    assert "#if defined(__AVX512F__)" in (VARIANTS["avx2"].path.parent / "ukernel_x86.h").read_text()
    assert "-mavx512f" in VARIANTS["avx512"].cflags and "-mavx512f" not in VARIANTS["avx2"].cflags


@pytest.mark.parametrize("isa", [name for name, v in VARIANTS.items() if v.arch == "x86_64"])
def test_every_x86_variant_builds(isa):
    if cpu_isa.machine_arch() != "x86_64":
        pytest.skip("x86-64 variants are built on x86-64 machines")
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, build_native

    try:
        path = build_native(isa)
    except NativeUnavailable as exc:
        if "no C compiler" in str(exc):
            pytest.skip(str(exc))
        raise
    assert path.is_file() and path.stat().st_size > 0


# -- every variant this CPU runs, against the reference ---------------------------------
def runnable(isa: str) -> str | None:
    """Why ``isa`` cannot run here, or ``None``."""
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, load_native

    lacks = cpu_isa.missing_flags(VARIANTS[isa])
    if lacks:
        return f"this CPU lacks {', '.join(lacks)}"
    try:
        load_native(isa)
    except NativeUnavailable as exc:
        return str(exc)
    return None


#: how experts are computed: the native core alone, torch's matmul for every expert, or a
#: mix (experts with 5 tokens or more to torch's matmul)
MATMUL = {"native": -1, "matmul": 1, "mixed": 5}
#: every variant on the native core alone; the matmul paths (which do not depend on the
#: variant beyond the experts it keeps) with the variant this CPU picks
VARIANT_PATHS = [(v, "native") for v in VARIANTS] + [(None, "matmul"), (None, "mixed")]


@pytest.fixture(params=VARIANT_PATHS, ids=lambda vp: f"{vp[0] or 'detected'}-{vp[1]}")
def path(request, monkeypatch) -> int:
    """``matmul_tokens`` for the kernel, with MOEFRAME_CPU_ISA set to the variant under test."""
    isa, how = request.param
    if isa is None:
        try:
            isa = cpu_isa.detect()
        except CpuIsaError as exc:
            pytest.skip(str(exc))
    why = runnable(isa)
    if why is not None:
        pytest.skip(f"variant {isa}: {why}")
    monkeypatch.setenv("MOEFRAME_CPU_ISA", isa)
    return MATMUL[how]


def native_kernel(case: KernelCase, **params) -> FusedCpuKernel:
    kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(backend="native", **params))
    return kernel


def check(case: KernelCase, inputs: dict | None = None, seed: int = 0, **params) -> torch.Tensor:
    inputs = inputs or make_case_inputs(case, seed=seed)
    out = native_kernel(case, **params)(**inputs)
    expected = TorchReferenceKernel(kernel_context(case.model()), None)(**inputs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    cmp = compare(out, expected, tolerance_for(case.dtype))
    assert cmp.ok, (case.id, cmp)
    return out


def test_variant_passes_the_conformance_and_scale_sweeps(path, monkeypatch):
    entry = get_registry().get("kernel", "fused_cpu")
    params = FusedCpuParams(backend="native", matmul_tokens=path)
    kernel = FusedCpuKernel(kernel_context(KernelCase("silu", False, False, "float32", 1).model()), params)
    assert kernel.describe()["isa"] == cpu_isa.detect()
    cases = [*kernel_cases(entry), *scale_cases(entry)]
    results = [run_kernel_case(entry, case, params=params) for case in cases]
    assert all(r.ok for r in results), [(r.case.id, r.error or r.comparison) for r in results if not r.ok]


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T", [0, 1, 7, 40, 300])
def test_variant_odd_sizes_biases_and_expert_maps(path, activation, dtype, T):
    case = KernelCase(
        activation, True, T % 2 == 1, dtype, T, num_experts=6, top_k=3, hidden_size=61, intermediate_size=35
    )
    check(case, seed=T, matmul_tokens=path)


def test_variant_with_empty_experts_and_repeated_ids(path):
    case = KernelCase("silu", True, True, "bfloat16", 70, num_experts=8, top_k=3, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case, seed=1)
    inputs["topk_ids"][:, 0] = 2  # local expert 1 gets every token; the other local experts get few or none
    inputs["topk_ids"][:, 1] = 5  # not local
    inputs["topk_ids"][::2, 2] = 2  # the same expert twice for a token (ties broken arbitrarily upstream)
    check(case, inputs, matmul_tokens=path)
    inputs["topk_ids"][:] = 3  # nothing local at all
    assert torch.count_nonzero(native_kernel(case, matmul_tokens=path)(**inputs)) == 0


#: tokens given to one expert, around every boundary of every variant: the decode/prefill
#: switch (7), the partial-panel threshold (9 on avx512), the 16- and 32-token panels, the
#: work items (64 + 16 tokens on avx2, 128 + 32 on avx512) and several items
BOUNDARY_COUNTS = [6, 7, 8, 9, 16, 17, 32, 33, 41, 65, 81, 129, 161]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_variant_token_counts_around_every_boundary(path, dtype):
    """One expert gets ``count`` tokens, the others a few each; H and I are not multiples of
    8 or 16 and the tiles of weight rows do not divide them."""
    if path != MATMUL["native"]:
        pytest.skip("the boundaries are the native core's (torch's matmul takes this expert whole)")
    case = KernelCase("gelu", True, False, dtype, 170, num_experts=5, top_k=2, hidden_size=61, intermediate_size=35)
    g = torch.Generator().manual_seed(7)
    for count in BOUNDARY_COUNTS:
        inputs = make_case_inputs(case, seed=count)
        ids = inputs["topk_ids"]
        for t in range(case.num_tokens):  # expert 0 for the first `count` tokens, never twice
            ids[t] = torch.randperm(case.num_experts - 1, generator=g)[: case.top_k] + 1
            if t < count:
                ids[t, 0] = 0
        check(case, inputs, matmul_tokens=path)


@pytest.mark.parametrize("T", [1, 3, 6])
def test_variant_decode_call_naming_one_expert_several_times_per_token(path, T):
    """A call of fewer than 7 tokens (decode) where every token names the same expert in
    all of its 4 slots: up to 24 pairs for one expert, more than decode's scratch is sized
    for in one work item."""
    case = KernelCase("silu", True, False, "float32", T, num_experts=4, top_k=4, hidden_size=61, intermediate_size=35)
    inputs = make_case_inputs(case, seed=T)
    inputs["topk_ids"][:] = 0
    check(case, inputs, matmul_tokens=path)


def test_variant_with_no_local_experts(path):
    case = KernelCase("silu", False, True, "float32", 5, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    ex = inputs["experts"]
    inputs["experts"] = ExpertWeights(ex.w13[:0], ex.w2[:0], None, None, torch.full((4,), -1, dtype=torch.int32))
    assert torch.count_nonzero(native_kernel(case, matmul_tokens=path)(**inputs)) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_variant_result_does_not_depend_on_threads(path, dtype):
    case = KernelCase("silu", True, False, dtype, 200, num_experts=8, top_k=4, hidden_size=256, intermediate_size=192)
    inputs = make_case_inputs(case, seed=2)
    kernel = native_kernel(case, matmul_tokens=path)
    with torch_threads(1):
        one = kernel(**inputs)
    with torch_threads(max(2, torch.get_num_threads())):
        several = kernel(**inputs)
    assert torch.equal(one, several)
    assert torch.equal(several, kernel(**inputs))


def test_the_matmul_path_checks_ids_and_the_expert_map(path):
    case = KernelCase("silu", False, True, "float32", 40, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    inputs["topk_ids"][3, 1] = 4
    with pytest.raises(ValueError, match=r"expert id outside \[0, 4\)"):
        native_kernel(case, matmul_tokens=path)(**inputs)
    inputs = make_case_inputs(case)
    ex = inputs["experts"]
    inputs["experts"] = ExpertWeights(ex.w13, ex.w2, None, None, torch.tensor([0, -1, 7, -1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expert_map holds a local index outside \[-1, 2\)"):
        native_kernel(case, matmul_tokens=path)(**inputs)


def test_the_matmul_threshold_comes_from_the_param_or_the_cpu_table(monkeypatch):
    case = KernelCase("silu", False, False, "float32", 1)
    kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(matmul_tokens=-1))
    assert kernel.matmul_threshold(torch.float32) is None
    kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(matmul_tokens=9))
    assert kernel.matmul_threshold(torch.bfloat16) == 9
    kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams())
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX2)
    assert kernel.matmul_threshold(torch.float32) is None
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AVX512 | {"amx_bf16"})
    assert kernel.matmul_threshold(torch.bfloat16) == cpu_isa._MATMUL_MIN["amx_bf16"]
