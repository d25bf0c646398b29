"""The ``fused_cpu`` kernel against the reference: the conformance kit on both backends,
and the kernel's own paths (decode/prefill thresholds, work items, groups, odd sizes,
empty experts, expert maps, threads)."""

from __future__ import annotations

import re

import pytest
import torch

from moeframe.conformance import KernelCase, check_kernel, kernel_cases, kernel_context, make_case_inputs, run_kernel_case
from moeframe.errors import StackError
from moeframe.kernels import ExpertWeights
from moeframe.kernels.fused_cpu import GROUP_PAIRS, FusedCpuKernel, FusedCpuParams
from moeframe.kernels.torch_reference import TorchReferenceKernel
from moeframe.numerics import compare, tolerance_for
from moeframe.plugins import get_registry
from moeframe.testing import torch_threads

BACKENDS = ["native", "torch"]


def native_available() -> bool:
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, load_native

    try:
        load_native()
    except NativeUnavailable:
        return False
    return True


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "native" and not native_available():
        pytest.skip("the native core cannot be built here")
    return request.param


@pytest.fixture
def native() -> None:
    """Skip a test of the native core where it cannot be built."""
    if not native_available():
        pytest.skip("the native core cannot be built here")


def make(case: KernelCase, backend: str) -> FusedCpuKernel:
    kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(backend=backend))
    assert kernel.backend == backend
    return kernel


def check(case: KernelCase, backend: str, inputs: dict | None = None, seed: int = 0) -> torch.Tensor:
    inputs = inputs or make_case_inputs(case, seed=seed)
    out = make(case, backend)(**inputs)
    expected = TorchReferenceKernel(kernel_context(case.model()), None)(**inputs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    cmp = compare(out, expected, tolerance_for(case.dtype))
    assert cmp.ok, cmp
    return out


def test_conformance_kit_passes():
    results = check_kernel("fused_cpu")
    assert results and all(r.ok for r in results), [r.case.id for r in results if not r.ok]


def test_conformance_kit_passes_on_the_torch_backend():
    entry = get_registry().get("kernel", "fused_cpu")
    results = [run_kernel_case(entry, case, params=FusedCpuParams(backend="torch")) for case in kernel_cases(entry)]
    assert all(r.ok for r in results), [r.case.id for r in results if not r.ok]


def routed_to_expert_zero(case: KernelCase, count: int, seed: int = 0) -> dict:
    """Inputs where expert 0 gets exactly ``count`` tokens (the others share the rest)."""
    inputs = make_case_inputs(case, seed=seed)
    ids = inputs["topk_ids"]
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(case.num_tokens):
        others = torch.randperm(case.num_experts - 1, generator=g)[: case.top_k] + 1
        ids[t] = others
        if t < count:
            ids[t, 0] = 0
    return inputs


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6, 7, 12, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 129])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_and_prefill_thresholds(count, dtype, backend):
    """Counts around the 16-token panel, the 6-token dot chunks and the 64-token work items."""
    case = KernelCase("silu", True, False, dtype, 130, num_experts=6, top_k=2, hidden_size=64, intermediate_size=48)
    check(case, backend, routed_to_expert_zero(case, count))


@pytest.mark.parametrize("activation", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T", [1, 3, 40, 300])
def test_odd_sizes(activation, dtype, T, backend):
    """H and I that are not multiples of 8 or 16 (the vector loops' tails)."""
    case = KernelCase(activation, True, True, dtype, T, num_experts=6, top_k=3, hidden_size=61, intermediate_size=35)
    check(case, backend, seed=T)


def test_large_T_spans_several_groups(backend):
    """More (token, k) pairs than one native call keeps at once."""
    T = GROUP_PAIRS // 2 + 700
    case = KernelCase("gelu", True, False, "bfloat16", T, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    check(case, backend)


def test_empty_experts_and_tokens_on_other_ranks(backend):
    case = KernelCase("silu", False, True, "float32", 33, num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    inputs["topk_ids"][:, 0] = 2  # local expert 1; every other local expert stays empty
    inputs["topk_ids"][:, 1] = 5  # not local (odd experts are elsewhere)
    check(case, backend, inputs)
    inputs["topk_ids"][:, 0] = 3
    out = make(case, backend)(**inputs)
    assert torch.count_nonzero(out) == 0


def test_no_local_experts_and_no_tokens(backend):
    case = KernelCase("silu", False, False, "bfloat16", 0, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    out = make(case, backend)(**make_case_inputs(case))
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16
    case = KernelCase("silu", False, True, "float32", 5, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    ex = inputs["experts"]
    inputs["experts"] = ExpertWeights(ex.w13[:0], ex.w2[:0], None, None, torch.full((4,), -1, dtype=torch.int32))
    assert torch.count_nonzero(make(case, backend)(**inputs)) == 0


def test_non_contiguous_hidden_states_and_int32_ids(backend):
    case = KernelCase("silu", False, False, "float32", 20, num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    x = inputs["hidden_states"]
    inputs["hidden_states"] = x.t().contiguous().t()
    assert not inputs["hidden_states"].is_contiguous()
    inputs["topk_ids"] = inputs["topk_ids"].to(torch.int32)
    check(case, backend, inputs)


def test_native_rejects_ids_out_of_range(native):
    case = KernelCase("silu", False, False, "float32", 4, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    inputs["topk_ids"][1, 1] = 9
    with pytest.raises(ValueError, match="expert id outside"):
        make(case, "native")(**inputs)


def test_native_result_does_not_depend_on_threads(native):
    """Each output element is summed by one thread, in expert order: bitwise reproducible."""
    case = KernelCase("silu", True, False, "float32", 200, num_experts=8, top_k=4, hidden_size=64, intermediate_size=48)
    inputs = make_case_inputs(case)
    kernel = make(case, "native")
    with torch_threads(1):
        one = kernel(**inputs)
    with torch_threads(max(2, torch.get_num_threads())):
        several = kernel(**inputs)
    assert torch.equal(one, several)
    assert torch.equal(several, kernel(**inputs))


def test_backend_falls_back_when_native_is_disabled(monkeypatch):
    monkeypatch.setenv("MOEFRAME_FUSED_CPU_NATIVE", "0")
    case = KernelCase("silu", False, False, "float32", 3, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    with pytest.warns(UserWarning, match="native core unavailable"):
        kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams())
    assert kernel.backend == "torch" and "MOEFRAME_FUSED_CPU_NATIVE" in kernel.describe()["why"]
    with pytest.raises(StackError, match="cannot use its native core here"):
        FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(backend="native"))


def test_layer_with_fused_cpu_matches_reference():
    import moeframe

    layer = moeframe.MoELayer(moeframe.load_config("qwen3-moe", overrides={"stack.kernel": "fused_cpu", "model.dtype": "bfloat16"}))
    x = torch.randn(3, 17, 256).to(torch.bfloat16)
    assert moeframe.compare(layer(x), layer.reference()(x)).ok


def test_scratch_is_kept_between_calls_and_released(native):
    from moeframe.kernels import fused_cpu

    case = KernelCase("silu", False, False, "bfloat16", 40, num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    kernel = make(case, "native")
    kernel.release()
    assert fused_cpu._SCRATCH.kept_bytes == 0
    first = kernel(**inputs)
    kept = fused_cpu._SCRATCH.kept_bytes
    assert kept > 0 and kernel.describe()["kept_scratch_bytes"] == kept
    assert torch.equal(kernel(**inputs), first) and fused_cpu._SCRATCH.kept_bytes == kept
    big = fused_cpu._SCRATCH.take("test-big", fused_cpu.KEPT_BYTES // 4 + 1)
    assert big.numel() == fused_cpu.KEPT_BYTES // 4 + 1 and fused_cpu._SCRATCH.kept_bytes == kept  # not kept
    kernel.release()
    assert fused_cpu._SCRATCH.kept_bytes == 0


@pytest.fixture
def fresh_native_load():
    """`_load` remembers its answer for the process: forget it around a test."""
    from moeframe.kernels import _fused_cpu_native

    _fused_cpu_native._load.cache_clear()
    yield _fused_cpu_native
    _fused_cpu_native._load.cache_clear()


FAKE_CC_WITHOUT_OPENMP = """#!/bin/sh
case "$1" in --version) echo "fakecc 1.0";; *) echo "x.c:1:10: fatal error: omp.h: No such file or directory" >&2; exit 1;; esac
"""


@pytest.mark.parametrize("reason", [
    "setting-off", "disabled", "compiler-does-not-run", "no-compiler", "no-openmp", "unsafe-cache",
    "unsupported-cpu", "forced-isa-unknown", "forced-isa-unsupported",
])
def test_native_core_unavailable_says_why_in_one_line(fresh_native_load, monkeypatch, tmp_path, capsys, reason):
    """Each reason: load_native says it in one line; an 'auto' kernel warns once and runs
    its torch path, which `moeframe explain` shows with the reason; 'native' is an error."""
    from moeframe.cli.main import main
    from moeframe.kernels import cpu_isa

    monkeypatch.setenv("MOEFRAME_CACHE_DIR", str(tmp_path / "cache"))  # nothing built already
    no_cpu = lambda: frozenset({"sse2"})  # noqa: E731
    if reason == "setting-off":
        monkeypatch.setenv("MOEFRAME_FUSED_CPU_NATIVE", "off")
        why = "MOEFRAME_FUSED_CPU_NATIVE='off' is neither 0 (off) nor 1 (on, the default)"
    elif reason == "disabled":
        monkeypatch.setenv("MOEFRAME_FUSED_CPU_NATIVE", "0")
        why = "disabled by MOEFRAME_FUSED_CPU_NATIVE=0"
    elif reason == "compiler-does-not-run":
        monkeypatch.setenv("CC", "/nonexistent/cc")
        why = "C compiler '/nonexistent/cc' does not run"
    elif reason == "no-compiler":
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
        why = "no C compiler found (install gcc, or set CC)"
    elif reason == "no-openmp":
        fake = tmp_path / "fakecc"
        fake.write_text(FAKE_CC_WITHOUT_OPENMP)
        fake.chmod(0o755)
        monkeypatch.setenv("CC", str(fake))
        why = f"compiling fused_cpu-{cpu_isa.detect()} with '{fake}' failed: x.c:1:10: fatal error: omp.h: No such file or directory"
    elif reason == "unsafe-cache":
        (tmp_path / "cache").mkdir(mode=0o777)
        (tmp_path / "cache").chmod(0o777)
        why = "is writable by group or others (mode 0o777): another user could plant code"
    elif reason == "unsupported-cpu":
        monkeypatch.setattr(cpu_isa, "cpu_flags", no_cpu)
        why = "no native variant runs on this CPU"
    elif reason == "forced-isa-unknown":
        monkeypatch.setenv("MOEFRAME_CPU_ISA", "avx9")
        why = "MOEFRAME_CPU_ISA='avx9' is not a CPU variant"
    else:
        monkeypatch.setattr(cpu_isa, "cpu_flags", no_cpu)
        monkeypatch.setenv("MOEFRAME_CPU_ISA", "avx2")
        why = "variant 'avx2' needs avx2, f16c, fma, which this CPU lacks"
    if reason in ("no-openmp",) and cpu_isa.machine_arch() != "x86_64":
        pytest.skip("the CPU check speaks first on this machine")
    with pytest.raises(fresh_native_load.NativeUnavailable, match=re.escape(why)) as info:
        fresh_native_load.load_native()
    assert "\n" not in str(info.value)
    case = KernelCase("silu", False, False, "float32", 3, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    with pytest.warns(UserWarning, match=re.escape(why)) as caught:
        kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams())
    assert len([w for w in caught if "native core unavailable" in str(w.message)]) == 1
    assert kernel.backend == "torch" and kernel.describe()["summary"] == f"torch path: {info.value}"
    with pytest.raises(StackError, match="cannot use its native core here") as refused:
        FusedCpuKernel(kernel_context(case.model()), FusedCpuParams(backend="native"))
    assert "\n" not in str(refused.value) and why in str(refused.value)
    with pytest.warns(UserWarning, match=re.escape(why)):
        code = main(["explain", "qwen3-moe", "--set", "stack.kernel=fused_cpu"])
    out = capsys.readouterr().out
    assert code == 0 and f"fused_cpu (torch path: {info.value})" in out


def test_explain_names_the_native_variant(native, capsys):
    from moeframe.cli.main import main
    from moeframe.kernels._fused_cpu_native import load_native

    assert main(["explain", "qwen3-moe", "--set", "stack.kernel=fused_cpu"]) == 0
    assert f"fused_cpu (native {load_native().isa}" in capsys.readouterr().out


def test_cache_dir_expands_the_home_folder(monkeypatch):
    from pathlib import Path

    from moeframe.kernels._fused_cpu_native import cache_dir

    monkeypatch.setenv("MOEFRAME_CACHE_DIR", "~/moeframe-cache")
    assert cache_dir() == Path.home() / "moeframe-cache"


def test_inputs_the_native_core_does_not_take_are_not_a_silent_slow_path(native):
    """Non-contiguous weights: 'auto' warns once (the reason) and runs the torch path;
    'native' refuses in one line."""
    case = KernelCase("silu", True, False, "float32", 9, num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
    inputs = make_case_inputs(case)
    ex = inputs["experts"]
    inputs["experts"] = ex._replace(w13=ex.w13.transpose(1, 2).contiguous().transpose(1, 2))
    assert not inputs["experts"].w13.is_contiguous()
    kernel = make(case, "native")
    with pytest.raises(ValueError, match="native core does not take these inputs: w13 is not contiguous"):
        kernel(**inputs)
    auto = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams())
    with pytest.warns(UserWarning, match=r"native core does not take these inputs \(w13 is not contiguous"):
        out = auto(**inputs)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = auto(**inputs)  # once per reason
    expected = TorchReferenceKernel(kernel_context(case.model()), None)(**inputs)
    assert compare(out, expected, tolerance_for(case.dtype)).ok and torch.equal(out, again)
