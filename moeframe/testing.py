"""Helpers for testing moeframe and its plugins (used by moeframe's own suite).

``FakeDistributions`` puts tiny plugin distributions on ``sys.path``;
``small_config`` gives a small config dict to build on.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import pytest

__all__ = ["FakeDistributions", "small_config"]


class FakeDistributions:
    """Installs tiny plugin distributions (a dist-info with entry_points.txt) on sys.path."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.syspath_prepend(str(root))

    def add(self, dist: str, version: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
        """``modules``: module name -> source; ``entry_points``: name -> 'module[:attr]'."""
        for module, source in modules.items():
            path = self.root / (module.replace(".", "/") + ".py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
            sys.modules.pop(module, None)
            self.monkeypatch.delitem(sys.modules, module, raising=False)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[moeframe]\n{eps}\n")
        importlib.invalidate_caches()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``; the previous count is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def small_config(**model: Any) -> dict[str, Any]:
    """A small config dict (E=8, K=2, H=32, I=16) in the file format's shape."""
    base = {"num_experts": 8, "top_k": 2, "hidden_size": 32, "intermediate_size": 16}
    base.update(model)
    return {"seed": 0, "model": base, "router": {"name": "softmax_topk"}}


# -- running code on several local ranks (gloo) ----------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives a worker."""
    import os

    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@attrs.frozen
class RankProcess:
    """How one rank's process ended (like ``subprocess.CompletedProcess``): ``returncode``
    is ``None`` for a rank killed at the deadline."""

    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str


def launch_processes(
    world_size: int, argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> list[RankProcess]:
    """Start ``argv`` once per rank with torchrun's variables; wait at most ``timeout`` seconds.

    Returns one :class:`RankProcess` per rank; a rank still running at the deadline is
    killed and gets return code ``None``.
    """
    import subprocess
    import time

    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = rank_environment(rank, world_size, port)
        rank_env.update(env or {})
        procs.append(subprocess.Popen(argv, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            code = None
        results.append(RankProcess(argv, code, out, err))
    return results


def run_on_ranks(
    world_size: int, script: str | Path, function: str, timeout: float = 120.0, **kwargs: Any
) -> list[Any]:
    """Call ``function(**kwargs)`` from the Python file ``script`` on ``world_size`` ranks.

    Each rank initialises the default process group (gloo) from the environment; the
    function's JSON-able return value is collected per rank.  A rank that fails makes this
    raise ``RuntimeError`` with its output.
    """
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"script": str(script), "function": function, "kwargs": kwargs, "out": tmp}))
        results = launch_processes(world_size, [sys.executable, "-m", "moeframe.testing", str(spec)], timeout)
        values = []
        for rank, res in enumerate(results):
            if res.returncode != 0:
                raise RuntimeError(
                    f"rank {rank} exited {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-4000:]}"
                )
            values.append(json.loads((Path(tmp) / f"rank{rank}.json").read_text()))
        return values


def _rank_main(spec_path: str) -> None:
    import datetime
    import importlib.util
    import json
    import os

    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    module_spec = importlib.util.spec_from_file_location("moeframe_rank_script", spec["script"])
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        value = getattr(module, spec["function"])(**spec["kwargs"])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    rank = int(os.environ["RANK"])
    (Path(spec["out"]) / f"rank{rank}.json").write_text(json.dumps(value))


if __name__ == "__main__":
    import sys

    _rank_main(sys.argv[1])
