"""The performance targets of the CPU kernel and of the framework, checked against one run.

Each target is a dict ``{"name", "goal", "measured", "met", "detail"}``; ``met`` is None
when the run did not measure what the target needs (say, no token count >= 512).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PREFILL_TOKENS", "DECODE_TOKENS", "evaluate_targets"]

#: token counts that count as prefill (T >= 512) and decode (T <= 16)
PREFILL_TOKENS = 512
DECODE_TOKENS = 16

PREFILL_GOAL = 0.85
DECODE_GOAL = 0.65
OVERHEAD_GOAL = 1.03
IMPORT_GOAL = 1.1


def _rows(result: dict[str, Any], **match: Any) -> Iterable[dict[str, Any]]:
    for row in result["results"]:
        if all(row.get(k) == v for k, v in match.items()) and row.get("median_s"):
            yield row


def _target(name: str, goal: str, measured: str | None, met: bool | None, detail: str = "") -> dict[str, Any]:
    return {"name": name, "goal": goal, "measured": measured, "met": met, "detail": detail}


def _fraction_target(
    name: str,
    goal: str,
    threshold: float,
    rows: dict[int, dict[str, Any]],
    counts: Callable[[int], bool],
    key: str,
    limit: str,
    missing: str,
    fp32_key: str | None = None,
) -> dict[str, Any]:
    """A "fraction of a machine limit" target: its worst token count among ``counts``
    (the row's ``key``, against limits measured in the same rounds), with every token
    count and the worst one against the run's best ``limit`` (``key + "_of_best"``) in
    the detail."""
    fractions = {t: r[key] for t, r in rows.items() if counts(t) and r.get(key)}
    if not fractions:
        return _target(name, goal, None, None, missing)
    worst = min(fractions, key=fractions.__getitem__)
    detail = ", ".join(f"T={t}: {f:.2f}" for t, f in sorted(fractions.items()))
    fp32 = rows[worst].get(fp32_key) if fp32_key else None
    if fp32:
        detail += f" (T={worst}: {fp32:.2f} of the float32 peak)"
    best = rows[worst].get(f"{key}_of_best")
    if best:
        detail += f"; T={worst} against the run's best {limit}: {best:.2f}"
    return _target(name, goal, f"{fractions[worst]:.2f}", fractions[worst] >= threshold, detail)


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target, with its measured ratio, for the configured kernel of ``result``."""
    kernel = result["config"]["stack"]["kernel"]
    if isinstance(kernel, dict):  # {name, params}; results written before the config had one shape hold the name
        kernel = kernel["name"]
    out: list[dict[str, Any]] = []
    for dtype in result["dtypes"]:
        rows = {r["tokens"]: r for r in _rows(result, dtype=dtype, impl=kernel)}
        out.append(
            _fraction_target(
                f"{kernel} prefill {dtype}",
                f">= {PREFILL_GOAL} of peak GEMM (T >= {PREFILL_TOKENS}, same rounds)",
                PREFILL_GOAL,
                rows,
                lambda t: t >= PREFILL_TOKENS,
                "flops_fraction",
                "peak",
                f"no token count >= {PREFILL_TOKENS} measured",
                fp32_key="flops_fraction_fp32" if dtype != "float32" else None,
            )
        )
        out.append(
            _fraction_target(
                f"{kernel} decode {dtype}",
                f">= {DECODE_GOAL} of read bandwidth (T <= {DECODE_TOKENS}, same rounds)",
                DECODE_GOAL,
                rows,
                lambda t: 1 <= t <= DECODE_TOKENS,
                "bandwidth_fraction",
                "bandwidth",
                f"no token count in 1..{DECODE_TOKENS} measured",
            )
        )
        peers = [r for r in result["results"] if r["dtype"] == dtype and r["kind"] == "peer"]
        if peers:
            ratios = {}
            for t, row in rows.items():
                best = min(
                    (p["median_s"] for p in peers if p["tokens"] == t and p.get("median_s") and p.get("ok")),
                    default=None,
                )
                if best:
                    ratios[t] = row["median_s"] / best
            if ratios:
                worst = max(ratios, key=ratios.__getitem__)
                out.append(
                    _target(
                        f"{kernel} vs transformers {dtype}",
                        "faster than the best peer at every T (time ratio < 1)",
                        f"{ratios[worst]:.2f}",
                        ratios[worst] < 1.0,
                        ", ".join(f"T={t}: {r:.2f}" for t, r in sorted(ratios.items())),
                    )
                )
        else:
            why = result.get("peers", {}).get("skipped") or "no peers measured"
            out.append(
                _target(
                    f"{kernel} vs transformers {dtype}",
                    "faster than the best peer at every T (time ratio < 1)",
                    None,
                    None,
                    why,
                )
            )

    overhead = result.get("overhead")
    if overhead:
        runner = overhead["runner"]
        out.append(
            _target(
                "runner overhead (T=1)",
                f"default runner + local dispatcher <= {OVERHEAD_GOAL}x the kernel called directly",
                f"{runner['ratio']:.3f}",
                runner["ratio"] <= OVERHEAD_GOAL,
                f"{runner['median_s'][0] * 1e3:.3f} ms vs {runner['median_s'][1] * 1e3:.3f} ms, "
                f"paired {runner['paired_ratio']:.3f}",
            )
        )
        chunking = overhead["chunking"]
        if chunking.get("points"):
            worst = max(chunking["points"], key=lambda p: p["ratio"])
            out.append(
                _target(
                    f"chunking ({chunking['chunk']}) overhead",
                    f"<= {OVERHEAD_GOAL}x no wrapper (chunk >= T)",
                    f"{worst['ratio']:.3f}",
                    worst["ratio"] <= OVERHEAD_GOAL,
                    ", ".join(f"T={p['tokens']}: {p['ratio']:.3f}" for p in chunking["points"]),
                )
            )
        else:
            out.append(
                _target(
                    "chunking overhead",
                    f"<= {OVERHEAD_GOAL}x no wrapper (chunk >= T)",
                    None,
                    None,
                    chunking.get("skipped", "not measured"),
                )
            )
        imp = overhead["import"]
        out.append(
            _target(
                "import time",
                f"`import moeframe` <= {IMPORT_GOAL}x `import torch`",
                f"{imp['ratio']:.3f}",
                imp["ratio"] <= IMPORT_GOAL,
                f"{imp['median_s']['import moeframe'] * 1e3:.0f} ms vs {imp['median_s']['import torch'] * 1e3:.0f} ms; "
                f"with the registry loaded: {imp['registry_ratio']:.3f}",
            )
        )
        triton = overhead["triton"]
        if triton.get("registered"):
            lazy = not triton["imported_on_register"]
            detail = (
                "first use imports triton"
                if triton.get("imported_on_first_use")
                else f"first use: {triton.get('load_error') or 'does not import triton'}"
            )
            out.append(
                _target(
                    "triton plugin registration",
                    "does not import triton",
                    "imports triton" if not lazy else "lazy",
                    lazy,
                    detail,
                )
            )
        else:
            out.append(
                _target(
                    "triton plugin registration",
                    "does not import triton",
                    None,
                    None,
                    triton.get("error", "the triton plugin is not installed"),
                )
            )
    return out
