"""The configuration: frozen, validated attrs classes, loaded from TOML, a preset or a dict.

The file format is part of the public interface (see ``docs/config.md``)::

    seed = 0
    [model]
    num_experts = 64
    top_k = 8
    hidden_size = 1024
    intermediate_size = 512
    activation = "silu"
    [router]
    name = "softmax_topk"
    renormalize = true
    [stack]
    runner = "default"
    kernel = "torch"
    dispatcher = "local"
    wrappers = [{ name = "chunking", params = { max_num_tokens = 256 } }]

Every error is a :class:`~moeframe.errors.ConfigError` naming the key path
(``stack.wrappers[1].name``), the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import sys
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import attrs

from moeframe.errors import ConfigError, UnknownStrategyError, UserError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ACTIVATIONS",
    "PLACEMENTS",
    "option",
    "NoParams",
    "ModelConfig",
    "StrategyConfig",
    "StackConfig",
    "ParallelConfig",
    "Config",
    "load_config",
    "list_presets",
    "parse_override",
    "structure",
]

ACTIVATIONS = ("silu", "gelu", "swigluoai")
PLACEMENTS = ("linear", "round_robin")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: the longest collective timeout (a year, in seconds): far below what timedelta and torch hold
MAX_TIMEOUT_S = 365 * 24 * 3600.0

T = TypeVar("T")


class _WrongType(ConfigError):
    """A value of the wrong type (a union tries its next member on this one only)."""


class FieldError(ValueError):
    """Raised by validators: ``field`` is the key (relative to the table) at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# -- declaring options ------------------------------------------------------------------
def _number(x: float) -> str:
    """``0`` for 0.0, ``31536000`` for 31536000.0, ``1.5`` for 1.5."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else repr(x)


def _range_text(min: float | None, max: float | None, exclusive_min: bool) -> str:
    parts = []
    if min is not None:
        parts.append(f"{'>' if exclusive_min else '>='} {_number(min)}")
    if max is not None:
        parts.append(f"<= {_number(max)}")
    return f" {' and '.join(parts)}" if parts else ""


def _not_finite(value: Any, metadata: Mapping[str, Any]) -> str:
    """The message for a non-finite float in a field with ``metadata``."""
    rng = _range_text(metadata.get("min"), metadata.get("max"), bool(metadata.get("exclusive_min")))
    return f"{value!r} is not allowed: expected a finite number{rng}"


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
            raise FieldError(attribute.name, _not_finite(value, metadata))
        # written as "not (in range)" so that NaN, which compares false, is out of range
        if min is not None and not (value > min if exclusive_min else value >= min):
            raise FieldError(attribute.name, f"{value!r} must be {'>' if exclusive_min else '>='} {_number(min)}")
        if max is not None and not value <= max:
            raise FieldError(attribute.name, f"{value!r} must be <= {_number(max)}")

    return attrs.field(default=default, validator=validate, metadata=metadata, kw_only=True)


@attrs.frozen
class NoParams:
    """The parameters of a strategy that takes none."""


# -- structuring plain data into attrs classes ------------------------------------------
def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str, metadata: Mapping[str, Any] | None = None) -> Any:
    """``value`` as type ``tp``; a float must be finite unless ``metadata["finite"]`` is false."""
    metadata = metadata or {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option_tp in options:
            if option_tp is type(None):
                continue
            try:
                return _convert(option_tp, value, path, metadata)
            except _WrongType:
                continue
        raise _WrongType(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise _WrongType(path, f"expected a list, got {value!r}")
        return tuple(_convert(item_tp, v, f"{path}[{i}]", metadata) for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(path, f"an integer of {len(str(abs(value)))} digits is too large for a number") from None
            if not math.isfinite(number) and metadata.get("finite", True):
                raise ConfigError(path, _not_finite(number, metadata))
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif attrs.has(tp):
        return structure(tp, value, path)
    else:
        return value
    raise _WrongType(path, f"expected {_type_name(tp)}, got {value!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def structure(cls: type[T], data: Any, path: str = "", *, ignore: typing.Collection[str] = ()) -> T:
    """Build attrs class ``cls`` from a mapping, with errors that name the key path."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise _WrongType(path, f"expected a table of keys, got {data!r}")
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.init and not f.name.startswith("_")}
    for key in data:
        if key in ignore:
            continue
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise ConfigError(
                _join(path, str(key)),
                f"unknown key{did_you_mean(str(key), fields)}; allowed keys: {allowed}",
            )
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(field.type, data[name], _join(path, name), field.metadata)
        elif field.default is attrs.NOTHING:
            raise ConfigError(_join(path, name), "missing required key")
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(_join(path, exc.field), exc.message) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, str(exc)) from None


def unstructure(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for an attrs instance, for printing and hashing."""
    if attrs.has(type(obj)):
        return {f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj)) if not f.name.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    return obj


# -- the config tables --------------------------------------------------------------------
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
    """A whole, validated configuration.  Build it with :func:`load_config`."""

    model: ModelConfig
    router: StrategyConfig
    stack: StackConfig = attrs.field(factory=StackConfig)
    parallel: ParallelConfig = attrs.field(factory=ParallelConfig)
    seed: int = 0
    #: where it came from: a file path or ``preset:NAME`` (not part of equality)
    source: str | None = attrs.field(default=None, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults filled in, in the file format's shape."""

        def strategy(s: StrategyConfig) -> dict[str, Any]:
            return {"name": s.name, "params": unstructure(s.params)}

        return {
            "seed": self.seed,
            "model": unstructure(self.model),
            "router": {"name": self.router.name, **unstructure(self.router.params)},
            "stack": {
                "runner": self.stack.runner.name,
                "kernel": self.stack.kernel.name,
                "dispatcher": self.stack.dispatcher.name,
                "runner_params": unstructure(self.stack.runner.params),
                "kernel_params": unstructure(self.stack.kernel.params),
                "dispatcher_params": unstructure(self.stack.dispatcher.params),
                "wrappers": [strategy(w) for w in self.stack.wrappers],
            },
            "parallel": unstructure(self.parallel),
        }

    def fingerprint(self) -> str:
        """A hash of every field: equal configs on two ranks give equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def evolve(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with ``overrides`` (dotted key paths) applied and validated."""
        return load_config(self, overrides=overrides)


# -- loading ------------------------------------------------------------------------------
PRESET_PACKAGE = "moeframe.presets"


def list_presets() -> list[str]:
    """Names of the packaged presets."""
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


#: the longest chain of ``extends`` (a file extending a file ...) that is followed
MAX_EXTENDS_DEPTH = 32


def _looks_like_path(text: str) -> bool:
    """A source written as a path (``./mixtral``, ``conf/a``, ``a.toml``), not a preset name."""
    return text.endswith(".toml") or "/" in text or (os.sep != "/" and os.sep in text)


def _read_toml_file(path: Path, label: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read config file: {exc.strerror}", label) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); TOML files are UTF-8", label
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}", label) from None


def _read_source(source: str | Path, seen: tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """The raw table of a file or preset, with its ``extends`` chain merged in, and its label.

    A name of a packaged preset is the preset unless it is written as a path (``./mixtral``,
    ``mixtral.toml``); any other name is a file when one exists.
    """
    text_source = str(source)
    path = Path(text_source)
    presets = list_presets()
    is_preset = text_source in presets and not _looks_like_path(text_source)
    if not is_preset and (_looks_like_path(text_source) or path.exists()):
        if path.is_dir():
            hint = f"; for the preset, give its name alone: {path.name!r}" if path.name in presets else ""
            raise ConfigError("", f"config file {text_source!r} is a directory, not a TOML file{hint}")
        if not path.is_file():
            suggestion = did_you_mean(path.stem, [p for p in presets if p != text_source])
            raise ConfigError(
                "",
                f"config file {text_source!r} not found{suggestion}; give a TOML file or a preset: {', '.join(presets)}",
            )
        label = str(path)
        key = str(path.resolve())
        raw = _read_toml_file(path, label)
    elif is_preset:
        label = key = f"preset:{text_source}"
        raw = tomllib.loads(resources.files(PRESET_PACKAGE).joinpath(f"{text_source}.toml").read_text("utf-8"))
    else:
        raise ConfigError(
            "",
            f"no config file or preset named {text_source!r}{did_you_mean(text_source, presets)}; "
            f"presets: {', '.join(presets)}",
        )
    if "extends" in raw:
        base_name = raw.pop("extends")
        if not isinstance(base_name, str):
            raise ConfigError("extends", f"expected a preset name or file path, got {base_name!r}", label)
        if key in seen:
            raise ConfigError("extends", f"circular 'extends' through {label}", label)
        if len(seen) + 1 >= MAX_EXTENDS_DEPTH:
            raise ConfigError(
                "extends",
                f"more than {MAX_EXTENDS_DEPTH} configs in one 'extends' chain (this one extends {base_name!r}); "
                "make a shorter chain",
                label,
            )
        relative = path.parent / base_name
        if (
            not Path(base_name).is_absolute()
            and path.suffix == ".toml"
            and (base_name not in presets or _looks_like_path(base_name))
            and relative.is_file()
        ):
            base_name = str(relative)
        base, _ = _read_source(base_name, seen + (key,))
        raw = _merge(base, raw)
    return raw, label


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            if key == "router" and "name" in value and value["name"] != out[key].get("name"):
                out[key] = copy.deepcopy(dict(value))  # another router: its parameters replace the base's
            else:
                out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_KEY = re.compile(r"[^.\[\]]+")
_INDEX = re.compile(r"\[(\d+)\]")
_KEY_PATH_HINT = "use dotted keys with list indices, such as model.top_k or stack.wrappers[0].name"


def _split_path(key: Any) -> list[str | int]:
    """``"stack.wrappers[0].name"`` -> ``["stack", "wrappers", 0, "name"]``; anything else
    (an empty key as in ``model..top_k`` or ``.seed``, a bad index) is refused."""
    if not isinstance(key, str):
        raise ConfigError("", f"a key path is a string, got {key!r} ({_KEY_PATH_HINT})")
    key = key.strip()
    parts: list[str | int] = []
    pos = 0
    while pos < len(key) or not parts:
        if parts and key[pos] == "[":
            match = _INDEX.match(key, pos)
            if not match:
                raise ConfigError(key, f"not a key path: a list index is a number in brackets ({_KEY_PATH_HINT})")
            parts.append(int(match.group(1)))
            pos = match.end()
            continue
        if parts:
            if key[pos] != ".":
                raise ConfigError(key, f"not a key path: expected '.' or '[' after {key[:pos]!r} ({_KEY_PATH_HINT})")
            pos += 1
        match = _KEY.match(key, pos)
        if not match:
            where = "at the start" if pos == 0 else f"after {key[:pos]!r}" if pos < len(key) else "at the end"
            raise ConfigError(key, f"not a key path: empty key {where} ({_KEY_PATH_HINT})")
        parts.append(match.group(0))
        pos = match.end()
    return parts


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a ``--set KEY=VALUE`` argument; VALUE is a TOML value, or else a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("", f"--set expects KEY=VALUE, got {text!r} (e.g. --set stack.kernel=triton)")
    value = value.strip()
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = _split_path(key)
    node: Any = raw
    walked = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ConfigError(f"{walked}[{part}]", f"no such item (the list has {size})")
            walked = f"{walked}[{part}]"
            if last:
                node[part] = value
            else:
                if isinstance(node[part], str):  # a wrapper given by name may be addressed as a table
                    node[part] = {"name": node[part]}
                node = node[part]
            continue
        if not isinstance(node, dict):
            raise ConfigError(walked, f"is not a table, cannot set {part!r} in it")
        walked = _join(walked, part)
        # a kernel/runner/dispatcher given as a plain name may be addressed as a table
        if not last and isinstance(node.get(part), str):
            node[part] = {"name": node[part]}
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, [] if isinstance(parts[i + 1], int) else {})


def load_config(
    source: str | Path | Mapping[str, Any] | Config,
    overrides: Mapping[str, Any] | typing.Iterable[str] | None = None,
) -> Config:
    """Load and validate a config.

    ``source``: a TOML file path, a preset name (``"qwen3-moe"``), a dict in the file's
    shape, or a :class:`Config`.  ``overrides``: a mapping of dotted key paths to values
    (``{"stack.kernel": "triton"}``) or ``KEY=VALUE`` strings as given to ``--set``;
    applied on top of the source and validated like it.
    """
    label: str | None
    if isinstance(source, Config):
        raw, label = source.to_dict(), source.source
    elif isinstance(source, Mapping):
        raw, label = copy.deepcopy(dict(source)), None
        if "extends" in raw:
            base, _ = _read_source(raw.pop("extends"))
            raw = _merge(base, raw)
    elif isinstance(source, (str, Path)):
        raw, label = _read_source(source)
    else:
        raise ConfigError("", f"cannot load a config from {type(source).__name__}")
    pairs: list[tuple[str, Any]]
    if overrides is None:
        pairs = []
    elif isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = [parse_override(o) for o in overrides]
    try:
        for key, value in pairs:
            _apply_override(raw, key, value)
        return _build(raw, label)
    except ConfigError as exc:
        raise exc.with_source(label) if label else exc from None


def _strategy(kind: str, value: Any, path: str, params_key: str | None, params: Any, model: ModelConfig) -> StrategyConfig:
    """Resolve a strategy by name through the registry and validate its parameters."""
    from moeframe.plugins import get_registry

    name_path = path
    if isinstance(value, Mapping):
        extra = set(value) - {"name", "params"}
        if extra:
            raise ConfigError(_join(path, sorted(extra)[0]), f"unknown key{did_you_mean(sorted(extra)[0], ['name', 'params'])}; allowed keys: name, params")
        if "name" not in value:
            raise ConfigError(_join(path, "name"), "missing required key")
        if params is not None and "params" in value:
            raise ConfigError(path, f"give parameters either in {path}.params or in {params_key}, not both")
        params = value.get("params", params)
        params_path = _join(path, "params") if "params" in value else params_key or _join(path, "params")
        name_path = _join(path, "name")
        value = value["name"]
    else:
        params_path = params_key or _join(path, "params")
    if not isinstance(value, str):
        raise ConfigError(name_path, f"expected a {kind} name (a string), got {value!r}")
    try:
        entry = get_registry().get(kind, value)
    except UnknownStrategyError as exc:
        raise ConfigError(name_path, str(exc)) from None
    except UserError as exc:
        raise ConfigError(name_path, str(exc)) from None
    impl = entry.load()
    params_cls = getattr(impl, "Params", NoParams)
    parsed = structure(params_cls, params if params is not None else {}, params_path)
    check = getattr(impl, "check_config", None)
    if check is not None:
        try:
            check(model, parsed)
        except FieldError as exc:
            raise ConfigError(_join(params_path, exc.field), exc.message) from None
        except ValueError as exc:
            raise ConfigError(params_path, str(exc)) from None
    return StrategyConfig(value, parsed)


def _build(raw: dict[str, Any], label: str | None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("", "expected a table at the top level")
    allowed = ("seed", "model", "router", "stack", "parallel")
    for key in raw:
        if key not in allowed:
            raise ConfigError(str(key), f"unknown key{did_you_mean(str(key), allowed)}; allowed keys: {', '.join(allowed)}")
    seed = _convert(int, raw.get("seed", 0), "seed")
    if "model" not in raw:
        raise ConfigError("model", "missing required table [model]")
    model = structure(ModelConfig, raw["model"], "model")
    parallel = structure(ParallelConfig, raw.get("parallel", {}), "parallel")

    router_raw = raw.get("router")
    if not isinstance(router_raw, Mapping):
        raise ConfigError("router", "missing required table [router] (with at least name = ...)")
    if "name" not in router_raw:
        raise ConfigError("router.name", "missing required key")
    router_params = {k: v for k, v in router_raw.items() if k != "name"}
    router = _strategy("router", router_raw["name"], "router.name", "router", router_params, model)
    if router_params and isinstance(router_raw["name"], Mapping):  # pragma: no cover - defensive
        raise ConfigError("router", "unexpected nesting")

    stack_raw = raw.get("stack", {})
    if not isinstance(stack_raw, Mapping):
        raise ConfigError("stack", f"expected a table of keys, got {stack_raw!r}")
    stack_keys = ("runner", "kernel", "dispatcher", "wrappers", "runner_params", "kernel_params", "dispatcher_params")
    for key in stack_raw:
        if key not in stack_keys:
            raise ConfigError(f"stack.{key}", f"unknown key{did_you_mean(str(key), stack_keys)}; allowed keys: {', '.join(stack_keys)}")
    parts: dict[str, StrategyConfig] = {}
    for kind, default in (("runner", "default"), ("kernel", "torch"), ("dispatcher", "local")):
        params_key = f"{kind}_params"
        params = stack_raw.get(params_key)
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError(f"stack.{params_key}", f"expected a table of parameters, got {params!r}")
        parts[kind] = _strategy(kind, stack_raw.get(kind, default), f"stack.{kind}", f"stack.{params_key}", params, model)
    wrappers_raw = stack_raw.get("wrappers", [])
    if not isinstance(wrappers_raw, (list, tuple)):
        raise ConfigError("stack.wrappers", f"expected a list of wrappers (outermost first), got {wrappers_raw!r}")
    wrappers = tuple(
        _strategy("wrapper", w, f"stack.wrappers[{i}]", None, None, model) for i, w in enumerate(wrappers_raw)
    )
    stack = StackConfig(parts["runner"], parts["kernel"], parts["dispatcher"], wrappers)
    return Config(model=model, router=router, stack=stack, parallel=parallel, seed=seed, source=label)
