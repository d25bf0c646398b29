"""``moeframe plugins``: installed plugin distributions and what they provide."""

from __future__ import annotations

import argparse

from moeframe.cli.common import add_json_argument, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list installed plugins, their hooks and what they provide")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeframe.plugins import get_host

    # import every strategy's implementation and check it against its kind's contract,
    # so that a plugin whose classes are broken shows up here (a few seconds: torch)
    host = get_host().verify()
    records = [r.as_dict() for r in host.plugins]
    if args.json:
        print_json({"plugins": records, "conflicts": [str(c) for c in host.registry.conflicts]})
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
        for err in r["errors"]:
            print(f"  error: {err}")
    for conflict in host.registry.conflicts:
        print(f"conflict: {conflict}")
    return 0
