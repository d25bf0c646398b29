"""The plugin mechanism, with real (fake) distributions on sys.path."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest
import torch

import moeframe
from moeframe.errors import DuplicateStrategyError, PluginError, UnknownStrategyError
from moeframe.plugins import PluginWarning, get_host, get_registry
from moeframe.testing import small_config

GOOD = """
    from moeframe import Strategy, Capabilities, hookimpl

    moeframe_plugin_api = 1

    @hookimpl
    def register_kernels():
        return [Strategy("good_kernel", "good_plugin_impl:GoodKernel", "a kernel from a plugin",
                         Capabilities(dtypes=["float32"]))]

    @hookimpl
    def register_wrappers():
        return [Strategy("good_wrapper", "good_plugin_impl:GoodWrapper", "a wrapper from a plugin")]
"""
GOOD_IMPL = """
    from moeframe.kernels.torch_reference import TorchReferenceKernel
    from moeframe import Wrapper

    class GoodKernel(TorchReferenceKernel):
        pass

    class GoodWrapper(Wrapper):
        def forward(self, hidden_states, router_logits):
            return self.inner.forward(hidden_states, router_logits)
"""


def add_good(fake_dists, dist="moeframe-good", version="1.2.3"):
    fake_dists.add(dist, version, {"good_plugin": GOOD, "good_plugin_impl": GOOD_IMPL}, {"good": "good_plugin"})


def test_builtins_are_registered_through_the_hooks():
    host = get_host()
    builtin = host.plugins[0]
    assert builtin.builtin and builtin.name == "moeframe"
    assert set(builtin.hooks) == {"register_routers", "register_kernels", "register_dispatchers", "register_runners",
                                  "register_wrappers", "register_commands"}
    assert {"run", "list", "plugins"} <= set(builtin.commands)
    assert "torch" in builtin.provides["kernel"]
    entry = get_registry().get("kernel", "torch")
    assert str(entry.provider) == "builtin"


def test_good_plugin_registers_with_its_distribution(fake_dists):
    add_good(fake_dists)
    registry = get_registry()
    entry = registry.get("kernel", "good_kernel")
    assert (entry.provider.name, entry.provider.version) == ("moeframe-good", "1.2.3")
    assert str(entry.provider) == "moeframe-good 1.2.3"
    assert entry.description == "a kernel from a plugin"
    assert registry.get("wrapper", "good_wrapper").load().__name__ == "GoodWrapper"
    record = next(r for r in get_host().plugins if r.name == "moeframe-good")
    assert record.ok and record.provides == {"kernel": ["good_kernel"], "wrapper": ["good_wrapper"]}
    assert record.entry_points == ["good = good_plugin"]


def test_plugin_strategy_is_used_by_a_layer(fake_dists):
    add_good(fake_dists)
    import torch

    layer = moeframe.MoELayer("qwen3-moe", overrides={"stack.kernel": "good_kernel", "stack.wrappers": ["good_wrapper"]})
    x = torch.randn(5, layer.config.model.hidden_size)
    torch.testing.assert_close(layer(x), layer.reference()(x))


def test_plugin_whose_import_fails_is_reported_and_skipped(fake_dists):
    add_good(fake_dists)
    fake_dists.add("moeframe-broken", "0.1", {"broken_plugin": "import does_not_exist_anywhere\n"}, {"broken": "broken_plugin"})
    with pytest.warns(PluginWarning, match=r"moeframe plugin 'moeframe-broken' 0.1 was skipped: import of 'broken_plugin' failed: ModuleNotFoundError"):
        registry = get_registry()
    assert "good_kernel" in registry.names("kernel")  # the others keep working
    record = next(r for r in get_host().plugins if r.name == "moeframe-broken")
    assert not record.ok and "does_not_exist_anywhere" in record.errors[0]


def test_failure_is_reported_once(fake_dists, recwarn):
    fake_dists.add("moeframe-broken", "0.1", {"broken_plugin": "raise RuntimeError('boom')\n"}, {"broken": "broken_plugin"})
    get_registry()
    get_registry()
    get_host()
    assert len([w for w in recwarn if issubclass(w.category, PluginWarning)]) == 1


def test_plugin_whose_hook_raises_is_reported_and_skipped(fake_dists):
    add_good(fake_dists)
    fake_dists.add("moeframe-raises", "2.0", {"raising_plugin": """
        from moeframe import hookimpl
        @hookimpl
        def register_kernels():
            raise ValueError("cannot compute capabilities")
    """}, {"raising": "raising_plugin"})
    with pytest.warns(PluginWarning, match=r"'moeframe-raises' 2.0 was skipped: hook register_kernels raised ValueError: cannot compute capabilities"):
        registry = get_registry()
    assert {"torch", "good_kernel"} <= set(registry.names("kernel"))


def test_hook_returning_the_wrong_type_is_reported(fake_dists):
    fake_dists.add("moeframe-wrongtype", "1.0", {"wrong_plugin": """
        from moeframe import hookimpl
        @hookimpl
        def register_routers():
            return [{"name": "dict_router"}]
    """}, {"wrong": "wrong_plugin"})
    with pytest.warns(PluginWarning, match=r"returned dict where a moeframe.Strategy was expected"):
        assert "dict_router" not in get_registry().names("router")


def test_two_providers_of_one_name_is_an_error_naming_both(fake_dists):
    add_good(fake_dists)
    fake_dists.add("moeframe-rival", "0.9", {"rival_plugin": """
        from moeframe import Strategy, hookimpl
        @hookimpl
        def register_kernels():
            return [Strategy("good_kernel", "good_plugin_impl:GoodKernel", "the same name"),
                    Strategy("torch", "good_plugin_impl:GoodKernel", "claims a builtin name")]
    """}, {"rival": "rival_plugin"})
    with pytest.warns(PluginWarning) as caught:
        registry = get_registry()
    messages = [str(w.message) for w in caught]
    assert any("kernel 'good_kernel' is registered by more than one provider: moeframe-good 1.2.3 and moeframe-rival 0.9" in m for m in messages)
    with pytest.raises(DuplicateStrategyError, match=r"kernel 'torch' is registered by more than one provider: builtin and moeframe-rival 0.9"):
        registry.get("kernel", "torch")
    assert len(registry.conflicts) == 2


def test_misspelled_hook_is_an_error_not_silence(fake_dists):
    fake_dists.add("moeframe-typo", "0.1", {"typo_plugin": """
        from moeframe import Strategy, hookimpl
        @hookimpl
        def register_kernel():
            return []
    """}, {"typo": "typo_plugin"})
    with pytest.warns(PluginWarning, match=r"'moeframe-typo' 0.1 was skipped: implements unknown hook 'register_kernel'; did you mean 'register_kernels'\?"):
        get_registry()
    record = next(r for r in get_host().plugins if r.name == "moeframe-typo")
    assert not record.ok


def test_hookimpl_with_wrong_arguments_is_refused(fake_dists):
    fake_dists.add("moeframe-args", "0.1", {"args_plugin": """
        from moeframe import hookimpl
        @hookimpl
        def register_kernels(registry):
            return []
    """}, {"args": "args_plugin"})
    with pytest.warns(PluginWarning, match=r"'moeframe-args' 0.1 was skipped: invalid hook implementation"):
        get_registry()


def test_newer_plugin_api_is_refused_with_what_to_do(fake_dists):
    fake_dists.add("moeframe-future", "9.0", {"future_plugin": "moeframe_plugin_api = 99\n"}, {"future": "future_plugin"})
    with pytest.warns(PluginWarning, match=rf"written for plugin API 99, but this moeframe provides API "
                                           rf"{moeframe.PLUGIN_API_VERSION}; upgrade moeframe"):
        get_registry()


def test_strict_mode_makes_failures_fatal(fake_dists, monkeypatch):
    fake_dists.add("moeframe-broken", "0.1", {"broken_plugin": "raise RuntimeError('boom')\n"}, {"broken": "broken_plugin"})
    monkeypatch.setenv("MOEFRAME_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"'moeframe-broken' 0.1 was skipped: import of 'broken_plugin' failed: RuntimeError: boom \(MOEFRAME_STRICT_PLUGINS is set\)"):
        get_registry()


def test_autoload_disabled_loads_builtins_only(fake_dists, monkeypatch):
    add_good(fake_dists)
    monkeypatch.setenv("MOEFRAME_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = get_registry()
    assert "good_kernel" not in registry.names("kernel")
    assert "expert_stats" not in registry.names("wrapper")  # an installed plugin is not loaded either
    assert [p.name for p in get_host().plugins] == ["moeframe"]


def test_allow_list_loads_only_those_distributions(fake_dists, monkeypatch):
    add_good(fake_dists)
    add_good(fake_dists, dist="moeframe-other", version="0.0.1") if False else None
    fake_dists.add("moeframe-broken", "0.1", {"broken_plugin": "raise RuntimeError('boom')\n"}, {"broken": "broken_plugin"})
    monkeypatch.setenv("MOEFRAME_PLUGINS", "Moeframe_Good")  # names compare normalised
    registry = get_registry()  # the broken plugin is not even imported: no warning
    assert "good_kernel" in registry.names("kernel")
    assert {p.name for p in get_host().plugins} == {"moeframe", "moeframe-good"}


def test_unknown_name_lists_what_is_available():
    with pytest.raises(UnknownStrategyError) as info:
        get_registry().get("wrapper", "chunkng")
    message = str(info.value)
    assert message.startswith("unknown wrapper 'chunkng'; did you mean 'chunking'?; available wrappers: chunking")
    assert message.endswith("(`moeframe plugins` lists installed plugins)")
    with pytest.raises(UnknownStrategyError, match=r"unknown strategy kind 'kernal'; did you mean 'kernel'\?"):
        get_registry().names("kernal")


def test_strategy_records_validate_their_fields():
    with pytest.raises(ValueError, match=r"strategy name 'Bad Name'"):
        moeframe.Strategy("Bad Name", "a:b")
    with pytest.raises(ValueError, match=r"impl 'no_colon' must be 'module:attribute'"):
        moeframe.Strategy("ok", "no_colon")


def test_strategy_whose_implementation_fails_to_import_names_its_provider(fake_dists):
    fake_dists.add("moeframe-lazy", "3.1", {"lazy_plugin": """
        from moeframe import Strategy, hookimpl
        @hookimpl
        def register_kernels():
            return [Strategy("lazy_kernel", "lazy_plugin_missing_impl:Kernel", "imports on first use")]
    """}, {"lazy": "lazy_plugin"})
    entry = get_registry().get("kernel", "lazy_kernel")  # registering imports nothing
    with pytest.raises(PluginError, match=r"kernel 'lazy_kernel' from moeframe-lazy 3.1 failed to load \(lazy_plugin_missing_impl:Kernel\): ModuleNotFoundError"):
        entry.load()


def test_import_moeframe_is_lazy(tmp_path):
    """`import moeframe` scans no entry points and imports no plugin; the first registry use does."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "noisy_plugin.py").write_text("import sys\nsys.stderr.write('PLUGIN IMPORTED\\n')\n")
    info = site / "moeframe_noisy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moeframe-noisy\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[moeframe]\nnoisy = noisy_plugin\n")
    code = textwrap.dedent(f"""
        import sys, json
        sys.path.insert(0, {str(site)!r})
        import moeframe
        before = {{"manager": "moeframe.plugins.manager" in sys.modules, "torch": "torch" in sys.modules,
                   "triton": "triton" in sys.modules}}
        sys.stderr.write("IMPORTED\\n")
        moeframe.get_registry()
        after = {{"plugin": "noisy_plugin" in sys.modules, "triton": "triton" in sys.modules}}
        print(json.dumps([before, after]))
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    before, after = json.loads(proc.stdout)
    assert before == {"manager": False, "torch": False, "triton": False}
    assert after["plugin"] and not after["triton"]  # registering the Triton plugin does not import triton
    assert proc.stderr.index("IMPORTED") < proc.stderr.index("PLUGIN IMPORTED")


def test_in_process_plugin_registration():
    from types import SimpleNamespace

    from moeframe.kernels.torch_reference import TorchReferenceKernel

    class Mine(TorchReferenceKernel):
        pass

    @moeframe.hookimpl
    def register_kernels():
        return [moeframe.Strategy("mine", Mine, "registered in-process")]

    get_registry()  # already loaded: the new plugin's strategies are added at once
    record = moeframe.register_plugin(SimpleNamespace(register_kernels=register_kernels), "my-app", "0.3")
    assert record.ok and record.provides == {"kernel": ["mine"]}
    entry = get_registry().get("kernel", "mine")
    assert str(entry.provider) == "my-app 0.3" and entry.load() is Mine

    @moeframe.hookimpl
    def register_kernel():  # misspelled
        return []

    with pytest.warns(PluginWarning, match=r"'my-typo' was skipped: implements unknown hook 'register_kernel'"):
        moeframe.register_plugin(SimpleNamespace(register_kernel=register_kernel), "my-typo")


# -- the contract of each kind, enforced when a strategy is loaded ---------------------------
def _plugin(kind: str, hook: str, name: str, impl: str) -> str:
    return f"""
        from moeframe import Strategy, hookimpl
        @hookimpl
        def {hook}():
            return [Strategy({name!r}, {impl!r}, "a {kind}")]
    """


BROKEN_IMPLS = """
    import attrs
    from moeframe import Wrapper
    from moeframe.config import NoParams
    from moeframe.kernels.torch_reference import TorchReferenceKernel

    class NotAWrapper:  # forgot to subclass moeframe.Wrapper
        transparent = False
        def __init__(self, inner, context, params):
            self.inner = inner
        def forward(self, hidden_states, router_logits):
            return self.inner.forward(hidden_states, router_logits) * 2

    class PlainParams:  # not an attrs class
        scale: float = 1.0

    class BadParamsKernel(TorchReferenceKernel):
        Params = PlainParams

    NOT_A_CLASS = NoParams()
"""


@pytest.mark.parametrize(
    ("kind", "hook", "impl", "message"),
    [
        ("wrapper", "register_wrappers", "broken_impls:NotAWrapper",
         r"wrapper 'broken' from moeframe-contract 0.4 breaks the plugin contract: impl broken_impls.NotAWrapper "
         r"does not subclass moeframe.Wrapper$"),
        ("kernel", "register_kernels", "broken_impls:BadParamsKernel",
         r"kernel 'broken' from moeframe-contract 0.4 breaks the plugin contract: BadParamsKernel.Params must be an "
         r"attrs class \(decorate it with @attrs.frozen\), not <class 'broken_impls.PlainParams'>$"),
        ("router", "register_routers", "broken_impls:NOT_A_CLASS",
         r"router 'broken' from moeframe-contract 0.4 breaks the plugin contract: impl must be a class subclassing "
         r"moeframe.Router, not NoParams"),
    ],
)
def test_an_impl_that_breaks_its_kinds_contract_is_a_plugin_error_naming_it(fake_dists, kind, hook, impl, message):
    fake_dists.add("moeframe-contract", "0.4", {"contract_plugin": _plugin(kind, hook, "broken", impl),
                                                "broken_impls": BROKEN_IMPLS}, {"contract": "contract_plugin"})
    entry = get_registry().get(kind, "broken")  # registering imports nothing
    with pytest.raises(PluginError, match=message):
        entry.load()
    record = next(r for r in get_host().verify().plugins if r.name == "moeframe-contract")
    assert not record.ok and re.search(message, record.errors[0])
    assert get_host().plugins[0].ok  # the builtins keep their contract


def test_moeframe_plugins_reports_a_broken_impl(fake_dists, capsys):
    from moeframe.cli.main import main

    fake_dists.add("moeframe-contract", "0.4", {"contract_plugin": _plugin("wrapper", "register_wrappers", "broken",
                                                                           "broken_impls:NotAWrapper"),
                                                "broken_impls": BROKEN_IMPLS}, {"contract": "contract_plugin"})
    assert main(["plugins"]) == 0  # classes are imported and checked only with --check
    assert "moeframe-contract 0.4: ok" in capsys.readouterr().out
    assert main(["plugins", "--check"]) == 0
    out = capsys.readouterr().out
    assert "moeframe-contract 0.4: failed" in out
    assert "error: wrapper 'broken' from moeframe-contract 0.4 breaks the plugin contract" in out


def test_a_stack_with_a_broken_impl_is_a_one_line_error():
    class Forgetful:  # not a moeframe.Kernel
        def __init__(self, context, params):
            pass

    @moeframe.hookimpl
    def register_kernels():
        return [moeframe.Strategy("forgetful", Forgetful, "no base class")]

    moeframe.register_plugin(SimpleNamespace(register_kernels=register_kernels), "my-app", "1.0")
    with pytest.raises(PluginError, match=r"^kernel 'forgetful' from my-app 1.0 breaks the plugin contract: impl "
                                          r".*Forgetful does not subclass moeframe.Kernel$"):
        moeframe.MoELayer("qwen3-moe", overrides={"stack.kernel": "forgetful"})


# -- supports(config, params): one question for every kind, given the part's own params -----
def test_supports_is_asked_of_every_part_with_its_own_params():
    asked: list[tuple[str, object]] = []

    def recorder(kind, base):
        @attrs.frozen
        class Params:
            limit: int = moeframe.option(100, help="refuse more experts than this")

        class Recorder(base):
            @classmethod
            def supports(cls, config, params):
                asked.append((kind, params))
                if config.model.num_experts > params.limit:
                    return f"{kind} recorder handles at most {params.limit} experts"
                return None
        Recorder.Params = Params
        return Recorder

    from moeframe.kernels.torch_reference import TorchReferenceKernel
    from moeframe.routers.softmax_topk import SoftmaxTopKRouter

    class PassWrapper(moeframe.Wrapper):
        def forward(self, hidden_states, router_logits):
            return self.inner.forward(hidden_states, router_logits)

    kernel, wrapper = recorder("kernel", TorchReferenceKernel), recorder("wrapper", PassWrapper)
    router = recorder("router", SoftmaxTopKRouter)
    plugin = SimpleNamespace(
        register_kernels=moeframe.hookimpl(lambda: [moeframe.Strategy("rec_kernel", kernel)]),
        register_wrappers=moeframe.hookimpl(lambda: [moeframe.Strategy("rec_wrapper", wrapper)]),
        register_routers=moeframe.hookimpl(lambda: [moeframe.Strategy("rec_router", router)]),
    )
    moeframe.register_plugin(plugin, "recorders", "1.0")
    source = dict(small_config(), router={"name": "rec_router", "limit": 16},
                  stack={"kernel": {"name": "rec_kernel", "params": {"limit": 8}},
                         "wrappers": [{"name": "rec_wrapper", "params": {"limit": 4}}]})
    with pytest.raises(moeframe.StackError, match=r"^stack.wrappers\[0\]: wrapper recorder handles at most 4 experts$"):
        moeframe.MoELayer(source)
    assert [(kind, params.limit) for kind, params in asked] == [("kernel", 8), ("router", 16), ("wrapper", 4)]


def test_stack_errors_name_the_configs_source(tmp_path):
    path = tmp_path / "grouped.toml"
    path.write_text('extends = "deepseek-v3"\n[router]\nn_group = 3\n')
    config = moeframe.load_config(path)  # each field is valid; the router cannot serve this model
    with pytest.raises(moeframe.StackError, match=rf"^{re.escape(str(path))}: router: n_group = 3 must divide "
                                                  r"model.num_experts \(\d+\)$"):
        moeframe.MoELayer(config)


def test_shared_experts_is_given_its_own_params():
    from moeframe.composer import check_stack

    config = moeframe.load_config("qwen2-moe", {"parallel.tp_size": 2, "stack.wrappers": [
        {"name": "shared_experts", "params": {"intermediate_size": 7, "gated": True}}]})
    with pytest.raises(moeframe.StackError, match=r"^preset:qwen2-moe: stack.wrappers\[0\]: shared_experts: "
                                                  r"intermediate_size 7 is not divisible by parallel.tp_size 2$"):
        check_stack(config)


def test_distributed_capability_decides_data_parallelism():
    from moeframe.composer import check_stack

    local = get_registry().get("dispatcher", "local")
    assert not local.capabilities.distributed and get_registry().get("dispatcher", "all2all").capabilities.distributed
    config = moeframe.load_config(small_config(), {"parallel.ep_size": 2, "parallel.dp_size": 2})
    with pytest.raises(moeframe.StackError, match=r"dispatcher 'local' cannot serve data parallelism"):
        check_stack(config)
    check_stack(attrs.evolve(config, stack=attrs.evolve(config.stack, dispatcher=attrs.evolve(
        config.stack.dispatcher, name="all2all"))))


def test_optional_members_live_on_the_base_classes():
    """The host calls these members, it never asks whether they exist (no hasattr probes)."""
    from moeframe.plugins.contract import StrategyBase

    shared = ("Params", "supports", "weight_specs", "workspace_requests", "describe", "report", "release")
    for base in (moeframe.Router, moeframe.Kernel, moeframe.Dispatcher, moeframe.Runner, moeframe.Wrapper):
        assert issubclass(base, StrategyBase)
        for member in shared:
            assert getattr(base, member).__doc__ or member == "Params", (base, member)
    assert moeframe.Wrapper.transparent is True and moeframe.Router.weight_on_input is False
    assert not moeframe.Kernel.tunable()
    probe = re.compile(r"(hasattr|getattr)\([^)]*[\"'](describe|release|report|tune|transparent|workspace_requests|"
                       r"weight_specs|supports|check_config|check_stack|Params)[\"']")
    roots = [Path(moeframe.__file__).parent, Path(moeframe.__file__).parent.parent / "plugins"]
    offenders = [f"{path}:{i}" for root in roots for path in root.rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1) if probe.search(line)]
    assert offenders == []


# -- hooks through pluggy: opt-in arguments, deprecation, builtins as data ------------------------
GROWN_SPECS = '''
    from moeframe.plugins.hookspecs import hookspec

    @hookspec
    def register_routers(): ...
    @hookspec
    def register_kernels(host_version, register): ...
    @hookspec
    def register_dispatchers(): ...
    @hookspec
    def register_runners(): ...
    @hookspec(warn_on_impl=DeprecationWarning("register_wrappers is going away; return wrappers from register_kernels"))
    def register_wrappers(): ...
    @hookspec
    def register_commands(register): ...
'''


def test_a_hook_can_grow_an_argument_without_breaking_plugins_written_before(tmp_path, monkeypatch):
    from moeframe.plugins import MoeframeDeprecationWarning
    from moeframe.plugins.manager import PluginHost

    (tmp_path / "grown_specs.py").write_text(textwrap.dedent(GROWN_SPECS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import grown_specs

    registered: list[str] = []

    class GrownHost(PluginHost):
        def hook_arguments(self, hook_name):
            return {"host_version": "9.0", "register": registered.append} if hook_name == "register_kernels" else {}

    from moeframe.kernels.torch_reference import TorchReferenceKernel

    @moeframe.hookimpl
    def register_kernels():  # written for the hook without arguments
        return [moeframe.Strategy("old_style", TorchReferenceKernel)]

    @moeframe.hookimpl
    def register_kernels_new(host_version):  # opts in to one of the new arguments
        return [moeframe.Strategy(f"new_style_{host_version.replace('.', '_')}", TorchReferenceKernel)]

    @moeframe.hookimpl
    def register_wrappers():
        return []

    host = GrownHost(autoload=False, specs=grown_specs).load()
    host.add_plugin(SimpleNamespace(register_kernels=register_kernels), "old-plugin", "1.0")
    host.add_plugin(SimpleNamespace(register_kernels=register_kernels_new), "new-plugin", "2.0")
    assert {"torch", "old_style", "new_style_9_0"} <= set(host.registry.names("kernel"))
    assert all(r.ok for r in host.plugins)
    with pytest.warns(MoeframeDeprecationWarning, match=r"moeframe plugin 'wrapping-plugin': register_wrappers is "
                                                        r"going away; return wrappers from register_kernels"):
        host.add_plugin(SimpleNamespace(register_wrappers=register_wrappers), "wrapping-plugin")


def test_builtins_are_named_as_data_and_imported_by_name():
    import ast

    from moeframe.plugins import manager

    assert manager.BUILTIN_PLUGINS == ("moeframe.builtin", "moeframe.cli.commands")
    tree = ast.parse(Path(manager.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.startswith("moeframe.builtin") or name == "moeframe"}
    proc = subprocess.run([sys.executable, "-c", "import sys, moeframe.plugins.manager; "
                           "print('moeframe.builtin' in sys.modules)"], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


# -- plugins that exit (issue 11, item 5) ---------------------------------------------------------
EXITING_IMPL = """
    import sys
    from moeframe.kernels.torch_reference import TorchReferenceKernel

    class ExitingKernel(TorchReferenceKernel):
        def __call__(self, hidden_states, topk_weights, topk_ids, experts):
            sys.exit(4)

    class NoneKernel(TorchReferenceKernel):
        def __call__(self, hidden_states, topk_weights, topk_ids, experts):
            return None

    class ShapeKernel(TorchReferenceKernel):
        def __call__(self, hidden_states, topk_weights, topk_ids, experts):
            out = super().__call__(hidden_states, topk_weights, topk_ids, experts)
            return out[:, :-1]

    class DtypeKernel(TorchReferenceKernel):
        def __call__(self, hidden_states, topk_weights, topk_ids, experts):
            return super().__call__(hidden_states, topk_weights, topk_ids, experts).double()

    class InputKernel(TorchReferenceKernel):
        def __call__(self, hidden_states, topk_weights, topk_ids, experts):
            return hidden_states
"""
EXITING_PLUGIN = """
    from moeframe import Strategy, hookimpl

    @hookimpl
    def register_kernels():
        return [Strategy(name, f"exiting_impl:{cls}") for name, cls in (
            ("exits", "ExitingKernel"), ("returns_none", "NoneKernel"), ("wrong_shape", "ShapeKernel"),
            ("wrong_dtype", "DtypeKernel"), ("returns_input", "InputKernel"))]
"""


def test_sys_exit_at_import_is_a_plugin_failure_like_any_other(fake_dists):
    add_good(fake_dists)
    fake_dists.add("moeframe-exits", "0.2", {"exiting_plugin": "import sys\nsys.exit(3)\n"}, {"exits": "exiting_plugin"})
    with pytest.warns(PluginWarning, match=r"'moeframe-exits' 0.2 was skipped: import of 'exiting_plugin' failed: "
                                           r"SystemExit\(3\): a plugin called sys.exit\(\)"):
        registry = get_registry()
    assert "good_kernel" in registry.names("kernel")


def test_sys_exit_in_a_hook_or_a_lazy_import_is_reported(fake_dists, monkeypatch):
    fake_dists.add("moeframe-hookexit", "0.1", {"hookexit_plugin": """
        import sys
        from moeframe import Strategy, hookimpl
        @hookimpl
        def register_kernels():
            sys.exit("no kernels today")
        @hookimpl
        def register_wrappers():
            return [Strategy("lazy_exit", "lazy_exit_impl:Wrapper")]
    """, "lazy_exit_impl": "import sys\nsys.exit(5)\n"}, {"hookexit": "hookexit_plugin"})
    with pytest.warns(PluginWarning, match=r"hook register_kernels raised SystemExit\('no kernels today'\)"):
        entry = get_registry().get("wrapper", "lazy_exit")
    with pytest.raises(PluginError, match=r"^wrapper 'lazy_exit' from moeframe-hookexit 0.1 failed to load "
                                          r"\(lazy_exit_impl:Wrapper\): SystemExit\(5\): a plugin called sys.exit\(\)$"):
        entry.load()


@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        ("exits", r"called sys.exit\(4\) during a forward; a strategy raises an exception instead"),
        ("returns_none", r"returned NoneType instead of a tensor"),
        ("wrong_shape", r"returned a \[5, 255\] torch.float32 tensor on cpu where \[5, 256\] torch.float32 on cpu was expected"),
        ("wrong_dtype", r"returned a \[5, 256\] torch.float64 tensor on cpu where \[5, 256\] torch.float32 on cpu"),
        ("returns_input", r"returned its input tensor; a kernel returns a new tensor"),
    ],
)
def test_a_kernel_that_exits_or_returns_the_wrong_thing_is_named(fake_dists, kernel, message):
    fake_dists.add("moeframe-exiting", "1.1", {"exiting_plugin": EXITING_PLUGIN, "exiting_impl": EXITING_IMPL},
                   {"exiting": "exiting_plugin"})
    layer = moeframe.MoELayer("qwen3-moe", overrides={"stack.kernel": kernel})
    with pytest.raises(PluginError, match=rf"^kernel '{kernel}' from moeframe-exiting 1.1 {message}"):
        layer(torch.randn(5, 256))


def _cli(site, *args, **env):
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("MOEFRAME_")}
    full.update(PYTHONPATH=str(site), **env)
    return subprocess.run([sys.executable, "-m", "moeframe", *args], capture_output=True, text=True, env=full,
                          timeout=300)


def test_cli_exit_codes_for_plugins_that_exit_or_interrupt(fake_dists):
    fake_dists.add("moeframe-exits", "0.2", {"exiting_plugin": "import sys\nsys.exit(3)\n"}, {"exits": "exiting_plugin"})
    proc = _cli(fake_dists.root, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "moeframe-exits 0.2: failed" in proc.stdout and "SystemExit(3)" in proc.stdout
    strict = _cli(fake_dists.root, "list", MOEFRAME_STRICT_PLUGINS="1")
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines() == [
        "moeframe: error: moeframe plugin 'moeframe-exits' 0.2 was skipped: import of 'exiting_plugin' failed: "
        "SystemExit(3): a plugin called sys.exit() (MOEFRAME_STRICT_PLUGINS is set)"]
    fake_dists.add("moeframe-interrupts", "0.3", {"interrupting_plugin": "raise KeyboardInterrupt\n"},
                   {"interrupts": "interrupting_plugin"})
    interrupted = _cli(fake_dists.root, "list")
    assert interrupted.returncode == 130
    assert interrupted.stderr.strip().splitlines()[-1] == "moeframe: interrupted"  # one line, no traceback
    assert "Traceback" not in interrupted.stderr


def test_cli_run_with_a_kernel_that_exits_names_it(fake_dists):
    fake_dists.add("moeframe-exiting", "1.1", {"exiting_plugin": EXITING_PLUGIN, "exiting_impl": EXITING_IMPL},
                   {"exiting": "exiting_plugin"})
    proc = _cli(fake_dists.root, "run", "qwen3-moe", "--set", "stack.kernel=exits", "--tokens", "4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "moeframe: error: kernel 'exits' from moeframe-exiting 1.1 called sys.exit(4) during a forward; "
        "a strategy raises an exception instead")


def test_a_router_that_exits_is_named():
    from moeframe.routers.softmax_topk import SoftmaxTopKRouter

    class ExitingRouter(SoftmaxTopKRouter):
        def logits(self, hidden_states, weights):
            raise SystemExit(6)

    @moeframe.hookimpl
    def register_routers():
        return [moeframe.Strategy("exiting_router", ExitingRouter)]

    moeframe.register_plugin(SimpleNamespace(register_routers=register_routers), "my-routers", "0.5")
    layer = moeframe.MoELayer(dict(small_config(), router={"name": "exiting_router"}))
    with pytest.raises(PluginError, match=r"^router 'exiting_router' from my-routers 0.5 called sys.exit\(6\) during a "
                                          r"forward"):
        layer(torch.randn(3, 32))


def test_the_triton_plugin_selects_its_interpreter_only_in_cpu_only_processes(monkeypatch):
    """Registration writes TRITON_INTERPRET (the reason is in the hook's docstring) only
    where no CUDA device exists, and never over the user's own setting."""
    import os

    plugin = pytest.importorskip("moeframe_triton.plugin")
    assert "decorat" in plugin.register_kernels.__doc__  # says why registration is the moment
    monkeypatch.setenv("TRITON_INTERPRET", "")
    monkeypatch.setattr(plugin, "interpreter_mode", lambda: False)  # a CUDA device is available
    (compiled,) = plugin.register_kernels()
    assert os.environ["TRITON_INTERPRET"] == "" and compiled.capabilities.devices == frozenset({"cuda"})
    monkeypatch.setattr(plugin, "interpreter_mode", lambda: True)  # CPU only
    (interpreted,) = plugin.register_kernels()
    assert os.environ["TRITON_INTERPRET"] == "1" and interpreted.variant == "interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the user's choice stays
    plugin.register_kernels()
    assert os.environ["TRITON_INTERPRET"] == "0"
