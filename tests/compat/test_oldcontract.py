"""Compatibility: a plugin written against plugin API 1 keeps working unchanged.

``oldcontract_plugin/`` is a third-party distribution (a kernel, a wrapper and a router)
written only from the plugin guide as it stood before the contract was redesigned.  It is
installed here as a real distribution (its package and a ``dist-info`` with the entry
points of its ``pyproject.toml``) on ``sys.path``, then loaded, listed, checked and run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import moeframe
from moeframe.plugins import get_host, get_registry

PLUGIN = Path(__file__).parent / "oldcontract_plugin"
DIST = "moeframe-oldcontract"


def install(site: Path) -> None:
    """Install the plugin into the folder ``site``: what pip puts in site-packages."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    site.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PLUGIN / "moeframe_oldcontract", site / "moeframe_oldcontract",
                    ignore=shutil.ignore_patterns("__pycache__"))
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = "".join(f"{name} = {target}\n" for name, target in project["entry-points"]["moeframe"].items())
    (info / "entry_points.txt").write_text(f"[moeframe]\n{eps}")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    install(site)
    monkeypatch.syspath_prepend(str(site))
    for name in [m for m in sys.modules if m.startswith("moeframe_oldcontract")]:
        monkeypatch.delitem(sys.modules, name)
    return site


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    for var in ("MOEFRAME_DISABLE_PLUGIN_AUTOLOAD", "MOEFRAME_PLUGINS", "MOEFRAME_STRICT_PLUGINS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "moeframe", *args], capture_output=True, text=True, env=env, timeout=300)


def config(**stack) -> dict:
    return {
        "seed": 3,
        "model": {"num_experts": 8, "top_k": 2, "hidden_size": 32, "intermediate_size": 16},
        "router": {"name": "old_softmax", "temperature": 1.0},
        "stack": stack,
    }


def test_it_loads_with_its_distribution(site):
    registry = get_registry()
    for kind, name in (("kernel", "old_gathered"), ("wrapper", "old_staging"), ("router", "old_softmax")):
        assert str(registry.get(kind, name).provider) == f"{DIST} 0.1.0"
    record = next(r for r in get_host().plugins if r.name == DIST)
    assert record.ok, record.errors
    assert record.provides == {"router": ["old_softmax"], "kernel": ["old_gathered"], "wrapper": ["old_staging"]}


def test_moeframe_plugins_lists_it(site):
    proc = run_cli(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugin = next(p for p in json.loads(proc.stdout)["plugins"] if p["name"] == DIST)
    assert plugin["status"] == "ok", plugin["errors"]
    assert plugin["provides"] == {"kernel": ["old_gathered"], "router": ["old_softmax"], "wrapper": ["old_staging"]}


def test_moeframe_check_passes_its_kernel(site):
    proc = run_cli(site, "check", "old_gathered", "--tokens", "0,1,7", "--dtype", "float32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "old_gathered" in proc.stdout


@pytest.mark.parametrize("tokens", [0, 1, 40])
def test_its_stack_matches_the_reference(site, tokens):
    layer = moeframe.MoELayer(config(kernel="old_gathered", wrappers=[
        {"name": "chunking", "params": {"max_num_tokens": 16}},
        {"name": "old_staging", "params": {"max_tokens": 8}},
    ]))
    x = torch.randn(tokens, 32)
    out = layer(x)
    assert out.shape == (tokens, 32)
    assert moeframe.compare(out, layer.reference()(x)).ok
    wrapper = layer.stack.parts[1].instance
    assert wrapper.calls == -(-tokens // 16)  # once per chunk of 16
    assert wrapper.report()["summary"].startswith("old_staging:")
    kernel = next(p for p in layer.stack.parts if p.kind == "kernel")
    assert kernel.describe()["details"]["calls"] == wrapper.calls  # one kernel call per chunk
    layer.stack.release()
    assert kernel.instance.calls == 0


def test_its_router_computes_a_renormalised_softmax_top_k(site):
    """At temperature 1 it chooses what the builtin softmax_topk (renormalize) chooses."""
    ours = moeframe.MoELayer(config())
    builtin = moeframe.MoELayer(dict(config(), router={"name": "softmax_topk", "renormalize": True}))
    builtin.load_state_dict(ours.state_dict())
    x = torch.randn(9, 32)
    assert moeframe.compare(ours(x), builtin(x)).ok


def test_its_refusals_still_refuse(site):
    with pytest.raises(moeframe.UserError, match=r"old_softmax chooses at most 1 experts \(model.top_k = 2\)"):
        moeframe.MoELayer(dict(config(), router={"name": "old_softmax", "max_top_k": 1}))
    with pytest.raises(moeframe.UserError, match=r"old_staging does not support tensor parallelism"):
        _stack_with_tp(config(wrappers=["old_staging"]))
    with pytest.raises(moeframe.UserError, match=r"'old_gathered' does not support model.dtype = 'float16'"):
        moeframe.MoELayer(dict(config(kernel="old_gathered"), model=dict(config()["model"], dtype="float16")))


def _stack_with_tp(cfg: dict) -> None:
    from moeframe.composer import check_stack

    check_stack(moeframe.load_config(cfg, {"parallel.tp_size": 2}))


def test_what_moved_on_warns_once_saying_what_to_do(site):
    from moeframe.plugins import MoeframeDeprecationWarning

    with pytest.warns(MoeframeDeprecationWarning) as caught:
        moeframe.MoELayer(config(kernel="old_gathered", wrappers=["old_staging"]))
        moeframe.MoELayer(config(wrappers=["old_staging"]))
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, MoeframeDeprecationWarning))
    assert len(messages) == 2  # once per strategy and member, not per use
    assert messages[0].startswith(f"router 'old_softmax' from {DIST} 0.1.0: TemperatureSoftmaxRouter.check_config is "
                                  "deprecated")
    assert "supports(cls, config, params) returning the reason as a string, or None" in messages[0]
    assert messages[1].startswith(f"wrapper 'old_staging' from {DIST} 0.1.0: StagingWrapper.check_stack is deprecated")
    assert "rename the classmethod check_stack(cls, config) to supports(cls, config, params)" in messages[1]
