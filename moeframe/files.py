"""Writing output files whole or not at all.

Every file moeframe writes for a user (weights, benchmark results, plots, tuned configs)
goes through :func:`atomic_output`: the content is written to a temporary file in the
same folder, then renamed over the target, so a crash or an error never leaves a
half-written file behind.

Rules every writer shares (and :func:`check_output_path` checks before any work):

* the target is a regular file or does not exist yet; an existing directory, FIFO,
  device or socket is refused (replacing ``/dev/null`` with a file is never what a user
  meant);
* a symbolic link is written *through*: its final target is replaced, the link stays;
* the target's folder must exist and be writable: a missing folder is refused, not
  created (it is usually a typo);
* the temporary file is ``.NAME.PID.RANDOM.tmp[.SUFFIX]`` next to the target; one killed
  mid-write (``kill -9``) is left behind, and the next write to the same target removes
  it once the process that made it is gone.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moeframe.errors import InputError

__all__ = ["atomic_output", "atomic_write_bytes", "atomic_write_text", "check_output_path", "resolve_output_path"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def resolve_output_path(path: str | Path) -> Path:
    """The file that writing to ``path`` replaces: ``path`` itself, or the final target
    of a symbolic link (which may not exist yet)."""
    path = Path(path)
    if path.is_symlink():
        return Path(os.path.realpath(path))
    return path


def check_output_path(path: str | Path, option: str = "output") -> Path:
    """Refuse, with one-line :class:`~moeframe.errors.InputError` naming ``option``, a
    path that :func:`atomic_output` could not replace; return the file it would replace.

    Call it before the work whose result goes there."""
    given = Path(path)
    if not str(path):
        raise InputError(f"{option}: give a file name, got {str(path)!r}")
    target = resolve_output_path(given)
    via = f" (the target of the link {str(given)!r})" if target != given else ""
    try:
        st = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise InputError(f"{option}: cannot use {str(target)!r}{via}: {exc.strerror}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = _kind(st.st_mode)
        hint = "give a file name" if stat.S_ISDIR(st.st_mode) else "only regular files are replaced"
        raise InputError(f"{option}: {str(target)!r}{via} is {what}; {hint}")
    folder = target.parent
    if not folder.exists():
        raise InputError(f"{option}: folder {str(folder)!r} does not exist; create it first")
    if not folder.is_dir():
        raise InputError(f"{option}: {str(folder)!r} is not a folder, so {str(target)!r} cannot be written")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{option}: folder {str(folder)!r} is not writable")
    return target


def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def _remove_stale_temps(target: Path) -> None:
    """Remove the temporary files of earlier writes to ``target`` whose process is gone
    (a writer killed mid-write)."""
    prefix = _temp_prefix(target)
    suffix = f".tmp{target.suffix}"
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid_text = name[len(prefix) : -len(suffix)].split(".", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running: it may be writing
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        with contextlib.suppress(OSError):
            (target.parent / name).unlink()


@contextlib.contextmanager
def atomic_output(path: str | Path, option: str = "output") -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so that writers that go by
    it pick the right format); when the block ends without an error, it replaces
    ``path`` (or, for a symbolic link, the link's target) with the usual permissions of a
    new file; otherwise it is removed.  Paths that cannot be replaced (see
    :func:`check_output_path`) are refused before the block runs."""
    target = check_output_path(path, option)
    _remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(
        prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes, option: str = "output") -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_output(path, option) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
