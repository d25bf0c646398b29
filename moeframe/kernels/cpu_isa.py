"""Which build of ``fused_cpu``'s native core this CPU runs: ISA variants and their choice.

Every variant is one C file under ``moeframe/kernels/csrc/`` compiled with its own flags;
all of them export the same C ABI, so the loader builds and binds any of them the same way.
:func:`detect` picks the best variant this CPU supports (from the flags the kernel reports
in ``/proc/cpuinfo``), or the one named by the environment variable ``MOEFRAME_CPU_ISA``
(to compare variants, or to test a lesser one on a bigger CPU); a name that is unknown, or
that this CPU cannot run, is a :class:`CpuIsaError` with one line saying why.

Nothing here imports torch or compiles anything.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
from pathlib import Path

import attrs

from moeframe.errors import UserError, did_you_mean

__all__ = [
    "Variant",
    "VARIANTS",
    "ENV_VAR",
    "CpuIsaError",
    "machine_arch",
    "cpu_flags",
    "cpu_model",
    "supported",
    "detect",
    "missing_flags",
    "matmul_min_tokens",
]

#: the environment variable that forces a variant
ENV_VAR = "MOEFRAME_CPU_ISA"

_COMMON = ("-O3", "-fno-tree-loop-distribute-patterns", "-fopenmp", "-fPIC", "-shared", "-std=gnu11")


@attrs.frozen
class Variant:
    """One build of the native core.

    ``source`` is a file name in ``moeframe/kernels/csrc/``; ``cflags`` the compiler flags
    (the same ABI whatever they are); ``cpu_flags`` the ``/proc/cpuinfo`` flag names the
    CPU must report to run it; ``arch`` the machine it is for (``x86_64`` or ``aarch64``).
    """

    name: str
    source: str
    cflags: tuple[str, ...]
    cpu_flags: frozenset[str]
    arch: str = attrs.field(validator=attrs.validators.in_(("x86_64", "aarch64")))
    description: str = ""
    #: further C files compiled into the same library (``source`` is the main one)
    extra_sources: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        """The C source file."""
        return Path(__file__).parent / "csrc" / self.source

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every C file of the variant, the main one first."""
        return (self.path, *(Path(__file__).parent / "csrc" / name for name in self.extra_sources))


_AVX512_CFLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c")
_AVX512_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c")

#: every variant, best first within an architecture
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="amx_bf16",
            source="fused_cpu.c",
            cflags=(*_AVX512_CFLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-bf16", *_COMMON[1:]),
            cpu_flags=frozenset({*_AVX512_FLAGS, "avx512_bf16", "amx_tile", "amx_bf16"}),
            arch="x86_64",
            description="the avx512 core, and bf16 experts with many tokens on AMX-BF16 tiles over repacked weights",
            extra_sources=("bf16_experts.c",),
        ),
        Variant(
            name="avx512_bf16",
            source="fused_cpu.c",
            cflags=(*_AVX512_CFLAGS, "-mavx512bf16", *_COMMON[1:]),
            cpu_flags=frozenset({*_AVX512_FLAGS, "avx512_bf16"}),
            arch="x86_64",
            description="the avx512 core, and bf16 experts with many tokens on vdpbf16ps over repacked weights",
            extra_sources=("bf16_experts.c",),
        ),
        Variant(
            name="avx512",
            source="fused_cpu.c",
            cflags=(
                "-O3",
                "-mavx512f",
                "-mavx512bw",
                "-mavx512vl",
                "-mavx512dq",
                "-mavx2",
                "-mfma",
                "-mf16c",
                *_COMMON[1:],
            ),
            cpu_flags=frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}),
            arch="x86_64",
            description="AVX-512 (F/BW/VL/DQ), 16 fp32 lanes in the prefill panel kernel",
        ),
        Variant(
            name="avx2",
            source="fused_cpu.c",
            cflags=("-O3", "-mavx2", "-mfma", "-mf16c", *_COMMON[1:]),
            cpu_flags=frozenset({"avx2", "fma", "f16c"}),
            arch="x86_64",
            description="AVX2 + FMA, 8 fp32 lanes",
        ),
        Variant(
            name="neon",
            source="fused_cpu.c",
            cflags=("-O3", "-march=armv8-a", *_COMMON[1:]),
            cpu_flags=frozenset({"asimd"}),
            arch="aarch64",
            description="aarch64 Advanced SIMD (NEON), 4 fp32 lanes, 16-token panels of 4 vectors",
        ),
    )
}


class CpuIsaError(UserError, ValueError):
    """``MOEFRAME_CPU_ISA`` names no variant, or one this CPU cannot run; or no variant fits."""


def machine_arch() -> str:
    """``x86_64``, ``aarch64`` or the machine name as Python reports it."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if machine in ("aarch64", "arm64", "armv8l"):
        return "aarch64"
    return machine


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def _sysctl(*names: str) -> str:
    try:
        proc = subprocess.run(["sysctl", "-n", *names], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


# macOS names its x86 features in capitals (``AVX2``, ``AVX512F``, ``AVX1.0``)
_DARWIN_X86 = {"avx1.0": "avx", "avx512bf16": "avx512_bf16", "avx512vnni": "avx512_vnni"}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, named as Linux's ``/proc/cpuinfo`` names them.

    Linux: the ``flags`` line (x86) or ``Features`` line (aarch64) of the first CPU.
    macOS: ``sysctl`` (best effort).  Empty when they cannot be read.
    """
    text = _cpuinfo()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    if sys.platform == "darwin":
        if machine_arch() == "aarch64":  # every Apple CPU has NEON (Linux calls it asimd)
            return frozenset({"asimd", "fp"})
        raw = _sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features").lower().split()
        return frozenset(_DARWIN_X86.get(f, f) for f in raw)
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's name (``Intel(R) Xeon(R) ... (GenuineIntel family 6 model 143)``), best effort."""
    fields: dict[str, str] = {}
    for line in _cpuinfo().splitlines():
        if not line.strip():
            break  # the first CPU is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    if fields.get("vendor_id") and fields.get("cpu family"):
        ident = f"{fields['vendor_id']} family {fields['cpu family']} model {fields.get('model', '?')}"
        return f"{name} ({ident})" if name else ident
    if fields.get("CPU implementer"):  # aarch64: implementer and part numbers
        ident = f"implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
        return f"{name} ({ident})" if name else f"{machine_arch()} CPU ({ident})"
    if name:
        return name
    if sys.platform == "darwin":
        brand = _sysctl("machdep.cpu.brand_string").strip()
        if brand:
            return brand
    return platform.processor() or machine_arch() or "unknown CPU"


def missing_flags(variant: Variant, flags: frozenset[str] | None = None) -> list[str]:
    """What this CPU lacks to run ``variant`` (its architecture first), sorted; empty if it can."""
    if variant.arch != machine_arch():
        return [variant.arch]
    flags = cpu_flags() if flags is None else flags
    return sorted(variant.cpu_flags - flags)


def supported(flags: frozenset[str] | None = None) -> list[str]:
    """The variants this CPU can run, best first (``flags`` overrides the CPU's, for tests)."""
    return [name for name, v in VARIANTS.items() if not missing_flags(v, flags)]


def detect(flags: frozenset[str] | None = None) -> str:
    """The variant to run: ``$MOEFRAME_CPU_ISA`` if set, else the best one this CPU supports.

    Raises :class:`CpuIsaError` when the forced name is unknown or needs what this CPU
    lacks, or when no variant fits this CPU at all.
    """
    forced = os.environ.get(ENV_VAR, "").strip()
    usable = supported(flags)
    if forced:
        variant = VARIANTS.get(forced.lower())
        if variant is None:
            raise CpuIsaError(
                f"{ENV_VAR}={forced!r} is not a CPU variant{did_you_mean(forced.lower(), VARIANTS)}; "
                f"variants: {', '.join(VARIANTS)} (this CPU runs: {', '.join(usable) or 'none'})"
            )
        lacks = missing_flags(variant, flags)
        if lacks:
            what = (
                f"is for {variant.arch} and this is {machine_arch()}"
                if lacks == [variant.arch]
                else f"needs {', '.join(lacks)}, which this CPU lacks"
            )
            raise CpuIsaError(
                f"{ENV_VAR}={forced!r}: variant {variant.name!r} {what}; this CPU runs: {', '.join(usable) or 'none'}"
            )
        return variant.name
    if not usable:
        wanted = "; ".join(
            f"{v.name} needs {', '.join(missing_flags(v, flags))}"
            for v in VARIANTS.values()
            if v.arch == machine_arch()
        )
        raise CpuIsaError(
            f"no native variant runs on this CPU ({cpu_model()}, {machine_arch()})" + (f": {wanted}" if wanted else "")
        )
    return usable[0]


def matmul_min_tokens(dtype: str, isa: str | None = None) -> int | None:
    """Tokens per expert from which ``fused_cpu`` hands an expert's GEMMs to torch's matmul
    on this CPU (``None``: the native core is at least as fast at every count), for
    ``dtype`` (``float32``, ``bfloat16``, ``float16``) and the native variant ``isa`` in
    use (default: :func:`detect`'s).  Measured, not derived: see "CPU variants" in
    ``docs/performance.md`` for the figures behind each entry.

    On the ``amx_bf16`` and ``avx512_bf16`` variants, bf16 experts are handed to the
    variant's own bf16 kernels (AMX tiles or ``vdpbf16ps`` over repacked weights) instead
    of torch's matmul, from the count given here for that variant."""
    flags = cpu_flags()
    if isa is None and dtype in ("bfloat16", "float32"):
        try:
            isa = detect()
        except CpuIsaError:
            isa = "avx2"
    if dtype == "bfloat16" and isa in _BF16_KERNEL_VARIANTS:
        return _MATMUL_MIN[isa]
    if dtype == "bfloat16" and "amx_bf16" in flags:
        return _MATMUL_MIN["amx_bf16_torch"]
    if dtype == "bfloat16" and "avx512_bf16" in flags:
        return _MATMUL_MIN["avx512_bf16_torch"]
    if dtype == "float32" and {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return _MATMUL_MIN["avx512_f32" if isa in ("avx512", *_BF16_KERNEL_VARIANTS) else "avx512_f32_avx2_core"]
    # AVX2 (torch's bf16 matmul is emulated there), fp16 (its GEMMs would overflow in fp16:
    # fused_cpu runs them in fp32), aarch64 (not measured): the native core throughout
    return None


#: the variants with their own bf16 kernels for experts with many tokens (bf16_experts.c)
_BF16_KERNEL_VARIANTS = ("amx_bf16", "avx512_bf16")

#: per-core crossovers measured on an Intel Xeon (Sapphire Rapids class: AVX-512, AMX-BF16),
#: torch 2.13, the benchmark's shape (H=1024, I=512); avx512_bf16 without AMX (AMD Zen 4)
#: was not available: a guess from the AMX figures, between the crossovers measured here
_MATMUL_MIN: dict[str, int | None] = {
    # the amx_bf16 variant's AMX kernel (bf16_experts.c) against the native core: 0.9x at 3
    # tokens, 1.25x at 4, 1.8x at 6, 3.1x at 8, 4.3x at 64, 5.3x at 256 (1.6x torch's matmul there)
    "amx_bf16": 4,
    # the avx512_bf16 variant's vdpbf16ps kernel, measured forced on the Xeon: 1.2x the native
    # core at 8 tokens, 1.0x from 64 (there vdpbf16ps issues half as often as fp32 FMAs; AMD Zen 4
    # issues both alike, where the kernel should gain more: not measured)
    "avx512_bf16": 8,
    "amx_bf16_torch": 32,  # oneDNN on AMX: 1.3x the native core at 32 tokens, 1.6x at 64, 2.9x at 256
    "avx512_bf16_torch": 64,
    # MKL on AVX-512 against the AVX-512 core (32-token panels, 24 accumulators), through the
    # kernel's hand-over (gather, two GEMMs, scatter): 0.83x at 128 tokens, 0.90x at 256 and 512,
    # 0.91x at 1024: never
    "avx512_f32": None,
    # against the AVX2 core forced on an AVX-512 CPU (python -m moeframe_bench.per_core): 0.81x at 32
    # tokens, 1.08x at 64, 1.3x at 128, 1.4x at 256
    "avx512_f32_avx2_core": 64,
}
