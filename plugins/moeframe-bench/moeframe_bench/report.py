"""Rendering a benchmark result: text tables, a Markdown section, a plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moeframe.errors import InputError
from moeframe.files import atomic_output, atomic_write_text, check_output_path

__all__ = ["text_report", "markdown_report", "update_markdown", "plot", "write_json", "BEGIN", "END"]

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"


def _table(rows: list[list[str]], headers: list[str], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    from moeframe.cli.common import table

    return table(rows, headers)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _machine_line(result: dict[str, Any]) -> str:
    """The CPU and what each kernel ran on it (results written before these were recorded
    say so)."""
    machine = result.get("machine")
    if not machine:
        return "machine: not recorded"
    flags = ", ".join(machine["isa_flags"]) or "none recorded"
    line = (
        f"machine: {machine['cpu']} ({machine['arch']}; {flags}; torch CPU capability "
        f"{machine['torch_cpu_capability']}; native variants here: {', '.join(machine['native_variants']) or 'none'})"
    )
    for name, per_dtype in result.get("kernel_details", {}).items():
        summaries = {d: details.get("summary") for d, details in per_dtype.items() if details.get("summary")}
        if summaries:
            line += f"; {name}: " + ", ".join(f"{s} ({d})" for d, s in summaries.items())
    return line


def _limits_line(result: dict[str, Any]) -> str:
    lim = result["limits"]
    peaks = ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in lim["gemm_flops"].items())
    return (
        f"machine limits ({result['threads']} threads), best of the measurements before and after the sweep: "
        f"peak GEMM {peaks}; read bandwidth {lim['read_bytes_per_s'] / 1e9:.1f} GB/s"
    )


def _results_rows(result: dict[str, Any], dtype: str) -> list[list[str]]:
    rows = []
    for r in result["results"]:
        if r["dtype"] != dtype:
            continue
        if r.get("median_s"):
            check = "ok" if r.get("ok") else "DISAGREES"
            rows.append(
                [
                    str(r["tokens"]),
                    r["impl"],
                    f"{r['median_s'] * 1e3:.3f}",
                    f"{r['tokens_per_s']:,.0f}",
                    _fmt(r["flops_per_s"] / 1e9, ".1f"),
                    _fmt(r["bytes_per_s"] / 1e9, ".1f"),
                    _fmt(r.get("flops_fraction"), ".2f"),
                    _fmt(r.get("bandwidth_fraction"), ".2f"),
                    check,
                ]
            )
        else:
            rows.append([str(r["tokens"]), r["impl"], "", "", "", "", "", "", r.get("skipped") or "not timed"])
    return rows


_RESULT_HEADERS = [
    "T",
    "implementation",
    "median ms",
    "tokens/s",
    "GFLOP/s",
    "GB/s",
    "of peak GEMM",
    "of read BW",
    "check",
]


def _target_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for t in result.get("targets", []):
        met = {True: "met", False: "NOT MET", None: "not measured"}[t["met"]]
        rows.append([t["name"], t["goal"], t["measured"] or "", met, t["detail"]])
    return rows


def _memory_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in result.get("memory", []):
        for v in m["variants"]:
            rows.append(
                [
                    m["dtype"],
                    str(m["tokens"]),
                    v["stack"],
                    f"{v['peak_extra_bytes'] / 2**20:,.1f}",
                    f"{v['workspace_bytes'] / 2**20:,.1f}",
                    f"{m['output_bytes'] / 2**20:,.1f}",
                ]
            )
    return rows


_MEMORY_HEADERS = ["dtype", "T", "stack", "peak extra MiB", "workspace MiB", "output MiB"]


def _sections(result: dict[str, Any], markdown: bool) -> list[str]:
    h = (lambda s: f"### {s}") if markdown else (lambda s: f"\n{s}")
    parts = []
    m = result["config"]["model"]
    parts.append(
        f"{'**Shape**' if markdown else 'shape'}: E={m['num_experts']}, top_k={m['top_k']}, H={m['hidden_size']}, "
        f"I={m['intermediate_size']}, activation {m['activation']}; stack: {result['stack']}; "
        f"torch {result['torch']}, transformers {result['peers'].get('transformers') or 'not installed'}; "
        f"{result['repeat']} rounds"
    )
    parts.append(_machine_line(result))
    parts.append(_limits_line(result))
    if result["peers"].get("skipped"):
        parts.append(f"peers skipped: {result['peers']['skipped']}")
    for dtype, cmp in result["peers"].get("full_block", {}).items():
        parts.append(
            f"transformers' whole block ({dtype}, its router + eager experts) against our reference stack: "
            f"max abs error {cmp['max_abs_error']:.2e}, {'agrees' if cmp['ok'] else 'DISAGREES'}"
        )
    for dtype in result["dtypes"]:
        parts.append(h(f"Results, {dtype}"))
        probes = [p for p in result.get("limit_probes", []) if p["dtype"] == dtype]
        if probes:
            fp32 = any("gemm_float32_flops_per_s" in p for p in probes)
            parts.append(
                "limits measured in the same rounds (the fractions use these): "
                + "; ".join(
                    f"T={p['tokens']}: {p['gemm_flops_per_s'] / 1e9:.1f} GFLOP/s"
                    + (f" ({p['gemm_float32_flops_per_s'] / 1e9:.1f} in float32)" if fp32 else "")
                    + f", {p['read_bytes_per_s'] / 1e9:.1f} GB/s"
                    for p in probes
                )
            )
        parts.append(_table(_results_rows(result, dtype), _RESULT_HEADERS, markdown))
    if result.get("targets"):
        parts.append(h("Targets"))
        parts.append(_table(_target_rows(result), ["target", "goal", "measured", "", "detail"], markdown))
    if result.get("memory"):
        parts.append(h("Memory: peak extra bytes of one forward"))
        parts.append(_table(_memory_rows(result), _MEMORY_HEADERS, markdown))
    return parts


def text_report(result: dict[str, Any]) -> str:
    """The tables ``moeframe bench`` prints."""
    return "\n".join(_sections(result, markdown=False)) + "\n"


def markdown_report(result: dict[str, Any]) -> str:
    """The same tables in Markdown (for ``docs/performance.md``)."""
    return "\n\n".join(_sections(result, markdown=True)) + "\n"


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` as JSON to ``path`` atomically (a temp file, then a rename)."""
    import json

    if not Path(path).parent.is_dir():
        raise InputError(f"--json: directory {str(Path(path).parent)!r} does not exist")
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")


def _markdown_section(path: Path) -> tuple[str, re.Pattern[str]]:
    """The text of ``path`` and the pattern of its bench section, or InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--markdown: file {str(path)!r} not found")
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise InputError(f"--markdown: {path} has no '{BEGIN}' ... '{END}' section to replace")
    return text, pattern


def check_output_paths(json_path: Path | None, plot_path: Path | None, markdown_path: Path | None) -> None:
    """Refuse, before any work, output paths that could not be written afterwards."""
    for path, option in ((json_path, "--json"), (plot_path, "--plot")):
        if path is None:
            continue
        check_output_path(path, option)
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib (pip install 'moeframe-bench[plot]')") from None
    if markdown_path is not None:
        _markdown_section(markdown_path)


def update_markdown(path: Path, result: dict[str, Any]) -> None:
    """Replace the text between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in
    ``path`` with :func:`markdown_report` (atomically)."""
    text, pattern = _markdown_section(path)
    new = pattern.sub(lambda _: f"{BEGIN}\n{markdown_report(result)}\n{END}", text, count=1)
    atomic_write_text(path, new)


def plot(result: dict[str, Any], path: Path) -> None:
    """GFLOP/s and GB/s against T for every implementation, with the machine's limits."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install 'moeframe-bench[plot]')") from None
    dtypes = result["dtypes"]
    fig, axes = plt.subplots(2, len(dtypes), figsize=(6.5 * len(dtypes), 8), squeeze=False)
    lim = result["limits"]
    for col, dtype in enumerate(dtypes):
        impls = list(dict.fromkeys(r["impl"] for r in result["results"] if r["dtype"] == dtype))
        for row, (key, scale, label, limit, limit_label) in enumerate(
            (
                ("flops_per_s", 1e9, "GFLOP/s", lim["gemm_flops"].get(dtype), f"peak GEMM ({dtype})"),
                ("bytes_per_s", 1e9, "GB/s of expert weights read", lim["read_bytes_per_s"], "read bandwidth"),
            )
        ):
            ax = axes[row][col]
            for impl in impls:
                pts = [
                    (r["tokens"], r[key] / scale)
                    for r in result["results"]
                    if r["dtype"] == dtype and r["impl"] == impl and r.get(key) and r["tokens"] > 0
                ]
                if pts:
                    style = "-o" if not impl.startswith("hf-") else "--s"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl, markersize=4)
            if limit:
                ax.axhline(limit / scale, color="black", linestyle=":", label=f"{limit_label}, best of the run")
            probe_key = "gemm_flops_per_s" if row == 0 else "read_bytes_per_s"
            probe = [
                (p["tokens"], p[probe_key] / scale)
                for p in result.get("limit_probes", [])
                if p["dtype"] == dtype and p["tokens"] > 0
            ]
            if probe:
                ax.plot(
                    [p[0] for p in probe],
                    [p[1] for p in probe],
                    color="black",
                    linewidth=0.8,
                    linestyle="-.",
                    label=f"{limit_label}, same rounds",
                )
            if row == 0 and dtype != "float32" and lim["gemm_flops"].get("float32"):
                ax.axhline(
                    lim["gemm_flops"]["float32"] / scale, color="grey", linestyle=":", label="peak GEMM (float32)"
                )
            ax.set_xscale("log", base=2)
            ticks = [t for t in result["tokens"] if t > 0]
            if ticks:
                ax.set_xticks(ticks)
                ax.set_xticklabels([str(t) for t in ticks])
            ax.set_yscale("log")
            ax.set_xlabel("tokens T")
            ax.set_ylabel(label)
            ax.set_title(f"{dtype}: {label}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    m = result["config"]["model"]
    fig.suptitle(
        f"moeframe bench: E={m['num_experts']} top_k={m['top_k']} H={m['hidden_size']} I={m['intermediate_size']}, "
        f"{result['threads']} threads"
    )
    fig.tight_layout()
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"--plot: directory {str(path.parent)!r} does not exist")
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
