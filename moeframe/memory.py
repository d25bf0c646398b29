"""Bytes before allocation: what a layer or a command is about to allocate, what the
device has available, and a one-line refusal when it does not fit.

Every figure comes from the config by arithmetic (shapes and dtypes), never from
allocating: ``moeframe explain`` and these checks work for layers far larger than the
machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from moeframe.errors import InputError

__all__ = ["Need", "available_bytes", "activation_bytes", "check_fits", "format_bytes"]


@attrs.frozen
class Need:
    """Bytes one thing is about to take, and the keys or options that drive them."""

    what: str
    nbytes: int
    keys: str


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup (v2, or v1) memory limit, if one is set."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 1 << 60:
            return max(0, limit - usage)
    return None


def _host_available() -> int | None:
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = None
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when unknown): free GPU
    memory for CUDA; for the CPU, ``MemAvailable`` of ``/proc/meminfo`` (or
    ``os.sysconf``), bounded by a cgroup memory limit."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except Exception:
            return None
        return int(free)
    if device.type == "cpu":
        return _host_available()
    return None


def activation_bytes(model: Any, num_tokens: int) -> int:
    """An upper estimate of the activations of one forward on ``num_tokens`` tokens: the
    input and output ``[T, H]`` (and the reference's output), the router's fp32 logits
    ``[T, E]``, and per (token, expert) pair the fp32 intermediate ``[T*K, 3I]`` and
    output ``[T*K, H]``."""
    T, H, E, K, I = num_tokens, model.hidden_size, model.num_experts, model.top_k, model.intermediate_size
    item = model.torch_dtype.itemsize
    return 3 * T * H * item + T * E * 4 + T * K * (3 * I + H) * 4


def check_fits(needs: Sequence[Need], device: torch.device | str, what: str) -> None:
    """Raise one-line :class:`~moeframe.errors.InputError` when ``needs`` together exceed
    the memory available on ``device``, naming the largest parts and their keys."""
    total = sum(n.nbytes for n in needs)
    if total == 0:
        return
    free = available_bytes(device)
    if free is None or total <= free:
        return
    parts = "; ".join(
        f"{n.what} {format_bytes(n.nbytes)} ({n.keys})" for n in sorted(needs, key=lambda n: -n.nbytes) if n.nbytes
    )
    raise InputError(
        f"{what} needs about {format_bytes(total)} on {torch.device(device)} but {format_bytes(free)} is available: "
        f"{parts}; make these smaller"
    )
