"""Where a config's plain data comes from: TOML files, packaged presets, ``extends``
chains and ``--set KEY=VALUE`` overrides.  Each source is normalised to the one shape
(:mod:`moeframe.config.shape`) as soon as it is read, so merging and overriding see only
that shape."""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from moeframe.config.shape import (
    STRATEGY_PATHS,
    Spelling,
    canonical_parts,
    format_path,
    merge,
    merge_strategy,
    normalize,
    normalize_strategy,
    split_path,
)
from moeframe.errors import ConfigError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["PRESET_PACKAGE", "MAX_EXTENDS_DEPTH", "list_presets", "read_source", "parse_override", "apply_override"]

PRESET_PACKAGE = "moeframe.presets"
#: the longest chain of ``extends`` (a file extending a file ...) that is followed
MAX_EXTENDS_DEPTH = 32


def list_presets() -> list[str]:
    """Names of the packaged presets."""
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def _looks_like_path(text: str) -> bool:
    """A source written as a path (``./mixtral``, ``conf/a``, ``a.toml``), not a preset name."""
    return text.endswith(".toml") or "/" in text or (os.sep != "/" and os.sep in text)


def _read_toml_file(path: Path, label: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file: {exc.strerror}", label) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); TOML files are UTF-8", label
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}", label) from None


def read_source(source: str | Path, spelling: Spelling, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """The table of a file or preset in the one shape, its ``extends`` chain merged in,
    and its label (the path, or ``preset:NAME``).

    A name of a packaged preset is the preset unless it is written as a path
    (``./mixtral``, ``mixtral.toml``); any other name is a file when one exists.
    """
    text_source = str(source)
    path = Path(text_source)
    presets = list_presets()
    is_preset = text_source in presets and not _looks_like_path(text_source)
    if not is_preset and (_looks_like_path(text_source) or path.exists()):
        if path.is_dir():
            hint = f"; for the preset, give its name alone: {path.name!r}" if path.name in presets else ""
            raise ConfigError("", f"config file {text_source!r} is a directory, not a TOML file{hint}")
        if not path.is_file():
            suggestion = did_you_mean(path.stem, [p for p in presets if p != text_source])
            raise ConfigError(
                "",
                f"config file {text_source!r} not found{suggestion}; "
                f"give a TOML file or a preset: {', '.join(presets)}",
            )
        label = str(path)
        key = str(path.resolve())
        raw = _read_toml_file(path, label)
    elif is_preset:
        label = key = f"preset:{text_source}"
        raw = tomllib.loads(resources.files(PRESET_PACKAGE).joinpath(f"{text_source}.toml").read_text("utf-8"))
    else:
        raise ConfigError(
            "",
            f"no config file or preset named {text_source!r}{did_you_mean(text_source, presets)}; "
            f"presets: {', '.join(presets)}",
        )
    try:
        raw = normalize(raw, spelling)
    except ConfigError as exc:
        raise exc.with_source(label) from None
    if "extends" in raw:
        base_name = raw.pop("extends")
        if not isinstance(base_name, str):
            raise ConfigError("extends", f"expected a preset name or file path, got {base_name!r}", label)
        if key in seen:
            raise ConfigError("extends", f"circular 'extends' through {label}", label)
        if len(seen) + 1 >= MAX_EXTENDS_DEPTH:
            raise ConfigError(
                "extends",
                f"more than {MAX_EXTENDS_DEPTH} configs in one 'extends' chain (this one extends {base_name!r}); "
                "make a shorter chain",
                label,
            )
        relative = path.parent / base_name
        if (
            not Path(base_name).is_absolute()
            and path.suffix == ".toml"
            and (base_name not in presets or _looks_like_path(base_name))
            and relative.is_file()
        ):
            base_name = str(relative)
        base, _ = read_source(base_name, spelling, (*seen, key))
        raw = merge(base, raw)
    return raw, label


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a ``--set KEY=VALUE`` argument; VALUE is a TOML value, or else a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("", f"--set expects KEY=VALUE, got {text!r} (e.g. --set stack.kernel=triton)")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def apply_override(raw: dict[str, Any], key: Any, value: Any, spelling: Spelling) -> dict[str, Any]:
    """``raw`` (in the one shape) with ``value`` set at dotted key path ``key``, in the one
    shape again.  Setting a strategy to a name keeps its parameters unless the name is
    another strategy's; setting a list item needs the item to exist."""
    parts = canonical_parts(split_path(key), spelling)
    spelling.forget(format_path(parts))
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = parts[: i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(format_path(here), f"no such item (the list has {size})")
            if last:
                node[part] = value
            else:
                node = node[part]
            continue
        if not isinstance(node, dict):
            raise ConfigError(format_path(parts[:i]), f"is not a table, cannot set {part!r} in it")
        if last:
            if tuple(here) in STRATEGY_PATHS:
                new = normalize_strategy(value, format_path(here), spelling, flat_params=here == ["router"])
                node[part] = merge_strategy(node.get(part), new)
            else:
                node[part] = value
        else:
            if node.get(part) is None:
                node[part] = [] if isinstance(parts[i + 1], int) else {}
            node = node[part]
    return normalize(raw, spelling)
