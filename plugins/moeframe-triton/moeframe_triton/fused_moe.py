"""The fused MoE computation: align, two grouped GEMMs, a deterministic sum over top-k.

For ``T`` tokens routed to ``K`` experts each (``P = T * K`` pairs):

1. :func:`~moeframe_triton.align.align_block_size` groups the pairs by expert, padded to
   blocks of ``BLOCK_SIZE_M`` rows, one expert per block.
2. ``up`` kernel: for each block of rows and ``BLOCK_SIZE_N`` columns of ``I``, reads
   each row's token ``x[pair // K]`` straight through the sorted ids (no gathered copy),
   multiplies by the expert's gate rows and up rows of ``w13`` with fp32 accumulators,
   adds ``b13`` and applies the activation in the epilogue: ``h [P, I]``.
3. ``down`` kernel: ``h @ w2[e].T + b2[e]``, times the pair's routed weight, written to
   row ``pair`` of ``y [P, H]`` (with ``K == 1`` that is the output itself).
4. ``sum`` kernel: ``out[t] = sum_k y[t * K + k]`` in fp32, in a fixed order.

Blocks of experts that are not local (expert id -1) write zeros.  Every launch is a 1-D
(GEMMs: with ``GROUP_SIZE_M`` swizzle) or 2-D grid whose size depends on the shapes only.
Under Triton's interpreter bf16 operands are widened to fp32 before ``tl.dot`` (numpy has
no bf16); compiled kernels keep native bf16 dots.  fp32 dots use IEEE precision, not TF32.
"""

from __future__ import annotations

import attrs
import torch

from moeframe.kernels.activations import Activation
from moeframe.numerics import dtype_name
from moeframe_triton import _triton as rt
from moeframe_triton._triton import INTERPRETER, tl, triton
from moeframe_triton.align import align_block_size, max_padded_rows
from moeframe_triton.configs import GemmConfig, MoEConfig, get_config, interpreter_config

__all__ = [
    "fused_moe",
    "check_inputs",
    "select_config",
    "route_blocks",
    "run_up",
    "run_down",
    "run_sum",
    "RoutedBlocks",
    "ACTIVATION_CODES",
    "FP16_SPLIT_SCALE",
]

#: the activation as the kernels' constexpr
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "swigluoai": 2}
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit(do_not_specialize=["num_pairs", "num_rows"])  # they vary with the token count
def _moe_up_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    h_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    total_ptr,
    N,
    K,
    num_pairs,
    num_rows,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_hm,
    stride_hn,
    alpha,
    limit,
    TOP_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """h[pair, n] = act(x[pair // TOP_K] . w13[e, n] + b13[e, n], x . w13[e, N + n] + b13[e, N + n])."""
    # GROUP_M block rows sweep the columns together (weight tiles reused from L2);
    # written out rather than a helper: each nested jit call costs the interpreter dearly
    pid = tl.program_id(0)
    num_pid_m = (num_rows + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    total = tl.load(total_ptr)
    if pid_m * BLOCK_M >= total:
        return
    offs_row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_row).to(tl.int64)
    row_mask = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = row_mask[:, None] & (offs_n[None, :] < N)
    h_ptrs = h_ptr + pair[:, None] * stride_hm + offs_n[None, :] * stride_hn
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        tl.store(h_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=h_ptr.dtype.element_ty), mask=out_mask)
        return
    offs_k = tl.arange(0, BLOCK_K)
    offs_wn = offs_n % N  # wrap instead of masking the weight loads; the store is masked
    x_ptrs = x_ptr + (pair // TOP_K)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    gate_ptrs = w_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    up_ptrs = gate_ptrs + N * stride_wn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range((K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        gate_w = tl.load(gate_ptrs, mask=k_mask[:, None], other=0.0)
        up_w = tl.load(up_ptrs, mask=k_mask[:, None], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            gate_w = gate_w.to(tl.float32)
            up_w = up_w.to(tl.float32)
        acc_gate = tl.dot(a, gate_w, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, up_w, acc_up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_ptrs = b_ptr + expert * stride_be + offs_wn * stride_bn
        acc_gate += tl.load(b_ptrs).to(tl.float32)[None, :]
        acc_up += tl.load(b_ptrs + N * stride_bn).to(tl.float32)[None, :]
    if ACTIVATION == 0:  # silu(g) * u
        h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    elif ACTIVATION == 1:  # gelu(g) * u, exact erf form
        h = 0.5 * acc_gate * (1.0 + tl.math.erf(acc_gate * 0.7071067811865476)) * acc_up
    else:  # swigluoai: (clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(g, limit)
        g = tl.minimum(acc_gate, limit)
        u = tl.minimum(tl.maximum(acc_up, -limit), limit)
        h = (u + 1.0) * g / (1.0 + tl.exp(-alpha * g))
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_pairs", "num_rows"])
def _moe_down_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    weights_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    total_ptr,
    N,
    K,
    num_pairs,
    num_rows,
    stride_hm,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_SCALE: tl.constexpr,
):
    """y[pair, n] = weight[pair] * (h[pair] . w2[e, n] + b2[e, n]), h in fp32.

    With ``SPLIT`` (16-bit weights), each fp32 tile of ``h`` (times ``SPLIT_SCALE``, a
    power of two that keeps fp16 in range) is split into ``hi + lo``, both in the weights'
    dtype, and multiplied in two 16-bit dots: ``h`` keeps about 16 significant bits
    (a single 16-bit dot would round it to 8 or 11) at twice the dots' work.
    """
    # GROUP_M block rows sweep the columns together (weight tiles reused from L2);
    # written out rather than a helper: each nested jit call costs the interpreter dearly
    pid = tl.program_id(0)
    num_pid_m = (num_rows + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    total = tl.load(total_ptr)
    if pid_m * BLOCK_M >= total:
        return
    offs_row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_row).to(tl.int64)
    row_mask = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_mask = row_mask[:, None] & (offs_n[None, :] < N)
    y_ptrs = y_ptr + pair[:, None] * stride_ym + offs_n[None, :] * stride_yn
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        tl.store(y_ptrs, tl.zeros([BLOCK_M, BLOCK_N], dtype=y_ptr.dtype.element_ty), mask=out_mask)
        return
    offs_k = tl.arange(0, BLOCK_K)
    offs_wn = offs_n % N
    a_ptrs = h_ptr + pair[:, None] * stride_hm + offs_k[None, :] * stride_hk
    w_ptrs = w_ptr + expert * stride_we + offs_wn[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range((K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if SPLIT:
            a = a * SPLIT_SCALE
            hi = a.to(w.dtype)
            lo = (a - hi.to(tl.float32)).to(w.dtype)
            if UPCAST_DOT:
                hi = hi.to(tl.float32)
                lo = lo.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(hi, w, acc, input_precision=PRECISION)
            acc = tl.dot(lo, w, acc, input_precision=PRECISION)
        else:
            if UPCAST_DOT:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if SPLIT:
        acc = acc * (1.0 / SPLIT_SCALE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_wn * stride_bn).to(tl.float32)[None, :]
    routed = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
    acc = acc * routed[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["T"])
def _moe_sum_kernel(
    y_ptr,
    out_ptr,
    T,
    H,
    stride_yt,
    stride_yk,
    stride_yh,
    stride_ot,
    stride_oh,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t, h] = sum over k of y[t, k, h], in fp32, k in increasing order."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < T) & (cols[None, :] < H)
    base = y_ptr + rows[:, None].to(tl.int64) * stride_yt + cols[None, :] * stride_yh
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(base + k * stride_yk, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_ot + cols[None, :] * stride_oh
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_device_names: dict[int, str] = {}


def _device_name(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return _device_names[index]


def select_config(
    num_tokens: int,
    num_experts: int,
    intermediate_size: int,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> MoEConfig:
    """The config for a call: :func:`~moeframe_triton.configs.interpreter_config` under the
    interpreter, else the tuned file's (or the heuristic's) for this GPU."""
    name = dtype_name(dtype)
    if INTERPRETER:
        return interpreter_config(num_tokens, num_experts, intermediate_size, hidden_size, name)
    return get_config(num_tokens, num_experts, intermediate_size, hidden_size, name, _device_name(device))


def check_inputs(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    expert_map: torch.Tensor | None,
) -> None:
    """``ValueError`` naming the tensor whose shape or dtype does not fit (metadata only:
    also the op's fake implementation)."""
    T, H = hidden_states.shape
    if hidden_states.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"hidden_states is {hidden_states.dtype}; the triton kernel supports float32, bfloat16, float16"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids {list(topk_ids.shape)} and topk_weights {list(topk_weights.shape)} must both be [{T}, K]"
        )
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2:
        raise ValueError(f"w13 has shape {list(w13.shape)}; expected [E, 2I, {H}]")
    E, I = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, H, I):
        raise ValueError(f"w2 has shape {list(w2.shape)}; expected [{E}, {H}, {I}]")
    if w13.dtype != hidden_states.dtype or w2.dtype != hidden_states.dtype:
        raise ValueError(
            f"weights are {w13.dtype}/{w2.dtype} but hidden_states is {hidden_states.dtype}; convert at load time"
        )
    if (b13 is None) != (b2 is None):
        raise ValueError("give both expert biases b13 and b2, or neither")
    if b13 is not None and (tuple(b13.shape) != (E, 2 * I) or tuple(b2.shape) != (E, H)):  # type: ignore[union-attr]
        raise ValueError(f"biases have shapes {list(b13.shape)}, {list(b2.shape)}; expected [{E}, {2 * I}], [{E}, {H}]")  # type: ignore[union-attr]
    if expert_map is not None and expert_map.dim() != 1:
        raise ValueError(f"expert_map must be 1-D [num_experts], got shape {list(expert_map.shape)}")


@attrs.frozen
class RoutedBlocks:
    """The align step's output for one call, shared by both GEMMs."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    total: torch.Tensor
    #: rows of ``sorted_ids``: the grids' extent along tokens (a bound, known on the host)
    num_rows: int
    block_m: int
    num_tokens: int
    top_k: int
    #: routed weights, flat [T * K]
    weights: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k


def route_blocks(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_m: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
) -> RoutedBlocks:
    """Align ``topk_ids`` to blocks of ``block_m`` rows (see :mod:`moeframe_triton.align`)."""
    T, top_k = topk_ids.shape
    sorted_ids, expert_ids, total = align_block_size(topk_ids, block_m, num_experts, expert_map)
    weights = topk_weights.reshape(-1)
    if not weights.is_contiguous():
        weights = weights.contiguous()
    return RoutedBlocks(
        sorted_ids, expert_ids, total, max_padded_rows(T * top_k, num_experts, block_m), block_m, T, top_k, weights
    )


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    return INTERPRETER and dtype == torch.bfloat16, "ieee" if dtype == torch.float32 else "tf32"


#: ``h`` is scaled by this before its split into two fp16 halves (a power of two, exact):
#: fp16 tops out at 65504, so unscaled any ``|h|`` above it would become inf; scaled, the
#: split holds ``|h|`` up to 65504 * 2**10 (6.7e7) at an absolute resolution of about
#: 6e-5 (fp16's smallest step times 2**10) for small ``h``.  bf16 has fp32's range: 1.
FP16_SPLIT_SCALE = 2.0**-10


def _split_flags(weight_dtype: torch.dtype) -> tuple[bool, float]:
    """Whether GEMM 2 splits the fp32 ``h`` into two dots in the weights' dtype, and the scale."""
    if weight_dtype == torch.float32:
        return False, 1.0
    return True, FP16_SPLIT_SCALE if weight_dtype == torch.float16 else 1.0


def run_up(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    b13: torch.Tensor | None,
    routed: RoutedBlocks,
    gemm: GemmConfig,
    activation: Activation,
    intermediate_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """GEMM 1 with bias and activation fused: a new ``h [T * K, I]`` in fp32 (whatever the
    activation dtype: rounding ``h`` to 16 bits loses precision, and fp16 its range).
    ``intermediate_dtype`` is for measuring what fp32 costs (see :func:`fused_moe`)."""
    I, H = w13.shape[1] // 2, w13.shape[2]
    dtype = hidden_states.dtype
    upcast, precision = _dot_flags(dtype)
    h = torch.empty((routed.num_pairs, I), dtype=intermediate_dtype, device=hidden_states.device)
    bias = b13 if b13 is not None else w13  # any pointer when HAS_BIAS is off
    block_m = routed.block_m
    rt.launch(
        _moe_up_kernel,
        (triton.cdiv(routed.num_rows, block_m) * triton.cdiv(I, gemm.block_n),),
        hidden_states,
        w13,
        bias,
        h,
        routed.sorted_ids,
        routed.expert_ids,
        routed.total,
        I,
        H,
        routed.num_pairs,
        routed.num_rows,
        hidden_states.stride(0),
        hidden_states.stride(1),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        bias.stride(0),
        bias.stride(1),
        h.stride(0),
        h.stride(1),
        float(activation.alpha),
        float(activation.limit),
        TOP_K=routed.top_k,
        ACTIVATION=ACTIVATION_CODES[activation.name],
        HAS_BIAS=b13 is not None,
        BLOCK_M=block_m,
        BLOCK_N=gemm.block_n,
        BLOCK_K=gemm.block_k,
        GROUP_M=gemm.group_m,
        UPCAST_DOT=upcast,
        PRECISION=precision,
        num_warps=gemm.num_warps,
        num_stages=gemm.num_stages,
    )
    return h


def run_down(
    h: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    routed: RoutedBlocks,
    gemm: GemmConfig,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GEMM 2 with bias and routed weight fused, from ``h`` (fp32: split into two 16-bit
    dots for 16-bit weights): ``y [T * K, H]`` in ``h``'s dtype for the top-k sum (or into
    ``out``, any dtype, if given)."""
    H, I = w2.shape[1], w2.shape[2]
    upcast, precision = _dot_flags(w2.dtype)
    split, split_scale = _split_flags(w2.dtype) if h.dtype == torch.float32 else (False, 1.0)
    y = out if out is not None else torch.empty((routed.num_pairs, H), dtype=h.dtype, device=h.device)
    bias = b2 if b2 is not None else w2
    block_m = routed.block_m
    rt.launch(
        _moe_down_kernel,
        (triton.cdiv(routed.num_rows, block_m) * triton.cdiv(H, gemm.block_n),),
        h,
        w2,
        bias,
        y,
        routed.weights,
        routed.sorted_ids,
        routed.expert_ids,
        routed.total,
        H,
        I,
        routed.num_pairs,
        routed.num_rows,
        h.stride(0),
        h.stride(1),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        bias.stride(0),
        bias.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=b2 is not None,
        BLOCK_M=block_m,
        BLOCK_N=gemm.block_n,
        BLOCK_K=gemm.block_k,
        GROUP_M=gemm.group_m,
        UPCAST_DOT=upcast,
        PRECISION=precision,
        SPLIT=split,
        SPLIT_SCALE=split_scale,
        num_warps=gemm.num_warps,
        num_stages=gemm.num_stages,
    )
    return y


def run_sum(y: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``out[t] = sum_k y[t * K + k]`` in fp32, in a fixed order: a new ``[T, H]`` tensor
    in ``dtype`` (default: ``y``'s)."""
    H = y.shape[1]
    out = torch.empty((num_tokens, H), dtype=dtype or y.dtype, device=y.device)
    block_h = min(128, max(16, rt.next_power_of_2(H)))
    block_t = 16 if not INTERPRETER else min(64, max(16, rt.next_power_of_2(num_tokens)))
    rt.launch(
        _moe_sum_kernel,
        (triton.cdiv(num_tokens, block_t), triton.cdiv(H, block_h)),
        y,
        out,
        num_tokens,
        H,
        top_k * y.stride(0),
        y.stride(0),
        y.stride(1),
        out.stride(0),
        out.stride(1),
        TOP_K=top_k,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
    )
    return out


def fused_moe(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    activation: Activation,
    expert_map: torch.Tensor | None = None,
    config: MoEConfig | None = None,
    intermediate_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] * f_{ids[t,k]}(x[t])`` over local experts: a new ``[T, H]``
    tensor in ``hidden_states``' dtype (the ``torch`` reference kernel's contract).

    ``w13 [E, 2I, H]``, ``w2 [E, H, I]``, ``b13 [E, 2I]``, ``b2 [E, H]`` in the canonical
    layout; ``expert_map [E_global]`` maps global ids to local ones (-1: not local).
    ``config`` overrides the looked-up block sizes.  With no tokens, returns an empty
    tensor and launches nothing.  The intermediate ``h`` and the per-pair outputs are fp32;
    ``intermediate_dtype=hidden_states.dtype`` keeps them in the activation dtype instead,
    only to measure what fp32 costs (it loses precision, and fp16 overflows).
    """
    check_inputs(hidden_states, topk_weights, topk_ids, w13, w2, b13, b2, expert_map)
    T, H = hidden_states.shape
    if T == 0:
        return torch.empty((0, H), dtype=hidden_states.dtype, device=hidden_states.device)
    if activation.name not in ACTIVATION_CODES:
        raise ValueError(
            f"unknown activation {activation.name!r}; the triton kernel supports {', '.join(ACTIVATION_CODES)}"
        )
    E, I = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_experts = expert_map.numel() if expert_map is not None else E
    cfg = config or select_config(T, E, I, H, hidden_states.dtype, hidden_states.device)
    routed = route_blocks(topk_weights, topk_ids, cfg.block_m, num_experts, expert_map)
    h = run_up(hidden_states, w13, b13, routed, cfg.up, activation, intermediate_dtype)
    if top_k == 1:  # one pair per token: GEMM 2 writes the output rows directly
        out = torch.empty((T, H), dtype=hidden_states.dtype, device=hidden_states.device)
        return run_down(h, w2, b2, routed, cfg.down, out=out)
    return run_sum(run_down(h, w2, b2, routed, cfg.down), T, top_k, hidden_states.dtype)
