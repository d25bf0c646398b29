"""``load_config``: sources, then overrides, then resolution — each on the one shape."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeframe.config.resolution import build_config
from moeframe.config.schema import Config
from moeframe.config.shape import STRATEGY_PATHS, Spelling, canonical_parts, merge, normalize, split_path
from moeframe.config.sources import apply_override, parse_override, read_source
from moeframe.errors import ConfigError

if TYPE_CHECKING:
    from moeframe.plugins.manager import Registry

__all__ = ["load_config"]


def _plain(value: Any) -> Any:
    """A deep copy of ``value`` with every mapping a dict and every sequence a list."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _chooses_a_strategy(key: Any) -> bool:
    """Whether override ``key`` picks a strategy (``stack.kernel``, ``router.name``)."""
    try:
        parts = tuple(canonical_parts(split_path(key), Spelling()))
    except ConfigError:
        return False  # reported in its turn
    return parts in STRATEGY_PATHS or (parts[-1] == "name" and parts[:-1] in STRATEGY_PATHS)


def _override_pairs(overrides: Mapping[str, Any] | Iterable[str] | str | None) -> list[tuple[Any, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    elif isinstance(overrides, str):
        pairs = [parse_override(overrides)]
    else:
        pairs = [parse_override(o) for o in overrides]
    # strategies first, so that a parameter set before its strategy's name is kept
    return [p for p in pairs if _chooses_a_strategy(p[0])] + [p for p in pairs if not _chooses_a_strategy(p[0])]


def load_config(
    source: str | Path | Mapping[str, Any] | Config,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    *,
    registry: Registry | None = None,
) -> Config:
    """Load and validate a config.

    ``source``: a TOML file path, a preset name (``"qwen3-moe"``), a dict in the file's
    shape, or a :class:`Config`.  ``overrides``: a mapping of dotted key paths to values
    (``{"stack.kernel": "triton"}``) or ``KEY=VALUE`` strings as given to ``--set``;
    applied on top of the source and validated like it (those that choose a strategy
    first, then the others in order).  ``registry``: where strategies are looked up
    (default: the process-wide one, with every installed plugin), as for
    :func:`~moeframe.composer.build_stack`.

    Every error is a :class:`~moeframe.errors.ConfigError` naming the source, the key
    path as it was written and what would work.
    """
    spelling = Spelling()
    label: str | None = None
    try:
        if isinstance(source, Config):
            raw, label = source.to_dict(), source.source
        elif isinstance(source, Mapping):
            raw = normalize(_plain(source), spelling)
            if "extends" in raw:
                base_name = raw.pop("extends")
                if not isinstance(base_name, str):
                    raise ConfigError("extends", f"expected a preset name or file path, got {base_name!r}")
                base, _ = read_source(base_name, spelling)
                raw = merge(base, raw)
        elif isinstance(source, (str, Path)):
            raw, label = read_source(source, spelling)
        else:
            raise ConfigError("", f"cannot load a config from {type(source).__name__}")
        for key, value in _override_pairs(overrides):
            raw = apply_override(raw, key, value, spelling)
        if registry is None:
            from moeframe.plugins import get_registry

            registry = get_registry()
        return build_config(raw, label, registry)
    except ConfigError as exc:
        written = ConfigError(spelling.written(exc.path), exc.message, exc.source)
        raise (written.with_source(label) if label else written) from None
