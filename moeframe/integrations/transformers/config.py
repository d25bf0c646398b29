"""transformers model configs -> moeframe configs.

:func:`config_from_hf` recognises the model family from the config's ``model_type`` (the
class attribute every transformers config class carries) and maps every field of the
family's MoE block to a :class:`moeframe.Config`:

============  ===================================================================
family        what moeframe builds
============  ===================================================================
mixtral       ``softmax_topk`` (always renormalised, fp32 weights)
qwen2_moe     ``softmax_topk`` (``norm_topk_prob``), a gated ``shared_experts``
              of ``shared_expert_intermediate_size``
qwen3_moe     ``softmax_topk`` (``norm_topk_prob``)
deepseek_v3   ``sigmoid_grouped_topk`` (``n_group``, ``topk_group``,
              ``routed_scaling_factor``, ``norm_topk_prob``, the correction bias), an
              ungated ``shared_experts`` of ``moe_intermediate_size * n_shared_experts``
gpt_oss       ``topk_softmax``, ``swigluoai`` with ``swiglu_alpha``/``swiglu_limit``,
              expert biases
llama4        ``sigmoid_top1`` (weight on the expert input), an ungated
              ``shared_experts`` of ``intermediate_size``
============  ===================================================================

The activation is the family's: GPT-OSS's experts compute ``swigluoai`` whatever its
``hidden_act`` says; the other families apply ``hidden_act`` as a gated MLP
(``act(gate) * up``), so ``hidden_act`` is mapped (``silu``/``swish`` -> ``silu``,
``gelu`` -> ``gelu``) and any other value is refused.

Importing this module does not import transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from moeframe.config import Config, load_config, parse_override
from moeframe.errors import ConfigError

__all__ = ["SUPPORTED_FAMILIES", "Family", "family_of", "moe_layer_indices", "config_from_hf", "hf_text_config"]

#: the transformers ``model_type`` values moeframe maps (``llama4_text`` is ``llama4``'s text model)
SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4")

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
#: ``hidden_act`` -> moeframe activation, for families whose experts compute ``act(gate) * up``
_GATED_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu"}


@attrs.frozen
class Family:
    """What moeframe knows about one transformers MoE family."""

    name: str
    #: the raw moeframe config (the file format's shape) for a text config of this family
    build: Callable[[Any], dict[str, Any]] = attrs.field(repr=False)
    #: the decoder layer indices whose MLP is an MoE block
    moe_layers: Callable[[Any], list[int]] = attrs.field(repr=False)


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None else value


def _gated_activation(cfg: Any, family: str) -> str:
    act = str(_get(cfg, "hidden_act", "silu"))
    if act not in _GATED_ACTIVATIONS:
        raise ConfigError(
            "",
            f"{family}: hidden_act = {act!r} has no moeframe activation; moeframe computes "
            f"{', '.join(sorted(set(_GATED_ACTIVATIONS)))} for this family's gated experts",
        )
    return _GATED_ACTIVATIONS[act]


def _model(cfg: Any, num_experts: int, intermediate_size: int, activation: str, **extra: Any) -> dict[str, Any]:
    return {
        "num_experts": int(num_experts),
        "top_k": int(cfg.num_experts_per_tok),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(intermediate_size),
        "activation": activation,
        "dtype": _dtype_name(getattr(cfg, "dtype", None)),
        **extra,
    }


def _shared(intermediate_size: int, gated: bool) -> dict[str, Any]:
    return {"name": "shared_experts", "params": {"intermediate_size": int(intermediate_size), "gated": gated}}


def _mixtral(cfg: Any) -> dict[str, Any]:
    return {
        "model": _model(cfg, cfg.num_local_experts, cfg.intermediate_size, _gated_activation(cfg, "mixtral")),
        "router": {"name": "softmax_topk", "renormalize": True, "weights_dtype": "float32"},
        "stack": {"wrappers": []},
    }


def _qwen(cfg: Any, family: str, shared: bool) -> dict[str, Any]:
    wrappers = []
    if shared and _get(cfg, "shared_expert_intermediate_size", 0) > 0:
        wrappers.append(_shared(cfg.shared_expert_intermediate_size, gated=True))
    return {
        "model": _model(cfg, cfg.num_experts, cfg.moe_intermediate_size, _gated_activation(cfg, family)),
        "router": {"name": "softmax_topk", "renormalize": bool(cfg.norm_topk_prob), "weights_dtype": "activation"},
        "stack": {"wrappers": wrappers},
    }


def _qwen_moe_layers(cfg: Any) -> list[int]:
    dense = set(_get(cfg, "mlp_only_layers", []))
    step = int(_get(cfg, "decoder_sparse_step", 1))
    if _get(cfg, "num_experts", 0) <= 0:
        return []
    return [i for i in range(cfg.num_hidden_layers) if i not in dense and (i + 1) % step == 0]


def _deepseek_v3(cfg: Any) -> dict[str, Any]:
    wrappers = []
    n_shared = int(_get(cfg, "n_shared_experts", 0))
    if n_shared > 0:
        wrappers.append(_shared(cfg.moe_intermediate_size * n_shared, gated=False))
    return {
        "model": _model(cfg, cfg.n_routed_experts, cfg.moe_intermediate_size, _gated_activation(cfg, "deepseek_v3")),
        "router": {
            "name": "sigmoid_grouped_topk",
            "n_group": int(_get(cfg, "n_group", 1)),
            "topk_group": int(_get(cfg, "topk_group", 1)),
            "routed_scaling_factor": float(_get(cfg, "routed_scaling_factor", 1.0)),
            "renormalize": bool(_get(cfg, "norm_topk_prob", False)),
            "correction_bias": True,
        },
        "stack": {"wrappers": wrappers},
    }


def _gpt_oss(cfg: Any) -> dict[str, Any]:
    # GPT-OSS's experts compute swigluoai whatever hidden_act says (its config says "silu")
    model = _model(
        cfg,
        cfg.num_local_experts,
        cfg.intermediate_size,
        "swigluoai",
        swiglu_alpha=float(_get(cfg, "swiglu_alpha", 1.702)),
        swiglu_limit=float(_get(cfg, "swiglu_limit", 7.0)),
        expert_bias=True,
    )
    return {"model": model, "router": {"name": "topk_softmax"}, "stack": {"wrappers": []}}


def _llama4(cfg: Any) -> dict[str, Any]:
    if int(cfg.num_experts_per_tok) != 1:
        raise ConfigError(
            "",
            f"llama4: num_experts_per_tok = {cfg.num_experts_per_tok}; moeframe's sigmoid_top1 router "
            "(the weight on the expert input) needs 1, as Llama-4's checkpoints have",
        )
    activation = _gated_activation(cfg, "llama4")
    return {
        "model": _model(cfg, cfg.num_local_experts, cfg.intermediate_size, activation),
        "router": {"name": "sigmoid_top1"},
        "stack": {"wrappers": [_shared(cfg.intermediate_size, gated=False)]},
    }


def _every_layer(cfg: Any) -> list[int]:
    return list(range(cfg.num_hidden_layers))


_FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", _mixtral, _every_layer),
    "qwen2_moe": Family("qwen2_moe", lambda c: _qwen(c, "qwen2_moe", shared=True), _qwen_moe_layers),
    "qwen3_moe": Family("qwen3_moe", lambda c: _qwen(c, "qwen3_moe", shared=False), _qwen_moe_layers),
    "deepseek_v3": Family(
        "deepseek_v3",
        _deepseek_v3,
        lambda c: [i for i in range(c.num_hidden_layers) if i >= int(_get(c, "first_k_dense_replace", 0))],
    ),
    "gpt_oss": Family("gpt_oss", _gpt_oss, _every_layer),
    "llama4": Family("llama4", _llama4, lambda c: sorted(int(i) for i in _get(c, "moe_layers", []))),
}
_ALIASES = {"llama4_text": "llama4"}


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(
            "model.dtype", f"the model's dtype {name!r} is not one moeframe runs; use one of: {', '.join(_DTYPES)}"
        )
    return _DTYPES[name]


def _as_config(hf_config: Any) -> Any:
    """A config object from a transformers config or a ``config.json`` mapping."""
    if isinstance(hf_config, Mapping):
        model_type = hf_config.get("model_type")
        family = _ALIASES.get(str(model_type), model_type)
        if family not in _FAMILIES:
            _unsupported(model_type, "config.json")
        from transformers import AutoConfig

        return AutoConfig.for_model(**dict(hf_config))
    return hf_config


def _unsupported(model_type: Any, where: str) -> None:
    raise ConfigError(
        "",
        f"{where}: model type {model_type!r} is not a family moeframe maps; "
        f"supported families: {', '.join(SUPPORTED_FAMILIES)}",
    )


def hf_text_config(hf_config: Any) -> Any:
    """The part of ``hf_config`` that describes the decoder (``text_config`` of a
    multimodal Llama-4 config; the config itself otherwise)."""
    hf_config = _as_config(hf_config)
    if getattr(hf_config, "model_type", None) == "llama4" and getattr(hf_config, "text_config", None) is not None:
        return hf_config.text_config
    return hf_config


def family_of(hf_config: Any) -> Family:
    """The :class:`Family` of a transformers config (or ``config.json`` mapping); a
    :class:`~moeframe.errors.ConfigError` listing the supported families otherwise."""
    cfg = hf_text_config(hf_config)
    model_type = getattr(cfg, "model_type", None)
    name = _ALIASES.get(str(model_type), str(model_type))
    if name not in _FAMILIES:
        _unsupported(model_type, type(cfg).__name__)
    return _FAMILIES[name]


def moe_layer_indices(hf_config: Any) -> list[int]:
    """The decoder layers whose MLP is an MoE block (DeepSeek-V3's ``first_k_dense_replace``,
    Qwen's ``mlp_only_layers``/``decoder_sparse_step`` and Llama-4's ``moe_layers`` leave
    the others dense)."""
    return family_of(hf_config).moe_layers(hf_text_config(hf_config))


def raw_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """The moeframe config of ``hf_config``'s MoE blocks as plain data (the TOML file's
    shape), before any override."""
    family = family_of(hf_config)
    raw = family.build(hf_text_config(hf_config))
    raw["seed"] = 0
    return raw


def _override_pairs(overrides: Mapping[str, Any] | Iterable[str] | None) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [parse_override(overrides)]
    return [parse_override(o) for o in overrides]


def _wrapper_name(item: Any) -> Any:
    return item if isinstance(item, str) else item.get("name") if isinstance(item, Mapping) else None


def compose_wrappers(family_wrappers: list[dict[str, Any]], user: Any) -> Any:
    """The user's ``stack.wrappers`` with the family's required wrappers composed in.

    A family part the user names keeps the user's position and gets the family's
    parameters (the user's, where given, win); a family part the user leaves out is
    added innermost (last).  A value that is not a list is returned as it is, for the
    config's own error.
    """
    if not isinstance(user, (list, tuple)):
        return user
    out: list[Any] = []
    for item in user:
        name = _wrapper_name(item)
        family_part = next((w for w in family_wrappers if w["name"] == name), None)
        composed = item
        if family_part is not None:
            params = dict(family_part["params"])
            if isinstance(item, Mapping):
                user_params = item.get("params", {})
                if isinstance(user_params, Mapping):
                    params.update(user_params)
                else:
                    params = user_params  # not a table: the config reports it
                composed = {**item, "params": params}
            else:
                composed = {"name": name, "params": params}
        out.append(copy.deepcopy(composed))
    named = {_wrapper_name(item) for item in user}
    out.extend(copy.deepcopy(w) for w in family_wrappers if w["name"] not in named)
    return out


def config_from_hf(
    hf_config: Any,
    *,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Config:
    """The :class:`moeframe.Config` of the MoE blocks of a transformers model.

    ``hf_config``: a transformers config (``model.config``; a multimodal Llama-4 config's
    ``text_config`` is used) or a ``config.json`` mapping.  ``overrides``: dotted key
    paths as in :func:`moeframe.load_config` (``{"stack.kernel": "fused_cpu"}``) or
    ``KEY=VALUE`` strings as given to ``--set``.  A ``stack.wrappers`` override is
    composed with the parts the family needs (``shared_experts`` for Qwen2-MoE,
    DeepSeek-V3 and Llama-4, with its size and gate): they are added innermost unless
    the list names them, which sets their position.

    ``model.dtype`` is the config's ``dtype`` (float32 when unset).  Unsupported
    families, activations and dtypes, and unknown override keys, are one-line
    :class:`~moeframe.errors.ConfigError`.
    """
    raw = raw_config_from_hf(hf_config)
    family_wrappers = list(raw["stack"]["wrappers"])
    pairs = []
    for key, value in _override_pairs(overrides):
        pairs.append((key, compose_wrappers(family_wrappers, value) if key.strip() == "stack.wrappers" else value))
    source = f"transformers:{family_of(hf_config).name}"
    try:
        config = load_config(raw, overrides=dict(pairs))
    except ConfigError as exc:
        raise exc.with_source(source) from None
    return attrs.evolve(config, source=source)
