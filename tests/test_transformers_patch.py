"""The transformers integration's deep way: config_from_hf, patch_model, unpatch_model.

Tiny random models of the six families (tests/hf_models.py), fp32 and bf16: logits equal
to the unpatched model within the dtype's tolerance, greedy generate() identical, router
logits and the auxiliary loss identical, the state dict round trip through
save_pretrained/from_pretrained, the experts shared rather than copied, and the bad
inputs of issue 10 section 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).parent))

from hf_models import FAMILIES, MOE_LAYERS, tiny_config, tiny_inputs, tiny_model

import moeframe
from moeframe.errors import ConfigError, StackError, UserError
from moeframe.integrations.transformers import (
    SUPPORTED_FAMILIES,
    PatchedLayer,
    config_from_hf,
    moe_layer_indices,
    patch_model,
    unpatch_model,
)
from moeframe.numerics import Tolerance

#: whole-model logits (two layers of rounding, then the LM head); bf16: above the spread
#: between transformers' own experts implementations (eager vs grouped_mm: up to 0.031
#: on these models), well below a wrong result (bf16 against fp32: up to 0.09)
LOGITS_TOLERANCE = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, scale_rtol=1e-5),
    torch.bfloat16: Tolerance(atol=4e-2, rtol=2e-2, scale_rtol=1e-2),
}
#: the families whose experts moeframe holds without a copy: the same layout, or (Llama-4)
#: a transposition that the HF parameter takes as a view
SHARED = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "llama4")


def run(model, x, **kwargs):
    with torch.no_grad():
        return model(x, output_router_logits=True, **kwargs)


def generate(model, x):
    with torch.no_grad():
        return model.generate(x, max_new_tokens=4, do_sample=False)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    cmp = moeframe.compare(out, ref, LOGITS_TOLERANCE[dtype])
    assert cmp.ok, (cmp.max_abs_error, cmp.max_rel_error)


def test_importing_the_integration_does_not_import_transformers():
    import subprocess

    code = (
        "import sys, moeframe, moeframe.integrations.transformers as t; "
        "moeframe.MoELayer('qwen3-moe'); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- config_from_hf -------------------------------------------------------------------------
def test_config_from_hf_maps_every_field():
    mixtral = config_from_hf(tiny_config("mixtral"))
    assert (
        mixtral.model.num_experts,
        mixtral.model.top_k,
        mixtral.model.hidden_size,
        mixtral.model.intermediate_size,
    ) == (4, 2, 32, 48)
    assert mixtral.router.name == "softmax_topk" and mixtral.router.params.renormalize
    assert mixtral.router.params.weights_dtype == "float32" and mixtral.stack.wrappers == ()

    for norm in (True, False):
        qwen3 = config_from_hf(tiny_config("qwen3_moe", norm_topk_prob=norm, moe_intermediate_size=24))
        assert qwen3.router.params.renormalize is norm and qwen3.router.params.weights_dtype == "activation"
        assert qwen3.model.intermediate_size == 24

    qwen2 = config_from_hf(tiny_config("qwen2_moe", shared_expert_intermediate_size=56))
    (shared,) = qwen2.stack.wrappers
    assert shared.name == "shared_experts" and shared.params.intermediate_size == 56 and shared.params.gated
    assert qwen2.model.num_experts == 8

    ds = config_from_hf(
        tiny_config(
            "deepseek_v3", n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False, n_shared_experts=3
        )
    )
    p = ds.router.params
    assert ds.router.name == "sigmoid_grouped_topk" and ds.model.num_experts == 8
    assert (p.n_group, p.topk_group, p.routed_scaling_factor, p.renormalize, p.correction_bias) == (
        2,
        1,
        1.5,
        False,
        True,
    )
    (shared,) = ds.stack.wrappers
    assert shared.params.intermediate_size == 16 * 3 and not shared.params.gated

    gpt = config_from_hf(tiny_config("gpt_oss", swiglu_alpha=1.5, swiglu_limit=5.0))
    assert gpt.router.name == "topk_softmax"
    assert (gpt.model.activation, gpt.model.swiglu_alpha, gpt.model.swiglu_limit, gpt.model.expert_bias) == (
        "swigluoai",
        1.5,
        5.0,
        True,
    )

    llama = config_from_hf(tiny_config("llama4"))
    assert llama.router.name == "sigmoid_top1" and llama.model.top_k == 1
    (shared,) = llama.stack.wrappers
    assert shared.params.intermediate_size == 16 and not shared.params.gated


def test_activation_comes_from_the_family_not_hidden_act():
    # GPT-OSS says "silu" but its experts compute swigluoai
    assert tiny_config("gpt_oss").hidden_act == "silu"
    assert config_from_hf(tiny_config("gpt_oss")).model.activation == "swigluoai"
    assert config_from_hf(tiny_config("mixtral", hidden_act="gelu")).model.activation == "gelu"
    assert config_from_hf(tiny_config("qwen3_moe", hidden_act="swish")).model.activation == "silu"
    with pytest.raises(ConfigError, match=r"hidden_act = 'relu' has no moeframe activation.*gelu, silu"):
        config_from_hf(tiny_config("qwen3_moe", hidden_act="relu"))


def test_mixed_models_list_only_their_moe_layers():
    assert moe_layer_indices(tiny_config("deepseek_v3", num_hidden_layers=4, first_k_dense_replace=3)) == [3]
    assert moe_layer_indices(
        tiny_config("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1], decoder_sparse_step=1)
    ) == [0, 2, 3]
    assert moe_layer_indices(
        tiny_config("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2)
    ) == [1, 3]
    assert moe_layer_indices(
        tiny_config("llama4", num_hidden_layers=4, moe_layers=None, interleave_moe_layer_step=2, no_rope_layers=None)
    ) == [1, 3]
    for family in FAMILIES:
        assert moe_layer_indices(tiny_config(family)) == MOE_LAYERS[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_table_of_hf_names_matches_transformers_blocks(family):
    """blocks.BLOCKS (used by patch_model and load_hf) against the tiny model's own block:
    every name exists, its shape is moeframe's (reversed where transposed), and the experts'
    layout flags are the ones transformers' experts decorator sets."""
    from moeframe.integrations.transformers.blocks import BLOCKS
    from moeframe.weights import expert_weight_specs

    spec = BLOCKS[family]
    model = tiny_model(family)
    config = config_from_hf(model.config)
    block = getattr(model.model.layers[MOE_LAYERS[family][0]], spec.attribute)
    assert type(block).__name__ in spec.classes
    assert isinstance(getattr(block, spec.router), torch.nn.Module)
    hf = dict(block.named_parameters()) | dict(block.named_buffers())
    moe = moeframe.MoELayer(config)
    shapes = {s.name: tuple(s.shape) for s in moe.weight_specs}
    table = spec.tensors(config)
    assert set(table) == set(shapes)  # every tensor the layer holds, and nothing else
    for name, where in table.items():
        stored = [tuple(hf[p].shape) for p in where.paths]
        expected = shapes[name]
        if where.transposed:
            expected = (*expected[:-2], expected[-1], expected[-2])
        if len(stored) > 1:  # rows of several tensors
            assert sum(s[0] for s in stored) == expected[0] and {s[1:] for s in stored} == {expected[1:]}
        else:
            assert stored[0] == expected, name
    experts = block.experts
    if hasattr(experts, "is_transposed"):  # behind transformers' ExpertsInterface (all but Llama-4)
        assert table["experts.w13"].transposed == experts.is_transposed
        assert table["experts.w13"].interleaved == (not experts.is_concatenated)
        assert ("experts.b13" in table) == experts.has_bias
    assert {s.name for s in expert_weight_specs(config.model, moe.parallel)} <= set(table)


def test_unsupported_family_lists_the_supported_ones():
    import transformers

    with pytest.raises(ConfigError) as info:
        config_from_hf(transformers.LlamaConfig())
    message = str(info.value)
    assert "\n" not in message and "'llama'" in message
    assert all(f in message for f in SUPPORTED_FAMILIES)
    with pytest.raises(ConfigError, match="model type 'bert' is not a family"):
        config_from_hf({"model_type": "bert"})


def test_config_json_mapping_and_llama4_multimodal_config():
    import transformers

    raw = tiny_config("deepseek_v3").to_dict()
    assert config_from_hf(raw) == config_from_hf(tiny_config("deepseek_v3"))
    multimodal = transformers.Llama4Config(text_config=tiny_config("llama4").to_dict())
    assert config_from_hf(multimodal) == config_from_hf(tiny_config("llama4"))
    assert moe_layer_indices(multimodal) == [1]


def test_llama4_with_top_k_above_one_is_refused():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok = 2.*needs 1"):
        config_from_hf(tiny_config("llama4", num_experts_per_tok=2))


def test_overrides_select_strategies_and_keep_the_family_parts():
    hf = tiny_config("deepseek_v3")
    cfg = config_from_hf(hf, overrides={"stack.kernel": "fused_cpu", "stack.wrappers": ["chunking"]})
    assert cfg.stack.kernel.name == "fused_cpu"
    assert [w.name for w in cfg.stack.wrappers] == ["chunking", "shared_experts"]  # the family's part, innermost
    assert cfg.stack.wrappers[1].params.intermediate_size == 32
    # placed explicitly: the user's position, the family's size and gate
    cfg = config_from_hf(tiny_config("qwen2_moe"), overrides=["stack.wrappers=['shared_experts', 'chunking']"])
    assert [w.name for w in cfg.stack.wrappers] == ["shared_experts", "chunking"]
    assert cfg.stack.wrappers[0].params.intermediate_size == 40 and cfg.stack.wrappers[0].params.gated
    # the user's parameters win over the family's
    cfg = config_from_hf(
        hf, overrides={"stack.wrappers": [{"name": "shared_experts", "params": {"intermediate_size": 8}}]}
    )
    assert cfg.stack.wrappers[0].params.intermediate_size == 8
    # a family without shared experts gets none
    cfg = config_from_hf(tiny_config("qwen3_moe"), overrides={"stack.wrappers": ["chunking"]})
    assert [w.name for w in cfg.stack.wrappers] == ["chunking"]


def test_unknown_override_key_is_the_configs_did_you_mean():
    with pytest.raises(ConfigError, match=r"stack\.kernle: unknown key; did you mean 'kernel'\?"):
        config_from_hf(tiny_config("mixtral"), overrides={"stack.kernle": "torch"})
    with pytest.raises(ConfigError, match="unknown kernel 'fused_cpuu'; did you mean 'fused_cpu'"):
        config_from_hf(tiny_config("mixtral"), overrides={"stack.kernel": "fused_cpuu"})


# -- patch_model: the six families, fp32 and bf16 ------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_computes_what_the_model_computes(family, dtype):
    model = tiny_model(family, dtype)
    x = tiny_inputs()
    reference = run(model, x)
    reference_tokens = generate(model, x)
    overrides = (
        {"stack.kernel": "fused_cpu"}
        if dtype == torch.bfloat16
        else {"stack.wrappers": ["chunking"], "stack.wrappers[0].params.max_num_tokens": 5}
    )
    report = patch_model(model, overrides=overrides)

    assert report.family == family and report.layers == MOE_LAYERS[family]
    for block in report.blocks:
        assert isinstance(model.get_submodule(block.name), PatchedLayer)
    patched = run(model, x)
    assert patched.logits.dtype == dtype
    assert_close(patched.logits, reference.logits, dtype)
    assert torch.equal(generate(model, x), reference_tokens)

    # router logits: recorded from the same router, so the first MoE layer's are bit-equal
    assert len(patched.router_logits) == len(reference.router_logits) == len(MOE_LAYERS[family])
    assert torch.equal(patched.router_logits[0], reference.router_logits[0])
    for got, want in zip(patched.router_logits, reference.router_logits, strict=True):
        assert_close(got, want, dtype)
    if reference.aux_loss is not None:
        assert_close(patched.aux_loss, reference.aux_loss, dtype)

    # the model without router logits recorded (moeframe's router alone) computes the same
    with torch.no_grad():
        assert_close(model(x).logits, reference.logits, dtype)


def test_aux_loss_in_the_training_loss_is_the_unpatched_one():
    model = tiny_model("qwen3_moe")
    x = tiny_inputs()
    reference = run(model, x, labels=x)
    patch_model(model)
    patched = run(model, x, labels=x)
    assert torch.allclose(patched.aux_loss, reference.aux_loss, rtol=1e-6, atol=0)
    assert torch.allclose(patched.loss, reference.loss, rtol=1e-5, atol=0)


def test_report_lists_layers_stacks_and_shared_versus_copied_bytes():
    model = tiny_model("deepseek_v3")
    report = patch_model(model, overrides={"stack.wrappers": ["chunking"]})
    (block,) = report.blocks
    assert block.name == "model.layers.1.mlp" and block.layer == 1 and block.block == "DeepseekV3MoE"
    assert block.stack == ("chunking", "shared_experts", "default", "sigmoid_grouped_topk", "local", "torch")
    # every tensor is the HF module's: the shared expert's gate and up rows were fused in
    # place (HF's two weights became the halves of the layer's shared.w13)
    assert block.copied == () and block.copied_bytes == 0
    patched = model.model.layers[1].mlp
    assert block.shared_bytes == sum(t.nbytes for t in patched.moe.tensors.values())
    w13 = patched.moe.tensors["shared.w13"]
    assert patched.shared_experts.gate_proj.weight.data_ptr() == w13.data_ptr()
    assert patched.shared_experts.up_proj.weight.data_ptr() == w13[32:].data_ptr()
    text = str(report)
    assert "model.layers.1.mlp (DeepseekV3MoE): chunking > shared_experts > default" in text
    assert report.to_dict()["copied_bytes"] == block.copied_bytes


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_shared_with_the_hf_module_where_layouts_agree(family):
    model = tiny_model(family)
    report = patch_model(model)
    for block in report.blocks:
        patched = model.get_submodule(block.name)
        w13 = patched.moe.tensors["experts.w13"]
        if family in SHARED:
            assert w13.data_ptr() == patched.experts.gate_up_proj.data_ptr()
            assert block.copied == () and block.copied_bytes == 0
            if family == "llama4":  # the HF weight is now a transposed view of the layer's
                assert torch.equal(patched.experts.gate_up_proj, w13.transpose(1, 2))
        else:  # GPT-OSS (interleaved and transposed: no view expresses it): converted, reported
            assert w13.data_ptr() != patched.experts.gate_up_proj.data_ptr()
            copied = {"experts.w13", "experts.w2", "experts.b13"}  # experts.b2 is used as it is
            assert set(block.copied) == copied
            assert block.copied_bytes == sum(patched.moe.tensors[n].nbytes for n in copied)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip_through_save_pretrained(family, tmp_path):
    import transformers

    model = tiny_model(family)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    x = tiny_inputs()
    patch_model(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    patched_logits = run(model, x).logits
    model.save_pretrained(tmp_path)
    # a plain from_pretrained, without moeframe
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, PatchedLayer) for m in loaded.modules())
    assert_close(run(loaded, x).logits, patched_logits, torch.float32)


def test_bf16_checkpoint_with_an_fp32_router_is_used_as_loaded(tmp_path):
    """DeepSeek-V3 keeps its router in fp32 when loaded in bf16; the layer reads it as is."""
    import transformers

    tiny_model("deepseek_v3").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    x = tiny_inputs()
    reference = run(model, x)
    report = patch_model(model)
    assert "router.weight" not in report.blocks[0].copied
    patched = run(model, x)
    assert torch.equal(patched.router_logits[0], reference.router_logits[0])
    assert_close(patched.logits, reference.logits, torch.bfloat16)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe", "llama4"])
def test_load_state_dict_and_to_dtype_reach_the_patched_layers(family):
    # GPT-OSS: converted experts, a copy that must follow the HF tensors; Qwen2-MoE: the
    # shared expert's rows fused in place, which .to() splits again; Llama-4: experts
    # transposed in place
    model = tiny_model(family)
    other = tiny_model(family, seed=5)
    x = tiny_inputs()
    patch_model(model)
    model.load_state_dict(other.state_dict())
    assert_close(run(model, x).logits, run(other, x).logits, torch.float32)
    model.to(torch.bfloat16)
    other.to(torch.bfloat16)
    assert_close(run(model, x).logits, run(other, x).logits, torch.bfloat16)


def test_a_model_made_under_inference_mode_patches():
    with torch.inference_mode():
        model = tiny_model("gpt_oss")  # inference tensors: no version counter
        x = tiny_inputs()
        reference = model(x).logits
        patch_model(model)
        assert_close(model(x).logits, reference, torch.float32)


def test_unpatch_restores_the_original_blocks():
    model = tiny_model("qwen2_moe")
    original = model.model.layers[1].mlp
    x = tiny_inputs()
    reference = run(model, x).logits
    patch_model(model)
    assert model.model.layers[1].mlp is not original
    assert unpatch_model(model) == 1
    assert model.model.layers[1].mlp is original
    assert torch.equal(run(model, x).logits, reference)
    assert unpatch_model(model) == 0
    patch_model(model)  # and patched again after unpatching
    assert isinstance(model.model.layers[1].mlp, PatchedLayer)


def test_gpt_oss_block_keeps_its_tuple_return():
    model = tiny_model("gpt_oss")
    block = model.model.layers[0].mlp
    h = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_out, want_scores = block(h)
        patch_model(model)
        got_out, got_scores = model.model.layers[0].mlp(h)
    assert_close(got_out, want_out, torch.float32)
    assert torch.allclose(got_scores, want_scores, atol=1e-6)


def test_layer_holds_given_tensors_as_they_are():
    """The mechanism of the sharing: MoELayer(tensors=...) uses the tensors, checks them."""
    from moeframe.errors import InputError

    config = moeframe.load_config(
        "qwen3-moe", {"model.num_experts": 4, "model.hidden_size": 16, "model.intermediate_size": 8}
    )
    source = moeframe.MoELayer(config)
    tensors = {name: t.clone() for name, t in source.tensors.items()}
    layer = moeframe.MoELayer(config, tensors=tensors)
    assert all(layer.tensors[n].data_ptr() == t.data_ptr() for n, t in tensors.items())
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(layer(x), source(x))
    assert torch.equal(layer(x, router_logits=layer.router_logits(x)), source(x))
    with pytest.raises(InputError, match=r"router_logits has shape \[5, 3\]; expected \[5, 4\]"):
        layer(x, router_logits=torch.zeros(5, 3))
    with pytest.raises(InputError, match=r"tensors: missing 'experts\.w2' of shape"):
        moeframe.MoELayer(config, tensors={k: v for k, v in tensors.items() if k != "experts.w2"})
    with pytest.raises(InputError, match=r"tensors: unexpected 'experts\.w3'"):
        moeframe.MoELayer(config, tensors={**tensors, "experts.w3": tensors["experts.w2"]})
    with pytest.raises(InputError, match=r"tensors: 'experts.w13' has shape \[4, 16, 8\], expected \[4, 16, 16\]"):
        moeframe.MoELayer(config, tensors={**tensors, "experts.w13": tensors["experts.w13"][:, :, :8]})
    converted = moeframe.MoELayer(config, tensors={n: t.to(torch.bfloat16) for n, t in tensors.items()})
    assert converted.tensors["experts.w13"].dtype == torch.float32  # the layer's dtype: a converted copy


# -- bad input ------------------------------------------------------------------------------------
def test_patching_twice_is_a_clear_error():
    model = tiny_model("mixtral")
    patch_model(model)
    with pytest.raises(UserError, match=r"already patched \(2 block\(s\).*unpatch_model\(model\) first"):
        patch_model(model, overrides={"stack.kernel": "fused_cpu"})


def test_nothing_to_patch():
    import transformers

    dense = tiny_model("qwen3_moe", mlp_only_layers=[0, 1])
    with pytest.raises(UserError, match=r"^nothing to patch: Qwen3MoeForCausalLM \(qwen3_moe\) has no MoE blocks"):
        patch_model(dense)
    with pytest.raises(UserError, match=r"^nothing to patch: Linear is not a transformers model"):
        patch_model(torch.nn.Linear(2, 2))
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(
        ConfigError, match="model type 'llama' is not a family moeframe maps; supported families: mixtral"
    ):
        patch_model(llama)


def test_bad_overrides():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ConfigError, match=r"stack\.wrapers: unknown key; did you mean 'wrappers'\?"):
        patch_model(model, overrides={"stack.wrapers": ["chunking"]})
    with pytest.raises(UserError, match=r"model\.num_experts comes from the transformers model"):
        patch_model(model, overrides={"model.num_experts": 4})
    with pytest.raises(
        ConfigError, match=r"ep_size \(2\) \* tp_size \(1\) must equal the number of ranks, but this is one process"
    ):
        patch_model(model, overrides={"parallel.ep_size": 2})
    assert not any(isinstance(m, PatchedLayer) for m in model.modules())


def test_a_dtype_the_kernel_cannot_run_is_the_composers_message_naming_the_block():
    from types import SimpleNamespace

    from moeframe.plugins import Capabilities, Strategy

    @moeframe.hookimpl
    def register_kernels():
        return [
            Strategy(
                "fp32_only",
                "moeframe.kernels.torch_reference:TorchReferenceKernel",
                "a test kernel",
                Capabilities(dtypes=("float32",)),
            )
        ]

    moeframe.register_plugin(SimpleNamespace(register_kernels=register_kernels), "fp32-only-kernel", "0.1")
    model = tiny_model("mixtral", torch.bfloat16)
    with pytest.raises(
        StackError,
        match=r"^model\.layers\.0\.mlp: (transformers:mixtral: )?stack\.kernel: kernel 'fp32_only' does not "
        r"support model\.dtype = 'bfloat16' \(supports float32\); kernels that fit: ",
    ):
        patch_model(model, overrides={"stack.kernel": "fp32_only"})
    # all or nothing: no block stays patched
    assert not any(isinstance(m, PatchedLayer) for m in model.modules())
    patch_model(model.to(torch.float32), overrides={"stack.kernel": "fp32_only"})


# -- distributed ------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_two_ranks_hold_half_the_experts_and_compute_the_one_process_logits():
    from moeframe.testing import run_on_ranks

    cases = [
        {
            "id": f"{family}-{dispatcher}",
            "family": family,
            "overrides": {"parallel.ep_size": 2, "stack.dispatcher": dispatcher},
        }
        for family, dispatcher in (("deepseek_v3", "all2all"), ("gpt_oss", "allgather_reducescatter"))
    ]
    results = run_on_ranks(
        2,
        Path(__file__).with_name("hf_distributed_scenarios.py"),
        "patched_with_experts_spread",
        timeout=240,
        cases=cases,
    )
    for rank in results:
        assert [r["case"] for r in rank] == [c["id"] for c in cases]
        for r in rank:
            assert r["max_abs_error"] < 1e-4 and r["router_logits_error"] < 1e-4, r
            assert r["same_tokens"], r
            assert r["experts_held"] * 2 == r["experts_total"], r
    assert results[0][0]["stack"][-2] == "all2all" and results[0][1]["stack"][-2] == "allgather_reducescatter"


@pytest.mark.distributed
def test_data_and_expert_parallel_ranks_with_their_own_prompts_compute_the_one_process_logits():
    """dp_size = ep_size = 2: each rank gives the HF model prompts of its own (another batch
    size and length, so the ranks dispatch different token counts) while the experts are
    spread over both; each rank's logits, router logits and greedy tokens are the
    unpatched model's on its prompts."""
    from moeframe.testing import run_on_ranks

    cases = [
        {
            "id": f"{family}-{dispatcher}",
            "family": family,
            "per_rank_inputs": True,
            "overrides": {"parallel.dp_size": 2, "parallel.ep_size": 2, "stack.dispatcher": dispatcher},
        }
        for family, dispatcher in (("qwen2_moe", "all2all"), ("mixtral", "allgather_reducescatter"))
    ]
    results = run_on_ranks(
        2,
        Path(__file__).with_name("hf_distributed_scenarios.py"),
        "patched_with_experts_spread",
        timeout=240,
        cases=cases,
    )
    assert results[0][0]["tokens_in"] != results[1][0]["tokens_in"]  # the ranks' prompts differ
    for rank in results:
        assert [r["case"] for r in rank] == [c["id"] for c in cases]
        for r in rank:
            assert r["max_abs_error"] < 1e-4 and r["router_logits_error"] < 1e-4, r
            assert r["same_tokens"], r
            assert r["experts_held"] * 2 == r["experts_total"], r
