"""Executes the code in the docs, so that it cannot rot.

In ``README.md`` and ``docs/*.md``:

* a fenced ``python`` block is executed; the blocks of one file share a namespace and
  run in order, in a temporary working directory;
* a fenced ``console`` block has its ``$ `` lines run with bash from the repository root
  (the virtual environment's ``bin`` first on PATH) and each must exit 0;
* a block directly preceded by ``<!-- skip-test: why -->`` is not run (GPU-only or
  multi-minute commands), and ``<!-- expect-exit: N -->`` expects exit status N.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"(?P<marker><!--\s*(?P<kind>skip-test|expect-exit):?\s*(?P<arg>[^>]*?)\s*-->\s*\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)\n```", re.S)


def blocks(path: Path) -> list[tuple[str, str, str | None, str | None, int]]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start("body"))
        out.append((m.group("lang"), m.group("body"), m.group("kind"), m.group("arg"), line + 1))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_doc_examples_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"doc_{doc.stem}"}
    for lang, body, kind, arg, line in blocks(doc):
        if kind == "skip-test":
            continue
        if lang == "python":
            code = compile(body, f"{doc.name}:{line}", "exec")
            exec(code, namespace)  # noqa: S102 - the docs are ours
        elif lang == "console":
            expected = int(arg) if kind == "expect-exit" else 0
            for command in [ln[2:] for ln in body.splitlines() if ln.startswith("$ ")]:
                proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)
                assert proc.returncode == expected, (
                    f"{doc.name}:{line}: `{command}` exited {proc.returncode} (expected {expected})\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
                )
