"""Code that runs on every rank of the transformers integration's distributed test
(test_transformers_patch.py): each rank builds the same tiny HF model, patches it with
expert parallelism and compares its logits with the unpatched one-process model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

import hf_models  # noqa: E402

from moeframe.integrations.transformers import patch_model  # noqa: E402


def patched_with_experts_spread(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for case in cases:
        model = hf_models.tiny_model(case["family"])
        x = hf_models.tiny_inputs()
        with torch.no_grad():
            reference = model(x, output_router_logits=True)
            reference_tokens = model.generate(x, max_new_tokens=3, do_sample=False)
        experts_before = model.get_submodule(f"model.layers.{hf_models.MOE_LAYERS[case['family']][0]}").state_dict()
        total = sum(v.numel() for k, v in experts_before.items() if ".experts." in k)
        report = patch_model(model, overrides=case["overrides"])
        with torch.no_grad():
            patched = model(x, output_router_logits=True)
            tokens = model.generate(x, max_new_tokens=3, do_sample=False)
        block = model.get_submodule(report.blocks[0].name)
        held = sum(p.numel() for p in block.experts.parameters())
        out.append({
            "case": case["id"],
            "max_abs_error": (patched.logits - reference.logits).abs().max().item(),
            "router_logits_error": max((a - b).abs().max().item()
                                       for a, b in zip(patched.router_logits, reference.router_logits)),
            "same_tokens": bool(torch.equal(tokens, reference_tokens)),
            "experts_held": held,
            "experts_total": total,
            "stack": list(report.blocks[0].stack),
        })
    return out
