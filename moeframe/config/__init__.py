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

Every strategy is, once read, a ``{name, params}`` table (the shorter spellings above are
normalised to it first); :meth:`Config.to_dict` writes that shape.  Every error is a
:class:`~moeframe.errors.ConfigError` naming the key path (``stack.wrappers[1].name``), the
bad value and what is allowed.

The package's modules, one concern each:

- :mod:`~moeframe.config.schema`: the attrs classes and ``option()``;
- :mod:`~moeframe.config.structuring`: plain data into attrs classes, with key paths;
- :mod:`~moeframe.config.shape`: the one shape, the sugar normalised to it, key paths;
- :mod:`~moeframe.config.sources`: files, presets, ``extends`` and ``--set``;
- :mod:`~moeframe.config.resolution`: strategies looked up by name and validated;
- :mod:`~moeframe.config.loading`: :func:`load_config`, which runs them in that order.
"""

from __future__ import annotations

from moeframe.config.loading import load_config
from moeframe.config.schema import (
    ACTIVATIONS,
    DTYPE_NAMES,
    MAX_TIMEOUT_S,
    PLACEMENTS,
    Config,
    ModelConfig,
    NoParams,
    ParallelConfig,
    StackConfig,
    StrategyConfig,
    option,
)
from moeframe.config.sources import MAX_EXTENDS_DEPTH, PRESET_PACKAGE, list_presets, parse_override
from moeframe.config.structuring import FieldError, structure, unstructure

__all__ = [
    "ACTIVATIONS",
    "PLACEMENTS",
    "DTYPE_NAMES",
    "MAX_TIMEOUT_S",
    "MAX_EXTENDS_DEPTH",
    "PRESET_PACKAGE",
    "FieldError",
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
    "unstructure",
]
