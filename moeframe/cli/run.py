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
from typing import Any

import torch

from moeframe.cli.common import add_config_arguments, add_json_argument, load_from_args, print_json, stack_lines
from moeframe.errors import InputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the configured stack, time it and check it against the reference")
    add_config_arguments(p)
    p.add_argument("--tokens", type=int, default=128, metavar="N", help="number of tokens (default 128)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed for weights and inputs (default: the config's)")
    p.add_argument("--device", default="cpu", metavar="D", help="device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--repeat", type=int, default=5, metavar="R", help="timed repetitions; the median is reported (default 5)")
    p.add_argument("--weights", type=Path, metavar="W.safetensors", help="load the layer's tensors from this file")
    p.add_argument("--input", type=Path, metavar="X.safetensors", help="take hidden states from tensor 'hidden_states' [T, H]")
    p.add_argument("--output", type=Path, metavar="Y.safetensors", help="write tensor 'output' [T, H] (only when the check passes)")
    add_json_argument(p)
    p.set_defaults(func=run)


def seeded_hidden_states(num_tokens: int, hidden_size: int, dtype: torch.dtype, seed: int, device: Any = "cpu") -> torch.Tensor:
    """The hidden states ``moeframe run`` uses: standard normal, from ``seed`` alone."""
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


def execute(args: argparse.Namespace) -> dict[str, Any]:
    from moeframe.layer import MoELayer
    from moeframe.numerics import compare

    if args.tokens < 0:
        raise InputError(f"--tokens must be >= 0, got {args.tokens}")
    if args.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {args.repeat}")
    config = load_from_args(args, {"seed": args.seed} if args.seed is not None else None)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here")
    model = config.model
    layer = MoELayer(config, device=device)
    if args.weights:
        layer.load_weights(args.weights)
    if args.input:
        x = read_input(args.input, model.hidden_size, model.torch_dtype, device)
    else:
        x = seeded_hidden_states(args.tokens, model.hidden_size, model.torch_dtype, config.seed, device)
    with torch.inference_mode():
        out, times = time_forward(layer, x, args.repeat)
        reference = layer.reference()
        if args.weights:
            reference.load_weights(args.weights)
        expected = reference(x)
    cmp = compare(out, expected)
    median = statistics.median(times)
    result = {
        "source": config.source,
        "config": config.to_dict(),
        "stack": layer.stack.describe(),
        "device": str(device),
        "dtype": model.dtype,
        "tokens": int(x.shape[0]),
        "repeat": args.repeat,
        "times_s": times,
        "median_s": median,
        "tokens_per_s": (x.shape[0] / median) if median > 0 else None,
        "error": cmp.as_dict(),
        "ok": cmp.ok,
        "output_written": None,
    }
    if args.output:
        if cmp.ok:
            from moeframe.weights import save_safetensors

            save_safetensors({"output": out.reshape(-1, model.hidden_size)}, args.output)
            result["output_written"] = str(args.output)
    result["extra"] = _extra_reports(layer)
    return result


def _extra_reports(layer: Any) -> dict[str, Any]:
    """Reports that parts of the stack offer (a wrapper's statistics, say)."""
    out: dict[str, Any] = {}
    for part in layer.stack.parts:
        report = getattr(part.instance, "report", None)
        if callable(report):
            out[part.entry.name] = report()
    return out


def run(args: argparse.Namespace) -> int:
    result = execute(args)
    if args.json:
        print_json(result)
        return 0 if result["ok"] else 1
    print(f"moeframe run: {result['source'] or '(dict)'} · {result['dtype']} · {result['device']}")
    print(stack_lines(result["stack"]))
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
