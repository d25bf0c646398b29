"""Helpers shared by the commands: config arguments, output, tables."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from moeframe.config import Config, load_config
from moeframe.errors import InputError


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="a TOML config file or a packaged preset name (see `moeframe list presets`)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="override a config field, e.g. --set stack.kernel=torch --set model.dtype=bfloat16 (repeatable)",
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def load_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides = list(args.overrides)
    return load_config(args.config, overrides + [f"{k}={v}" for k, v in (extra or {}).items()])


def parse_int_list(option: str, text: str, *, minimum: int = 0, expects: str = "comma-separated integers",
                   unique: bool = False) -> list[int]:
    """``"1,16,64"`` -> ``[1, 16, 64]`` for a command-line option, or one-line
    :class:`~moeframe.errors.InputError` naming the option and the value."""
    try:
        values = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{option} expects {expects}, got {text!r}") from None
    if not values:
        raise InputError(f"{option} expects {expects}, got {text!r}")
    if any(v < minimum for v in values):
        raise InputError(f"{option} must be >= {minimum}, got {text!r}")
    if unique and len(set(values)) != len(values):
        raise InputError(f"{option} lists a value twice, got {text!r}")
    return values


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_params(params: Any) -> str:
    if isinstance(params, dict):
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
    return ""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def stack_lines(parts: Sequence[dict[str, Any]]) -> str:
    rows = [
        (p["kind"], p["name"], p["provider"], format_params(p["params"]),
         format_bytes(p["workspace_bytes"]) if p["workspace_bytes"] else "")
        for p in parts
    ]
    return table(rows, ["part", "name", "provider", "params", "workspace"])
