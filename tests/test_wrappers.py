"""Wrappers and the composer: equivalence for every allowed order, the workspace, ordering
rules, capabilities, reduce-exactly-once and data-parallel lock-step."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeframe
from moeframe.composer import check_wrapper_order
from moeframe.config import ParallelConfig
from moeframe.errors import StackError
from moeframe.parallel import CountingCollectives, ParallelContext
from moeframe.plugins import get_registry
from moeframe.testing import small_config
from moeframe.workspace import Workspace

PRESETS = ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "gpt-oss", "llama4"]


def wrapper_tables(preset: str, chunk: int) -> list[dict]:
    """The preset's own wrappers (shared experts) plus chunking and expert_stats."""
    config = moeframe.load_config(preset)
    tables = [{"name": w.name, "params": moeframe.config.unstructure(w.params)} for w in config.stack.wrappers]
    return tables + [{"name": "chunking", "params": {"max_num_tokens": chunk}}, {"name": "expert_stats"}]


def allowed_orders(tables: list[dict]) -> list[list[dict]]:
    entries = {t["name"]: get_registry().get("wrapper", t["name"]) for t in tables}
    return [list(p) for p in itertools.permutations(tables) if check_wrapper_order([t["name"] for t in p], entries) is None]


_reference_cache: dict[tuple, torch.Tensor] = {}


def reference_output(preset: str, dtype: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The reference layer's output for ``x``, drawn with ``seed`` (the cache's key)."""
    key = (preset, dtype, tuple(x.shape), seed)
    if key not in _reference_cache:
        _reference_cache[key] = moeframe.MoELayer(preset, overrides={"model.dtype": dtype}).reference()(x)
    return _reference_cache[key]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    preset=st.sampled_from(PRESETS),
    chunk=st.sampled_from([1, 3, 8, 16]),
    t_kind=st.sampled_from(["0", "1", "chunk-1", "chunk", "chunk+1", "5chunk+3"]),
    order_index=st.integers(min_value=0, max_value=10_000),
    dtype=st.sampled_from(["float32", "float32", "bfloat16"]),
)
def test_every_allowed_order_matches_the_reference(preset, chunk, t_kind, order_index, dtype):
    T = {"0": 0, "1": 1, "chunk-1": chunk - 1, "chunk": chunk, "chunk+1": chunk + 1, "5chunk+3": 5 * chunk + 3}[t_kind]
    orders = allowed_orders(wrapper_tables(preset, chunk))
    order = orders[order_index % len(orders)]
    layer = moeframe.MoELayer(preset, overrides={"stack.wrappers": order, "model.dtype": dtype})
    seed = T * 31 + chunk
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, layer.config.model.hidden_size, generator=g).to(layer.config.model.torch_dtype)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    comparison = moeframe.compare(out, reference_output(preset, dtype, x, seed))
    assert comparison.ok, (preset, [t["name"] for t in order], T, comparison)


def test_builtin_wrappers_allow_every_order():
    tables = wrapper_tables("deepseek-v3", 4)
    assert len(allowed_orders(tables)) == 6


def test_shared_experts_inside_or_outside_chunking_agree():
    x = torch.randn(37, 256)
    outs = []
    for wrappers in (
        [{"name": "chunking", "params": {"max_num_tokens": 5}}, {"name": "shared_experts", "params": {"gated": True, "intermediate_size": 512}}],
        [{"name": "shared_experts", "params": {"gated": True, "intermediate_size": 512}}, {"name": "chunking", "params": {"max_num_tokens": 5}}],
    ):
        outs.append(moeframe.MoELayer("qwen2-moe", overrides={"stack.wrappers": wrappers})(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_shared_experts_math():
    layer = moeframe.MoELayer("qwen2-moe")
    t = layer.tensors
    x = torch.randn(4, 256)
    routed = moeframe.MoELayer("qwen2-moe", overrides={"stack.wrappers": []})
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared.")})
    gate, up = (x @ t["shared.w13"].T).chunk(2, -1)
    shared = (torch.nn.functional.silu(gate) * up) @ t["shared.w2"].T
    expected = routed(x) + torch.sigmoid(x @ t["shared.gate.weight"].T) * shared
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# -- the workspace --------------------------------------------------------------------------
def chunked(preset="qwen3-moe", chunk=8, **kw):
    return moeframe.MoELayer(preset, overrides={"stack.wrappers": [{"name": "chunking", "params": {"max_num_tokens": chunk}}]}, **kw)


def test_workspace_buffers_keep_their_address_across_calls_and_layers():
    ws = Workspace()
    a, b = chunked(chunk=8, workspace=ws), chunked(chunk=8, workspace=ws)
    wrapper_a, wrapper_b = a.stack.runner, b.stack.runner
    ptrs = set()
    for layer, wrapper in ((a, wrapper_a), (b, wrapper_b), (a, wrapper_a)):
        layer(torch.randn(20, 256))
        views = ws.views(wrapper.workspace_requests(), "cpu")
        ptrs.add(tuple(v.data_ptr() for v in views))
    assert len(ptrs) == 1  # same addresses every call, and for both layers
    assert ws.allocated_bytes("cpu") == ws.reserved_bytes("cpu")  # one allocation


def test_workspace_is_sized_to_the_largest_request():
    ws = Workspace()
    small, big = chunked(chunk=4, workspace=ws), chunked(chunk=64, workspace=ws)
    assert ws.reserved_bytes("cpu") == big.stack.workspace_bytes > small.stack.workspace_bytes
    small(torch.randn(9, 256))
    big(torch.randn(9, 256))
    assert ws.allocated_bytes("cpu") == big.stack.workspace_bytes


def test_outputs_never_alias_the_workspace():
    ws = Workspace()
    layer = chunked(chunk=8, workspace=ws)
    x = torch.randn(8, 256)
    out1 = layer(x)
    buffer = ws._buffers[torch.device("cpu")]
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    assert not (start <= out1.data_ptr() < end)
    saved = out1.clone()
    layer(torch.randn(8, 256))  # a second call must not change the first output
    torch.testing.assert_close(out1, saved, rtol=0, atol=0)


def test_explain_shows_workspace_bytes():
    info = chunked(chunk=16).explain()
    part = info["stack"][0]
    assert part["name"] == "chunking" and part["workspace_bytes"] == 16 * 256 * 4 + 16 * 32 * 4
    assert info["workspace_bytes"] == part["workspace_bytes"]


# -- ordering rules and capabilities: third-party wrappers through the hook --------------------
RULED = """
    from moeframe import Strategy, OrderingRules, hookimpl

    @hookimpl
    def register_wrappers():
        impl = "ruled_impl:Passthrough"
        return [
            Strategy("timer", impl, "must be outermost", rules=OrderingRules(outermost=True)),
            Strategy("limiter", impl, "must sit inside chunking", rules=OrderingRules(inside=["chunking"])),
            Strategy("probe", impl, "must sit outside shared_experts", rules=OrderingRules(outside=["shared_experts"])),
            Strategy("exclusive", impl, "conflicts with expert_stats", rules=OrderingRules(conflicts=["expert_stats"])),
            Strategy("last", impl, "innermost", rules=OrderingRules(innermost=True)),
        ]
"""
RULED_IMPL = """
    from moeframe import Wrapper

    class Passthrough(Wrapper):
        def forward(self, hidden_states, router_logits):
            return self.inner.forward(hidden_states, router_logits)
"""


@pytest.mark.parametrize(
    ("wrappers", "message"),
    [
        (["chunking", "timer"], r"^preset:qwen3-moe: stack.wrappers: wrapper 'timer' must be outermost \(stack.wrappers\[0\]\) but is stack.wrappers\[1\]; an order that works: \[timer, chunking\]$"),
        (["limiter", "chunking"], r"^preset:qwen3-moe: stack.wrappers: wrapper 'limiter' must sit inside 'chunking' \(come after it in stack.wrappers\); an order that works: \[chunking, limiter\]$"),
        (["shared_experts", "probe"], r"^preset:qwen3-moe: stack.wrappers: wrapper 'probe' must sit outside 'shared_experts' .*; an order that works: \[probe, shared_experts\]$"),
        (["exclusive", "expert_stats"], r"^preset:qwen3-moe: stack.wrappers: wrapper 'exclusive' cannot be used together with 'expert_stats'; no order of these wrappers satisfies every rule: remove one$"),
        (["chunking", "chunking"], r"^preset:qwen3-moe: stack.wrappers: wrapper 'chunking' appears twice \(stack.wrappers\[0\] and stack.wrappers\[1\]\)"),
        (["last", "chunking"], r"^preset:qwen3-moe: stack.wrappers: wrapper 'last' must be innermost .*; an order that works: \[chunking, last\]$"),
    ],
)
def test_rule_violations_say_what_would_work(fake_dists, wrappers, message):
    fake_dists.add("moeframe-ruled", "0.1", {"ruled_plugin": RULED, "ruled_impl": RULED_IMPL}, {"ruled": "ruled_plugin"})
    with pytest.raises(StackError, match=message):
        moeframe.MoELayer("qwen3-moe", overrides={"stack.wrappers": wrappers})


def test_orders_the_rules_allow_build(fake_dists):
    fake_dists.add("moeframe-ruled", "0.1", {"ruled_plugin": RULED, "ruled_impl": RULED_IMPL}, {"ruled": "ruled_plugin"})
    layer = moeframe.MoELayer("deepseek-v3", overrides={"stack.wrappers": [
        "timer", "probe", {"name": "shared_experts", "params": {"intermediate_size": 128}}, "chunking", "limiter", "last"]})
    x = torch.randn(11, 256)
    assert moeframe.compare(layer(x), layer.reference()(x)).ok


CAPABLE = """
    from moeframe import Strategy, Capabilities, hookimpl

    @hookimpl
    def register_kernels():
        impl = "moeframe.kernels.torch_reference:TorchReferenceKernel"
        return [
            Strategy("fp32_only", impl, "", Capabilities(dtypes=["float32"])),
            Strategy("cuda_only", impl, "", Capabilities(devices=["cuda"])),
            Strategy("silu_only", impl, "", Capabilities(activations=["silu"])),
            Strategy("no_bias", impl, "", Capabilities(biases=False)),
            Strategy("no_map", impl, "", Capabilities(expert_map=False)),
        ]
"""


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("qwen3-moe", {"stack.kernel": "fp32_only", "model.dtype": "bfloat16"}, r"^preset:qwen3-moe: stack.kernel: kernel 'fp32_only' does not support model.dtype = 'bfloat16' \(supports float32\); kernels that fit: "),
        ("qwen3-moe", {"stack.kernel": "cuda_only"}, r"kernel 'cuda_only' does not run on device 'cpu' \(runs on cuda\)"),
        ("gpt-oss", {"stack.kernel": "silu_only"}, r"kernel 'silu_only' does not support model.activation = 'swigluoai' \(supports silu\)"),
        ("gpt-oss", {"stack.kernel": "no_bias", "model.activation": "swigluoai"}, r"kernel 'no_bias' does not support expert biases"),
    ],
)
def test_capabilities_are_checked_at_build_time(fake_dists, preset, overrides, message):
    fake_dists.add("moeframe-capable", "0.1", {"capable_plugin": CAPABLE}, {"capable": "capable_plugin"})
    with pytest.raises(StackError, match=message):
        moeframe.MoELayer(preset, overrides=overrides)


def test_expert_map_capability_under_expert_parallelism(fake_dists):
    fake_dists.add("moeframe-capable", "0.1", {"capable_plugin": CAPABLE}, {"capable": "capable_plugin"})
    ctx = ParallelContext(ParallelConfig(ep_size=2), rank=0, world_size=2, collectives=CountingCollectives())
    with pytest.raises(StackError, match=r"kernel 'no_map' does not support an expert map, which expert parallelism \(parallel.ep_size = 2\) needs"):
        moeframe.MoELayer("qwen3-moe", overrides={"stack.kernel": "no_map", "parallel.ep_size": 2}, parallel=ctx)


def test_local_dispatcher_refuses_data_parallelism():
    ctx = ParallelContext(ParallelConfig(ep_size=2, dp_size=2), rank=0, world_size=2, collectives=CountingCollectives())
    with pytest.raises(StackError, match=r"^preset:qwen3-moe: stack.dispatcher: dispatcher 'local' cannot serve data parallelism \(parallel.dp_size = 2\).*; dispatchers that fit: all2all, allgather_reducescatter$"):
        moeframe.MoELayer("qwen3-moe", overrides={"parallel.ep_size": 2, "parallel.dp_size": 2}, parallel=ctx)


# -- a third-party wrapper, registered through the hook and named in a TOML config ----------------
SCALER = """
    import attrs
    from moeframe import Strategy, hookimpl, option

    @hookimpl
    def register_wrappers():
        return [Strategy("call_counter", "counter_impl:CallCounter", "counts calls and tokens")]
"""
SCALER_IMPL = """
    import attrs
    from moeframe import Wrapper, option

    @attrs.frozen
    class Params:
        label: str = option("moe", help="a label")

    class CallCounter(Wrapper):
        Params = Params
        def __init__(self, inner, context, params):
            super().__init__(inner, context, params)
            self.calls = 0
            self.tokens = 0
        def forward(self, hidden_states, router_logits):
            self.calls += 1
            self.tokens += hidden_states.shape[0]
            return self.inner.forward(hidden_states, router_logits)
"""


def test_third_party_wrapper_selected_by_name_in_toml(fake_dists, tmp_path: Path):
    fake_dists.add("moeframe-counter", "0.2", {"counter_plugin": SCALER, "counter_impl": SCALER_IMPL}, {"counter": "counter_plugin"})
    config = tmp_path / "counted.toml"
    config.write_text(
        'extends = "qwen3-moe"\n'
        '[stack]\nwrappers = [{ name = "call_counter", params = { label = "layer0" } }, '
        '{ name = "chunking", params = { max_num_tokens = 4 } }]\n'
    )
    layer = moeframe.MoELayer(config)
    counter = layer.stack.runner
    assert type(counter).__name__ == "CallCounter" and counter.params.label == "layer0"
    x = torch.randn(10, 256)
    assert moeframe.compare(layer(x), layer.reference()(x)).ok
    assert (counter.calls, counter.tokens) == (1, 10)
    assert layer.stack.parts[0].describe()["provider"] == "moeframe-counter 0.2"
    with pytest.raises(moeframe.ConfigError, match=r"stack.wrappers\[0\].params.lable: unknown key; did you mean 'label'\?"):
        moeframe.load_config(config, ["stack.wrappers[0].params.lable=x"])


# -- reduce exactly once ---------------------------------------------------------------------------
def ep_rank_layer(rank: int, wrappers: list, collectives: CountingCollectives, placement: str = "linear"):
    cfg = ParallelConfig(ep_size=2, placement=placement)
    ctx = ParallelContext(cfg, rank=rank, world_size=2, collectives=collectives)
    return moeframe.MoELayer("deepseek-v3", overrides={"stack.wrappers": wrappers, "parallel.ep_size": 2,
                                                       "stack.dispatcher": "local", "parallel.placement": placement},
                             parallel=ctx)


SHARED = {"name": "shared_experts", "params": {"intermediate_size": 128}}
CHUNK = {"name": "chunking", "params": {"max_num_tokens": 4}}


@pytest.mark.parametrize("wrappers", [[SHARED], [CHUNK, SHARED], [SHARED, CHUNK], [CHUNK, SHARED, {"name": "expert_stats"}],
                                      [{"name": "expert_stats"}, SHARED, CHUNK]],
                         ids=["shared", "chunk>shared", "shared>chunk", "chunk>shared>stats", "stats>shared>chunk"])
@pytest.mark.parametrize("placement", ["linear", "round_robin"])
def test_reduce_exactly_once_whatever_the_order(wrappers, placement):
    """Two EP ranks in one process (identity collectives that count): each rank's output is a
    partial sum; their sum is the reference (so the shared experts are counted once) and each
    rank all-reduces exactly once per forward."""
    x = torch.randn(13, 256)
    partials = []
    for rank in (0, 1):
        counting = CountingCollectives()
        layer = ep_rank_layer(rank, wrappers, counting, placement)
        assert not layer.stack.output_reduced
        partials.append(layer(x))
        assert counting.counts == {"all_reduce_sum": 1}
        layer(x)
        assert counting.counts == {"all_reduce_sum": 2}
    single = moeframe.MoELayer("deepseek-v3", overrides={"stack.wrappers": wrappers, "stack.dispatcher": "local"})
    torch.testing.assert_close(partials[0] + partials[1], single.reference()(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(partials[0], partials[1])


def test_no_reduction_in_one_process():
    counting = CountingCollectives()
    layer = moeframe.MoELayer("deepseek-v3", parallel=ParallelContext.single(collectives=counting),
                              overrides={"stack.wrappers": [CHUNK, SHARED]})
    layer(torch.randn(9, 256))
    assert layer.stack.output_reduced and counting.counts == {}


def test_expert_memory_per_rank_is_a_fraction():
    full = moeframe.MoELayer("deepseek-v3").explain()["expert_weight_bytes"]
    for ep in (2, 4):
        for rank in range(ep):
            ctx = ParallelContext(ParallelConfig(ep_size=ep), rank=rank, world_size=ep, collectives=CountingCollectives())
            layer = moeframe.MoELayer("deepseek-v3", overrides={"parallel.ep_size": ep}, parallel=ctx)
            assert layer.explain()["expert_weight_bytes"] == full // ep


# -- data-parallel lock-step -------------------------------------------------------------------------
class PeersHaveMore(ParallelContext):
    """One process pretending its DP peers hold ``peer_tokens`` tokens."""

    def __init__(self, peer_tokens: int) -> None:
        super().__init__(ParallelConfig())
        self.peer_tokens = peer_tokens

    def max_tokens(self, num_tokens: int, device="cpu") -> int:
        return max(num_tokens, self.peer_tokens)


class CallLog(moeframe.Wrapper):
    def __init__(self, inner, context, params):
        super().__init__(inner, context, params)
        self.sizes: list[int] = []

    def forward(self, hidden_states, router_logits):
        self.sizes.append(hidden_states.shape[0])
        return self.inner.forward(hidden_states, router_logits)


@pytest.mark.parametrize(("T", "peer_tokens", "sizes"), [
    (0, 24, [0, 0, 0]),                  # a rank with no tokens still runs every iteration
    (9, 40, [8, 1, 0, 0, 0]),            # one past a chunk boundary, peers with five chunks
    (16, 16, [8, 8]),
    (3, 0, [3]),
])
def test_lockstep_iterations_and_the_unclamped_guard(T, peer_tokens, sizes):
    layer = moeframe.MoELayer("qwen3-moe", parallel=PeersHaveMore(peer_tokens),
                              overrides={"stack.wrappers": [{"name": "chunking", "params": {"max_num_tokens": 8}}]})
    chunking = layer.stack.runner
    log = CallLog(chunking.inner, layer._context, None)
    chunking.inner = log
    x = torch.randn(T, 256)
    out = layer(x)
    assert log.sizes == sizes
    assert out.shape == (T, 256)
    assert moeframe.compare(out, layer.reference()(x)).ok  # extra iterations wrote nothing


@pytest.mark.parametrize("dispatcher", ["all2all", "allgather_reducescatter"])
def test_token_exchange_dispatchers_refuse_tensor_parallelism(dispatcher):
    ctx = ParallelContext(ParallelConfig(tp_size=2), rank=0, world_size=2, collectives=CountingCollectives())
    with pytest.raises(StackError, match=rf"^preset:qwen3-moe: stack.dispatcher: dispatcher '{dispatcher}' moves whole tokens between ranks and "
                                         r"does not combine with tensor parallelism .*; dispatchers that fit: local$"):
        moeframe.MoELayer("qwen3-moe", overrides={"parallel.tp_size": 2, "stack.dispatcher": dispatcher}, parallel=ctx)


class ReturnsItsInput(moeframe.Wrapper):
    """A (wrong-headed) inner runner that hands back the tensor it was given."""

    def forward(self, hidden_states, router_logits):
        return hidden_states


@pytest.mark.parametrize("T", [5, 8, 21])
def test_chunking_output_never_aliases_staging_even_if_the_inner_returns_its_input(T):
    ws = Workspace()
    layer = chunked(chunk=8, workspace=ws)
    chunking = layer.stack.runner
    chunking.inner = ReturnsItsInput(chunking.inner, layer._context, None)
    x = torch.randn(T, 256)
    out = layer(x)
    buffer = ws._buffers[torch.device("cpu")]
    assert out.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    torch.testing.assert_close(out, x, rtol=0, atol=0)
