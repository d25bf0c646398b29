"""fused_cpu's aarch64 variant (``neon``): detection from an aarch64 ``/proc/cpuinfo``, the
variant cross-compiled (a shared library with its own flags, so that it at least builds),
and its core checked against a plain-C reference under ``qemu-aarch64``.

The check is ``tests/csrc/fused_cpu_check.c``: it calls the core's C ABI (``moe_forward``) on
seeded random inputs (fp32/bf16/fp16; silu/gelu/swigluoai; biases, expert maps; 0, 1, a few
and many tokens: the decode and prefill paths) and compares with the math of
reference-math.md computed in double.  That the check itself catches errors is shown on
this machine: built natively with the x86 variant it passes, it fails for each deliberate
error of its reference (``--break``), and its reference and its inputs agree with
moeframe's torch reference kernel (``--dump``).

Tools: a cross compiler, ``aarch64-linux-gnu-gcc`` (Debian/Ubuntu: ``apt-get install
gcc-aarch64-linux-gnu``; builds with OpenMP, so the core runs on 3 threads under qemu) or zig
(``pip install 'moeframe[cross]'``: the ``ziglang`` wheel; no OpenMP runtime, so the core runs
serially); ``qemu-aarch64`` to run (``apt-get install qemu-user``).  Tests whose tool is
missing skip and say how to get it.  The first zig build on a machine also builds zig's
libc for aarch64 (about a minute, once; zig caches it in ``~/.cache/zig``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

from moeframe.conformance import KernelCase, kernel_context
from moeframe.kernels import ExpertWeights, cpu_isa
from moeframe.kernels.cpu_isa import VARIANTS, CpuIsaError
from moeframe.kernels.torch_reference import TorchReferenceKernel
from moeframe.numerics import DTYPES, compare, tolerance_for

HERE = Path(__file__).parent
CHECK_C = HERE / "csrc" / "fused_cpu_check.c"
OMP_SERIAL = HERE / "csrc" / "omp_serial"
CSRC = Path(cpu_isa.__file__).parent / "csrc"
NEON = VARIANTS["neon"]
#: the number of cases fused_cpu_check runs (its summary line says "N of N cases agree")
BREAKS = ("bias2", "up-bias", "gelu-tanh", "no-clamp", "no-weight", "gate-up", "last-k")
GET_ZIG = "pip install 'moeframe[cross]' (the ziglang wheel)"
GET_GCC = "apt-get install gcc-aarch64-linux-gnu"
GET_QEMU = "apt-get install qemu-user"

# -- detection from an aarch64 /proc/cpuinfo ---------------------------------------------
#: AWS Graviton2 (Neoverse N1): NEON, no SVE, no bf16
GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

processor\t: 1
Features\t: fp asimd
"""
#: NVIDIA Grace (Neoverse V2): NEON, SVE2 (128-bit), bf16, i8mm
GRACE_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 "
    "sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp sve2 sveaes svepmull svebitperm "
    "svesha3 svesm4 flagm2 frint svei8mm svebf16 i8mm bf16 dgh bti"
)
GRACE = f"""processor\t: 0
BogoMIPS\t: 2000.00
Features\t: {GRACE_FEATURES}
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd4f
CPU revision\t: 0
"""


@pytest.fixture
def aarch64_cpu(monkeypatch):
    """Pretend to be an aarch64 machine whose /proc/cpuinfo is the text passed to the result."""

    def use(text: str) -> None:
        monkeypatch.setattr(cpu_isa, "machine_arch", lambda: "aarch64")
        monkeypatch.setattr(cpu_isa, "_cpuinfo", lambda: text)
        cpu_isa.cpu_flags.cache_clear()
        cpu_isa.cpu_model.cache_clear()

    monkeypatch.delenv(cpu_isa.ENV_VAR, raising=False)
    yield use
    cpu_isa.cpu_flags.cache_clear()
    cpu_isa.cpu_model.cache_clear()


@pytest.mark.parametrize("text, model", [(GRAVITON2, "part 0xd0c"), (GRACE, "part 0xd4f")])
def test_aarch64_servers_get_the_neon_variant(aarch64_cpu, text, model):
    aarch64_cpu(text)
    assert "asimd" in cpu_isa.cpu_flags()
    assert cpu_isa.supported() == ["neon"] and cpu_isa.detect() == "neon"
    assert f"implementer 0x41 {model}" in cpu_isa.cpu_model()
    # no torch-matmul hand-over was measured on aarch64: the native core takes every expert
    assert [cpu_isa.matmul_min_tokens(d, "neon") for d in ("float32", "bfloat16", "float16")] == [None] * 3


def test_an_aarch64_cpu_without_advanced_simd_has_no_variant(aarch64_cpu):
    aarch64_cpu("processor\t: 0\nFeatures\t: fp evtstrm\nCPU implementer\t: 0x41\nCPU part\t: 0xd03\n")
    assert cpu_isa.supported() == []
    with pytest.raises(CpuIsaError, match=r"no native variant runs on this CPU \(.*aarch64\): neon needs asimd$"):
        cpu_isa.detect()


@pytest.mark.parametrize("forced, message", [
    ("neon", None),
    (" NEON ", None),
    ("neno", "MOEFRAME_CPU_ISA='neno' is not a CPU variant; did you mean 'neon'?"),
    ("avx2", "MOEFRAME_CPU_ISA='avx2': variant 'avx2' is for x86_64 and this is aarch64; this CPU runs: neon"),
])  # fmt: skip
def test_forcing_a_variant_on_aarch64(aarch64_cpu, monkeypatch, forced, message):
    aarch64_cpu(GRACE)
    monkeypatch.setenv(cpu_isa.ENV_VAR, forced)
    if message is None:
        assert cpu_isa.detect() == "neon"
        return
    with pytest.raises(CpuIsaError) as info:
        cpu_isa.detect()
    assert str(info.value).startswith(message)


def test_the_neon_variant_forced_on_x86_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpu_isa, "machine_arch", lambda: "x86_64")
    monkeypatch.setenv(cpu_isa.ENV_VAR, "neon")
    with pytest.raises(
        CpuIsaError, match=r"^MOEFRAME_CPU_ISA='neon': variant 'neon' is for aarch64 and this is x86_64"
    ):
        cpu_isa.detect(frozenset({"avx2", "fma", "f16c"}))


@pytest.mark.skipif(cpu_isa.machine_arch() == "aarch64", reason="on aarch64 the neon variant runs")
def test_explain_shows_why_the_neon_variant_does_not_run_here(monkeypatch):
    from moeframe.kernels.fused_cpu import FusedCpuKernel, FusedCpuParams

    monkeypatch.setenv(cpu_isa.ENV_VAR, "neon")
    case = KernelCase("silu", False, False, "float32", 1)
    with pytest.warns(UserWarning, match="variant 'neon' is for aarch64"):
        kernel = FusedCpuKernel(kernel_context(case.model()), FusedCpuParams())
    summary = kernel.describe()["summary"]
    assert "torch path" in summary and "variant 'neon' is for aarch64" in summary


# -- tools -----------------------------------------------------------------------------------
@attrs.frozen
class Cross:
    """An aarch64 cross compiler: ``gcc`` (with OpenMP: the core runs threaded) or ``zig``."""

    name: str
    command: tuple[str, ...]
    threaded: bool

    def flags(self, cflags: tuple[str, ...]) -> list[str]:
        """The variant's flags as this compiler spells them."""
        if self.name == "gcc":
            return list(cflags)
        spelled = {"-march=armv8-a": "-mcpu=generic"}  # zig names CPUs, not architectures
        # a GCC pass that clang does not have (it warns about the flag)
        return [spelled.get(f, f) for f in cflags if f != "-fno-tree-loop-distribute-patterns"]

    def library(self, variant: cpu_isa.Variant, out: Path) -> list[str]:
        """The command that builds ``variant``'s shared library with its own flags (warnings are errors)."""
        from moeframe.kernels._fused_cpu_native import WARNING_FLAGS

        target = ["-target", "aarch64-linux-gnu", f"-I{OMP_SERIAL}"] if self.name == "zig" else []
        return [*self.command, *target, *self.flags(variant.cflags), *WARNING_FLAGS, "-Werror", f"-I{CSRC}",
                *map(str, variant.paths), "-o", str(out)]  # fmt: skip

    def check(self, variant: cpu_isa.Variant, out: Path) -> list[str]:
        """The command that builds fused_cpu_check with ``variant``'s core, static."""
        flags = [f for f in self.flags(variant.cflags) if f not in ("-shared", "-fPIC")]
        if self.name == "zig":  # no OpenMP runtime: a serial build
            flags = [f for f in flags if f != "-fopenmp"]
            flags = ["-target", "aarch64-linux-musl", f"-I{OMP_SERIAL}", *flags, "-Wno-unknown-pragmas"]
        return [*self.command, *flags, "-static", f"-I{CSRC}", str(CHECK_C), *map(str, variant.paths), "-lm",
                "-o", str(out)]  # fmt: skip


def cross_compilers() -> list[Cross]:
    """The cross compilers here, the one CI gets from pip first."""
    found = []
    try:
        import ziglang  # noqa: F401  -- the wheel of the `cross` extra
    except ImportError:
        pass
    else:
        found.append(Cross("zig", (sys.executable, "-m", "ziglang", "cc"), threaded=False))
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc:
        found.append(Cross("gcc", (gcc,), threaded=True))
    return found


CROSS = cross_compilers()
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def build(command: list[str], what: str) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"building {what} failed:\n{' '.join(command)}\n{proc.stderr[-4000:]}"


def run_check(executable: list[str], *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*executable, *args], capture_output=True, text=True, timeout=timeout, check=False)


def needs_cross() -> Cross:
    if not CROSS:
        pytest.skip(f"no aarch64 cross compiler: {GET_ZIG}, or {GET_GCC}")
    return CROSS[0]


# -- the neon variant builds --------------------------------------------------------------------
def test_the_neon_variant_builds_as_an_aarch64_library(tmp_path):
    """The shared library the loader would build on an aarch64 machine, from the same
    sources and flags, warning-free: an aarch64 ELF exporting the C ABI."""
    cross = needs_cross()
    out = tmp_path / "fused_cpu-neon.so"
    build(cross.library(NEON, out), f"the neon variant with {cross.name}")
    data = out.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
    assert int.from_bytes(data[18:20], "little") == 183  # e_machine: EM_AARCH64
    for symbol in (
        b"moe_forward",
        b"moe_abi_version",
        b"moe_ints_needed",
        b"moe_item_max_slots",
        b"moe_scratch_floats",
    ):
        assert symbol + b"\0" in data, symbol


@pytest.mark.skipif(cpu_isa.machine_arch() == "aarch64", reason="test_cpu_isa.py runs the neon variant on aarch64")
def test_the_loader_says_why_the_neon_variant_does_not_run_here():
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, load_native

    with pytest.raises(NativeUnavailable, match=f"variant 'neon' is for aarch64 and this is {cpu_isa.machine_arch()}"):
        load_native("neon")


# -- the neon core under qemu ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=CROSS[:1] or [None], ids=lambda c: c.name if c else "none")
def neon_check(request, tmp_path_factory) -> tuple[Cross, Path]:
    """fused_cpu_check built for aarch64 with the neon core, by the first cross compiler here
    (one is enough: the driver's threading is the same code as on x86, tested there)."""
    cross: Cross | None = request.param
    if cross is None:
        pytest.skip(f"no aarch64 cross compiler: {GET_ZIG}, or {GET_GCC}")
    if QEMU is None:
        pytest.skip(f"no qemu-aarch64 to run the aarch64 build: {GET_QEMU}")
    out = tmp_path_factory.mktemp(f"neon-{cross.name}") / "fused_cpu_check"
    build(cross.check(NEON, out), f"fused_cpu_check for aarch64 with {cross.name}")
    return cross, out


def test_the_neon_core_agrees_with_the_reference_under_qemu(neon_check, tmp_path):
    cross, exe = neon_check
    threads = "3" if cross.threaded else "1"  # with 3, every case is also run on 1 thread: same bits
    proc = run_check([QEMU, str(exe)], "--threads", threads, "--dump", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("ok: ") and f"(threads {threads})" in summary, summary
    done, total = summary.removeprefix("ok: ").split(" cases")[0].split(" of ")
    assert done == total and int(total) >= 70
    # the neon core's outputs against moeframe's own torch reference as well
    checked = compare_dumps(tmp_path)
    assert {(m["dtype"], m["activation"]) for m in checked} == {(d, a) for d in DTYPES for a in ACTIVATIONS}


def test_the_neon_core_reports_bad_ids_under_qemu(neon_check):
    """The status of moe_forward for an expert id and an expert map entry out of range."""
    _, exe = neon_check
    listing = run_check([QEMU, str(exe)], "--list").stdout.splitlines()
    for special in ("bad-id", "bad-map"):
        (case,) = [line.split()[0] for line in listing if line.endswith(special)]
        proc = run_check([QEMU, str(exe)], "--case", case, "-v")
        assert proc.returncode == 0 and "ok case" in proc.stdout, proc.stdout


# -- the check itself, natively --------------------------------------------------------------------
@pytest.fixture(scope="module")
def native_check(tmp_path_factory) -> Path:
    """fused_cpu_check built for this machine with the variant it runs (OpenMP, threaded)."""
    from moeframe.kernels._fused_cpu_native import NativeUnavailable, _compiler

    try:
        isa = cpu_isa.detect()
        cc, _ = _compiler()
    except (CpuIsaError, NativeUnavailable) as exc:
        pytest.skip(str(exc))
    variant = VARIANTS[isa]
    # -O1: this build checks the check (any optimisation level will do), and compiles in a third of -O3's time
    flags = ["-O1" if f == "-O3" else f for f in variant.cflags if f not in ("-shared", "-fPIC")]
    out = tmp_path_factory.mktemp("native-check") / "fused_cpu_check"
    build(
        [cc, *flags, f"-I{CSRC}", str(CHECK_C), *map(str, variant.paths), "-lm", "-o", str(out)],
        f"fused_cpu_check ({isa})",
    )
    return out


def test_the_check_passes_with_this_machines_core(native_check):
    proc = run_check([str(native_check)], "--threads", "3")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ok: ")


@pytest.mark.parametrize("wrong", BREAKS)
def test_the_check_fails_when_its_reference_is_wrong(native_check, wrong):
    """Each deliberate error of the reference (a bias left out, gelu's tanh form, no clamp,
    the routing weight ignored, gate and up swapped, a k left out) is caught."""
    proc = run_check([str(native_check)], "--threads", "1", "--break", wrong)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("FAIL: ") and wrong in proc.stdout


def test_the_check_refuses_bad_arguments(native_check):
    proc = run_check([str(native_check)], "--break", "everything")
    assert proc.returncode == 2 and "--break takes none, bias2" in proc.stderr


def test_the_checks_reference_agrees_with_moeframes_reference(native_check, tmp_path):
    """Its inputs and its reference, read back, against moeframe's torch reference kernel."""
    proc = run_check([str(native_check)], "--threads", "1", "--dump", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:]
    checked = compare_dumps(tmp_path)
    assert len(checked) >= 9 and any(m["bias"] and m["map"] for m in checked)


# -- reading the dumps ------------------------------------------------------------------------------
ACTIVATIONS = ("silu", "gelu", "swigluoai")


def load_dump(case_dir: Path) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """(meta, inputs for a kernel, the C reference as fp32, the core's output)."""
    meta: dict = {}
    for line in (case_dir / "meta.txt").read_text().splitlines():
        key, value = line.split(" ", 1)
        meta[key] = value if key in ("dtype", "activation") else float(value) if "." in value else int(value)
    dtype = DTYPES[meta["dtype"]]
    T, E, K, H, I, L = (meta[k] for k in ("T", "E", "K", "H", "I", "local"))

    def raw(name: str, shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        data = bytearray((case_dir / f"{name}.bin").read_bytes())
        return torch.frombuffer(data, dtype=dt).reshape(shape) if data else torch.empty(shape, dtype=dt)

    experts = ExpertWeights(
        raw("w13", (L, 2 * I, H), dtype),
        raw("w2", (L, H, I), dtype),
        raw("b13", (L, 2 * I), dtype) if meta["bias"] else None,
        raw("b2", (L, H), dtype) if meta["bias"] else None,
        raw("map", (E,), torch.int32) if meta["map"] else None,
    )
    inputs = {
        "hidden_states": raw("x", (T, H), dtype),
        "topk_weights": raw("tw", (T, K), torch.float32),
        "topk_ids": raw("ids", (T, K), torch.int64),
        "experts": experts,
    }
    return meta, inputs, raw("ref", (T, H), torch.float32), raw("out", (T, H), dtype)


def compare_dumps(root: Path) -> list[dict]:
    """For one case per (dtype, activation) with the most tokens and one with a single
    token: the C reference and the core's output against moeframe's torch reference."""
    metas = {}
    for case_dir in sorted(root.iterdir(), key=lambda p: int(p.name)):
        meta, *_ = load_dump(case_dir)
        if meta["T"] in (1, 150):
            metas[case_dir] = meta
    checked = []
    for case_dir in metas:
        meta, inputs, ref, out = load_dump(case_dir)
        assert meta["alpha"] == pytest.approx(1.702) and meta["limit"] == 7.0
        case = KernelCase(
            meta["activation"], bool(meta["bias"]), bool(meta["map"]), meta["dtype"], meta["T"],
            num_experts=meta["E"], top_k=meta["K"], hidden_size=meta["H"], intermediate_size=meta["I"],
        )  # fmt: skip
        expected = TorchReferenceKernel(kernel_context(case.model()), None)(**inputs)
        tol = tolerance_for(meta["dtype"])
        # the C reference is exact math on the same inputs: within the dtype's tolerance of
        # torch's (which rounds its intermediates to the dtype)
        of_ref, of_out = compare(ref.to(expected.dtype), expected, tol), compare(out, expected, tol)
        assert of_ref.ok, ("the C reference", case.id, of_ref)
        assert of_out.ok, ("the core", case.id, of_out)
        checked.append(meta)
    return checked


def test_the_cases_cover_what_the_issue_asks(native_check):
    """fp32/bf16/fp16, every activation, biases and maps, 0, 1 and many tokens, decode and prefill."""
    listing = run_check([str(native_check)], "--list").stdout.splitlines()
    fields = [line.split() for line in listing]
    assert {f[1] for f in fields} == set(DTYPES) and {f[2] for f in fields} == set(ACTIVATIONS)
    tokens = {int(f[3].removeprefix("T=")) for f in fields}
    assert {0, 1}.issubset(tokens) and max(tokens) >= 150 and any(1 < t < 7 for t in tokens)
