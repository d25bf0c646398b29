"""The benchmark's measurement loop: kernels, the configured stack and peers, side by side.

For each dtype and token count T:

1. seeded hidden states in several batches (enough that consecutive calls touch different
   experts, so that decode reads its weights from memory, not from the last-level cache),
   routed by the configured router;
2. every implementation's output on the first batch is checked against the reference
   (the ``torch`` kernel, or the reference stack for the stack); one that disagrees is
   reported and not timed;
3. timed rounds: in each round every implementation runs once on the same batch, so that
   noise from other processes falls on all of them, each call after an untimed read of a
   tensor twice the size of the last-level cache (otherwise an implementation would find
   the experts the one before it read still cached: some virtual machines report an L3
   larger than all the experts of a layer); the median is reported;
4. derived figures: tokens/s, GFLOP/s (the three expert GEMMs: ``2 * T * K * 3 * H * I``),
   GB/s of expert weights actually read (the distinct local experts a batch touches, times
   one expert's bytes), and their fractions of this machine's limits.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from moeframe.config import Config
from moeframe.errors import InputError
from moeframe.kernels import ExpertWeights, Kernel
from moeframe.numerics import compare, tolerance_for
from moeframe.runners.default import route
from moeframe_bench.limits import LimitProbes, MachineLimits, measure_limits

__all__ = ["BenchOptions", "Progress", "BarProgress", "default_kernels", "run_benchmark"]

#: bytes of expert weights the batches of one token count should touch together, so that
#: each call finds its experts evicted from the last-level cache
COLD_BYTES = 256 * 1024**2


@attrs.frozen
class BenchOptions:
    """What ``moeframe bench`` measures (see ``moeframe bench --help``)."""

    kernels: tuple[str, ...] | None = None
    tokens: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)
    dtypes: tuple[str, ...] | None = None
    repeat: int = 7
    #: seconds one implementation may spend at one token count before it stops at 3 samples
    budget_s: float = 20.0
    peers: bool = True
    overhead: bool = False
    memory: bool = False
    memory_tokens: int = 32768
    chunk: int = 1024


class Progress:
    """Progress reporting: ``total`` steps; :meth:`step` advances with a description."""

    def __init__(self, total: int) -> None:
        self.total = total

    def step(self, n: int = 1, desc: str = "") -> None:  # pragma: no cover - interface
        pass

    def close(self) -> None:  # pragma: no cover - interface
        pass


class BarProgress(Progress):
    """A progress bar: tqdm on stderr when installed (it stays silent off a terminal), else nothing."""

    def __init__(self, total: int) -> None:
        self.total = total
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar: Any = None
        else:
            self._bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False, dynamic_ncols=True, disable=None)

    def step(self, n: int = 1, desc: str = "") -> None:
        if self._bar is not None:
            if desc:
                self._bar.set_description(desc, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def default_kernels() -> list[str]:
    """Every registered kernel except interpreter variants (Triton without a GPU)."""
    from moeframe.plugins import get_registry

    return [e.name for e in get_registry().entries("kernel") if e.strategy.variant != "interpreter"]


@attrs.define
class _Impl:
    name: str
    kind: str  # "kernel" | "stack" | "peer"
    run: Callable[[int], torch.Tensor]
    check: Callable[[], dict[str, Any]]
    skip: Callable[[int], str | None] = lambda t: None


def _expert_bytes(tensors: dict[str, torch.Tensor]) -> int:
    total = 0
    for name in ("experts.w13", "experts.w2", "experts.b13", "experts.b2"):
        t = tensors.get(name)
        if t is not None:
            total += t[0].numel() * t.element_size()
    return total


def _routing(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the runner hands the kernel for ``x``: (hidden states, weights, ids)."""
    tensors = layer.tensors
    router = layer.stack.router
    return route(router, x, router.logits(x, tensors), tensors)


def _time_rounds(
    impls: Sequence[_Impl],
    batches: int,
    rounds: int,
    budget_s: float,
    flush: Callable[[], Any] | None = None,
) -> dict[str, list[float]]:
    """Each implementation's wall times over ``rounds`` rounds (batch ``round % batches``);
    ``flush()``, untimed, before every call, so that no call finds the weights the previous
    one read still in the last-level cache."""
    times: dict[str, list[float]] = {i.name: [] for i in impls}
    spent = {i.name: 0.0 for i in impls}
    for r in range(rounds):
        b = r % batches
        for impl in impls:
            if impl.kind != "probe" and spent[impl.name] > budget_s and len(times[impl.name]) >= 3:
                continue
            if flush is not None:
                flush()
            start = time.perf_counter()
            impl.run(b)
            elapsed = time.perf_counter() - start
            times[impl.name].append(elapsed)
            spent[impl.name] += elapsed
    return times


@attrs.define
class _Layer:
    """One dtype's layer and everything measured beside it."""

    config: Config
    layer: Any
    reference_layer: Any
    tensors: dict[str, torch.Tensor]
    experts: ExpertWeights
    kernels: dict[str, Any]
    reference: Any
    peers: list[Any]

    @property
    def model(self) -> Any:
        return self.config.model


def _prepare(
    config: Config, dtype: str, kernels: Sequence[str], options: BenchOptions, peer_report: dict[str, Any]
) -> _Layer:
    """The layer in ``dtype``, the kernels built for it, and transformers' peers (whose whole
    block, where comparable, is checked against the reference stack here)."""
    from moeframe.conformance import kernel_context
    from moeframe.kernels.torch_reference import TorchReferenceKernel
    from moeframe.layer import MoELayer
    from moeframe.plugins import get_registry
    from moeframe_bench.peers import build_peers, full_block_comparable

    cfg = config.evolve({"model.dtype": dtype})
    model = cfg.model
    layer = MoELayer(cfg)
    reference_layer = layer.reference()
    tensors = dict(layer.tensors)
    experts = ExpertWeights(
        tensors["experts.w13"], tensors["experts.w2"], tensors.get("experts.b13"), tensors.get("experts.b2")
    )
    context = kernel_context(model)
    registry = get_registry()
    kernel_objs: dict[str, Any] = {}
    for name in kernels:
        cls = registry.get("kernel", name).load_as(Kernel)
        params = cfg.stack.kernel.params if name == cfg.stack.kernel.name else cls.Params()
        kernel_objs[name] = cls(context, params)
    peers: list[Any] = []
    if options.peers:
        peers, why = build_peers(cfg, tensors)
        peer_report.setdefault("skipped", why)
        if peers and full_block_comparable(cfg):
            # transformers' whole block (its router too) against our reference stack
            x = torch.randn(8, model.hidden_size, generator=torch.Generator().manual_seed(3)).to(model.torch_dtype)
            with torch.inference_mode():
                expected = reference_layer(x)
                for peer in peers:
                    if peer.implementation == "eager":
                        cmp = compare(peer.forward(x), expected, tolerance_for(dtype))
                        peer_report.setdefault("full_block", {})[dtype] = cmp.as_dict()
    reference = TorchReferenceKernel(context, None)
    return _Layer(cfg, layer, reference_layer, tensors, experts, kernel_objs, reference, peers)


def _inputs(setup: _Layer, T: int, g: torch.Generator, expert_bytes: int) -> list[torch.Tensor]:
    """Seeded hidden states of ``T`` tokens in enough batches that together they touch
    :data:`COLD_BYTES` of expert weights (2 to 16 batches)."""
    model = setup.model
    probe = torch.randn(T, model.hidden_size, generator=g).to(model.torch_dtype)
    with torch.inference_mode():
        _, _, probe_ids = _routing(setup.layer, probe)
    touched = max(1, torch.unique(probe_ids).numel())
    batches = max(2, min(16, math.ceil(COLD_BYTES / (touched * expert_bytes))))
    return [probe] + [torch.randn(T, model.hidden_size, generator=g).to(model.torch_dtype) for _ in range(batches - 1)]


def _implementations(
    setup: _Layer, xs: list[torch.Tensor], routed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dtype: str
) -> list[_Impl]:
    """Every kernel, the configured stack and each peer: how to run it on batch ``b`` and
    how to check its output on the first batch against the reference."""
    from moeframe_bench.peers import BATCHED_MM_BUDGET

    experts, layer = setup.experts, setup.layer
    tolerance = tolerance_for(dtype)
    with torch.inference_mode():
        expected_kernel = setup.reference(*routed[0], experts)
        expected_stack = setup.reference_layer(xs[0])

    def kernel(name: str, fn: Any) -> _Impl:
        return _Impl(
            name,
            "kernel",
            run=lambda b: fn(*routed[b], experts),
            check=lambda: compare(fn(*routed[0], experts), expected_kernel, tolerance).as_dict(),
        )

    def peer(p: Any) -> _Impl:
        def skip(t: int) -> str | None:
            needed = p.memory_needed(t)
            return f"needs {needed / 1024**3:.1f} GiB for gathered weights" if needed > BATCHED_MM_BUDGET else None

        return _Impl(
            p.name,
            "peer",
            run=lambda b: p.experts(*routed[b]),
            check=lambda: compare(p.experts(*routed[0]), expected_kernel, tolerance).as_dict(),
            skip=skip,
        )

    stack = _Impl(
        "stack",
        "stack",
        run=lambda b: layer(xs[b]),
        check=lambda: compare(layer(xs[0]), expected_stack, tolerance).as_dict(),
    )
    return [*(kernel(name, fn) for name, fn in setup.kernels.items()), stack, *(peer(p) for p in setup.peers)]


def _check(impls: Sequence[_Impl], dtype: str, T: int) -> tuple[dict[str, dict[str, Any]], list[_Impl]]:
    """Each implementation's row with its check against the reference (or why it was
    skipped), and those that agree: only they are timed."""
    results: dict[str, dict[str, Any]] = {}
    timed: list[_Impl] = []
    for impl in impls:
        row: dict[str, Any] = {"dtype": dtype, "tokens": T, "impl": impl.name, "kind": impl.kind, "skipped": None}
        reason = impl.skip(T)
        if reason:
            row.update(skipped=reason, ok=None)
        else:
            try:
                row["error"] = impl.check()
                row["ok"] = bool(row["error"]["ok"])
            except Exception as exc:  # a peer or plugin kernel failing is a result
                row.update(ok=False, failure=f"{type(exc).__name__}: {exc}")
            if row["ok"]:
                timed.append(impl)
            elif "failure" not in row:
                row["skipped"] = "disagrees with the reference: not timed"
            else:
                row["skipped"] = f"failed: {row['failure']}"
        results[impl.name] = row
    return results, timed


def _limit_implementations(probes: LimitProbes, dtype: str) -> tuple[list[_Impl], float, float]:
    """This machine's limits as implementations timed in the same rounds: the peak GEMM in
    ``dtype`` (and in float32), the read bandwidth; with the FLOPs of one GEMM of each."""
    gemm, gemm_flops = probes.gemm(dtype)
    gemm32, gemm32_flops = probes.gemm("float32")
    impls = [
        _Impl("probe: peak GEMM", "probe", run=lambda b: gemm(), check=dict),
        _Impl("probe: read bandwidth", "probe", run=lambda b: probes.read(), check=dict),
    ]
    if dtype != "float32":
        impls.append(_Impl("probe: peak GEMM float32", "probe", run=lambda b: gemm32(), check=dict))
    return impls, gemm_flops, gemm32_flops


def _measure_dtype(
    config: Config,
    dtype: str,
    kernels: Sequence[str],
    options: BenchOptions,
    progress: Progress,
    peer_report: dict[str, Any],
    probes: LimitProbes,
    probe_rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The rows of one dtype, every token count: check, time in rounds beside the limit
    probes, derive the figures; the probes' own medians go to ``probe_rows``."""
    setup = _prepare(config, dtype, kernels, options, peer_report)
    model = setup.model
    expert_bytes = _expert_bytes(setup.tensors)
    rows: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(setup.config.seed + 7)
    for T in options.tokens:
        xs = _inputs(setup, T, g, expert_bytes)
        batches = len(xs)
        with torch.inference_mode():
            routed = [_routing(setup.layer, x) for x in xs]
        touched_per_batch = [torch.unique(ids).numel() for _, _, ids in routed]
        impls = _implementations(setup, xs, routed, dtype)
        progress.step(0, f"{dtype} T={T}")
        with torch.inference_mode():
            results, timed = _check(impls, dtype, T)
            # one warm-up call per batch for the cheap ones
            for impl in timed:
                if T <= 64:
                    for b in range(1, batches):
                        impl.run(b)
            limit_impls, gemm_flops, gemm32_flops = _limit_implementations(probes, dtype)
            for impl in limit_impls:
                impl.run(0)
            times = _time_rounds(timed + limit_impls, batches, options.repeat, options.budget_s, flush=probes.read)
        flops = 2.0 * T * model.top_k * 3 * model.hidden_size * model.intermediate_size
        for impl in impls:
            row = results[impl.name]
            samples = times.get(impl.name, [])
            if samples:
                median = statistics.median(samples)
                used = [touched_per_batch[r % batches] for r in range(len(samples))]
                read = statistics.mean(used) * expert_bytes
                row.update(
                    samples=len(samples),
                    median_s=median,
                    times_s=samples,
                    tokens_per_s=T / median if median > 0 else None,
                    flops_per_s=flops / median,
                    bytes_per_s=read / median,
                    experts_touched=statistics.mean(used),
                    batches=batches,
                )
            rows.append(row)
        # the probes' medians over the very rounds of the rows: like against like
        probe = {
            "dtype": dtype,
            "tokens": T,
            "gemm_flops_per_s": gemm_flops / statistics.median(times["probe: peak GEMM"]),
            "read_bytes_per_s": probes.read_bytes / statistics.median(times["probe: read bandwidth"]),
            "times_s": {name: times[name] for name in times if name.startswith("probe: ")},
        }
        if dtype != "float32":
            probe["gemm_float32_flops_per_s"] = gemm32_flops / statistics.median(times["probe: peak GEMM float32"])
        probe_rows.append(probe)
        progress.step(len(impls), f"{dtype} T={T}")
    return rows


def _attach_fractions(rows: list[dict[str, Any]], probe_rows: list[dict[str, Any]], limits: MachineLimits) -> None:
    """Fractions of the limits measured in the same rounds as each row (the contemporaneous
    probes); the run's best limits give a second, stricter set (``*_of_best``)."""
    probes = {(p["dtype"], p["tokens"]): p for p in probe_rows}
    for row in rows:
        if "flops_per_s" not in row:
            continue
        probe = probes[(row["dtype"], row["tokens"])]
        row["flops_fraction"] = row["flops_per_s"] / probe["gemm_flops_per_s"]
        fp32 = probe.get("gemm_float32_flops_per_s", probe["gemm_flops_per_s"] if row["dtype"] == "float32" else None)
        row["flops_fraction_fp32"] = row["flops_per_s"] / fp32 if fp32 else None
        row["bandwidth_fraction"] = row["bytes_per_s"] / probe["read_bytes_per_s"]
        best = limits.gemm_flops.get(row["dtype"])
        row["flops_fraction_of_best"] = row["flops_per_s"] / best if best else None
        row["bandwidth_fraction_of_best"] = (
            row["bytes_per_s"] / limits.read_bytes_per_s if limits.read_bytes_per_s else None
        )


def machine_info() -> dict[str, Any]:
    """The CPU the benchmark ran on: its model, architecture, the flags that matter to the
    kernels, the native variants it runs (best first) and torch's own CPU capability."""
    from moeframe.kernels import cpu_isa

    flags = cpu_isa.cpu_flags()
    return {
        "cpu": cpu_isa.cpu_model(),
        "arch": cpu_isa.machine_arch(),
        "isa_flags": sorted(f for f in flags if f in _ISA_FLAGS),
        "native_variants": cpu_isa.supported(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


#: the CPU flags worth recording with a result (vector width, 16-bit arithmetic, matrix units)
_ISA_FLAGS = frozenset(
    {
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512_bf16",
        "avx512_fp16",
        "avx512_vnni",
        "avx_vnni",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "amx_fp16",
        "asimd",
        "sve",
        "sve2",
        "bf16",
        "i8mm",
    }
)


def _kernel_details(config: Config, kernels: Sequence[str], dtypes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What each kernel reports about itself (``describe()``: for ``fused_cpu`` the ISA
    variant in use and where torch's matmul takes over), per dtype."""
    from moeframe.conformance import kernel_context
    from moeframe.plugins import get_registry

    registry = get_registry()
    out: dict[str, dict[str, Any]] = {}
    for dtype in dtypes:
        cfg = config.evolve({"model.dtype": dtype})
        for name in kernels:
            cls = registry.get("kernel", name).load_as(Kernel)
            params = cfg.stack.kernel.params if name == cfg.stack.kernel.name else cls.Params()
            try:
                kernel = cls(kernel_context(cfg.model), params)
                details = kernel.describe()
                kernel.release()
            except Exception as exc:  # a kernel that cannot be built here is reported by the sweep
                details = {"error": f"{type(exc).__name__}: {exc}"}
            out.setdefault(name, {})[dtype] = {
                k: v for k, v in details.items() if isinstance(v, (str, int, float, bool, type(None), dict, list))
            }
    return out


def run_benchmark(config: Config, options: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Measure ``config``'s kernels, stack and peers; return the results as plain data.

    The result's ``ok`` is False when a moeframe kernel or the stack disagreed with the
    reference (peers that disagree are reported but do not fail the run).
    """
    from moeframe import __version__
    from moeframe.plugins import get_registry
    from moeframe_bench import overhead as ov
    from moeframe_bench.peers import transformers_version

    p = config.parallel
    if p.dp_size > 1 or p.tp_size > 1 or (p.ep_size or 1) > 1:
        raise InputError("moeframe bench runs in one process: leave parallel.dp_size, ep_size and tp_size at 1")
    if any(t < 0 for t in options.tokens):
        raise InputError("--tokens must be >= 0")
    if options.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {options.repeat}")
    registry = get_registry()
    kernels = list(options.kernels) if options.kernels else default_kernels()
    for name in kernels:
        registry.get("kernel", name)  # unknown names fail before any work
    dtypes = list(options.dtypes or [config.model.dtype])
    progress = progress or Progress(0)
    peer_report: dict[str, Any] = {"transformers": transformers_version()}

    limits_before = measure_limits(dtypes)
    progress.step(1, "limits")
    probes = LimitProbes(limits_before, dtypes)
    rows: list[dict[str, Any]] = []
    probe_rows: list[dict[str, Any]] = []
    for dtype in dtypes:
        rows.extend(_measure_dtype(config, dtype, kernels, options, progress, peer_report, probes, probe_rows))
    del probes
    limits_after = measure_limits(dtypes)
    limits = limits_before.merge(limits_after)
    progress.step(1, "limits")
    _attach_fractions(rows, probe_rows, limits)

    result: dict[str, Any] = {
        "moeframe": __version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "kernel_details": _kernel_details(config, kernels, dtypes),
        "source": config.source,
        "config": config.to_dict(),
        "kernels": kernels,
        "stack": " > ".join(
            [
                *(w.name for w in config.stack.wrappers),
                config.stack.runner.name,
                config.stack.dispatcher.name,
                config.stack.kernel.name,
            ]
        ),
        "tokens": list(options.tokens),
        "dtypes": dtypes,
        "repeat": options.repeat,
        "limits": limits.as_dict(),
        "limits_runs": [limits_before.as_dict(), limits_after.as_dict()],  # before and after the sweep
        "limit_probes": probe_rows,
        "results": rows,
        "peers": peer_report,
    }
    if options.overhead:
        main_dtype = dtypes[0]
        cfg = config.evolve({"model.dtype": main_dtype})
        result["overhead"] = {
            "runner": ov.runner_overhead(cfg, num_tokens=1),
        }
        progress.step(1, "overhead: runner")
        result["overhead"]["chunking"] = ov.chunking_overhead(
            cfg, options.chunk, [1, options.chunk], rounds=lambda t: 300 if t <= 16 else max(5, options.repeat)
        )
        progress.step(1, "overhead: chunking")
        result["overhead"]["import"] = ov.import_overhead()
        result["overhead"]["triton"] = ov.triton_laziness()
        progress.step(1, "overhead: import")
    if options.memory:
        from moeframe_bench.memory import forward_memory

        result["memory"] = [
            forward_memory(config.evolve({"model.dtype": d}), options.memory_tokens, options.chunk) for d in dtypes
        ]
        progress.step(1, "memory")
    from moeframe_bench.targets import evaluate_targets

    result["targets"] = evaluate_targets(result)
    result["ok"] = all(r.get("ok") is not False for r in rows if r["kind"] in ("kernel", "stack"))
    return result


def total_steps(options: BenchOptions, kernels: int, peers: int) -> int:
    """Progress steps :func:`run_benchmark` will report."""
    dtypes = len(options.dtypes or [None])
    steps = 2 + dtypes * len(options.tokens) * (kernels + 1 + peers)
    if options.overhead:
        steps += 3
    if options.memory:
        steps += 1
    return steps
