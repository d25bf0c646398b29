"""Helpers for testing moeframe and its plugins (used by moeframe's own suite).

``FakeDistributions`` puts tiny plugin distributions on ``sys.path``;
``small_config`` gives a small config dict to build on.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

__all__ = ["FakeDistributions", "small_config"]


class FakeDistributions:
    """Installs tiny plugin distributions (a dist-info with entry_points.txt) on sys.path."""

    def __init__(self, root: Path, monkeypatch: "pytest.MonkeyPatch") -> None:
        self.root = root
        self.monkeypatch = monkeypatch
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.syspath_prepend(str(root))

    def add(self, dist: str, version: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
        """``modules``: module name -> source; ``entry_points``: name -> 'module[:attr]'."""
        for module, source in modules.items():
            path = self.root / (module.replace(".", "/") + ".py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source))
            sys.modules.pop(module, None)
            self.monkeypatch.delitem(sys.modules, module, raising=False)
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[moeframe]\n{eps}\n")
        importlib.invalidate_caches()


def small_config(**model: Any) -> dict[str, Any]:
    """A small config dict (E=8, K=2, H=32, I=16) in the file format's shape."""
    base = {"num_experts": 8, "top_k": 2, "hidden_size": 32, "intermediate_size": 16}
    base.update(model)
    return {"seed": 0, "model": base, "router": {"name": "softmax_topk"}}
