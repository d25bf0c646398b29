"""The plugin mechanism, with real (fake) distributions on sys.path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import moeframe
from moeframe.errors import DuplicateStrategyError, PluginError, UnknownStrategyError
from moeframe.plugins import PluginWarning, get_host, get_registry

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
    assert set(builtin.hooks) == {"register_routers", "register_kernels", "register_dispatchers", "register_runners", "register_wrappers"}
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
    with pytest.warns(PluginWarning, match=r"written for plugin API 99, but this moeframe provides API 1; upgrade moeframe"):
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
