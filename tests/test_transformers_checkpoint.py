"""One MoE layer from a transformers checkpoint directory (issue 10, section 3).

The checkpoints are written by ``save_pretrained`` of tiny random models of each family,
in the tests (nothing is downloaded), unsharded and sharded (``max_shard_size``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from hf_models import FAMILIES, MOE_LAYERS, tiny_model

import moeframe
from moeframe.cli.main import main
from moeframe.config import ParallelConfig
from moeframe.errors import InputError
from moeframe.integrations.transformers import checkpoint as ckpt
from moeframe.parallel import CountingCollectives, ParallelContext

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def load_hf(checkpoint_dir, layer=None, **kwargs):
    return moeframe.MoELayer.load_hf(checkpoint_dir, layer, **kwargs)


def hf_block(model, layer):
    decoder = model.model.layers[layer]
    return decoder.feed_forward if hasattr(decoder, "feed_forward") else decoder.mlp


def block_output(block, x):
    with torch.no_grad():
        out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (model, {"unsharded": dir, "sharded": dir}), written once for the module."""
    out = {}
    for family in FAMILIES:
        model = tiny_model(family)
        dirs = {}
        for layout, kwargs in (("unsharded", {}), ("sharded", {"max_shard_size": "4KB"})):
            path = tmp_path_factory.mktemp(f"{family}-{layout}")
            model.save_pretrained(path, **kwargs)
            dirs[layout] = path
        out[family] = (model, dirs)
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_tensors(path: Path, change) -> None:
    """Rewrite one safetensors file with ``change(tensors)`` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# -- equal to the HF block -------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["unsharded", "sharded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_equals_the_hf_block(saved, family, layout):
    model, dirs = saved[family]
    path = dirs[layout]
    if layout == "sharded":
        assert (path / ckpt.INDEX_FILE).is_file() and len(list(path.glob("*.safetensors"))) > 1
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    for layer in MOE_LAYERS[family]:
        moe = load_hf(path, layer)
        assert moe.config.source == f"{path} (layer {layer})"
        with torch.no_grad():
            got = moe(x)
        torch.testing.assert_close(got, block_output(hf_block(model, layer), x), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_bf16_checkpoint(tmp_path, family):
    model = tiny_model(family, torch.bfloat16)
    model.save_pretrained(tmp_path)
    layer = MOE_LAYERS[family][-1]
    moe = load_hf(tmp_path, layer)
    assert moe.config.model.dtype == "bfloat16"
    x = torch.randn(6, model.config.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        got = moe(x)
    torch.testing.assert_close(got, block_output(hf_block(model, layer), x), **TOLERANCE[torch.bfloat16])


def test_first_moe_layer_by_default_and_overrides_apply(saved):
    _, dirs = saved["deepseek_v3"]
    moe = load_hf(dirs["unsharded"], overrides={"stack.kernel": "torch"})
    assert moe.config.source.endswith("(layer 1)")
    assert moe.config.stack.kernel.name == "torch"


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_load_hf_reads_into_the_layer_without_initialising_it(saved, family, monkeypatch):
    """No seeded initialisation (then overwritten): every tensor is read straight into the
    layer, and the layer holds the tensors it was given (no second copy)."""
    import moeframe.layer
    import moeframe.weights

    def refuse(*args, **kwargs):
        raise AssertionError("load_hf initialised a tensor")

    monkeypatch.setattr(moeframe.layer, "materialize", refuse)
    monkeypatch.setattr(moeframe.weights, "materialize", refuse)
    given: dict[str, int] = {}
    original = ckpt._read_layer

    def spy(*args, **kwargs):
        tensors = original(*args, **kwargs)
        given.update({name: t.data_ptr() for name, t in tensors.items()})
        return tensors

    monkeypatch.setattr(ckpt, "_read_layer", spy)
    model, dirs = saved[family]
    layer = MOE_LAYERS[family][-1]
    moe = load_hf(dirs["sharded"], layer)
    assert given == {name: t.data_ptr() for name, t in moe.tensors.items()}
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block_output(hf_block(model, layer), x), **TOLERANCE[torch.float32])


def test_load_hf_checks_the_memory_before_reading(saved, monkeypatch):
    import moeframe.memory

    def refuse(*args, **kwargs):
        raise AssertionError("read before the memory check")

    monkeypatch.setattr(ckpt, "_read_layer", refuse)
    monkeypatch.setattr(moeframe.memory, "available_bytes", lambda device: 1024)
    with pytest.raises(InputError, match=r"the layer needs about .* but 1\.0 KiB is available"):
        load_hf(saved["qwen3_moe"][1]["unsharded"], 1)


def test_each_rank_reads_only_its_experts(saved, monkeypatch):
    model, dirs = saved["qwen3_moe"]
    read: list[str] = []
    original = ckpt._Files.tensor

    def spy(self, key, expected=None):
        read.append(key)
        return original(self, key, expected)

    monkeypatch.setattr(ckpt._Files, "tensor", spy)
    ctx = ParallelContext(ParallelConfig(ep_size=2), rank=1, world_size=2, collectives=CountingCollectives())
    moe = load_hf(dirs["sharded"], 1, overrides={"parallel.ep_size": 2}, parallel=ctx)
    local = ctx.local_experts(model.config.num_experts)
    assert local == [4, 5, 6, 7]
    experts_read = {int(k.split(".experts.")[1].split(".")[0]) for k in read if ".experts." in k}
    assert experts_read == set(local)
    assert all(k.startswith("model.layers.1.mlp.") for k in read)  # nothing of other layers
    hf_experts = hf_block(model, 1).experts
    torch.testing.assert_close(moe.tensors["experts.w13"], hf_experts.gate_up_proj[local].detach())
    torch.testing.assert_close(moe.tensors["experts.w2"], hf_experts.down_proj[local].detach())


def test_fused_experts_are_read_one_slice_per_local_expert(saved, monkeypatch):
    model, dirs = saved["gpt_oss"]
    rows: list[tuple[str, int]] = []
    original = ckpt._Files.rows

    def spy(self, key, index, expected):
        rows.append((key, index))
        return original(self, key, index, expected)

    monkeypatch.setattr(ckpt._Files, "rows", spy)
    ctx = ParallelContext(ParallelConfig(ep_size=2), rank=0, world_size=2, collectives=CountingCollectives())
    load_hf(dirs["unsharded"], 0, overrides={"parallel.ep_size": 2}, parallel=ctx)
    assert sorted({i for _, i in rows}) == ctx.local_experts(model.config.num_local_experts) == [0, 1]


# -- bad input -----------------------------------------------------------------------------------------
def test_directory_without_config_json(tmp_path):
    with pytest.raises(InputError, match=r"no config\.json; a transformers checkpoint directory holds config\.json"):
        load_hf(tmp_path, 1)


def test_missing_directory(tmp_path):
    with pytest.raises(InputError, match=r"checkpoint directory .* not found"):
        load_hf(tmp_path / "nope", 1)


def test_a_dense_layer_says_which_layers_are_moe(saved):
    _, dirs = saved["deepseek_v3"]
    with pytest.raises(InputError, match=r"layer 0 is not an MoE layer \(the model is dense\); its MoE layers: 1$"):
        load_hf(dirs["unsharded"], 0)


def test_a_layer_out_of_range(saved):
    _, dirs = saved["mixtral"]
    with pytest.raises(
        InputError,
        match=r"layer 7 is not an MoE layer \(the model has 2 decoder layers \(0\.\.1\)\); its MoE layers: 0-1",
    ):
        load_hf(dirs["unsharded"], 7)


@pytest.mark.parametrize("method", ["fp8", "mxfp4"])
def test_quantized_checkpoint_is_refused_naming_the_quantization(saved, tmp_path, method):
    _, dirs = saved["gpt_oss"]
    path = copy_checkpoint(dirs["unsharded"], tmp_path / "q")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        InputError, match=rf"the checkpoint is quantized \(quantization_config\.quant_method = '{method}'\)"
    ):
        load_hf(path, 0)


def test_missing_expert_tensor_names_the_tensor_and_the_files(saved, tmp_path):
    _, dirs = saved["mixtral"]
    path = copy_checkpoint(dirs["unsharded"], tmp_path / "m")
    rewrite_tensors(path / "model.safetensors", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(InputError) as info:
        load_hf(path, 1)
    message = str(info.value)
    assert "missing tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'" in message
    assert message.endswith("in model.safetensors")


def test_missing_fused_tensor_names_the_tensor(saved, tmp_path):
    _, dirs = saved["gpt_oss"]
    path = copy_checkpoint(dirs["unsharded"], tmp_path / "g")
    rewrite_tensors(path / "model.safetensors", lambda t: t.pop("model.layers.0.mlp.experts.down_proj_bias"))
    with pytest.raises(
        InputError, match=r"no tensor for 'model\.layers\.0\.mlp\.experts\.down_proj_bias' in model\.safetensors"
    ):
        load_hf(path, 0)


def test_misshaped_expert_tensor_names_the_tensor_and_the_file(saved, tmp_path):
    _, dirs = saved["qwen3_moe"]
    path = copy_checkpoint(dirs["sharded"], tmp_path / "s")
    index = json.loads((path / ckpt.INDEX_FILE).read_text())["weight_map"]
    key = "model.layers.0.mlp.experts.5.up_proj.weight"
    shard = index[key]

    def shrink(tensors):
        tensors[key] = tensors[key][:, :-1].contiguous()

    rewrite_tensors(path / shard, shrink)
    with pytest.raises(InputError, match=rf"{shard}: tensor '{key}' has shape \[16, 31\], expected \[16, 32\]$"):
        load_hf(path, 0)


def test_unsupported_family_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_hidden_layers": 2}))
    with pytest.raises(moeframe.ConfigError, match=r"supported families: mixtral, qwen2_moe"):
        load_hf(tmp_path, 0)


def test_no_safetensors(saved, tmp_path):
    _, dirs = saved["qwen3_moe"]
    path = tmp_path / "c"
    path.mkdir()
    (path / "config.json").write_bytes((dirs["unsharded"] / "config.json").read_bytes())
    with pytest.raises(InputError, match=r"no \*\.safetensors file"):
        load_hf(path, 0)


# -- the command line ------------------------------------------------------------------------------------
def test_run_on_a_checkpoint_directory(saved, capsys):
    _, dirs = saved["qwen2_moe"]
    assert main(["run", str(dirs["sharded"]), "--layer", "1", "--tokens", "5", "--repeat", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == f"{dirs['sharded']} (layer 1)"
    assert result["ok"] and result["tokens"] == 5
    assert result["stack"][0]["name"] == "shared_experts"


def test_run_output_equals_the_hf_block(saved, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model, dirs = saved["gpt_oss"]
    x = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    save_file({"hidden_states": x}, str(tmp_path / "x.safetensors"))
    args = [
        "run",
        str(dirs["unsharded"]),
        "--layer",
        "1",
        "--input",
        str(tmp_path / "x.safetensors"),
        "--output",
        str(tmp_path / "y.safetensors"),
        "--repeat",
        "1",
    ]
    assert main(args) == 0
    got = load_file(str(tmp_path / "y.safetensors"))["output"]
    torch.testing.assert_close(got, block_output(hf_block(model, 1), x), **TOLERANCE[torch.float32])


def test_run_on_a_dense_layer_is_one_line_exit_2(saved, capsys):
    _, dirs = saved["deepseek_v3"]
    assert main(["run", str(dirs["unsharded"]), "--layer", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("layer 0 is not an MoE layer (the model is dense); its MoE layers: 1")
    assert "\n" not in err and err.startswith("moeframe: error: ")


def test_layer_must_be_an_integer(saved, capsys):
    _, dirs = saved["deepseek_v3"]
    with pytest.raises(SystemExit) as info:
        main(["run", str(dirs["unsharded"]), "--layer", "x"])
    assert info.value.code == 2
    assert "--layer" in capsys.readouterr().err


def test_run_on_a_directory_without_config_json(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--layer", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no config.json" in err and "\n" not in err


def test_layer_option_needs_a_checkpoint_directory(capsys):
    assert main(["run", "qwen3-moe", "--layer", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--layer" in err and "checkpoint directory" in err and "\n" not in err


def test_check_kernels_on_a_checkpoint_layer(saved, capsys):
    _, dirs = saved["gpt_oss"]
    args = [
        "check",
        str(dirs["sharded"]),
        "fused_cpu",
        "torch",
        "--layer",
        "1",
        "--tokens",
        "0,1,9",
        "--dtype",
        "float32",
        "--dtype",
        "bfloat16",
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"]
    assert [(k["kernel"], k["cases"], k["failed"]) for k in report["kernels"]] == [
        ("fused_cpu", 6, []),
        ("torch", 6, []),
    ]


def test_check_layer_option_needs_a_checkpoint_directory(capsys):
    assert main(["check", "fused_cpu", "--layer", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--layer applies to a transformers checkpoint directory" in err and "\n" not in err


def test_explain_a_checkpoint_layer(saved, capsys):
    _, dirs = saved["qwen2_moe"]
    assert main(["explain", str(dirs["unsharded"]), "--layer", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"] == f"{dirs['unsharded']} (layer 1)"
    assert info["config"]["model"]["num_experts"] == 8
