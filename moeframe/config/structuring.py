"""Plain data (what TOML gives: tables, arrays, scalars) into attrs classes and back.

:func:`structure` builds any attrs class — the config tables and every strategy's
``Params``, plugins' included — from a mapping, converting each value to its field's type.
It is the one place values are checked on the way in, so every error names the key path
(``stack.wrappers[1].params.max_num_tokens``), the bad value and what is allowed, with a
suggestion for a misspelt key.  A float must be finite unless its field says otherwise
(``option(..., finite=False)``).
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

import attrs

from moeframe.errors import ConfigError, did_you_mean

__all__ = ["FieldError", "structure", "unstructure", "convert", "join_path"]

T = TypeVar("T")


class FieldError(ValueError):
    """Raised by validators: ``field`` is the key (relative to the table) at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class WrongType(ConfigError):
    """A value of the wrong type (a union tries its next member on this error only)."""


def number_text(x: float) -> str:
    """``0`` for 0.0, ``31536000`` for 31536000.0, ``1.5`` for 1.5."""
    return str(int(x)) if isinstance(x, float) and x.is_integer() else repr(x)


def range_text(min: float | None, max: float | None, exclusive_min: bool) -> str:
    """`` > 0 and <= 10`` for a field's bounds, or an empty string."""
    parts = []
    if min is not None:
        parts.append(f"{'>' if exclusive_min else '>='} {number_text(min)}")
    if max is not None:
        parts.append(f"<= {number_text(max)}")
    return f" {' and '.join(parts)}" if parts else ""


def not_finite_message(value: Any, metadata: Mapping[str, Any]) -> str:
    """The message for a non-finite float in a field with ``metadata`` (see ``option``)."""
    bounds = range_text(metadata.get("min"), metadata.get("max"), bool(metadata.get("exclusive_min")))
    return f"{value!r} is not allowed: expected a finite number{bounds}"


def join_path(path: str, key: str) -> str:
    """``"model"`` + ``"top_k"`` -> ``"model.top_k"``; a key at the top level stays itself."""
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str, metadata: Mapping[str, Any] | None = None) -> Any:
    """``value`` as type ``tp`` (a scalar, an optional, a tuple or an attrs class), or a
    :class:`ConfigError` at ``path``.  A float must be finite unless ``metadata`` (the
    field's) has ``finite`` false."""
    metadata = metadata or {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return convert(member, value, path, metadata)
            except WrongType:
                continue
        raise WrongType(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        (item_tp, *_rest) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise WrongType(path, f"expected a list, got {value!r}")
        return tuple(convert(item_tp, v, f"{path}[{i}]", metadata) for i, v in enumerate(value))
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
                digits = len(str(abs(value)))
                raise ConfigError(path, f"an integer of {digits} digits is too large for a number") from None
            if not math.isfinite(number) and metadata.get("finite", True):
                raise ConfigError(path, not_finite_message(number, metadata))
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif attrs.has(tp):
        return structure(tp, value, path)
    else:
        return value
    raise WrongType(path, f"expected {_type_name(tp)}, got {value!r}")


def structure(cls: type[T], data: Any, path: str = "", *, ignore: Collection[str] = ()) -> T:
    """Build attrs class ``cls`` from a mapping, with errors that name the key path.

    Unknown keys (other than ``ignore``) are refused with a did-you-mean; missing keys
    without a default are refused; the class's validators run, and a
    :class:`FieldError` they raise names its field under ``path``.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise WrongType(path, f"expected a table of keys, got {data!r}")
    klass = cls  # narrowed to an attrs class below; ``cls`` keeps the type it returns
    if not attrs.has(klass):
        raise TypeError(f"structure() builds attrs classes, not {cls!r}")
    attrs.resolve_types(klass)
    fields = {f.name: f for f in attrs.fields(klass) if f.init and not f.name.startswith("_")}
    for key in data:
        if key in ignore:
            continue
        if key not in fields:
            allowed = ", ".join(fields) or "none"
            raise ConfigError(
                join_path(path, str(key)),
                f"unknown key{did_you_mean(str(key), fields)}; allowed keys: {allowed}",
            )
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(field.type, data[name], join_path(path, name), field.metadata)
        elif field.default is attrs.NOTHING:
            raise ConfigError(join_path(path, name), "missing required key")
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise ConfigError(join_path(path, exc.field), exc.message) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, str(exc)) from None


def unstructure(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for an attrs instance, for printing and hashing."""
    if attrs.has(type(obj)):
        fields = [f for f in attrs.fields(type(obj)) if not f.name.startswith("_")]
        return {f.name: unstructure(getattr(obj, f.name)) for f in fields}
    if isinstance(obj, (list, tuple)):
        return [unstructure(v) for v in obj]
    return obj
