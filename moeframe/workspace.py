"""One workspace per process for staging buffers, shared by every layer.

Parts of a stack ask for buffers at build time (:meth:`Workspace.reserve`); the
workspace sizes one allocation per device to the largest set asked for and hands out
views of it at forward time (:meth:`Workspace.views`).  Layers run one after another, so
every layer's buffers start at offset 0 of the same allocation: the addresses stay the
same between calls and between layers (what CUDA graphs need).  A stack's outputs are
always fresh tensors, never views of the workspace.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import attrs
import torch

__all__ = ["WorkspaceRequest", "Workspace", "current_workspace", "ALIGNMENT"]

#: every buffer starts at a multiple of this many bytes
ALIGNMENT = 256


def _shape(dims: Iterable[int]) -> tuple[int, ...]:
    return tuple(dims)


@attrs.frozen(cache_hash=True)
class WorkspaceRequest:
    """A buffer a part needs during a forward: ``shape`` elements of ``dtype``."""

    name: str
    shape: tuple[int, ...] = attrs.field(converter=_shape)
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * torch.empty((), dtype=self.dtype).element_size()


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def layout_bytes(requests: Sequence[WorkspaceRequest]) -> int:
    """Bytes that ``requests``, used simultaneously, occupy in a workspace."""
    return sum(_aligned(r.nbytes) for r in requests)


class Workspace:
    """Staging buffers for every layer of a process (see the module docstring)."""

    def __init__(self) -> None:
        self._reserved: dict[torch.device, int] = {}
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._views: dict[tuple[torch.device, tuple[WorkspaceRequest, ...]], tuple[torch.Tensor, ...]] = {}
        self._lock = threading.Lock()

    def reserve(self, requests: Sequence[WorkspaceRequest], device: torch.device | str) -> int:
        """Make room for ``requests`` used together on ``device``; return their bytes."""
        device = torch.device(device)
        need = layout_bytes(requests)
        with self._lock:
            if need > self._reserved.get(device, 0):
                self._reserved[device] = need
        return need

    def reserved_bytes(self, device: torch.device | str) -> int:
        return self._reserved.get(torch.device(device), 0)

    def allocated_bytes(self, device: torch.device | str) -> int:
        buf = self._buffers.get(torch.device(device))
        return 0 if buf is None else buf.numel()

    def views(self, requests: Sequence[WorkspaceRequest], device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """Views for ``requests`` (reserved beforehand), laid out one after another.

        The same requests get the same views (same ``data_ptr``) on every call.
        """
        if not isinstance(device, torch.device):
            device = torch.device(device)
        key = (device, tuple(requests))
        cached = self._views.get(key)
        if cached is not None:
            return cached
        with self._lock:
            need = layout_bytes(requests)
            if need > self._reserved.get(device, 0):
                raise RuntimeError(
                    f"workspace: {need} bytes asked for on {device} but only "
                    f"{self._reserved.get(device, 0)} reserved; call reserve() when building the stack"
                )
            buf = self._buffers.get(device)
            if buf is None or buf.numel() < self._reserved[device]:
                # (re)allocate once to the largest reservation; earlier views are dropped
                buf = torch.empty(self._reserved[device], dtype=torch.uint8, device=device)
                self._buffers[device] = buf
                self._views = {k: v for k, v in self._views.items() if k[0] != device}
            out = []
            offset = 0
            for r in requests:
                nbytes = r.nbytes
                out.append(buf[offset : offset + nbytes].view(r.dtype).view(r.shape))
                offset += _aligned(nbytes)
            views = tuple(out)
            self._views[key] = views
            return views

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a view of one of the workspace's buffers.  While
        ``torch.compile`` traces, storages have no address: then whether it could be one
        (the workspace has buffers), so that the caller copies to be safe."""
        if torch.compiler.is_compiling():
            return bool(self._buffers)
        ptr = tensor.untyped_storage().data_ptr()
        return any(buf.untyped_storage().data_ptr() == ptr for buf in self._buffers.values())

    def release(self) -> None:
        """Free the buffers (they are allocated again on the next :meth:`views`)."""
        with self._lock:
            self._buffers.clear()
            self._views.clear()


_current = Workspace()


def current_workspace() -> Workspace:
    """The process-wide workspace that layers share unless given one."""
    return _current
