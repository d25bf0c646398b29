"""The end-to-end figure: a whole transformers model, prefill and decode, per experts path.

``python -m moeframe_bench.e2e`` builds a Qwen3-MoE-shaped causal LM with random weights
(default: 4 layers, H=1024, E=64, top_k=8, I=512, a vocabulary of 2048), then for each
dtype measures side by side, in one process:

* transformers' experts implementations: ``eager``, ``grouped_mm`` (its default) and
  ``batched_mm`` (decode only: at a 512-token prefill it gathers one [2I, H] weight copy
  per (token, expert) pair, 16 GiB in fp32);
* ``experts_implementation="moeframe:fused_cpu"`` (the light way: HF routing, moeframe's
  kernel);
* ``patch_model`` with ``stack.kernel = fused_cpu`` (the deep way: whole blocks).

Every path is first warmed up on a short prompt; the reference tokens are transformers'
default path's ``generate()`` (greedy).  Then ``--repeat`` rounds run, round-robin over
the paths (so that load from other processes spreads evenly), each path doing a prefill
of ``--prompt`` tokens (one forward that fills a KV cache and gives the first new token)
and ``--new-tokens`` greedy decode steps of one token each with the KV cache.  Every
round's tokens are checked against the reference (in bf16 a difference is reported with
the reference's logit gap at the first differing step: a near-tie breaks either way).
Reported: the median tokens/s of each phase and the spread (min..max) over rounds;
``--profile`` adds torch.profiler's top ops by self CPU time for the patched model and
transformers' best path.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["E2EOptions", "build_model", "run_e2e", "markdown_table", "add_arguments", "run", "main"]

#: transformers' experts implementations measured (batched_mm: decode only, see the module docstring)
HF_PATHS = ("eager", "grouped_mm", "batched_mm")
OWN_PATHS = ("moeframe:fused_cpu", "patch_model(fused_cpu)")
MARKDOWN_BEGIN = "<!-- e2e:begin -->"
MARKDOWN_END = "<!-- e2e:end -->"


class E2EOptions:
    """The model's shape and the measurement's sizes (defaults: the documented figure)."""

    def __init__(
        self,
        *,
        layers: int = 4,
        hidden: int = 1024,
        experts: int = 64,
        top_k: int = 8,
        intermediate: int = 512,
        vocab: int = 2048,
        heads: int = 16,
        kv_heads: int = 4,
        prompt: int = 512,
        new_tokens: int = 32,
        dtypes: Sequence[str] = ("float32", "bfloat16"),
        repeat: int = 5,
        seed: int = 0,
        profile: bool = False,
        paths: Sequence[str] | None = None,
    ) -> None:
        self.layers, self.hidden, self.experts, self.top_k = layers, hidden, experts, top_k
        self.intermediate, self.vocab, self.heads, self.kv_heads = intermediate, vocab, heads, kv_heads
        self.prompt, self.new_tokens, self.dtypes, self.repeat = prompt, new_tokens, tuple(dtypes), repeat
        self.seed, self.profile = seed, profile
        self.paths = tuple(paths) if paths else HF_PATHS + OWN_PATHS

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def build_model(options: E2EOptions, dtype: torch.dtype) -> Any:
    """The Qwen3-MoE-shaped causal LM, random weights from ``options.seed``, in eval mode."""
    import transformers

    config = transformers.Qwen3MoeConfig(  # type: ignore[call-arg]  # transformers types fewer fields than it takes
        vocab_size=options.vocab,
        hidden_size=options.hidden,
        intermediate_size=options.intermediate * 2,
        moe_intermediate_size=options.intermediate,
        num_experts=options.experts,
        num_experts_per_tok=options.top_k,
        num_hidden_layers=options.layers,
        num_attention_heads=options.heads,
        num_key_value_heads=options.kv_heads,
        head_dim=options.hidden // options.heads,
        max_position_embeddings=options.prompt + options.new_tokens + 8,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(options.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


class _Path:
    """One experts path of the model: how to switch to it and back."""

    def __init__(self, name: str, model: Any) -> None:
        self.name = name
        self.model = model
        self.report: Any = None

    def enter(self) -> None:
        if self.name.startswith("patch_model"):
            from moeframe.integrations.transformers.patch import patch_model

            self.model.set_experts_implementation("eager")
            self.report = patch_model(self.model, overrides={"stack.kernel": "fused_cpu"})
        else:
            self.model.set_experts_implementation(self.name)

    def leave(self) -> None:
        if self.name.startswith("patch_model"):
            from moeframe.integrations.transformers.patch import unpatch_model

            unpatch_model(self.model)

    def skips(self, phase: str, options: E2EOptions) -> str | None:
        if self.name == "batched_mm" and phase == "prefill":
            gathered = options.prompt * options.top_k * 2 * options.intermediate * options.hidden * 4
            return f"gathers {gathered / 2**30:.0f} GiB of weight copies at this prefill"
        return None


def _cache_name(model: Any) -> str:
    """The KV cache's argument and output name: ``cache`` (transformers >= 5.25), else
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model: Any, prompt: torch.Tensor) -> tuple[Any, torch.Tensor]:
    out = model(prompt, use_cache=True)
    return getattr(out, _cache_name(model)), out.logits[:, -1].argmax(-1, keepdim=True)


def _decode(model: Any, cache: Any, token: torch.Tensor, steps: int) -> list[int]:
    tokens = []
    name = _cache_name(model)
    for _ in range(steps):
        out = model(token, use_cache=True, **{name: cache})
        cache = getattr(out, name)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens


def _run_once(
    path: _Path, model: Any, prompt: torch.Tensor, steps: int, skip_prefill: str | None, default: str
) -> tuple[tuple[float, float] | None, tuple[float, float], list[int]]:
    """One prefill (which gives the first new token) and ``steps`` greedy decode steps on
    ``path``: (prefill (wall, CPU) seconds, or None when ``skip_prefill`` says why the path
    cannot afford it and the default path makes the cache; decode (wall, CPU) seconds; the
    ``steps + 1`` tokens).  CPU seconds are the process's (every thread's)."""
    prefill_s: tuple[float, float] | None = None
    clocks = (time.perf_counter, time.process_time)
    if skip_prefill:
        model.set_experts_implementation(default)
        cache, token = _prefill(model, prompt)
        path.enter()
    else:
        path.enter()
        start = [c() for c in clocks]
        cache, token = _prefill(model, prompt)
        prefill_s = (clocks[0]() - start[0], clocks[1]() - start[1])
    try:
        start = [c() for c in clocks]
        tokens = [int(token), *_decode(model, cache, token, steps)]
        decode_s = (clocks[0]() - start[0], clocks[1]() - start[1])
    finally:
        path.leave()
    return prefill_s, decode_s, tokens


def _greedy(model: Any, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens with transformers' own ``generate``."""
    out = model.generate(prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[0, prompt.shape[1] :].tolist()


def _logit_gap(model: Any, prompt: torch.Tensor, tokens: list[int], step: int) -> float:
    """The reference's lead of its best logit over the second at greedy step ``step``."""
    ids = torch.cat([prompt, torch.tensor([tokens[:step]], dtype=prompt.dtype)], dim=1)
    top2 = model(ids).logits[0, -1].float().topk(2).values
    return float(top2[0] - top2[1])


def _profile(fn: Callable[[], Any], top: int = 8) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total, "calls": e.count}
        for e in events[:top]
    ]


def _cpu_model() -> str:
    try:
        from moeframe.kernels.cpu_isa import cpu_model

        return cpu_model()
    except Exception:
        import platform

        return platform.processor() or platform.machine()


def run_e2e(
    options: E2EOptions,
    log: Callable[[str], None] = lambda s: None,
    partial: Callable[[dict[str, Any]], None] = lambda result: None,
) -> dict[str, Any]:
    """Measure every path of ``options.paths`` for every dtype; see the module docstring.
    ``partial(result)`` is called after each round (to save what is measured so far)."""
    import transformers

    from moeframe.integrations.transformers.experts import register_experts
    from moeframe.numerics import DTYPES

    register_experts()
    result: dict[str, Any] = {
        "options": options.as_dict(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtypes": {},
    }
    g = torch.Generator().manual_seed(options.seed + 1)
    prompt = torch.randint(3, options.vocab, (1, options.prompt), generator=g)
    for dtype_name in options.dtypes:
        dtype = DTYPES[dtype_name]
        model = build_model(options, dtype)
        default = model.config._experts_implementation
        paths = [_Path(name, model) for name in options.paths]
        section: dict[str, Any] = {"default": default, "paths": {}}
        result["dtypes"][dtype_name] = section
        with torch.inference_mode():
            # 1. every path warmed up on a short prompt (first calls load, build or convert)
            warm = prompt[:, : min(16, options.prompt)]
            for path in paths:
                _run_once(path, model, warm, 2, path.skips("prefill", options), default)
                section["paths"][path.name] = {
                    "prefill": [],
                    "decode": [],
                    "prefill_cpu": [],
                    "decode_cpu": [],
                    "identical": True,
                }
            # 2. the reference tokens: transformers' default path, through generate()
            model.set_experts_implementation(default)
            reference = _greedy(model, prompt, options.new_tokens + 1)
            section["reference_tokens"] = reference
            # 3. round-robin rounds; every round's greedy tokens are checked against the reference
            for round_ in range(options.repeat):
                for path in paths:
                    entry = section["paths"][path.name]
                    skip = path.skips("prefill", options)
                    prefill_s, decode_s, tokens = _run_once(path, model, prompt, options.new_tokens, skip, default)
                    if skip:
                        entry["prefill_skipped"] = skip
                    if path.report is not None:
                        entry["patch"] = str(path.report).splitlines()[0]
                    if tokens != reference and entry["identical"]:
                        entry["identical"] = False
                        step = next(i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b)
                        model.set_experts_implementation(default)
                        entry["first_difference"] = {
                            "round": round_,
                            "step": step,
                            "tokens": tokens,
                            "reference_logit_gap": _logit_gap(model, prompt, reference, step),
                        }
                    if prefill_s is not None:
                        entry["prefill"].append(prefill_s[0])
                        entry["prefill_cpu"].append(prefill_s[1])
                    entry["decode"].append(decode_s[0])
                    entry["decode_cpu"].append(decode_s[1])
                    shown = "-" if prefill_s is None else f"{prefill_s[0]:.2f} s (CPU {prefill_s[1]:.2f} s)"
                    same = "identical" if tokens == reference else "DIFFER"
                    log(
                        f"{dtype_name} {path.name}: prefill {shown}, "
                        f"decode {decode_s[0]:.2f} s (CPU {decode_s[1]:.2f} s), greedy tokens {same}"
                    )
                log(f"{dtype_name}: round {round_ + 1}/{options.repeat} done")
                _summarise(section, options)
                partial(result)  # what is measured so far, should the run be stopped
            # 4. where the time goes: the patched model and transformers' best path, per phase
            if options.profile:
                section["profile"] = {}
                for phase in ("prefill", "decode"):
                    for name in dict.fromkeys(["patch_model(fused_cpu)", _best(section, HF_PATHS, phase)]):
                        profiled = next((p for p in paths if p.name == name), None)
                        if profiled is None:
                            continue
                        path = profiled
                        model.set_experts_implementation(default)
                        cache, token = _prefill(model, prompt)  # a cache to profile decode steps on
                        path.enter()
                        try:
                            if phase == "prefill":
                                ops = _profile(functools.partial(_prefill, model, prompt))
                            else:
                                steps = min(8, options.new_tokens)
                                ops = _profile(functools.partial(_decode, model, cache, token, steps))
                        finally:
                            path.leave()
                        section["profile"].setdefault(name, {})[phase] = ops
        _summarise(section, options)
        del model
        partial(result)
    return result


def _best(section: dict[str, Any], names: Sequence[str], phase: str) -> str | None:
    """The path of ``names`` with the least median CPU time in ``phase`` (under load, CPU
    time is the steadier measure; see the module docstring)."""
    timed = {
        n: statistics.median(section["paths"][n][f"{phase}_cpu"])
        for n in names
        if n in section["paths"] and section["paths"][n][f"{phase}_cpu"]
    }
    return min(timed, key=timed.__getitem__) if timed else None


def _summarise(section: dict[str, Any], options: E2EOptions) -> None:
    counts = {"prefill": options.prompt, "decode": options.new_tokens}
    for entry in section["paths"].values():
        for phase, n in counts.items():
            for clock, key in (("", phase), ("_cpu", f"{phase}_cpu")):
                times = entry[key]
                entry[f"{phase}_tokens_per{clock}_s"] = n / statistics.median(times) if times else None
                entry[f"{phase}{clock}_spread"] = [n / max(times), n / min(times)] if times else None
    for phase in counts:
        best = _best(section, HF_PATHS, phase)
        section[f"best_hf_{phase}"] = best
        if best is None:
            continue
        for clock in ("", "_cpu"):
            base = section["paths"][best][f"{phase}_tokens_per{clock}_s"]
            for entry in section["paths"].values():
                rate = entry[f"{phase}_tokens_per{clock}_s"]
                entry[f"{phase}{clock}_vs_best_hf"] = rate / base if rate else None


def markdown_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (one row per dtype and path): tokens per CPU-second
    (the process's CPU time) and per wall-clock second, each the median over rounds with
    the spread (min..max), and the ratio to transformers' best path (by CPU time)."""
    o = result["options"]
    lines = [
        (
            f"Qwen3-MoE-shaped model, {o['layers']} layers, H={o['hidden']}, E={o['experts']}, top_k={o['top_k']}, "
            f"I={o['intermediate']}, vocabulary {o['vocab']}, random weights; prefill {o['prompt']} tokens, then "
            f"{o['new_tokens']} decode steps with a KV cache; batch 1.  CPU: {result['cpu']}, {result['threads']} "
            f"thread(s); torch {result['torch']}, transformers {result['transformers']}; median of {o['repeat']} "
            "round-robin rounds, [min..max]."
        ),
        "",
        (
            "| dtype | experts path | prefill tok/CPU-s | vs best HF | prefill tok/s (wall) | decode tok/CPU-s "
            "| vs best HF | decode tok/s (wall) | greedy tokens |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def rate(entry: dict[str, Any], phase: str, clock: str) -> str:
        value = entry[f"{phase}_tokens_per{clock}_s"]
        if value is None:
            return "not measured"
        low, high = entry[f"{phase}{clock}_spread"]
        return f"{value:,.1f} [{low:,.1f}..{high:,.1f}]"

    def ratio(entry: dict[str, Any], phase: str) -> str:
        value = entry.get(f"{phase}_cpu_vs_best_hf")
        return f"{value:.2f}x" if value else ""

    for dtype, section in result["dtypes"].items():
        for name, entry in section["paths"].items():
            label = name + (" (default)" if name == section["default"] else "")
            best = [p for p in ("prefill", "decode") if section.get(f"best_hf_{p}") == name]
            if best:
                label += f" (best HF: {', '.join(best)})"
            if entry["identical"]:
                check = "identical"
            else:
                diff = entry["first_difference"]
                check = f"differ from step {diff['step']} (reference gap {diff['reference_logit_gap']:.3f})"
            lines.append(
                f"| {dtype} | {label} | {rate(entry, 'prefill', '_cpu')} | {ratio(entry, 'prefill')} | "
                f"{rate(entry, 'prefill', '')} | {rate(entry, 'decode', '_cpu')} | {ratio(entry, 'decode')} | "
                f"{rate(entry, 'decode', '')} | {check} |"
            )
    for dtype, section in result["dtypes"].items():
        for name, phases in section.get("profile", {}).items():
            for phase, ops in phases.items():
                top = ", ".join(f"{op['op']} {op['share']:.0%}" for op in ops[:5])
                lines.append(f"\n{dtype} · {name} · {phase}: top ops by self CPU time: {top}")
    return "\n".join(lines)


def _replace_section(path: Path, text: str) -> None:
    """Replace what lies between the e2e markers of ``path`` (append the markers if absent)."""
    from moeframe.files import atomic_output

    current = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{MARKDOWN_BEGIN}\n{text}\n{MARKDOWN_END}"
    if MARKDOWN_BEGIN in current and MARKDOWN_END in current:
        head, _, rest = current.partition(MARKDOWN_BEGIN)
        _, _, tail = rest.partition(MARKDOWN_END)
        new = head + block + tail
    else:
        new = current.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_output(path) as tmp:
        Path(tmp).write_text(new, encoding="utf-8")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


DESCRIPTION = (
    "End-to-end prefill and decode tokens/s of a Qwen3-MoE-shaped transformers model, "
    "for transformers' experts implementations, moeframe:fused_cpu and patch_model."
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m moeframe_bench.e2e`` (the same arguments as ``moeframe e2e``)."""
    p = argparse.ArgumentParser(prog="python -m moeframe_bench.e2e", description=DESCRIPTION, allow_abbrev=False)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``moeframe e2e``."""
    p.add_argument("--layers", type=_positive, default=4, help="decoder layers (default 4)")
    p.add_argument("--hidden", type=_positive, default=1024, help="hidden size H (default 1024)")
    p.add_argument("--experts", type=_positive, default=64, help="experts E (default 64)")
    p.add_argument("--top-k", type=_positive, default=8, help="experts per token (default 8)")
    p.add_argument("--intermediate", type=_positive, default=512, help="expert intermediate size I (default 512)")
    p.add_argument("--vocab", type=_positive, default=2048, help="vocabulary size (default 2048)")
    p.add_argument("--heads", type=_positive, default=16, help="attention heads (default 16; H must divide by it)")
    p.add_argument("--kv-heads", type=_positive, default=4, help="key/value heads (default 4)")
    p.add_argument("--prompt", type=_positive, default=512, help="prefill tokens (default 512)")
    p.add_argument("--new-tokens", type=_positive, default=32, help="decode steps (default 32)")
    p.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes (default float32,bfloat16)")
    p.add_argument("--repeat", type=_positive, default=5, help="timed rounds (default 5)")
    p.add_argument(
        "--paths", default=None, help=f"comma-separated experts paths (default: {','.join(HF_PATHS + OWN_PATHS)})"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompt (default 0)")
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch threads (default: torch's); 1 keeps CPU time meaningful on a loaded machine",
    )
    p.add_argument(
        "--profile", action="store_true", help="add torch.profiler's top ops of the patched model and the best HF path"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the full result as JSON to FILE")
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE.md",
        help=f"replace the part of FILE.md between {MARKDOWN_BEGIN} and {MARKDOWN_END} with the table",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moeframe_bench.e2e``: user errors as one line, exit status 2."""
    from moeframe.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"moeframe: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """``moeframe e2e``: run the benchmark, print the table, write --json and --markdown."""
    from moeframe.errors import UserError, did_you_mean
    from moeframe.numerics import DTYPES

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if not dtypes or bad:
        raise UserError(f"--dtype: unknown dtype {bad[0] if bad else args.dtype!r}; choose from {', '.join(DTYPES)}")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()] if args.paths else None
    known = HF_PATHS + OWN_PATHS
    for path in paths or ():
        if path not in known:
            raise UserError(
                f"--paths: unknown path {path!r}{did_you_mean(path, known)}; choose from {', '.join(known)}"
            )
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise UserError(
            f"--hidden ({args.hidden}) must divide by --heads ({args.heads}), "
            f"and --heads by --kv-heads ({args.kv_heads})"
        )
    if args.top_k > args.experts:
        raise UserError(f"--top-k ({args.top_k}) must be <= --experts ({args.experts})")
    for target in (args.json, args.markdown):
        if target is not None and not target.parent.is_dir():
            raise UserError(f"{target}: the folder {str(target.parent)!r} does not exist")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = E2EOptions(
        layers=args.layers,
        hidden=args.hidden,
        experts=args.experts,
        top_k=args.top_k,
        intermediate=args.intermediate,
        vocab=args.vocab,
        heads=args.heads,
        kv_heads=args.kv_heads,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
        dtypes=dtypes,
        repeat=args.repeat,
        seed=args.seed,
        profile=args.profile,
        paths=paths,
    )
    result = run_e2e(
        options, log=lambda s: print(s, file=sys.stderr, flush=True), partial=lambda r: _write_json(args.json, r)
    )
    table = markdown_table(result)
    print(table)
    _write_json(args.json, result)
    if args.markdown is not None:
        _replace_section(args.markdown, table)
    return 0


def _write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        from moeframe.files import atomic_output

        with atomic_output(path) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
