"""The plugin as users meet it: registration, ``moeframe list``/``run``/``tune``, the
composer's view of its capabilities, the tuner's search and the GPU script's CPU mode."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeframe.cli.main import main
from moeframe.composer import check_stack
from moeframe.config import load_config
from moeframe.errors import StackError
from moeframe.kernels.activations import Activation
from moeframe.plugins import get_registry
from moeframe_triton import _device
from moeframe_triton.configs import MoEConfig, config_file_name, default_config, lookup_config, write_config_file
from moeframe_triton.tune import SearchSpace, tune_layer

PLUGIN_ROOT = Path(__file__).resolve().parent.parent


def test_entry_point_is_installed():
    eps = [ep for ep in importlib.metadata.entry_points(group="moeframe") if ep.value == "moeframe_triton.plugin"]
    assert eps and eps[0].dist is not None and eps[0].dist.name == "moeframe-triton"


def test_registering_does_not_import_triton():
    """Nor the kernel module; nor torch where no GPU device node exists (only this
    plugin loaded: others may import torch themselves)."""
    code = (
        "import sys\n"
        "from moeframe.plugins import get_registry\n"
        "entry = get_registry().get('kernel', 'triton')\n"
        "print(entry.strategy.display_name, 'triton' in sys.modules, 'moeframe_triton.kernel' in sys.modules,\n"
        "      'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MOEFRAME_PLUGINS"] = "moeframe-triton"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    torch_imported = str(_device._gpu_device_nodes())
    assert proc.stdout.split() == ["triton", "(interpreter)", "False", "False", torch_imported]


def test_capabilities_are_declared():
    entry = get_registry().get("kernel", "triton")
    caps = entry.capabilities
    assert str(entry.provider) == "moeframe-triton 0.1.0"
    assert caps.dtypes == frozenset({"float32", "bfloat16", "float16"})
    assert caps.activations == frozenset({"silu", "gelu", "swigluoai"})
    assert caps.devices == frozenset({"cpu"})  # no CUDA here: the interpreter, on CPU tensors
    assert caps.expert_map and caps.biases


def test_composer_refuses_cuda_for_the_interpreter_variant():
    config = load_config("gpt-oss", {"stack.kernel": "triton"})
    check_stack(config, "cpu")
    with pytest.raises(StackError, match=r"does not run on device 'cuda' \(runs on cpu\)"):
        check_stack(config, "cuda")


def test_list_kernel_says_interpreter(capsys):
    assert main(["list", "kernel"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "triton" in ln)
    assert "triton (interpreter)" in line and "moeframe-triton 0.1.0" in line


def test_run_a_preset_with_the_triton_kernel(capsys):
    code = main(["run", "qwen3-moe", "--set", "stack.kernel=triton", "--tokens", "8", "--repeat", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "triton (interpreter)" in out
    assert ": ok" in out.splitlines()[-1]


def test_run_json_reports_an_error_within_tolerance(capsys):
    code = main(
        [
            "run",
            "gpt-oss",
            "--set",
            "stack.kernel=triton",
            "--set",
            "model.dtype=bfloat16",
            "--tokens",
            "4",
            "--repeat",
            "1",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["ok"]
    kernel = next(p for p in result["stack"] if p["kind"] == "kernel")
    assert kernel["name"] == "triton (interpreter)" and kernel["details"] == {"mode": "interpreter"}


def test_tune_without_a_gpu_is_a_one_line_user_error(capsys):
    assert main(["tune", "qwen3-moe", "--set", "stack.kernel=triton", "--batch-sizes", "1,16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA GPU" in err
    assert main(["tune", "qwen3-moe"]) == 2  # the torch kernel has nothing to tune
    err = capsys.readouterr().err.strip()
    assert "kernel 'torch' has nothing to tune" in err and "triton" in err
    assert main(["tune", "qwen3-moe", "--set", "stack.kernel=triton", "--batch-sizes", "0"]) == 2


def test_tuner_search_writes_a_file_the_lookup_reads(tmp_path):
    """The search itself, run through the interpreter with a tiny space (its timings mean
    nothing here; on a GPU ``moeframe tune`` runs the same code)."""
    space = SearchSpace(
        block_m=(16, 32), block_n=(16, 32), block_k=(32,), group_m=(1,), num_warps=(4,), num_stages=(2,)
    )
    found = tune_layer(
        E=4,
        N=16,
        K=32,
        top_k=2,
        dtype="float32",
        activation=Activation("silu"),
        batch_sizes=[1, 8],
        device="cpu",
        space=space,
        reps=1,
    )
    assert set(found) == {1, 8}
    for cfg in found.values():
        assert isinstance(cfg, MoEConfig)
        assert cfg.block_m in space.block_m and cfg.up.block_n in space.block_n and cfg.down.block_k == 32
    path = write_config_file(
        tmp_path / config_file_name(4, 16, 32, "float32", "Test GPU"),
        found,
        E=4,
        N=16,
        K=32,
        dtype="float32",
        device_name="Test GPU",
    )
    hit = lookup_config(6, 4, 16, 32, "float32", "Test GPU", override_dir=tmp_path)
    assert hit == (found[8], path)


def test_search_space_prunes_by_shared_memory_and_size():
    space = SearchSpace()
    for cfg in space.gemms(128, 4096, 7168, "float32", 2):
        assert cfg.num_stages * (128 * cfg.block_k + 2 * cfg.block_k * cfg.block_n) * 4 <= 200 * 1024
    assert all(c.block_n <= 32 for c in space.gemms(16, 16, 4096, "bfloat16", 1))
    assert space.block_ms(8, 256) == [16] and 128 in space.block_ms(4096 * 8, 8)


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", PLUGIN_ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_smoke_mode(tmp_path, capsys):
    gpu_check = _load_gpu_check()
    assert (
        gpu_check.main(
            [
                "--smoke",
                "--out",
                str(tmp_path / "r.md"),
                "--json",
                str(tmp_path / "r.json"),
                "--precision-cost",
                "--tokens",
                "1,16",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    impls: dict[tuple[str, int], set[str]] = {(r["layer"], r["M"]): set() for r in result["rows"]}
    for r in result["rows"]:
        impls[(r["layer"], r["M"])].add(r["impl"])
        assert r["ok"] is True and r["median_s"] > 0 and r["tflops"] > 0 and r["gbps"] > 0
    assert len(impls) == len(gpu_check.SMOKE_LAYERS) * len(gpu_check.SMOKE_TOKENS)
    assert all(v == {"triton", "grouped_mm", "torch"} for v in impls.values())
    assert result["peaks"]["matmul_flops"] > 0 and result["peaks"]["copy_bytes_per_s"] > 0
    checks = {c["check"]: c for c in result["checks"]}
    assert checks["torch.compile(op, fullgraph=True, backend=aot_eager)"]["ok"] is True
    assert checks["CUDA graph (op)"]["ok"] is None  # no CUDA here
    layer = checks["torch.compile(layer, fullgraph=True, backend=aot_eager)"]
    assert layer["ok"] is True or (layer["ok"] is None and "torch kernel does not compile either" in layer["note"])
    precision = [c for c in result["checks"] if c["check"].startswith("precision ")]
    assert precision and all(c["ok"] for c in precision)
    cost = result["intermediate_cost"]
    assert len(cost) == len(gpu_check.SMOKE_LAYERS) * 2 and all(r["fp32_s"] > 0 and r["bf16_s"] > 0 for r in cost)
    table = (tmp_path / "r.md").read_text()
    assert "| layer | E | top_k | H | I | M | impl |" in table and "**FAIL**" not in table
    assert "## What the fp32 intermediates cost" in table
    assert "all checks ok" in capsys.readouterr().out


def test_gpu_script_model_shapes_and_work_model():
    gpu_check = _load_gpu_check()
    names = [layer.name for layer in gpu_check.MODEL_LAYERS]
    assert names == ["Mixtral-8x7B", "Qwen3-30B-A3B", "DeepSeek-V3"]
    assert gpu_check.TOKENS == (1, 16, 64, 256, 1024, 4096)
    layer = gpu_check.Layer("x", 4, 2, 8, 4)
    flops, bytes_ = gpu_check.work(layer, 3, torch.tensor([[0, 1], [1, 2], [0, 2]]))
    assert flops == 2 * 3 * 2 * 3 * 8 * 4
    assert bytes_ == 2 * (3 * (3 * 8 * 4) + 2 * 3 * 8)  # 3 experts hit, input and output
    assert gpu_check.main([]) == 2  # no GPU here: says so rather than timing the interpreter


def test_gpu_script_reports_a_failing_peer_without_stopping(tmp_path, monkeypatch):
    gpu_check = _load_gpu_check()

    def broken(*args, **kwargs):
        raise RuntimeError("grouped_mm unsupported here")

    monkeypatch.setattr(gpu_check, "grouped_mm_moe", broken)
    assert gpu_check.main(["--smoke", "--tokens", "1", "--out", str(tmp_path / "r.md")]) == 0
    table = (tmp_path / "r.md").read_text()
    assert "| grouped_mm | n/a: RuntimeError: grouped_mm unsupported here |" in table
    assert table.count("| triton | ok |") == len(gpu_check.SMOKE_LAYERS)


def test_kernels_compile_for_sm90_and_gemms_are_pipelined():
    """Without a GPU: compile one variant of each kernel to cubin for sm_90, with the
    specialisations a launch gets, and check the 16-bit GEMMs' loads are pipelined."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(PLUGIN_ROOT / "benchmarks" / "compile_check.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all kernels compiled for sm_90" in proc.stdout
    assert proc.stdout.count("pipelined") == 2  # up and down


@pytest.fixture
def fake_gpu_tuning(monkeypatch):
    """`moeframe tune` as on a GPU, with the search replaced by a stub that records the shape."""
    import moeframe_triton.tune as tune_module

    calls: list[dict] = []

    def search(**kwargs):
        calls.append(kwargs)
        return {
            m: default_config(m, kwargs["E"], kwargs["N"], kwargs["K"], kwargs["dtype"]) for m in kwargs["batch_sizes"]
        }

    monkeypatch.setattr(tune_module, "INTERPRETER", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(tune_module, "tune_layer", search)
    return calls


def test_tune_on_a_gpu_tunes_one_ranks_shape_and_writes_the_file(fake_gpu_tuning, tmp_path, capsys):
    # parallel.ep_size unset: the whole layer (it used to fail dividing by None)
    assert (
        main(["tune", "qwen3-moe", "--set", "stack.kernel=triton", "--batch-sizes", "1,16", "--output", str(tmp_path)])
        == 0
    )
    model = load_config("qwen3-moe").model
    assert [(c["E"], c["N"], c["batch_sizes"]) for c in fake_gpu_tuning] == [
        (model.num_experts, model.intermediate_size, [1, 16])
    ]
    assert (
        main(
            [
                "tune",
                "qwen3-moe",
                "--set",
                "stack.kernel=triton",
                "--set",
                "parallel.ep_size=2",
                "--batch-sizes",
                "1",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert fake_gpu_tuning[-1]["E"] == model.num_experts // 2
    assert len(list(tmp_path.glob("E=*.json"))) == 2


def test_tune_refuses_a_bad_output_before_searching(fake_gpu_tuning, tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(["tune", "qwen3-moe", "--set", "stack.kernel=triton", "--output", str(not_a_folder)]) == 2
    assert "--output: cannot create the folder" in capsys.readouterr().err
    model = load_config("qwen3-moe").model
    broken = tmp_path / config_file_name(
        model.num_experts, model.intermediate_size, model.hidden_size, model.dtype, "NVIDIA H200"
    )
    broken.write_bytes(b"\xff\xfe not json")
    assert main(["tune", "qwen3-moe", "--set", "stack.kernel=triton", "--output", str(tmp_path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "is not valid JSON" in err[0]
    assert fake_gpu_tuning == []  # no search was started


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is chosen only without a CUDA device")
def test_the_interpreter_survives_torch_profiler_importing_triton_first():
    """torch.profiler imports triton; registering the kernel first makes that import the
    interpreter's, and a triton imported without it is a clear error, not a broken kernel."""
    script = """
import os, sys, torch
from torch.profiler import ProfilerActivity, profile
import moeframe
if sys.argv[1] == "registry first":
    moeframe.get_registry()
with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
    torch.randn(3)
assert "triton" in sys.modules
layer = moeframe.MoELayer({"model": {"num_experts": 4, "top_k": 2, "hidden_size": 32, "intermediate_size": 16},
                           "router": {"name": "softmax_topk"}, "stack": {"kernel": "triton"}})
x = torch.randn(3, 32)
print(moeframe.compare(layer(x), layer.reference()(x)).ok)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    first = subprocess.run(
        [sys.executable, "-c", script, "registry first"], capture_output=True, text=True, env=env, check=False
    )
    assert first.returncode == 0 and first.stdout.strip() == "True", first.stderr[-2000:]
    late = subprocess.run(
        [sys.executable, "-c", script, "profiler first"], capture_output=True, text=True, env=env, check=False
    )
    assert late.returncode != 0 and "triton was imported before moeframe-triton selected its interpreter" in late.stderr
