"""Fixtures of the moeframe-triton tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """These tests alternate torch ops (the reference) with Triton's interpreter (Python
    and numpy).  Between torch's parallel regions its OpenMP workers spin, taking the
    core the interpreter needs: with one thread the plugin's tests run about twice as
    fast on a small machine.  Results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
