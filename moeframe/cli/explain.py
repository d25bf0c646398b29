"""``moeframe explain CONFIG``: the resolved config and the composed stack."""

from __future__ import annotations

import argparse
import json
from typing import Any

from moeframe.cli.common import (
    add_config_arguments,
    add_json_argument,
    format_bytes,
    load_from_args,
    print_json,
    stack_lines,
    table,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `moeframe explain`."""
    add_config_arguments(p)
    p.add_argument("--device", default="cpu", help="device to build the stack for (default: cpu)")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="describe every rank of an N-rank layout, without launching it (default: the config's "
        "ep_size * tp_size, else dp_size * tp_size)",
    )
    add_json_argument(p)


def default_world_size(config: Any) -> int:
    """The number of ranks a config describes on its own: ``ep_size * tp_size`` when
    ``ep_size`` is set, else ``dp_size * tp_size`` (one EP rank per DP rank)."""
    par = config.parallel
    return par.ep_size * par.tp_size if par.ep_size is not None else par.dp_size * par.tp_size


def run(args: argparse.Namespace) -> int:
    from moeframe.cli.common import resolve_device
    from moeframe.errors import InputError
    from moeframe.layer import describe_layout

    config = load_from_args(args)
    device = resolve_device(args.device)
    world = default_world_size(config) if args.nproc is None else args.nproc
    if world < 1:
        raise InputError(f"--nproc must be >= 1, got {world}")
    ranks = describe_layout(config, world, device)  # nothing is allocated: shapes and bytes from the config
    info = ranks[0]
    if args.json:
        if world > 1:
            info = {**info, "ranks": [_rank_summary(r) for r in ranks]}
        print_json(info)
        return 0
    print(f"config: {info['source'] or '(dict)'}  fingerprint {config.fingerprint()}")
    _print_table(info["config"])
    print("\nstack (outermost first):")
    print(stack_lines(info["stack"]))
    par = info["parallel"]
    if world > 1:
        print(
            f"\nlayout: {world} ranks (dp {par['dp_size']} · ep {par['ep_size']} · tp {par['tp_size']} · "
            f"placement {par['placement']}), not launched"
        )
        rows = [
            (
                s["rank"],
                s["dp_rank"],
                s["ep_rank"],
                s["tp_rank"],
                s["local_experts"],
                format_bytes(s["weight_bytes"]),
                format_bytes(s["expert_weight_bytes"]),
                format_bytes(s["workspace_bytes"]),
            )
            for s in map(_rank_summary, ranks)
        ]
        print(table(rows, ["rank", "dp", "ep", "tp", "experts", "weights", "expert weights", "workspace"]))
        print("\nrank 0 in detail:")
    print(
        f"weights on {'rank 0' if world > 1 else 'this rank'}: {format_bytes(info['weight_bytes'])} "
        f"(experts {format_bytes(info['expert_weight_bytes'])})"
    )
    for w in info["weights"]:
        print(f"  {w['name']:<32} {w['shape']!s:<18} {w['dtype']:<9} {format_bytes(w['bytes'])}")
    print(f"workspace reserved by this stack: {format_bytes(info['workspace_bytes'])}")
    return 0


def _rank_summary(info: dict[str, Any]) -> dict[str, Any]:
    par = info["parallel"]
    experts = next((w["shape"][0] for w in info["weights"] if w["name"] == "experts.w13"), None)
    return {
        "rank": par["rank"],
        "dp_rank": par["dp_rank"],
        "ep_rank": par["ep_rank"],
        "tp_rank": par["tp_rank"],
        "local_experts": experts,
        "weight_bytes": info["weight_bytes"],
        "expert_weight_bytes": info["expert_weight_bytes"],
        "workspace_bytes": info["workspace_bytes"],
    }


def _print_table(d: dict, prefix: str = "") -> None:
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("params",) and not path.endswith("_params"):
            _print_table(value, path + ".")
        else:
            print(f"  {path} = {json.dumps(value)}")
