"""The align step against a pure-torch computation of the same grouping."""

from __future__ import annotations

import pytest
import torch

from moeframe_triton.align import align_block_size, chunk_size_for, max_padded_rows


def reference_align(
    topk_ids: torch.Tensor, block: int, num_experts: int, expert_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pairs grouped by expert in increasing pair order, each group padded with the
    sentinel to a multiple of ``block``; the (local) expert of each block; the total."""
    flat = topk_ids.reshape(-1)
    sentinel = flat.numel()
    slots, experts = [], []
    for e in range(num_experts):
        pairs = torch.nonzero(flat == e).flatten()
        padded = -(-pairs.numel() // block) * block
        group = torch.full((padded,), sentinel, dtype=torch.int64)
        group[: pairs.numel()] = pairs
        slots.append(group)
        local = e if expert_map is None else int(expert_map[e])
        experts += [local] * (padded // block)
    sorted_ids = torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)
    return sorted_ids, torch.tensor(experts, dtype=torch.int64), int(sorted_ids.numel())


def routing(m: int, topk: int, num_experts: int, seed: int) -> torch.Tensor:
    """Distinct experts per token, as a top-k gives."""
    g = torch.Generator().manual_seed(seed)
    return torch.topk(torch.rand(m, num_experts, generator=g), topk, dim=-1).indices


def even_local_map(num_experts: int) -> torch.Tensor:
    """Even experts local (indices 0, 1, ...), odd ones on another rank."""
    emap = torch.full((num_experts,), -1, dtype=torch.int32)
    local = torch.arange(0, num_experts, 2)
    emap[local] = torch.arange(local.numel(), dtype=torch.int32)
    return emap


def check_against_reference(
    topk_ids: torch.Tensor, block: int, num_experts: int, expert_map: torch.Tensor | None, chunk_size: int | None = None
) -> int:
    sorted_ids, expert_ids, total = align_block_size(topk_ids, block, num_experts, expert_map, chunk_size=chunk_size)
    exp_sorted, exp_experts, exp_total = reference_align(topk_ids, block, num_experts, expert_map)
    num_pairs = topk_ids.numel()
    assert sorted_ids.dtype == expert_ids.dtype == total.dtype == torch.int32
    assert int(total) == exp_total
    rows = max_padded_rows(num_pairs, num_experts, block)
    assert sorted_ids.numel() == rows >= exp_total and rows % block == 0
    assert expert_ids.numel() == rows // block
    assert torch.equal(sorted_ids[:exp_total].long(), exp_sorted)
    assert (sorted_ids[exp_total:] == num_pairs).all()  # past the total: the sentinel
    assert torch.equal(expert_ids[: exp_total // block].long(), exp_experts)
    assert (expert_ids[exp_total // block :] == -1).all()  # past the total: no expert
    return exp_total


def test_worked_example_pads_to_16():
    """The reference page's example: ids [[2,3,4],[1,2,4],[1,3,4],[1,2,3]], block 4."""
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]])
    sorted_ids, expert_ids, total = align_block_size(ids, 4, 5)
    assert int(total) == 16
    assert sorted_ids[:16].tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert expert_ids[:4].tolist() == [1, 2, 3, 4]
    assert check_against_reference(ids, 4, 5, None) == 16


@pytest.mark.parametrize("use_map", [False, True], ids=["nomap", "map"])
@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("num_experts", [4, 8, 33])
@pytest.mark.parametrize("topk", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 3, 33])
def test_align_matches_torch(m, topk, num_experts, block, use_map):
    ids = routing(m, topk, num_experts, seed=m * 1000 + topk * 100 + num_experts)
    emap = even_local_map(num_experts) if use_map else None
    check_against_reference(ids, block, num_experts, emap)


@pytest.mark.parametrize("use_map", [False, True], ids=["nomap", "map"])
def test_align_multi_chunk_path(use_map):
    """Several chunks (count, scan and place kernels), with chunk borders inside groups,
    and a skewed routing where one expert takes most pairs."""
    g = torch.Generator().manual_seed(7)
    ids = torch.where(
        torch.rand(70, 2, generator=g) < 0.6,
        torch.zeros(70, 2, dtype=torch.long),
        torch.randint(0, 8, (70, 2), generator=g),
    )
    emap = even_local_map(8) if use_map else None
    assert chunk_size_for(8) > 16  # the default would use fewer chunks
    total = check_against_reference(ids, 16, 8, emap, chunk_size=16)
    assert total > 16 * 2  # expert 0 spans several blocks


def test_align_int32_ids_and_no_pairs():
    ids = routing(5, 2, 8, seed=3).to(torch.int32)
    check_against_reference(ids, 16, 8, None)
    sorted_ids, expert_ids, total = align_block_size(torch.empty(0, 2, dtype=torch.long), 16, 8)
    assert sorted_ids.numel() == 0 and expert_ids.numel() == 0 and int(total) == 0


def test_align_refuses_a_map_of_the_wrong_length():
    with pytest.raises(ValueError, match="expert_map has 4 entries"):
        align_block_size(routing(2, 2, 8, 0), 16, 8, torch.zeros(4, dtype=torch.int32))
