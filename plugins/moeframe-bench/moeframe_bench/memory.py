"""Peak extra memory of a forward, measured exactly from torch's allocator.

Method: run the forward under ``torch.profiler.profile(profile_memory=True)``.  The
profiler records every allocation and every free of torch's CPU allocator as a
``[memory]`` event with its size (positive or negative) and a timestamp; summing them in
time order gives the allocated bytes after each event, and the maximum of that running
sum is the peak memory the forward needed on top of what was allocated before it (the
inputs and the weights).  Workspace buffers are allocated by a warm-up forward first, so
they count as held, not as extra; the benchmark reports them separately.  Parts that keep
scratch between calls (``release()``, as ``fused_cpu`` has) are asked to drop it before
each variant's warm-up, so that every variant's forward pays for its own.

Memory that does not go through torch's allocator (malloc inside a foreign library) is
not seen: moeframe's kernels allocate every buffer with torch for that reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["peak_extra_bytes"]


def _derived_weight_bytes(layer: Any) -> int:
    """The derived copy of the expert weights the layer's kernel keeps (``Kernel.derived_weight_bytes``:
    a repacked layout; 0 for kernels that read the canonical tensors only)."""
    e_local, two_i, hidden = layer.tensors["experts.w13"].shape
    return int(layer.stack.kernel.derived_weight_bytes(e_local, hidden, two_i // 2))


def _memory_events(prof: Any) -> list[tuple[int, int]]:
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as exc:  # pragma: no cover - a torch without kineto results
        raise RuntimeError(f"this torch's profiler does not expose its memory events ({exc})") from None
    return sorted((int(e.start_ns()), int(e.nbytes())) for e in events if e.name() == "[memory]")


def peak_extra_bytes(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """Run ``fn()`` once under the profiler; return ``(peak, net, result)``.

    ``peak``: the most bytes allocated at any moment during ``fn`` beyond what was
    allocated when it started; ``net``: bytes still allocated when it returned (its output,
    mostly).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    running = peak = 0
    for _, nbytes in _memory_events(prof):
        running += nbytes
        peak = max(peak, running)
    return peak, running, result


def forward_memory(config: Any, num_tokens: int, chunk: int) -> dict[str, Any]:
    """Peak extra memory of one forward of ``config``'s layer at ``num_tokens`` tokens,
    without wrappers and with ``chunking`` (``max_num_tokens = chunk``)."""
    from moeframe.layer import MoELayer
    from moeframe.plugins import get_registry

    model = config.model
    variants: list[tuple[str, Any]] = [("no wrappers", config.evolve({"stack.wrappers": []}))]
    if "chunking" in get_registry().names("wrapper"):
        variants.append(
            (
                f"chunking ({chunk})",
                config.evolve({"stack.wrappers": [{"name": "chunking", "params": {"max_num_tokens": chunk}}]}),
            )
        )
    x = torch.randn(num_tokens, model.hidden_size, generator=torch.Generator().manual_seed(11)).to(model.torch_dtype)
    out: dict[str, Any] = {
        "dtype": model.dtype,
        "tokens": num_tokens,
        "input_bytes": x.nbytes,
        "output_bytes": x.nbytes,
        "variants": [],
    }
    if len(variants) == 1:
        out["skipped_chunking"] = "wrapper 'chunking' is not registered (see `moeframe list wrapper`)"
    for label, cfg in variants:
        layer = MoELayer(cfg)
        layer.stack.release()  # buffers kept from an earlier variant would not be counted
        with torch.inference_mode():
            layer(x[:1])  # allocates the workspace: held memory, not extra
            peak, net, _ = peak_extra_bytes(functools.partial(layer, x))
        out["variants"].append(
            {
                "stack": label,
                "peak_extra_bytes": peak,
                "net_bytes": net,
                "workspace_bytes": layer.stack.workspace_bytes,
                "weight_bytes": sum(t.nbytes for t in layer.tensors.values()),
                "packed_weight_bytes": _derived_weight_bytes(layer),
            }
        )
        del layer
    return out
