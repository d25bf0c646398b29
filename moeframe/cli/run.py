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

from moeframe.cli.common import (
    add_config_arguments,
    add_json_argument,
    load_from_args,
    parse_int_list,
    print_json,
    stack_lines,
)
from moeframe.errors import InputError

if TYPE_CHECKING:
    import torch


#: default number of tokens when neither --tokens nor --input gives one
DEFAULT_TOKENS = 128
#: the largest seed: torch's generators take a 64-bit seed
MAX_SEED = 2**63 - 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `moeframe run`."""
    add_config_arguments(p)
    p.add_argument(
        "--tokens",
        default=None,
        metavar="N[,N...]",
        help=f"number of tokens (default {DEFAULT_TOKENS}, or the rows of --input); under data parallelism "
        "one count per DP rank, e.g. 64,0",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="seed for weights and inputs, 0..2**63-1 (default: the config's)",
    )
    p.add_argument("--device", default="cpu", metavar="D", help="device, e.g. cpu or cuda (default cpu)")
    p.add_argument(
        "--repeat", type=int, default=5, metavar="R", help="timed repetitions; the median is reported (default 5)"
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="launch N local processes (torch.distributed, as torchrun would) and run distributed",
    )
    p.add_argument("--weights", type=Path, metavar="W.safetensors", help="load the layer's tensors from this file")
    p.add_argument(
        "--strict-weights",
        action="store_true",
        help="refuse weights holding NaN or inf (default: a warning naming the tensors)",
    )
    p.add_argument(
        "--input", type=Path, metavar="X.safetensors", help="take hidden states from tensor 'hidden_states' [T, H]"
    )
    p.add_argument(
        "--output",
        type=Path,
        metavar="Y.safetensors",
        help="write tensor 'output' [T, H] (only when the check passes; the folder must exist)",
    )
    add_json_argument(p)


def seeded_hidden_states(
    num_tokens: int, hidden_size: int, dtype: torch.dtype, seed: int, device: Any = "cpu"
) -> torch.Tensor:
    """The hidden states ``moeframe run`` uses: standard normal, from ``seed`` alone
    (any integer: it is folded into the generator's 63-bit range)."""
    import torch

    g = torch.Generator().manual_seed((seed * 7_919 + 17) % MAX_SEED)
    return torch.randn(num_tokens, hidden_size, generator=g).to(device=device, dtype=dtype)


def _input_header(path: Path) -> tuple[list[str], Any]:
    """The tensor names of an --input file, and the shape and dtype of 'hidden_states'."""
    from safetensors import SafetensorError, safe_open

    from moeframe.weights import check_readable_file

    check_readable_file(path, "--input: file")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            if "hidden_states" not in names:
                raise InputError(
                    f"--input: {path} has no tensor 'hidden_states' (it has: {', '.join(sorted(names)) or 'none'})"
                )
            sl = f.get_slice("hidden_states")
            return names, (list(sl.get_shape()), sl.get_dtype())
    except (SafetensorError, OSError) as exc:
        raise InputError(f"--input: {path} is not a readable safetensors file ({exc})") from None


def check_input(path: Path, hidden_size: int) -> int:
    """Check an --input file before any work; return its number of rows.  Tensors other
    than 'hidden_states' are ignored with a warning."""
    import warnings

    names, (shape, dtype) = _input_header(path)
    if len(shape) != 2 or shape[1] != hidden_size:
        raise InputError(f"--input: tensor 'hidden_states' has shape {shape}, expected [T, {hidden_size}]")
    if dtype.upper() not in ("F64", "F32", "F16", "BF16"):
        raise InputError(f"--input: tensor 'hidden_states' is {dtype}, expected a floating-point tensor")
    extra = sorted(n for n in names if n != "hidden_states")
    if extra:
        warnings.warn(f"--input: {path} also holds {', '.join(extra)}; only 'hidden_states' is read", stacklevel=2)
    return int(shape[0])


def read_input(path: Path, hidden_size: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Tensor 'hidden_states' of an --input file, in the layer's dtype (only that tensor is read)."""
    from safetensors import safe_open

    _input_header(path)
    with safe_open(str(path), framework="pt") as f:
        x = f.get_tensor("hidden_states")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise InputError(f"--input: tensor 'hidden_states' has shape {list(x.shape)}, expected [T, {hidden_size}]")
    if not x.is_floating_point():
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


def parse_tokens(text: str | None) -> list[int]:
    if text is None:
        return [DEFAULT_TOKENS]
    return parse_int_list("--tokens", text, expects="a count or comma-separated counts (one per DP rank)")


def output_targets(output: Path, world_size: int) -> list[Path]:
    """The files ``--output`` names: itself in one process, ``NAME.rankR.SUFFIX`` per rank."""
    if world_size <= 1:
        return [output]
    return [output.with_name(f"{output.stem}.rank{r}{output.suffix}") for r in range(world_size)]


def check_options(args: argparse.Namespace, config: Any, world_size: int) -> list[int]:
    """The checks of ``run``'s own options, made before any process is launched and
    before any tensor is allocated; returns the token counts."""
    from moeframe.cli.common import resolve_device
    from moeframe.files import check_output_path

    dp_size = config.parallel.dp_size
    counts = parse_tokens(args.tokens)
    if len(counts) not in (1, dp_size):
        raise InputError(
            f"--tokens has {len(counts)} counts but there are {dp_size} DP ranks; give one count or one per DP rank"
        )
    if args.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {args.repeat}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise InputError(f"--seed must be in 0..2**63-1 ({MAX_SEED}), got {args.seed}")
    resolve_device(args.device)
    if args.weights is not None:
        from moeframe.weights import check_readable_file

        check_readable_file(args.weights, "weights file")
    if args.input is not None:
        rows = check_input(args.input, config.model.hidden_size)
        if args.tokens is not None and any(c != rows for c in counts):
            raise InputError(
                f"--input: {args.input} has {rows} rows but --tokens is {args.tokens}; "
                "leave out --tokens to run the input's rows"
            )
        counts = [rows]
    if args.output is not None:
        for target in output_targets(args.output, world_size):
            check_output_path(target, "--output")
    return counts


class RankFailure(Exception):
    """A collective failed on this rank, usually because a peer rank failed first."""


def _agree_on_options(parallel: Any, args: argparse.Namespace, counts: list[int]) -> None:
    """Every rank must run the same options (the same number of forwards, so that
    collectives match): gather them and refuse, with the same line on every rank, when
    they differ."""
    mine = {
        "--repeat": args.repeat,
        "--tokens": counts,
        "--device": str(args.device),
        "--input": str(args.input),
        "--weights": str(args.weights),
    }
    try:
        everyone = parallel.collectives.all_gather_object(mine)
    except RuntimeError as exc:
        raise RankFailure(
            f"rank {parallel.rank}: a collective failed ({str(exc).splitlines()[0][:200]}); "
            "another rank probably failed first: see its error"
        ) from exc
    for rank, theirs in enumerate(everyone):
        for key in mine:
            if everyone[0][key] != theirs[key]:
                raise InputError(
                    f"{key} differs between ranks: {everyone[0][key]} on rank 0 but {theirs[key]} on rank {rank}; "
                    "give every rank the same options"
                )


def _nonfinite_rows(x: torch.Tensor, out: torch.Tensor) -> int:
    """Non-finite output values in rows whose input is finite."""
    import torch

    if out.numel() == 0 or x.shape[0] != out.reshape(-1, out.shape[-1]).shape[0]:
        return 0
    finite_rows = torch.isfinite(x).all(dim=-1)
    return int((~torch.isfinite(out.reshape(x.shape[0], -1)[finite_rows])).sum())


def execute(args: argparse.Namespace) -> dict[str, Any]:
    """Run the job on this rank; in a distributed run, every rank returns the results of all."""
    import torch

    from moeframe.cli.common import resolve_device
    from moeframe.composer import reference_config
    from moeframe.integrations.transformers.checkpoint import load_checkpoint_weights
    from moeframe.layer import MoELayer, describe_layer
    from moeframe.memory import Need, activation_bytes, check_fits
    from moeframe.numerics import compare, count_nonfinite
    from moeframe.parallel import ParallelContext

    config = load_from_args(args, {"seed": args.seed} if args.seed is not None else None)
    device = resolve_device(args.device)
    parallel = ParallelContext.from_config(config.parallel)
    counts = check_options(args, config, parallel.world_size)
    if parallel.distributed:
        _agree_on_options(parallel, args, counts)
    if parallel.distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model = config.model
    num_tokens = counts[parallel.dp_rank] if len(counts) > 1 else counts[0]
    # what this run is about to allocate, from the shapes alone, checked before any of it is
    plan = describe_layer(config, device=device, parallel=parallel)
    reference_weights = (
        describe_layer(reference_config(config), device=device)["weight_bytes"]
        if parallel.distributed
        else plan["weight_bytes"]
    )
    m = model
    check_fits(
        [
            *(Need(n["what"], n["nbytes"], n["keys"]) for n in plan["needs"]),
            Need(
                "the reference's weights", reference_weights, "the same keys: the run checks against a reference layer"
            ),
            Need(
                "activations",
                activation_bytes(model, num_tokens),
                f"--tokens={num_tokens}, model.top_k={m.top_k}, model.hidden_size={m.hidden_size}, "
                f"model.intermediate_size={m.intermediate_size}",
            ),
        ],
        device,
        "this run",
    )
    layer = MoELayer(config, device=device, parallel=parallel)
    load_checkpoint_weights(args, layer)
    if args.weights:
        layer.load_weights(args.weights, strict=True if args.strict_weights else None)
    if args.input:
        x = read_input(args.input, model.hidden_size, model.torch_dtype, device)
    else:
        x = seeded_hidden_states(
            num_tokens, model.hidden_size, model.torch_dtype, config.seed + 1_000 * parallel.dp_rank, device
        )
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
        if parallel.distributed:
            load_checkpoint_weights(args, reference)
        if args.weights and parallel.distributed:
            reference.load_weights(args.weights, check_values=False)
        expected = reference(x)
    cmp = compare(out, expected)
    nonfinite = {"input": count_nonfinite(x), "output": count_nonfinite(out), "new": _nonfinite_rows(x, out)}
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
        "nonfinite": nonfinite,
        "ok": cmp.ok and nonfinite["new"] == 0,
    }
    if parallel.distributed:
        try:
            ranks = parallel.collectives.all_gather_object(mine)
        except RuntimeError as exc:
            raise RankFailure(
                f"rank {parallel.rank}: gathering the ranks' results failed "
                f"({str(exc).splitlines()[0][:200]}); another rank probably failed first: see its error"
            ) from exc
    else:
        ranks = [mine]
    ok = all(r["ok"] for r in ranks)
    result = {
        "source": config.source,
        "config": config.to_dict(),
        "stack": layer.stack.describe(),
        "parallel": parallel.describe(),
        "device": str(device),
        "dtype": model.dtype,
        "repeat": args.repeat,
        **{k: mine[k] for k in ("tokens", "times_s", "median_s", "tokens_per_s", "error", "nonfinite")},
        "ranks": ranks,
        "ok": ok,
        "output_written": None,
    }
    if args.output and ok:
        from moeframe.weights import save_safetensors

        target = output_targets(args.output, parallel.world_size)[parallel.rank]
        save_safetensors({"output": out.reshape(-1, model.hidden_size)}, target, option="--output")
        result["output_written"] = str(target)
    result["extra"] = _extra_reports(layer)
    return result


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``--nproc N``: check the options and build every rank's stack (without tensors),
    then run this same command on N local processes and report their outcome."""
    import os
    import sys

    from moeframe.layer import describe_layout
    from moeframe.parallel import launch_local_ranks

    if args.nproc < 1:
        raise InputError(f"--nproc must be >= 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise InputError(
            "--nproc: this process is already one of a launched group (WORLD_SIZE is set); "
            "leave out --nproc under torchrun"
        )
    config = load_from_args(args, {"seed": args.seed} if args.seed is not None else None)
    from moeframe.parallel import validate_world

    validate_world(config.parallel, args.nproc)
    check_options(args, config, args.nproc)
    from moeframe.cli.common import resolve_device

    device = resolve_device(args.device)
    ranks = describe_layout(config, args.nproc, device)  # a stack that cannot be built fails here, once
    if device.type == "cpu":  # the ranks share this machine's memory: check their sum before starting them
        from moeframe.composer import reference_config
        from moeframe.layer import describe_layer
        from moeframe.memory import Need, activation_bytes, check_fits

        counts = (
            parse_tokens(args.tokens) if args.input is None else [check_input(args.input, config.model.hidden_size)]
        )
        reference = describe_layer(reference_config(config))["weight_bytes"]
        m = config.model
        check_fits(
            [
                Need(
                    "the ranks' weights and workspaces",
                    sum(n["nbytes"] for r in ranks for n in r["needs"]),
                    ranks[0]["needs"][0]["keys"],
                ),
                Need("each rank's reference weights", args.nproc * reference, f"--nproc={args.nproc}"),
                Need(
                    "activations",
                    args.nproc * activation_bytes(m, max(counts)),
                    f"--tokens={max(counts)}, --nproc={args.nproc}, model.top_k={m.top_k}",
                ),
            ],
            device,
            f"run --nproc {args.nproc}",
        )
    rest = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    codes = launch_local_ranks(
        [sys.executable, "-m", "moeframe", *rest], args.nproc, grace_s=config.parallel.timeout_s + 10
    )
    if all(c == codes[0] for c in codes) and codes[0] in (0, 1):
        return codes[0]  # rank 0 reported every rank's outcome
    summary = ", ".join(f"rank {r}: {'terminated' if c < 0 else f'exit {c}'}" for r, c in enumerate(codes))
    sys.stderr.write(
        f"moeframe: error: run --nproc {args.nproc}: not every rank finished ({summary}); their errors are above\n"
    )
    worst = max(codes)
    return worst if worst > 0 else 1


def _extra_reports(layer: Any) -> dict[str, Any]:
    """Reports that parts of the stack offer (a wrapper's statistics, say)."""
    out: dict[str, Any] = {}
    for part in layer.stack.parts:
        value = part.instance.report()
        if value is not None:
            out[part.entry.name] = value
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
    print(
        f"moeframe run: {result['source'] or '(dict)'} · {result['dtype']} · {result['device']}"
        + (f" · {len(result['ranks'])} ranks" if distributed else "")
    )
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
    nonfinite = result["nonfinite"]
    if nonfinite["input"] or nonfinite["output"]:
        print(f"non-finite values (NaN or inf): input {nonfinite['input']} · output {nonfinite['output']}")
    print(
        f"error vs reference: max abs {err['max_abs_error']:.3e} · max rel {err['max_rel_error']:.3e} "
        f"(atol {err['atol']:g}, rtol {err['rtol']:g}, scale {err['scale_rtol']:g}): {verdict_text(err, nonfinite)}"
    )
    if args.output:
        written = result["output_written"]
        print(f"output: {'written to ' + written if written else 'not written (check failed)'}")
    return 0 if result["ok"] else 1


def verdict_text(error: dict[str, Any], nonfinite: dict[str, int]) -> str:
    """``ok``, ``OVER TOLERANCE`` or ``NON-FINITE OUTPUT (...)``: the last word of the report."""
    if nonfinite["new"]:
        agree = "; the reference agrees" if error["ok"] else ""
        return f"NON-FINITE OUTPUT ({nonfinite['new']} NaN or inf values where the input is finite{agree})"
    return "ok" if error["ok"] else "OVER TOLERANCE"


def _print_ranks(result: dict[str, Any]) -> None:
    from moeframe.cli.common import format_bytes, table

    par = result["parallel"]
    print(f"\nparallel: dp {par['dp_size']} · ep {par['ep_size']} · tp {par['tp_size']} · placement {par['placement']}")
    rows = []
    for r in result["ranks"]:
        err = r["error"]
        rows.append(
            (
                r["rank"],
                r["dp_rank"],
                r["ep_rank"],
                r["tokens"],
                r["local_experts"],
                format_bytes(r["expert_weight_bytes"]),
                f"{r['median_s'] * 1e3:.3f}",
                f"{err['max_abs_error']:.2e}",
                verdict_text(err, r["nonfinite"]),
            )
        )
    print(table(rows, ["rank", "dp", "ep", "tokens", "experts", "expert weights", "median ms", "max abs err", "check"]))
    print(
        "error vs single-process reference: "
        + ("ok on every rank" if result["ok"] else "FAILED on some rank (see the table)")
    )
