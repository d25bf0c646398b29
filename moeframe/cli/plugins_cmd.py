"""``moeframe plugins``: installed plugin distributions and what they provide."""

from __future__ import annotations

import argparse

from moeframe.cli.common import add_json_argument, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `moeframe plugins`."""
    p.add_argument(
        "--check",
        action="store_true",
        help="also import every registered strategy's class and check it against its kind's contract "
        "(a few seconds: it imports torch and the plugins' backends)",
    )
    add_json_argument(p)


def run(args: argparse.Namespace) -> int:
    from moeframe.plugins import get_host

    host = get_host()
    if args.check:
        # import every strategy's implementation and check it against its kind's contract,
        # so that a plugin whose classes are broken shows up here (a few seconds: torch)
        host.verify()
    records = [r.as_dict() for r in host.plugins]
    conflicts = [str(c) for c in host.registry.conflicts] + list(host.commands.conflicts.values())
    if args.json:
        print_json({"plugins": records, "conflicts": conflicts, "classes_checked": bool(args.check)})
        return 0
    for r in records:
        title = f"{r['name']} {r['version'] or ''}".strip() + (" (builtin)" if r["builtin"] else "")
        print(f"{title}: {r['status']}")
        for ep in r["entry_points"]:
            print(f"  entry point: {ep}")
        if r["hooks"]:
            print(f"  hooks: {', '.join(r['hooks'])}")
        for kind, names in r["provides"].items():
            print(f"  {kind}: {', '.join(names)}")
        if r["commands"]:
            print(f"  commands: {', '.join(r['commands'])}")
        for err in r["errors"]:
            print(f"  error: {err}")
    for conflict in conflicts:
        print(f"conflict: {conflict}")
    if not args.check:
        print("(strategy classes not imported: `moeframe plugins --check` imports and checks them)")
    return 0
