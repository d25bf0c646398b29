"""The native core of the ``fused_cpu`` kernel: C source, build on first use, ctypes binding.

The C code (``csrc/fused_cpu_avx2.c``, read into :data:`SOURCE`) needs AVX2, FMA and F16C, a C compiler with OpenMP
(``cc``, or ``$CC``) and Linux or macOS on x86-64.  It is compiled once per machine into
the cache directory (``$MOEFRAME_CACHE_DIR``, else ``$XDG_CACHE_HOME/moeframe``, else
``~/.cache/moeframe``), under a name that hashes the source, the flags and the compiler, and
loaded with :mod:`ctypes`; ctypes releases the GIL during the call.  The library shares
torch's OpenMP runtime (``libgomp.so.1`` is loaded by torch first), so its threads are
torch's threads and ``torch.set_num_threads`` governs both.

:func:`load_native` returns the library, or raises :class:`NativeUnavailable` saying why
(the kernel then runs its torch path).  Every buffer is allocated by the caller with
torch, so that ``torch.profiler`` sees all of the kernel's memory.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["SOURCE", "CFLAGS", "NativeUnavailable", "NativeLibrary", "load_native", "cache_dir"]

CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fno-tree-loop-distribute-patterns", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")

SOURCE = (Path(__file__).parent / "csrc" / "fused_cpu_avx2.c").read_text()


class NativeUnavailable(RuntimeError):
    """The native core cannot be used here; the message says why."""


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    env = os.environ.get("MOEFRAME_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moeframe"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _check_cpu() -> None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeUnavailable(f"needs an x86-64 CPU (this is {platform.machine()})")
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise NativeUnavailable(f"needs AVX2 and FMA (torch reports CPU capability {capability})")
    flags = _cpu_flags()
    if flags and not {"avx2", "fma", "f16c"} <= flags:
        raise NativeUnavailable(f"needs AVX2, FMA and F16C (missing: {', '.join(sorted({'avx2', 'fma', 'f16c'} - flags))})")


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise NativeUnavailable("no C compiler found (install gcc, or set CC)")
    return cc


def _build(cc: str) -> Path:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C compiler {cc!r} does not run: {exc}") from None
    key = hashlib.sha256("\0".join([SOURCE, *CFLAGS, cc, version, sys.platform]).encode()).hexdigest()[:16]
    target = cache_dir() / f"fused_cpu-{key}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeUnavailable(f"cannot create the cache directory {target.parent}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="moeframe-build-") as tmp:
        src = Path(tmp) / "fused_cpu.c"
        src.write_text(SOURCE)
        out = Path(tmp) / "fused_cpu.so"
        try:
            proc = subprocess.run([cc, *CFLAGS, str(src), "-o", str(out)], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeUnavailable(f"compiling with {cc!r} failed: {exc}") from None
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise NativeUnavailable(f"compiling with {cc!r} failed: {first}")
        # another process may have built the same file meanwhile: rename is atomic either way
        staged = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            shutil.copyfile(out, staged)
            os.replace(staged, target)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise NativeUnavailable(f"cannot write to the cache directory {target.parent} "
                                    f"({exc.strerror}; set MOEFRAME_CACHE_DIR to a writable one)") from None
    return target


class NativeLibrary:
    """The loaded library: :meth:`forward` and the buffer sizes it needs."""

    def __init__(self, path: Path) -> None:
        import torch  # noqa: F401  -- torch's libgomp must be loaded first

        self.path = path
        lib = ctypes.CDLL(str(path))
        c_long, c_int, c_float, ptr = ctypes.c_long, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        lib.moe_forward.restype = c_int
        lib.moe_forward.argtypes = [
            c_int, ptr, c_long, c_long, ptr, ptr, c_long, ptr, c_long, ptr, ptr, ptr, ptr, c_long, c_long,
            c_int, c_float, c_float, ptr, ptr, ptr, ptr, c_long, ptr, c_long, c_int,
        ]
        lib.moe_scratch_floats.restype = c_long
        lib.moe_scratch_floats.argtypes = [c_long, c_long, c_long]
        lib.moe_item_max_slots.restype = c_long
        lib.moe_ints_needed.restype = c_long
        lib.moe_ints_needed.argtypes = [c_long, c_long]
        self._lib = lib
        self.forward = lib.moe_forward
        self._item_max_slots = int(lib.moe_item_max_slots())

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


@functools.lru_cache(maxsize=None)
def _load() -> NativeLibrary | str:
    try:
        _check_cpu()
        return NativeLibrary(_build(_compiler()))
    except NativeUnavailable as exc:
        return str(exc)
    except OSError as exc:  # dlopen failure
        return f"cannot load the compiled library: {exc}"


def load_native() -> NativeLibrary:
    """The native library, built on first use; :class:`NativeUnavailable` says why not."""
    setting = os.environ.get("MOEFRAME_FUSED_CPU_NATIVE", "1").strip()
    if setting == "0":
        raise NativeUnavailable("disabled by MOEFRAME_FUSED_CPU_NATIVE=0")
    if setting not in ("", "1"):
        raise NativeUnavailable(f"MOEFRAME_FUSED_CPU_NATIVE={setting!r} is neither 0 (off) nor 1 (on, the default)")
    result = _load()
    if isinstance(result, str):
        raise NativeUnavailable(result)
    return result
