"""The native core of the ``fused_cpu`` kernel: build, verify, load and bind one ISA variant.

Each variant (:data:`moeframe.kernels.cpu_isa.VARIANTS`) is one C file in
``moeframe/kernels/csrc/`` that includes ``fused_cpu_abi.h``, the ABI every variant
exports; it needs a C compiler with OpenMP (``cc``, or ``$CC``) and Linux or macOS.  It is
compiled once per machine by :mod:`moeframe.kernels.native_build` (a cache that is checked
for ownership and permissions, one build under a lock, a content hash verified before
every load) and loaded with :mod:`ctypes`, which releases the GIL during the call.  The
library shares torch's OpenMP runtime (torch loads ``libgomp.so.1`` first, and the
library's dependency on that name resolves to it), so its threads are torch's threads and
``torch.set_num_threads`` governs both.

:func:`load_native` returns the library for a variant, or raises :class:`NativeUnavailable`
saying why (the kernel then runs its torch path).  Every buffer is allocated by the
caller with torch, so that ``torch.profiler`` sees all of the kernel's memory.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

from moeframe.kernels.native_build import (
    CachedLibrary,
    LibrarySpec,
    NativeUnavailable,
    cache_dir,
    ensure_library,
    find_compiler,
)

__all__ = [
    "ABI_VERSION",
    "NativeUnavailable",
    "NativeLibrary",
    "load_native",
    "build_native",
    "library_spec",
    "cache_dir",
]

#: the ``MOE_ABI_VERSION`` of ``csrc/fused_cpu_abi.h`` this binding speaks
ABI_VERSION = 1
CSRC = Path(__file__).parent / "csrc"
#: warnings on, for every variant (the sources are kept warning-free)
WARNING_FLAGS = ("-Wall", "-Wextra")

_long, _int, _float, _ptr = ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
#: ``moe_forward``'s parameters, in order, named as in ``fused_cpu_abi.h``: the call is
#: made by name (:meth:`NativeLibrary.forward`), so a missing, extra or misplaced
#: argument is an error instead of a shifted call
FORWARD_PARAMS: tuple[tuple[str, Any], ...] = (
    ("dtype", _int), ("x", _ptr), ("T", _long), ("H", _long), ("ids", _ptr), ("tw", _ptr), ("topk", _long),
    ("expert_map", _ptr), ("num_experts", _long), ("w13", _ptr), ("w2", _ptr), ("b13", _ptr), ("b2", _ptr),
    ("local_experts", _long), ("I", _long), ("act_kind", _int), ("alpha", _float), ("limit", _float),
    ("out", _ptr), ("acc", _ptr), ("ints", _ptr), ("hbuf", _ptr), ("hbuf_slots", _long), ("scratch", _ptr),
    ("scratch_floats", _long), ("nthreads", _int),
)  # fmt: skip


def library_spec(isa: str) -> LibrarySpec:
    """What the library of variant ``isa`` is built from: its C files (every one compiled),
    the headers, flags."""
    from moeframe.kernels.cpu_isa import VARIANTS

    variant = VARIANTS[isa]
    headers = sorted(CSRC.glob("*.h"))
    sources = {p.name: p.read_text() for p in variant.paths}
    sources.update({h.name: h.read_text() for h in headers})
    return LibrarySpec(f"fused_cpu-{isa}", sources, (*variant.cflags, *WARNING_FLAGS))


class NativeLibrary:
    """One loaded variant: :meth:`forward` and the buffer sizes it needs."""

    def __init__(self, path: Path, isa: str, found: CachedLibrary | None = None) -> None:
        import torch  # noqa: F401  -- torch's libgomp must be loaded first

        self.path = path
        self.isa = isa
        self.sha256 = found.sha256 if found is not None else ""
        try:
            lib = found.load() if found is not None else ctypes.CDLL(str(path))
        except OSError as exc:
            raise NativeUnavailable(f"cannot load the compiled library {path}: {exc}") from None
        try:
            lib.moe_abi_version.restype = _int
            lib.moe_abi_version.argtypes = []
            version = int(lib.moe_abi_version())
        except AttributeError:
            version = 0
        if version != ABI_VERSION:
            raise NativeUnavailable(
                f"the library {path} speaks C ABI version {version}, this moeframe speaks {ABI_VERSION} (rebuild it)"
            )
        lib.moe_forward.restype = _int
        lib.moe_forward.argtypes = [ctype for _, ctype in FORWARD_PARAMS]
        lib.moe_scratch_floats.restype = _long
        lib.moe_scratch_floats.argtypes = [_long, _long, _long]
        lib.moe_item_max_slots.restype = _long
        lib.moe_item_max_slots.argtypes = []
        lib.moe_ints_needed.restype = _long
        lib.moe_ints_needed.argtypes = [_long, _long]
        self._lib = lib
        from moeframe.kernels.bf16_packing import bind

        #: the bf16 kernels for experts with many tokens (variants amx_bf16, avx512_bf16), else None
        self.bf16 = bind(lib)
        self._item_max_slots = int(lib.moe_item_max_slots())

    def forward(self, **args: Any) -> int:
        """``moe_forward`` with its arguments by name (:data:`FORWARD_PARAMS`): pointers as
        ints or ``None``.  Returns its status (0, -1 or -2)."""
        names = [name for name, _ in FORWARD_PARAMS]
        if args.keys() != set(names):
            missing, extra = sorted(set(names) - args.keys()), sorted(args.keys() - set(names))
            raise TypeError(f"moe_forward: missing arguments {missing}, unknown arguments {extra}")
        return int(self._lib.moe_forward(*(args[name] for name in names)))

    def scratch_floats(self, hidden: int, intermediate: int, tokens: int) -> int:
        """Floats of scratch each thread needs for a call of ``tokens`` tokens."""
        return int(self._lib.moe_scratch_floats(hidden, intermediate, tokens))

    def ints_needed(self, pairs: int, local_experts: int) -> int:
        """int32 elements of the index buffer (grouping and work items)."""
        return int(self._lib.moe_ints_needed(pairs, local_experts))

    def hbuf_slots(self, pairs: int, local_experts: int, cap: int) -> int:
        """Rows of intermediate activations to allocate: enough for every work item of a
        call with ``pairs`` (token, k) pairs, but at most ``cap`` (then the call runs in
        groups), and never less than the largest item (items take one slot per pair)."""
        return max(min(pairs, cap), self._item_max_slots)


def build_native(isa: str) -> Path:
    """Build (or find in the cache) the library of variant ``isa`` without loading it,
    whatever this CPU runs (to check that every variant compiles)."""
    found = ensure_library(library_spec(isa), _compiler())
    found.close()
    return found.path


@functools.lru_cache(maxsize=1)
def _compiler_cached(cc_env: str | None, path_env: str | None) -> tuple[str, str]:
    return find_compiler()


def _compiler() -> tuple[str, str]:
    return _compiler_cached(os.environ.get("CC"), os.environ.get("PATH"))


@functools.cache
def _load(isa: str) -> NativeLibrary | str:
    from moeframe.kernels.cpu_isa import VARIANTS, machine_arch, missing_flags

    variant = VARIANTS.get(isa)
    if variant is None:
        return f"no native variant {isa!r} (variants: {', '.join(VARIANTS)})"
    lacks = missing_flags(variant)
    if lacks:
        if lacks == [variant.arch]:
            return f"variant {isa!r} is for {variant.arch} and this is {machine_arch()}"
        return f"variant {isa!r} needs {', '.join(lacks)}, which this CPU lacks"
    try:
        found = ensure_library(library_spec(isa), _compiler())
        try:
            return NativeLibrary(found.path, isa, found)
        finally:
            found.close()
    except NativeUnavailable as exc:
        return str(exc)


def load_native(isa: str | None = None) -> NativeLibrary:
    """The native library of variant ``isa`` (default: the one :func:`cpu_isa.detect`
    picks), built on first use; :class:`NativeUnavailable` says why not, in one line."""
    setting = os.environ.get("MOEFRAME_FUSED_CPU_NATIVE", "1").strip()
    if setting == "0":
        raise NativeUnavailable("disabled by MOEFRAME_FUSED_CPU_NATIVE=0")
    if setting not in ("", "1"):
        raise NativeUnavailable(f"MOEFRAME_FUSED_CPU_NATIVE={setting!r} is neither 0 (off) nor 1 (on, the default)")
    if isa is None:
        from moeframe.kernels.cpu_isa import CpuIsaError, detect

        try:
            isa = detect()
        except CpuIsaError as exc:
            raise NativeUnavailable(str(exc)) from None
    result = _load(isa)
    if isinstance(result, str):
        raise NativeUnavailable(result)
    return result
