"""The command line: each command, its exit status and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeframe.cli.main import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("moeframe: error: ")
    return lines[0]


def test_plugins_json(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    data = json.loads(out)
    builtin = data["plugins"][0]
    assert builtin["name"] == "moeframe" and builtin["builtin"] and builtin["status"] == "ok"
    assert "torch" in builtin["provides"]["kernel"]
    stats = next(p for p in data["plugins"] if p["name"] == "moeframe-expert-stats")
    assert stats["provides"] == {"wrapper": ["expert_stats"]} and stats["version"] == "0.1.0"
    assert stats["hooks"] == ["register_wrappers"] and data["conflicts"] == []


def test_plugins_text_shows_failed_plugins(capsys, fake_dists):
    fake_dists.add("moeframe-broken", "0.1", {"broken_plugin": "raise RuntimeError('boom')\n"}, {"broken": "broken_plugin"})
    with pytest.warns(Warning):
        code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    assert "moeframe-broken 0.1: failed" in out and "error: import of 'broken_plugin' failed: RuntimeError: boom" in out


def test_list_text_and_json(capsys):
    code, out, _ = run_cli(capsys, "list", "wrapper")
    assert code == 0 and "chunking" in out and "shared_experts" in out and "moeframe-expert-stats 0.1.0" in out
    code, out, _ = run_cli(capsys, "list", "--json")
    entries = json.loads(out)["strategies"]
    assert {e["kind"] for e in entries} == {"router", "kernel", "dispatcher", "runner", "wrapper"}
    torch_kernel = next(e for e in entries if e["kind"] == "kernel" and e["name"] == "torch")
    assert torch_kernel["provider"] == "builtin" and torch_kernel["capabilities"]["dtypes"] == ["bfloat16", "float16", "float32"]
    code, out, _ = run_cli(capsys, "list", "presets")
    assert code == 0 and "qwen3-moe" in out.split()
    code, _, err = run_cli(capsys, "list", "kernal")
    assert code == 2 and "did you mean 'kernel'?" in one_line_error(err)


def test_explain(capsys):
    code, out, _ = run_cli(capsys, "explain", "qwen2-moe", "--json", "--set", 'stack.wrappers[0].params.intermediate_size=64')
    assert code == 0
    data = json.loads(out)
    assert data["config"]["stack"]["wrappers"][0] == {"name": "shared_experts", "params": {"intermediate_size": 64, "gated": True}}
    assert [p["name"] for p in data["stack"]] == ["shared_experts", "default", "softmax_topk", "local", "torch"]
    assert data["stack"][2]["params"] == {"renormalize": False, "weights_dtype": "activation"}
    code, out, _ = run_cli(capsys, "explain", "mixtral")
    assert code == 0 and "model.num_experts = 8" in out and "stack (outermost first)" in out and "workspace" in out


@pytest.mark.parametrize("preset", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "gpt-oss", "llama4"])
def test_run_each_preset(capsys, preset):
    code, out, _ = run_cli(capsys, "run", preset, "--tokens", "16", "--repeat", "2")
    assert code == 0, out
    assert "median" in out and "tokens/s" in out and out.rstrip().endswith("ok")


def test_run_json_shape(capsys):
    code, out, _ = run_cli(capsys, "run", "qwen3-moe", "--tokens", "5", "--repeat", "3", "--seed", "4", "--json",
                           "--set", "model.dtype=bfloat16")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"source", "config", "stack", "device", "dtype", "tokens", "repeat", "times_s", "median_s", "tokens_per_s", "error", "ok"}
    assert data["tokens"] == 5 and len(data["times_s"]) == 3 and data["dtype"] == "bfloat16"
    assert data["config"]["seed"] == 4 and data["error"]["atol"] == 2e-2 and data["ok"] is True


def test_run_zero_tokens(capsys):
    code, out, _ = run_cli(capsys, "run", "deepseek-v3", "--tokens", "0", "--repeat", "1")
    assert code == 0 and "tokens 0" in out


def test_run_exits_1_when_over_tolerance(capsys, fake_dists, tmp_path):
    fake_dists.add("moeframe-wrong", "0.1", {"wrong_kernel_plugin": """
        from moeframe import Strategy, hookimpl
        @hookimpl
        def register_kernels():
            return [Strategy("wrong", "wrong_kernel_impl:Wrong", "off by a little")]
    """, "wrong_kernel_impl": """
        from moeframe.kernels.torch_reference import TorchReferenceKernel
        class Wrong(TorchReferenceKernel):
            def __call__(self, *args):
                return super().__call__(*args) * 1.01
    """}, {"wrong": "wrong_kernel_plugin"})
    out_path = tmp_path / "y.safetensors"
    code, out, _ = run_cli(capsys, "run", "mixtral", "--tokens", "8", "--repeat", "1", "--set", "stack.kernel=wrong",
                           "--output", str(out_path))
    assert code == 1 and "OVER TOLERANCE" in out and "not written" in out
    assert not out_path.exists()  # nothing half-done: no output from a failed check


def test_run_input_output_and_weights(capsys, tmp_path: Path):
    import moeframe

    layer = moeframe.MoELayer("qwen3-moe", overrides={"seed": 11})
    weights = tmp_path / "w.safetensors"
    layer.save_weights(weights)
    x = torch.randn(6, 256)
    save_file({"hidden_states": x}, str(tmp_path / "x.safetensors"))
    code, out, _ = run_cli(capsys, "run", "qwen3-moe", "--weights", str(weights), "--input", str(tmp_path / "x.safetensors"),
                           "--output", str(tmp_path / "y.safetensors"), "--repeat", "1")
    assert code == 0, out
    y = load_file(str(tmp_path / "y.safetensors"))["output"]
    torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "qwen3moe"], r"no config file or preset named 'qwen3moe'; did you mean 'qwen3-moe'\?"),
        (["run", "qwen3-moe", "--set", "stack.wrappers=[{name=\"chunkng\"}]"], r"stack.wrappers\[0\].name: unknown wrapper 'chunkng'; did you mean 'chunking'\?"),
        (["run", "qwen3-moe", "--set", "model.dtype=fp8"], r"model.dtype: 'fp8' is not allowed"),
        (["run", "qwen3-moe", "--set", "stack.kernel"], r"--set expects KEY=VALUE"),
        (["run", "qwen3-moe", "--tokens", "-3"], r"--tokens must be >= 0"),
        (["run", "qwen3-moe", "--weights", "/nonexistent/w.safetensors"], r"weights file '/nonexistent/w.safetensors' not found"),
        (["run", "qwen3-moe", "--input", "/nonexistent/x.safetensors"], r"--input: file '/nonexistent/x.safetensors' not found"),
        (["run", "qwen3-moe", "--device", "cuda"] if not torch.cuda.is_available() else ["run", "qwen3-moe", "--tokens", "-1"], r"no CUDA device|--tokens"),
        (["explain", "/nonexistent/config.toml"], r"config file '/nonexistent/config.toml' not found"),
        (["run", "qwen3-moe", "--tokens", "many"], r"--tokens expects a count or comma-separated counts \(one per DP rank\), got 'many'"),
        (["run", "qwen3-moe", "--repeat", "x"], r"argument --repeat: invalid int value: 'x'"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
        (["check", "torch", "--tokens", "-1"], r"--tokens must be >= 0, got '-1'"),
        (["check", "torch", "--tokens", ","], r"--tokens expects comma-separated integers"),
        (["check", "torch", "--dtype", "fp16"], r"--dtype: unknown dtype 'fp16'; choose from float32, bfloat16, float16"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    import re

    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    _, err = capsys.readouterr()
    line = [ln for ln in err.splitlines() if ln.strip()]
    assert len(line) == 1 and "Traceback" not in err, err
    assert re.search(message, line[0]), line[0]


def test_input_with_the_wrong_shape(capsys, tmp_path: Path):
    save_file({"hidden_states": torch.randn(4, 100)}, str(tmp_path / "x.safetensors"))
    code, _, err = run_cli(capsys, "run", "qwen3-moe", "--input", str(tmp_path / "x.safetensors"))
    assert code == 2 and "tensor 'hidden_states' has shape [4, 100], expected [T, 256]" in one_line_error(err)
    save_file({"states": torch.randn(4, 256)}, str(tmp_path / "z.safetensors"))
    code, _, err = run_cli(capsys, "run", "qwen3-moe", "--input", str(tmp_path / "z.safetensors"))
    assert code == 2 and "has no tensor 'hidden_states' (it has: states)" in one_line_error(err)


def test_check_command(capsys):
    code, out, _ = run_cli(capsys, "check", "torch", "--tokens", "0,3", "--dtype", "float32", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] and data["kernels"][0]["kernel"] == "torch" and data["kernels"][0]["cases"] == 24
    code, _, err = run_cli(capsys, "check", "torchh")
    assert code == 2 and "did you mean 'torch'?" in one_line_error(err)


def test_check_fails_a_kernel_that_no_case_fits(capsys, fake_dists):
    fake_dists.add("moeframe-bf16only", "0.1", {"bf16only_plugin": """
import moeframe
from moeframe.plugins import Capabilities, Strategy

@moeframe.hookimpl
def register_kernels():
    return [Strategy("bf16only", "moeframe.kernels.torch_reference:TorchReferenceKernel", "bf16 only",
                     capabilities=Capabilities(dtypes=frozenset({"bfloat16"})))]
"""}, {"bf16only": "bf16only_plugin"})
    code, out, _ = run_cli(capsys, "check", "bf16only", "--dtype", "float32", "--tokens", "1")
    assert code == 1 and "bf16only: 0/0 cases ok (no case fits the kernel's dtypes; not checked)" in out


def test_console_script_and_module_entry_points():
    exe = Path(sys.executable).parent / "moeframe"
    for argv in ([str(exe), "--version"], [sys.executable, "-m", "moeframe", "--version"]):
        proc = subprocess.run(argv, capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith("moeframe ")
    proc = subprocess.run([sys.executable, "-m", "moeframe", "run", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
