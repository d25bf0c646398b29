"""moeframe's pytest plugin (``moeframe.pytest_plugin``) and the conformance kit behind it:
registered as a ``pytest11`` entry point, the plugin guide's example run as a test file,
and each kind's kit catching a strategy that breaks the contract (fake distributions)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moeframe.conformance_kit import Unsupported, conformance_cases

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugin-guide.md"


def guide_example() -> str:
    """The python block of the guide's "Testing your plugin" section."""
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("## Testing your plugin"):]
    section = section[: section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)\n```", section, re.S).group(1)


def run_inner(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    """``source`` as a test file, run by pytest in a new process (the plugin loaded from its
    entry point, as in an author's suite; in-process runs would re-import triton)."""
    pytester.makepyfile(test_inner=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args, timeout=300)


def test_entry_point_is_registered():
    eps = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.value == "moeframe.pytest_plugin"]
    assert eps and eps[0].name == "moeframe" and eps[0].dist.name == "moeframe"


def test_loading_the_plugin_imports_neither_torch_nor_moeframe():
    code = "import sys, moeframe.pytest_plugin; print(sorted(m for m in ('torch', 'moeframe.config') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_guide_example_runs(pytester):
    """The guide's example, as a test file: every case a test, all passing or skipped."""
    result = run_inner(pytester, guide_example(), "-rs")
    outcomes = result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()[-3000:]
    assert outcomes.get("passed", 0) > 40 and not outcomes.get("failed")
    ids = result.stdout.str()
    assert "test_dispatcher_conforms" not in ids or "FAILED" not in ids


def test_marker_parametrizes_one_test_per_case(pytester):
    result = run_inner(pytester, """
        import pytest

        @pytest.mark.moeframe_conformance(kind="router", name="topk_softmax", reference="topk_softmax", dtypes=("float32",))
        def test_router(moeframe_case):
            moeframe_case.check()
    """, "--collect-only")
    out = result.stdout.str()
    assert result.ret == 0, out
    for case in ("shapes-T0", "shapes-T33", "nan-row", "ties", "per-token", "reference"):
        assert f"test_router[topk_softmax-float32-{case}]" in out
    assert "8 tests collected" in out


@pytest.mark.parametrize(("marker", "message"), [
    ('kind="kernal", name="torch"', "unknown kind 'kernal'; the kit checks kernel, router, wrapper, dispatcher"),
    ('kind="kernel", name="torhc"', "did you mean 'torch'"),
    ('kind="kernel"', "needs kind= and name="),
    ('kind="router", name="softmax_topk", refrence="softmax_topk"', "unknown option(s) refrence"),
])
def test_marker_misuse_is_one_collection_error(pytester, marker, message):
    result = run_inner(pytester, f"""
        import pytest

        @pytest.mark.moeframe_conformance({marker})
        def test_it(moeframe_case):
            moeframe_case.check()
    """)
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error
    assert f"test_inner.py::test_it: " in out and message in out
    assert "pluggy" not in out and "Traceback" not in out


def test_unknown_router_reference_is_refused():
    with pytest.raises(ValueError, match=r"unknown reference 'mixtral'; use one of softmax_topk, topk_softmax"):
        conformance_cases("router", "softmax_topk", reference="mixtral")


def test_marked_test_without_the_argument_is_a_collection_error(pytester):
    result = run_inner(pytester, """
        import pytest

        @pytest.mark.moeframe_conformance(kind="router", name="softmax_topk")
        def test_it():
            pass
    """)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "takes the argument `moeframe_case`" in result.stdout.str()


def test_fixture_runs_the_whole_kit(moeframe_conformance):
    """The fixture, here in moeframe's own suite (the plugin is loaded by its entry point)."""
    counts = moeframe_conformance.check("router", "sigmoid_top1", reference="sigmoid_top1", model={"top_k": 1})
    assert counts == {"passed": 16, "skipped": 0}


# -- each kind's kit fails a strategy that breaks the contract -----------------------------------
KERNEL_16BIT_H = """
import torch
import torch.nn.functional as F
from moeframe import Capabilities, Strategy, hookimpl
from moeframe.kernels import Kernel, apply_activation


class Fp16Intermediates(Kernel):
    \"\"\"The reference math, but h and the per-pair outputs rounded to the activation dtype.\"\"\"

    def __call__(self, hidden_states, topk_weights, topk_ids, experts):
        out = torch.zeros(hidden_states.shape, dtype=torch.float32)
        for t in range(hidden_states.shape[0]):
            for k in range(topk_ids.shape[1]):
                e = int(topk_ids[t, k])
                if experts.expert_map is not None:
                    e = int(experts.expert_map[e])
                    if e < 0:
                        continue
                b13 = None if experts.b13 is None else experts.b13[e].float()
                b2 = None if experts.b2 is None else experts.b2[e].float()
                gu = F.linear(hidden_states[t].float(), experts.w13[e].float(), b13)
                h = apply_activation(gu, self.activation).to(hidden_states.dtype).float()
                y = (F.linear(h, experts.w2[e].float(), b2) * topk_weights[t, k].float()).to(hidden_states.dtype)
                out[t] += y.float()
        return out.to(hidden_states.dtype)


@hookimpl
def register_kernels():
    caps = Capabilities(dtypes=("float16",), activations=("silu",), biases=False, expert_map=False)
    return [Strategy("fp16_h", Fp16Intermediates, "rounds h", caps)]
"""


def test_kernel_kit_catches_16_bit_intermediates(fake_dists):
    """Issue 11's Triton defect, reproduced in a plugin: fine at the usual scale, but fp16
    intermediates overflow in the scale sweep where the reference is finite."""
    fake_dists.add("moeframe-fp16h", "0.1", {"fp16h_plugin": KERNEL_16BIT_H}, {"fp16h": "fp16h_plugin"})
    outcomes = {}
    for case in conformance_cases("kernel", "fp16_h", token_counts=(1, 7)):
        try:
            case.run()
            outcomes[case.id] = "ok"
        except AssertionError as exc:
            outcomes[case.id] = str(exc)
    assert outcomes["silu-nobias-nomap-float16-T7-E8K2"] == "ok"
    failed = {k: v for k, v in outcomes.items() if v != "ok"}
    assert set(failed) == {"silu-nobias-nomap-float16-T16-E8K2-x200"}
    assert "output values are NaN or inf where the reference's are finite" in failed[
        "silu-nobias-nomap-float16-T16-E8K2-x200"]


ROUTERS = """
import torch
from moeframe import Strategy, hookimpl
from moeframe.routers import Router, TopKOutput


class Greedy(Router):
    \"\"\"softmax top-k, but NaN rows give expert 0 K times and the weights are not renormalised.\"\"\"

    def select(self, logits, weights):
        p = torch.softmax(logits.float(), -1)
        w, ids = torch.topk(torch.nan_to_num(p, nan=0.0), self.model.top_k, dim=-1)
        ids = torch.where(torch.isnan(p).any(-1, keepdim=True), torch.zeros_like(ids), ids)
        return TopKOutput(w, ids)


class Batched(Router):
    \"\"\"Chooses by the logit minus the batch's mean: a token's experts depend on the others.\"\"\"

    def select(self, logits, weights):
        x = logits.float()
        centred = torch.nan_to_num(x - torch.nan_to_num(x).mean(0, keepdim=True), nan=-float("inf"))
        w, ids = torch.topk(torch.softmax(centred, -1), self.model.top_k, dim=-1)
        return TopKOutput(w / w.sum(-1, keepdim=True), ids)


@hookimpl
def register_routers():
    return [Strategy("greedy", Greedy, "broken on NaN"), Strategy("batched", Batched, "not per token")]
"""


def _failures(kind: str, name: str, **options) -> dict[str, str]:
    out = {}
    for case in conformance_cases(kind, name, **options):
        try:
            case.run()
        except AssertionError as exc:
            out[case.id] = str(exc)
        except Unsupported:
            pass
    return out


def test_router_kit_catches_nan_rows_wrong_weights_and_batch_dependence(fake_dists):
    fake_dists.add("moeframe-bad-routers", "0.1", {"bad_routers": ROUTERS}, {"bad_routers": "bad_routers"})
    greedy = _failures("router", "greedy", reference="softmax_topk", dtypes=("float32",))
    assert set(greedy) == {"greedy-float32-nan-row", "greedy-float32-reference"}
    assert "are not 4 distinct experts" in greedy["greedy-float32-nan-row"]
    assert "the reference gives" in greedy["greedy-float32-reference"]
    batched = _failures("router", "batched", dtypes=("float32",))
    assert set(batched) == {"batched-float32-per-token"}
    assert "must route each token on its own" in batched["batched-float32-per-token"]


WRAPPERS = """
from moeframe import Strategy, Wrapper, hookimpl


class Doubles(Wrapper):
    \"\"\"Claims to be transparent, but doubles the output.\"\"\"

    def forward(self, hidden_states, router_logits):
        return self.inner.forward(hidden_states, router_logits) * 2


class ReducesItself(Wrapper):
    \"\"\"All-reduces the inner output itself, without saying its output is reduced.\"\"\"

    def __init__(self, inner, context, params):
        super().__init__(inner, context, params)
        self.parallel = context.parallel

    def forward(self, hidden_states, router_logits):
        out = self.inner.forward(hidden_states, router_logits)
        return self.parallel.collectives.all_reduce(out) if self.parallel.world_size > 1 else out


@hookimpl
def register_wrappers():
    return [Strategy("doubles", Doubles, "not transparent"), Strategy("reduces_itself", ReducesItself, "twice")]
"""


def test_wrapper_kit_catches_a_false_transparent_and_a_second_reduction(fake_dists):
    fake_dists.add("moeframe-bad-wrappers", "0.1", {"bad_wrappers": WRAPPERS}, {"bad_wrappers": "bad_wrappers"})
    doubles = _failures("wrapper", "doubles")
    assert "doubles-T1" in doubles and "differs from the reference stack" in doubles["doubles-T1"]
    assert "doubles-T0" not in doubles  # nothing to double
    reduces = _failures("wrapper", "reduces_itself")
    assert set(reduces) == {"reduces_itself-reduce-once-ep2"}
    assert "exactly one all_reduce_sum per forward" in reduces["reduces_itself-reduce-once-ep2"]


def test_non_transparent_wrapper_is_checked_against_the_authors_reference():
    """``shared_experts`` (not transparent) against its formula: routed + shared(x)."""
    import torch.nn.functional as F

    def shared_formula(x, inner, layer):
        t = dict(layer.named_parameters())
        gate, up = F.linear(x, t["shared.w13"]).chunk(2, -1)
        return inner(x) + F.linear(F.silu(gate) * up, t["shared.w2"])

    params = {"intermediate_size": 24}
    cases = conformance_cases("wrapper", "shared_experts", params=params, reference=shared_formula)
    for case in [c for c in cases if c.id in ("shared_experts-T7", "shared_experts-outside-chunking-T5")]:
        case.run()
    wrong = conformance_cases("wrapper", "shared_experts", params=params,
                              reference=lambda x, inner, layer: shared_formula(x, inner, layer) * 1.5)
    with pytest.raises(AssertionError, match=r"shared_experts-T7: differs from reference\(x, inner, layer\)"):
        next(c for c in wrong if c.id == "shared_experts-T7").run()


@pytest.mark.distributed
def test_dispatcher_kit_round_trip_over_two_ranks(moeframe_conformance):
    """``local`` serves expert parallelism (a partial output, all-reduced once by the layer)
    and refuses data parallelism: those cases are skipped, with the reason."""
    cases = {c.id: c for c in conformance_cases("dispatcher", "local")}
    cases["local-ep2-dp1-linear-T7"].run()
    cases["local-ep2-dp1-T0"].run()
    with pytest.raises(Unsupported, match="cannot serve data parallelism"):
        cases["local-ep2-dp2-T5+0"].run()
    assert moeframe_conformance.check("dispatcher", "local") == {"passed": 3, "skipped": 2}
