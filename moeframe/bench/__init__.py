"""``moeframe bench``: kernels, the configured stack and transformers' implementations side
by side, against this machine's limits measured in the same run.

* :mod:`moeframe.bench.limits`: peak GEMM rate per dtype and read bandwidth;
* :mod:`moeframe.bench.measure`: the measurement loop (:func:`run_benchmark`);
* :mod:`moeframe.bench.peers`: Hugging Face transformers' experts implementations;
* :mod:`moeframe.bench.overhead`: what the framework adds (runner, chunking, import time);
* :mod:`moeframe.bench.memory`: peak extra memory of a forward (torch profiler);
* :mod:`moeframe.bench.targets`: the performance targets, checked against a run;
* :mod:`moeframe.bench.report`: tables, Markdown, plot, JSON.
"""

from __future__ import annotations

from moeframe.bench.measure import BenchOptions, Progress, default_kernels, run_benchmark

__all__ = ["BenchOptions", "Progress", "default_kernels", "run_benchmark"]
