"""moeframe-triton: the ``triton`` expert kernel for moeframe.

Importing this package is cheap: it imports neither torch nor triton.  The modules:

``plugin``      the ``register_kernels`` and ``register_commands`` hooks (what ``moeframe list``
                and ``moeframe --help`` see)
``kernel``      :class:`~moeframe_triton.kernel.TritonKernel`, the strategy
``align``       groups (token, k) pairs by expert, padded to blocks (a Triton kernel)
``fused_moe``   the fused grouped GEMMs and the top-k sum (Triton kernels) and their launcher
``ops``         the same as a torch op, ``torch.ops.moeframe_triton.fused_moe`` (compile, CUDA graphs)
``configs``     block-size configs: heuristic, tuned JSON files, override folder
``tune``        the search behind ``moeframe tune``
``cli``         the ``moeframe tune`` command (registered by ``plugin``)
``timing``      median time of a call (CUDA events or ``perf_counter``)
"""

__version__ = "0.1.0"
