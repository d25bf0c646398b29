"""Per-core GFLOP/s of ``fused_cpu``'s native core and of torch's matmul on the same experts.

One thread, process CPU time (other processes' load on a shared machine does not count),
the benchmark's shape (E=64, top_k=8, H=1024, I=512), every expert given exactly m tokens.
``native``: the native core alone (``matmul_tokens = -1``); ``torch``: every expert through
the kernel's hand-over to torch's matmul (gather, two GEMMs, scatter; ``matmul_tokens = 1``).
The variant is the one this CPU picks, or ``MOEFRAME_CPU_ISA``'s::

    MOEFRAME_CPU_ISA=avx2 python -m moeframe_bench.per_core --dtype float32 --tokens 16,32,64,128,256
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from moeframe.conformance import KernelCase, kernel_context
from moeframe.kernels import ExpertWeights
from moeframe.kernels.fused_cpu import FusedCpuKernel, FusedCpuParams


def _counts(text: str) -> list[int]:
    """``--tokens``: positive integers, comma-separated (argparse turns the error into one line)."""
    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 16,64)") from None
    if any(c <= 0 for c in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: every token count must be at least 1")
    return counts


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--tokens", type=_counts, default="16,32,64,128,256", help="tokens per expert, comma-separated")
    ap.add_argument("--repeat", type=_positive, default=3, help="timed calls per count and path (the best is kept)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    E, K, H, I = 64, 8, 1024, 512
    dtype = getattr(torch, args.dtype)
    case = KernelCase("silu", False, False, args.dtype, 1, num_experts=E, top_k=K, hidden_size=H, intermediate_size=I)
    context = kernel_context(case.model())
    kernels = {
        "native": FusedCpuKernel(context, FusedCpuParams(backend="native", matmul_tokens=-1)),
        "torch": FusedCpuKernel(context, FusedCpuParams(backend="native", matmul_tokens=1)),
    }
    experts = ExpertWeights((torch.randn(E, 2 * I, H) / 32).to(dtype), (torch.randn(E, H, I) / 22).to(dtype))
    print(f"variant {kernels['native'].describe()['isa']}, {args.dtype}, GFLOP/s per core")
    for m in args.tokens:
        T = E * m // K
        ids = ((torch.arange(T).unsqueeze(1) * K + torch.arange(K)) % E).contiguous()  # m tokens per expert
        weights, x = torch.rand(T, K), torch.randn(T, H).to(dtype)
        best: dict[str, float] = {}
        for kernel in kernels.values():
            kernel(x, weights, ids, experts)
        for _ in range(args.repeat):
            for name, kernel in kernels.items():
                start = time.process_time()
                kernel(x, weights, ids, experts)
                best[name] = min(best.get(name, float("inf")), time.process_time() - start)
        flops = 6.0 * H * I * E * m
        print(f"m={m:5d}  " + "  ".join(f"{name} {flops / t / 1e9:6.1f}" for name, t in best.items()))


if __name__ == "__main__":
    main()
