"""Whether Triton runs compiled on a GPU or through its interpreter on the CPU.

Imports neither triton nor (where it can be avoided) torch, so that registering the
kernel stays cheap: on a machine with no GPU device node at all the answer is known
without importing torch.
"""

from __future__ import annotations

import glob
import os
import sys

__all__ = ["INTERPRET_ENV", "cuda_available", "interpreter_mode"]

#: Triton's own switch: ``1`` runs ``@triton.jit`` functions in Python with numpy.
INTERPRET_ENV = "TRITON_INTERPRET"

_TRUE = {"1", "true", "on", "yes"}


def _gpu_device_nodes() -> bool:
    """True when the OS shows an NVIDIA or AMD GPU device node (or we cannot tell)."""
    if not sys.platform.startswith("linux"):
        return True  # no cheap probe elsewhere: ask torch
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def cuda_available() -> bool:
    """What ``torch.cuda.is_available()`` says, without importing torch when no GPU
    device node exists (then the answer is certainly False)."""
    if "torch" not in sys.modules and not _gpu_device_nodes():
        return False
    import torch

    return bool(torch.cuda.is_available())


def interpreter_mode() -> bool:
    """True when the Triton kernels run through Triton's interpreter (on CPU tensors).

    ``TRITON_INTERPRET`` decides when it is set; otherwise the interpreter is used
    exactly when no CUDA device is available.
    """
    value = os.environ.get(INTERPRET_ENV)
    if value is not None and value.strip():
        return value.strip().lower() in _TRUE
    return not cuda_available()
