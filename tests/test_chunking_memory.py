"""Chunking bounds a forward's extra memory by the chunk, not by the token count.

Measured exactly (every allocation of torch's CPU allocator, through the profiler), so the
comparison is deterministic; it is a ratio within one run, never a timing.
"""

from __future__ import annotations

import torch

import moeframe
from moeframe_bench.memory import peak_extra_bytes


def extra_bytes(layer: moeframe.MoELayer, num_tokens: int) -> int:
    """Peak bytes a forward allocates beyond its input, its output and the router logits
    (the stack's inputs: [T, E], computed once before the stack)."""
    model = layer.config.model
    x = torch.randn(num_tokens, model.hidden_size)
    with torch.inference_mode():
        layer(x[:1])  # the workspace is allocated once, before: it is held, not extra
        peak, _, _ = peak_extra_bytes(lambda: layer(x))
    output = x.numel() * x.element_size()
    logits = num_tokens * model.num_experts * 4
    return peak - output - logits


def test_peak_extra_memory_follows_the_chunk_not_the_tokens():
    chunk, many = 32, 32 * 16
    overrides = {"stack.kernel": "fused_cpu", "stack.kernel_params.backend": "torch"}
    chunked = moeframe.MoELayer("qwen3-moe", overrides={
        **overrides, "stack.wrappers": [{"name": "chunking", "params": {"max_num_tokens": chunk}}]})
    plain = moeframe.MoELayer("qwen3-moe", overrides=overrides)
    one_chunk = extra_bytes(plain, chunk)          # the working set of one chunk
    unchunked = extra_bytes(plain, many)
    with_chunking = extra_bytes(chunked, many)
    assert unchunked > 8 * one_chunk               # without chunking it grows with T
    assert with_chunking < 3 * one_chunk           # with chunking a small multiple of one chunk's
