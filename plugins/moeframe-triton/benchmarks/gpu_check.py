#!/usr/bin/env python
"""Check the triton kernel against the reference and time it, next to its peers.

On a GPU (one command, a few minutes on an H200)::

    python plugins/moeframe-triton/benchmarks/gpu_check.py --out docs/triton-gpu-results.md

For every layer shape -- the packaged presets, and Mixtral-8x7B, Qwen3-30B-A3B and
DeepSeek-V3 layers -- and every token count M in {1, 16, 64, 256, 1024, 4096}, in bf16:

* checks the ``triton`` kernel (and the ``torch._grouped_mm`` path) against the ``torch``
  reference kernel at the bf16 tolerance;
* times ``triton``, the ``torch._grouped_mm``-based path and the ``torch`` reference
  (median of CUDA-event timings);
* reports TFLOP/s (2 x pairs x 3 x H x I), GB/s (the weights of the experts hit, the input
  and the output, each read or written once) and their fractions of this GPU's dense bf16
  matmul rate and copy bandwidth, both measured in the same run.

Then the graph checks, on a small bf16 layer (``stack.kernel = "triton"``): the kernel's
torch op (``torch.ops.moeframe_triton.fused_moe``) and the whole ``MoELayer`` under
``torch.compile(fullgraph=True)``, and captured in a CUDA graph and replayed on new
inputs; each output is compared with eager's (equal, or within the bf16 tolerance where
Inductor reorders the router's arithmetic).  Where a layer with the ``torch`` kernel
does not compile either, the layer's row says so (n/a): the graph breaks in the core.
With ``--precision-cost`` it also reports what the fp32 intermediates cost: the kernel
timed as shipped against a variant that rounds ``h`` and the per-pair outputs to bf16
(the layout before issue 11), per shape and M.

``--smoke`` runs the same code on the CPU through Triton's interpreter, at tiny shapes and
token counts (the test suite runs it; ``torch.compile`` with the ``aot_eager`` backend,
no CUDA graph); its timings mean nothing.  Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from moeframe.config import list_presets, load_config
from moeframe.kernels import ExpertWeights
from moeframe.kernels.activations import Activation, apply_activation
from moeframe.kernels.torch_reference import reference_moe
from moeframe.numerics import compare, tolerance_for
from moeframe_triton.timing import median_time

TOKENS = (1, 16, 64, 256, 1024, 4096)
SMOKE_TOKENS = (1, 16)


@attrs.frozen
class Layer:
    name: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    activation: str = "silu"
    bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0


#: the real layer shapes (routed experts; TP = EP = 1)
MODEL_LAYERS = (
    Layer("Mixtral-8x7B", 8, 2, 4096, 14336),
    Layer("Qwen3-30B-A3B", 128, 8, 2048, 768),
    Layer("DeepSeek-V3", 256, 8, 7168, 2048),
)
SMOKE_LAYERS = (
    Layer("smoke-silu", 8, 2, 64, 32),
    Layer("smoke-swigluoai-bias", 16, 4, 32, 48, "swigluoai", True),
)


def preset_layers() -> list[Layer]:
    """The packaged presets' layer shapes."""
    out = []
    for name in list_presets():
        m = load_config(name).model
        out.append(
            Layer(
                f"preset:{name}",
                m.num_experts,
                m.top_k,
                m.hidden_size,
                m.intermediate_size,
                m.activation,
                m.expert_bias,
                m.swiglu_alpha,
                m.swiglu_limit,
            )
        )
    return out


# -- timing -------------------------------------------------------------------------------
def measure_peaks(device: torch.device, smoke: bool) -> dict[str, float]:
    """This device's dense bf16 matmul rate (FLOP/s) and copy bandwidth (bytes/s)."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t_mm = median_time(lambda: torch.mm(a, b), device, reps=3 if smoke else 20, warmup=1 if smoke else 3)
    numel = (4 << 20) if smoke else (1 << 30)  # bf16 elements: 8 MiB / 2 GiB
    src = torch.empty(numel, device=device, dtype=torch.bfloat16).fill_(1.0)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), device, reps=3 if smoke else 20, warmup=1 if smoke else 3)
    return {
        "matmul_flops": 2 * n**3 / t_mm,
        "copy_bytes_per_s": 2 * numel * 2 / t_copy,
        "matmul_n": n,
        "copy_bytes": 2 * numel * 2,
    }


# -- the implementations compared -----------------------------------------------------------
def grouped_mm_moe(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: ExpertWeights, activation: Activation
) -> torch.Tensor:
    """The MoE computed with ``torch._grouped_mm`` (the path transformers calls grouped_mm):
    sort pairs by expert, gather tokens, two grouped GEMMs, weighted scatter-add in fp32."""
    T, H = x.shape
    K = topk_ids.shape[1]
    E = experts.w13.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    expert_of_row = flat[order]
    token_of_row = order // K
    offsets = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    rows = x[token_of_row]
    gate_up = torch._grouped_mm(rows, experts.w13.transpose(-2, -1), offs=offsets)
    if experts.b13 is not None:
        gate_up = gate_up + experts.b13[expert_of_row]
    h = apply_activation(gate_up, activation)
    y = torch._grouped_mm(h, experts.w2.transpose(-2, -1), offs=offsets)
    if experts.b2 is not None:
        y = y + experts.b2[expert_of_row]
    y = y.float() * topk_weights.reshape(-1)[order].float().unsqueeze(-1)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_row, y)
    return out.to(x.dtype)


def make_layer_tensors(layer: Layer, device: torch.device, seed: int = 0) -> ExpertWeights:
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    dt = torch.bfloat16
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=device) * H**-0.5).to(dt)
    w2 = (torch.randn(E, H, I, generator=g, device=device) * I**-0.5).to(dt)
    b13 = (torch.randn(E, 2 * I, generator=g, device=device) * 0.1).to(dt) if layer.bias else None
    b2 = (torch.randn(E, H, generator=g, device=device) * 0.1).to(dt) if layer.bias else None
    return ExpertWeights(w13, w2, b13, b2)


def make_routing(
    layer: Layer, M: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, layer.hidden_size, generator=g, device=device).to(torch.bfloat16)
    logits = torch.randn(M, layer.num_experts, generator=g, device=device)
    w, ids = torch.topk(torch.softmax(logits, -1), layer.top_k, dim=-1)
    return x, (w / w.sum(-1, keepdim=True)), ids


def work(layer: Layer, M: int, topk_ids: torch.Tensor) -> tuple[float, float]:
    """(FLOPs, bytes) of the minimum work: every pair's three GEMM slices; the experts hit
    read once, the input read and the output written once (bf16)."""
    H, I = layer.hidden_size, layer.intermediate_size
    flops = 2.0 * M * layer.top_k * 3 * H * I
    hit = int(torch.unique(topk_ids).numel())
    bias = (2 * I + H) if layer.bias else 0
    bytes_ = 2.0 * (hit * (3 * H * I + bias) + 2 * M * H)
    return flops, bytes_


# -- the run --------------------------------------------------------------------------------
def run_layer(
    layer: Layer,
    tokens: Sequence[int],
    device: torch.device,
    peaks: dict[str, float],
    reps: dict[str, int],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Check and time every implementation on ``layer`` at each token count (the layer's
    tensors are freed on return)."""
    from moeframe_triton.fused_moe import fused_moe

    tol = tolerance_for("bfloat16")
    experts = make_layer_tensors(layer, device)
    act = Activation(layer.activation, layer.alpha, layer.limit)
    impls: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "triton": lambda x, w, i: fused_moe(x, w, i, experts.w13, experts.w2, experts.b13, experts.b2, activation=act),
        "torch": lambda x, w, i: reference_moe(x, w, i, experts, act),
    }
    if hasattr(torch, "_grouped_mm"):
        impls["grouped_mm"] = lambda x, w, i: grouped_mm_moe(x, w, i, experts, act)
    rows: list[dict[str, Any]] = []
    for M in tokens:
        x, w, ids = make_routing(layer, M, device, seed=M)
        expected = reference_moe(x, w, ids, experts, act)
        flops, bytes_ = work(layer, M, ids)
        for name in ("triton", "grouped_mm", "torch"):
            row: dict[str, Any] = {
                "layer": layer.name,
                "E": layer.num_experts,
                "top_k": layer.top_k,
                "H": layer.hidden_size,
                "I": layer.intermediate_size,
                "M": M,
                "impl": name,
            }
            if name not in impls:
                rows.append({**row, "ok": None, "note": "torch._grouped_mm not available"})
                continue
            fn = impls[name]
            try:
                cmp = compare(fn(x, w, ids), expected, tol)
                t = median_time(functools.partial(fn, x, w, ids), device, reps[name])
            except Exception as exc:  # report it in the table; a peer's failure is not ours
                note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                rows.append({**row, "ok": None if name == "grouped_mm" else False, "note": note})
                log(f"{layer.name:>24} M={M:<5} {name:<10} ERROR {note}")
                continue
            row.update(
                {
                    "ok": cmp.ok,
                    "max_abs_error": cmp.max_abs_error,
                    "median_s": t,
                    "tflops": flops / t / 1e12,
                    "gbps": bytes_ / t / 1e9,
                    "frac_flops": flops / t / peaks["matmul_flops"],
                    "frac_bw": bytes_ / t / peaks["copy_bytes_per_s"],
                }
            )
            rows.append(row)
            log(
                f"{layer.name:>24} M={M:<5} {name:<10} {'ok ' if cmp.ok else 'BAD'} "
                f"{t * 1e3:9.3f} ms {row['tflops']:8.2f} TFLOP/s {row['gbps']:8.1f} GB/s"
            )
    return rows


# -- torch.compile, CUDA graphs, precision ---------------------------------------------------
def _graph_config(device: torch.device) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {"num_experts": 8, "top_k": 2, "hidden_size": 64, "intermediate_size": 32, "dtype": "bfloat16"},
        "router": {"name": "softmax_topk"},
        "stack": {"kernel": "triton"},
    }


def _outcome(name: str, fn: Callable[[], tuple[torch.Tensor, torch.Tensor]], exact: bool) -> dict[str, Any]:
    """Run ``fn`` (returning the checked output and eager's) into a row: equal, or within
    the bf16 tolerance when ``exact`` is false; an exception is a failure, in one line."""
    try:
        out, eager = fn()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return {"check": name, "ok": False, "note": f"{type(exc).__name__}: {first}"}
    equal = out.shape == eager.shape and torch.equal(out, eager)
    cmp = compare(out, eager, tolerance_for("bfloat16"))
    ok = equal or (not exact and cmp.ok)
    return {"check": name, "ok": ok, "note": "equal to eager" if equal else f"max abs diff {cmp.max_abs_error:.2e}"}


def graph_checks(device: torch.device, smoke: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``torch.compile(fullgraph=True)`` and CUDA-graph capture of the kernel's op and of a
    whole layer, each against eager (``aot_eager`` and no CUDA graph on the CPU)."""
    import moeframe
    from moeframe_triton import ops  # noqa: F401 - registers torch.ops.moeframe_triton.fused_moe

    backend = "aot_eager" if device.type != "cuda" else "inductor"
    layer = moeframe.MoELayer(_graph_config(device), device=device)
    g = torch.Generator(device=device).manual_seed(1)
    x1 = torch.randn(16, 64, generator=g, device=device).to(torch.bfloat16)
    x2 = torch.randn(16, 64, generator=g, device=device).to(torch.bfloat16)
    experts = make_layer_tensors(Layer("graph", 8, 2, 64, 32), device)
    w, ids = make_routing(Layer("graph", 8, 2, 64, 32), 16, device, seed=3)[1:]

    def op(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.moeframe_triton.fused_moe(
            x, w, ids, experts.w13, experts.w2, None, None, None, "silu", 1.702, 7.0
        )

    rows = []
    with torch.inference_mode():
        for name, fn, exact in (("op", op, True), ("layer", layer, False)):

            def compiled(fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> tuple[torch.Tensor, torch.Tensor]:
                torch._dynamo.reset()
                c = torch.compile(fn, backend=backend, fullgraph=True)
                c(x1)
                return c(x2), fn(x2)

            row = _outcome(f"torch.compile({name}, fullgraph=True, backend={backend})", compiled, exact)
            if name == "layer" and not row["ok"]:
                control = moeframe.MoELayer({**_graph_config(device), "stack": {"kernel": "torch"}}, device=device)
                torch._dynamo.reset()
                try:
                    torch.compile(control, backend=backend, fullgraph=True)(x1)
                except Exception as exc:
                    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                    row = {
                        **row,
                        "ok": None,
                        "note": f"the layer with the torch kernel does not compile either "
                        f"({type(exc).__name__}: {first}); triton: {row['note']}",
                    }
            rows.append(row)
            if device.type != "cuda":
                rows.append({"check": f"CUDA graph ({name})", "ok": None, "note": "no CUDA device"})
                continue

            def captured(fn: Callable[[torch.Tensor], torch.Tensor] = fn) -> tuple[torch.Tensor, torch.Tensor]:
                static = x1.clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
                    for _ in range(2):
                        fn(static)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = fn(static)
                static.copy_(x2)
                graph.replay()
                torch.cuda.synchronize()
                return out.clone(), fn(x2)

            rows.append(_outcome(f"CUDA graph capture + replay ({name})", captured, True))
    for r in rows:
        log(f"graph check: {r['check']}: {'n/a' if r['ok'] is None else 'ok' if r['ok'] else 'FAIL'} ({r['note']})")
    return rows


def precision_sweep(device: torch.device, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The conformance kit's scale sweep for ``triton`` on this device (compiled on a GPU:
    the split dots of the down GEMM are what is checked)."""
    from moeframe.conformance import run_kernel_case, scale_cases
    from moeframe.plugins import get_registry

    entry = get_registry().get("kernel", "triton")
    rows: list[dict[str, Any]] = []
    for case in scale_cases(entry):
        r = run_kernel_case(entry, case, device)
        if r.error is None and r.comparison is not None:
            note = f"max rel error {r.comparison.max_rel_error:.2e}"
        else:
            note = r.error or "no comparison was made"
        rows.append({"check": f"precision {case.id}", "ok": r.ok, "note": note})
    bad = [r["check"] for r in rows if not r["ok"]]
    log(f"precision sweep: {len(rows) - len(bad)}/{len(rows)} ok" + (f"; FAIL {', '.join(bad)}" if bad else ""))
    return rows


def intermediate_cost(
    layers: Sequence[Layer], tokens: Sequence[int], device: torch.device, reps: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The kernel as shipped (fp32 ``h`` and per-pair outputs, split down GEMM) against the
    same kernel with them in bf16: the time of each and their ratio."""
    from moeframe_triton.fused_moe import fused_moe

    rows = []
    for layer in layers:
        experts = make_layer_tensors(layer, device)
        act = Activation(layer.activation, layer.alpha, layer.limit)
        for M in tokens:
            x, w, ids = make_routing(layer, M, device, seed=M)
            times = {}
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                # partial binds this iteration's tensors (a closure would read the loop variables late)
                call = functools.partial(
                    fused_moe,
                    x,
                    w,
                    ids,
                    experts.w13,
                    experts.w2,
                    experts.b13,
                    experts.b2,
                    activation=act,
                    intermediate_dtype=dtype,
                )
                times[name] = median_time(call, device, reps)
            rows.append(
                {
                    "layer": layer.name,
                    "M": M,
                    "fp32_s": times["fp32"],
                    "bf16_s": times["bf16"],
                    "ratio": times["fp32"] / times["bf16"],
                }
            )
            log(
                f"{layer.name:>24} M={M:<5} fp32 intermediates {times['fp32'] * 1e3:9.3f} ms, bf16 "
                f"{times['bf16'] * 1e3:9.3f} ms: x{times['fp32'] / times['bf16']:.2f}"
            )
        del experts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run(
    layers: Sequence[Layer],
    tokens: Sequence[int],
    device: torch.device,
    smoke: bool,
    log: Callable[[str], None],
    precision_cost: bool = False,
) -> dict[str, Any]:
    """Measure the peaks, then check and time every layer at every token count."""
    from moeframe_triton._triton import INTERPRETER

    peaks = measure_peaks(device, smoke)
    log(f"peaks: matmul {peaks['matmul_flops'] / 1e12:.1f} TFLOP/s, copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s")
    reps = {"triton": 1 if smoke else 20, "grouped_mm": 1 if smoke else 20, "torch": 1 if smoke else 3}
    rows: list[dict[str, Any]] = []
    for layer in layers:
        rows += run_layer(layer, tokens, device, peaks, reps, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    checks = graph_checks(device, smoke, log) + precision_sweep(device, log)
    cost = intermediate_cost(layers, tokens, device, reps["triton"], log) if precision_cost else []
    tol = tolerance_for("bfloat16")
    import triton

    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "mode": "interpreter" if INTERPRETER else "compiled",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": smoke,
    }
    return {
        "env": env,
        "peaks": peaks,
        "tolerance": attrs.asdict(tol),
        "rows": rows,
        "checks": checks,
        "intermediate_cost": cost,
        "ok": all(r["ok"] is not False for r in rows) and all(c["ok"] is not False for c in checks),
    }


def markdown(result: dict[str, Any]) -> str:
    env, peaks = result["env"], result["peaks"]
    lines = [
        f"# Triton kernel: check and timings on {env['device']}",
        "",
        (
            "Generated by `plugins/moeframe-triton/benchmarks/gpu_check.py"
            f"{' --smoke' if env['smoke'] else ''}` on {env['date']}"
            f" (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['mode']})."
        ),
        "",
        (
            f"Measured in the same run: dense bf16 matmul ({peaks['matmul_n']}^3) "
            f"**{peaks['matmul_flops'] / 1e12:.1f} TFLOP/s**, "
            f"copy ({peaks['copy_bytes'] / 2**30:.2f} GiB moved) **{peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s**.  "
            "bf16; routing: softmax top-k of random logits, renormalised.  FLOPs: 2 x M x top_k x 3 x H x I; bytes: "
            "the experts hit (read once) plus input and output.  "
            "`% FLOP` and `% BW` are fractions of the measured peaks.  "
            f"Check: against the `torch` reference kernel, atol {result['tolerance']['atol']:g}, "
            f"rtol {result['tolerance']['rtol']:g}."
        ),
        "",
        "| layer | E | top_k | H | I | M | impl | check | max abs err | median ms | TFLOP/s | GB/s | % FLOP | % BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "note" in r:
            verdict = "n/a" if r["ok"] is None else "**FAIL**"
            lines.append(
                f"| {r['layer']} | {r['E']} | {r['top_k']} | {r['H']} | {r['I']} | {r['M']} | {r['impl']} | "
                f"{verdict}: {r['note'].replace('|', '/')} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['layer']} | {r['E']} | {r['top_k']} | {r['H']} | {r['I']} | {r['M']} | {r['impl']} | "
            f"{'ok' if r['ok'] else '**FAIL**'} | {r['max_abs_error']:.2e} | {r['median_s'] * 1e3:.3f} | "
            f"{r['tflops']:.3g} | {r['gbps']:.3g} | {100 * r['frac_flops']:.3g} | {100 * r['frac_bw']:.3g} |"
        )
    lines += [
        "",
        "## torch.compile, CUDA graphs and the precision sweep",
        "",
        "| check | result | note |",
        "|---|---|---|",
    ]
    for c in result.get("checks", []):
        verdict = "n/a" if c["ok"] is None else "ok" if c["ok"] else "**FAIL**"
        lines.append(f"| {c['check']} | {verdict} | {c['note'].replace('|', '/')} |")
    if result.get("intermediate_cost"):
        lines += [
            "",
            "## What the fp32 intermediates cost",
            "",
            (
                "The kernel as shipped (fp32 `h` and per-pair outputs, the down GEMM's `h` split into two bf16 dots) "
                "against the same kernel keeping them in bf16."
            ),
            "",
            "| layer | M | fp32 ms | bf16 ms | ratio |",
            "|---|---|---|---|---|",
        ]
        for r in result["intermediate_cost"]:
            lines.append(
                f"| {r['layer']} | {r['M']} | {r['fp32_s'] * 1e3:.3f} | {r['bf16_s'] * 1e3:.3f} | {r['ratio']:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through the interpreter (for tests)")
    p.add_argument("--out", type=Path, help="write the results table (markdown) here")
    p.add_argument("--json", type=Path, help="write the raw results (JSON) here")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,16,64,256,1024,4096)")
    p.add_argument("--no-presets", action="store_true", help="only the model layers, not the packaged presets")
    p.add_argument(
        "--precision-cost",
        action="store_true",
        help="also time the kernel with bf16 intermediates (what the fp32 ones cost)",
    )
    args = p.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        layers: list[Layer] = list(SMOKE_LAYERS)
        tokens: tuple[int, ...] = SMOKE_TOKENS
    else:
        if not torch.cuda.is_available():
            sys.stderr.write("gpu_check: no CUDA GPU here; run it on the GPU, or use --smoke for the CPU code path\n")
            return 2
        device = torch.device("cuda")
        layers = ([] if args.no_presets else preset_layers()) + list(MODEL_LAYERS)
        tokens = TOKENS
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(",") if t.strip())
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if args.smoke:  # OpenMP workers spinning between torch ops would starve the interpreter
        torch.set_num_threads(1)
    try:
        result = run(
            layers, tokens, device, args.smoke, log=lambda m: print(m, flush=True), precision_cost=args.precision_cost
        )
    finally:
        torch.set_num_threads(threads)
    result["env"]["wall_s"] = time.perf_counter() - start
    text = markdown(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"{'all checks ok' if result['ok'] else 'SOME CHECKS FAILED'} ({result['env']['wall_s']:.0f} s)")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
