"""Tiny random transformers models of the six MoE families, for the integration's tests.

``tiny_config(family)`` gives a small config (2 layers, H=32, a vocabulary of 96, a few
experts); ``tiny_model(family, dtype)`` builds the causal LM from it with seeded random
weights, in eval mode.  The initializer range is wide so that routing is decisive (no
near-ties that one ulp could flip between two equally correct implementations), and
DeepSeek-V3's ``e_score_correction_bias`` (zeros after HF's init) is made random so that
its mapping is exercised.

Mixed models: DeepSeek-V3's layer 0 is dense (``first_k_dense_replace = 1``), Qwen2-MoE's
layer 0 is dense (``mlp_only_layers = [0]``), Llama-4's layer 0 is dense (``moe_layers = [1]``).

Import transformers only through these functions (the module itself imports it lazily)
so that a test module can ``pytest.importorskip("transformers")`` first.
"""

from __future__ import annotations

from typing import Any

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4")

#: the MoE layer indices of each tiny model
MOE_LAYERS = {
    "mixtral": [0, 1],
    "qwen2_moe": [1],
    "qwen3_moe": [0, 1],
    "deepseek_v3": [1],
    "gpt_oss": [0, 1],
    "llama4": [1],
}

_COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "initializer_range": 0.2,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_FAMILY: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 40,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": False,
        "mlp_only_layers": [0],
    },
    "qwen3_moe": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "head_dim": 8,
    },
    "deepseek_v3": {
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 2,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 8,
        "num_key_value_heads": 4,
    },
    "gpt_oss": {
        "intermediate_size": 24,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "head_dim": 8,
        "sliding_window": 8,
        "swiglu_limit": 7.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "llama4": {
        "intermediate_size": 16,
        "intermediate_size_mlp": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "head_dim": 8,
        "moe_layers": [1],
        "attention_chunk_size": 64,
        "no_rope_layers": [1, 1],
    },
}


def config_class(family: str) -> Any:
    import transformers

    return {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "deepseek_v3": transformers.DeepseekV3Config,
        "gpt_oss": transformers.GptOssConfig,
        "llama4": transformers.Llama4TextConfig,
    }[family]


def tiny_config(family: str, **overrides: Any) -> Any:
    """A tiny config of ``family`` (one of :data:`FAMILIES`); ``overrides`` replace fields."""
    kwargs = {**_COMMON, **_FAMILY[family], **overrides}
    return config_class(family)(**kwargs)


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> Any:
    """A tiny causal LM of ``family`` with seeded random weights, in eval mode."""
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return model.to(dtype).eval()


def tiny_inputs(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    """Token ids ``[batch, length]`` in the tiny vocabulary (3.. so no pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, _COMMON["vocab_size"], (batch, length), generator=g)
