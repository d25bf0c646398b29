"""``moeframe run CONFIG``: the main job.

Builds the configured stack, runs it on seeded hidden states (or ``--input``), times
``--repeat`` forwards, and checks the output against the reference stack (same router,
``torch`` kernel, no transparent wrappers, one process).  Exit status 1 when the error is
over the dtype's tolerance.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeframe.cli.common import add_config_arguments, add_json_argument, load_from_args, parse_int_list, print_json, stack_lines
from moeframe.errors import InputError

if TYPE_CHECKING:
    import torch


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the configured stack, time it and check it against the reference")
    add_config_arguments(p)
    p.add_argument("--tokens", default="128", metavar="N[,N...]",
                   help="number of tokens (default 128); under data parallelism one count per DP rank, e.g. 64,0")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for weights and inputs (default: the config's)")
    p.add_argument("--device", default="cpu", metavar="D", help="device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--repeat", type=int, default=5, metavar="R", help="timed repetitions; the median is reported (default 5)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="launch N processes with torchrun (torch.distributed) and run distributed")
    p.add_argument("--weights", type=Path, metavar="W.safetensors", help="load the layer's tensors from this file")
    p.add_argument("--input", type=Path, metavar="X.safetensors", help="take hidden states from tensor 'hidden_states' [T, H]")
    p.add_argument("--output", type=Path, metavar="Y.safetensors", help="write tensor 'output' [T, H] (only when the check passes)")
    add_json_argument(p)
    p.set_defaults(func=run)


def seeded_hidden_states(num_tokens: int, hidden_size: int, dtype: torch.dtype, seed: int, device: Any = "cpu") -> torch.Tensor:
    """The hidden states ``moeframe run`` uses: standard normal, from ``seed`` alone."""
    import torch

    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    return torch.randn(num_tokens, hidden_size, generator=g).to(device=device, dtype=dtype)


def read_input(path: Path, hidden_size: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise InputError(f"--input: file {str(path)!r} not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"--input: {path} is not a readable safetensors file ({exc})") from None
    if "hidden_states" not in tensors:
        raise InputError(f"--input: {path} has no tensor 'hidden_states' (it has: {', '.join(sorted(tensors)) or 'none'})")
    x = tensors["hidden_states"]
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise InputError(f"--input: tensor 'hidden_states' has shape {list(x.shape)}, expected [T, {hidden_size}]")
    if not (x.is_floating_point()):
        raise InputError(f"--input: tensor 'hidden_states' is {x.dtype}, expected a floating-point tensor")
    return x.to(device=device, dtype=dtype)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(fn: Any, x: torch.Tensor, repeat: int) -> tuple[torch.Tensor, list[float]]:
    """Run ``fn(x)`` once to warm up, then ``repeat`` timed times; return the last output."""
    device = x.device
    out = fn(x)
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        out = fn(x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return out, times


def parse_tokens(text: str) -> list[int]:
    return parse_int_list("--tokens", text, expects="a count or comma-separated counts (one per DP rank)")


def check_options(args: argparse.Namespace, dp_size: int) -> list[int]:
    """The checks of ``run``'s own options, made before any process is launched; returns
    the token counts."""
    counts = parse_tokens(args.tokens)
    if len(counts) not in (1, dp_size):
        raise InputError(f"--tokens has {len(counts)} counts but there are {dp_size} DP ranks; give one count or one per DP rank")
    if args.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {args.repeat}")
    return counts


class RankFailure(Exception):
    """A collective failed on this rank, usually because a peer rank failed first."""


def execute(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job on this rank; in a distributed run, every rank returns the results of all."""
    import torch

    from moeframe.layer import MoELayer
    from moeframe.numerics import compare
    from moeframe.parallel import ParallelContext

    config = load_from_args(args, {"seed": args.seed} if args.seed is not None else None)
    counts = check_options(args, config.parallel.dp_size)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here")
    parallel = ParallelContext.from_config(config.parallel)
    if parallel.distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model = config.model
    layer = MoELayer(config, device=device, parallel=parallel)
    if args.weights:
        layer.load_weights(args.weights)
    if args.input:
        x = read_input(args.input, model.hidden_size, model.torch_dtype, device)
    else:
        num_tokens = counts[parallel.dp_rank] if len(counts) > 1 else counts[0]
        x = seeded_hidden_states(num_tokens, model.hidden_size, model.torch_dtype, config.seed + 1_000 * parallel.dp_rank, device)
    with torch.inference_mode():
        try:
            out, times = time_forward(layer, x, args.repeat)
        except RuntimeError as exc:
            if not parallel.distributed:
                raise
            raise RankFailure(
                f"rank {parallel.rank}: a collective failed ({str(exc).splitlines()[0][:200]}); "
                "another rank probably failed first: see its error"
            ) from exc
        reference = layer.reference()
        if args.weights:
            reference.load_weights(args.weights)
        expected = reference(x)
    cmp = compare(out, expected)
    median = statistics.median(times)
    mine = {
        "rank": parallel.rank,
        "dp_rank": parallel.dp_rank,
        "ep_rank": parallel.ep_rank,
        "tokens": int(x.shape[0]),
        "local_experts": len(parallel.local_experts(model.num_experts)),
        "expert_weight_bytes": layer.explain()["expert_weight_bytes"],
        "times_s": times,
        "median_s": median,
        "tokens_per_s": (x.shape[0] / median) if median > 0 else None,
        "error": cmp.as_dict(),
        "ok": cmp.ok,
    }
    ranks = parallel.collectives.all_gather_object(mine) if parallel.distributed else [mine]
    ok = all(r["ok"] for r in ranks)
    result = {
        "source": config.source,
        "config": config.to_dict(),
        "stack": layer.stack.describe(),
        "parallel": parallel.describe(),
        "device": str(device),
        "dtype": model.dtype,
        "repeat": args.repeat,
        **{k: mine[k] for k in ("tokens", "times_s", "median_s", "tokens_per_s", "error")},
        "ranks": ranks,
        "ok": ok,
        "output_written": None,
    }
    if args.output and ok:
        from moeframe.weights import save_safetensors

        target = args.output if not parallel.distributed else args.output.with_name(
            f"{args.output.stem}.rank{parallel.rank}{args.output.suffix}")
        save_safetensors({"output": out.reshape(-1, model.hidden_size)}, target)
        result["output_written"] = str(target)
    result["extra"] = _extra_reports(layer)
    return result


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``--nproc N``: validate, then run this same command under torchrun with N processes."""
    import os
    import subprocess
    import sys

    from moeframe.parallel import validate_world

    if args.nproc < 1:
        raise InputError(f"--nproc must be >= 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise InputError("--nproc: this process is already one of a launched group (WORLD_SIZE is set); "
                         "leave out --nproc under torchrun")
    config = load_from_args(args, {"seed": args.seed} if args.seed is not None else None)
    validate_world(config.parallel, args.nproc)
    check_options(args, config.parallel.dp_size)
    rest = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "moeframe", *rest]
    return subprocess.call(command)


def _extra_reports(layer: Any) -> dict[str, Any]:
    """Reports that parts of the stack offer (a wrapper's statistics, say)."""
    out: dict[str, Any] = {}
    for part in layer.stack.parts:
        report = getattr(part.instance, "report", None)
        if callable(report):
            out[part.entry.name] = report()
    return out


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        import sys

        return launch(args, sys.argv[1:] if args.argv is None else list(args.argv))
    import torch.distributed as dist

    started_here = not (dist.is_available() and dist.is_initialized())
    try:
        result = execute(args)
        rank = result["parallel"]["rank"]
    except RankFailure as exc:
        import sys

        sys.stderr.write(f"moeframe: error: {exc}\n")
        return 1
    finally:
        if started_here and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0 if result["ok"] else 1
    if args.json:
        print_json(result)
        return 0 if result["ok"] else 1
    distributed = len(result["ranks"]) > 1
    print(f"moeframe run: {result['source'] or '(dict)'} · {result['dtype']} · {result['device']}"
          + (f" · {len(result['ranks'])} ranks" if distributed else ""))
    print(stack_lines(result["stack"]))
    if distributed:
        _print_ranks(result)
        return 0 if result["ok"] else 1
    tps = result["tokens_per_s"]
    print(
        f"\ntokens {result['tokens']} · repeats {result['repeat']} · median {result['median_s'] * 1e3:.3f} ms"
        + (f" · {tps:,.0f} tokens/s" if tps else "")
    )
    for name, report in result["extra"].items():
        print(f"{name}: {report.get('summary', report) if isinstance(report, dict) else report}")
    err = result["error"]
    verdict = "ok" if result["ok"] else "OVER TOLERANCE"
    print(
        f"error vs reference: max abs {err['max_abs_error']:.3e} · max rel {err['max_rel_error']:.3e} "
        f"(atol {err['atol']:g}, rtol {err['rtol']:g}): {verdict}"
    )
    if args.output:
        print(f"output: {'written to ' + result['output_written'] if result['output_written'] else 'not written (check failed)'}")
    return 0 if result["ok"] else 1


def _print_ranks(result: dict[str, Any]) -> None:
    from moeframe.cli.common import format_bytes, table

    par = result["parallel"]
    print(f"\nparallel: dp {par['dp_size']} · ep {par['ep_size']} · tp {par['tp_size']} · placement {par['placement']}")
    rows = []
    for r in result["ranks"]:
        err = r["error"]
        rows.append((r["rank"], r["dp_rank"], r["ep_rank"], r["tokens"], r["local_experts"], format_bytes(r["expert_weight_bytes"]),
                     f"{r['median_s'] * 1e3:.3f}", f"{err['max_abs_error']:.2e}", "ok" if r["ok"] else "OVER TOLERANCE"))
    print(table(rows, ["rank", "dp", "ep", "tokens", "experts", "expert weights", "median ms", "max abs err", "check"]))
    print("error vs single-process reference: " + ("ok on every rank" if result["ok"] else "OVER TOLERANCE on some rank"))
