"""Build native libraries once per machine and keep them in a cache that cannot be hijacked.

A library is compiled from C sources (package data) with the system's C compiler and kept
under a name that hashes everything it is built from (sources, flags, compiler and its
version, platform).  What makes the cache safe to load from:

* **Directories.**  The cache directory (``$MOEFRAME_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/moeframe``, else ``~/.cache/moeframe``) must be owned by the current
  user and not writable by group or others, and so must every directory above it, except
  a root-owned one or one with the sticky bit (``/tmp``).  Otherwise nothing is built or
  loaded from it: :class:`NativeUnavailable` says why, in one line.
* **Building.**  One build at a time per library, under an exclusive file lock
  (:func:`fcntl.flock`) however many processes start at once; the others wait and load
  its result.  Sources are written, and the compiler writes its output, in a fresh private
  directory (:func:`tempfile.mkdtemp`, mode 0700) inside the cache, with files created
  exclusively and no symbolic link followed; the library is then renamed into place.
* **Loading.**  A cached library is loaded only if it is a regular file (not a link)
  owned by the current user, not writable by group or others, and its SHA-256 matches the
  one recorded at build time in a sidecar file (``NAME.so.sha256``, held to the same
  rules), read through a descriptor opened without following links; the file loaded must
  still be that one.  Anything else (truncated, corrupted, planted, a link) is
  rebuilt, never loaded, with a warning.
* **Read-only caches.**  A cache that is safe but cannot be written (or created) is used
  for the libraries it already holds; a missing one is built once into a private per-user
  directory (``$XDG_RUNTIME_DIR/moeframe``, else ``<tmp>/moeframe-<uid>``, mode 0700,
  checked like the cache) and found there by the next run.

POSIX only (Linux, macOS): elsewhere every build is refused with a reason.

Why a plain C build rather than ``torch.utils.cpp_extension``: the kernel needs no torch
headers (it takes raw pointers; the torch op around it is registered in Python with
``torch.library``), so a build is one ``cc`` call of a few seconds instead of a C++
compile against torch's headers (tens of seconds per variant, and ninja); it links only
``libgomp.so.1``, which resolves to the OpenMP runtime torch has already loaded; and the
cache rules above are ours to state and test, where torch's extension directory (per user
by default, anywhere with ``TORCH_EXTENSIONS_DIR``) loads what it finds there without
checking who could write it or what it holds.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "NativeUnavailable",
    "LibrarySpec",
    "CachedLibrary",
    "cache_dir",
    "private_dir",
    "find_compiler",
    "ensure_library",
    "check_directory",
]

#: bumped when the way libraries are built or recorded changes (part of every cache key)
BUILDER_VERSION = "2"
_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EEXIST}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class NativeUnavailable(RuntimeError):
    """The native core cannot be used here; the message (one line) says why."""


@attrs.frozen
class LibrarySpec:
    """What one library is built from: ``sources`` maps file names to their text (the
    first one and every other ``.c`` file are compiled into the library, the others,
    headers, sit beside them), ``cflags`` the compiler flags (``-shared`` and ``-fPIC``
    among them)."""

    name: str
    sources: Mapping[str, str]
    cflags: tuple[str, ...]

    def key(self, compiler: str, compiler_version: str) -> str:
        """The hash every input of the build goes into (the cache file's name holds it)."""
        h = hashlib.sha256()
        for part in (
            BUILDER_VERSION,
            self.name,
            *self.cflags,
            compiler,
            compiler_version,
            sys.platform,
            os.uname().machine,
        ):
            h.update(part.encode() + b"\0")
        for name in sorted(self.sources):
            h.update(name.encode() + b"\0" + self.sources[name].encode() + b"\0")
        return h.hexdigest()[:20]


@attrs.frozen
class CachedLibrary:
    """A verified library: ``path`` in the cache, ``fd`` the descriptor its content was
    checked through (close it once loaded) and ``sha256`` that content's hash."""

    path: Path
    fd: int
    sha256: str

    def load(self) -> Any:
        """``ctypes.CDLL`` of the library, after checking that ``path`` still names the
        file that was verified (the directory is private, so this only catches mistakes)."""
        import ctypes

        checked = os.fstat(self.fd)
        now = os.lstat(self.path)
        if (now.st_dev, now.st_ino) != (checked.st_dev, checked.st_ino):
            raise NativeUnavailable(f"the library {self.path} changed between its check and its load")
        return ctypes.CDLL(str(self.path))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


# -- directories ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where compiled libraries are kept (the directory need not exist yet)."""
    env = os.environ.get("MOEFRAME_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moeframe"


def private_dir() -> Path:
    """The per-user directory a library is built into when the cache cannot be written."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "moeframe"
    return Path(tempfile.gettempdir()) / f"moeframe-{os.getuid()}"


def _mode(st: os.stat_result) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def _dir_problem(path: Path, st: os.stat_result, leaf: bool) -> str | None:
    """Why ``path`` (stat ``st``) may not hold libraries, or ``None``."""
    uid = os.getuid()
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if leaf:
        if st.st_uid != uid:
            return f"owned by uid {st.st_uid}, not by you (uid {uid})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"writable by group or others (mode {_mode(st)})"
        return None
    if st.st_uid not in (uid, 0):
        return f"owned by uid {st.st_uid}, neither you (uid {uid}) nor root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        return f"writable by group or others without the sticky bit (mode {_mode(st)})"
    return None


def check_directory(path: Path, *, what: str = "cache directory") -> Path:
    """Resolve ``path`` (which exists) and check it and every directory above it; return the
    resolved path, or raise :class:`NativeUnavailable` saying which one is unsafe and why."""
    real = Path(os.path.realpath(path))
    for i, current in enumerate([real, *real.parents]):
        try:
            st = os.lstat(current)
        except OSError as exc:
            raise NativeUnavailable(f"cannot inspect the {what} {current}: {exc.strerror}") from None
        problem = _dir_problem(current, st, leaf=i == 0)
        if problem:
            where = f"the {what} {real}" if i == 0 else f"{current}, above the {what} {real},"
            raise NativeUnavailable(
                f"{where} is {problem}: another user could plant code there; "
                "fix its permissions or set MOEFRAME_CACHE_DIR to a directory only you can write"
            )
    return real


def _prepare(path: Path, *, what: str, mode: int = 0o700) -> Path | None:
    """Create ``path`` if needed; ``None`` if it cannot be created (a read-only place),
    else its checked real path (:class:`NativeUnavailable` when unsafe)."""
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as exc:
        if exc.errno in _READ_ONLY_ERRNOS or isinstance(exc, FileExistsError):
            return None
        raise NativeUnavailable(f"cannot create the {what} {path}: {exc.strerror}") from None
    return check_directory(path, what=what)


# -- the compiler ----------------------------------------------------------------------------
def find_compiler() -> tuple[str, str]:
    """The C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang`` on the path) and its
    ``--version`` output; :class:`NativeUnavailable` if there is none or it does not run."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise NativeUnavailable("no C compiler found (install gcc, or set CC)")
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"C compiler {cc!r} does not run: {exc}") from None
    if proc.returncode != 0:
        raise NativeUnavailable(f"C compiler {cc!r} does not run: '{cc} --version' exited with {proc.returncode}")
    return cc, proc.stdout


# -- verification ------------------------------------------------------------------------------
def _file_problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by you"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {_mode(st)})"
    return None


def _open_checked(path: Path) -> int:
    """Open ``path`` for reading without following a link; check what was opened."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        problem = _file_problem(os.fstat(fd))
    except OSError:
        os.close(fd)
        raise
    if problem:
        os.close(fd)
        raise _Bad(problem)
    return fd


class _Bad(Exception):
    """A cached file that must not be loaded (the message says why)."""


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _sidecar(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _verify(library: Path) -> CachedLibrary | None:
    """The verified library at ``library``; ``None`` if there is none; :class:`_Bad` if
    there is one that must not be loaded."""
    try:
        st = os.lstat(library)
    except FileNotFoundError:
        return None
    problem = _file_problem(st)
    if problem:
        raise _Bad(f"the library is {problem}")
    try:
        sfd = _open_checked(_sidecar(library))
    except FileNotFoundError:
        raise _Bad("its recorded hash is missing") from None
    except _Bad as exc:
        raise _Bad(f"its hash file is {exc}") from None
    except OSError as exc:
        raise _Bad(f"its hash file cannot be read ({exc.strerror})") from None
    try:
        recorded = os.read(sfd, 4096).decode("ascii", "replace").split()
    finally:
        os.close(sfd)
    if len(recorded) != 2 or recorded[0] != "sha256" or len(recorded[1]) != 64:
        raise _Bad("its hash file is malformed")
    try:
        fd = _open_checked(library)
    except _Bad as exc:
        raise _Bad(f"the library is {exc}") from None
    except OSError as exc:
        raise _Bad(f"the library cannot be read ({exc.strerror})") from None
    actual = _sha256_fd(fd)
    if actual != recorded[1]:
        os.close(fd)
        raise _Bad("its content does not match the hash recorded when it was built (truncated or modified)")
    return CachedLibrary(library, fd, actual)


def _lookup(library: Path) -> tuple[CachedLibrary | None, str | None]:
    """(verified library or ``None``, why the one there was refused or ``None``)."""
    try:
        return _verify(library), None
    except _Bad as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"it cannot be checked ({exc.strerror})"


# -- building -------------------------------------------------------------------------------
def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively (never through a link) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def _locked(directory: Path, name: str) -> Iterator[None]:
    """Hold the exclusive build lock of ``name`` in ``directory``; :class:`PermissionError`
    when the directory cannot be written."""
    import fcntl

    lock = directory / f".{name}.lock"
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
            break
        except OSError as exc:
            if exc.errno == errno.ELOOP and attempt == 0:  # a link planted at the lock's name
                os.unlink(lock)
                continue
            if exc.errno in _READ_ONLY_ERRNOS:
                raise PermissionError(exc.errno, exc.strerror, str(lock)) from None
            raise
    try:
        problem = _file_problem(os.fstat(fd))
        if problem:
            raise NativeUnavailable(f"the build lock {lock} is {problem}; remove it")
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (unlinking it would race)


def _compile(spec: LibrarySpec, compiler: str, staging: Path) -> Path:
    for fname, text in spec.sources.items():
        _write_new(staging / fname, text.encode(), 0o600)
    out = staging / "library.so"
    main = next(iter(spec.sources))
    # the first source, then every other C file (the rest, headers, are included by them)
    units = [str(staging / name) for name in spec.sources if name == main or name.endswith(".c")]
    try:
        proc = subprocess.run(
            [compiler, *spec.cflags, *units, "-o", str(out)],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=staging,
            check=False,  # the return code is read below: the first error line becomes the message
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailable(f"compiling {spec.name} with {compiler!r} failed: {exc}") from None
    if proc.returncode != 0:
        stderr = proc.stderr.replace(f"{staging}{os.sep}", "")  # the staging directory is gone afterwards
        lines = [line for line in stderr.splitlines() if " error:" in line] or stderr.strip().splitlines()
        raise NativeUnavailable(
            f"compiling {spec.name} with {compiler!r} failed: {(lines or ['(no output)'])[0].strip()}"
        )
    st = os.lstat(out)
    if not stat.S_ISREG(st.st_mode):
        raise NativeUnavailable(f"compiling {spec.name} with {compiler!r} produced no library")
    os.chmod(out, 0o755)
    return out


def _build_into(directory: Path, filename: str, spec: LibrarySpec, compiler: str) -> CachedLibrary:
    """Build ``spec`` into ``directory/filename`` under the lock, unless another process did
    meanwhile; :class:`PermissionError` when ``directory`` cannot be written."""
    target = directory / filename
    with _locked(directory, filename):
        found, why = _lookup(target)  # another process may have built it while we waited
        if found is not None:
            return found
        if why:
            warnings.warn(f"moeframe: the cached library {target} is not loaded ({why}); rebuilding it", stacklevel=4)
        # staging directories of this library left by a build that was killed (we hold its lock)
        for stale in directory.glob(f".build-{filename}-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".build-{filename}-", dir=directory))
        try:
            library = _compile(spec, compiler, staging)
            fd = os.open(library, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
            try:
                digest = _sha256_fd(fd)
            finally:
                os.close(fd)
            _write_new(staging / "library.so.sha256", f"sha256 {digest}\n".encode(), 0o644)
            # rename never follows a link at the destination: a planted one is replaced
            os.replace(library, target)
            os.replace(staging / "library.so.sha256", _sidecar(target))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        found, why = _lookup(target)
        if found is None:
            raise NativeUnavailable(f"the library just built at {target} does not verify ({why})")
        return found


def ensure_library(spec: LibrarySpec, compiler: tuple[str, str] | None = None) -> CachedLibrary:
    """The verified library for ``spec``, built if needed (see the module docstring);
    :class:`NativeUnavailable` says why there can be none.  Close the result once loaded."""
    if os.name != "posix":
        raise NativeUnavailable(f"native libraries are built on Linux and macOS only (this is {sys.platform})")
    cc, version = compiler or find_compiler()
    filename = f"{spec.name}-{spec.key(cc, version)}.so"
    configured = cache_dir()
    directory = _prepare(configured, what="cache directory")
    if directory is None:
        reason = f"the cache directory {configured} cannot be created"
    else:
        found, _ = _lookup(directory / filename)
        if found is not None:
            return found
        try:
            return _build_into(directory, filename, spec, cc)
        except PermissionError:
            reason = f"the cache directory {directory} is read-only"
    # a read-only cache: build once into a private place, where the next run finds it
    private = _prepare(private_dir(), what="private build directory")
    if private is None:
        raise NativeUnavailable(f"{reason} and the private build directory {private_dir()} cannot be created either")
    found, _ = _lookup(private / filename)
    if found is not None:
        return found
    try:
        return _build_into(private, filename, spec, cc)
    except PermissionError:
        raise NativeUnavailable(f"{reason} and the private build directory {private} is read-only too") from None


def sources_of(files: Sequence[Path]) -> dict[str, str]:
    """``{name: text}`` of ``files`` (the first one is the one compiled)."""
    return {f.name: f.read_text() for f in files}
