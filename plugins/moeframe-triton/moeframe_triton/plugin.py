"""The moeframe plugin of moeframe-triton: registers the ``triton`` kernel.

Importing this module imports neither triton nor the kernel: the strategy names its
implementation as a string, loaded the first time a stack uses it.
"""

from __future__ import annotations

import os

from moeframe import Capabilities, Strategy, hookimpl
from moeframe_triton._device import INTERPRET_ENV, interpreter_mode

#: the plugin contract this module was written for
moeframe_plugin_api = 1

_DESCRIPTION = "fused MoE in Triton: align, grouped GEMMs with bias/activation/routed weight fused, top-k sum"


@hookimpl
def register_kernels() -> list[Strategy]:
    """The ``triton`` kernel: on CUDA devices, or on the CPU through Triton's interpreter
    (variant ``interpreter``) where no CUDA device is available."""
    interpreter = interpreter_mode()
    if interpreter and not os.environ.get(INTERPRET_ENV, "").strip():
        # no CUDA device: whoever imports triton in this process from now on (torch's
        # profiler does) gets the interpreter our kernels run on; compiled triton could
        # not run here anyway
        os.environ[INTERPRET_ENV] = "1"
    capabilities = Capabilities(
        dtypes=("float32", "bfloat16", "float16"),
        devices=("cpu",) if interpreter else ("cuda",),
        activations=("silu", "gelu", "swigluoai"),
        expert_map=True,
        biases=True,
    )
    return [
        Strategy("triton", "moeframe_triton.kernel:TritonKernel", _DESCRIPTION, capabilities,
                 variant="interpreter" if interpreter else None),
    ]
