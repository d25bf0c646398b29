"""The expert_stats wrapper plugin, tested as its users would use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moeframe
import moeframe_expert_stats
from moeframe.cli.main import main

EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "examples" / "chunked-shared-stats.toml"


def routed_counts(layer: moeframe.MoELayer, x: torch.Tensor) -> torch.Tensor:
    logits = layer.stack.router.logits(x, layer.tensors)
    ids = layer.stack.router.select(logits, layer.tensors).ids
    return torch.bincount(ids.flatten(), minlength=layer.config.model.num_experts)


def test_registered_through_its_entry_point():
    entry = moeframe.get_registry().get("wrapper", "expert_stats")
    assert entry.provider.name == "moeframe-expert-stats" and entry.provider.version == "0.1.0"


@pytest.mark.parametrize(
    "wrappers",
    [
        [{"name": "expert_stats"}],
        [{"name": "chunking", "params": {"max_num_tokens": 4}}, {"name": "expert_stats"}],
        [{"name": "expert_stats"}, {"name": "chunking", "params": {"max_num_tokens": 4}}],
    ],
)
def test_counts_per_expert_cumulative_and_last_call(wrappers):
    layer = moeframe.MoELayer("qwen3-moe", overrides={"stack.wrappers": wrappers})
    x1, x2 = torch.randn(10, 256), torch.randn(7, 256)
    out = layer(x1)
    assert moeframe.compare(out, layer.reference()(x1)).ok  # transparent
    layer(x2)
    stats = moeframe_expert_stats.collect(layer)["layer"]
    assert stats.calls == 2
    assert torch.equal(stats.last_call, routed_counts(layer, x2))  # one call, even when chunked
    assert torch.equal(stats.cumulative, routed_counts(layer, x1) + routed_counts(layer, x2))
    assert int(stats.cumulative.sum()) == (10 + 7) * layer.config.model.top_k
    stats.reset()
    assert stats.calls == 0 and int(stats.cumulative.sum()) == 0


def test_collect_names_each_layer_of_a_model():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            cfg = moeframe.load_config("mixtral", {"stack.wrappers": ["expert_stats"]})
            self.layers = torch.nn.ModuleList([moeframe.MoELayer(cfg), moeframe.MoELayer(cfg.evolve({"seed": 1}))])

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    model = Model()
    model(torch.randn(5, 256))
    stats = moeframe_expert_stats.collect(model)
    assert sorted(stats) == ["layers.0", "layers.1"]
    assert all(int(s.last_call.sum()) == 5 * 2 for s in stats.values())


def test_zero_tokens_counts_nothing():
    layer = moeframe.MoELayer("qwen3-moe", overrides={"stack.wrappers": ["expert_stats"]})
    layer(torch.randn(0, 256))
    stats = moeframe_expert_stats.collect(layer)["layer"]
    assert stats.calls == 1 and int(stats.cumulative.sum()) == 0 and stats.imbalance() == 0.0


def test_moeframe_run_reports_the_counts(capsys):
    assert main(["run", str(EXAMPLE), "--tokens", "40", "--repeat", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    report = data["extra"]["expert_stats"]
    assert sum(report["last_call"]) == 40 * 4 and report["calls"] == 2  # warm-up + one timed call
    assert main(["run", str(EXAMPLE), "--tokens", "40", "--repeat", "1"]) == 0
    assert "expert_stats: tokens per expert (last call)" in capsys.readouterr().out


def test_loading_the_plugin_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, moeframe; moeframe.get_registry(); "
        "print('torch' in sys.modules, 'moeframe_expert_stats.wrapper' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.moeframe_conformance(kind="wrapper", name="expert_stats")
def test_conformance_kit(moeframe_case):
    """moeframe's pytest plugin: the wrapper against the reference stack (alone, in bf16,
    around and inside chunking at its boundaries) and reduce-once on two EP ranks."""
    moeframe_case.check()
