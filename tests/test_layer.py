"""MoELayer: shapes, dtypes, weights (names, init, safetensors), layouts, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moeframe
from moeframe.errors import InputError, UserError
from moeframe.weights import convert_gpt_oss_experts, save_safetensors
from moeframe.testing import small_config


@pytest.mark.parametrize("preset", moeframe.list_presets())
@pytest.mark.parametrize("T", [0, 1, 7, 64])
def test_every_preset_matches_its_reference(preset, T):
    layer = moeframe.MoELayer(preset)
    x = torch.randn(T, layer.config.model.hidden_size)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert moeframe.compare(out, layer.reference()(x)).ok


def test_accepts_leading_dims_and_keeps_dtype():
    for dtype in ("float32", "bfloat16", "float16"):
        layer = moeframe.MoELayer(small_config(dtype=dtype))
        x = torch.randn(2, 3, 32).to(layer.config.model.torch_dtype)
        out = layer(x)
        assert out.shape == (2, 3, 32) and out.dtype == x.dtype
        torch.testing.assert_close(out.reshape(6, 32), layer(x.reshape(6, 32)))


def test_wrong_input_is_a_clear_error():
    layer = moeframe.MoELayer(small_config())
    with pytest.raises(InputError, match=r"hidden_states has shape \[4, 31\]; expected \[\.\.\., 32\] \(model.hidden_size\)"):
        layer(torch.randn(4, 31))
    with pytest.raises(InputError, match=r"hidden_states is torch.float64, but the layer is float32"):
        layer(torch.randn(4, 32, dtype=torch.float64))


def test_tensor_names_shapes_and_determinism():
    config = moeframe.load_config("gpt-oss")
    layer = moeframe.MoELayer(config)
    m = config.model
    E, H, I = m.num_experts, m.hidden_size, m.intermediate_size
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "router.weight": (E, H), "router.bias": (E,),
        "experts.w13": (E, 2 * I, H), "experts.w2": (E, H, I), "experts.b13": (E, 2 * I), "experts.b2": (E, H),
    }
    again = moeframe.MoELayer(config)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    other = moeframe.MoELayer(config.evolve({"seed": 1}))
    assert not torch.equal(layer.state_dict()["experts.w13"], other.state_dict()["experts.w13"])
    assert all(not p.requires_grad for p in layer.parameters())


def test_deepseek_and_qwen2_tensor_names():
    ds = moeframe.MoELayer("deepseek-v3").state_dict()
    assert {"router.e_score_correction_bias", "shared.w13", "shared.w2"} <= set(ds)
    assert ds["router.e_score_correction_bias"].dtype == torch.float32
    qwen2 = moeframe.MoELayer("qwen2-moe").state_dict()
    assert tuple(qwen2["shared.gate.weight"].shape) == (1, 256) and tuple(qwen2["shared.w13"].shape) == (1024, 256)


def test_save_and_load_round_trip(tmp_path: Path):
    layer = moeframe.MoELayer("deepseek-v3")
    path = tmp_path / "w.safetensors"
    layer.save_weights(path)
    other = moeframe.MoELayer("deepseek-v3", overrides={"seed": 5})
    x = torch.randn(9, 256)
    assert not torch.allclose(other(x), layer(x))
    other.load_weights(path)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_load_errors_name_the_tensor(tmp_path: Path):
    layer = moeframe.MoELayer(small_config())
    good = dict(layer.state_dict())
    cases = {
        "missing": ({k: v for k, v in good.items() if k != "experts.w2"}, r"missing tensor 'experts.w2' of shape \[8, 32, 16\]"),
        "shape": ({**good, "experts.w13": torch.zeros(8, 30, 32)}, r"tensor 'experts.w13' has shape \[8, 30, 32\], expected \[8, 32, 32\]"),
        "extra": ({**good, "experts.w3": torch.zeros(1)}, r"unexpected tensor 'experts.w3'"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(tensors, path)
        with pytest.raises(InputError, match=message):
            layer.load_weights(path)
    with pytest.raises(InputError, match=r"weights file '.*nope.safetensors' not found"):
        layer.load_weights(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match=r"not a readable safetensors file"):
        layer.load_weights(junk)


def test_loads_cast_to_the_layer_dtype(tmp_path: Path):
    layer32 = moeframe.MoELayer(small_config())
    path = tmp_path / "w.safetensors"
    layer32.save_weights(path)
    layer16 = moeframe.MoELayer(small_config(dtype="bfloat16"))
    layer16.load_weights(path)
    torch.testing.assert_close(layer16.state_dict()["experts.w13"], layer32.state_dict()["experts.w13"].bfloat16())


def gpt_oss_experts_reference(x, gate_up_proj, gate_up_bias, down_proj, down_bias, ids, weights, alpha=1.702, limit=7.0):
    """GPT-OSS's own expert math on its own layout (x @ W, interleaved gate/up)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gu = x[t] @ gate_up_proj[e] + gate_up_bias[e]
            gate, up = gu[0::2], gu[1::2]
            gate = gate.clamp(max=limit)
            up = up.clamp(-limit, limit)
            glu = gate * torch.sigmoid(gate * alpha)
            y = ((up + 1) * glu) @ down_proj[e] + down_bias[e]
            out[t] += weights[t, k] * y
    return out


def test_gpt_oss_layout_converts_on_load():
    E, H, I = 4, 16, 8
    g = torch.Generator().manual_seed(0)
    gate_up_proj = torch.randn(E, H, 2 * I, generator=g) * 0.3
    gate_up_bias = torch.randn(E, 2 * I, generator=g) * 0.1
    down_proj = torch.randn(E, I, H, generator=g) * 0.3
    down_bias = torch.randn(E, H, generator=g) * 0.1
    canonical = convert_gpt_oss_experts(gate_up_proj, gate_up_bias, down_proj, down_bias)
    assert tuple(canonical["experts.w13"].shape) == (E, 2 * I, H) and tuple(canonical["experts.w2"].shape) == (E, H, I)
    from moeframe.conformance import kernel_context
    from moeframe.config import ModelConfig
    from moeframe.kernels import ExpertWeights
    from moeframe.kernels.torch_reference import TorchReferenceKernel

    model = ModelConfig(num_experts=E, top_k=2, hidden_size=H, intermediate_size=I, activation="swigluoai", expert_bias=True)
    kernel = TorchReferenceKernel(kernel_context(model), None)
    x = torch.randn(5, H, generator=g)
    ids = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 1]])
    w = torch.softmax(torch.randn(5, 2, generator=g), -1)
    ours = kernel(x, w, ids, ExpertWeights(canonical["experts.w13"], canonical["experts.w2"], canonical["experts.b13"], canonical["experts.b2"]))
    torch.testing.assert_close(ours, gpt_oss_experts_reference(x, gate_up_proj, gate_up_bias, down_proj, down_bias, ids, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="GPT-OSS shapes do not fit"):
        convert_gpt_oss_experts(gate_up_proj, None, torch.zeros(E, I + 1, H), None)


def test_llama4_weight_applies_to_the_expert_input():
    layer = moeframe.MoELayer("llama4")
    x = torch.randn(6, 256)
    t = layer.tensors
    logits = x @ t["router.weight"].T
    ids = logits.argmax(-1)
    w = torch.sigmoid(logits.max(-1).values)
    expected = torch.zeros_like(x)
    for i in range(6):
        e = int(ids[i])
        h = (w[i] * x[i]) @ t["experts.w13"][e].T
        gate, up = h.chunk(2)
        expected[i] = (torch.nn.functional.silu(gate) * up) @ t["experts.w2"][e].T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_explain_reports_stack_and_memory():
    info = moeframe.MoELayer("qwen2-moe").explain()
    assert [p["kind"] for p in info["stack"]] == ["wrapper", "runner", "router", "dispatcher", "kernel"]
    assert info["stack"][0]["name"] == "shared_experts" and info["stack"][0]["provider"] == "builtin"
    assert info["expert_weight_bytes"] == 16 * 3 * 256 * 128 * 4
    assert info["config"]["model"]["num_experts"] == 16


def test_saving_needs_one_process():
    from moeframe.parallel import CountingCollectives, ParallelContext
    from moeframe.config import ParallelConfig

    ctx = ParallelContext(ParallelConfig(ep_size=2), rank=0, world_size=2, collectives=CountingCollectives())
    layer = moeframe.MoELayer(small_config(), overrides={"parallel.ep_size": 2}, parallel=ctx)
    with pytest.raises(UserError, match="save_weights works in one process"):
        layer.save_weights("/tmp/never-written.safetensors")
    assert not Path("/tmp/never-written.safetensors").exists()
