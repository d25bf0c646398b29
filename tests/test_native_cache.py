"""The native build cache (``moeframe.kernels.native_build``) against each bad state: unsafe
directories, planted / truncated / corrupted libraries, symbolic links at every name the
builder uses, two processes building at once, read-only caches.

Most cases build a tiny probe library (a few milliseconds to compile); a compiler wrapper
logs every compile, so that "built once" and "not rebuilt" are counted, not assumed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moeframe.kernels import native_build
from moeframe.kernels.native_build import LibrarySpec, NativeUnavailable, ensure_library

pytestmark = pytest.mark.skipif(os.name != "posix", reason="native libraries are built on Linux and macOS only")

PROBE_C = """
#include "probe.h"
int probe(void) { return PROBE_VALUE; }
"""
PROBE = LibrarySpec("probe", {"probe.c": PROBE_C, "probe.h": "#define PROBE_VALUE 42\n"}, ("-O1", "-fPIC", "-shared"))
NATIVE_BUILD = Path(native_build.__file__)


def system_cc() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@pytest.fixture
def cc(tmp_path) -> tuple[str, str, Path]:
    """A compiler wrapper that logs each compile to ``log`` (one line per run)."""
    real = system_cc()
    if real is None:
        pytest.skip("no C compiler here")
    log = tmp_path / "compiles.log"
    wrapper = tmp_path / "cc-logged"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), "logged cc", log


def compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory (0700) and a private fallback place, both in tmp_path."""
    d = tmp_path / "cache"
    monkeypatch.setenv("MOEFRAME_CACHE_DIR", str(d))
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    return d


def build(cc) -> native_build.CachedLibrary:
    return ensure_library(PROBE, (cc[0], cc[1]))


def load_probe(found: native_build.CachedLibrary) -> int:
    try:
        return found.load().probe()
    finally:
        found.close()


def compile_c(tmp_path: Path, name: str, source: str) -> Path:
    src, out = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text(source)
    subprocess.run([system_cc(), "-fPIC", "-shared", str(src), "-o", str(out)], check=True)
    return out


def test_builds_once_then_loads_from_the_cache(cache, cc):
    found = build(cc)
    assert load_probe(found) == 42 and compiles(cc[2]) == 1
    assert found.path.parent == cache.resolve()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    lib_mode = os.lstat(found.path).st_mode
    assert stat.S_ISREG(lib_mode) and not lib_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert Path(str(found.path) + ".sha256").read_text().split()[0] == "sha256"
    again = build(cc)
    assert again.path == found.path and load_probe(again) == 42 and compiles(cc[2]) == 1
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]  # staging removed


def test_the_key_covers_sources_headers_flags_and_compiler():
    base = PROBE.key("cc", "v1")
    assert base == PROBE.key("cc", "v1")
    changed = [
        LibrarySpec("probe", {"probe.c": PROBE_C + "\n", "probe.h": PROBE.sources["probe.h"]}, PROBE.cflags),
        LibrarySpec("probe", {"probe.c": PROBE_C, "probe.h": "#define PROBE_VALUE 43\n"}, PROBE.cflags),
        LibrarySpec("probe", PROBE.sources, ("-O2", "-fPIC", "-shared")),
        LibrarySpec("probe2", PROBE.sources, PROBE.cflags),
    ]
    keys = {base, PROBE.key("clang", "v1"), PROBE.key("cc", "v2"), *(s.key("cc", "v1") for s in changed)}
    assert len(keys) == 7


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_cache_writable_by_others_is_refused(cache, cc, mode):
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(NativeUnavailable, match=r"is writable by group or others \(mode 0o7") as info:
        build(cc)
    assert "\n" not in str(info.value) and "MOEFRAME_CACHE_DIR" in str(info.value)
    assert compiles(cc[2]) == 0 and list(cache.iterdir()) == []


def test_a_directory_above_the_cache_writable_by_others_is_refused(tmp_path, cc, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone could rename the cache away and put theirs
    monkeypatch.setenv("MOEFRAME_CACHE_DIR", str(shared / "cache"))
    with pytest.raises(NativeUnavailable, match=r"shared, above the cache directory .* without the sticky bit"):
        build(cc)
    shared.chmod(0o1777)  # like /tmp: allowed
    assert load_probe(build(cc)) == 42


@pytest.fixture
def other_uid(monkeypatch):
    """Make files look owned by someone else: chown them when root, else pretend to be
    another user (the builder compares with os.getuid())."""
    if os.getuid() == 0:
        return lambda path: os.chown(path, 12345, -1, follow_symlinks=False)
    me = os.getuid()
    monkeypatch.setattr(native_build.os, "getuid", lambda: me + 1)
    return lambda path: None


def test_a_cache_owned_by_another_user_is_refused(cache, cc, other_uid):
    cache.mkdir(mode=0o755)
    other_uid(cache)
    with pytest.raises(NativeUnavailable, match=r"owned by uid \d+, not by you"):
        build(cc)
    assert compiles(cc[2]) == 0


def test_a_planted_library_with_the_wrong_hash_is_rebuilt_never_loaded(cache, cc, tmp_path):
    """The attack the issue reproduced: a library with a constructor, at the cache's name."""
    good = build(cc)
    good.close()
    marker = tmp_path / "pwned"
    evil = compile_c(tmp_path, "evil", textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void pwn(void) {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}
        int probe(void) {{ return 666; }}
    """))
    shutil.copyfile(evil, good.path)
    with pytest.warns(UserWarning, match="does not match the hash recorded when it was built"):
        found = build(cc)
    assert load_probe(found) == 42 and not marker.exists() and compiles(cc[2]) == 2


def test_a_library_owned_by_another_user_is_rebuilt_even_with_its_hash(cache, cc):
    if os.getuid() != 0:
        pytest.skip("files cannot be given to another user without root")
    found = build(cc)
    found.close()
    os.chown(found.path, 12345, -1)
    with pytest.warns(UserWarning, match="owned by uid 12345"):
        again = build(cc)
    assert load_probe(again) == 42 and os.lstat(again.path).st_uid == 0 and compiles(cc[2]) == 2


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "empty", "drop-hash", "bad-hash-file", "world-writable"])
def test_a_damaged_library_is_rebuilt(cache, cc, damage):
    found = build(cc)
    found.close()
    data = found.path.read_bytes()
    sidecar = Path(str(found.path) + ".sha256")
    if damage == "truncate":
        found.path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        found.path.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:164]) + data[164:])
    elif damage == "empty":
        found.path.write_bytes(b"")
    elif damage == "drop-hash":
        sidecar.unlink()
    elif damage == "bad-hash-file":
        sidecar.write_text("sha256 not-a-hash\n")
    else:
        found.path.chmod(0o777)
    with pytest.warns(UserWarning, match="rebuilding it"):
        again = build(cc)
    assert load_probe(again) == 42 and compiles(cc[2]) == 2
    assert again.path.read_bytes() == data  # the same build, put back


def test_symlinks_at_every_name_the_builder_uses_are_not_followed(cache, cc, tmp_path):
    """Links planted at the library's, its hash file's and its lock's names (the issue: a
    link at the staging name made the build overwrite a root-owned file elsewhere)."""
    found = build(cc)
    found.close()
    library, sidecar = found.path, Path(str(found.path) + ".sha256")
    lock = library.with_name(f".{library.name}.lock")
    victims = {}
    for path in (library, sidecar, lock):
        victim = tmp_path / f"victim-{path.name}"
        victim.write_text("precious")
        victims[victim] = path
        path.unlink()
        path.symlink_to(victim)
    with pytest.warns(UserWarning, match="is a symbolic link"):
        again = build(cc)
    assert load_probe(again) == 42 and compiles(cc[2]) == 2
    for victim, path in victims.items():
        assert victim.read_text() == "precious"
        assert not path.is_symlink()


def test_staging_is_a_fresh_private_directory(cache, cc, monkeypatch):
    """Sources and the compiler's output go into a new mkdtemp directory (0700) inside the
    cache, created exclusively: nothing at a predictable name is written through."""
    seen = []
    real_compile = native_build._compile

    def spy(spec, compiler, staging):
        st = os.lstat(staging)
        seen.append((staging.parent, stat.S_IMODE(st.st_mode), sorted(p.name for p in staging.iterdir())))
        return real_compile(spec, compiler, staging)

    monkeypatch.setattr(native_build, "_compile", spy)
    cache.mkdir(mode=0o700)
    filename = f"probe-{PROBE.key(cc[0], cc[1])}.so"
    killed = cache / f".build-{filename}-abc123"  # left by a build that was killed
    killed.mkdir()
    (killed / "library.so").write_bytes(b"half")
    other = cache / ".build-other.so-xyz"  # another library's build, maybe running now
    other.mkdir()
    build(cc).close()
    assert seen == [(cache.resolve(), 0o700, [])]
    assert not killed.exists() and other.exists()
    native_build._write_new(cache / "taken", b"x", 0o600)
    with pytest.raises(FileExistsError):
        native_build._write_new(cache / "taken", b"y", 0o600)
    assert (cache / "taken").read_bytes() == b"x"


SUBPROCESS_BUILD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("native_build", sys.argv[1])
nb = importlib.util.module_from_spec(spec); sys.modules["native_build"] = nb; spec.loader.exec_module(nb)
lib = nb.LibrarySpec("probe", json.loads(sys.argv[2]), ("-O1", "-fPIC", "-shared"))
try:
    found = nb.ensure_library(lib, (sys.argv[3], "logged cc"))
except nb.NativeUnavailable as exc:
    print("unavailable:", exc); sys.exit(3)
print(found.path, found.sha256, found.load().probe())
"""


def run_builders(n: int, cc, env: dict[str, str], prefix: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    import json

    args = [*prefix, sys.executable, "-c", SUBPROCESS_BUILD, str(NATIVE_BUILD), json.dumps(dict(PROBE.sources)), cc[0]]
    procs = [subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return results


def test_processes_starting_at_once_build_once(cache, cc, tmp_path):
    slow = tmp_path / "cc-slow"  # a compile slow enough for the others to arrive meanwhile
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec "{cc[0]}" "$@"\n')
    slow.chmod(0o755)
    results = run_builders(3, (str(slow), "", cc[2]), {"MOEFRAME_CACHE_DIR": str(cache)})
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert len({r.stdout for r in results}) == 1 and results[0].stdout.split()[-1] == "42"
    assert compiles(cc[2]) == 1


def read_only_prefix() -> tuple[str, ...]:
    """Run a child without root's power to write anywhere (or as-is when not root)."""
    if os.getuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner") if setpriv else ()
    if not prefix or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("root, and setpriv cannot drop CAP_DAC_OVERRIDE here: a read-only directory would be writable")
    return prefix


def test_a_read_only_cache_builds_once_into_the_private_directory(cache, cc, tmp_path):
    prefix = read_only_prefix()
    cache.mkdir(mode=0o555)
    run = tmp_path / "run"
    env = {"MOEFRAME_CACHE_DIR": str(cache), "XDG_RUNTIME_DIR": str(run)}
    first = run_builders(1, cc, env, prefix)[0]
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.startswith(str(run / "moeframe")) and first.stdout.split()[-1] == "42"
    assert stat.S_IMODE(os.stat(run / "moeframe").st_mode) == 0o700
    second = run_builders(1, cc, env, prefix)[0]
    assert second.stdout == first.stdout and compiles(cc[2]) == 1  # found there, not rebuilt
    assert list(cache.iterdir()) == []


def test_a_read_only_cache_that_holds_the_library_is_used(cache, cc):
    prefix = read_only_prefix()
    build(cc).close()  # e.g. built by the image, then made read-only
    cache.chmod(0o555)
    result = run_builders(1, cc, {"MOEFRAME_CACHE_DIR": str(cache), "XDG_RUNTIME_DIR": str(cache.parent / "run")}, prefix)[0]
    assert result.returncode == 0 and result.stdout.startswith(str(cache.resolve())) and compiles(cc[2]) == 1


def test_a_cache_that_cannot_be_created_builds_into_the_private_directory(tmp_path, cc, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MOEFRAME_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    first = build(cc)
    assert first.path.parent == (tmp_path / "run" / "moeframe").resolve() and load_probe(first) == 42
    assert load_probe(build(cc)) == 42 and compiles(cc[2]) == 1


@pytest.mark.parametrize("problem", ["world-writable", "another-user"])
def test_an_unsafe_private_directory_is_refused(tmp_path, cc, monkeypatch, request, problem):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MOEFRAME_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path))
    other_uid = request.getfixturevalue("other_uid") if problem == "another-user" else None
    private = native_build.private_dir()
    assert private == tmp_path / f"moeframe-{os.getuid()}"
    private.mkdir()
    if problem == "world-writable":
        private.chmod(0o777)
    else:
        other_uid(private)
    why = "writable by group or others" if problem == "world-writable" else "owned by uid"
    with pytest.raises(NativeUnavailable, match=f"private build directory .* is {why}") as info:
        build(cc)
    assert "\n" not in str(info.value) and compiles(cc[2]) == 0


def test_a_compile_error_says_why_in_one_line(cache, cc):
    broken = LibrarySpec("broken", {"broken.c": "int f(void) { return undefined_name; }\n"}, ("-fPIC", "-shared"))
    with pytest.raises(NativeUnavailable, match="compiling broken with .* failed: .*undefined_name") as info:
        ensure_library(broken, (cc[0], cc[1]))
    assert "\n" not in str(info.value)
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]


# -- the real library ------------------------------------------------------------------------
def test_the_fused_cpu_library_checks_its_abi_and_takes_arguments_by_name(cache, tmp_path):
    from moeframe.kernels import _fused_cpu_native as native

    if system_cc() is None:
        pytest.skip("no C compiler here")
    old = compile_c(tmp_path, "old", "int moe_abi_version(void) { return 99; }\n")
    with pytest.raises(NativeUnavailable, match="speaks C ABI version 99, this moeframe speaks 1"):
        native.NativeLibrary(old, "avx2")
    none = compile_c(tmp_path, "none", "int other(void) { return 0; }\n")
    with pytest.raises(NativeUnavailable, match="speaks C ABI version 0"):
        native.NativeLibrary(none, "avx2")
    try:
        lib = native.load_native()
    except NativeUnavailable as exc:
        pytest.skip(f"the native core cannot be built here: {exc}")
    with pytest.raises(TypeError, match=r"missing arguments \['nthreads'\], unknown arguments \['threads'\]"):
        lib.forward(**{name: 0 for name, _ in native.FORWARD_PARAMS if name != "nthreads"}, threads=1)


def test_every_c_source_is_warning_free(tmp_path):
    """Each variant's file compiles with -Wall -Wextra -Werror under its own flags (syntax
    only: quick, and possible for variants this CPU cannot run)."""
    from moeframe.kernels.cpu_isa import VARIANTS, machine_arch

    cc = system_cc()
    if cc is None:
        pytest.skip("no C compiler here")
    for variant in VARIANTS.values():
        if variant.arch != machine_arch():
            continue  # another architecture's flags mean nothing to this compiler
        flags = [f for f in variant.cflags if f not in ("-shared",)]
        proc = subprocess.run([cc, *flags, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", str(variant.path)],
                              capture_output=True, text=True)
        if proc.returncode != 0 and "unrecognized command-line option" in proc.stderr:
            continue  # an older compiler that does not know this variant's instructions
        assert proc.returncode == 0, f"{variant.name}: {proc.stderr[:2000]}"


def test_one_openmp_runtime_in_the_process():
    """The library's libgomp.so.1 is torch's (one OpenMP runtime, one thread pool)."""
    from moeframe.kernels._fused_cpu_native import NativeUnavailable as Unavailable
    from moeframe.kernels._fused_cpu_native import load_native

    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc here")
    try:
        load_native()
    except Unavailable as exc:
        pytest.skip(f"the native core cannot be built here: {exc}")
    maps = Path("/proc/self/maps").read_text().splitlines()
    gomp = {line.split()[-1] for line in maps if "gomp" in line.split()[-1]}
    assert len(gomp) <= 1, gomp


def test_every_c_source_ships_as_package_data():
    """Each file of csrc/ matches a package-data pattern (else an installed moeframe could
    not build its core), and every variant's source is there."""
    from fnmatch import fnmatch

    from moeframe.kernels.cpu_isa import VARIANTS

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["moeframe.kernels"]
    csrc = root / "moeframe" / "kernels" / "csrc"
    files = sorted(p.name for p in csrc.iterdir() if p.is_file())
    assert files and all(any(fnmatch(f"csrc/{name}", pat) for pat in patterns) for name in files), (files, patterns)
    assert {v.source for v in VARIANTS.values()} <= set(files)
