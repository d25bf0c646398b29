"""The moeframe plugin of moeframe-triton: registers the ``triton`` kernel and the
``moeframe tune`` command.

Importing this module imports neither triton nor the kernel: the strategy names its
implementation as a string, loaded the first time a stack uses it, and the command its
functions (:mod:`moeframe_triton.cli`), imported when it runs.
"""

from __future__ import annotations

import os

from moeframe import Capabilities, Strategy, hookimpl
from moeframe.plugins.commands import Register
from moeframe_triton._device import INTERPRET_ENV, interpreter_mode

#: the plugin contract this module was written for (``register_commands`` came in 3)
moeframe_plugin_api = 3

_DESCRIPTION = "fused MoE in Triton: align, grouped GEMMs with bias/activation/routed weight fused, top-k sum"


@hookimpl
def register_kernels() -> list[Strategy]:
    """The ``triton`` kernel: on CUDA devices, or on the CPU through Triton's interpreter
    (variant ``interpreter``) where no CUDA device is available.

    Side effect, in CPU-only processes only: ``TRITON_INTERPRET=1`` is put in the
    environment (unless the user set the variable).  Registration is the only safe moment,
    because Triton chooses between interpreter and compiler when a function is *decorated*,
    not when it is launched: ``triton.jit`` reads ``triton.knobs.runtime.interpret`` at
    decoration (``triton/runtime/jit.py``, triton 3.9), and Triton decorates its own
    library (``triton.language.standard``: ``cdiv``, the reductions' combine functions)
    at ``import triton``.  Setting the knob when our kernel is built is too late once
    anything has imported triton (``torch.profiler`` and ``torch.compile`` do, early): the
    interpreted kernels then fail with "Cannot call @triton.jit'd outside of the scope of
    a kernel".  Registration runs when the first registry is used, before any stack is
    built.  Where a CUDA device exists nothing is written: compiled Triton is untouched.
    """
    interpreter = interpreter_mode()
    if interpreter and not os.environ.get(INTERPRET_ENV, "").strip():
        os.environ[INTERPRET_ENV] = "1"  # CPU-only process: see the docstring
    capabilities = Capabilities(
        dtypes=("float32", "bfloat16", "float16"),
        devices=("cpu",) if interpreter else ("cuda",),
        activations=("silu", "gelu", "swigluoai"),
        expert_map=True,
        biases=True,
    )
    return [
        Strategy(
            "triton",
            "moeframe_triton.kernel:TritonKernel",
            _DESCRIPTION,
            capabilities,
            variant="interpreter" if interpreter else None,
        ),
    ]


@hookimpl
def register_commands(register: Register) -> None:
    """``moeframe tune CONFIG``: search the configured kernel's block sizes on this GPU."""
    register(
        "tune",
        "moeframe_triton.cli:run",
        add_arguments="moeframe_triton.cli:add_arguments",
        help="search the configured kernel's block sizes on this GPU and write a tuned file",
    )
