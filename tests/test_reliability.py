"""Reliability (issue 11): output files, non-finite results, sizes checked before
allocating, devices, launch environments, and what a new user trips on.

Each test reproduces a case as it was tried: real files (FIFOs, sockets, symbolic links,
read-only folders), real processes (a writer killed with SIGKILL, lone ranks, ranks given
different options) and fake plugin distributions on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeframe
from moeframe.cli.main import main
from moeframe.errors import InputError
from moeframe.numerics import Tolerance, compare, tolerance_for
from moeframe.weights import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def cli(capfd, *argv: str) -> tuple[int, str, str]:
    """Run the command; its warnings are appended to stderr as the command line prints
    them (``moeframe: warning: ...``), each once."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code)
    out, err = capfd.readouterr()
    err += "".join(f"moeframe: warning: {w.message}\n" for w in caught)
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("moeframe: warning:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("moeframe: error: "), lines[0]
    return lines[0]


def run_small(capfd, *extra: str) -> tuple[int, str, str]:
    return cli(capfd, "run", "mixtral", "--tokens", "4", "--repeat", "1", *extra)


# -- 2. output paths ---------------------------------------------------------------------
def _socket_at(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


@pytest.mark.parametrize("kind", ["fifo", "socket", "chardev", "directory"])
def test_output_onto_a_path_that_is_not_a_regular_file_is_refused_before_any_work(capfd, tmp_path, kind):
    target = tmp_path / "y.safetensors"
    keep = None
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "socket":
        keep = _socket_at(target)
    elif kind == "chardev":
        if not IS_ROOT:
            pytest.skip("making a device node (a copy of /dev/null) needs root")
        os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    else:
        target.mkdir()
    mode = os.lstat(target).st_mode
    try:
        code, out, err = run_small(capfd, "--output", str(target))
    finally:
        if keep is not None:
            keep.close()
    expected = {"fifo": "is a FIFO", "socket": "is a socket", "chardev": "is a character device", "directory": "is a directory"}
    assert code == 2 and expected[kind] in one_line_error(err) and "--output" in err
    assert out == ""  # refused before the run: no report
    assert os.lstat(target).st_mode == mode  # the node is untouched


def test_output_through_a_symlink_replaces_its_target_and_keeps_the_link(capfd, tmp_path):
    real = tmp_path / "real.safetensors"
    real.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    code, out, _ = run_small(capfd, "--output", str(link))
    assert code == 0, out
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert load_file(str(real))["output"].shape == (4, 256)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.safetensors", "real.safetensors"]  # no temp left


def test_output_through_a_symlink_to_a_fifo_is_refused(capfd, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "y.safetensors").symlink_to(fifo)
    code, _, err = run_small(capfd, "--output", str(tmp_path / "y.safetensors"))
    assert code == 2 and "is a FIFO" in one_line_error(err) and "the target of the link" in err


def test_unworkable_output_folders_are_refused_before_the_forward(capfd, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (afile / "y.safetensors", "is not a folder"),
        (tmp_path / "missing" / "y.safetensors", "does not exist; create it first"),
    ]
    for target, message in cases:
        code, out, err = run_small(capfd, "--output", str(target))
        assert code == 2 and message in one_line_error(err) and out == "", (target, err)
    assert not (tmp_path / "missing").exists()  # a missing folder is not created


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_read_only_output_folders_are_refused_before_the_forward(capfd, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for target, message in ((ro / "y.safetensors", "is not writable"), (ro / "sub" / "y.safetensors", "does not exist")):
            code, out, err = run_small(capfd, "--output", str(target))
            assert code == 2 and message in one_line_error(err) and out == ""
    finally:
        ro.chmod(0o755)


KILLED_WRITER = """
import os, signal, sys
from moeframe.files import atomic_output
with atomic_output(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_write_leaves_one_temp_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(target))
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before  # the target is intact
    temps = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(temps) == 1 and re.fullmatch(r"\.w\.safetensors\.\d+\..+\.tmp\.safetensors", temps[0]), temps
    save_safetensors({"b": torch.ones(3)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # the stale temp file is gone
    assert torch.equal(load_file(str(target))["b"], torch.ones(3))


def test_a_running_writers_temp_file_is_left_alone(tmp_path):
    target = tmp_path / "w.safetensors"
    mine = tmp_path / f".w.safetensors.{os.getppid()}.abc.tmp.safetensors"  # a live process (our parent)
    mine.write_bytes(b"in progress")
    save_safetensors({"b": torch.ones(1)}, target)
    assert mine.exists()


def test_bench_json_onto_a_fifo_is_refused(capfd, tmp_path):
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)
    code, out, err = cli(capfd, "bench", "mixtral", "--tokens", "1", "--json", str(fifo), "--no-peers")
    assert code == 2 and "--json" in one_line_error(err) and "is a FIFO" in err and out == ""


def test_save_weights_refuses_a_fifo(tmp_path):
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO"):
        moeframe.MoELayer("mixtral").save_weights(fifo)


# -- 3. non-finite values ----------------------------------------------------------------
def _weights_with(tmp_path: Path, name: str, value: float, dtype: torch.dtype | None = None) -> Path:
    layer = moeframe.MoELayer("mixtral")
    tensors = {k: v.detach().clone() for k, v in layer.tensors.items()}
    tensors[name].view(-1)[3] = value
    if dtype is not None:
        tensors[name] = tensors[name].to(dtype)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(("name", "value"), [("router.weight", float("nan")), ("experts.w2", float("inf"))])
def test_non_finite_weights_warn_and_the_run_fails_its_verdict(capfd, tmp_path, name, value):
    weights = _weights_with(tmp_path, name, value)
    out_path = tmp_path / "y.safetensors"
    code, out, err = run_small(capfd, "--weights", str(weights), "--output", str(out_path))
    assert code == 1
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("moeframe: warning:")]
    assert len(warnings_) == 1 and name in warnings_[0] and "NaN or inf" in warnings_[0]
    verdict = out.strip().splitlines()[-2]
    assert verdict.startswith("error vs reference:") and "NON-FINITE OUTPUT" in verdict and "where the input is finite" in verdict
    assert re.search(r"non-finite values \(NaN or inf\): input 0 · output [1-9]", out)
    assert not out_path.exists()
    code, _, err = run_small(capfd, "--weights", str(weights), "--json")
    assert code == 1


def test_strict_weights_flag_and_variable_refuse_non_finite_weights(capfd, tmp_path, monkeypatch):
    weights = _weights_with(tmp_path, "router.weight", float("nan"))
    code, out, err = run_small(capfd, "--weights", str(weights), "--strict-weights")
    assert code == 2 and "router.weight (1)" in one_line_error(err) and out == ""
    monkeypatch.setenv("MOEFRAME_STRICT_WEIGHTS", "1")
    code, _, err = run_small(capfd, "--weights", str(weights))
    assert code == 2 and "MOEFRAME_STRICT_WEIGHTS" in one_line_error(err)
    layer = moeframe.MoELayer("mixtral")
    with pytest.raises(InputError, match="router.weight"):
        layer.load_weights(weights)
    with pytest.warns(UserWarning, match="router.weight"):
        layer.load_weights(weights, strict=False)


def test_non_finite_rows_of_the_input_are_counted_not_blamed(capfd, tmp_path):
    x = torch.randn(5, 256)
    x[2, 7] = float("nan")
    save_file({"hidden_states": x}, str(tmp_path / "x.safetensors"))
    code, out, _ = cli(capfd, "run", "mixtral", "--input", str(tmp_path / "x.safetensors"), "--repeat", "1", "--json")
    data = json.loads(out)
    assert data["nonfinite"]["input"] == 1 and data["nonfinite"]["output"] == 256 and data["nonfinite"]["new"] == 0
    assert code == 0 and data["ok"]


def test_compare_keeps_nan_equal_and_counts_non_finite():
    ref = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    cmp = compare(ref.clone(), ref)
    assert cmp.ok and cmp.nonfinite_output == 2 and cmp.nonfinite_reference == 2 and cmp.nonfinite_new == 0
    out = ref.clone()
    out[0] = float("nan")
    cmp = compare(out, ref)
    assert not cmp.ok and cmp.nonfinite_new == 1 and cmp.max_abs_error == float("inf")
    assert not compare(torch.tensor([float("inf")]), torch.tensor([float("-inf")])).ok


def test_compare_tolerance_is_relative_to_the_output_scale_too():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 32, generator=g) * 1e3
    ref[0, 0] = 1e-3  # a near-zero element among large ones
    close = ref.clone()
    close[0, 0] += 3e-7 * ref.abs().max()  # the summation-order error of a correct fp32 kernel
    assert compare(close, ref, tolerance_for("float32")).ok
    assert not compare(close, ref, Tolerance(atol=1e-4, rtol=1e-4)).ok  # element-wise alone: a false alarm
    wrong = ref.clone()
    wrong[0, 0] += 1e-3 * ref.abs().max()
    assert not compare(wrong, ref, tolerance_for("float32")).ok


NAN_KERNEL = {"nan_kernel_plugin": """
    from moeframe import Strategy, hookimpl
    @hookimpl
    def register_kernels():
        return [Strategy("nanny", "nan_kernel_impl:Nanny", "one NaN")]
""", "nan_kernel_impl": """
    from moeframe.kernels.torch_reference import TorchReferenceKernel
    class Nanny(TorchReferenceKernel):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            if out.numel():
                out.view(-1)[0] = float("nan")
            return out
"""}


def test_check_fails_a_kernel_with_non_finite_output_where_the_reference_is_finite(capfd, fake_dists):
    fake_dists.add("moeframe-nanny", "0.1", NAN_KERNEL, {"nanny": "nan_kernel_plugin"})
    code, out, _ = cli(capfd, "check", "nanny", "--tokens", "0,1", "--dtype", "float32")
    assert code == 1
    assert re.search(r"FAIL .*-T1-.*NaN or inf .*where the reference", out)
    assert "-T0-" not in out  # no output, nothing non-finite


# -- 6. sizes before allocation ----------------------------------------------------------
def test_explain_describes_a_huge_layer_without_allocating_it():
    code = textwrap.dedent("""
        import resource, sys, json
        from moeframe.cli.main import main
        rc = main(["explain", "qwen3-moe", "--set", "model.hidden_size=1000000", "--json"])
        print(json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), file=sys.stderr)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    info = json.loads(proc.stdout)
    assert stats["rc"] == 0 and info["weight_bytes"] > 40 * 2**30
    assert stats["maxrss_kib"] < 2 * 2**20  # far below the 45.9 GiB it describes


@pytest.mark.parametrize(("overrides", "keys"), [
    (["model.hidden_size=1000000000"], "model.hidden_size=1000000000"),
    (["model.intermediate_size=100000000"], "model.intermediate_size=100000000"),
    (["model.num_experts=100000000000000000000"], "model.num_experts=100000000000000000000"),
    (['stack.wrappers=[{name="chunking",params={max_num_tokens=1000000000000}}]'], "stack.wrappers[0].params"),
])
def test_run_refuses_what_cannot_fit_before_allocating(capfd, overrides, keys):
    argv = [a for o in overrides for a in ("--set", o)]
    code, out, err = cli(capfd, "run", "qwen3-moe", "--repeat", "1", *argv)
    line = one_line_error(err)
    assert code == 2 and "needs about" in line and "is available" in line and keys in line and out == ""


def test_run_refuses_too_many_tokens_naming_the_option(capfd):
    code, _, err = cli(capfd, "run", "mixtral", "--tokens", "1000000000000", "--repeat", "1")
    assert code == 2 and "--tokens=1000000000000" in one_line_error(err)
    code, _, err = cli(capfd, "check", "torch", "--tokens", "1000000000000")
    assert code == 2 and "--tokens=1000000000000" in one_line_error(err)


def test_moelayer_refuses_what_cannot_fit():
    with pytest.raises(InputError, match=r"the layer needs about .* model\.hidden_size=1000000000"):
        moeframe.MoELayer("qwen3-moe", overrides={"model.hidden_size": 10**9})


def test_seed_range(capfd):
    code, out, _ = run_small(capfd, "--seed", str(2**63 - 1))
    assert code == 0, out
    code, _, err = run_small(capfd, "--seed", str(2**63))
    assert code == 2 and "--seed must be in 0..2**63-1" in one_line_error(err)
    code, _, err = run_small(capfd, "--seed", "-1")
    assert code == 2


# -- 7. devices, launch environments, files ----------------------------------------------
CUDA_ARGS = [] if torch.cuda.is_available() else [("cuda", "no CUDA device is available here")]


@pytest.mark.parametrize("command", [["run", "mixtral", "--tokens", "1"], ["explain", "mixtral"], ["check", "torch"]])
@pytest.mark.parametrize(("device", "message"), [
    ("bogus", "unknown device 'bogus'"), ("meta", "hold no data"), ("tpu", "'tpu'"), *CUDA_ARGS,
])
def test_one_device_check_for_every_command(capfd, command, device, message):
    code, out, err = cli(capfd, *command, "--device", device)
    assert code == 2 and message in one_line_error(err) and out == ""


def _rank_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env.update(extra)
    return env


def _moeframe(argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeframe", *argv], env=env, capture_output=True, text=True, timeout=timeout)


def test_world_size_without_rank(capfd):
    proc = _moeframe(["run", "deepseek-v3", "--tokens", "2"], _rank_env(WORLD_SIZE="2"))
    assert proc.returncode == 2 and "WORLD_SIZE=2 is set but RANK" in one_line_error(proc.stderr)


def test_a_lone_rank_times_out_in_one_line():
    from moeframe.testing import free_port

    env = _rank_env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = _moeframe(["run", "deepseek-v3", "--tokens", "2", "--set", "parallel.timeout_s=2"], env)
    line = one_line_error(proc.stderr)
    assert proc.returncode == 2 and "rank 0 of 2: the other ranks did not join within parallel.timeout_s = 2 s" in line


@pytest.mark.distributed
def test_repeat_differing_per_rank_is_one_line_on_every_rank():
    from moeframe.testing import free_port

    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-m", "moeframe", "run", "deepseek-v3", "--tokens", "2", "--repeat", repeat],
                         env=_rank_env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank, repeat in ((0, "3"), (1, "2"))
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 2
        assert "--repeat differs between ranks: 3 on rank 0 but 2 on rank 1" in one_line_error(err)


def test_weights_stored_as_integers_or_booleans_are_refused(capfd, tmp_path):
    for dtype in (torch.int32, torch.bool):
        weights = _weights_with(tmp_path, "experts.w13", 0.0, dtype)
        code, out, err = run_small(capfd, "--weights", str(weights))
        line = one_line_error(err)
        assert code == 2 and "'experts.w13' is stored as" in line and "only floating-point tensors" in line


def test_a_conversion_that_loses_range_warns(tmp_path):
    layer = moeframe.MoELayer("mixtral", overrides={"model.dtype": "float16"})
    tensors = {k: v.detach().to(torch.float32) for k, v in layer.tensors.items()}
    tensors["experts.w2"].view(-1)[0] = 1e6  # beyond float16's 65504
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with pytest.warns(UserWarning, match=r"turned finite values into inf: experts\.w2 \(1 values from float32\)"):
        layer.load_weights(tmp_path / "w.safetensors")


def test_extra_tensors_in_the_input_warn(capfd, tmp_path):
    save_file({"hidden_states": torch.randn(3, 256), "attention_mask": torch.ones(3)}, str(tmp_path / "x.safetensors"))
    code, out, err = cli(capfd, "run", "mixtral", "--input", str(tmp_path / "x.safetensors"), "--repeat", "1")
    assert code == 0, err
    assert "moeframe: warning: --input:" in err and "also holds attention_mask; only 'hidden_states' is read" in err


def test_weights_or_input_paths_that_are_directories(capfd, tmp_path):
    for option in ("--weights", "--input"):
        code, out, err = run_small(capfd, option, str(tmp_path))
        assert code == 2 and "is a directory; give a .safetensors file" in one_line_error(err) and out == ""


def test_a_directory_named_like_a_preset_does_not_hide_the_preset(capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mixtral").mkdir()
    code, out, err = cli(capfd, "explain", "mixtral")
    assert code == 0 and "preset:mixtral" in out, err
    code, _, err = cli(capfd, "explain", "./mixtral")
    line = one_line_error(err)
    assert code == 2 and "directory" in line and "did you mean" not in line and "not found" not in line


# -- 9. what a new user trips on ---------------------------------------------------------
def test_nproc_with_a_stack_that_fails_at_build_time_starts_no_process(capfd):
    code, out, err = cli(capfd, "run", str(ROOT / "docs/examples/dp2-chunked.toml"), "--nproc", "2",
                         "--set", "stack.dispatcher=local")
    assert code == 2 and "dispatcher 'local' cannot serve data parallelism" in one_line_error(err) and out == ""


WRONG_KERNEL = {"wrong_kernel_plugin": """
    from moeframe import Strategy, hookimpl
    @hookimpl
    def register_kernels():
        return [Strategy("wrong", "wrong_kernel_impl:Wrong", "off by a little")]
""", "wrong_kernel_impl": """
    from moeframe.kernels.torch_reference import TorchReferenceKernel
    class Wrong(TorchReferenceKernel):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs) * 1.01
"""}


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_tolerance_failure_under_nproc_is_reported_once_without_a_launcher_traceback(capfd, fake_dists, monkeypatch, nproc):
    fake_dists.add("moeframe-wrong", "0.1", WRONG_KERNEL, {"wrong": "wrong_kernel_plugin"})
    monkeypatch.setenv("PYTHONPATH", f"{fake_dists.root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    code, out, err = cli(capfd, "run", "mixtral", "--nproc", nproc, "--tokens", "4", "--repeat", "1",
                         "--set", "stack.kernel=wrong", "--set", "stack.wrappers=[]")
    assert code == 1
    assert "Traceback" not in err and "ChildFailedError" not in err and "moeframe: error" not in err, err
    assert "OVER TOLERANCE" in out
    assert out.count("moeframe run:") == 1  # one report, from rank 0


def test_explain_describes_a_parallel_layout_without_launching(capfd):
    code, out, _ = cli(capfd, "explain", str(ROOT / "docs/examples/dp2-chunked.toml"), "--json")
    assert code == 0
    ranks = json.loads(out)["ranks"]
    assert [(r["rank"], r["dp_rank"], r["ep_rank"], r["local_experts"]) for r in ranks] == [(0, 0, 0, 16), (1, 1, 1, 16)]
    assert ranks[0]["expert_weight_bytes"] == ranks[1]["expert_weight_bytes"] == 16 * 3 * 256 * 128 * 4
    code, out, _ = cli(capfd, "explain", "deepseek-v3", "--nproc", "4")
    assert code == 0 and "layout: 4 ranks" in out and "not launched" in out
    code, _, err = cli(capfd, "explain", "deepseek-v3", "--nproc", "3", "--set", "parallel.ep_size=2")
    assert code == 2 and "must equal the number of ranks" in one_line_error(err)


def test_replacing_wrappers_shows_what_was_dropped_and_appending_keeps_them(capfd):
    code, out, err = cli(capfd, "explain", "qwen2-moe", "--set", "stack.wrappers=[\"chunking\"]", "--json")
    assert code == 0
    assert "moeframe: warning: --set stack.wrappers=" in err and "drops shared_experts" in err
    assert [p["name"] for p in json.loads(out)["stack"]][:1] == ["chunking"]
    code, out, err = cli(capfd, "explain", "qwen2-moe", "--set", "stack.wrappers+=[\"chunking\"]", "--json")
    assert code == 0 and "warning" not in err
    stack = json.loads(out)["stack"]
    assert [p["name"] for p in stack][:2] == ["shared_experts", "chunking"]
    assert stack[0]["params"]["intermediate_size"] == 512  # the preset's parameters are kept
    code, _, err = cli(capfd, "explain", "qwen2-moe", "--set", "model.top_k+=[1]")
    assert code == 2 and "+= appends to a list" in one_line_error(err)


def test_input_rows_and_tokens(capfd, tmp_path):
    save_file({"hidden_states": torch.randn(6, 256)}, str(tmp_path / "x.safetensors"))
    code, _, err = cli(capfd, "run", "mixtral", "--input", str(tmp_path / "x.safetensors"), "--tokens", "128")
    assert code == 2 and "has 6 rows but --tokens is 128; leave out --tokens" in one_line_error(err)
    code, out, _ = cli(capfd, "run", "mixtral", "--input", str(tmp_path / "x.safetensors"), "--repeat", "1")
    assert code == 0 and "tokens 6 " in out


def test_dev_sh_run_installs_only_what_running_needs_and_the_readme_says_what_it_runs():
    text = (ROOT / "dev.sh").read_text()
    branches = dict(re.findall(r"\n  (\w+)\)\n    setup \"([\w,]*)\"", text))
    assert branches["run"] == ""  # the core and the plugins, no extras
    assert set(branches["test"].split(",")) >= {"test", "plot", "peers"}  # the tests compare with transformers
    from moeframe.cli.main import build_parser
    from moeframe.cli.run import DEFAULT_TOKENS

    repeat = build_parser().parse_args(["run", "qwen3-moe"]).repeat
    readme = (ROOT / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start"):readme.index("## What is in the box")]
    assert f"{DEFAULT_TOKENS} tokens" in quick_start and f"{repeat} timed repeats" in quick_start
    assert "--tokens 64 --repeat 3" not in quick_start


def test_a_misspelled_allow_list_name_warns_and_unknown_names_mention_the_list(capfd, monkeypatch, fake_dists):
    fake_dists.add("moeframe-triton-like", "0.1", {"tl_plugin": """
        from moeframe import Strategy, hookimpl
        @hookimpl
        def register_kernels():
            return [Strategy("tl", "moeframe.kernels.torch_reference:TorchReferenceKernel", "a copy")]
    """}, {"tl": "tl_plugin"})
    monkeypatch.setenv("MOEFRAME_PLUGINS", "moeframe-triton-lik")
    code, _, err = cli(capfd, "run", "mixtral", "--tokens", "1", "--set", "stack.kernel=tl")
    assert code == 2
    warning = [ln for ln in err.splitlines() if ln.startswith("moeframe: warning: MOEFRAME_PLUGINS")]
    assert len(warning) == 1 and "'moeframe-triton-lik'" in warning[0] and "did you mean 'moeframe-triton-like'?" in warning[0]
    assert "unknown kernel 'tl'" in one_line_error(err) and "MOEFRAME_PLUGINS allows only moeframe-triton-lik" in err


def test_nproc_checks_the_ranks_memory_together_before_starting_them(capfd):
    code, out, err = cli(capfd, "run", "qwen3-moe", "--nproc", "2", "--set", "model.intermediate_size=30000000")
    line = one_line_error(err)
    assert code == 2 and line.startswith("moeframe: error: run --nproc 2 needs about") and "--nproc=2" in line and out == ""
