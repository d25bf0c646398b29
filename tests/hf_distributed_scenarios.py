"""Code that runs on every rank of the transformers integration's distributed test
(test_transformers_patch.py): each rank builds the same tiny HF model, patches it with
expert parallelism and compares its logits with the unpatched one-process model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import hf_models

from moeframe.integrations.transformers import patch_model


def patched_with_experts_spread(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case: ``family``, ``overrides``, and ``per_rank_inputs`` (data parallelism:
    each rank its own prompts, of a batch and a length of its own, so the ranks' token
    counts differ) or the same prompts on every rank."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out = []
    for case in cases:
        model = hf_models.tiny_model(case["family"])
        if case.get("per_rank_inputs"):
            x = hf_models.tiny_inputs(batch=1 + rank, length=5 + 3 * rank, seed=10 + rank)
        else:
            x = hf_models.tiny_inputs()
        # every rank runs the same number of forwards (the dispatcher's collectives pair up):
        # no early stop at an end-of-sequence token
        generate = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
        with torch.no_grad():
            reference = model(x, output_router_logits=True)
            reference_tokens = model.generate(x, **generate)
        experts_before = model.get_submodule(f"model.layers.{hf_models.MOE_LAYERS[case['family']][0]}").state_dict()
        total = sum(v.numel() for k, v in experts_before.items() if ".experts." in k)
        report = patch_model(model, overrides=case["overrides"])
        with torch.no_grad():
            patched = model(x, output_router_logits=True)
            tokens = model.generate(x, **generate)
        block = model.get_submodule(report.blocks[0].name)
        held = sum(p.numel() for p in block.experts.parameters())
        out.append(
            {
                "case": case["id"],
                "tokens_in": int(x.numel()),
                "max_abs_error": (patched.logits - reference.logits).abs().max().item(),
                "router_logits_error": max(
                    (a - b).abs().max().item()
                    for a, b in zip(patched.router_logits, reference.router_logits, strict=True)
                ),
                "same_tokens": bool(torch.equal(tokens, reference_tokens)),
                "experts_held": held,
                "experts_total": total,
                "stack": list(report.blocks[0].stack),
            }
        )
    return out
