"""The config's schema: frozen, validated attrs classes, and ``option()`` to declare a field.

A strategy's parameters are an attrs class of the same kind (its ``Params``), declared
with :func:`option` so that ``moeframe explain`` and the config reference can show them.
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from moeframe.config.structuring import FieldError, not_finite_message, number_text, unstructure
from moeframe.errors import did_you_mean

if TYPE_CHECKING:
    from moeframe.plugins.manager import Registry

__all__ = [
    "ACTIVATIONS",
    "PLACEMENTS",
    "DTYPE_NAMES",
    "MAX_TIMEOUT_S",
    "option",
    "NoParams",
    "ModelConfig",
    "StrategyConfig",
    "StackConfig",
    "ParallelConfig",
    "Config",
]

ACTIVATIONS = ("silu", "gelu", "swigluoai")
PLACEMENTS = ("linear", "round_robin")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: the longest collective timeout (a year, in seconds): far below what timedelta and torch hold
MAX_TIMEOUT_S = 365 * 24 * 3600.0


def option(
    default: Any = attrs.NOTHING,
    *,
    help: str = "",
    choices: typing.Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    exclusive_min: bool = False,
    finite: bool = True,
) -> Any:
    """An attrs field for a config table or a strategy's ``Params``.

    ``help`` is shown by ``moeframe explain`` and in the config reference; ``choices``,
    ``min``/``max`` are checked with a message naming the key path.  A float must be
    finite (NaN and infinities are refused) unless ``finite=False``; NaN never satisfies
    ``min`` or ``max``.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "min": min,
        "max": max,
        "exclusive_min": exclusive_min,
        "finite": finite,
    }

    def validate(_: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return
        if choices is not None and value not in choices:
            raise FieldError(
                attribute.name,
                f"{value!r} is not allowed{did_you_mean(str(value), [str(c) for c in choices])}; "
                f"choose one of: {', '.join(repr(c) for c in choices)}",
            )
        if finite and isinstance(value, float) and not math.isfinite(value):
            raise FieldError(attribute.name, not_finite_message(value, metadata))
        # written as "not (in range)" so that NaN, which compares false, is out of range
        if min is not None and not (value > min if exclusive_min else value >= min):
            raise FieldError(attribute.name, f"{value!r} must be {'>' if exclusive_min else '>='} {number_text(min)}")
        if max is not None and not value <= max:
            raise FieldError(attribute.name, f"{value!r} must be <= {number_text(max)}")

    return attrs.field(default=default, validator=validate, metadata=metadata, kw_only=True)


@attrs.frozen
class NoParams:
    """The parameters of a strategy that takes none."""


@attrs.frozen
class ModelConfig:
    """``[model]``: the MoE layer's shape, activation and dtype."""

    num_experts: int = option(help="number of routed experts E", min=1)
    top_k: int = option(help="experts chosen per token K", min=1)
    hidden_size: int = option(help="hidden size H", min=1)
    intermediate_size: int = option(help="intermediate size I of each expert", min=1)
    activation: str = option("silu", help="expert activation", choices=ACTIVATIONS)
    swiglu_alpha: float = option(1.702, help="swigluoai only: sigmoid slope alpha", min=0.0, exclusive_min=True)
    swiglu_limit: float = option(7.0, help="swigluoai only: clamp limit", min=0.0, exclusive_min=True)
    expert_bias: bool = option(False, help="experts have biases b13 [E, 2I] and b2 [E, H]")
    dtype: str = option("float32", help="weights and activations dtype", choices=DTYPE_NAMES)

    def __attrs_post_init__(self) -> None:
        if self.top_k > self.num_experts:
            raise FieldError("top_k", f"{self.top_k} must be <= num_experts ({self.num_experts})")

    @property
    def torch_dtype(self) -> Any:
        from moeframe.numerics import DTYPES

        return DTYPES[self.dtype]


@attrs.frozen
class StrategyConfig:
    """A strategy selected by name, with its validated parameters."""

    name: str
    params: Any = attrs.field(factory=NoParams)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "params": {...}}``: the shape every strategy has in a config."""
        return {"name": self.name, "params": unstructure(self.params)}


@attrs.frozen
class StackConfig:
    """``[stack]``: which runner, kernel and dispatcher, and the wrappers around them."""

    runner: StrategyConfig = attrs.field(factory=lambda: StrategyConfig("default"))
    kernel: StrategyConfig = attrs.field(factory=lambda: StrategyConfig("torch"))
    dispatcher: StrategyConfig = attrs.field(factory=lambda: StrategyConfig("local"))
    #: outermost first
    wrappers: tuple[StrategyConfig, ...] = ()


@attrs.frozen
class ParallelConfig:
    """``[parallel]``: how ranks split the work (one process: all 1)."""

    dp_size: int = option(1, help="data-parallel ranks (each with its own tokens)", min=1)
    ep_size: int | None = option(
        None, help="expert-parallel ranks (experts spread over them); default: every rank not used by TP", min=1
    )
    tp_size: int = option(1, help="tensor-parallel ranks (each expert's intermediate size split)", min=1)
    placement: str = option("linear", help="how experts are placed on EP ranks", choices=PLACEMENTS)
    timeout_s: float = option(
        120.0,
        help="seconds a rank waits on a collective before giving up (at most a year)",
        min=0.0,
        exclusive_min=True,
        max=MAX_TIMEOUT_S,
    )

    def resolved_ep_size(self, world_size: int) -> int:
        """``ep_size``, or when unset the ranks left over by tensor parallelism."""
        return self.ep_size if self.ep_size is not None else max(1, world_size // self.tp_size)


@attrs.frozen
class Config:
    """A whole, validated configuration.  Build it with :func:`~moeframe.config.load_config`."""

    model: ModelConfig
    router: StrategyConfig
    stack: StackConfig = attrs.field(factory=StackConfig)
    parallel: ParallelConfig = attrs.field(factory=ParallelConfig)
    seed: int = 0
    #: where it came from: a file path or ``preset:NAME`` (not part of equality)
    source: str | None = attrs.field(default=None, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults filled in, in the one shape a config has (every strategy a
        ``{name, params}`` table); :func:`~moeframe.config.load_config` reads it back."""
        return {
            "seed": self.seed,
            "model": unstructure(self.model),
            "router": self.router.to_dict(),
            "stack": {
                "runner": self.stack.runner.to_dict(),
                "kernel": self.stack.kernel.to_dict(),
                "dispatcher": self.stack.dispatcher.to_dict(),
                "wrappers": [w.to_dict() for w in self.stack.wrappers],
            },
            "parallel": unstructure(self.parallel),
        }

    def fingerprint(self) -> str:
        """A hash of every field: equal configs on two ranks give equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def evolve(self, overrides: Mapping[str, Any] | Iterable[str], *, registry: Registry | None = None) -> Config:
        """A copy with ``overrides`` (dotted key paths) applied and validated."""
        from moeframe.config.loading import load_config

        return load_config(self, overrides=overrides, registry=registry)
