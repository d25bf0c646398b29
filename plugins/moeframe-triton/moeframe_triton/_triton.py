"""The one place that imports triton, after choosing interpreter or compiled mode.

Where no CUDA device is available, ``TRITON_INTERPRET=1`` is put in the environment
before ``import triton`` (unless the user set the variable), so that the kernels run
through Triton's interpreter on CPU tensors.  Every kernel launch goes through
:func:`launch`, so that tests can count launches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from moeframe_triton._device import INTERPRET_ENV, interpreter_mode

if not os.environ.get(INTERPRET_ENV, "").strip() and interpreter_mode():
    os.environ[INTERPRET_ENV] = "1"

import triton
import triton.language as tl
import triton.language.standard as _standard
from triton.runtime.interpreter import InterpretedFunction as _Interpreted

if interpreter_mode() and not isinstance(_standard.cdiv, _Interpreted):
    # triton was imported earlier (torch.profiler and torch.compile import it) with the
    # interpreter off: its own library is compiled-only and our kernels could not run
    raise ImportError(
        "triton was imported before moeframe-triton selected its interpreter (no CUDA device here); "
        f"set {INTERPRET_ENV}=1 before starting Python"
    )

__all__ = ["triton", "tl", "INTERPRETER", "launch", "next_power_of_2"]

#: True when the kernels run through Triton's interpreter (CPU tensors, numpy).
INTERPRETER: bool = interpreter_mode()


def launch(kernel: Any, grid: Sequence[int] | Callable[..., Sequence[int]], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel`` on ``grid``; every launch of this package goes through here."""
    kernel[tuple(grid) if not callable(grid) else grid](*args, **kwargs)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
