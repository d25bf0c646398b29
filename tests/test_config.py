"""Config loading, validation with key paths, overrides, presets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeframe.config import Config, list_presets, load_config, parse_override
from moeframe.errors import ConfigError
from moeframe.testing import small_config

PRESETS = ["deepseek-v3", "gpt-oss", "llama4", "mixtral", "qwen2-moe", "qwen3-moe"]


def test_presets_are_packaged_and_load():
    assert list_presets() == PRESETS
    for name in PRESETS:
        config = load_config(name)
        assert config.source == f"preset:{name}"
        assert load_config(config.to_dict()) == config  # round trip through plain data


def test_preset_contents_follow_the_reference_page():
    assert load_config("deepseek-v3").router.params.routed_scaling_factor == 2.5
    assert load_config("qwen2-moe").router.params.renormalize is False
    assert load_config("mixtral").router.params.weights_dtype == "float32"
    gpt = load_config("gpt-oss")
    assert (gpt.model.activation, gpt.model.expert_bias, gpt.router.name) == ("swigluoai", True, "topk_softmax")
    qwen2 = [w for w in load_config("qwen2-moe").stack.wrappers if w.name == "shared_experts"]
    ds = [w for w in load_config("deepseek-v3").stack.wrappers if w.name == "shared_experts"]
    assert qwen2[0].params.gated is True and ds[0].params.gated is False


def test_defaults_are_filled_in():
    config = load_config(small_config())
    d = config.to_dict()
    assert d["stack"]["runner"] == {"name": "default", "params": {}}
    assert d["stack"]["kernel"] == {"name": "torch", "params": {}}
    assert d["stack"]["dispatcher"] == {"name": "local", "params": {}}
    assert d["model"]["activation"] == "silu" and d["model"]["dtype"] == "float32"
    assert d["router"] == {"name": "softmax_topk", "params": {"renormalize": True, "weights_dtype": "float32"}}
    assert d["parallel"]["placement"] == "linear"


def test_toml_file_and_extends(tmp_path: Path):
    base = tmp_path / "base.toml"
    base.write_text(
        'seed = 3\n[model]\nnum_experts = 8\ntop_k = 2\nhidden_size = 16\nintermediate_size = 8\n'
        '[router]\nname = "softmax_topk"\nrenormalize = false\n'
    )
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[model]\ntop_k = 3\n[stack]\nwrappers = [{ name = "chunking", params = { max_num_tokens = 4 } }]\n')
    config = load_config(child)
    assert (config.seed, config.model.top_k, config.model.num_experts) == (3, 3, 8)
    assert config.router.params.renormalize is False
    assert config.stack.wrappers[0].params.max_num_tokens == 4
    on_preset = tmp_path / "p.toml"
    on_preset.write_text('extends = "qwen3-moe"\n[model]\ndtype = "bfloat16"\n')
    assert load_config(on_preset).model.num_experts == load_config("qwen3-moe").model.num_experts


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["stack.kernel=torch"], lambda c: c.stack.kernel.name == "torch"),
        (["model.dtype=bfloat16"], lambda c: c.model.dtype == "bfloat16"),
        (["model.top_k=3"], lambda c: c.model.top_k == 3),
        (["router.renormalize=false"], lambda c: c.router.params.renormalize is False),
        (['stack.wrappers=[{name="chunking", params={max_num_tokens=8}}]'], lambda c: c.stack.wrappers[0].params.max_num_tokens == 8),
        (['stack.wrappers=["chunking"]', "stack.wrappers[0].params.max_num_tokens=5"], lambda c: c.stack.wrappers[0].params.max_num_tokens == 5),
        (["seed=7"], lambda c: c.seed == 7),
        (["parallel.placement=round_robin"], lambda c: c.parallel.placement == "round_robin"),
    ],
)
def test_overrides(overrides, check):
    assert check(load_config(small_config(), overrides))


def test_overrides_as_mapping_and_evolve():
    config = load_config("qwen3-moe", {"model.dtype": "float16"})
    assert config.model.dtype == "float16"
    assert config.evolve({"model.dtype": "float32"}) == load_config("qwen3-moe")


def test_fingerprint_tracks_every_field():
    a = load_config("qwen3-moe")
    assert a.fingerprint() == load_config("qwen3-moe").fingerprint()
    assert a.fingerprint() != a.evolve({"stack.wrappers": ["chunking"]}).fingerprint()
    assert a.fingerprint() != a.evolve({"parallel.placement": "round_robin"}).fingerprint()


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        (small_config(), ["modle.top_k=2"], r"^modle: unknown key; did you mean 'model'\?"),
        (small_config(), ["model.top_k=9"], r"^model.top_k: 9 must be <= num_experts \(8\)"),
        (small_config(), ["model.top_k=0"], r"^model.top_k: 0 must be >= 1"),
        (small_config(), ["model.activation=swiglu"], r"^model.activation: 'swiglu' is not allowed; did you mean 'swigluoai'\?; choose one of"),
        (small_config(), ["model.dtype=fp32"], r"^model.dtype: 'fp32' is not allowed; choose one of: 'float32', 'bfloat16', 'float16'"),
        (small_config(), ['model.hidden_size="big"'], r"^model.hidden_size: expected an integer, got 'big'"),
        (small_config(), ["model.expert_bias=1"], r"^model.expert_bias: expected true or false, got 1"),
        (small_config(), ["model.hidden_sise=3"], r"^model.hidden_sise: unknown key; did you mean 'hidden_size'\?"),
        (small_config(), ["router.name=softmax_top"], r"^router.name: unknown router 'softmax_top'; did you mean 'softmax_topk'\?; available routers: .*`moeframe plugins` lists installed plugins"),
        (small_config(), ["router.renormalise=true"], r"^router.renormalise: unknown key; did you mean 'renormalize'\?"),
        (small_config(), ['stack.wrappers=["chunking", {name="chunkin"}]'], r"^stack.wrappers\[1\].name: unknown wrapper 'chunkin'; did you mean 'chunking'\?; available wrappers: .*chunking"),
        (small_config(), ['stack.wrappers=["chunkin"]'], r"^stack.wrappers\[0\]: unknown wrapper 'chunkin'; did you mean 'chunking'\?"),
        (small_config(), ['stack.wrappers=[{name="chunking", params={max_num_tokens=0}}]'], r"^stack.wrappers\[0\].params.max_num_tokens: 0 must be >= 1"),
        (small_config(), ['stack.wrappers=[{name="chunking", parms={}}]'], r"^stack.wrappers\[0\].parms: unknown key; did you mean 'params'\?"),
        (small_config(), ["stack.kernel=torchh"], r"^stack.kernel: unknown kernel 'torchh'; did you mean 'torch'\?"),
        (small_config(), ["stack.kernel_params.block=3"], r"^stack.kernel_params.block: unknown key; allowed keys: none"),
        (small_config(), ["stack.wrapers=[]"], r"^stack.wrapers: unknown key; did you mean 'wrappers'\?"),
        (small_config(), ["stack.wrappers[2].name=x"], r"^stack.wrappers\[2\]: no such item \(the list has 0\)"),
        (small_config(), ["parallel.placement=roundrobin"], r"^parallel.placement: 'roundrobin' is not allowed; did you mean 'round_robin'\?"),
        (small_config(), ["seed=1.5"], r"^seed: expected an integer, got 1.5"),
        ({"router": {"name": "softmax_topk"}}, [], r"^model: missing required table \[model\]"),
        ({"model": {"num_experts": 4, "top_k": 1, "hidden_size": 4}, "router": {"name": "softmax_topk"}}, [], r"^model.intermediate_size: missing required key"),
    ],
)
def test_errors_name_the_key_path(source, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(source, overrides)


def test_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nnum_experts = 8\ntop_k = 2\nhidden_size = 16\nintermediate_size = 8\nactivation = "relu"\n[router]\nname = "softmax_topk"\n')
    with pytest.raises(ConfigError, match=rf"^{bad}: model.activation: 'relu' is not allowed"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match=r"invalid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"config file '.*missing.toml' not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r"no config file or preset named 'qwen3moe'; did you mean 'qwen3-moe'\?"):
        load_config("qwen3moe")
    with pytest.raises(ConfigError, match=r"preset:qwen3-moe: model.dtype"):
        load_config("qwen3-moe", ["model.dtype=double"])


def test_parse_override():
    assert parse_override("stack.kernel=triton") == ("stack.kernel", "triton")
    assert parse_override("model.top_k = 4") == ("model.top_k", 4)
    assert parse_override('stack.wrappers=[{name="chunking"}]') == ("stack.wrappers", [{"name": "chunking"}])
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE"):
        parse_override("stack.kernel")


def test_config_is_frozen():
    config = load_config("mixtral")
    with pytest.raises(Exception):
        config.seed = 3  # type: ignore[misc]
    assert isinstance(config, Config)


# -- numbers: finite unless documented otherwise, documented ranges hold ------------------
NON_FINITE = ["nan", "inf", "-inf"]


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("model.swiglu_limit", ['model.activation="swigluoai"']),
        ("model.swiglu_alpha", ['model.activation="swigluoai"']),
        ("router.routed_scaling_factor", ['router.name="sigmoid_grouped_topk"']),
        ("parallel.timeout_s", []),
    ],
)
def test_float_options_refuse_non_finite_values(key, extra, value):
    key_re = key.replace(".", r"\.")
    with pytest.raises(ConfigError, match=rf"^{key_re}: {value} is not allowed: expected a finite number > 0"):
        load_config(small_config(), [*extra, f"{key}={value}"])


def test_non_finite_values_in_a_file_name_the_file(tmp_path: Path):
    conf = tmp_path / "nan.toml"
    conf.write_text('extends = "gpt-oss"\n[model]\nswiglu_limit = nan\n')
    with pytest.raises(ConfigError, match=rf"^{conf}: model.swiglu_limit: nan is not allowed"):
        load_config(conf)
    conf.write_text('extends = "deepseek-v3"\n[router]\nrouted_scaling_factor = -inf\n')
    with pytest.raises(ConfigError, match=r"router.routed_scaling_factor: -inf is not allowed"):
        load_config(conf)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('router.name="sigmoid_grouped_topk"', None),
        ("router.routed_scaling_factor=-1", r"^router.routed_scaling_factor: -1.0 must be > 0$"),
        ("router.routed_scaling_factor=0", r"^router.routed_scaling_factor: 0.0 must be > 0$"),
        ("model.swiglu_alpha=-1.702", r"^model.swiglu_alpha: -1.702 must be > 0$"),
        ("model.swiglu_limit=0", r"^model.swiglu_limit: 0.0 must be > 0$"),
        ("parallel.timeout_s=0", r"^parallel.timeout_s: 0.0 must be > 0$"),
        ("parallel.timeout_s=1e300", r"^parallel.timeout_s: 1e\+300 must be <= 31536000$"),
    ],
)
def test_float_options_hold_their_documented_ranges(override, message):
    overrides = ['router.name="sigmoid_grouped_topk"', override]
    if message is None:
        assert load_config(small_config(), overrides).router.params.routed_scaling_factor == 1.0
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(small_config(), overrides)


def test_an_integer_too_large_for_a_float_is_one_line():
    with pytest.raises(ConfigError, match=r"^model.swiglu_limit: an integer of 401 digits is too large for a number$"):
        load_config(small_config(), {"model.swiglu_limit": 10**400})


def test_direct_construction_is_checked_too():
    from moeframe.config import ModelConfig
    from moeframe.routers.sigmoid_grouped_topk import SigmoidGroupedTopKParams

    with pytest.raises(ValueError, match=r"nan is not allowed: expected a finite number > 0"):
        ModelConfig(num_experts=4, top_k=1, hidden_size=4, intermediate_size=4, swiglu_limit=float("nan"))
    with pytest.raises(ValueError, match=r"-2.0 must be > 0"):
        SigmoidGroupedTopKParams(routed_scaling_factor=-2.0)


@pytest.fixture
def third_party_wrapper():
    """A plugin's wrapper whose parameters use plain attrs fields, option() and finite=False."""
    import attrs

    import moeframe
    from moeframe.plugins import manager

    @attrs.frozen
    class Params:
        scale: float = 1.0  # a plain attrs field: finite all the same
        bound: float = moeframe.option(1.0, help="an upper bound", min=0.0)
        offset: float = moeframe.option(0.0, help="may be infinite (documented)", finite=False)
        limits: tuple[float, ...] = ()

    class Probe(moeframe.Wrapper):
        pass

    Probe.Params = Params

    class Plugin:
        @staticmethod
        @moeframe.hookimpl
        def register_wrappers():
            return [moeframe.Strategy("probe", Probe, "a probe with float parameters")]

    moeframe.register_plugin(Plugin(), "third-party-probe", "0.1")
    yield "probe"
    manager.reset()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("{ scale = nan }", r"^stack.wrappers\[0\].params.scale: nan is not allowed: expected a finite number$"),
        ("{ bound = inf }", r"^stack.wrappers\[0\].params.bound: inf is not allowed: expected a finite number >= 0$"),
        ("{ bound = -1.0 }", r"^stack.wrappers\[0\].params.bound: -1.0 must be >= 0$"),
        ("{ limits = [1.0, nan] }", r"^stack.wrappers\[0\].params.limits\[1\]: nan is not allowed"),
        ("{ offset = -inf }", None),
    ],
)
def test_third_party_params_get_the_same_checks(third_party_wrapper, params, message):
    override = f'stack.wrappers=[{{ name = "{third_party_wrapper}", params = {params} }}]'
    if message is None:
        assert load_config(small_config(), [override]).stack.wrappers[0].params.offset == float("-inf")
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(small_config(), [override])


# -- sources: encodings, extends chains, key paths ---------------------------------------
def test_a_non_utf8_file_is_one_line(tmp_path: Path):
    conf = tmp_path / "latin1.toml"
    conf.write_bytes('# caf\u00e9\nextends = "mixtral"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{conf}: not UTF-8 text \(byte 0xe9 at offset 5\); TOML files are UTF-8$"):
        load_config(conf)
    child = tmp_path / "child.toml"  # the same through 'extends'
    child.write_text('extends = "latin1.toml"\n')
    with pytest.raises(ConfigError, match=r"latin1.toml: not UTF-8 text"):
        load_config(child)


def _chain(tmp_path: Path, depth: int) -> Path:
    """conf0.toml extends conf1.toml ... extends conf{depth-1}.toml, which extends mixtral."""
    for i in range(depth):
        base = f"conf{i + 1}.toml" if i + 1 < depth else "mixtral"
        (tmp_path / f"conf{i}.toml").write_text(f'extends = "{base}"\nseed = {i}\n')
    return tmp_path / "conf0.toml"


def test_extends_chains_have_a_depth_limit(tmp_path: Path):
    from moeframe.config import MAX_EXTENDS_DEPTH

    deep = _chain(tmp_path, 1200)
    with pytest.raises(ConfigError, match=rf"extends: more than {MAX_EXTENDS_DEPTH} configs in one 'extends' chain"):
        load_config(deep)
    (tmp_path / "ok").mkdir()
    longest = load_config(_chain(tmp_path / "ok", MAX_EXTENDS_DEPTH - 1))  # with mixtral: the limit exactly
    assert longest.seed == 0 and longest.model == load_config("mixtral").model


def test_circular_extends_through_different_spellings(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.toml").write_text('extends = "sub/b.toml"\n')
    (tmp_path / "sub" / "b.toml").write_text('extends = "../a.toml"\n')
    with pytest.raises(ConfigError, match=r"extends: circular 'extends' through"):
        load_config(tmp_path / "a.toml")


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("model..top_k", "after 'model.'"),
        (".seed", "at the start"),
        ("seed.", "at the end"),
        ("stack.wrappers.[0].name", "after 'stack.wrappers.'"),
    ],
)
def test_key_paths_with_empty_keys_are_refused(key, where):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: not a key path: empty key {re.escape(where)}"):
        load_config(small_config(), [f"{key}=2"])
    with pytest.raises(ConfigError, match=r"not a key path"):  # the same as a mapping
        load_config(small_config(), {key: 2})


@pytest.mark.parametrize("key", ["stack.wrappers[x]", "stack.wrappers[-1]", "stack.wrappers[0]name"])
def test_key_paths_with_bad_indices_are_refused(key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: not a key path"):
        load_config(small_config(), ['stack.wrappers=["chunking"]', f"{key}=2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "model..top_k=2"], r"model\.\.top_k: not a key path: empty key after 'model\.'"),
        (["--set", ".seed=3"], r"\.seed: not a key path: empty key at the start"),
    ],
)
def test_key_path_errors_on_the_command_line(capsys, argv, message):
    from moeframe.cli.main import main

    assert main(["explain", "mixtral", *argv]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and re.search(message, err[0]), err


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mixtral").mkdir()
    assert load_config("mixtral").source == "preset:mixtral"
    with pytest.raises(ConfigError, match=r"^config file './mixtral' is a directory, not a TOML file; for the preset, give its name alone: 'mixtral'$"):
        load_config("./mixtral")
    with pytest.raises(ConfigError, match=r"^config file 'mixtral.toml' not found; did you mean 'mixtral'\?"):
        load_config("mixtral.toml")
    (tmp_path / "mixtral").rmdir()
    (tmp_path / "mixtral").write_text('extends = "qwen3-moe"\n')  # a file without .toml: the preset still wins
    assert load_config("mixtral").source == "preset:mixtral"
    assert load_config("./mixtral").model == load_config("qwen3-moe").model


# -- one shape: every spelling of a strategy is normalised to {name, params} -------------
SUGAR = [
    # the documented short forms ...
    '[router]\nname = "sigmoid_grouped_topk"\nn_group = 2\n'
    '[stack]\nkernel = "fused_cpu"\nkernel_params = { backend = "torch" }\nwrappers = ["chunking"]\n',
    # ... the tables they stand for ...
    '[router]\nname = "sigmoid_grouped_topk"\nparams = { n_group = 2 }\n'
    '[stack]\nkernel = { name = "fused_cpu", params = { backend = "torch" } }\nwrappers = [{ name = "chunking" }]\n',
    # ... and a mix, with empty params spelt out
    '[router.params]\nn_group = 2\n[router]\nname = "sigmoid_grouped_topk"\n'
    '[stack]\nrunner = "default"\nrunner_params = {}\nkernel = { name = "fused_cpu" }\nkernel_params = { backend = "torch" }\n'
    'wrappers = [{ name = "chunking", params = {} }]\n',
]
MODEL = '[model]\nnum_experts = 8\ntop_k = 2\nhidden_size = 16\nintermediate_size = 8\n'


def test_every_spelling_of_a_strategy_gives_one_config(tmp_path: Path):
    configs = []
    for i, text in enumerate(SUGAR):
        path = tmp_path / f"c{i}.toml"
        path.write_text(MODEL + text)
        configs.append(load_config(path))
    assert configs[0] == configs[1] == configs[2]
    c = configs[0]
    assert (c.router.params.n_group, c.stack.kernel.params.backend, c.stack.wrappers[0].params.max_num_tokens) == (2, "torch", 256)


def _strategies(d: dict) -> list:
    return [d["router"], d["stack"]["runner"], d["stack"]["kernel"], d["stack"]["dispatcher"], *d["stack"]["wrappers"]]


@pytest.mark.parametrize("preset", PRESETS)
def test_to_dict_writes_the_one_shape_and_reads_it_back(preset):
    config = load_config(preset, ['stack.wrappers=["chunking"]', "stack.kernel=fused_cpu"])
    d = config.to_dict()
    assert all(set(s) == {"name", "params"} and isinstance(s["params"], dict) for s in _strategies(d))
    assert set(d["stack"]) == {"runner", "kernel", "dispatcher", "wrappers"}
    again = load_config(d)
    assert again == config and again.to_dict() == d and again.fingerprint() == config.fingerprint()


def test_load_config_uses_the_registry_given():
    import attrs

    import moeframe
    from moeframe.plugins.manager import PluginHost

    @attrs.frozen
    class Params:
        scale: float = moeframe.option(1.0, help="a scale", min=0.0)

    class Scaled(moeframe.Wrapper):
        pass

    Scaled.Params = Params

    class Plugin:
        @staticmethod
        @moeframe.hookimpl
        def register_wrappers():
            return [moeframe.Strategy("scaled", Scaled, "only in a private registry")]

    host = PluginHost(autoload=False).load()
    host.add_plugin(Plugin(), "private-plugin", "1.0")
    overrides = ['stack.wrappers=[{ name = "scaled", params = { scale = 2.0 } }]']
    config = load_config("mixtral", overrides, registry=host.registry)
    assert config.stack.wrappers[0].params.scale == 2.0
    with pytest.raises(ConfigError, match=r"^preset:mixtral: stack.wrappers\[0\].name: unknown wrapper 'scaled'"):
        load_config("mixtral", overrides)  # the process-wide registry does not have it
    assert config.evolve({"stack.wrappers[0].params.scale": 3.0}, registry=host.registry).stack.wrappers[0].params.scale == 3.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["router.renormalise=true"], r"^router.renormalise: unknown key"),
        (["router.params.renormalise=true"], r"^router.params.renormalise: unknown key"),
        (["stack.kernel_params.block=3"], r"^stack.kernel_params.block: unknown key"),
        (["stack.kernel.params.block=3"], r"^stack.kernel.params.block: unknown key"),
        (["stack.kernel=torchh"], r"^stack.kernel: unknown kernel 'torchh'"),
        (['stack.kernel={name="torchh"}'], r"^stack.kernel.name: unknown kernel 'torchh'"),
        (["stack.kernel=5"], r"^stack.kernel: expected a kernel name or a table"),
        (['stack.kernel={name="torch", parms={}}'], r"^stack.kernel.parms: unknown key; did you mean 'params'\?"),
        (['router={name="softmax_topk", renormalize=true, params={}}'], r"^router.renormalize: give the router's parameters either beside its name or in router.params, not both"),
    ],
)
def test_errors_name_the_path_as_it_was_written(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(small_config(), overrides)


def test_both_spellings_of_params_in_one_file_are_refused(tmp_path: Path):
    conf = tmp_path / "both.toml"
    conf.write_text(MODEL + '[router]\nname = "softmax_topk"\n[stack]\nkernel = { name = "fused_cpu", params = {} }\nkernel_params = { backend = "torch" }\n')
    with pytest.raises(ConfigError, match=rf"^{conf}: stack.kernel: give parameters either in stack.kernel.params or in stack.kernel_params, not both"):
        load_config(conf)


def test_extends_replaces_a_strategy_named_anew_and_merges_the_same_one(tmp_path: Path):
    base = tmp_path / "base.toml"
    base.write_text(MODEL + '[router]\nname = "softmax_topk"\nrenormalize = false\n'
                    '[stack]\nkernel = "fused_cpu"\nkernel_params = { backend = "torch" }\n')
    other = tmp_path / "other.toml"  # another kernel, router: the base's parameters go
    other.write_text('extends = "base.toml"\n[router]\nname = "topk_softmax"\n[stack]\nkernel = "torch"\n')
    config = load_config(other)
    assert (config.router.name, config.stack.kernel.name) == ("topk_softmax", "torch")
    same = tmp_path / "same.toml"  # the same ones: parameters merge
    same.write_text('extends = "base.toml"\n[router]\nweights_dtype = "activation"\n[stack]\nkernel = { name = "fused_cpu" }\n')
    config = load_config(same)
    assert (config.router.params.renormalize, config.router.params.weights_dtype) == (False, "activation")
    assert config.stack.kernel.params.backend == "torch"


@pytest.mark.parametrize(
    "overrides",
    [
        {"stack.kernel": "fused_cpu", "stack.kernel_params.backend": "torch"},
        {"stack.kernel_params.backend": "torch", "stack.kernel": "fused_cpu"},  # order does not matter
        {"stack.kernel.params.backend": "torch", "stack.kernel.name": "fused_cpu"},
        {"stack.kernel": {"name": "fused_cpu", "params": {"backend": "torch"}}},
    ],
)
def test_overrides_that_choose_a_strategy_apply_first(overrides):
    config = load_config("mixtral", overrides)
    assert (config.stack.kernel.name, config.stack.kernel.params.backend) == ("fused_cpu", "torch")


def test_choosing_another_strategy_drops_the_old_ones_params():
    on_fused = load_config("mixtral", ['stack.kernel={name="fused_cpu", params={backend="torch"}}'])
    assert on_fused.evolve(["stack.kernel=torch"]).stack.kernel.name == "torch"
    assert load_config("qwen3-moe", ["router=sigmoid_top1", "model.top_k=1"]).router.name == "sigmoid_top1"
    with pytest.raises(ConfigError, match=r"^preset:qwen3-moe: router.renormalize: unknown key"):
        load_config("qwen3-moe", ["router.name=sigmoid_top1", "model.top_k=1"])  # .name sets the name only


def test_overrides_may_be_one_string_or_tuples_in_a_mapping():
    assert load_config("mixtral", "model.top_k=1").model.top_k == 1
    config = load_config({**small_config(), "stack": {"wrappers": ({"name": "chunking"},)}}, ["stack.wrappers[0].params.max_num_tokens=3"])
    assert config.stack.wrappers[0].params.max_num_tokens == 3
