"""``moeframe bench CONFIG``: kernels, the stack and peers side by side against this
machine's limits.

For each dtype, token count and implementation (every non-interpreter kernel, or
``--kernels``; the full configured stack; transformers' experts implementations when
transformers is installed) it checks the output against the reference, then reports the
median of ``--repeat`` timed rounds, tokens/s, GFLOP/s, GB/s of expert weights read and
their fractions of the peak GEMM rate and read bandwidth measured in the same run.
Tables go to stdout, a progress bar to stderr.  Exit status 1 when a kernel or the stack
disagrees with the reference, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moeframe.cli.common import add_config_arguments, load_from_args, parse_int_list
from moeframe.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `moeframe bench`."""
    add_config_arguments(p)
    p.add_argument(
        "--kernels",
        metavar="A,B",
        help="comma-separated kernels (default: every registered kernel but interpreter variants)",
    )
    p.add_argument(
        "--tokens",
        default="1,16,64,256,1024,4096",
        metavar="T,...",
        help="comma-separated token counts (default 1,16,64,256,1024,4096)",
    )
    p.add_argument(
        "--dtype", metavar="D,...", help="comma-separated dtypes: float32, bfloat16, float16 (default: the config's)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=7,
        metavar="R",
        help="timed rounds per token count; the median is reported (default 7)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds one implementation may take at one token count before stopping at 3 samples (default 20)",
    )
    p.add_argument("--no-peers", action="store_true", help="leave out transformers' implementations")
    p.add_argument(
        "--overhead", action="store_true", help="also measure the framework's overhead (runner, chunking, import time)"
    )
    p.add_argument(
        "--memory", action="store_true", help="also measure peak extra memory of a forward with and without chunking"
    )
    p.add_argument(
        "--memory-tokens", type=int, default=32768, metavar="T", help="tokens of the --memory forward (default 32768)"
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=1024,
        metavar="N",
        help="chunking's max_num_tokens for --overhead and --memory (default 1024)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full results as JSON to FILE (atomically)")
    p.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="plot GFLOP/s and GB/s against T to FILE.png (needs matplotlib)"
    )
    p.add_argument(
        "--markdown", type=Path, metavar="FILE.md", help="replace the bench section of FILE.md with the tables"
    )


def _names(option: str, text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise InputError(f"{option} expects comma-separated names, got {text!r}")
    return names


def run(args: argparse.Namespace) -> int:
    from moeframe.config import DTYPE_NAMES
    from moeframe.plugins import get_registry
    from moeframe_bench.measure import BarProgress, BenchOptions, default_kernels, run_benchmark, total_steps
    from moeframe_bench.peers import IMPLEMENTATIONS, transformers_version, unsupported_reason
    from moeframe_bench.report import check_output_paths, plot, text_report, update_markdown, write_json

    tokens = tuple(parse_int_list("--tokens", args.tokens, unique=True))
    dtypes = _names("--dtype", args.dtype)
    for d in dtypes or ():
        if d not in DTYPE_NAMES:
            raise InputError(f"--dtype: unknown dtype {d!r}; choose from {', '.join(DTYPE_NAMES)}")
    if args.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {args.repeat}")
    if not args.budget > 0 or args.budget == float("inf"):
        raise InputError(f"--budget must be a positive number of seconds, got {args.budget}")
    for option, value in (("--chunk", args.chunk), ("--memory-tokens", args.memory_tokens)):
        if value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    kernels = _names("--kernels", args.kernels)
    for name in kernels or ():
        get_registry().get("kernel", name)  # unknown names: exit 2 before any work
    check_output_paths(args.json, args.plot, args.markdown)
    config = load_from_args(args)
    _check_memory(config, max(*tokens, args.memory_tokens if args.memory else 0))
    options = BenchOptions(
        kernels=kernels,
        tokens=tokens,
        dtypes=dtypes,
        repeat=args.repeat,
        budget_s=args.budget,
        peers=not args.no_peers,
        overhead=args.overhead,
        memory=args.memory,
        memory_tokens=args.memory_tokens,
        chunk=args.chunk,
    )
    peers = 0 if args.no_peers or transformers_version() is None or unsupported_reason(config) else len(IMPLEMENTATIONS)
    bar = BarProgress(total_steps(options, len(kernels or default_kernels()), peers))
    try:
        result = run_benchmark(config, options, bar)
    finally:
        bar.close()
    sys.stdout.write(text_report(result))
    if args.json is not None:
        write_json(result, args.json)
    if args.plot is not None:
        plot(result, args.plot)
    if args.markdown is not None:
        update_markdown(args.markdown, result)
    if not result["ok"]:
        sys.stderr.write("moeframe bench: a kernel or the stack disagrees with the reference (see the check column)\n")
    return 0 if result["ok"] else 1


def _check_memory(config: Any, num_tokens: int) -> None:
    """Refuse, before any work, a benchmark whose layer, reference and largest forward
    do not fit in the memory available (one line naming the keys)."""
    from moeframe.layer import describe_layer
    from moeframe.memory import Need, activation_bytes, check_fits

    plan = describe_layer(config)
    m = config.model
    check_fits(
        [
            *(Need(n["what"], n["nbytes"], n["keys"]) for n in plan["needs"]),
            Need("the reference's weights", plan["weight_bytes"], "the same keys"),
            Need(
                "activations",
                activation_bytes(m, num_tokens),
                f"--tokens or --memory-tokens = {num_tokens}, model.top_k={m.top_k}, model.hidden_size={m.hidden_size}",
            ),
        ],
        "cpu",
        "bench",
    )
