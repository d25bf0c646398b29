"""``moeframe check [KERNEL...]``: the conformance kit -- check kernels against the reference."""

from __future__ import annotations

import argparse

from moeframe.cli.common import add_json_argument, parse_int_list, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `moeframe check`."""
    p.add_argument(
        "kernels",
        nargs="*",
        metavar="KERNEL",
        help="kernels to check (default: every registered kernel); a transformers checkpoint directory given "
        "first checks them on one of its MoE layers, with its weights (see --layer)",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        metavar="N",
        help="with a checkpoint directory: the decoder layer whose MoE block to check on "
        "(default: the first MoE layer)",
    )
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--tokens", default="0,1,7,64", help="comma-separated token counts (default 0,1,7,64)")
    p.add_argument(
        "--dtype",
        action="append",
        dest="dtypes",
        metavar="DTYPE",
        help="dtypes to check (default: all the kernel supports)",
    )
    add_json_argument(p)


def run(args: argparse.Namespace) -> int:
    from moeframe.cli.common import resolve_device
    from moeframe.config import DTYPE_NAMES
    from moeframe.conformance import KernelCase, check_kernel
    from moeframe.errors import InputError
    from moeframe.memory import Need, activation_bytes, check_fits
    from moeframe.plugins import get_registry

    tokens = parse_int_list("--tokens", args.tokens)
    device = resolve_device(args.device)
    biggest = KernelCase("silu", True, False, "float32", max(tokens))
    check_fits(
        [Need("activations", activation_bytes(biggest.model(), max(tokens)), f"--tokens={max(tokens)}")],
        device,
        "check",
    )
    for dtype in args.dtypes or ():
        if dtype not in DTYPE_NAMES:
            raise InputError(f"--dtype: unknown dtype {dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
    from moeframe.integrations.transformers.checkpoint import check_kernel_on_checkpoint, split_checkpoint_argument

    checkpoint, kernels = split_checkpoint_argument(args.kernels, args.layer)
    names = kernels or get_registry().names("kernel")
    for name in names:
        get_registry().get("kernel", name)  # unknown names fail before any work
    report = []
    failed = 0
    for name in names:
        results = (
            check_kernel(name, device, tokens, args.dtypes)
            if checkpoint is None
            else check_kernel_on_checkpoint(name, checkpoint, args.layer, device, tokens, args.dtypes)
        )
        bad = [r for r in results if not r.ok]
        failed += len(bad) + (not results)  # a kernel that no case fits has not passed anything
        report.append(
            {
                "kernel": name,
                "cases": len(results),
                "failed": [
                    {"case": r.case.id, "error": r.error, **(r.comparison.as_dict() if r.comparison else {})}
                    for r in bad
                ],
            }
        )
        if not args.json:
            print(
                f"{name}: {len(results) - len(bad)}/{len(results)} cases ok"
                + ("" if results else " (no case fits the kernel's dtypes; not checked)")
            )
            for r in bad:
                cmp = r.comparison
                if r.error or cmp is None:
                    detail = r.error or "failed"
                elif cmp.nonfinite_new:
                    detail = f"{cmp.nonfinite_new} NaN or inf values where the reference is finite"
                else:
                    detail = f"max abs error {cmp.max_abs_error:.3e}"
                print(f"  FAIL {r.case.id}: {detail}")
    if args.json:
        print_json({"kernels": report, "ok": failed == 0})
    return 0 if failed == 0 else 1
