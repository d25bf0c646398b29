"""``moeframe list [KIND]``: every registered strategy (or the presets)."""

from __future__ import annotations

import argparse

from moeframe.cli.common import add_json_argument, print_json, table
from moeframe.errors import UnknownStrategyError
from moeframe.plugins.records import KINDS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `moeframe list`."""
    p.add_argument("kind", nargs="?", metavar="KIND", help=f"one of: {', '.join(KINDS)}, presets")
    add_json_argument(p)


def run(args: argparse.Namespace) -> int:
    from moeframe.config import list_presets
    from moeframe.plugins import get_registry

    kind = args.kind
    if kind is not None and kind.endswith("s") and kind[:-1] in KINDS:
        kind = kind[:-1]
    if kind in ("preset", "presets"):
        presets = list_presets()
        if args.json:
            print_json({"presets": presets})
        else:
            print("\n".join(presets))
        return 0
    if kind is not None and kind not in KINDS:
        raise UnknownStrategyError("strategy kind", kind, [*KINDS, "presets"])
    registry = get_registry()
    entries = registry.entries(kind)
    if args.json:
        print_json({"strategies": [e.as_dict() for e in entries], "conflicts": [str(c) for c in registry.conflicts]})
        return 0
    rows = [(e.kind, e.strategy.display_name, str(e.provider), e.description) for e in entries]
    print(table(rows, ["kind", "name", "provider", "description"]))
    for conflict in registry.conflicts:
        print(f"conflict: {conflict}")
    return 0
