#!/usr/bin/env python
"""Compile the plugin's Triton kernels for a CUDA GPU without one (ahead of time, to cubin).

The interpreter runs the kernels in Python and tolerates what the compiler may refuse; this
script compiles every kernel variant for a GPU architecture (default sm_90, H100/H200)
with the specialisations a real launch gets (16-byte aligned pointers, strides divisible
by 16, unit strides folded to 1) and reports, for the GEMMs, whether the loads are
software-pipelined (asynchronous copies into multi-stage shared buffers)::

    python plugins/moeframe-triton/benchmarks/compile_check.py            # every variant
    python plugins/moeframe-triton/benchmarks/compile_check.py --quick    # one of each kernel

Exit status 1 when a kernel fails to compile or a 16-bit GEMM is not pipelined (fp32 GEMMs
use IEEE dots on FMA units, which Triton does not pipeline; they are for correctness).  Needs triton's
bundled ``ptxas``; no GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (before moeframe_triton imports triton)

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moeframe_triton import align, fused_moe

PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}


def compile_kernel(
    fn: Any, types: dict[str, str], consts: dict[str, Any], aligned: set[str], target: GPUTarget, **options: Any
) -> Any:
    """Compile ``fn`` with ``types`` for the runtime arguments, ``consts`` for the rest;
    ``aligned`` arguments are known divisible by 16 (as a launch would specialise them)."""
    signature = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned if n not in consts}
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=options)


def gemm_variants(quick: bool) -> list[tuple[str, Any, dict[str, str], dict[str, Any], set[str], dict[str, Any]]]:
    out = []
    dtypes = ("bfloat16",) if quick else ("bfloat16", "float16", "float32")
    for dtype in dtypes:
        p = PTR[dtype]
        precision = "ieee" if dtype == "float32" else "tf32"
        for act in (0,) if quick else (0, 1, 2):
            for bias in (True,) if quick else (False, True):
                types = dict(
                    x_ptr=p,
                    w_ptr=p,
                    b_ptr=p,
                    h_ptr="*fp32",
                    sorted_ids_ptr="*i32",
                    expert_ids_ptr="*i32",
                    total_ptr="*i32",
                    N="i32",
                    K="i32",
                    num_pairs="i32",
                    num_rows="i32",
                    stride_xm="i32",
                    stride_we="i64",
                    stride_wn="i32",
                    stride_be="i32",
                    stride_hm="i32",
                    alpha="fp32",
                    limit="fp32",
                )
                consts = dict(
                    stride_xk=1,
                    stride_wk=1,
                    stride_bn=1,
                    stride_hn=1,
                    TOP_K=8,
                    ACTIVATION=act,
                    HAS_BIAS=bias,
                    BLOCK_M=64,
                    BLOCK_N=64,
                    BLOCK_K=64,
                    GROUP_M=8,
                    UPCAST_DOT=False,
                    PRECISION=precision,
                )
                aligned = {n for n in types if n.endswith("_ptr")} | {
                    "N",
                    "K",
                    "stride_xm",
                    "stride_we",
                    "stride_wn",
                    "stride_be",
                    "stride_hm",
                }
                out.append(
                    (
                        f"up {dtype} act={act} bias={bias}",
                        fused_moe._moe_up_kernel,
                        types,
                        consts,
                        aligned,
                        dict(num_warps=4, num_stages=3 if dtype != "float32" else 2),
                    )
                )
        for bias in (True,) if quick else (False, True):
            types = dict(
                h_ptr="*fp32",
                w_ptr=p,
                b_ptr=p,
                y_ptr="*fp32",
                weights_ptr="*fp32",
                sorted_ids_ptr="*i32",
                expert_ids_ptr="*i32",
                total_ptr="*i32",
                N="i32",
                K="i32",
                num_pairs="i32",
                num_rows="i32",
                stride_hm="i32",
                stride_we="i64",
                stride_wn="i32",
                stride_be="i32",
                stride_ym="i32",
            )
            split = dtype != "float32"  # h is fp32: two 16-bit dots (fused_moe._split_flags)
            consts = dict(
                stride_hk=1,
                stride_wk=1,
                stride_bn=1,
                stride_yn=1,
                HAS_BIAS=bias,
                BLOCK_M=64,
                BLOCK_N=128,
                BLOCK_K=64,
                GROUP_M=8,
                UPCAST_DOT=False,
                PRECISION=precision,
                SPLIT=split,
                SPLIT_SCALE=fused_moe.FP16_SPLIT_SCALE if dtype == "float16" else 1.0,
            )
            aligned = {n for n in types if n.endswith("_ptr")} | {
                "N",
                "K",
                "stride_hm",
                "stride_we",
                "stride_wn",
                "stride_be",
                "stride_ym",
            }
            out.append(
                (
                    f"down {dtype} bias={bias}",
                    fused_moe._moe_down_kernel,
                    types,
                    consts,
                    aligned,
                    dict(num_warps=4, num_stages=3 if dtype != "float32" else 2),
                )
            )
        types = dict(y_ptr="*fp32", out_ptr=p, T="i32", H="i32", stride_yt="i32", stride_yk="i32", stride_ot="i32")
        out.append(
            (
                f"sum {dtype}",
                fused_moe._moe_sum_kernel,
                types,
                dict(stride_yh=1, stride_oh=1, TOP_K=8, BLOCK_T=16, BLOCK_H=128),
                {"y_ptr", "out_ptr", "H", "stride_yt", "stride_yk", "stride_ot"},
                dict(num_warps=4),
            )
        )
    return out


def align_variants(quick: bool) -> list[tuple[str, Any, dict[str, str], dict[str, Any], set[str], dict[str, Any]]]:
    out = []
    for e_pad in (16,) if quick else (16, 64, 256, 512):
        chunk = align.chunk_size_for(e_pad)
        out.append(
            (
                f"align count E_PAD={e_pad}",
                align._align_count_kernel,
                dict(ids_ptr="*i64", counts_ptr="*i32", num_pairs="i32"),
                dict(CHUNK=chunk, E_PAD=e_pad),
                {"ids_ptr", "counts_ptr"},
                dict(num_warps=4),
            )
        )
        out.append(
            (
                f"align scan E_PAD={e_pad}",
                align._align_scan_kernel,
                dict(counts_ptr="*i32", chunk_offsets_ptr="*i32", totals_ptr="*i32", num_chunks="i32"),
                dict(E_PAD=e_pad, ROWS=64, E_BLOCK=min(e_pad, 64)),
                {"counts_ptr", "chunk_offsets_ptr", "totals_ptr"},
                dict(num_warps=4),
            )
        )
        for single in (True,) if quick else (False, True):
            for has_map in (True,) if quick else (False, True):
                types = dict(
                    ids_ptr="*i64",
                    chunk_offsets_ptr="*i32",
                    totals_ptr="*i32",
                    expert_map_ptr="*i32",
                    sorted_ids_ptr="*i32",
                    expert_ids_ptr="*i32",
                    total_ptr="*i32",
                    num_pairs="i32",
                    max_rows="i32",
                )
                out.append(
                    (
                        f"align place E_PAD={e_pad} single={single} map={has_map}",
                        align._align_place_kernel,
                        types,
                        dict(BLOCK_SIZE=16, CHUNK=chunk, E_PAD=e_pad, ROWS=chunk, SINGLE_CHUNK=single, HAS_MAP=has_map),
                        {n for n in types if n.endswith("_ptr")},
                        dict(num_warps=4),
                    )
                )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one variant of each kernel")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (default) or 80")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for name, fn, types, consts, aligned, options in gemm_variants(args.quick) + align_variants(args.quick):
        start = time.perf_counter()
        try:
            kernel = compile_kernel(fn, types, consts, aligned, target, **options)
        except Exception as exc:  # report every failing variant, not only the first
            failures += 1
            print(
                f"FAIL  {name}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            )
            continue
        note = ""
        if name.startswith(("up", "down")):
            ttgir = kernel.asm["ttgir"]
            buffers = re.findall(r"memdesc<(\d+)x\d+x\d+x", ttgir)
            pipelined = "async_copy" in ttgir and any(int(b) > 1 for b in buffers)
            if "float32" in name:  # IEEE fp32 dots run on FMA units: correct, not pipelined
                note = "IEEE fp32 (FMA)" + (", pipelined" if pipelined else "")
            else:
                note = "pipelined" if pipelined else "NOT PIPELINED"
                failures += not pipelined
        print(f"ok    {name:45s} {time.perf_counter() - start:6.2f} s  shared {kernel.metadata.shared:>6} B  {note}")
    print(f"{'all kernels compiled' if not failures else f'{failures} problem(s)'} for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
