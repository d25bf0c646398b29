"""``moeframe explain CONFIG``: the resolved config and the composed stack."""

from __future__ import annotations

import argparse
import json

from moeframe.cli.common import add_config_arguments, add_json_argument, format_bytes, load_from_args, print_json, stack_lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="show the resolved config and the composed stack")
    add_config_arguments(p)
    p.add_argument("--device", default="cpu", help="device to build the stack for (default: cpu)")
    add_json_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moeframe.layer import MoELayer

    config = load_from_args(args)
    layer = MoELayer(config, device=args.device)
    info = layer.explain()
    if args.json:
        print_json(info)
        return 0
    print(f"config: {info['source'] or '(dict)'}  fingerprint {config.fingerprint()}")
    _print_table(info["config"])
    print("\nstack (outermost first):")
    print(stack_lines(info["stack"]))
    par = info["parallel"]
    print(
        f"\nthis rank: {par['rank']} of {par['world_size']} (dp {par['dp_rank']}/{par['dp_size']}, "
        f"ep {par['ep_rank']}/{par['ep_size']}, tp {par['tp_rank']}/{par['tp_size']})"
    )
    print(f"weights on this rank: {format_bytes(info['weight_bytes'])} "
          f"(experts {format_bytes(info['expert_weight_bytes'])})")
    for w in info["weights"]:
        print(f"  {w['name']:<32} {str(w['shape']):<18} {w['dtype']:<9} {format_bytes(w['bytes'])}")
    print(f"workspace reserved by this stack: {format_bytes(info['workspace_bytes'])}")
    return 0


def _print_table(d: dict, prefix: str = "") -> None:
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("params",) and not path.endswith("_params"):
            _print_table(value, path + ".")
        else:
            print(f"  {path} = {json.dumps(value)}")
