"""Writing output files whole or not at all.

Every file moeframe writes for a user (weights, benchmark results, plots, tuned configs)
goes through :func:`atomic_output`: the content is written to a temporary file in the
same folder, then renamed over the target, so a crash or an error never leaves a
half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix, so that writers that go by
    it pick the right format); when the block ends without an error, it replaces
    ``path`` with the usual permissions of a new file; otherwise it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
