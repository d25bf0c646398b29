"""Deprecated: the benchmark moved out of the library into the ``moeframe-bench`` distribution
(package :mod:`moeframe_bench`, commands ``moeframe bench`` and ``moeframe e2e``).

This module stays for one release so that code importing ``moeframe.bench`` (or running
``python -m moeframe.bench.e2e``) keeps working with a warning that says what to use instead;
it holds nothing but that redirection.
"""

from __future__ import annotations

import warnings

MOVED = (
    "moeframe.bench moved to the moeframe-bench distribution: import moeframe_bench instead "
    "(and run `moeframe bench` / `moeframe e2e`); moeframe.bench will be removed in the next release"
)

warnings.warn(MOVED, DeprecationWarning, stacklevel=2)

try:
    from moeframe_bench.measure import BenchOptions, Progress, default_kernels, run_benchmark
except ImportError as exc:  # pragma: no cover - only without the distribution
    raise ImportError(f"{MOVED}; it is not installed here: pip install moeframe-bench") from exc

__all__ = ["BenchOptions", "Progress", "default_kernels", "run_benchmark"]
