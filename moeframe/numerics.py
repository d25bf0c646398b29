"""Dtypes by config name, the tolerance of each, and comparison against a reference."""

from __future__ import annotations

import math

import attrs
import torch

__all__ = ["DTYPES", "Tolerance", "TOLERANCES", "tolerance_for", "Comparison", "compare", "dtype_name"]

#: Config name -> torch dtype, for every dtype a model may be configured with.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


@attrs.frozen
class Tolerance:
    """``|out - ref| <= atol + rtol * |ref|`` elementwise (``torch.allclose``'s rule)."""

    atol: float
    rtol: float


#: Tolerances of a stack against the reference stack, per dtype.  fp32 is tight (only the
#: order of summation differs); bf16 follows vLLM's fused-MoE tests (atol 2e-2); fp16 sits
#: between (10 mantissa bits against bf16's 7).
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4),
    "bfloat16": Tolerance(atol=2e-2, rtol=2e-2),
    "float16": Tolerance(atol=5e-3, rtol=5e-3),
}


def tolerance_for(dtype: torch.dtype | str) -> Tolerance:
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return TOLERANCES[name]


@attrs.frozen
class Comparison:
    """How far an output is from its reference."""

    max_abs_error: float
    #: max |out - ref| / max |ref|: the error relative to the output's scale.
    max_rel_error: float
    tolerance: Tolerance
    ok: bool

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "atol": self.tolerance.atol,
            "rtol": self.tolerance.rtol,
            "ok": self.ok,
        }


def compare(output: torch.Tensor, reference: torch.Tensor, tolerance: Tolerance | None = None) -> Comparison:
    """Compare ``output`` with ``reference`` (same shape) under ``tolerance``.

    NaN in the same places in both counts as equal; anywhere else it fails.
    """
    if output.shape != reference.shape:
        raise ValueError(f"shape {tuple(output.shape)} differs from the reference's {tuple(reference.shape)}")
    tol = tolerance or tolerance_for(reference.dtype)
    out = output.detach().float().cpu()
    ref = reference.detach().float().cpu()
    if out.numel() == 0:
        return Comparison(0.0, 0.0, tol, True)
    both_nan = torch.isnan(out) & torch.isnan(ref)
    diff = (out - ref).abs().masked_fill(both_nan, 0.0)
    max_abs = float(diff.max()) if not torch.isnan(diff).any() else math.inf
    scale = float(ref.masked_fill(torch.isnan(ref), 0.0).abs().max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ok = bool(torch.allclose(out, ref, atol=tol.atol, rtol=tol.rtol, equal_nan=True))
    return Comparison(max_abs, max_rel, tol, ok)
