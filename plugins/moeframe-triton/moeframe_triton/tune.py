"""The search behind ``moeframe tune``: block sizes, warps and stages per batch size.

For each batch size ``M`` and each token block size ``block_m`` the align step runs once;
then every ``up`` tiling and every ``down`` tiling of the search space is timed on its
own (the two GEMMs are independent given ``block_m``).  The best ``block_m`` is the one
whose best ``up`` plus best ``down`` is fastest.  The chosen config is checked against the
``torch`` reference before it is written: a config that computes something else is a
bug, not a result.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from moeframe.config import ModelConfig
from moeframe.errors import UserError
from moeframe.kernels.activations import Activation
from moeframe.numerics import DTYPES, compare, tolerance_for
from moeframe_triton._triton import INTERPRETER
from moeframe_triton.configs import (
    H_BYTES,
    SHARED_MEMORY_BUDGET,
    GemmConfig,
    MoEConfig,
    config_file_name,
    pipeline_bytes,
    read_config_file,
    write_config_file,
)
from moeframe_triton.fused_moe import fused_moe, route_blocks, run_down, run_up
from moeframe_triton.timing import median_time

__all__ = ["SearchSpace", "DEFAULT_BATCH_SIZES", "tune_layer", "tune_model", "reference_moe"]

#: the batch sizes tuned when none are given
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)


@attrs.frozen
class SearchSpace:
    """The values tried for each field; combinations over the shared-memory budget, or
    with blocks far larger than the dimension, are skipped."""

    block_m: tuple[int, ...] = (16, 32, 64, 128)
    block_n: tuple[int, ...] = (32, 64, 128, 256)
    block_k: tuple[int, ...] = (64, 128, 256)
    group_m: tuple[int, ...] = (1, 8)
    num_warps: tuple[int, ...] = (4, 8)
    num_stages: tuple[int, ...] = (2, 3, 4)

    def block_ms(self, num_pairs: int, num_experts: int) -> list[int]:
        """Token block sizes worth trying: no larger than twice the mean pairs per expert."""
        mean = max(1, num_pairs // max(1, num_experts))
        useful = [b for b in self.block_m if b <= max(16, 2 * mean)]
        return useful or [min(self.block_m)]

    def gemms(
        self, block_m: int, N: int, K: int, dtype: str, b_tiles: int, a_bytes: int | None = None
    ) -> list[GemmConfig]:
        """Tilings for a GEMM of N output columns over K, holding ``b_tiles`` weight tiles
        (and an A tile of ``a_bytes`` per element, default the dtype's)."""
        out = []
        for bn, bk, group, warps, stages in itertools.product(
            self.block_n, self.block_k, self.group_m, self.num_warps, self.num_stages
        ):
            if bn > max(16, 2 * N) or bk > max(16, 2 * K):
                continue
            if pipeline_bytes(block_m, bn, bk, stages, dtype, b_tiles, a_bytes) > SHARED_MEMORY_BUDGET:
                continue
            out.append(GemmConfig(bn, bk, group, warps, stages))
        return out


def reference_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """The ``torch`` reference kernel's result (fp32 loop over experts), for checking."""
    from moeframe.kernels import ExpertWeights
    from moeframe.kernels.torch_reference import reference_moe as torch_reference

    return torch_reference(x, topk_weights, topk_ids, ExpertWeights(w13, w2), activation)


def _random_layer(
    E: int, N: int, K: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = (torch.randn(E, 2 * N, K, generator=g, device=device) * K**-0.5).to(dtype)
    w2 = (torch.randn(E, K, N, generator=g, device=device) * N**-0.5).to(dtype)
    return w13, w2


def _random_routing(
    M: int, E: int, top_k: int, H: int, dtype: torch.dtype, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, H, generator=g, device=device).to(dtype)
    logits = torch.randn(M, E, generator=g, device=device)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True), ids


def tune_layer(
    *,
    E: int,
    N: int,
    K: int,
    top_k: int,
    dtype: str,
    activation: Activation,
    batch_sizes: Iterable[int],
    device: torch.device | str,
    space: SearchSpace | None = None,
    reps: int = 10,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[int, MoEConfig]:
    """The fastest config at each batch size for a layer of ``E`` experts, intermediate
    size ``N`` and hidden size ``K`` (timed on ``device``; checked against the reference).

    Candidates that fail to compile or launch (out of resources, say) are skipped.
    """
    space = space or SearchSpace()
    device = torch.device(device)
    torch_dtype = DTYPES[dtype]
    say = log or (lambda _msg: None)
    w13, w2 = _random_layer(E, N, K, torch_dtype, device, seed)
    chosen: dict[int, MoEConfig] = {}

    def measure(fn: Callable[[], Any]) -> float:
        return median_time(fn, device, reps)

    for M in batch_sizes:
        x, weights, ids = _random_routing(M, E, top_k, K, torch_dtype, device, seed + M)
        best: tuple[float, MoEConfig] | None = None
        for block_m in space.block_ms(M * top_k, E):
            routed = route_blocks(weights, ids, block_m, E)
            h = run_up(x, w13, None, routed, GemmConfig(32, 32), activation)  # an input for the down GEMM
            # partial binds this block size's tensors; the tiling comes last, from _fastest
            up = _fastest(
                space.gemms(block_m, N, K, dtype, 2),
                measure,
                functools.partial(run_up, x, w13, None, routed, activation=activation),
            )
            down = _fastest(
                space.gemms(block_m, K, N, dtype, 1, H_BYTES),
                measure,
                functools.partial(run_down, h, w2, None, routed),
            )
            if up is None or down is None:
                continue
            t = up[0] + down[0]
            if best is None or t < best[0]:
                best = (t, MoEConfig(block_m, up[1], down[1]))
        if best is None:
            raise RuntimeError(f"no candidate config ran for M={M}, E={E}, N={N}, K={K}, {dtype}")
        config = best[1]
        out = fused_moe(x, weights, ids, w13, w2, activation=activation, config=config)
        cmp = compare(out, reference_moe(x, weights, ids, w13, w2, activation), tolerance_for(dtype))
        if not cmp.ok:
            raise RuntimeError(
                f"the tuned config {config.to_json()} gives max abs error {cmp.max_abs_error:.3e} at M={M}"
            )
        say(f"M={M}: {best[0] * 1e6:.1f} us with {config.to_json()}")
        chosen[M] = config
    return chosen


def _fastest(
    candidates: Sequence[GemmConfig], measure: Callable[[Callable[[], Any]], float], run: Callable[[GemmConfig], Any]
) -> tuple[float, GemmConfig] | None:
    best: tuple[float, GemmConfig] | None = None
    for gemm in candidates:
        try:
            t = measure(functools.partial(run, gemm))
        except Exception as exc:  # out of resources etc.: not a candidate
            if "out of resource" in str(exc).lower() or "OutOfResources" in type(exc).__name__:
                continue
            raise
        if best is None or t < best[0]:
            best = (t, gemm)
    return best


def tune_model(
    model: ModelConfig,
    *,
    batch_sizes: Sequence[int] | None,
    output_dir: Path,
    device: str = "cuda",
    log: Callable[[str], None] | None = None,
    expert_parallel: int = 1,
    tensor_parallel: int = 1,
    space: SearchSpace | None = None,
) -> Path:
    """Tune ``model``'s layer shape (this rank's share under EP/TP) on a CUDA GPU and
    write the tuned file into ``output_dir``; return its path.

    :class:`~moeframe.errors.UserError` where no CUDA GPU is available (tuning through
    the interpreter would measure Python, not the kernel).
    """
    if INTERPRETER or not torch.cuda.is_available():
        raise UserError(
            "kernel 'triton' tunes on a CUDA GPU and none is available here (Triton runs through its interpreter); "
            "run `moeframe tune` on the GPU you want configs for"
        )
    if torch.device(device).type != "cuda":
        raise UserError(f"--device {device}: kernel 'triton' tunes on a CUDA device (e.g. --device cuda)")
    if model.num_experts % expert_parallel or model.intermediate_size % tensor_parallel:
        raise UserError(
            f"model.num_experts ({model.num_experts}) and model.intermediate_size ({model.intermediate_size}) "
            f"must divide by parallel.ep_size ({expert_parallel}) and parallel.tp_size ({tensor_parallel}) "
            "to tune one rank's shape"
        )
    sizes = list(batch_sizes or DEFAULT_BATCH_SIZES)
    if any(m < 1 for m in sizes):
        raise UserError(f"--batch-sizes must be positive integers, got {sizes}")
    E = model.num_experts // expert_parallel
    N = model.intermediate_size // tensor_parallel
    K = model.hidden_size
    dev = torch.device(device)
    device_name = torch.cuda.get_device_name(dev)
    path = Path(output_dir) / config_file_name(E, N, K, model.dtype, device_name)
    # the output is checked before the search (minutes), not after it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output: cannot create the folder {str(path.parent)!r}: {exc.strerror}") from None
    if path.exists():
        read_config_file(path)  # a broken file already there: its error now, before the search
    configs = tune_layer(
        E=E,
        N=N,
        K=K,
        top_k=min(model.top_k, E),
        dtype=model.dtype,
        activation=Activation.from_model(model),
        batch_sizes=sizes,
        device=dev,
        space=space,
        log=log,
    )
    import triton

    return write_config_file(
        path,
        configs,
        E=E,
        N=N,
        K=K,
        dtype=model.dtype,
        device_name=device_name,
        extra={"top_k": model.top_k, "triton": triton.__version__, "torch": torch.__version__},
    )
