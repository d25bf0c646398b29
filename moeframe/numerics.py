"""Dtypes by config name, the tolerance of each, and comparison against a reference."""

from __future__ import annotations

import math

import attrs
import torch

__all__ = [
    "DTYPES",
    "Tolerance",
    "TOLERANCES",
    "tolerance_for",
    "Comparison",
    "compare",
    "count_nonfinite",
    "dtype_name",
]

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
    """``|out - ref| <= atol + rtol * |ref| + scale_rtol * max|ref|`` elementwise.

    The first two terms are ``torch.allclose``'s rule; the third makes the tolerance
    relative to the output's scale as well (``max|ref|`` over the finite reference
    values), so that an output whose values are large (inputs at scale 1e3, say) is not
    held to an absolute ``atol`` on its near-zero elements.  ``scale_rtol = 0`` is
    ``allclose``'s rule alone.
    """

    atol: float
    rtol: float
    scale_rtol: float = 0.0


#: Tolerances of a stack against the reference stack, per dtype.  fp32 is tight (only the
#: order of summation differs); bf16 follows vLLM's fused-MoE tests (atol 2e-2); fp16 sits
#: between (10 mantissa bits against bf16's 7).  The scale term sits well above the
#: rounding of a correct kernel (fp32: a few 1e-7 of the output's scale) and well below
#: an error worth reporting (bf16 intermediates: about 1e-2 of the scale).
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4, scale_rtol=1e-5),
    "bfloat16": Tolerance(atol=2e-2, rtol=2e-2, scale_rtol=4e-3),
    "float16": Tolerance(atol=5e-3, rtol=5e-3, scale_rtol=1e-3),
}


def tolerance_for(dtype: torch.dtype | str) -> Tolerance:
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return TOLERANCES[name]


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many values of ``tensor`` are NaN or +-inf."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


@attrs.frozen
class Comparison:
    """How far an output is from its reference."""

    max_abs_error: float
    #: max |out - ref| / max |ref|: the error relative to the output's scale.
    max_rel_error: float
    tolerance: Tolerance
    ok: bool
    #: NaN or inf values in the output, and in the reference
    nonfinite_output: int = 0
    nonfinite_reference: int = 0
    #: output values that are NaN or inf where the reference is finite (these fail)
    nonfinite_new: int = 0

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "atol": self.tolerance.atol,
            "rtol": self.tolerance.rtol,
            "scale_rtol": self.tolerance.scale_rtol,
            "nonfinite_output": self.nonfinite_output,
            "nonfinite_reference": self.nonfinite_reference,
            "nonfinite_new": self.nonfinite_new,
            "ok": self.ok,
        }


def compare(output: torch.Tensor, reference: torch.Tensor, tolerance: Tolerance | None = None) -> Comparison:
    """Compare ``output`` with ``reference`` (same shape) under ``tolerance`` (default:
    the reference dtype's, see :data:`TOLERANCES`).

    A NaN, or an inf of the same sign, in the same place in both counts as equal (two
    kernels agreeing on a non-finite result agree); anywhere else it fails.  The counts
    of non-finite values are part of the result, so that callers can tell a user whose
    output is non-finite although the comparison passed.
    """
    if output.shape != reference.shape:
        raise ValueError(f"shape {tuple(output.shape)} differs from the reference's {tuple(reference.shape)}")
    tol = tolerance or tolerance_for(reference.dtype)
    out = output.detach().float().cpu()
    ref = reference.detach().float().cpu()
    if out.numel() == 0:
        return Comparison(0.0, 0.0, tol, True)
    out_finite = torch.isfinite(out)
    ref_finite = torch.isfinite(ref)
    nonfinite_output = int((~out_finite).sum())
    nonfinite_reference = int((~ref_finite).sum())
    nonfinite_new = int((~out_finite & ref_finite).sum())
    both_nan = torch.isnan(out) & torch.isnan(ref)
    same_inf = torch.isinf(out) & torch.isinf(ref) & (torch.sign(out) == torch.sign(ref))
    agree = both_nan | same_inf
    diff = (out - ref).abs().masked_fill(agree, 0.0)
    max_abs = float(diff.max()) if not torch.isnan(diff).any() else math.inf
    finite_ref = ref.masked_fill(~ref_finite, 0.0).abs()
    scale = float(finite_ref.max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    allowed = tol.atol + tol.rtol * finite_ref + tol.scale_rtol * scale
    within = (diff <= allowed) | agree
    ok = bool(within.all())
    return Comparison(max_abs, max_rel, tol, ok, nonfinite_output, nonfinite_reference, nonfinite_new)
