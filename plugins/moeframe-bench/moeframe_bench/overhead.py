"""What the framework adds: runner plumbing, the chunking wrapper, import time.

Every comparison runs its two sides alternately in one loop (A, B, B, A, ...) over the
same inputs, so that load from other processes falls on both, and reports the ratio of
the medians (and, as a check, the median of the per-round ratios).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moeframe.config import Config
from moeframe.runners.default import DefaultRunner, route

__all__ = ["compare_alternating", "runner_overhead", "chunking_overhead", "import_overhead", "triton_laziness"]


def compare_alternating(
    a: Callable[[int], Any], b: Callable[[int], Any], rounds: int, batches: int, warmup: int = 2
) -> dict[str, Any]:
    """Time ``a(i)`` and ``b(i)`` alternately (``i`` cycles over ``batches`` inputs)."""
    for i in range(warmup * batches):
        a(i % batches)
        b(i % batches)
    ta: list[float] = []
    tb: list[float] = []
    for r in range(rounds):
        i = r % batches
        order = (a, b) if r % 2 == 0 else (b, a)
        for fn in order:
            start = time.perf_counter()
            fn(i)
            elapsed = time.perf_counter() - start
            (ta if fn is a else tb).append(elapsed)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {
        "median_s": [ma, mb],
        "ratio": ma / mb,
        "paired_ratio": statistics.median(x / y for x, y in zip(ta, tb, strict=True)),
        "rounds": rounds,
    }


def _seeded(num_tokens: int, hidden: int, dtype: torch.dtype, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_tokens, hidden, generator=g).to(dtype) for _ in range(count)]


def runner_overhead(config: Config, num_tokens: int = 1, rounds: int = 400, batches: int = 8) -> dict[str, Any]:
    """``default`` runner + ``local`` dispatcher (no wrappers) against calling the kernel
    directly with the same routing.

    Both sides start from the same router logits and both run the router's selection, so
    the ratio is the runner's and dispatcher's plumbing alone.
    """
    from moeframe.layer import MoELayer

    plain = config.evolve({"stack.runner": "default", "stack.dispatcher": "local", "stack.wrappers": []})
    layer = MoELayer(plain)
    tensors = layer.tensors
    router, kernel = layer.stack.router, layer.stack.kernel
    runner = layer.stack.runner
    assert isinstance(runner, DefaultRunner)  # stack.runner = "default" above
    experts = runner.experts()  # the default runner's, as it hands them to the kernel
    xs = _seeded(num_tokens, plain.model.hidden_size, plain.model.torch_dtype, batches, plain.seed + 1)
    with torch.inference_mode():
        logits = [router.logits(x, tensors) for x in xs]

        def direct(i: int) -> torch.Tensor:
            return kernel(*route(router, xs[i], logits[i], tensors), experts)

        def through_runner(i: int) -> torch.Tensor:
            return layer.stack.forward(xs[i], logits[i])

        if not torch.equal(direct(0), through_runner(0)):
            raise RuntimeError("the runner and the direct kernel call disagree")
        result = compare_alternating(through_runner, direct, rounds, batches)
    result.update({"tokens": num_tokens, "kernel": plain.stack.kernel.name, "dtype": plain.model.dtype})
    return result


def chunking_overhead(
    config: Config, chunk: int, tokens: Sequence[int], rounds: Callable[[int], int], batches: int = 4
) -> dict[str, Any]:
    """``chunking`` with ``max_num_tokens = chunk`` (>= every T) against no wrapper."""
    from moeframe.layer import MoELayer
    from moeframe.plugins import get_registry

    if "chunking" not in get_registry().names("wrapper"):
        return {"skipped": "wrapper 'chunking' is not registered (see `moeframe list wrapper`)"}
    plain = config.evolve({"stack.wrappers": []})
    chunked = config.evolve({"stack.wrappers": [{"name": "chunking", "params": {"max_num_tokens": chunk}}]})
    layer_plain = MoELayer(plain)
    layer_chunked = MoELayer(chunked)
    # one set of weights for both layers (the same memory, not a copy): decode reads its
    # weights from memory, and two copies could sit in memory that is not equally fast
    plain_tensors = layer_plain.tensors
    for name, tensor in layer_chunked.tensors.items():
        tensor.data = plain_tensors[name].data
    out: dict[str, Any] = {"chunk": chunk, "dtype": plain.model.dtype, "points": []}
    with torch.inference_mode():
        for t in tokens:
            if t > chunk:
                continue
            xs = _seeded(t, plain.model.hidden_size, plain.model.torch_dtype, batches, plain.seed + 2)
            if not torch.equal(layer_chunked(xs[0]), layer_plain(xs[0])):
                raise RuntimeError(f"chunking changes the output at T={t}")
            point = compare_alternating(
                lambda i, xs=xs: layer_chunked(xs[i]),  # type: ignore[misc]
                lambda i, xs=xs: layer_plain(xs[i]),  # type: ignore[misc]
                rounds(t),
                batches,
                warmup=1,
            )
            point["tokens"] = t
            out["points"].append(point)
    return out


def _time_python(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def import_overhead(repeat: int = 7) -> dict[str, Any]:
    """Wall time of ``python -c "import moeframe"`` against ``python -c "import torch"``
    (fresh interpreters, alternating, median of ``repeat`` each)."""
    env = dict(os.environ)
    commands = {
        "import torch": "import torch",
        "import moeframe": "import moeframe",
        "import moeframe + registry": "import moeframe; moeframe.get_registry()",
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for code in commands.values():  # warm the file cache
        _time_python(code, env)
    for _ in range(repeat):
        for name, code in commands.items():
            times[name].append(_time_python(code, env))
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": medians,
        "ratio": medians["import moeframe"] / medians["import torch"],
        "registry_ratio": medians["import moeframe + registry"] / medians["import torch"],
        "repeat": repeat,
    }


_TRITON_PROBE = """
import json, sys
import moeframe
registry = moeframe.get_registry()
entry = next((e for e in registry.entries("kernel") if e.name == "triton"), None)
report = {"registered": entry is not None, "imported_on_register": "triton" in sys.modules,
          "variant": entry.strategy.variant if entry else None, "imported_on_first_use": None}
if entry is not None:
    try:
        entry.load()
        report["imported_on_first_use"] = "triton" in sys.modules
    except Exception as exc:
        report["load_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(report))
"""


def triton_laziness() -> dict[str, Any]:
    """Whether registering the ``triton`` kernel imports triton (it should not), and
    whether loading it does (it should), in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_PROBE], capture_output=True, text=True, env=dict(os.environ), check=False
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
