"""Expert, data and tensor parallelism on real gloo ranks (local processes)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import moeframe
from moeframe.testing import launch_processes, run_on_ranks

pytestmark = pytest.mark.distributed
SCENARIOS = Path(__file__).with_name("distributed_scenarios.py")
PRESETS = ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "gpt-oss", "llama4"]


def cases_for(world: int, presets: list[str]) -> list[dict]:
    cases = []
    for preset in presets:
        for placement in ("linear", "round_robin"):
            base = {"parallel.placement": placement}
            cases.append({"id": f"{preset}-{placement}-local-dp1", "preset": preset, "tokens": [13],
                          "overrides": {**base, "stack.dispatcher": "local"}})
            for dispatcher in ("allgather_reducescatter", "all2all"):
                cases.append({"id": f"{preset}-{placement}-{dispatcher}-dp1", "preset": preset, "tokens": [13],
                              "overrides": {**base, "stack.dispatcher": dispatcher}})
                cases.append({"id": f"{preset}-{placement}-{dispatcher}-dp2", "preset": preset, "tokens": [11, 0],
                              "overrides": {**base, "stack.dispatcher": dispatcher, "parallel.dp_size": 2}})
        if world == 2:
            # tensor parallelism: each expert's intermediate size split over the two ranks
            cases.append({"id": f"{preset}-tp2", "preset": preset, "tokens": [9],
                          "overrides": {"parallel.tp_size": 2, "stack.dispatcher": "local"}})
    return cases


def check(results: list[list[dict]], world: int) -> None:
    bad = [r for rank in results for r in rank if not r["ok"]]
    assert not bad, bad[:3]
    for rank_results in results:
        for r in rank_results:
            if "-local-" in r["case"] or r["case"].endswith("tp2"):
                # partial output: exactly one all-reduce, done by the layer
                assert not r["output_reduced"] and r["counts"].get("all_reduce_sum") == 1, r
            else:
                assert r["output_reduced"] and "all_reduce_sum" not in r["counts"], r


SHARED_GATED = {"name": "shared_experts", "params": {"intermediate_size": 512, "gated": True}}
CHUNK4 = {"name": "chunking", "params": {"max_num_tokens": 4}}


def lockstep_cases() -> list[dict]:
    wrappers = [CHUNK4, {"name": "shared_experts", "params": {"intermediate_size": 128}}]
    return [
        {"id": f"chunk-{dispatcher}-{tokens}", "preset": "deepseek-v3", "tokens": tokens,
         "overrides": {"stack.dispatcher": dispatcher, "parallel.dp_size": 2, "stack.wrappers": wrappers}}
        for dispatcher in ("all2all", "allgather_reducescatter") for tokens in ([13, 0], [5, 17], [4, 5])
    ]


def reduce_once_cases() -> list[dict]:
    return [
        {"id": "once-shared-outside", "preset": "qwen2-moe", "tokens": [10],
         "overrides": {"stack.wrappers": [SHARED_GATED, CHUNK4], "stack.dispatcher": "local"}},
        {"id": "once-shared-inside", "preset": "qwen2-moe", "tokens": [10],
         "overrides": {"stack.wrappers": [CHUNK4, SHARED_GATED], "stack.dispatcher": "local"}},
        {"id": "once-tp2-shared-inside", "preset": "qwen2-moe", "tokens": [10],
         "overrides": {"stack.wrappers": [CHUNK4, SHARED_GATED], "stack.dispatcher": "local", "parallel.tp_size": 2}},
    ]


@pytest.fixture(scope="module")
def two_ranks() -> list[list[dict]]:
    """One launch of two ranks runs every two-rank case (process start-up is the slow part)."""
    cases = cases_for(2, PRESETS) + lockstep_cases() + reduce_once_cases()
    return run_on_ranks(2, SCENARIOS, "equivalence", timeout=240, cases=cases)


def select(results: list[list[dict]], prefix: str) -> list[list[dict]]:
    return [[r for r in rank if r["case"].startswith(prefix)] for rank in results]


def test_two_ranks_every_preset_dispatcher_placement_and_dp(two_ranks):
    results = [[r for r in rank if not r["case"].startswith(("chunk-", "once-"))] for rank in two_ranks]
    assert len(results[0]) == len(cases_for(2, PRESETS))
    check(results, 2)
    # each rank holds half the experts, disjoint, together all of them
    r0, r1 = (next(r for r in rank if r["case"] == "deepseek-v3-round_robin-all2all-dp1") for rank in results)
    full = moeframe.MoELayer("deepseek-v3").explain()["expert_weight_bytes"]
    assert r0["expert_weight_bytes"] == r1["expert_weight_bytes"] == full // 2
    assert sorted(r0["local_experts"] + r1["local_experts"]) == list(range(32))
    assert r0["local_experts"][:3] == [0, 2, 4]  # round robin
    # a rank with zero tokens took part (dp2 cases: rank 1 had none)
    assert any(r["tokens"] == 0 for r in results[1])


def test_four_ranks():
    results = run_on_ranks(4, SCENARIOS, "equivalence", timeout=180, cases=cases_for(4, ["deepseek-v3", "gpt-oss", "qwen2-moe"]))
    check(results, 4)
    lin = [next(r for r in rank if r["case"] == "deepseek-v3-linear-all2all-dp1") for rank in results]
    assert [r["local_experts"][0] for r in lin] == [0, 8, 16, 24]


def test_dp_with_chunking_runs_in_lockstep(two_ranks):
    results = select(two_ranks, "chunk-")
    assert len(results[0]) == 6
    for rank_results in results:
        for r in rank_results:
            assert r["ok"], r
            assert r["counts"]["all_reduce_max"] == 1  # the iteration count comes from one all-reduce
    for a, b in zip(results[0], results[1]):
        assert a["counts"] == b["counts"], (a, b)  # every rank entered every collective as often


def test_reduce_exactly_once_with_shared_experts_in_both_positions(two_ranks):
    results = select(two_ranks, "once-")
    assert len(results[0]) == 3
    for rank_results in results:
        for r in rank_results:
            assert r["ok"] and r["counts"] == {"all_reduce_sum": 1}, r


def test_config_mismatch_is_reported_on_every_rank():
    results = run_on_ranks(2, SCENARIOS, "config_mismatch", timeout=60, key="model.top_k", values=[4, 3])
    assert results[0] == results[1]
    assert "the config differs between ranks: model.top_k is 4 on rank 0 but 3 on rank 1" in results[0]


FAILING_PLUGIN = """
    from moeframe import Strategy, hookimpl

    @hookimpl
    def register_wrappers():
        return [Strategy("fail_on_rank_1", "failing_impl:FailOnRank1", "raises on rank 1")]
"""
FAILING_IMPL = """
    import torch.distributed as dist
    from moeframe import Wrapper

    class FailOnRank1(Wrapper):
        def forward(self, hidden_states, router_logits):
            if dist.get_rank() == 1:
                raise RuntimeError("injected failure in a plugin wrapper")
            return self.inner.forward(hidden_states, router_logits)
"""


def test_a_raising_rank_makes_the_others_exit_not_hang(tmp_path: Path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "failing_plugin.py").write_text(textwrap.dedent(FAILING_PLUGIN))
    (site / "failing_impl.py").write_text(textwrap.dedent(FAILING_IMPL))
    info = site / "moeframe_failing-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moeframe-failing\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moeframe]\nfailing = failing_plugin\n")
    argv = [sys.executable, "-m", "moeframe", "run", "deepseek-v3", "--tokens", "8", "--repeat", "1",
            "--set", "stack.wrappers=[\"fail_on_rank_1\"]", "--set", "parallel.timeout_s=20"]
    results = launch_processes(2, argv, timeout=60, env={"PYTHONPATH": str(site)})
    assert all(r.returncode is not None for r in results), "a rank hung"  # none was killed at the deadline
    assert results[1].returncode == 1 and "injected failure in a plugin wrapper" in results[1].stderr  # a bug keeps its traceback
    assert results[0].returncode == 1
    line = [ln for ln in results[0].stderr.splitlines() if ln.startswith("moeframe: error:")]
    assert line and "rank 0: a collective failed" in line[0] and "another rank probably failed first" in line[0]


def test_torchrun_style_run_of_the_deepseek_preset():
    """What `torchrun --nproc-per-node 2 -m moeframe run deepseek-v3` runs on each rank."""
    argv = [sys.executable, "-m", "moeframe", "run", "deepseek-v3", "--tokens", "12", "--repeat", "2", "--json"]
    results = launch_processes(2, argv, timeout=120)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr + results[1].stderr
    data = json.loads(results[0].stdout)
    assert results[1].stdout == ""  # rank 0 reports for everyone
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and all(r["ok"] for r in data["ranks"])
    assert data["parallel"]["ep_size"] == 2 and "all2all" in {part["name"] for part in data["stack"]}


def test_nproc_launches_torchrun(capfd):
    from moeframe.cli.main import main

    code = main(["run", str(Path(__file__).parents[1] / "docs/examples/dp2-chunked.toml"), "--nproc", "2",
                 "--tokens", "40,0", "--repeat", "1", "--json"])
    assert code == 0
    data = json.loads(capfd.readouterr().out)  # rank 0's report, for both ranks
    assert [(r["rank"], r["tokens"], r["ok"]) for r in data["ranks"]] == [(0, 40, True), (1, 0, True)]


@pytest.mark.parametrize("argv, env, message", [
    (["--nproc", "0"], {}, "--nproc must be >= 1, got 0"),
    (["--nproc", "2", "--tokens", "1,2,3"], {}, "--tokens has 3 counts but there are 2 DP ranks"),
    (["--nproc", "2", "--repeat", "0"], {}, "--repeat must be >= 1, got 0"),
    (["--nproc", "2", "--tokens", "4,x"], {}, "--tokens expects a count or comma-separated counts"),
    (["--nproc", "2"], {"WORLD_SIZE": "2"}, "leave out --nproc under torchrun"),
    (["--np", "2"], {}, "unrecognized arguments: --np 2"),
])
def test_nproc_refuses_bad_options_before_launching(capfd, monkeypatch, argv, env, message):
    from moeframe.cli.main import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        code = main(["run", str(Path(__file__).parents[1] / "docs/examples/dp2-chunked.toml"), *argv])
    except SystemExit as exc:  # usage errors from the argument parser
        code = exc.code
    assert code == 2
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0] and out == "", err  # one line, and no rank was started


def test_nproc_validates_before_launching(capsys):
    from moeframe.cli.main import main

    code = main(["run", "qwen3-moe", "--nproc", "3", "--set", "parallel.ep_size=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ep_size (2) * tp_size (1) must equal the number of ranks, but the world has 3 ranks" in err


def test_one_process_refuses_a_multi_rank_config(capsys):
    from moeframe.cli.main import main

    assert main(["run", "qwen3-moe", "--set", "parallel.ep_size=2"]) == 2
    assert "launch with torchrun (or `moeframe run --nproc N`)" in capsys.readouterr().err
