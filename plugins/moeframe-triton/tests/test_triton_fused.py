"""The fused kernel against the ``torch`` reference kernel (through Triton's interpreter)."""

from __future__ import annotations

import itertools

import pytest
import torch

from moeframe.conformance import KernelCase, make_case_inputs
from moeframe.kernels.activations import Activation
from moeframe.kernels.torch_reference import reference_moe
from moeframe.numerics import compare, tolerance_for
from moeframe_triton import _triton as rt
from moeframe_triton.configs import GemmConfig, MoEConfig
from moeframe_triton.fused_moe import fused_moe

ACTIVATIONS = ("silu", "gelu", "swigluoai")
TOKENS = (1, 3, 33, 64)
EXPERTS = (4, 8)
TOPK = (1, 2, 3)
DTYPES = ("float32", "bfloat16")
#: every combination of dtype, activation, biases and expert map (24)
COMBOS = list(itertools.product(DTYPES, ACTIVATIONS, (False, True), (False, True)))
FACTORS = (TOKENS, EXPERTS, TOPK, DTYPES, ACTIVATIONS, (False, True), (False, True))


def run_case(
    case: KernelCase, seed: int = 0, config: MoEConfig | None = None, transform=None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The triton kernel's and the reference kernel's outputs on the conformance inputs."""
    inputs = make_case_inputs(case, seed=seed)
    if transform is not None:
        inputs = transform(inputs)
    model = case.model()
    expected = reference_moe(**inputs, activation=Activation.from_model(model))
    e = inputs["experts"]
    out = fused_moe(
        inputs["hidden_states"],
        inputs["topk_weights"],
        inputs["topk_ids"],
        e.w13,
        e.w2,
        e.b13,
        e.b2,
        activation=Activation.from_model(model),
        expert_map=e.expert_map,
        config=config,
    )
    return out, expected, inputs


def assert_matches(case: KernelCase, out: torch.Tensor, expected: torch.Tensor, inputs: dict) -> None:
    assert out.shape == expected.shape and out.dtype == expected.dtype, case.id
    if out.numel():
        assert all(out.data_ptr() != t.data_ptr() for t in (inputs["hidden_states"], inputs["topk_weights"]))
    cmp = compare(out, expected, tolerance_for(case.dtype))
    assert cmp.ok, f"{case.id}: max abs error {cmp.max_abs_error:.3e} (atol {cmp.tolerance.atol})"


def _pairs(case: tuple) -> set[tuple]:
    return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(case), 2)}


def covering_cases() -> list[tuple]:
    """One case per combination in COMBOS, its (m, E, topk) chosen greedily (first best,
    deterministic) to meet value pairs not met yet: with 24 cases every pair of values of
    any two factors is met (checked below).  The full product (576) is too slow for the
    interpreter; a pairwise-complete set finds the interaction faults that matter."""
    covered: set[tuple] = set()
    cases = []
    for combo in COMBOS:
        candidates = [(m, e, k, *combo) for m in TOKENS for e in EXPERTS for k in TOPK]
        best = max(candidates, key=lambda c: len(_pairs(c) - covered))
        covered |= _pairs(best)
        cases.append(best)
    return cases


CASES = covering_cases()


def test_cases_meet_every_pair_of_values():
    wanted = {
        (i, a, j, b) for (i, fa), (j, fb) in itertools.combinations(enumerate(FACTORS), 2) for a in fa for b in fb
    }
    met = set().union(*(_pairs(c) for c in CASES))
    assert wanted <= met
    assert {c[3:] for c in CASES} == set(COMBOS)


@pytest.mark.parametrize(
    "m,num_experts,topk,dtype,activation,bias,expert_map",
    CASES,
    ids=[
        f"m{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-{c[4]}-{'bias' if c[5] else 'nobias'}-{'map' if c[6] else 'nomap'}"
        for c in CASES
    ],
)
def test_fused_matches_reference(m, num_experts, topk, dtype, activation, bias, expert_map):
    case = KernelCase(activation, bias, expert_map, dtype, m, num_experts=num_experts, top_k=topk)
    out, expected, inputs = run_case(case, seed=m * 7 + num_experts + topk)
    assert_matches(case, out, expected, inputs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_zero_tokens(dtype):
    """m = 0 for every activation, bias and map: an empty result in the dtype."""
    for activation, bias, expert_map in itertools.product(ACTIVATIONS, (False, True), (False, True)):
        for num_experts, topk in itertools.product(EXPERTS, TOPK):
            case = KernelCase(activation, bias, expert_map, dtype, 0, num_experts=num_experts, top_k=topk)
            assert_matches(case, *run_case(case))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_float16(activation):
    case = KernelCase(activation, True, activation == "gelu", "float16", 17, num_experts=8, top_k=3)
    assert_matches(case, *run_case(case, seed=5))


CONFIGS = {
    # several K steps with a K tail (H = 72), N tails (I = 40), swizzle groups
    "bm16-tails-swizzle": MoEConfig(16, GemmConfig(16, 32, group_m=4), GemmConfig(32, 16, group_m=2)),
    "bm32-wide": MoEConfig(32, GemmConfig(32, 16, group_m=1), GemmConfig(16, 64, group_m=8)),
}


@pytest.mark.parametrize("name,dtype", [("bm16-tails-swizzle", "float32"), ("bm32-wide", "bfloat16")])
def test_fused_with_explicit_configs(name, dtype):
    """Tiles smaller than the dimensions: K loops with masked tails, wrapped N columns."""
    case = KernelCase(
        "silu" if dtype == "float32" else "swigluoai",
        True,
        name == "bm32-wide",
        dtype,
        24,
        num_experts=8,
        top_k=2,
        hidden_size=72,
        intermediate_size=40,
    )
    assert_matches(case, *run_case(case, seed=11, config=CONFIGS[name]))


def test_zero_tokens_launches_nothing(monkeypatch):
    launches = []
    monkeypatch.setattr(rt, "launch", lambda kernel, grid, *a, **kw: launches.append(kernel))
    case = KernelCase("silu", True, True, "bfloat16", 0)
    inputs = make_case_inputs(case)
    e = inputs["experts"]
    out = fused_moe(
        inputs["hidden_states"],
        inputs["topk_weights"],
        inputs["topk_ids"],
        e.w13,
        e.w2,
        e.b13,
        e.b2,
        activation=Activation("silu"),
        expert_map=e.expert_map,
    )
    assert launches == []
    assert out.shape == (0, case.hidden_size) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("topk,launches_expected", [(1, 3), (2, 4)])
def test_launches_per_call(monkeypatch, topk, launches_expected):
    """One align launch (few pairs), up, down, and the sum only when top_k > 1."""
    names = []
    real = rt.launch

    def record(kernel, grid, *a, **kw):
        names.append(kernel.fn.__name__)
        real(kernel, grid, *a, **kw)

    monkeypatch.setattr(rt, "launch", record)
    case = KernelCase("silu", False, False, "float32", 5, top_k=topk)
    assert_matches(case, *run_case(case))
    assert len(names) == launches_expected
    assert names[:3] == ["_align_place_kernel", "_moe_up_kernel", "_moe_down_kernel"]


def test_no_local_expert_gives_zeros():
    def all_remote(inputs):
        e = inputs["experts"]
        ids = inputs["topk_ids"]
        emap = torch.full_like(e.expert_map, -1)
        emap[0] = 0  # expert 0 is local, but no token goes there
        ids = torch.where(ids == 0, torch.ones_like(ids) * 7, ids)
        ids[:, 1] = torch.where(ids[:, 0] == 7, torch.full_like(ids[:, 1], 5), ids[:, 1])
        return {**inputs, "topk_ids": ids, "experts": e._replace(expert_map=emap)}

    case = KernelCase("gelu", True, True, "float32", 9)
    out, expected, inputs = run_case(case, transform=all_remote)
    assert (inputs["topk_ids"] != 0).all()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(expected, torch.zeros_like(expected))


def test_deterministic_and_fresh_output():
    case = KernelCase("silu", True, False, "bfloat16", 33, top_k=3)
    first, _, _ = run_case(case)
    second, _, _ = run_case(case)
    assert torch.equal(first, second)
    assert first.data_ptr() != second.data_ptr() and first.is_contiguous()


def test_strided_hidden_states_and_int32_ids():
    def strided(inputs):
        x = inputs["hidden_states"]
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return {**inputs, "hidden_states": wide[:, ::2], "topk_ids": inputs["topk_ids"].to(torch.int32)}

    case = KernelCase("silu", False, True, "float32", 7)
    out, expected, inputs = run_case(case, transform=strided)
    assert not inputs["hidden_states"].is_contiguous()
    assert_matches(case, out, expected, inputs)


def test_mismatched_shapes_are_refused():
    case = KernelCase("silu", False, False, "float32", 3)
    inputs = make_case_inputs(case)
    e = inputs["experts"]
    with pytest.raises(ValueError, match=r"w2 has shape"):
        fused_moe(
            inputs["hidden_states"],
            inputs["topk_weights"],
            inputs["topk_ids"],
            e.w13,
            e.w2[:, :-1],
            activation=Activation("silu"),
        )
    with pytest.raises(ValueError, match=r"convert at load time"):
        fused_moe(
            inputs["hidden_states"],
            inputs["topk_weights"],
            inputs["topk_ids"],
            e.w13.half(),
            e.w2.half(),
            activation=Activation("silu"),
        )


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_precision_sweep_matches_the_reference():
    """The conformance kit's scale sweep (inputs at std 10-200, a gate 1000x larger): ``h``
    and the per-pair outputs stay fp32, so bf16 and fp16 agree with the fp32 reference, and
    the output is finite wherever the reference's is (fp16 at scale 200 overflows in a
    few places in the reference itself)."""
    from moeframe.conformance import scale_cases
    from moeframe.plugins import get_registry

    entry = get_registry().get("kernel", "triton")
    cases = list(scale_cases(entry))
    assert {c.dtype for c in cases} == {"float32", "bfloat16", "float16"}
    overflowing = 0
    for case in cases:
        out, expected, inputs = run_case(case)
        finite = torch.isfinite(expected)
        overflowing += int((~finite).sum())
        assert torch.isfinite(out)[finite].all(), f"{case.id}: non-finite output where the reference is finite"
        assert_matches(case, out, expected, inputs)
    assert overflowing > 0  # the sweep reaches fp16's range


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_intermediates_are_fp32(dtype):
    """``h`` and the per-pair outputs are fp32 whatever the activation dtype; the result is
    in the activation dtype."""
    from moeframe_triton.fused_moe import route_blocks, run_down, run_sum, run_up

    case = KernelCase("silu", True, False, dtype, 5, top_k=2)
    inputs = make_case_inputs(case)
    e = inputs["experts"]
    routed = route_blocks(inputs["topk_weights"], inputs["topk_ids"], 16, case.num_experts)
    h = run_up(inputs["hidden_states"], e.w13, e.b13, routed, GemmConfig(32, 64), Activation("silu"))
    y = run_down(h, e.w2, e.b2, routed, GemmConfig(64, 32))
    out = run_sum(y, case.num_tokens, case.top_k, inputs["hidden_states"].dtype)
    assert h.dtype == torch.float32 and y.dtype == torch.float32 and out.dtype == inputs["hidden_states"].dtype
    expected = reference_moe(**inputs, activation=Activation("silu"))
    assert compare(out, expected, tolerance_for(dtype)).ok


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_fp16_split_keeps_h_beyond_the_fp16_range():
    """An ``h`` far above 65504 (a large gate) whose output is back in fp16's range after
    a small routed weight: finite and within tolerance, as in the reference."""
    case = KernelCase("silu", False, False, "float16", 4, top_k=1, gate_scale=300.0)

    def small_weights(inputs):
        x = inputs["hidden_states"] * 40
        return {**inputs, "hidden_states": x, "topk_weights": torch.full_like(inputs["topk_weights"], 1e-3)}

    out, expected, inputs = run_case(case, transform=small_weights)
    gate_up = torch.einsum("th,eih->tei", inputs["hidden_states"].float(), inputs["experts"].w13.float())
    assert gate_up.abs().amax() ** 2 > 65504  # h = silu(gate) * up overflows fp16 somewhere
    assert torch.isfinite(expected).all() and torch.isfinite(out).all()
    assert_matches(case, out, expected, inputs)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.moeframe_conformance(kind="kernel", name="triton", dtypes=("float16",), token_counts=(1, 7))
def test_conformance_kit_float16(moeframe_case):
    """moeframe's pytest plugin: the kit's fp16 cases and fp16 scale sweep (the core's
    test_kernels runs fp32 and bf16 for every kernel; fp16 is slow through the interpreter)."""
    moeframe_case.check()
