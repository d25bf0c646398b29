"""Code that runs on every rank of the distributed tests (see test_distributed.py).

Each function runs inside an initialised gloo process group and returns JSON-able data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import moeframe
from moeframe.config import unstructure
from moeframe.errors import ConfigError
from moeframe.parallel import Collectives, CountingCollectives, ParallelContext

_references: dict[tuple, moeframe.MoELayer] = {}


def _reference(preset: str, wrappers: list | None) -> moeframe.MoELayer:
    key = (preset, repr(wrappers))
    if key not in _references:
        overrides = {} if wrappers is None else {"stack.wrappers": wrappers}
        _references[key] = moeframe.MoELayer(preset, overrides=overrides, parallel=ParallelContext.single()).reference()
    return _references[key]


def _inputs(hidden: int, tokens: int, dp_rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000 + dp_rank)
    return torch.randn(tokens, hidden, generator=g)


def equivalence(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Build each case's layer on this rank and compare it with the single-process reference."""
    out = []
    for case in cases:
        overrides = dict(case["overrides"])
        counting = CountingCollectives(Collectives())
        cfg = moeframe.load_config(case["preset"], overrides)
        parallel = ParallelContext.from_config(cfg.parallel, collectives=counting)
        layer = moeframe.MoELayer(cfg, parallel=parallel)
        tokens = case["tokens"][parallel.dp_rank]
        x = _inputs(cfg.model.hidden_size, tokens, parallel.dp_rank)
        counting.reset()
        y = layer(x)
        counts = dict(counting.counts)
        wrappers = [{"name": w.name, "params": unstructure(w.params)} for w in cfg.stack.wrappers]
        ref = _reference(case["preset"], wrappers)(x)
        cmp = moeframe.compare(y, ref, moeframe.numerics.Tolerance(atol=1e-5, rtol=1e-5))
        out.append({
            "case": case["id"], "rank": parallel.rank, "ok": cmp.ok, "max_abs_error": cmp.max_abs_error,
            "counts": counts, "output_reduced": layer.stack.output_reduced, "tokens": tokens,
            "expert_weight_bytes": layer.explain()["expert_weight_bytes"],
            "local_experts": parallel.local_experts(cfg.model.num_experts),
        })
    return out


def config_mismatch(key: str, values: list[Any]) -> str:
    """Each rank builds a layer with its own value of ``key``; returns the error each sees."""
    rank = dist.get_rank()
    cfg = moeframe.load_config("qwen3-moe", {key: values[rank]})
    try:
        moeframe.MoELayer(cfg, parallel=ParallelContext.from_config(cfg.parallel))
    except ConfigError as exc:
        return str(exc)
    return "no error"
