"""This machine's limits, measured in the same run as the thing measured against them.

* **peak GEMM rate** for a dtype: the best median rate of ``torch.matmul`` over a few dense
  shapes and both layouts of the second operand ("the best of a few dense matmul shapes");
* **read bandwidth**: the best median rate of a large tensor reduction (``sum`` over a
  tensor far larger than the last-level cache), in float32 and bfloat16.

Both use the threads torch uses (``torch.get_num_threads()``).  Noise from other processes
only lowers a median, so the benchmark measures the limits before and after its sweep and
keeps the higher value: the fractions it reports err on the low side.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from moeframe.numerics import DTYPES

__all__ = [
    "GEMM_SHAPES",
    "MachineLimits",
    "measure_gemm_peak",
    "measure_read_bandwidth",
    "measure_limits",
    "median_time",
    "LimitProbes",
    "last_level_cache_bytes",
]

#: (M, N, K) of the dense matmuls ``[M, K] @ [K, N]`` whose best rate is the peak.
GEMM_SHAPES: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1024), (2048, 1024, 1024), (1024, 2048, 2048))


def last_level_cache_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of the largest CPU cache the kernel reports for CPU 0 (``sysfs``), or None
    where it reports none (not Linux, or a virtual machine that hides its caches)."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    best = 0
    for index in cache_dir.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        digits, unit = text.rstrip("KMG"), text[len(text.rstrip("KMG")) :]
        if digits.isdigit():
            best = max(best, int(digits) * units.get(unit, 1))
    return best or None


#: bytes of the tensor whose reduction measures read bandwidth: at least twice the
#: last-level cache (some virtual machines report several hundred MiB), and 512 MiB at least
READ_BYTES = max(512 * 1024**2, 2 * (last_level_cache_bytes() or 0)) // 64 * 64


def median_time(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@attrs.define
class MachineLimits:
    """Measured limits: FLOP/s per dtype name and read bytes/s, with the details."""

    gemm_flops: dict[str, float] = attrs.field(factory=dict)
    gemm_detail: dict[str, dict[str, float]] = attrs.field(factory=dict)
    read_bytes_per_s: float = 0.0
    read_detail: dict[str, float] = attrs.field(factory=dict)
    threads: int = 1

    def merge(self, other: MachineLimits) -> MachineLimits:
        """The better of two measurements of each limit."""
        out = MachineLimits(threads=self.threads)
        for dtype in set(self.gemm_flops) | set(other.gemm_flops):
            out.gemm_flops[dtype] = max(self.gemm_flops.get(dtype, 0.0), other.gemm_flops.get(dtype, 0.0))
            detail = dict(self.gemm_detail.get(dtype, {}))
            for shape, rate in other.gemm_detail.get(dtype, {}).items():
                detail[shape] = max(detail.get(shape, 0.0), rate)
            out.gemm_detail[dtype] = detail
        out.read_bytes_per_s = max(self.read_bytes_per_s, other.read_bytes_per_s)
        out.read_detail = {
            k: max(self.read_detail.get(k, 0.0), other.read_detail.get(k, 0.0))
            for k in set(self.read_detail) | set(other.read_detail)
        }
        return out

    def best_gemm(self, dtype: str) -> tuple[int, int, int, str]:
        """(M, N, K, layout) of the fastest dense matmul measured for ``dtype``."""
        key = max(self.gemm_detail[dtype], key=self.gemm_detail[dtype].__getitem__)
        shape, layout = key.split(" ")
        m, n, k = (int(v) for v in shape.split("x"))
        return m, n, k, layout

    def as_dict(self) -> dict[str, Any]:
        return {
            "gemm_flops": self.gemm_flops,
            "gemm_detail": self.gemm_detail,
            "gemm_shapes": [list(s) for s in GEMM_SHAPES],
            "read_bytes_per_s": self.read_bytes_per_s,
            "read_detail": self.read_detail,
            "threads": self.threads,
        }


def measure_gemm_peak(
    dtype: str, shapes: Sequence[tuple[int, int, int]] = GEMM_SHAPES, repeat: int = 3
) -> dict[str, float]:
    """Median FLOP/s of ``torch.matmul`` in ``dtype`` for each shape and operand layout
    (key ``"MxNxK a@b"``: both operands row-major; ``"MxNxK a@b.T"``: the second one
    stored ``[N, K]``, as ``nn.Linear`` weights are).  A layout whose first run takes over
    a second is timed once: it is far from the peak, whatever the noise."""
    torch_dtype = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    rates = {}
    for m, n, k in shapes:
        a = torch.randn(m, k, generator=g).to(torch_dtype)
        b = torch.randn(k, n, generator=g).to(torch_dtype)
        bt = torch.randn(n, k, generator=g).to(torch_dtype)
        layouts = (("a@b", functools.partial(torch.matmul, a, b)), ("a@b.T", functools.partial(torch.matmul, a, bt.T)))
        for layout, fn in layouts:
            start = time.perf_counter()
            fn()
            first = time.perf_counter() - start
            seconds = first if first > 1.0 else median_time(fn, repeat, warmup=0)
            rates[f"{m}x{n}x{k} {layout}"] = 2.0 * m * n * k / seconds
    return rates


def measure_read_bandwidth(nbytes: int = READ_BYTES, repeat: int = 5) -> dict[str, float]:
    """Median bytes/s of ``tensor.sum()`` over a tensor of ``nbytes`` bytes, per dtype."""
    rates = {}
    for name in ("float32", "bfloat16"):
        dtype = DTYPES[name]
        t = torch.ones(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
        seconds = median_time(t.sum, repeat)
        rates[name] = nbytes / seconds
        del t
    return rates


def measure_limits(dtypes: Sequence[str], repeat: int = 3) -> MachineLimits:
    """Peak GEMM rate for each of ``dtypes`` (and float32 always) and the read bandwidth."""
    limits = MachineLimits(threads=torch.get_num_threads())
    for dtype in dict.fromkeys(["float32", *dtypes]):
        detail = measure_gemm_peak(dtype, repeat=repeat)
        limits.gemm_detail[dtype] = detail
        limits.gemm_flops[dtype] = max(detail.values())
    limits.read_detail = measure_read_bandwidth(repeat=max(repeat, 5))
    limits.read_bytes_per_s = max(limits.read_detail.values())
    return limits


class LimitProbes:
    """The limits again, as single operations to time alongside the thing measured.

    ``gemm(dtype)`` runs the dense matmul that was fastest for ``dtype`` in ``limits``;
    ``read()`` reduces the large tensor of the dtype whose reduction was fastest.  Timed
    in the same rounds as a kernel, they give the machine's limits at that very moment.
    """

    def __init__(self, limits: MachineLimits, dtypes: Sequence[str]) -> None:
        g = torch.Generator().manual_seed(1)
        self._gemm: dict[str, tuple[Callable[[], Any], float]] = {}
        for dtype in dict.fromkeys(["float32", *dtypes]):
            m, n, k, layout = limits.best_gemm(dtype)
            torch_dtype = DTYPES[dtype]
            a = torch.randn(m, k, generator=g).to(torch_dtype)
            b = (
                torch.randn(k, n, generator=g).to(torch_dtype)
                if layout == "a@b"
                else torch.randn(n, k, generator=g).to(torch_dtype).T
            )
            self._gemm[dtype] = (functools.partial(torch.matmul, a, b), 2.0 * m * n * k)
        read_dtype = max(limits.read_detail, key=limits.read_detail.__getitem__)
        dt = DTYPES[read_dtype]
        self._tensor = torch.ones(READ_BYTES // torch.empty((), dtype=dt).element_size(), dtype=dt)
        self.read_bytes = READ_BYTES

    def gemm(self, dtype: str) -> tuple[Callable[[], Any], float]:
        """(a function running the matmul, its FLOPs)."""
        return self._gemm[dtype]

    def read(self) -> Any:
        """Reduce the large tensor (which also evicts everything else from the caches)."""
        return self._tensor.sum()
