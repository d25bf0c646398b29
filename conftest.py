"""Shared fixtures for every test under the repository (core and plugins)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import moeframe.plugins
from moeframe.testing import FakeDistributions

PLUGIN_ENV = ("MOEFRAME_DISABLE_PLUGIN_AUTOLOAD", "MOEFRAME_PLUGINS", "MOEFRAME_STRICT_PLUGINS")


@pytest.fixture(autouse=True)
def _clean_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts with the plugin host unloaded and the plugin variables unset."""
    for var in PLUGIN_ENV:
        monkeypatch.delenv(var, raising=False)
    moeframe.plugins.reset()
    torch.manual_seed(0)
    yield
    moeframe.plugins.reset()


@pytest.fixture
def fake_dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDistributions:
    return FakeDistributions(tmp_path / "site", monkeypatch)
