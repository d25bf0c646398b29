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

``--smoke`` runs the same code on the CPU through Triton's interpreter, at tiny shapes and
token counts (the test suite runs it); its timings mean nothing.  Exit status 1 when any
check fails.
"""

from __future__ import annotations

import argparse
import datetime
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
        out.append(Layer(f"preset:{name}", m.num_experts, m.top_k, m.hidden_size, m.intermediate_size,
                         m.activation, m.expert_bias, m.swiglu_alpha, m.swiglu_limit))
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
    return {"matmul_flops": 2 * n**3 / t_mm, "copy_bytes_per_s": 2 * numel * 2 / t_copy, "matmul_n": n,
            "copy_bytes": 2 * numel * 2}


# -- the implementations compared -----------------------------------------------------------
def grouped_mm_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: ExpertWeights,
                   activation: Activation) -> torch.Tensor:
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


def make_routing(layer: Layer, M: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
def run_layer(layer: Layer, tokens: Sequence[int], device: torch.device, peaks: dict[str, float],
              reps: dict[str, int], log: Callable[[str], None]) -> list[dict[str, Any]]:
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
            row: dict[str, Any] = {"layer": layer.name, "E": layer.num_experts, "top_k": layer.top_k,
                                   "H": layer.hidden_size, "I": layer.intermediate_size, "M": M, "impl": name}
            if name not in impls:
                rows.append({**row, "ok": None, "note": "torch._grouped_mm not available"})
                continue
            fn = impls[name]
            try:
                cmp = compare(fn(x, w, ids), expected, tol)
                t = median_time(lambda fn=fn, x=x, w=w, ids=ids: fn(x, w, ids), device, reps[name])
            except Exception as exc:  # report it in the table; a peer's failure is not ours
                note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                rows.append({**row, "ok": None if name == "grouped_mm" else False, "note": note})
                log(f"{layer.name:>24} M={M:<5} {name:<10} ERROR {note}")
                continue
            row.update({
                "ok": cmp.ok, "max_abs_error": cmp.max_abs_error, "median_s": t,
                "tflops": flops / t / 1e12, "gbps": bytes_ / t / 1e9,
                "frac_flops": flops / t / peaks["matmul_flops"], "frac_bw": bytes_ / t / peaks["copy_bytes_per_s"],
            })
            rows.append(row)
            log(f"{layer.name:>24} M={M:<5} {name:<10} {'ok ' if cmp.ok else 'BAD'} "
                f"{t * 1e3:9.3f} ms {row['tflops']:8.2f} TFLOP/s {row['gbps']:8.1f} GB/s")
    return rows


def run(layers: Sequence[Layer], tokens: Sequence[int], device: torch.device, smoke: bool,
        log: Callable[[str], None]) -> dict[str, Any]:
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
    tol = tolerance_for("bfloat16")
    import triton

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "mode": "interpreter" if INTERPRETER else "compiled",
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke": smoke,
    }
    return {"env": env, "peaks": peaks, "tolerance": attrs.asdict(tol), "rows": rows,
            "ok": all(r["ok"] is not False for r in rows)}


def markdown(result: dict[str, Any]) -> str:
    env, peaks = result["env"], result["peaks"]
    lines = [
        f"# Triton kernel: check and timings on {env['device']}",
        "",
        f"Generated by `plugins/moeframe-triton/benchmarks/gpu_check.py{' --smoke' if env['smoke'] else ''}` on {env['date']}"
        f" (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['mode']}).",
        "",
        f"Measured in the same run: dense bf16 matmul ({peaks['matmul_n']}^3) **{peaks['matmul_flops'] / 1e12:.1f} TFLOP/s**, "
        f"copy ({peaks['copy_bytes'] / 2**30:.2f} GiB moved) **{peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s**.  "
        "bf16; routing: softmax top-k of random logits, renormalised.  FLOPs: 2 x M x top_k x 3 x H x I; bytes: "
        "the experts hit (read once) plus input and output.  `% FLOP` and `% BW` are fractions of the measured peaks.  "
        f"Check: against the `torch` reference kernel, atol {result['tolerance']['atol']:g}, rtol {result['tolerance']['rtol']:g}.",
        "",
        "| layer | E | top_k | H | I | M | impl | check | max abs err | median ms | TFLOP/s | GB/s | % FLOP | % BW |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "note" in r:
            verdict = "n/a" if r["ok"] is None else "**FAIL**"
            lines.append(f"| {r['layer']} | {r['E']} | {r['top_k']} | {r['H']} | {r['I']} | {r['M']} | {r['impl']} | "
                         f"{verdict}: {r['note'].replace('|', '/')} | | | | | | |")
            continue
        lines.append(
            f"| {r['layer']} | {r['E']} | {r['top_k']} | {r['H']} | {r['I']} | {r['M']} | {r['impl']} | "
            f"{'ok' if r['ok'] else '**FAIL**'} | {r['max_abs_error']:.2e} | {r['median_s'] * 1e3:.3f} | "
            f"{r['tflops']:.3g} | {r['gbps']:.3g} | {100 * r['frac_flops']:.3g} | {100 * r['frac_bw']:.3g} |"
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
    args = p.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        layers: list[Layer] = list(SMOKE_LAYERS)
        tokens = SMOKE_TOKENS
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
        result = run(layers, tokens, device, args.smoke, log=lambda m: print(m, flush=True))
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
