"""The one shape of a config as plain data, and the sugar that is normalised to it.

In that shape every strategy — the router, the stack's runner, kernel and dispatcher,
each wrapper — is a table ``{name = ..., params = {...}}``.  These spellings are accepted
and normalised here, before anything is merged, overridden or validated:

- a name alone: ``kernel = "fused_cpu"``, ``wrappers = ["chunking"]``, ``router = "sigmoid_top1"``;
- ``stack.kernel_params`` (and ``runner_params``, ``dispatcher_params``) beside ``stack.kernel``;
- the router's parameters beside its name in ``[router]`` (``renormalize = false``).

The same holds for key paths: ``router.renormalize`` is ``router.params.renormalize`` and
``stack.kernel_params.backend`` is ``stack.kernel.params.backend``.  :class:`Spelling`
remembers how the user wrote each, so that errors name the path the user wrote.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from moeframe.errors import ConfigError

__all__ = [
    "STACK_PARTS",
    "STRATEGY_PATHS",
    "Spelling",
    "normalize",
    "normalize_strategy",
    "merge",
    "merge_strategy",
    "split_path",
    "canonical_parts",
]

#: the stack's single strategies, besides its list of wrappers
STACK_PARTS = ("runner", "kernel", "dispatcher")
#: where a single strategy sits in a config
STRATEGY_PATHS = frozenset({("router",), *(("stack", kind) for kind in STACK_PARTS)})


class Spelling:
    """How the user wrote the paths that normalisation moved: canonical prefix -> written
    prefix (``router.params`` -> ``router``, ``stack.kernel.name`` -> ``stack.kernel``)."""

    def __init__(self) -> None:
        self._written: dict[str, str] = {}

    def record(self, canonical: str, written: str) -> None:
        self._written[canonical] = written

    def forget(self, canonical_prefix: str) -> None:
        """Drop what was recorded at or under ``canonical_prefix`` (a value set anew)."""
        for key in [k for k in self._written if _under(k, canonical_prefix)]:
            del self._written[key]

    def written(self, path: str) -> str:
        """``path`` (canonical) as the user wrote it."""
        best = max((k for k in self._written if _under(path, k)), key=len, default=None)
        return path if best is None else self._written[best] + path[len(best) :]


def _under(path: str, prefix: str) -> bool:
    return path == prefix or (path.startswith(prefix) and path[len(prefix)] in ".[")


def normalize_strategy(value: Any, path: str, spelling: Spelling, *, flat_params: bool = False) -> Any:
    """One strategy in the one shape: a name becomes ``{"name": name}``; with
    ``flat_params`` (the router), keys beside ``name`` become ``params``.  Anything else
    is left for validation to report."""
    if isinstance(value, str):
        spelling.record(f"{path}.name", path)
        return {"name": value}
    if not isinstance(value, Mapping):
        return value
    out = dict(value)
    if flat_params:
        flat = {k: v for k, v in out.items() if k not in ("name", "params")}
        if flat:
            if "params" in out:
                first = sorted(map(str, flat))[0]
                raise ConfigError(
                    f"{path}.{first}",
                    f"give the {path}'s parameters either beside its name or in {path}.params, not both",
                )
            out = {k: v for k, v in out.items() if k == "name"}
            out["params"] = flat
            spelling.record(f"{path}.params", path)
    return out


def normalize(raw: Any, spelling: Spelling) -> Any:
    """A copy of the config table ``raw`` in the one shape (idempotent).  Tables that are
    not where they should be are left as they are, for validation to report."""
    if not isinstance(raw, Mapping):
        return raw
    out = dict(raw)
    if "router" in out:
        out["router"] = normalize_strategy(out["router"], "router", spelling, flat_params=True)
    stack = out.get("stack")
    if isinstance(stack, Mapping):
        stack = dict(stack)
        for kind in STACK_PARTS:
            path = f"stack.{kind}"
            if kind in stack:
                stack[kind] = normalize_strategy(stack[kind], path, spelling)
            params_key = f"{kind}_params"
            if params_key in stack:
                params = stack.pop(params_key)
                node = stack.get(kind, {})
                if isinstance(node, Mapping):
                    if "params" in node:
                        raise ConfigError(
                            path, f"give parameters either in {path}.params or in stack.{params_key}, not both"
                        )
                    stack[kind] = {**node, "params": params}
                    spelling.record(f"{path}.params", f"stack.{params_key}")
                else:  # not a strategy: leave both for validation to report
                    stack[params_key] = params
        wrappers = stack.get("wrappers")
        if isinstance(wrappers, (list, tuple)):
            stack["wrappers"] = [
                normalize_strategy(w, f"stack.wrappers[{i}]", spelling) for i, w in enumerate(wrappers)
            ]
        out["stack"] = stack
    return out


def _merge_tables(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        old = out.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = _merge_tables(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_strategy(base: Any, top: Any) -> Any:
    """``top`` given over ``base`` (both in the one shape): naming another strategy
    replaces ``base``, parameters and all; otherwise the parameters are merged."""
    if not (isinstance(base, Mapping) and isinstance(top, Mapping)):
        return copy.deepcopy(top)
    if "name" in top and top["name"] != base.get("name"):
        return copy.deepcopy(dict(top))
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        old = out.get(key)
        if key == "params" and isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = _merge_tables(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge(base: Mapping[str, Any], top: Mapping[str, Any], at: tuple[str, ...] = ()) -> dict[str, Any]:
    """Config ``top`` (one that ``extends`` ``base``) over ``base``, both in the one shape:
    tables merge key by key, lists and values replace, strategies merge as in
    :func:`merge_strategy`."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        here = (*at, key)
        old = out.get(key)
        if here in STRATEGY_PATHS:
            out[key] = merge_strategy(old, value)
        elif isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = merge(old, value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


_KEY = re.compile(r"[^.\[\]]+")
_INDEX = re.compile(r"\[(\d+)\]")
_KEY_PATH_HINT = "use dotted keys with list indices, such as model.top_k or stack.wrappers[0].name"


def split_path(key: Any) -> list[str | int]:
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


def format_path(parts: list[str | int]) -> str:
    """``["stack", "wrappers", 0]`` -> ``"stack.wrappers[0]"``."""
    out = ""
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else f"{out}.{part}" if out else part
    return out


def canonical_parts(parts: list[str | int], spelling: Spelling) -> list[str | int]:
    """A split key path in the one shape (``router.renormalize`` ->
    ``router.params.renormalize``), recording how it was written."""
    if len(parts) >= 2 and parts[0] == "router" and parts[1] not in ("name", "params"):
        spelling.record("router.params", "router")
        return ["router", "params", *parts[1:]]
    if len(parts) >= 2 and parts[0] == "stack" and isinstance(parts[1], str) and parts[1].endswith("_params"):
        kind = parts[1][: -len("_params")]
        if kind in STACK_PARTS:
            spelling.record(f"stack.{kind}.params", f"stack.{kind}_params")
            return ["stack", kind, "params", *parts[2:]]
    written = format_path(parts[:2] if parts[0] == "router" else parts[:3])
    if written in ("router.params", *(f"stack.{kind}.params" for kind in STACK_PARTS)):
        spelling.record(written, written)  # written in the one shape: errors say so too
    return parts
