"""bf16 expert weights repacked for AMX-BF16 / AVX512-BF16, and the native entry point that uses them.

The ``amx_bf16`` and ``avx512_bf16`` variants of ``fused_cpu``'s native core compute the
experts that receive many tokens in one call with bf16 tile products (``csrc/bf16_experts.c``).
Those want the weights in the VNNI layout of an AMX B tile (pairs of the reduction
dimension interleaved, 16 columns of 32 bf16 per 64-byte row, one 1 KiB tile contiguous):

* ``w13 [E, 2I, H]`` -> ``[E, Ip/16, 2 (gate, up), Hp/32, 16, 16, 2]``
* ``w2 [E, H, I]``   -> ``[E, Hp/16, Ip/32, 16, 16, 2]``

with ``Hp``, ``Ip`` = ``H``, ``I`` rounded up to multiples of 32 (zeros in the padding).
The canonical tensors stay what users load and save; the packed copy is derived from them
once and kept in :data:`PACKED` (a cache keyed on the memory the weights view and their
version counters: a weight changed in place or replaced is packed anew, a new tensor object
over the same weights finds the copy; the copy is dropped with its weights). Its memory
(about the size of the bf16 weights again) is :attr:`PackCache.nbytes`, which ``moeframe
explain`` shows and the memory estimate counts (``FusedCpuKernel.packed_weight_bytes``).
Nothing here is used for fp32 or fp16 weights, or on variants without the bf16 kernels.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref
from typing import Any

import attrs
import torch

__all__ = ["PackedExperts", "PackCache", "PACKED", "pack_experts", "packed_shapes", "Bf16Experts", "bind"]

#: GEMM-1 neuron blocks and the reduction's block (one AMX tile: 16 rows of 32 bf16)
BLOCK_N, BLOCK_K = 16, 32


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def packed_shapes(num_experts: int, hidden: int, intermediate: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of the packed ``w13`` and ``w2`` (bf16 elements)."""
    hp, ip = _round_up(hidden, BLOCK_K), _round_up(intermediate, BLOCK_K)
    return (
        (num_experts, ip // 16, 2, hp // 32, 16, 16, 2),
        (num_experts, hp // 16, ip // 32, 16, 16, 2),
    )


def packed_bytes(num_experts: int, hidden: int, intermediate: int) -> int:
    """Bytes of the packed copy of ``num_experts`` bf16 experts of this shape."""
    s13, s2 = packed_shapes(num_experts, hidden, intermediate)
    return 2 * (int(torch.Size(s13).numel()) + int(torch.Size(s2).numel()))


def _aligned_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous bf16 tensor whose data starts on a 64-byte boundary."""
    numel = int(torch.Size(shape).numel())
    flat = torch.empty(numel + 32, dtype=torch.bfloat16)
    skip = (-flat.data_ptr() % 64) // 2
    return flat[skip : skip + numel].view(shape)


@attrs.frozen
class PackedExperts:
    """The packed copy of one pair of expert tensors (see the module docstring)."""

    w13: torch.Tensor
    w2: torch.Tensor
    hidden: int
    intermediate: int

    @property
    def hidden_padded(self) -> int:
        return _round_up(self.hidden, BLOCK_K)

    @property
    def intermediate_padded(self) -> int:
        return _round_up(self.intermediate, BLOCK_K)

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> PackedExperts:
    """Repack canonical bf16 ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` (no cache)."""
    E, two_i, H = w13.shape
    I = two_i // 2
    hp, ip = _round_up(H, BLOCK_K), _round_up(I, BLOCK_K)
    s13, s2 = packed_shapes(E, H, I)
    with torch.no_grad():
        src = w13.detach().to(torch.bfloat16).view(E, 2, I, H)
        padded = torch.zeros(E, 2, ip, hp, dtype=torch.bfloat16)
        padded[:, :, :I, :H] = src
        p13 = _aligned_empty(s13)
        p13.copy_(padded.view(E, 2, ip // 16, 16, hp // 32, 16, 2).permute(0, 2, 1, 4, 5, 3, 6))
        padded2 = torch.zeros(E, hp, ip, dtype=torch.bfloat16)
        padded2[:, :H, :I] = w2.detach().to(torch.bfloat16)
        p2 = _aligned_empty(s2)
        p2.copy_(padded2.view(E, hp // 16, 16, ip // 32, 16, 2).permute(0, 1, 3, 4, 2, 5))
    return PackedExperts(p13, p2, H, I)


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _where(t: torch.Tensor) -> tuple[Any, ...]:
    """Which elements of which memory ``t`` views: a new tensor object over the same weights
    (``detach()``, a view made again by an integration's forward) gives the same answer."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


@attrs.define
class _Entry:
    refs: tuple[list[weakref.ref[torch.Tensor]], list[weakref.ref[torch.Tensor]]]  # w13's, w2's
    versions: tuple[int | None, int | None]
    packed: PackedExperts


class PackCache:
    """Packed copies of expert weights, one per pair of weights in memory.

    :meth:`get` returns the copy of ``(w13, w2)``, packing it on first use and again when
    either was written in place (its ``_version`` moved: views and ``detach()``-ed tensors
    share their base's counter; inference tensors have none, so an in-place write to one is
    not seen).  Entries are keyed on the memory the tensors view (storage, offset, shape,
    strides, dtype), not on the tensor objects, so that a new tensor object over the same
    weights (``patch_model`` rebuilt after ``unpatch_model``, a view made per call) finds the
    copy; it is dropped when the tensor objects it was asked for are freed (all those of
    ``w13`` or all those of ``w2``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], _Entry] = {}
        self.packs = 0  # how many times something was packed (for tests and explain)

    @staticmethod
    def _key(w13: torch.Tensor, w2: torch.Tensor) -> tuple[Any, ...]:
        return (_where(w13), _where(w2))

    def get(self, w13: torch.Tensor, w2: torch.Tensor) -> PackedExperts:
        key = self._key(w13, w2)
        versions = (_version(w13), _version(w2))
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.versions != versions:
                entry = self._entries[key] = _Entry(([], []), versions, pack_experts(w13, w2))
                self.packs += 1
            forget = functools.partial(self._forget, key)
            for refs, t in zip(entry.refs, (w13, w2), strict=True):
                if not any(ref() is t for ref in refs):
                    refs.append(weakref.ref(t, forget))
            return entry.packed

    def _forget(self, key: tuple[Any, ...], ref: weakref.ref[torch.Tensor]) -> None:
        """``ref``'s tensor was freed: drop the copy once no tensor object it was asked for
        remains on either side (the memory of that side may then be freed and reused, so
        its address could name other weights)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            for refs in entry.refs:
                refs[:] = [r for r in refs if r is not ref and r() is not None]
            if not all(entry.refs):
                del self._entries[key]

    def clear(self) -> None:
        """Drop every packed copy (they are packed again on next use)."""
        with self._lock:
            self._entries.clear()

    def bytes_for(self, w13: torch.Tensor, w2: torch.Tensor) -> int:
        """Bytes of the packed copy held for ``(w13, w2)`` (0 if none is held)."""
        with self._lock:
            entry = self._entries.get(self._key(w13, w2))
            return entry.packed.nbytes if entry is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes of every packed copy held."""
        with self._lock:
            return sum(e.packed.nbytes for e in self._entries.values())


#: the process's cache of packed expert weights (shared by every layer and integration)
PACKED = PackCache()


_ACTIVATION_CODES = {"silu": 0, "gelu": 1, "swigluoai": 2}
_long, _int, _float, _ptr = ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class Bf16Experts:
    """The bf16 kernels of a loaded native library (``moe_bf16_experts``)."""

    def __init__(self, lib: Any) -> None:
        lib.moe_bf16_kernels.restype = _int
        lib.moe_bf16_kernels.argtypes = []
        lib.moe_amx_enable.restype = _int
        lib.moe_amx_enable.argtypes = []
        lib.moe_bf16_experts.restype = _int
        lib.moe_bf16_experts.argtypes = [
            _int, _ptr, _long, _long, _ptr, _ptr, _ptr, _ptr, _ptr, _long, _ptr, _ptr, _ptr, _ptr,
            _long, _long, _int, _float, _float, _ptr, _ptr, _ptr, _int,
        ]  # fmt: skip
        self._lib = lib
        kernels = int(lib.moe_bf16_kernels())
        self.amx_compiled = bool(kernels & 2)
        self.amx = self.amx_compiled and bool(lib.moe_amx_enable())
        #: why AMX is not used although compiled in (None: it is, or it is not compiled)
        self.amx_refused = (
            "Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"
            if self.amx_compiled and not self.amx
            else None
        )

    @property
    def kind(self) -> str:
        """``"amx"`` (AMX-BF16 tiles) or ``"avx512_bf16"`` (``vdpbf16ps``)."""
        return "amx" if self.amx else "avx512_bf16"

    def run(
        self,
        x: torch.Tensor,
        tok: torch.Tensor,
        tw: torch.Tensor,
        experts: list[int],
        counts: list[int],
        packed: PackedExperts,
        b13: torch.Tensor | None,
        b2: torch.Tensor | None,
        activation: Any,
        acc: torch.Tensor,
        max_rows: int = 8192,
        take: Any = None,
    ) -> None:
        """``acc[tok[r]] += tw[r] * f_e(x[tok[r]])`` for the rows of each expert in turn
        (rows grouped by expert, ``counts`` of each), ``acc [T, H]`` fp32; at most about
        ``max_rows`` rows per native call (bounds the call's gathered copies).  ``take(name,
        numel, dtype)`` lends the call's buffers (e.g. fused_cpu's scratch pool, kept between
        calls: fresh pages cost); default: new tensors."""
        H, I = packed.hidden, packed.intermediate
        hp, ip = packed.hidden_padded, packed.intermediate_padded
        nthreads = torch.get_num_threads()
        g0, r0 = 0, 0
        while g0 < len(experts):
            g1, rows = g0, 0
            while g1 < len(experts) and (g1 == g0 or rows + _round_up(counts[g1], 16) <= max_rows):
                rows += _round_up(counts[g1], 16)
                g1 += 1
            cnt = counts[g0:g1]
            row_off = torch.tensor([0, *cnt], dtype=torch.int64).cumsum(0).to(torch.int32)
            hrow_off = torch.tensor([0, *(_round_up(c, 16) for c in cnt)], dtype=torch.int64).cumsum(0).to(torch.int32)
            n = int(row_off[-1])
            tok_g = tok[r0 : r0 + n].to(torch.int32).contiguous()
            tw_g = tw[r0 : r0 + n].to(torch.float32).contiguous()
            ex = torch.tensor(experts[g0:g1], dtype=torch.int32)
            if take is None:
                xg, hbuf = _aligned_empty((rows, hp)), _aligned_empty((rows, ip))
            else:  # (the kernels need no alignment of these two)
                xg, hbuf = take("bf16_x", rows * hp, torch.bfloat16), take("bf16_h", rows * ip, torch.bfloat16)
            status = self._lib.moe_bf16_experts(
                int(self.amx), x.data_ptr(), H, hp, tok_g.data_ptr(), tw_g.data_ptr(), ex.data_ptr(),
                row_off.data_ptr(), hrow_off.data_ptr(), g1 - g0, packed.w13.data_ptr(), packed.w2.data_ptr(),
                None if b13 is None else b13.data_ptr(), None if b2 is None else b2.data_ptr(), I, ip,
                _ACTIVATION_CODES[activation.name], activation.alpha, activation.limit, acc.data_ptr(),
                xg.data_ptr(), hbuf.data_ptr(), nthreads,
            )  # fmt: skip
            if status != 0:
                raise RuntimeError(f"moe_bf16_experts returned {status}")
            g0, r0 = g1, r0 + n


def bind(lib: Any) -> Bf16Experts | None:
    """The bf16 kernels of ``lib`` (a :class:`ctypes.CDLL`), or ``None`` if it has none."""
    try:
        lib.moe_bf16_kernels  # noqa: B018 -- probing for the symbol
    except AttributeError:
        return None
    return Bf16Experts(lib)
