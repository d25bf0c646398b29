"""moeframe-bench: the ``moeframe bench`` and ``moeframe e2e`` commands (a moeframe plugin).

``moeframe bench``: kernels, the configured stack and transformers' implementations side
by side, against this machine's limits measured in the same run.

* :mod:`moeframe_bench.limits`: peak GEMM rate per dtype and read bandwidth;
* :mod:`moeframe_bench.measure`: the measurement loop (:func:`~moeframe_bench.measure.run_benchmark`);
* :mod:`moeframe_bench.peers`: Hugging Face transformers' experts implementations;
* :mod:`moeframe_bench.overhead`: what the framework adds (runner, chunking, import time);
* :mod:`moeframe_bench.memory`: peak extra memory of a forward (torch profiler);
* :mod:`moeframe_bench.targets`: the performance targets, checked against a run;
* :mod:`moeframe_bench.report`: tables, Markdown, plot, JSON;
* :mod:`moeframe_bench.cli`: the ``moeframe bench`` command.

``moeframe e2e`` (:mod:`moeframe_bench.e2e`, also ``python -m moeframe_bench.e2e``): a whole
transformers causal LM, prefill and decode, with transformers' experts and moeframe's.

Importing the package imports nothing else (the plugin module is loaded by every
``moeframe`` command); the modules import torch.
"""
