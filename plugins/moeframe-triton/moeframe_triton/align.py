"""Align: group the (token, k) pairs by expert, each group padded to a multiple of a block.

For ``topk_ids [T, K]`` the flat pair index is ``p = t * K + k``.  :func:`align_block_size`
returns

``sorted_ids [R]`` int32
    the pairs grouped by expert (expert 0's first), each group in increasing pair order
    and padded to a multiple of ``block_size`` with the sentinel ``T * K``; slots past the
    padded total also hold the sentinel.
``expert_ids [R // block_size]`` int32
    the expert of each block: its local index under ``expert_map`` (the global id without
    one), -1 for a block of an expert that is not local, and -1 past the padded total.
``num_tokens_post_padded [1]`` int32
    the padded total: the sum over experts of ``ceil(count / block_size) * block_size``.

``R`` (:func:`max_padded_rows`) depends on ``T * K``, the number of experts and the block
size only, never on the routing: the grids of the GEMMs are known without reading the
device (no host synchronisation; CUDA-graph friendly).

The work is done by Triton kernels, deterministically and without atomics: with few
pairs one kernel does everything; otherwise a count kernel (per chunk of pairs), a scan
kernel (per slice of experts, over the chunks) and a place kernel (per chunk) -- three
launches.
"""

from __future__ import annotations

import torch

from moeframe_triton import _triton as rt
from moeframe_triton._triton import tl, triton

__all__ = ["align_block_size", "max_padded_rows", "chunk_size_for"]

#: elements of the [chunk, experts] and [chunk, chunk] tiles the place kernel holds
_TILE_ELEMENTS = 16384
_MAX_CHUNK = 128
_SCAN_ROWS = 64
_SCAN_EXPERTS = 64


def max_padded_rows(num_pairs: int, num_experts: int, block_size: int) -> int:
    """An upper bound of the padded total, rounded up to a multiple of ``block_size``.

    At most ``min(num_experts, num_pairs)`` groups are non-empty and each adds at most
    ``block_size - 1`` padding slots.
    """
    if num_pairs == 0:
        return 0
    bound = num_pairs + min(num_experts, num_pairs) * (block_size - 1)
    return triton.cdiv(bound, block_size) * block_size


def _experts_padded(num_experts: int) -> int:
    return max(16, rt.next_power_of_2(num_experts))


def chunk_size_for(num_experts: int) -> int:
    """Pairs per program of the count and place kernels: a power of two in [16, 128]
    that keeps a [chunk, experts] tile near 16K elements."""
    return max(16, min(_MAX_CHUNK, _TILE_ELEMENTS // _experts_padded(num_experts)))


@triton.jit(do_not_specialize=["num_pairs"])  # token-count dependent: no recompiles
def _align_count_kernel(ids_ptr, counts_ptr, num_pairs, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """counts[chunk, e] = number of pairs of this chunk routed to expert e."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
    experts = tl.arange(0, E_PAD)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + pid * E_PAD + experts, tl.sum(onehot, axis=0))


@triton.jit(do_not_specialize=["num_chunks"])
def _align_scan_kernel(
    counts_ptr,
    chunk_offsets_ptr,
    totals_ptr,
    num_chunks,
    E_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    E_BLOCK: tl.constexpr,
):
    """chunk_offsets[c, e] = pairs of expert e in chunks before c; totals[e] = all of them."""
    pid = tl.program_id(0)
    experts = pid * E_BLOCK + tl.arange(0, E_BLOCK)
    carry = tl.zeros([E_BLOCK], dtype=tl.int32)
    for start in range(0, num_chunks, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = rows[:, None] < num_chunks
        offsets = rows[:, None] * E_PAD + experts[None, :]
        counts = tl.load(counts_ptr + offsets, mask=mask, other=0)
        inclusive = tl.cumsum(counts, axis=0)
        tl.store(chunk_offsets_ptr + offsets, inclusive - counts + carry[None, :], mask=mask)
        carry += tl.sum(counts, axis=0)
    tl.store(totals_ptr + experts, carry)


@triton.jit(do_not_specialize=["num_pairs", "max_rows"])
def _align_place_kernel(
    ids_ptr,
    chunk_offsets_ptr,
    totals_ptr,
    expert_map_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    total_ptr,
    num_pairs,
    max_rows,
    BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    """Write each pair of this chunk to its slot; fill padding slots and block experts."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    experts = tl.arange(0, E_PAD)
    lane = tl.arange(0, CHUNK)
    offs = pid * CHUNK + lane
    valid = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    onehot = ids[:, None] == experts[None, :]  # [CHUNK, E_PAD]
    if SINGLE_CHUNK:
        totals = tl.sum(onehot.to(tl.int32), axis=0)
        chunk_base = tl.zeros([CHUNK], dtype=tl.int32)
    else:
        totals = tl.load(totals_ptr + experts)
        chunk_base = tl.load(chunk_offsets_ptr + pid * E_PAD + ids, mask=valid, other=0)
    padded = (totals + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    group_start = tl.sum(tl.where(onehot, starts[None, :], 0), axis=1)
    # stable order: the rank of a pair among the earlier pairs of its expert in this chunk
    earlier_same = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    tl.store(sorted_ids_ptr + group_start + chunk_base + rank, offs, mask=valid)
    if pid == 0:
        tl.store(total_ptr, tl.sum(padded, axis=0))
    # rows [0, max_rows): the sentinel in padding slots, the expert of each block
    for row_start in range(pid * ROWS, max_rows, num_programs * ROWS):
        rows = row_start + tl.arange(0, ROWS)
        in_rows = rows < max_rows
        owner = (rows[:, None] >= starts[None, :]) & (rows[:, None] < ends[None, :])  # [ROWS, E_PAD]
        owned = tl.sum(owner.to(tl.int32), axis=1) > 0
        expert = tl.sum(tl.where(owner, experts[None, :], 0), axis=1)
        rank_in_group = rows - tl.sum(tl.where(owner, starts[None, :], 0), axis=1)
        count = tl.sum(tl.where(owner, totals[None, :], 0), axis=1)
        is_padding = (~owned) | (rank_in_group >= count)
        sentinel = tl.zeros([ROWS], dtype=tl.int32) + num_pairs
        tl.store(sorted_ids_ptr + rows, sentinel, mask=in_rows & is_padding)
        block_head = in_rows & (rows % BLOCK_SIZE == 0)
        if HAS_MAP:  # noqa: SIM108 (a constexpr branch Triton resolves at compile time)
            local = tl.load(expert_map_ptr + expert, mask=block_head & owned, other=-1)
        else:
            local = expert
        local = tl.where(owned, local, -1)
        tl.store(expert_ids_ptr + rows // BLOCK_SIZE, local, mask=block_head)


def align_block_size(
    topk_ids: torch.Tensor,
    block_size: int,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group ``topk_ids``' pairs by expert, padded to ``block_size`` (see the module doc).

    ``num_experts``: the number of global expert ids (``expert_map``'s length when given).
    ``chunk_size`` (a power of two >= 16) overrides the pairs per program, for tests.
    Returns ``(sorted_ids, expert_ids, num_tokens_post_padded)``; launches nothing when
    ``topk_ids`` is empty.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if expert_map is not None and expert_map.numel() != num_experts:
        raise ValueError(f"expert_map has {expert_map.numel()} entries, expected num_experts = {num_experts}")
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_pairs = ids.numel()
    max_rows = max_padded_rows(num_pairs, num_experts, block_size)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_rows // block_size, dtype=torch.int32, device=device)
    total = torch.zeros(1, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_ids, expert_ids, total

    e_pad = _experts_padded(num_experts)
    chunk = chunk_size or chunk_size_for(num_experts)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk}")
    num_chunks = triton.cdiv(num_pairs, chunk)
    single = num_chunks == 1
    emap = expert_map if expert_map is not None else total  # any int32 tensor when unused
    if single:
        chunk_offsets = totals = total  # unused by the single-chunk path
    else:
        counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
        chunk_offsets = torch.empty_like(counts)
        totals = torch.empty(e_pad, dtype=torch.int32, device=device)
        rt.launch(_align_count_kernel, (num_chunks,), ids, counts, num_pairs, CHUNK=chunk, E_PAD=e_pad)
        e_block = min(e_pad, _SCAN_EXPERTS)
        rt.launch(
            _align_scan_kernel,
            (e_pad // e_block,),
            counts,
            chunk_offsets,
            totals,
            num_chunks,
            E_PAD=e_pad,
            ROWS=_SCAN_ROWS,
            E_BLOCK=e_block,
        )
    rt.launch(
        _align_place_kernel,
        (num_chunks,),
        ids,
        chunk_offsets,
        totals,
        emap,
        sorted_ids,
        expert_ids,
        total,
        num_pairs,
        max_rows,
        BLOCK_SIZE=block_size,
        CHUNK=chunk,
        E_PAD=e_pad,
        ROWS=chunk,
        SINGLE_CHUNK=single,
        HAS_MAP=expert_map is not None,
    )
    return sorted_ids, expert_ids, total
