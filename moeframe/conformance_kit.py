"""The conformance kit for every strategy kind: the cases the pytest plugin runs.

:func:`conformance_cases` turns ``(kind, name, **options)`` into a list of
:class:`ConformanceCase`, each a named check that raises :class:`AssertionError` when the
strategy breaks the contract (or :class:`Unsupported` when the case does not apply to
it).  The kinds:

``kernel``
    :mod:`moeframe.conformance`'s cases (activations, biases, expert map, dtypes, token
    counts 0/1/7/64) and its scale sweep, against the ``torch`` reference kernel.
    Options: ``params`` (the kernel's ``Params`` instance), ``device``, ``dtypes``,
    ``token_counts``, ``scale_sweep`` (default true).
``router``
    ``logits`` and ``select`` on 0, 1, 7 and 33 tokens (shapes, int64 ids in range and
    distinct per row, weights finite and float32 or the activation dtype), a NaN row and a
    row of ties (still ``top_k`` distinct ids), rows routed independently, and, with
    ``reference=``, the weights and ids of an independent per-token implementation (one
    of :data:`ROUTER_REFERENCES`' names or a function ``(row, k, tensors) -> {id: weight}``)
    on tie-free logits.  Options: ``params`` (the ``[router]`` keys), ``model`` (model
    keys), ``dtypes``, ``reference``, ``tolerance``.
``wrapper``
    a small layer with the wrapper against its reference stack (the wrapper dropped when
    it is ``transparent``, kept otherwise) on 0, 1 and 7 tokens, in bf16, inside and
    outside ``chunking`` at the chunk boundaries (3, 4, 5, 9 tokens, chunks of 4), and on
    two expert-parallel ranks in one process with counting collectives: the partial outputs
    sum to the reference and each rank all-reduces exactly once per forward.  A wrapper
    that is not transparent is its own reference: pass ``reference=`` (a function
    ``(x, inner, layer) -> expected`` where ``inner(x)`` is the layer without the wrapper
    and ``layer`` the one with it, for its tensors) to check its math.  Options: ``params``, ``model``, ``reference``.
``dispatcher``
    a round trip over two gloo ranks (local processes): layers with the dispatcher under
    expert parallelism, with one and two data-parallel ranks (uneven and zero token counts,
    both placements), against the single-process reference; the output all-reduced
    exactly once unless the dispatcher's output is already reduced.  Options: ``model``,
    ``params``, ``timeout``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = ["ConformanceCase", "Unsupported", "conformance_cases", "ROUTER_REFERENCES", "KINDS"]

#: the kinds the kit checks
KINDS = ("kernel", "router", "wrapper", "dispatcher")

SMALL_MODEL = {"num_experts": 8, "top_k": 2, "hidden_size": 32, "intermediate_size": 16}
ROUTER_MODEL = {"num_experts": 16, "top_k": 4, "hidden_size": 32, "intermediate_size": 16}


class Unsupported(Exception):
    """The case does not apply to this strategy (the reason is the message)."""


@attrs.frozen
class ConformanceCase:
    """One check of one strategy: ``run()`` returns when it passes, raises
    :class:`AssertionError` when the strategy breaks the contract, :class:`Unsupported`
    when the case does not apply.  The tensors are tiny: a case runs on one torch thread
    (the setting is restored after), where idle OpenMP workers would only cost time."""

    kind: str
    name: str
    id: str
    check: Callable[[], None] = attrs.field(repr=False, eq=False)

    def run(self) -> None:
        from moeframe.testing import torch_threads

        with torch_threads(1):
            self.check()


def conformance_cases(kind: str, name: str, **options: Any) -> list[ConformanceCase]:
    """Every case of the kit for the strategy ``name`` of ``kind`` (see the module doc for
    each kind's cases and options).  An unknown kind or option is a :class:`ValueError`;
    an unknown name is the registry's error."""
    from moeframe.plugins import get_registry

    if kind not in _BUILDERS:
        raise ValueError(f"moeframe_conformance: unknown kind {kind!r}; the kit checks {', '.join(KINDS)}")
    allowed = _OPTIONS[kind]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"moeframe_conformance(kind={kind!r}): unknown option(s) {', '.join(unknown)}; "
            f"the {kind} kit takes {', '.join(sorted(allowed)) or 'none'}"
        )
    get_registry().get(kind, name)  # an unknown name fails here, with the registry's did-you-mean
    return _BUILDERS[kind](name, **options)


def _fail(case_id: str, message: str) -> None:
    raise AssertionError(f"{case_id}: {message}")


# -- kernels ---------------------------------------------------------------------------------
def _kernel_cases(
    name: str,
    params: Any = None,
    device: str = "cpu",
    dtypes: Sequence[str] | None = None,
    token_counts: Sequence[int] | None = None,
    scale_sweep: bool = True,
) -> list[ConformanceCase]:
    from moeframe.conformance import TOKEN_COUNTS, kernel_cases, scale_cases
    from moeframe.plugins import get_registry

    entry = get_registry().get("kernel", name)
    cases = list(kernel_cases(entry, token_counts or TOKEN_COUNTS, dtypes))
    if scale_sweep:
        cases += list(scale_cases(entry, dtypes=dtypes))

    def make(case: Any) -> Callable[[], None]:
        def run() -> None:
            from moeframe.conformance import run_kernel_case

            result = run_kernel_case(get_registry().get("kernel", name), case, device, params)
            if not result.ok:
                c = result.comparison
                if result.error is not None or c is None:
                    detail = result.error or "no comparison was made"
                else:
                    detail = (
                        f"max abs error {c.max_abs_error:.3e} (max rel {c.max_rel_error:.3e}) "
                        f"over atol {c.tolerance.atol:g}, rtol {c.tolerance.rtol:g}"
                    )
                _fail(case.id, f"kernel {name!r} against the torch reference kernel: {detail}")

        return run

    return [ConformanceCase("kernel", name, case.id, make(case)) for case in cases]


# -- routers ---------------------------------------------------------------------------------
def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return [v / sum(e) for v in e]


def _best(values: Sequence[float], k: int, among: Sequence[int] | None = None) -> list[int]:
    candidates = range(len(values)) if among is None else among
    return sorted(candidates, key=lambda i: -values[i])[:k]


def softmax_topk_reference(renormalize: bool = True) -> Callable[..., dict[int, float]]:
    """Mixtral / Qwen: softmax over all experts, the top k, renormalised or not."""

    def reference(row: Sequence[float], k: int, tensors: Mapping[str, Any]) -> dict[int, float]:
        p = _softmax(row)
        best = _best(p, k)
        w = [p[i] for i in best]
        if renormalize:
            w = [v / sum(w) for v in w]
        return dict(zip(best, w, strict=True))

    return reference


def topk_softmax_reference() -> Callable[..., dict[int, float]]:
    """GPT-OSS: the top k logits, then a softmax over those k."""

    def reference(row: Sequence[float], k: int, tensors: Mapping[str, Any]) -> dict[int, float]:
        best = _best(row, k)
        return dict(zip(best, _softmax([row[i] for i in best]), strict=True))

    return reference


def sigmoid_top1_reference() -> Callable[..., dict[int, float]]:
    """Llama-4: the best logit, weighted by its sigmoid."""

    def reference(row: Sequence[float], k: int, tensors: Mapping[str, Any]) -> dict[int, float]:
        best = _best(row, 1)[0]
        return {best: 1 / (1 + math.exp(-row[best]))}

    return reference


def grouped_topk_reference(
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
    correction_bias: bool = True,
) -> Callable[..., dict[int, float]]:
    """DeepSeek-V3: sigmoid scores, the bias chooses (not weighs), groups scored by their
    top two (by their max without a bias), the best ``topk_group`` groups kept."""

    def reference(row: Sequence[float], k: int, tensors: Mapping[str, Any]) -> dict[int, float]:
        E = len(row)
        size = E // n_group
        s = [1 / (1 + math.exp(-v)) for v in row]
        bias = tensors.get("router.e_score_correction_bias") if correction_bias else None
        b = [v + (float(bias[i]) if bias is not None else 0.0) for i, v in enumerate(s)]
        if correction_bias:
            groups = [sum(sorted(b[g * size : (g + 1) * size])[-2:]) for g in range(n_group)]
        else:
            groups = [max(b[g * size : (g + 1) * size]) for g in range(n_group)]
        keep = _best(groups, topk_group)
        best = _best(b, k, [i for i in range(E) if i // size in keep])
        w = [s[i] for i in best]
        if renormalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        return {i: v * routed_scaling_factor for i, v in zip(best, w, strict=True)}

    return reference


def _builtin_reference(name: str, params: Any) -> Callable[..., dict[int, float]]:
    def get(key: str, default: Any) -> Any:
        return getattr(params, key, default)

    if name == "softmax_topk":
        return softmax_topk_reference(get("renormalize", True))
    if name == "topk_softmax":
        return topk_softmax_reference()
    if name == "sigmoid_top1":
        return sigmoid_top1_reference()
    return grouped_topk_reference(
        get("n_group", 1),
        get("topk_group", 1),
        get("routed_scaling_factor", 1.0),
        get("renormalize", True),
        get("correction_bias", True),
    )


#: the per-token references of reference-math.md, by the builtin router that implements
#: each; ``reference="softmax_topk"`` builds it from the router's own params
ROUTER_REFERENCES = ("softmax_topk", "topk_softmax", "sigmoid_grouped_topk", "sigmoid_top1")


def _router_setup(
    name: str, dtype: str, params: Mapping[str, Any], model: Mapping[str, Any]
) -> tuple[Any, dict[str, Any]]:
    import torch

    from moeframe.config import load_config
    from moeframe.context import BuildContext
    from moeframe.parallel import ParallelContext
    from moeframe.plugins import get_registry
    from moeframe.weights import materialize
    from moeframe.workspace import Workspace

    config = load_config(
        {"seed": 0, "model": {**ROUTER_MODEL, **model, "dtype": dtype}, "router": {"name": name, **params}}
    )
    context = BuildContext(config, torch.device("cpu"), ParallelContext.single(), Workspace())
    from moeframe.routers import Router

    router = get_registry().get("router", name).load_as(Router)(context, config.router.params)
    tensors = {spec.name: materialize(spec, config.seed) for spec in router.weight_specs()}
    return router, tensors


def _check_selection(case_id: str, out: Any, T: int, E: int, K: int, dtype: Any, finite_rows: Any = None) -> None:
    import torch

    weights, ids = out[0], out[1]
    if tuple(ids.shape) != (T, K) or tuple(weights.shape) != (T, K):
        _fail(
            case_id,
            f"select returned ids {list(ids.shape)} and weights {list(weights.shape)}; expected [{T}, {K}] each",
        )
    if ids.dtype != torch.int64:
        _fail(case_id, f"ids are {ids.dtype}; expected torch.int64")
    if weights.dtype not in (torch.float32, dtype):
        _fail(case_id, f"weights are {weights.dtype}; expected torch.float32 or the activation dtype {dtype}")
    if T == 0:
        return
    if bool(((ids < 0) | (ids >= E)).any()):
        _fail(case_id, f"ids out of range [0, {E}): {ids[(ids < 0) | (ids >= E)].tolist()[:5]}")
    for t, row in enumerate(ids.tolist()):
        if len(set(row)) != K:
            _fail(case_id, f"token {t}: ids {row} are not {K} distinct experts")
    rows = slice(None) if finite_rows is None else finite_rows
    if not bool(torch.isfinite(weights[rows]).all()):
        _fail(case_id, "weights are NaN or inf for finite logits")
    if getattr(out, "weight_on_input", False) and K != 1:
        _fail(case_id, f"weight_on_input needs top_k == 1 (the runner scales the input), got top_k {K}")


def _tie_free_logits(T: int, E: int, dtype: Any, seed: int) -> Any:
    """Each row a random permutation of distinct multiples of 1/4 (exact in bf16)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=g) for _ in range(T)]
    logits = (torch.stack(rows).float() - E / 2) / 4 if rows else torch.empty(0, E)
    return logits.to(dtype)


def _router_cases(
    name: str,
    params: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    dtypes: Sequence[str] | None = None,
    reference: str | Callable[..., dict[int, float]] | None = None,
    tolerance: float | None = None,
) -> list[ConformanceCase]:
    from moeframe.plugins import get_registry

    params, model = dict(params or {}), dict(model or {})
    caps = get_registry().get("router", name).capabilities
    names = [d for d in (dtypes or ("float32", "bfloat16")) if caps.dtypes is None or d in caps.dtypes]
    if isinstance(reference, str) and reference not in ROUTER_REFERENCES:
        raise ValueError(
            f"moeframe_conformance(kind='router'): unknown reference {reference!r}; "
            f"use one of {', '.join(ROUTER_REFERENCES)} or a function (row, k, tensors) -> {{id: weight}}"
        )
    cases = []

    def add(case_id: str, check: Callable[[str, str], None], dtype: str) -> None:
        cases.append(ConformanceCase("router", name, case_id, lambda: check(case_id, dtype)))

    def shapes(T: int) -> Callable[[str, str], None]:
        def check(case_id: str, dtype: str) -> None:
            import torch

            router, tensors = _router_setup(name, dtype, params, model)
            m = router.model
            x = torch.randn(T, m.hidden_size, generator=torch.Generator().manual_seed(T)).to(m.torch_dtype)
            logits = router.logits(x, tensors)
            if tuple(logits.shape) != (T, m.num_experts) or logits.dtype != router.logits_dtype:
                _fail(
                    case_id,
                    f"logits are {list(logits.shape)} {logits.dtype}; expected [{T}, {m.num_experts}] "
                    f"{router.logits_dtype} (logits_dtype)",
                )
            _check_selection(case_id, router.select(logits, tensors), T, m.num_experts, m.top_k, m.torch_dtype)

        return check

    def nan_row(case_id: str, dtype: str) -> None:
        import torch

        router, tensors = _router_setup(name, dtype, params, model)
        m = router.model
        logits = _tie_free_logits(3, m.num_experts, router.logits_dtype, seed=1)
        logits[1] = float("nan")
        _check_selection(
            case_id,
            router.select(logits, tensors),
            3,
            m.num_experts,
            m.top_k,
            m.torch_dtype,
            finite_rows=torch.tensor([True, False, True]),
        )

    def ties(case_id: str, dtype: str) -> None:
        import torch

        router, tensors = _router_setup(name, dtype, params, model)
        m = router.model
        logits = torch.zeros(2, m.num_experts, dtype=router.logits_dtype)
        logits[1] = 1.0
        _check_selection(case_id, router.select(logits, tensors), 2, m.num_experts, m.top_k, m.torch_dtype)

    def per_token(case_id: str, dtype: str) -> None:

        router, tensors = _router_setup(name, dtype, params, model)
        m = router.model
        logits = _tie_free_logits(5, m.num_experts, router.logits_dtype, seed=2)
        together = router.select(logits, tensors)
        for t in range(5):
            alone = router.select(logits[t : t + 1], tensors)
            if set(alone[1][0].tolist()) != set(together[1][t].tolist()):
                _fail(
                    case_id,
                    f"token {t} gets experts {sorted(together[1][t].tolist())} among 5 tokens but "
                    f"{sorted(alone[1][0].tolist())} alone: a router must route each token on its own",
                )

    def against(reference: str | Callable[..., dict[int, float]]) -> Callable[[str, str], None]:
        return lambda case_id, dtype: against_reference(case_id, dtype, reference)

    def against_reference(case_id: str, dtype: str, reference: str | Callable[..., dict[int, float]]) -> None:
        router, tensors = _router_setup(name, dtype, params, model)
        m = router.model
        fn = _builtin_reference(reference, router.params) if isinstance(reference, str) else reference
        tol = tolerance if tolerance is not None else (1e-5 if dtype == "float32" else 1e-2)
        for seed in range(3):
            logits = _tie_free_logits(33, m.num_experts, router.logits_dtype, seed=10 + seed)
            out = router.select(logits, tensors)
            # shapes first: a short output would otherwise check fewer tokens in silence
            _check_selection(case_id, out, 33, m.num_experts, m.top_k, m.torch_dtype)
            got_w = out[0].double().tolist()
            for t, (row, ids) in enumerate(zip(logits.double().tolist(), out[1].tolist(), strict=True)):
                want = fn(row, m.top_k, tensors)
                got = dict(zip(ids, got_w[t], strict=True))
                if set(got) != set(want):
                    _fail(case_id, f"token {t}: experts {sorted(got)}, the reference chooses {sorted(want)}")
                for i, w in want.items():
                    if not abs(got[i] - w) <= tol * max(1.0, abs(w)):
                        _fail(
                            case_id,
                            f"token {t}, expert {i}: weight {got[i]:.6g}, the reference gives {w:.6g} "
                            f"(tolerance {tol:g})",
                        )

    for dtype in names:
        for T in (0, 1, 7, 33):
            add(f"{name}-{dtype}-shapes-T{T}", shapes(T), dtype)
        add(f"{name}-{dtype}-nan-row", nan_row, dtype)
        add(f"{name}-{dtype}-ties", ties, dtype)
        add(f"{name}-{dtype}-per-token", per_token, dtype)
        if reference is not None:
            add(f"{name}-{dtype}-reference", against(reference), dtype)
    return cases


# -- wrappers --------------------------------------------------------------------------------
def _wrapper_config(
    name: str,
    params: Mapping[str, Any],
    model: Mapping[str, Any],
    dtype: str,
    wrappers: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    this = {"name": name, "params": dict(params)}
    return {
        "seed": 0,
        "model": {**SMALL_MODEL, **model, "dtype": dtype},
        "router": {"name": "softmax_topk"},
        "stack": {"wrappers": [this] if wrappers is None else [this if w is None else w for w in wrappers]},
    }


def _build(case_id: str, config: dict[str, Any], **kwargs: Any) -> Any:
    import moeframe
    from moeframe.errors import StackError

    try:
        return moeframe.MoELayer(config, **kwargs)
    except StackError as exc:
        raise Unsupported(f"the stack cannot be built: {exc}") from None


def _without(config: dict[str, Any], name: str) -> dict[str, Any]:
    wrappers = [w for w in config["stack"]["wrappers"] if w["name"] != name]
    return {**config, "stack": {**config["stack"], "wrappers": wrappers}}


def _wrapper_cases(
    name: str,
    params: Mapping[str, Any] | None = None,
    model: Mapping[str, Any] | None = None,
    reference: Callable[..., Any] | None = None,
) -> list[ConformanceCase]:
    params, model = dict(params or {}), dict(model or {})
    chunking = {"name": "chunking", "params": {"max_num_tokens": 4}}
    cases = []

    def compare_stack(case_id: str, T: int, dtype: str, wrappers: Sequence[Any] | None = None) -> None:
        import torch

        import moeframe

        config = _wrapper_config(name, params, model, dtype, wrappers)
        layer = _build(case_id, config)
        x = torch.randn(T, layer.config.model.hidden_size, generator=torch.Generator().manual_seed(T + 1))
        x = x.to(layer.config.model.torch_dtype)
        out = layer(x)
        if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
            _fail(case_id, f"the layer returned {list(out.shape)} {out.dtype} for input {list(x.shape)} {x.dtype}")
        if out.numel() and out.data_ptr() == x.data_ptr():
            _fail(case_id, "the output is the input tensor")
        tol = moeframe.numerics.tolerance_for(dtype)
        expected = layer.reference()(x)
        cmp = moeframe.compare(out, expected, tol)
        if not cmp.ok:
            _fail(case_id, f"differs from the reference stack by {cmp.max_abs_error:.3e} (atol {tol.atol:g})")
        if reference is not None:
            inner = _build(case_id, _without(config, name))
            with torch.no_grad():
                want = reference(x, inner, layer)
            cmp = moeframe.compare(out, want, tol)
            if not cmp.ok:
                _fail(
                    case_id, f"differs from reference(x, inner, layer) by {cmp.max_abs_error:.3e} (atol {tol.atol:g})"
                )

    def add(case_id: str, T: int, dtype: str = "float32", wrappers: Sequence[Any] | None = None) -> None:
        cases.append(ConformanceCase("wrapper", name, case_id, lambda: compare_stack(case_id, T, dtype, wrappers)))

    for T in (0, 1, 7):
        add(f"{name}-T{T}", T)
    add(f"{name}-bfloat16-T7", 7, "bfloat16")
    for T in (0, 3, 4, 5, 9):
        add(f"{name}-inside-chunking-T{T}", T, wrappers=[chunking, None])
        add(f"{name}-outside-chunking-T{T}", T, wrappers=[None, chunking])

    def reduce_once(case_id: str) -> None:
        import torch

        import moeframe
        from moeframe.config import ParallelConfig, load_config
        from moeframe.parallel import CountingCollectives, ParallelContext

        config = _wrapper_config(name, params, model, "float32")
        config["parallel"] = {"ep_size": 2}
        config["stack"]["dispatcher"] = "local"
        x = torch.randn(13, load_config(config).model.hidden_size, generator=torch.Generator().manual_seed(5))
        partials = []
        for rank in (0, 1):
            counting = CountingCollectives()
            parallel = ParallelContext(ParallelConfig(ep_size=2), rank=rank, world_size=2, collectives=counting)
            layer = _build(case_id, config, parallel=parallel)
            if layer.stack.output_reduced:
                _fail(
                    case_id,
                    "under expert parallelism with the local dispatcher the stack claims its output is "
                    "already reduced (output_reduced); each rank holds a partial sum",
                )
            partials.append(layer(x))
            for calls in (1, 2):
                if counting.counts != {"all_reduce_sum": calls}:
                    _fail(
                        case_id,
                        f"rank {rank}: collectives after {calls} forward(s): {counting.counts}; expected "
                        f"exactly one all_reduce_sum per forward",
                    )
                if calls == 1:
                    layer(x)
        single = _build(case_id, _wrapper_config(name, params, model, "float32"))
        cmp = moeframe.compare(
            partials[0] + partials[1], single.reference()(x), moeframe.numerics.Tolerance(atol=1e-5, rtol=1e-5)
        )
        if not cmp.ok:
            _fail(
                case_id,
                f"the two ranks' partial outputs sum to {cmp.max_abs_error:.3e} away from the reference "
                "(counted twice, or not at all?)",
            )

    cases.append(
        ConformanceCase("wrapper", name, f"{name}-reduce-once-ep2", lambda: reduce_once(f"{name}-reduce-once-ep2"))
    )
    return cases


# -- dispatchers -----------------------------------------------------------------------------
def _dispatcher_scenarios(name: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for placement in ("linear", "round_robin"):
        out.append(
            {"id": f"{name}-ep2-dp1-{placement}-T7", "tokens": [7], "parallel": {"ep_size": 2, "placement": placement}}
        )
    out.append({"id": f"{name}-ep2-dp1-T0", "tokens": [0], "parallel": {"ep_size": 2}})
    out.append({"id": f"{name}-ep2-dp2-T5+0", "tokens": [5, 0], "parallel": {"ep_size": 2, "dp_size": 2}})
    out.append(
        {
            "id": f"{name}-ep2-dp2-T1+6",
            "tokens": [1, 6],
            "parallel": {"ep_size": 2, "dp_size": 2, "placement": "round_robin"},
        }
    )
    for case in out:
        case["dispatcher"] = {"name": name, "params": dict(params)}
    return out


def dispatcher_rank(cases: list[dict[str, Any]], model: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs on each rank of :func:`_dispatcher_cases`' launch: each case's layer against the
    single-process reference, and the collectives it called."""
    import torch

    import moeframe
    from moeframe.errors import StackError
    from moeframe.parallel import Collectives, CountingCollectives, ParallelContext

    results = []
    for case in cases:
        config = {
            "seed": 0,
            "model": {**SMALL_MODEL, **model},
            "router": {"name": "softmax_topk"},
            "parallel": case["parallel"],
            "stack": {"dispatcher": case["dispatcher"]},
        }
        counting = CountingCollectives(Collectives())
        try:
            cfg = moeframe.load_config(config)
            parallel = ParallelContext.from_config(cfg.parallel, collectives=counting)
            layer = moeframe.MoELayer(cfg, parallel=parallel)
        except StackError as exc:
            results.append({"id": case["id"], "unsupported": str(exc)})
            continue
        dp_rank = parallel.dp_rank
        tokens = case["tokens"][dp_rank] if dp_rank < len(case["tokens"]) else case["tokens"][0]
        x = torch.randn(tokens, cfg.model.hidden_size, generator=torch.Generator().manual_seed(100 + dp_rank))
        counting.counts.clear()
        try:
            out = layer(x)
        except Exception as exc:
            results.append({"id": case["id"], "error": f"{type(exc).__name__}: {exc}"})
            continue
        single = {key: value for key, value in config.items() if key not in ("parallel", "stack")}
        reference = moeframe.MoELayer(single, parallel=ParallelContext.single())(x)  # the reference stack
        cmp = moeframe.compare(out, reference, moeframe.numerics.Tolerance(atol=1e-5, rtol=1e-5))
        results.append(
            {
                "id": case["id"],
                "ok": cmp.ok,
                "max_abs_error": cmp.max_abs_error,
                "shape": list(out.shape),
                "tokens": tokens,
                "counts": dict(counting.counts),
                "output_reduced": bool(layer.stack.output_reduced),
            }
        )
    return results


_launches: dict[str, list[list[dict[str, Any]]]] = {}


def _launch(
    name: str, scenarios: list[dict[str, Any]], model: dict[str, Any], timeout: float
) -> list[list[dict[str, Any]]]:
    """One launch of two gloo ranks runs every scenario (cached: process start-up is the
    slow part).  The ranks see this process's ``sys.path`` and environment."""
    from moeframe.testing import launch_processes

    key = json.dumps([name, scenarios, model], sort_keys=True)
    if key in _launches:
        return _launches[key]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "script": str(Path(__file__).resolve()),
                    "function": "dispatcher_rank",
                    "kwargs": {"cases": scenarios, "model": model},
                    "out": tmp,
                }
            )
        )
        env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        procs = launch_processes(2, [sys.executable, "-m", "moeframe.testing", str(spec)], timeout, env=env)
        results = []
        for rank, proc in enumerate(procs):
            if proc.returncode != 0:
                raise AssertionError(
                    f"dispatcher {name!r}: rank {rank} exited {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
                )
            results.append(json.loads((Path(tmp) / f"rank{rank}.json").read_text()))
    _launches[key] = results
    return results


def _dispatcher_cases(
    name: str, params: Mapping[str, Any] | None = None, model: Mapping[str, Any] | None = None, timeout: float = 240.0
) -> list[ConformanceCase]:
    scenarios = _dispatcher_scenarios(name, dict(params or {}))
    model = dict(model or {})

    def check(case_id: str) -> None:
        ranks = _launch(name, scenarios, model, timeout)
        for rank, results in enumerate(ranks):
            r = next(r for r in results if r["id"] == case_id)
            if "unsupported" in r:
                raise Unsupported(r["unsupported"])
            if "error" in r:
                _fail(case_id, f"rank {rank}: the forward raised {r['error']}")
            if r["shape"] != [r["tokens"], {**SMALL_MODEL, **model}["hidden_size"]]:
                _fail(case_id, f"rank {rank}: output {r['shape']} for {r['tokens']} tokens")
            if not r["ok"]:
                _fail(case_id, f"rank {rank}: differs from the single-process reference by {r['max_abs_error']:.3e}")
            reduces = r["counts"].get("all_reduce_sum", 0)
            if r["output_reduced"] and reduces:
                _fail(
                    case_id,
                    f"rank {rank}: the dispatcher's output is reduced, yet the layer all-reduced {reduces} time(s)",
                )
            if not r["output_reduced"] and reduces != 1:
                _fail(case_id, f"rank {rank}: the output is a partial sum, all-reduced {reduces} times (expected once)")

    return [ConformanceCase("dispatcher", name, s["id"], functools.partial(check, s["id"])) for s in scenarios]


_BUILDERS: dict[str, Callable[..., list[ConformanceCase]]] = {
    "kernel": _kernel_cases,
    "router": _router_cases,
    "wrapper": _wrapper_cases,
    "dispatcher": _dispatcher_cases,
}
_OPTIONS = {
    "kernel": {"params", "device", "dtypes", "token_counts", "scale_sweep"},
    "router": {"params", "model", "dtypes", "reference", "tolerance"},
    "wrapper": {"params", "model", "reference"},
    "dispatcher": {"params", "model", "timeout"},
}
