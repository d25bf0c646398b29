"""``moeframe bench``: the command on a tiny config, its JSON, its refusals, and the pieces
(memory accounting, targets, Markdown, peers).  No timing is asserted."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeframe.cli.main import main
from moeframe_bench.limits import MachineLimits

TINY = """
seed = 0
[model]
num_experts = 8
top_k = 2
hidden_size = 32
intermediate_size = 16
[router]
name = "softmax_topk"
weights_dtype = "activation"
[stack]
kernel = "fused_cpu"
"""

WRONG_KERNEL = """
import torch
from moeframe import hookimpl, Strategy, Kernel

class HalfKernel(Kernel):
    def __call__(self, hidden_states, topk_weights, topk_ids, experts):
        from moeframe.kernels.torch_reference import TorchReferenceKernel
        return 0.5 * TorchReferenceKernel.__call__(self, hidden_states, topk_weights, topk_ids, experts)

@hookimpl
def register_kernels():
    return [Strategy("half", HalfKernel, "computes half of the right answer")]
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def fixed_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the limit measurements (seconds each) where a test does not look at them."""

    def fake(dtypes, repeat=3):
        names = ["float32", *dtypes]
        return MachineLimits(
            dict.fromkeys(names, 1e11), {d: {"256x256x256 a@b": 1e11} for d in names}, 2e10, {"float32": 2e10}, 1
        )

    monkeypatch.setattr("moeframe_bench.measure.measure_limits", fake)
    # the read probe (also the cache flush before every timed call): small in tests
    monkeypatch.setattr("moeframe_bench.limits.READ_BYTES", 1024 * 1024)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["bench", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moeframe: error: ") and "Traceback" not in err, err
    return lines[0]


def test_bench_smoke_json_shape(capsys, tiny, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, _ = run(
        capsys,
        str(tiny),
        "--tokens",
        "1,4",
        "--repeat",
        "2",
        "--dtype",
        "float32",
        "--kernels",
        "fused_cpu,torch",
        "--no-peers",
        "--json",
        str(out_json),
    )
    assert code == 0, out
    assert "Results, float32" in out and "Targets" in out
    data = json.loads(out_json.read_text())
    assert data["ok"] is True and data["dtypes"] == ["float32"] and data["tokens"] == [1, 4]
    assert set(data["limits"]["gemm_flops"]) == {"float32"} and data["limits"]["read_bytes_per_s"] > 0
    probes = {p["tokens"]: p for p in data["limit_probes"]}
    assert set(probes) == {1, 4} and all(
        p["gemm_flops_per_s"] > 0 and p["read_bytes_per_s"] > 0 for p in probes.values()
    )
    rows = {(r["tokens"], r["impl"]): r for r in data["results"]}
    assert set(rows) == {(t, i) for t in (1, 4) for i in ("fused_cpu", "torch", "stack")}
    for row in rows.values():
        assert row["ok"] is True and row["error"]["ok"] is True and row["samples"] == 2
        assert row["median_s"] > 0 and row["flops_per_s"] > 0 and row["bytes_per_s"] > 0
        probe = probes[row["tokens"]]
        assert row["flops_fraction"] == pytest.approx(row["flops_per_s"] / probe["gemm_flops_per_s"])
        assert row["bandwidth_fraction"] == pytest.approx(row["bytes_per_s"] / probe["read_bytes_per_s"])
        assert row["flops_fraction_of_best"] == pytest.approx(
            row["flops_per_s"] / data["limits"]["gemm_flops"]["float32"]
        )
        assert row["flops_per_s"] == pytest.approx(2 * row["tokens"] * 2 * 3 * 32 * 16 / row["median_s"])
    names = [t["name"] for t in data["targets"]]
    assert "fused_cpu decode float32" in names and "fused_cpu prefill float32" in names
    prefill = next(t for t in data["targets"] if t["name"] == "fused_cpu prefill float32")
    assert prefill["met"] is None  # no T >= 512 measured
    assert not list(tmp_path.glob(".bench.json*"))  # the atomic write left no temp file
    # the machine and what each kernel ran on it are recorded with the result
    from moeframe.kernels import cpu_isa

    machine = data["machine"]
    assert machine["cpu"] == cpu_isa.cpu_model() and machine["arch"] == cpu_isa.machine_arch()
    assert machine["native_variants"] == cpu_isa.supported() and machine["torch_cpu_capability"]
    assert set(machine["isa_flags"]) <= cpu_isa.cpu_flags()
    fused = data["kernel_details"]["fused_cpu"]["float32"]
    assert fused["backend"] in ("native", "torch") and fused["summary"]
    if fused["backend"] == "native":
        assert fused["isa"] == cpu_isa.detect() and f"native {fused['isa']}" in out
    assert f"machine: {cpu_isa.cpu_model()} ({cpu_isa.machine_arch()};" in out


def test_bench_refuses_a_kernel_that_disagrees(capsys, tiny, tmp_path, fake_dists, fixed_limits):
    fake_dists.add("moeframe-half", "0.1", {"half_kernel": WRONG_KERNEL}, {"half": "half_kernel"})
    out_json = tmp_path / "bench.json"
    code, out, err = run(
        capsys,
        str(tiny),
        "--tokens",
        "2",
        "--repeat",
        "1",
        "--kernels",
        "half,fused_cpu",
        "--no-peers",
        "--json",
        str(out_json),
    )
    assert code == 1
    assert "disagrees" in err and "DISAGREES" not in out  # not timed, so no timed row claims a check
    data = json.loads(out_json.read_text())
    half = next(r for r in data["results"] if r["impl"] == "half")
    assert half["ok"] is False and "median_s" not in half and "disagrees" in half["skipped"]
    assert data["ok"] is False
    assert next(r for r in data["results"] if r["impl"] == "fused_cpu")["ok"] is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "abc"], "--tokens expects comma-separated integers"),
        (["--tokens", "1,-4"], "--tokens must be >= 0"),
        (["--tokens", ","], "--tokens expects comma-separated integers"),
        (["--tokens", "1,16,1"], "--tokens lists a value twice"),
        (["--kernels", ","], "--kernels expects comma-separated names"),
        (["--dtype", ","], "--dtype expects comma-separated names"),
        (["--budget", "-1"], "--budget must be a positive number of seconds"),
        (["--budget", "nan"], "--budget must be a positive number of seconds"),
        (["--chunk", "0"], "--chunk must be >= 1, got 0"),
        (["--memory-tokens", "0"], "--memory-tokens must be >= 1, got 0"),
        (["--json", "."], "--json: '.' is a directory"),
        (["--plot", "."], "--plot: '.' is a directory"),
        (["--plot", "/nonexistent/dir/x.png"], "--plot: folder '/nonexistent/dir' does not exist"),
        (["--kernels", "nosuch"], "unknown kernel 'nosuch'"),
        (["--dtype", "float64"], "--dtype: unknown dtype 'float64'"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--json", "/nonexistent/dir/x.json"], "--json: folder '/nonexistent/dir' does not exist"),
        (["--markdown", "/nonexistent.md"], "--markdown: file"),
    ],
)
def test_bench_bad_input_is_one_line_and_status_2(capsys, tiny, argv, message):
    code, out, err = run(capsys, str(tiny), *argv)
    assert code == 2
    assert message in one_line_error(err)
    assert out == ""


def test_bench_unknown_config_is_status_2(capsys):
    code, _, err = run(capsys, "no-such-preset")
    assert code == 2 and "no config file or preset" in one_line_error(err)


def test_interpreter_kernels_are_left_out_by_default(fake_dists):
    from moeframe_bench.measure import default_kernels

    fake_dists.add(
        "moeframe-slow",
        "0.1",
        {
            "slow_kernel": """
from moeframe import hookimpl, Strategy
@hookimpl
def register_kernels():
    return [Strategy("slowpoke", "moeframe.kernels.torch_reference:TorchReferenceKernel", "", variant="interpreter")]
"""
        },
        {"slow": "slow_kernel"},
    )
    names = default_kernels()
    assert "fused_cpu" in names and "torch" in names and "slowpoke" not in names


def test_markdown_section_is_replaced(capsys, tiny, tmp_path, fixed_limits):
    doc = tmp_path / "perf.md"
    doc.write_text("# Perf\n\nbefore\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nafter\n")
    code, _, _ = run(capsys, str(tiny), "--tokens", "1", "--repeat", "1", "--no-peers", "--markdown", str(doc))
    assert code == 0
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Perf\n\nbefore") and text.endswith("after\n")
    assert "| T | implementation |" in text and "### Targets" in text
    doc.write_text("no markers here\n")
    code, out, err = run(capsys, str(tiny), "--tokens", "1", "--repeat", "1", "--no-peers", "--markdown", str(doc))
    assert code == 2 and "no '<!-- bench:begin -->'" in one_line_error(err)
    assert doc.read_text() == "no markers here\n" and out == ""  # refused before any work


def test_plot_is_written(capsys, tiny, tmp_path, fixed_limits):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    code, _, _ = run(capsys, str(tiny), "--tokens", "0,1,2", "--repeat", "1", "--no-peers", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_extra_bytes_integrates_allocations_and_frees():
    from moeframe_bench.memory import peak_extra_bytes

    def work():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(2000, 1000)  # 8 MB: 12 MB held here, the peak
        del a
        c = torch.empty(500, 1000)  # 2 MB: 10 MB held
        return b, c

    work()
    peak, net, _ = peak_extra_bytes(work)
    assert peak == 12_000_000 and net == 10_000_000


def _result(kernel_rows, peer_rows=(), overhead=None):
    base = {"config": {"stack": {"kernel": "k"}}, "dtypes": ["float32"], "peers": {}}
    rows = [{"dtype": "float32", "impl": "k", "kind": "kernel", "ok": True, **r} for r in kernel_rows]
    rows += [{"dtype": "float32", "impl": "hf-eager", "kind": "peer", "ok": True, **r} for r in peer_rows]
    return {**base, "results": rows, **({"overhead": overhead} if overhead else {})}


def test_targets_met_and_not_met():
    from moeframe_bench.targets import evaluate_targets

    result = _result(
        [
            {"tokens": 1, "median_s": 1.0, "bandwidth_fraction": 0.7, "flops_fraction": 0.01},
            {"tokens": 16, "median_s": 2.0, "bandwidth_fraction": 0.6, "flops_fraction": 0.1},
            {"tokens": 512, "median_s": 3.0, "bandwidth_fraction": 0.1, "flops_fraction": 0.9},
            {"tokens": 1024, "median_s": 4.0, "bandwidth_fraction": 0.1, "flops_fraction": 0.84},
        ],
        [{"tokens": t, "median_s": s} for t, s in ((1, 2.0), (16, 2.5), (512, 2.9), (1024, 9.0))],
    )
    targets = {t["name"]: t for t in evaluate_targets(result)}
    assert targets["k prefill float32"]["met"] is False and targets["k prefill float32"]["measured"] == "0.84"
    assert targets["k decode float32"]["met"] is False and targets["k decode float32"]["measured"] == "0.60"
    assert targets["k vs transformers float32"]["met"] is False  # 3.0 / 2.9 at T=512
    result["results"][2]["median_s"] = 2.0
    result["results"][1]["bandwidth_fraction"] = 0.66
    result["results"][3]["flops_fraction"] = 0.86
    targets = {t["name"]: t for t in evaluate_targets(result)}
    assert all(targets[n]["met"] for n in ("k prefill float32", "k decode float32", "k vs transformers float32"))


def test_overhead_targets():
    from moeframe_bench.targets import evaluate_targets

    overhead = {
        "runner": {"ratio": 1.01, "paired_ratio": 1.0, "median_s": [1.01e-3, 1e-3]},
        "chunking": {"chunk": 1024, "points": [{"tokens": 1, "ratio": 1.02}, {"tokens": 1024, "ratio": 1.04}]},
        "import": {"ratio": 0.02, "registry_ratio": 0.05, "median_s": {"import moeframe": 0.05, "import torch": 2.5}},
        "triton": {"registered": True, "imported_on_register": False, "imported_on_first_use": True},
    }
    targets = {t["name"]: t for t in evaluate_targets(_result([], overhead=overhead))}
    assert targets["runner overhead (T=1)"]["met"] is True
    assert (
        targets["chunking (1024) overhead"]["met"] is False
        and targets["chunking (1024) overhead"]["measured"] == "1.040"
    )
    assert targets["import time"]["met"] is True
    assert targets["triton plugin registration"]["met"] is True


def test_compare_alternating_reports_both_sides():
    from moeframe_bench.overhead import compare_alternating

    calls = []
    result = compare_alternating(
        lambda i: calls.append(("a", i)), lambda i: calls.append(("b", i)), rounds=6, batches=3, warmup=1
    )
    assert result["rounds"] == 6 and len(result["median_s"]) == 2 and result["ratio"] > 0
    assert calls[6:8] == [("a", 0), ("b", 0)] and calls[8:10] == [("b", 1), ("a", 1)]


def test_runner_overhead_checks_equality_and_reports(tmp_path):
    from moeframe.config import load_config
    from moeframe_bench.overhead import runner_overhead

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    result = runner_overhead(load_config(path), rounds=4, batches=2)
    assert result["tokens"] == 1 and result["kernel"] == "fused_cpu" and result["ratio"] > 0


def test_chunking_memory_is_measured_with_and_without_wrapper(tmp_path):
    from moeframe.config import load_config
    from moeframe_bench.memory import forward_memory

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    report = forward_memory(load_config(path), num_tokens=512, chunk=64)
    stacks = {v["stack"]: v for v in report["variants"]}
    assert set(stacks) == {"no wrappers", "chunking (64)"}
    for v in stacks.values():
        assert v["peak_extra_bytes"] >= report["output_bytes"]  # the output is allocated during the forward
    assert stacks["chunking (64)"]["workspace_bytes"] > 0 and stacks["no wrappers"]["workspace_bytes"] == 0


class TestPeers:
    @pytest.fixture(autouse=True)
    def _needs_transformers(self):
        pytest.importorskip("transformers")

    @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
    def test_peers_agree_with_the_reference(self, dtype):
        from moeframe.layer import MoELayer
        from moeframe.numerics import compare, tolerance_for
        from moeframe_bench.peers import build_peers

        layer = MoELayer(TINY_CONFIG(dtype))
        peers, why = build_peers(layer.config, layer.tensors)
        assert why is None and [p.name for p in peers] == ["hf-eager", "hf-grouped_mm", "hf-batched_mm"]
        x = torch.randn(9, 32).to(layer.config.model.torch_dtype)
        reference = layer.reference()
        with torch.inference_mode():
            expected = reference(x)
            for peer in peers:
                assert peer.block.experts.gate_up_proj.data_ptr() == layer.tensors["experts.w13"].data_ptr()
                assert compare(peer.forward(x), expected, tolerance_for(dtype)).ok, peer.name
                router = layer.stack.router
                w, ids, _ = router.select(router.logits(x, layer.tensors), layer.tensors)
                assert compare(peer.experts(x, w, ids), expected, tolerance_for(dtype)).ok, peer.name

    def test_unsupported_configs_say_why(self):
        from moeframe.config import load_config
        from moeframe_bench.peers import build_peers

        config = load_config("gpt-oss")
        peers, why = build_peers(config, {})
        assert peers == [] and why is not None and "swigluoai" in why


def TINY_CONFIG(dtype: str):
    import tomllib

    from moeframe.config import load_config

    data = tomllib.loads(TINY)
    data["model"]["dtype"] = dtype
    return load_config(data)


def test_bench_without_transformers_says_so(capsys, tiny, monkeypatch, fixed_limits):
    import moeframe_bench.peers as peers

    monkeypatch.setattr(peers, "transformers_version", lambda: None)
    code, out, _ = run(capsys, str(tiny), "--tokens", "1", "--repeat", "1")
    assert code == 0 and "peers skipped: transformers is not installed" in out
    assert not any(line.split()[1:2] == ["hf-eager"] for line in out.splitlines() if line.strip())


def test_last_level_cache_is_read_from_sysfs(tmp_path):
    from moeframe_bench.limits import last_level_cache_bytes

    for name, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "491520K"), ("index9", "junk")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    (tmp_path / "index4").mkdir()  # no size file: skipped
    assert last_level_cache_bytes(tmp_path) == 491520 * 1024
    assert last_level_cache_bytes(tmp_path / "missing") is None


def test_every_timed_call_follows_a_cache_flush():
    from moeframe_bench.measure import _Impl, _time_rounds

    events: list[str] = []

    def runner(name: str) -> Callable[[int], torch.Tensor]:
        def run(b: int) -> torch.Tensor:
            events.append(f"{name}{b}")
            return torch.zeros(())

        return run

    impls = [_Impl(name, "kernel", run=runner(name), check=dict) for name in ("a", "b")]
    times = _time_rounds(impls, batches=2, rounds=3, budget_s=1e9, flush=lambda: events.append("flush"))
    assert events == ["flush", "a0", "flush", "b0", "flush", "a1", "flush", "b1", "flush", "a0", "flush", "b0"]
    assert [len(v) for v in times.values()] == [3, 3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "abc"], "is not a comma-separated list of integers"),
        (["--tokens", "16,0"], "every token count must be at least 1"),
        (["--repeat", "-2"], "is not a positive integer"),
        (["--dtype", "int8"], "invalid choice"),
    ],
)
def test_per_core_script_refuses_bad_options_in_one_line(capsys, argv, message):
    from moeframe_bench.per_core import main as per_core

    with pytest.raises(SystemExit) as exc:
        per_core(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
