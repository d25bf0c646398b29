"""moeframe's builtin strategies, registered through the same hooks as any plugin.

Implementations are named as ``"module:Class"`` strings, so that listing strategies
imports nothing beyond this module.
"""

from __future__ import annotations

from moeframe.plugins.hookspecs import hookimpl
from moeframe.plugins.records import Capabilities, Strategy

ALL_DTYPES = ("float32", "bfloat16", "float16")


@hookimpl
def register_routers() -> list[Strategy]:
    return [
        Strategy(
            "softmax_topk",
            "moeframe.routers.softmax_topk:SoftmaxTopKRouter",
            "softmax over experts, top-k, optional renormalisation (Mixtral, Qwen2/3-MoE)",
        ),
        Strategy(
            "sigmoid_grouped_topk",
            "moeframe.routers.sigmoid_grouped_topk:SigmoidGroupedTopKRouter",
            "sigmoid scores, correction bias, grouped top-k, scaling (DeepSeek-V3)",
        ),
        Strategy(
            "topk_softmax",
            "moeframe.routers.topk_softmax:TopKSoftmaxRouter",
            "router bias, top-k on logits, softmax over the chosen (GPT-OSS)",
        ),
        Strategy(
            "sigmoid_top1",
            "moeframe.routers.sigmoid_top1:SigmoidTop1Router",
            "sigmoid top-1, weight applied to the expert input (Llama-4)",
        ),
    ]


@hookimpl
def register_kernels() -> list[Strategy]:
    return [
        Strategy(
            "torch",
            "moeframe.kernels.torch_reference:TorchReferenceKernel",
            "reference: per-expert loop, fp32 accumulation (the ground truth)",
            Capabilities(dtypes=ALL_DTYPES),
        ),
        Strategy(
            "fused_cpu",
            "moeframe.kernels.fused_cpu:FusedCpuKernel",
            "fast CPU kernel: sort-and-group, fused gate/up GEMMs, decode and prefill paths, fp32 accumulation",
            Capabilities(dtypes=ALL_DTYPES, devices=("cpu",), activations=("silu", "gelu", "swigluoai")),
        ),
    ]


@hookimpl
def register_dispatchers() -> list[Strategy]:
    return [
        Strategy(
            "local",
            "moeframe.dispatchers.local:LocalDispatcher",
            "no token movement; partial results all-reduced once by the layer",
        ),
        Strategy(
            "allgather_reducescatter",
            "moeframe.dispatchers.allgather_reducescatter:AllGatherReduceScatterDispatcher",
            "all-gather every rank's tokens, reduce-scatter the experts' shares",
            Capabilities(distributed=True),
        ),
        Strategy(
            "all2all",
            "moeframe.dispatchers.all2all:AllToAllDispatcher",
            "send each token only to the ranks owning its experts (uneven all_to_all), and back",
            Capabilities(distributed=True),
        ),
    ]


@hookimpl
def register_runners() -> list[Strategy]:
    return [
        Strategy("default", "moeframe.runners.default:DefaultRunner", "route -> dispatch -> kernel -> combine"),
    ]


@hookimpl
def register_wrappers() -> list[Strategy]:
    return [
        Strategy(
            "chunking",
            "moeframe.wrappers.chunking:ChunkingWrapper",
            "runs the inner runner on chunks staged in workspace buffers; DP lock-step",
        ),
        Strategy(
            "shared_experts",
            "moeframe.wrappers.shared_experts:SharedExpertsWrapper",
            "adds a dense (optionally sigmoid-gated) shared MLP to the routed output",
        ),
    ]
