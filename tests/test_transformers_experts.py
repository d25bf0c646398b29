"""moeframe's kernels as transformers experts implementations (issue 10, section 1).

Every family whose experts transformers routes through ``ExpertsInterface`` (all but
Llama-4) runs with ``moeframe:fused_cpu``, ``moeframe:torch`` and ``moeframe``; logits
are compared with transformers' default implementation and greedy generation with it.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from hf_models import FAMILIES, MOE_LAYERS, tiny_config, tiny_inputs, tiny_model

import moeframe
from moeframe.integrations.transformers import experts as hf_experts
from moeframe.integrations.transformers.experts import STATE_ATTRIBUTE, register_experts

#: the families whose experts module goes through transformers' ExpertsInterface
INTERFACE_FAMILIES = tuple(f for f in FAMILIES if f != "llama4")
KERNELS = ("moeframe:fused_cpu", "moeframe:torch")
#: logits tolerance, relative to the largest |logit| of the reference.  bf16: transformers'
#: own implementations differ from each other by up to ~0.6% of the scale on these models
#: (eager accumulates in bf16, grouped_mm in fp32); moeframe accumulates in fp32.
LOGITS_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def _registered():
    register_experts()


def _experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "has_gate")]


def _logits(model, impl, x):
    model.set_experts_implementation(impl)
    with torch.no_grad():
        return model(x).logits.float()


def _generate(model, impl, x):
    model.set_experts_implementation(impl)
    with torch.no_grad():
        return model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)


def _check_greedy(model, x, ref, got, dtype):
    """Identical tokens; in bf16, a first difference is accepted only where the reference's
    two best logits are within the logits tolerance of each other (a tie at the dtype's
    resolution, which any change in summation order may break either way)."""
    if torch.equal(ref, got):
        return
    assert dtype == torch.bfloat16, f"greedy tokens differ in {dtype}:\n{ref}\n{got}"
    for b in range(ref.shape[0]):
        diff = (ref[b] != got[b]).nonzero()
        if not len(diff):
            continue
        i = int(diff[0])
        with torch.no_grad():
            logits = model(ref[b : b + 1, :i]).logits[0, -1].float()
        top2 = logits.topk(2).values
        scale = logits.abs().max()
        gap = float(top2[0] - top2[1])
        assert gap <= LOGITS_RTOL[dtype] * scale, (
            f"row {b}: greedy token {i} differs although the reference's best logit leads by {gap:.4f}"
        )


# -- registration ---------------------------------------------------------------------------
def test_every_kernel_is_registered_under_its_name():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    keys = register_experts()
    kernels = moeframe.get_registry().names("kernel")
    assert keys == ["moeframe"] + [f"moeframe:{k}" for k in kernels]
    assert {"moeframe:fused_cpu", "moeframe:torch"} <= set(keys)
    for key in keys:
        assert key in ALL_EXPERTS_FUNCTIONS
    assert register_experts() == keys  # again: harmless


def test_a_third_party_kernel_is_registered_and_used():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moeframe.kernels.torch_reference import TorchReferenceKernel

    calls = []

    class CountingKernel(TorchReferenceKernel):
        def __call__(self, hidden_states, topk_weights, topk_ids, experts):
            calls.append(hidden_states.shape[0])
            return super().__call__(hidden_states, topk_weights, topk_ids, experts)

    class Plugin:
        @moeframe.hookimpl
        def register_kernels(self):
            return [moeframe.Strategy("counting", CountingKernel, "counts its calls")]

    moeframe.register_plugin(Plugin(), "counting-plugin")
    try:
        assert "moeframe:counting" in register_experts()
        model = tiny_model("qwen3_moe")
        x = tiny_inputs()
        ref = _logits(model, "eager", x)
        got = _logits(model, "moeframe:counting", x)
        assert calls == [x.numel()] * len(MOE_LAYERS["qwen3_moe"])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    finally:
        moeframe.plugins.reset()
        register_experts()  # the plugin is gone: so is its key
    assert "moeframe:counting" not in ALL_EXPERTS_FUNCTIONS


# -- numerics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", INTERFACE_FAMILIES)
def test_logits_and_greedy_tokens_match_transformers(family, dtype):
    model = tiny_model(family, dtype)
    x = tiny_inputs()
    default = model.config._experts_implementation  # transformers' default (grouped_mm here)
    ref = _logits(model, default, x)
    ref_tokens = _generate(model, default, x)
    scale = float(ref.abs().max())
    for impl in KERNELS:
        got = _logits(model, impl, x)
        err = float((got - ref).abs().max())
        assert err <= LOGITS_RTOL[dtype] * scale, f"{impl}: max |logits error| {err:.3e} at scale {scale:.2f}"
        model.set_experts_implementation(default)
        _check_greedy(model, x, ref_tokens, _generate(model, impl, x), dtype)
    # every experts module ran moeframe's kernel (not transformers' fallback)
    for module in _experts_modules(model):
        runners = getattr(module, STATE_ATTRIBUTE).runners
        assert {key for key, _, _ in runners} >= set(KERNELS)


def test_from_config_selects_the_implementation():
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config("mixtral"), experts_implementation="moeframe:fused_cpu"
    ).eval()
    assert model.config._experts_implementation == "moeframe:fused_cpu"
    x = tiny_inputs(batch=1, length=5)
    got = _logits(model, "moeframe:fused_cpu", x)
    ref = _logits(model, "eager", x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_moeframe_is_the_fast_kernel_of_the_device():
    model = tiny_model("qwen3_moe")
    _logits(model, "moeframe", tiny_inputs())
    for module in _experts_modules(model):
        (runner,) = getattr(module, STATE_ATTRIBUTE).runners.values()
        assert runner.name == "fused_cpu"


@pytest.mark.parametrize("tokens", [0, 1])
def test_zero_and_one_token(tokens):
    model = tiny_model("gpt_oss")
    experts = _experts_modules(model)[0]
    model.set_experts_implementation("moeframe:fused_cpu")
    x = torch.randn(tokens, model.config.hidden_size)
    ids = torch.zeros(tokens, 2, dtype=torch.long)
    ids[:, 1] = 1
    weights = torch.full((tokens, 2), 0.5)
    with torch.no_grad():
        got = experts(x, ids, weights)
        model.set_experts_implementation("eager")
        ref = experts(x, ids, weights)
    assert got.shape == (tokens, model.config.hidden_size)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# -- weights: in place where the layout agrees, converted once otherwise ---------------------------------
def test_weights_are_used_in_place_where_the_layout_agrees():
    model = tiny_model("qwen3_moe")
    _logits(model, "moeframe:fused_cpu", tiny_inputs())
    for module in _experts_modules(model):
        runner = getattr(module, STATE_ATTRIBUTE).runners["moeframe:fused_cpu", "cpu", torch.float32]
        experts = runner.experts()
        assert experts.w13.data_ptr() == module.gate_up_proj.data_ptr()
        assert experts.w2.data_ptr() == module.down_proj.data_ptr()
        assert runner.conversions == 0


def test_gpt_oss_conversion_happens_once_and_again_after_new_weights():
    model = tiny_model("gpt_oss")
    x = tiny_inputs()
    for _ in range(3):
        _logits(model, "moeframe:fused_cpu", x)
    modules = _experts_modules(model)
    runners = [getattr(m, STATE_ATTRIBUTE).runners["moeframe:fused_cpu", "cpu", torch.float32] for m in modules]
    assert [r.conversions for r in runners] == [1] * len(modules)
    # new weights through load_state_dict (an in-place write): converted again, and used
    state = {k: v * 1.5 if "experts" in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    got = _logits(model, "moeframe:fused_cpu", x)
    assert [r.conversions for r in runners] == [2] * len(modules)
    torch.testing.assert_close(got, _logits(model, "eager", x), atol=1e-4, rtol=1e-4)


def test_the_state_is_not_part_of_the_state_dict():
    model = tiny_model("gpt_oss")
    before = set(model.state_dict())
    _logits(model, "moeframe:fused_cpu", tiny_inputs())
    assert set(model.state_dict()) == before


# -- what the light way does not cover ---------------------------------------------------------------------
def test_llama4_experts_do_not_go_through_the_interface():
    """transformers 5's Llama-4 experts module has no ``@use_experts_implementation``:
    the light way does not reach it (patch_model does); documented in docs/transformers.md."""
    model = tiny_model("llama4")
    x = tiny_inputs()
    with torch.no_grad():
        before = model(x).logits
    model.set_experts_implementation("moeframe:fused_cpu")  # accepted by transformers, and without effect
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    assert not any(STATE_ATTRIBUTE in m.__dict__ for m in model.modules())


def test_gradients_are_not_computed_and_the_user_is_told_once():
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("moeframe:fused_cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(tiny_inputs())
        model(tiny_inputs())
    messages = [str(w.message) for w in caught if "inference" in str(w.message)]
    assert len(messages) == len(MOE_LAYERS["qwen3_moe"])  # once per experts module
    assert "torch.no_grad()" in messages[0]


# -- bad input -------------------------------------------------------------------------------------------
def test_register_experts_leaves_transformers_classes_as_they_are():
    from transformers.integrations.moe import ExpertsInterface
    from transformers.modeling_utils import PreTrainedModel

    register_experts()
    for method in (PreTrainedModel.get_correct_experts_implementation, ExpertsInterface.get_interface):
        assert method.__module__.startswith("transformers.")
        assert not hasattr(method, "_moeframe_hint")
        assert "moeframe" not in method.__qualname__


def test_unknown_kernel_at_construction_is_transformers_own_error_listing_moeframes_names():
    import transformers

    with pytest.raises(ValueError) as info:
        transformers.AutoModelForCausalLM.from_config(
            tiny_config("qwen3_moe"), experts_implementation="moeframe:fused_cpux"
        )
    message = str(info.value)
    assert message.startswith('Specified `experts_implementation="moeframe:fused_cpux"` is not supported')
    assert '`experts_implementation="moeframe:fused_cpu"`' in message  # the registered names are listed
    assert "\n" not in message


def test_unknown_kernel_when_switching_is_transformers_own_error():
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match=r'experts_implementation="moeframe:torhc"` is not supported'):
        model.set_experts_implementation("moeframe:torhc")


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("moeframe:fused_cpux", "moeframe:fused_cpu"), ("moeframe:torhc", "moeframe:torch"), ("grouped", "grouped_mm")],
)
def test_check_experts_implementation_gives_the_did_you_mean(name, suggestion):
    with pytest.raises(moeframe.UserError) as info:
        hf_experts.check_experts_implementation(name)
    message = str(info.value)
    assert f"{name!r} is not an experts implementation transformers knows; did you mean {suggestion!r}?" in message
    assert "moeframe:fused_cpu" in message.split("known: ")[1] and "\n" not in message


@pytest.mark.parametrize("name", ["moeframe", "moeframe:torch", "eager", "grouped_mm"])
def test_check_experts_implementation_passes_known_names(name):
    assert hf_experts.check_experts_implementation(name) == name


def test_check_experts_implementation_of_a_kernel_registered_after_register_experts():
    from transformers.integrations.moe import ExpertsInterface

    removed = ExpertsInterface._global_mapping.pop("moeframe:torch")
    try:
        with pytest.raises(
            moeframe.UserError, match=r"'moeframe:torch' is moeframe's but not registered in transformers yet"
        ):
            hf_experts.check_experts_implementation("moeframe:torch")
    finally:
        ExpertsInterface._global_mapping["moeframe:torch"] = removed
    with pytest.raises(moeframe.UserError, match="expected a name"):
        hf_experts.check_experts_implementation(None)  # type: ignore[arg-type]


def test_a_dtype_no_kernel_supports_names_the_module():
    model = tiny_model("qwen3_moe").to(torch.float64)
    model.set_experts_implementation("moeframe:fused_cpu")
    with (
        pytest.raises(
            moeframe.StackError, match=r"Qwen3MoeExperts \(experts implementation 'moeframe:fused_cpu'\).*float64"
        ),
        torch.no_grad(),
    ):
        model(tiny_inputs())


def test_kernel_for_key():
    assert hf_experts.kernel_for_key("moeframe") is None
    assert hf_experts.kernel_for_key("moeframe:torch") == "torch"
    with pytest.raises(moeframe.UserError, match=r"did you mean 'moeframe:torch'"):
        hf_experts.kernel_for_key("moeframe:troch")


# -- the end-to-end benchmark (section 4): it runs, checks tokens and writes its table -----------------
TINY_E2E = [
    "--layers",
    "2",
    "--hidden",
    "64",
    "--experts",
    "8",
    "--top-k",
    "2",
    "--intermediate",
    "32",
    "--vocab",
    "128",
    "--heads",
    "4",
    "--kv-heads",
    "2",
    "--prompt",
    "12",
    "--new-tokens",
    "3",
    "--repeat",
    "1",
]


def test_e2e_benchmark_runs_every_path_and_writes_its_section(tmp_path, capsys):
    from moeframe_bench import e2e

    page = tmp_path / "performance.md"
    page.write_text(f"# Performance\n\nintro\n\n{e2e.MARKDOWN_BEGIN}\nold table\n{e2e.MARKDOWN_END}\n\n## after\n")
    out_json = tmp_path / "e2e.json"
    assert (
        e2e.main([*TINY_E2E, "--dtype", "float32", "--profile", "--json", str(out_json), "--markdown", str(page)]) == 0
    )
    result = json.loads(out_json.read_text())
    section = result["dtypes"]["float32"]
    assert set(section["paths"]) == set(e2e.HF_PATHS + e2e.OWN_PATHS)
    assert len(section["reference_tokens"]) == 4  # the prefill's token and 3 decode steps
    for name, entry in section["paths"].items():
        assert entry["identical"], name  # fp32: the same greedy tokens on every path
        assert len(entry["decode"]) == 1
        assert len(entry["prefill"]) == (0 if name == "batched_mm" else 1)
    assert "prefill_skipped" in section["paths"]["batched_mm"]
    assert section["best_hf_prefill"] in ("eager", "grouped_mm")
    assert set(section["profile"]) >= {"patch_model(fused_cpu)"}
    text = page.read_text()
    assert "old table" not in text and text.startswith("# Performance\n\nintro\n") and text.endswith("## after\n")
    assert "| float32 | patch_model(fused_cpu) |" in text and "not measured" in text  # batched_mm's prefill
    assert "| float32 | patch_model(fused_cpu) |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "float64"], "--dtype: unknown dtype 'float64'"),
        (["--paths", "grouped"], "--paths: unknown path 'grouped'; did you mean 'grouped_mm'?"),
        (["--heads", "5"], "--hidden (64) must divide by --heads (5)"),
        (["--top-k", "9"], "--top-k (9) must be <= --experts (8)"),
        (["--json", "/nonexistent-dir/e2e.json"], "the folder '/nonexistent-dir' does not exist"),
    ],
)
def test_e2e_benchmark_bad_options_are_one_line_exit_2(args, message, capsys):
    from moeframe_bench import e2e

    assert e2e.main([*TINY_E2E, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moeframe: error: {err.removeprefix('moeframe: error: ')}" and message in err and "\n" not in err


def test_e2e_benchmark_refuses_zero_repeats(capsys):
    from moeframe_bench import e2e

    with pytest.raises(SystemExit) as info:
        e2e.main([*TINY_E2E, "--repeat", "0"])
    assert info.value.code == 2
    assert "--repeat: must be >= 1" in capsys.readouterr().err


def test_a_model_made_under_inference_mode():
    with torch.inference_mode():
        model = tiny_model("gpt_oss")
        x = tiny_inputs()
        ref = _logits(model, "eager", x)
        got = _logits(model, "moeframe:fused_cpu", x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
