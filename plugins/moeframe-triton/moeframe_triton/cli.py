"""``moeframe tune CONFIG``: tune the configured kernel's block sizes for this GPU (a
command this plugin adds through moeframe's ``register_commands`` hook).

Generic over kernels: it resolves ``stack.kernel`` and calls the kernel class's
``tune`` classmethod (:meth:`moeframe.Kernel.tune`) when it overrides it::

    @classmethod
    def tune(cls, config, *, batch_sizes, output_dir, device, log) -> list[Path]

(``batch_sizes`` is None for the kernel's defaults; it returns the files it wrote).  A
kernel without ``tune``, or a kernel that cannot tune here (no GPU), is a user error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

from moeframe.cli.common import add_config_arguments, add_json_argument, load_from_args, parse_int_list, print_json
from moeframe.errors import UserError

if TYPE_CHECKING:
    from moeframe.kernels import Kernel


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `moeframe tune`."""
    add_config_arguments(p)
    p.add_argument(
        "--batch-sizes",
        metavar="M,M,...",
        default=None,
        help="comma-separated token counts to tune for (default: the kernel's list)",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="folder to write the tuned file into (default: the current folder)",
    )
    p.add_argument("--device", default="cuda", metavar="D", help="device to tune on (default cuda)")
    add_json_argument(p)


def _batch_sizes(text: str | None) -> list[int] | None:
    return None if text is None else parse_int_list("--batch-sizes", text, minimum=1)


def run(args: argparse.Namespace) -> int:
    from moeframe.plugins import get_registry

    sizes = _batch_sizes(args.batch_sizes)
    config = load_from_args(args)
    name = config.stack.kernel.name
    registry = get_registry()
    cls = cast("type[Kernel]", registry.get("kernel", name).load())
    if not cls.tunable():
        tunable = [
            e.name for e in registry.entries("kernel") if e.name != name and cast("type[Kernel]", e.load()).tunable()
        ]
        hint = f"; kernels that can: {', '.join(tunable)} (--set stack.kernel=NAME)" if tunable else ""
        raise UserError(f"kernel {name!r} has nothing to tune{hint}")
    log = (lambda msg: None) if args.json else (lambda msg: print(f"  {msg}", flush=True))
    if not args.json:
        print(
            f"moeframe tune: {config.source or '(dict)'} · kernel {name} · {config.model.dtype} · {args.device}",
            flush=True,
        )
    written = cls.tune(config, batch_sizes=sizes, output_dir=args.output, device=args.device, log=log)
    paths = [str(p) for p in written]
    if args.json:
        print_json({"kernel": name, "written": paths})
    else:
        for p in paths:
            print(f"wrote {p}")
    sys.stdout.flush()
    return 0
