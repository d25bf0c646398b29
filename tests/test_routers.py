"""Routers against the reference math: hand-computed cases, an independent per-token
implementation on tie-free random inputs, and NaN rows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from moeframe.config import ModelConfig, load_config
from moeframe.routers.sigmoid_grouped_topk import SigmoidGroupedTopKParams, SigmoidGroupedTopKRouter
from moeframe.routers.sigmoid_top1 import SigmoidTop1Router
from moeframe.routers.softmax_topk import SoftmaxTopKParams, SoftmaxTopKRouter
from moeframe.routers.topk_softmax import TopKSoftmaxRouter
from moeframe.config import NoParams


def router(cls, params=None, **model):
    base = {"num_experts": 4, "top_k": 2, "hidden_size": 8, "intermediate_size": 4}
    base.update(model)
    ctx = SimpleNamespace(model=ModelConfig(**base))
    return cls(ctx, params if params is not None else getattr(cls, "Params", NoParams)())


def as_sets(ids: torch.Tensor) -> list[set[int]]:
    return [set(row) for row in ids.tolist()]


# -- hand-computed cases -------------------------------------------------------------------
def test_softmax_topk_renormalised_by_hand():
    r = router(SoftmaxTopKRouter, SoftmaxTopKParams(renormalize=True))
    out = r.select(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), {})
    assert out.ids.tolist() == [[2, 1]]
    p = 1 / (1 + math.exp(-1))  # e^3 / (e^3 + e^2)
    torch.testing.assert_close(out.weights, torch.tensor([[p, 1 - p]]))
    assert out.weights.dtype == torch.float32 and not out.weight_on_input


def test_softmax_topk_without_renormalisation_by_hand():
    r = router(SoftmaxTopKRouter, SoftmaxTopKParams(renormalize=False))
    out = r.select(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), {})
    z = sum(math.exp(v) for v in (1, 2, 3, 0))
    torch.testing.assert_close(out.weights, torch.tensor([[math.exp(3) / z, math.exp(2) / z]]))


def test_softmax_topk_weights_cast_to_activation_dtype_for_qwen():
    r = router(SoftmaxTopKRouter, SoftmaxTopKParams(renormalize=True, weights_dtype="activation"), dtype="bfloat16")
    out = r.select(torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.bfloat16), {})
    assert out.weights.dtype == torch.bfloat16
    r32 = router(SoftmaxTopKRouter, SoftmaxTopKParams(renormalize=True), dtype="bfloat16")
    assert r32.select(torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.bfloat16), {}).weights.dtype == torch.float32


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_grouped_topk_bias_chooses_but_does_not_weigh():
    # scores s = [0.9, 0.1, 0.6, 0.7]; bias [0, 0, 0.3, 0] -> biased [0.9, 0.1, 0.9, 0.7]
    # group scores (sum of top 2): g0 = 1.0, g1 = 1.6 -> group 1 wins -> experts {2, 3}
    params = SigmoidGroupedTopKParams(n_group=2, topk_group=1, routed_scaling_factor=2.5, renormalize=True)
    r = router(SigmoidGroupedTopKRouter, params)
    logits = torch.tensor([[_logit(0.9), _logit(0.1), _logit(0.6), _logit(0.7)]])
    out = r.select(logits, {"router.e_score_correction_bias": torch.tensor([0.0, 0.0, 0.3, 0.0])})
    assert as_sets(out.ids) == [{2, 3}]
    got = dict(zip(out.ids[0].tolist(), out.weights[0].tolist()))
    assert got[2] == pytest.approx(0.6 / 1.3 * 2.5, rel=1e-5)  # unbiased score
    assert got[3] == pytest.approx(0.7 / 1.3 * 2.5, rel=1e-5)
    # without a bias the same scores choose the same group ...
    out_nobias = r.select(logits, {"router.e_score_correction_bias": torch.zeros(4)})
    assert as_sets(out_nobias.ids) == [{2, 3}]
    # ... and a bias on expert 1 moves the choice to group 0 (0.9 + 0.6 = 1.5 > 1.3), while the
    # weights stay the unbiased scores 0.9 and 0.1
    out_biased = r.select(logits, {"router.e_score_correction_bias": torch.tensor([0.0, 0.5, 0.0, 0.0])})
    assert as_sets(out_biased.ids) == [{0, 1}]
    got = dict(zip(out_biased.ids[0].tolist(), out_biased.weights[0].tolist()))
    assert got == pytest.approx({0: 0.9 / 1.0 * 2.5, 1: 0.1 / 1.0 * 2.5}, rel=1e-5)


def test_grouped_topk_epsilon_and_no_renormalisation():
    params = SigmoidGroupedTopKParams(n_group=1, topk_group=1, routed_scaling_factor=1.0, renormalize=True)
    r = router(SigmoidGroupedTopKRouter, params)
    # scores ~ 0 everywhere: the 1e-20 epsilon keeps the division finite
    out = r.select(torch.full((1, 4), -200.0), {"router.e_score_correction_bias": torch.zeros(4)})
    assert torch.isfinite(out.weights).all()
    params = SigmoidGroupedTopKParams(n_group=1, topk_group=1, routed_scaling_factor=2.0, renormalize=False)
    r = router(SigmoidGroupedTopKRouter, params)
    out = r.select(torch.tensor([[_logit(0.8), _logit(0.2), _logit(0.5), _logit(0.1)]]), {"router.e_score_correction_bias": torch.zeros(4)})
    got = dict(zip(out.ids[0].tolist(), out.weights[0].tolist()))
    assert got == pytest.approx({0: 1.6, 2: 1.0}, rel=1e-5)


def test_grouped_topk_without_bias_scores_groups_by_max():
    params = SigmoidGroupedTopKParams(n_group=2, topk_group=1, correction_bias=False, routed_scaling_factor=1.0)
    r = router(SigmoidGroupedTopKRouter, params)
    assert [s.name for s in r.weight_specs()] == ["router.weight"]
    # group 0 max 0.95 (sum of two 1.0) vs group 1 max 0.8 (sum 1.5): by max, group 0 wins
    logits = torch.tensor([[_logit(0.95), _logit(0.05), _logit(0.8), _logit(0.7)]])
    out = r.select(logits, {})
    assert as_sets(out.ids) == [{0, 1}]


def test_grouped_topk_logits_are_fp32_from_fp32_inputs():
    r = router(SigmoidGroupedTopKRouter, SigmoidGroupedTopKParams(n_group=2, topk_group=1), dtype="bfloat16")
    x = torch.randn(3, 8).to(torch.bfloat16)
    w = torch.randn(4, 8).to(torch.bfloat16)
    logits = r.logits(x, {"router.weight": w})
    assert logits.dtype == torch.float32 and r.logits_dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ w.float().T)


def test_topk_softmax_by_hand():
    r = router(TopKSoftmaxRouter)
    out = r.select(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), {})
    assert out.ids.tolist() == [[1, 2]]
    p = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(out.weights, torch.tensor([[p, 1 - p]]))
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    torch.testing.assert_close(r.logits(x, {"router.weight": w, "router.bias": b}), x @ w.T + b)


def test_sigmoid_top1_by_hand():
    r = router(SigmoidTop1Router, top_k=1)
    out = r.select(torch.tensor([[0.5, -1.0, 2.0, 0.0]]), {})
    assert out.ids.tolist() == [[2]] and out.weight_on_input
    assert out.weights.item() == pytest.approx(1 / (1 + math.exp(-2.0)))


def test_sigmoid_top1_needs_top_k_1():
    from moeframe.composer import check_stack
    from moeframe.errors import StackError

    config = load_config({"model": {"num_experts": 4, "top_k": 2, "hidden_size": 8, "intermediate_size": 4},
                          "router": {"name": "sigmoid_top1"}})
    with pytest.raises(StackError, match=r"^router: sigmoid_top1 .*needs model.top_k = 1 \(got 2\)$"):
        check_stack(config)


# -- an independent per-token implementation, on tie-free random inputs -------------------
def softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def ref_softmax_topk(logits: torch.Tensor, k: int, renorm: bool):
    out = []
    for row in logits.double().tolist():
        p = softmax_row(row)
        best = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        w = [p[i] for i in best]
        if renorm:
            w = [v / sum(w) for v in w]
        out.append(dict(zip(best, w)))
    return out


def ref_grouped(logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int, scale: float, renorm: bool):
    out = []
    E = logits.shape[1]
    size = E // n_group
    for row in logits.double().tolist():
        s = [1 / (1 + math.exp(-v)) for v in row]
        b = [v + float(bias[i]) for i, v in enumerate(s)]
        groups = [sum(sorted(b[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -groups[g])[:topk_group]
        eligible = [i for i in range(E) if i // size in keep]
        best = sorted(eligible, key=lambda i: -b[i])[:k]
        w = [s[i] for i in best]
        if renorm:
            w = [v / (sum(w) + 1e-20) for v in w]
        out.append({i: v * scale for i, v in zip(best, w)})
    return out


def ref_topk_softmax(logits: torch.Tensor, k: int):
    out = []
    for row in logits.double().tolist():
        best = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        out.append(dict(zip(best, softmax_row([row[i] for i in best]))))
    return out


def check_against(out, expected, tol=1e-5):
    got = [dict(zip(i, w)) for i, w in zip(out.ids.tolist(), out.weights.double().tolist())]
    for g, e in zip(got, expected):
        assert set(g) == set(e)  # ids exact (as sets: the order of the K chosen may differ)
        for key in e:
            assert g[key] == pytest.approx(e[key], abs=tol)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("E", "K"), [(8, 2), (16, 4), (64, 8)])
def test_softmax_topk_matches_per_token_reference(seed, E, K):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(33, E, generator=g)
    for renorm in (True, False):
        r = router(SoftmaxTopKRouter, SoftmaxTopKParams(renormalize=renorm), num_experts=E, top_k=K)
        check_against(r.select(logits, {}), ref_softmax_topk(logits, K, renorm))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_grouped_topk_matches_per_token_reference(seed, scale):
    # vLLM's case: E=16, 8 groups, topk_group 2, topk 2
    g = torch.Generator().manual_seed(seed)
    logits, bias = torch.randn(56, 16, generator=g), torch.randn(16, generator=g) * 0.1
    params = SigmoidGroupedTopKParams(n_group=8, topk_group=2, routed_scaling_factor=scale, renormalize=True)
    r = router(SigmoidGroupedTopKRouter, params, num_experts=16, top_k=2)
    out = r.select(logits, {"router.e_score_correction_bias": bias})
    check_against(out, ref_grouped(logits, bias, 2, 8, 2, scale, True))


@pytest.mark.parametrize("seed", range(3))
def test_topk_softmax_matches_per_token_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(33, 16, generator=g)
    r = router(TopKSoftmaxRouter, num_experts=16, top_k=4)
    check_against(r.select(logits, {}), ref_topk_softmax(logits, 4))


# -- NaN rows -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: router(SoftmaxTopKRouter, num_experts=16, top_k=4),
        lambda: router(SigmoidGroupedTopKRouter, SigmoidGroupedTopKParams(n_group=4, topk_group=2), num_experts=16, top_k=4),
        lambda: router(SigmoidGroupedTopKRouter, SigmoidGroupedTopKParams(n_group=4, topk_group=2, correction_bias=False), num_experts=16, top_k=4),
        lambda: router(TopKSoftmaxRouter, num_experts=16, top_k=4),
        lambda: router(SigmoidTop1Router, num_experts=16, top_k=1),
    ],
    ids=["softmax_topk", "grouped", "grouped-nobias", "topk_softmax", "sigmoid_top1"],
)
def test_nan_row_still_yields_k_distinct_ids(make):
    r = make()
    logits = torch.randn(3, 16)
    logits[1] = float("nan")
    out = r.select(logits, {"router.e_score_correction_bias": torch.zeros(16)})
    K = r.model.top_k
    assert out.ids.shape == (3, K)
    for row in out.ids.tolist():
        assert len(set(row)) == K and all(0 <= i < 16 for i in row)


@pytest.mark.parametrize("T", [0, 1])
def test_routers_handle_zero_and_one_token(T):
    for r in (router(SoftmaxTopKRouter), router(TopKSoftmaxRouter),
              router(SigmoidGroupedTopKRouter, SigmoidGroupedTopKParams(n_group=2, topk_group=1))):
        out = r.select(torch.randn(T, 4), {"router.e_score_correction_bias": torch.zeros(4)})
        assert out.ids.shape == (T, 2) and out.weights.shape == (T, 2)
