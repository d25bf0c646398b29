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
    parser.add_argument(
        "config",
        metavar="CONFIG",
        help="a TOML config file, a packaged preset name (see `moeframe list presets`) "
        "or a transformers checkpoint directory (config.json and *.safetensors; see --layer)",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        metavar="N",
        help="with a checkpoint directory as CONFIG: the decoder layer whose MoE block to load "
        "(default: the first MoE layer)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a config field, e.g. --set stack.kernel=torch --set model.dtype=bfloat16 (repeatable)",
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def load_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    """The config of a command's CONFIG argument and its ``--set`` options.

    ``--set KEY+=[...]`` appends to the list at KEY (``stack.wrappers+=["chunking"]``
    keeps the preset's wrappers and their parameters); ``--set stack.wrappers=[...]``
    replaces the list, with a warning naming the wrappers it drops."""
    from moeframe.config import list_presets
    from moeframe.integrations.transformers.checkpoint import config_from_args

    text = str(args.config)
    bare_preset = text in list_presets() and "/" not in text and not text.endswith(".toml")
    # a preset's name is the preset even when a folder of that name sits here (./NAME is the folder)
    if bare_preset and getattr(args, "layer", None) is not None:
        raise InputError(
            f"--layer applies to a transformers checkpoint directory as CONFIG, not to the preset {text!r}"
        )
    checkpoint = None if bare_preset else config_from_args(args, extra)  # None unless CONFIG is a checkpoint directory
    if checkpoint is not None:
        return checkpoint
    overrides = _expand_appends(args.config, list(args.overrides))
    return load_config(args.config, overrides + [f"{k}={v}" for k, v in (extra or {}).items()])


def _toml_value(value: Any) -> str:
    """An inline TOML value (for values read back from a config)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
        )
    raise InputError(f"--set: cannot write {value!r} back as TOML")


def _lookup(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _expand_appends(source: Any, overrides: list[str]) -> list[str]:
    """Rewrite each ``KEY+=VALUE`` into ``KEY=<the list so far + VALUE>``; warn when
    ``stack.wrappers=`` drops wrappers the config had."""
    import warnings

    from moeframe.config import parse_override

    out: list[str] = []
    for text in overrides:
        key, sep, _ = text.partition("=")
        appending = sep and key.rstrip().endswith("+")
        replacing_wrappers = sep and key.strip() == "stack.wrappers"
        if not appending and not replacing_wrappers:
            out.append(text)
            continue
        key = key.rstrip()[:-1].strip() if appending else key.strip()
        current = _lookup(load_config(source, out).to_dict(), key)
        _, value = parse_override(f"{key}={text.partition('=')[2]}")
        if appending:
            if not isinstance(current, list) or not isinstance(value, list):
                raise InputError(
                    f"--set {text}: += appends to a list ({key} is {json.dumps(current)}); "
                    'give a list, e.g. --set stack.wrappers+=["chunking"]'
                )
            out.append(f"{key}={_toml_value(current + value)}")
            continue
        kept = {w if isinstance(w, str) else w.get("name") for w in value} if isinstance(value, list) else set()
        dropped = [w["name"] for w in current or () if w["name"] not in kept]
        if dropped:
            warnings.warn(
                f"--set {text} replaces the list and drops {', '.join(dropped)}; "
                "to keep them, use --set stack.wrappers+=[...] to append",
                stacklevel=2,
            )
        out.append(text)
    return out


def parse_int_list(
    option: str, text: str, *, minimum: int = 0, expects: str = "comma-separated integers", unique: bool = False
) -> list[int]:
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


#: device types moeframe runs on
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(text: str, option: str = "--device") -> Any:
    """The :class:`torch.device` for a ``--device`` value, or one-line
    :class:`~moeframe.errors.InputError`: an unknown or unsupported device type, ``meta``
    (no data), or CUDA where this torch has no usable GPU.  Every command checks its
    device here."""
    import torch

    try:
        device = torch.device(str(text).strip())
    except (RuntimeError, ValueError, TypeError):
        raise InputError(f"{option}: unknown device {text!r}; use cpu or cuda (cuda:N for GPU N)") from None
    if device.type == "meta":
        raise InputError(f"{option} meta: tensors on 'meta' hold no data, so nothing can run there; use cpu or cuda")
    if device.type not in DEVICE_TYPES:
        raise InputError(f"{option}: moeframe runs on cpu or cuda, not {device.type!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"{option} {text}: no CUDA device is available here (this torch: {torch.__version__}); use cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(
                f"{option} {text}: there {'is' if count == 1 else 'are'} {count} CUDA device(s) here "
                f"(cuda:0..cuda:{count - 1})"
            )
    return device


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_params(params: Any) -> str:
    if isinstance(params, dict):
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
    return ""


def format_bytes(n: float) -> str:
    from moeframe.memory import format_bytes as fmt

    return fmt(n)


def stack_lines(parts: Sequence[dict[str, Any]]) -> str:
    """The stack as a table; a part whose details carry a ``summary`` (``fused_cpu``'s
    backend, or why it runs its torch path) shows it beside its name."""

    def name(p: dict[str, Any]) -> str:
        summary = (p.get("details") or {}).get("summary")
        return f"{p['name']} ({summary})" if summary else p["name"]

    rows = [
        (
            p["kind"],
            name(p),
            p["provider"],
            format_params(p["params"]),
            format_bytes(p["workspace_bytes"]) if p["workspace_bytes"] else "",
        )
        for p in parts
    ]
    return table(rows, ["part", "name", "provider", "params", "workspace"])
