"""Median wall time of a GPU (CUDA events) or CPU (``perf_counter``) call.

Shared by ``moeframe tune`` and ``benchmarks/gpu_check.py``; imports neither triton nor
anything that launches a kernel.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["median_time"]


def median_time(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (compiling,
    warming caches).  On CUDA each run is timed with a pair of events on the current
    stream, so launches queued before it do not count."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
