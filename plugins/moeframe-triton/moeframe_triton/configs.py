"""Block-size configs of the fused kernels: heuristic, tuned JSON files, override folder.

A layer shape is ``(E, N, K, dtype)``: ``E`` local experts, ``N`` the intermediate size
``I`` of one expert (``w2``'s last dimension, vLLM's ``N``), ``K`` the hidden size ``H``.
One :class:`MoEConfig` holds the block size along tokens (shared by the align step and
both GEMMs) and a :class:`GemmConfig` for each GEMM: ``up`` (``x @ w13``, gate and up
with the activation fused; its ``block_n`` counts columns of ``I``) and ``down``
(``h @ w2``).

Tuned files are named by :func:`config_file_name`, e.g.
``E=8,N=14336,K=4096,device_name=NVIDIA_H200,dtype=bfloat16.json``, and map batch sizes
(token counts ``M``) to configs; the nearest batch size wins.  :func:`get_config` looks
in the folder named by ``MOEFRAME_TRITON_CONFIG_DIR`` first, then in the files shipped
in ``moeframe_triton/tuned_configs/``, and otherwise falls back to
:func:`default_config` with one :class:`ConfigWarning` per shape naming the missing file.

This module imports neither torch nor triton.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from moeframe.errors import InputError
from moeframe.files import atomic_write_text

__all__ = [
    "CONFIG_DIR_ENV",
    "SHIPPED_DIR",
    "ConfigWarning",
    "GemmConfig",
    "MoEConfig",
    "config_file_name",
    "default_config",
    "interpreter_config",
    "read_config_file",
    "write_config_file",
    "lookup_config",
    "get_config",
    "clear_caches",
]

#: Environment variable naming a folder of tuned files that take precedence over the shipped ones.
CONFIG_DIR_ENV = "MOEFRAME_TRITON_CONFIG_DIR"
#: The tuned files shipped with the package.
SHIPPED_DIR = Path(__file__).resolve().parent / "tuned_configs"
#: Shared memory a config may plan for (bytes); H100/H200 offer 227 KiB per block.
SHARED_MEMORY_BUDGET = 200 * 1024
FILE_FORMAT_VERSION = 1
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: bytes per element of the intermediate ``h`` (fp32 whatever the activation dtype), the
#: down GEMM's A operand
H_BYTES = 4


class ConfigWarning(UserWarning):
    """No tuned config file for a layer shape on this device: the heuristic is used."""


def _power_of_two(minimum: int, maximum: int) -> Any:
    def check(_: Any, attribute: attrs.Attribute, value: int) -> None:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < minimum
            or value > maximum
            or value & (value - 1)
        ):
            raise ValueError(f"{attribute.name} must be a power of two in [{minimum}, {maximum}], got {value!r}")

    return check


def _positive(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class GemmConfig:
    """Tiling of one grouped GEMM: ``block_n`` x ``block_k`` tiles, ``group_m`` rows of
    blocks per swizzle group, and the launch's ``num_warps`` and ``num_stages``."""

    block_n: int = attrs.field(validator=_power_of_two(16, 256))
    block_k: int = attrs.field(validator=_power_of_two(16, 256))
    group_m: int = attrs.field(default=1, validator=_positive)
    num_warps: int = attrs.field(default=4, validator=_power_of_two(1, 16))
    num_stages: int = attrs.field(default=3, validator=_positive)

    def to_json(self) -> dict[str, int]:
        return {
            "BLOCK_SIZE_N": self.block_n,
            "BLOCK_SIZE_K": self.block_k,
            "GROUP_SIZE_M": self.group_m,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GemmConfig:
        return cls(
            int(data["BLOCK_SIZE_N"]),
            int(data["BLOCK_SIZE_K"]),
            int(data.get("GROUP_SIZE_M", 1)),
            int(data.get("num_warps", 4)),
            int(data.get("num_stages", 3)),
        )


@attrs.frozen
class MoEConfig:
    """The block size along tokens (align and both GEMMs) and each GEMM's tiling."""

    block_m: int = attrs.field(validator=_power_of_two(16, 256))
    up: GemmConfig
    down: GemmConfig

    def to_json(self) -> dict[str, Any]:
        return {"BLOCK_SIZE_M": self.block_m, "up": self.up.to_json(), "down": self.down.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MoEConfig:
        return cls(int(data["BLOCK_SIZE_M"]), GemmConfig.from_json(data["up"]), GemmConfig.from_json(data["down"]))

    def shared_memory_bytes(self, dtype: str) -> dict[str, int]:
        """The shared memory each GEMM's pipeline holds: stages x (A tile + B tiles); the
        down GEMM's A tile is the fp32 intermediate ``h``."""
        size = _DTYPE_BYTES[dtype]
        up = self.up.num_stages * (self.block_m * self.up.block_k + 2 * self.up.block_k * self.up.block_n) * size
        down = self.down.num_stages * (
            self.block_m * self.down.block_k * H_BYTES + self.down.block_k * self.down.block_n * size
        )
        return {"up": up, "down": down}


def config_file_name(E: int, N: int, K: int, dtype: str, device_name: str) -> str:
    """The tuned file's name for a layer shape on a device (spaces become ``_``)."""
    device = device_name.strip().replace(" ", "_")
    return f"E={E},N={N},K={K},device_name={device},dtype={dtype}.json"


def pipeline_bytes(
    block_m: int, block_n: int, block_k: int, stages: int, dtype: str, b_tiles: int, a_bytes: int | None = None
) -> int:
    """Shared memory of a GEMM pipeline: ``stages`` x (an A tile of ``a_bytes`` elements,
    default the dtype's, and ``b_tiles`` weight tiles)."""
    size = _DTYPE_BYTES[dtype]
    return stages * (block_m * block_k * (a_bytes or size) + b_tiles * block_k * block_n * size)


def _fit_stages(cfg: GemmConfig, block_m: int, dtype: str, b_tiles: int, a_bytes: int | None = None) -> GemmConfig:
    stages = cfg.num_stages
    while (
        stages > 2
        and pipeline_bytes(block_m, cfg.block_n, cfg.block_k, stages, dtype, b_tiles, a_bytes) > SHARED_MEMORY_BUDGET
    ):
        stages -= 1
    block_k = cfg.block_k
    while (
        pipeline_bytes(block_m, cfg.block_n, block_k, stages, dtype, b_tiles, a_bytes) > SHARED_MEMORY_BUDGET
        and block_k > 16
    ):
        block_k //= 2
    return attrs.evolve(cfg, num_stages=stages, block_k=block_k)


def _clamp_block(value: int, size: int) -> int:
    """``value`` no larger than the dimension needs (at least 16)."""
    need = 16
    while need < size and need < value:
        need *= 2
    return need


def default_config(M: int, E: int, N: int, K: int, dtype: str) -> MoEConfig:
    """The heuristic for a GPU when no tuned file exists: a function of the shape only.

    Few tokens per expert (``M <= E``, decode): small token blocks and long K tiles, the
    GEMMs being bound by reading the weights.  More tokens: larger token blocks and a
    swizzle group of 8 so that neighbouring programs reuse weight tiles from L2.  Stages
    are reduced until the pipeline fits the shared-memory budget.
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPE_BYTES)}")
    if M <= E:
        block_m = 16
        up = GemmConfig(block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
        down = GemmConfig(block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    elif M <= 16 * E:
        block_m = 32 if M <= 4 * E else 64
        up = GemmConfig(block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)
        down = GemmConfig(block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3)
    else:
        block_m = 128
        up = GemmConfig(block_n=64, block_k=64, group_m=8, num_warps=8, num_stages=3)
        down = GemmConfig(block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    up = attrs.evolve(up, block_n=_clamp_block(up.block_n, N), block_k=_clamp_block(up.block_k, K))
    down = attrs.evolve(down, block_n=_clamp_block(down.block_n, K), block_k=_clamp_block(down.block_k, N))
    return MoEConfig(block_m, _fit_stages(up, block_m, dtype, 2), _fit_stages(down, block_m, dtype, 1, H_BYTES))


def interpreter_config(M: int, E: int, N: int, K: int, dtype: str) -> MoEConfig:
    """The config under Triton's interpreter: few programs with large tiles (numpy does a
    large tile about as cheaply as a small one; every program costs Python time)."""
    up = GemmConfig(block_n=_clamp_block(128, N), block_k=_clamp_block(128, K), group_m=1)
    down = GemmConfig(block_n=_clamp_block(128, K), block_k=_clamp_block(128, N), group_m=1)
    return MoEConfig(_clamp_block(64, M), up, down)


# -- files ------------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[int, MoEConfig]:
    """The configs of a tuned file by batch size; :class:`~moeframe.errors.InputError`
    naming the file when it is not a valid one."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"tuned config {str(path)!r} cannot be read: {exc.strerror}") from None
    except ValueError as exc:  # not JSON, or not UTF-8 text
        raise InputError(f"tuned config {str(path)!r} is not valid JSON: {exc}") from None
    table = raw.get("configs") if isinstance(raw, dict) else None
    if not isinstance(table, dict) or not table:
        raise InputError(f"tuned config {str(path)!r} has no 'configs' table of batch size -> config")
    out: dict[int, MoEConfig] = {}
    for key, value in table.items():
        try:
            out[int(key)] = MoEConfig.from_json(value)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"tuned config {str(path)!r}: entry {key!r} is not a valid config ({exc})") from None
    return out


def write_config_file(
    path: str | Path,
    configs: Mapping[int, MoEConfig],
    *,
    E: int,
    N: int,
    K: int,
    dtype: str,
    device_name: str,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tuned file (atomically); entries already in it for other batch sizes are kept."""
    path = Path(path)
    merged: dict[int, MoEConfig] = read_config_file(path) if path.is_file() else {}
    merged.update(configs)
    doc = {
        "format": FILE_FORMAT_VERSION,
        "kernel": "moeframe-triton fused_moe",
        "E": E,
        "N": N,
        "K": K,
        "dtype": dtype,
        "device_name": device_name,
        **(dict(extra) if extra else {}),
        "configs": {str(m): merged[m].to_json() for m in sorted(merged)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    clear_caches()
    return path


def _nearest(configs: Mapping[int, MoEConfig], M: int) -> MoEConfig:
    best = min(configs, key=lambda m: (abs(m - M), m))
    return configs[best]


_lock = threading.Lock()
_file_cache: dict[tuple[str, float], dict[int, MoEConfig]] = {}
#: per shape and search folders: the tuned table found (and its file), or None
_table_cache: dict[tuple[Any, ...], tuple[dict[int, MoEConfig], Path] | None] = {}
_warned: set[tuple[Any, ...]] = set()


def _search_dirs(override_dir: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    env_dir = os.environ.get(CONFIG_DIR_ENV, "").strip() if override_dir is None else str(override_dir)
    if env_dir:
        dirs.append(Path(env_dir).expanduser())
    dirs.append(SHIPPED_DIR)
    return dirs


def _load(path: Path) -> dict[int, MoEConfig] | None:
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return None
    key = (str(path), mtime)
    with _lock:
        cached = _file_cache.get(key)
    if cached is None:
        cached = read_config_file(path)
        with _lock:
            _file_cache[key] = cached
    return cached


def lookup_config(
    M: int, E: int, N: int, K: int, dtype: str, device_name: str, *, override_dir: str | Path | None = None
) -> tuple[MoEConfig, Path] | None:
    """The tuned config for ``M`` tokens (nearest batch size) and the file it came from,
    or None when neither the override folder nor the shipped files have the shape."""
    found = _find_table(config_file_name(E, N, K, dtype, device_name), _search_dirs(override_dir))
    return None if found is None else (_nearest(found[0], M), found[1])


def _find_table(name: str, dirs: list[Path]) -> tuple[dict[int, MoEConfig], Path] | None:
    """The first tuned table named ``name`` in ``dirs`` and its file."""
    for folder in dirs:
        table = _load(folder / name)
        if table:
            return table, folder / name
    return None


def get_config(
    M: int, E: int, N: int, K: int, dtype: str, device_name: str, *, override_dir: str | Path | None = None
) -> MoEConfig:
    """The config the kernel uses on a GPU: a tuned one if a file has the shape, else
    :func:`default_config`, warning once per shape (naming the missing file)."""
    dirs = _search_dirs(override_dir)
    key = (E, N, K, dtype, device_name, tuple(str(d) for d in dirs))
    with _lock:
        known = key in _table_cache
        found = _table_cache.get(key)
    if not known:  # the files are read once per shape, not once per batch size
        found = _find_table(config_file_name(E, N, K, dtype, device_name), dirs)
        with _lock:
            _table_cache[key] = found
    if found is not None:
        return _nearest(found[0], M)
    config = default_config(M, E, N, K, dtype)
    shape = (E, N, K, dtype, device_name)
    with _lock:
        first = shape not in _warned
        _warned.add(shape)
    if first:
        name = config_file_name(E, N, K, dtype, device_name)
        where = " or ".join(str(d) for d in dirs)
        warnings.warn(
            ConfigWarning(
                f"moeframe-triton: no tuned config {name} in {where}; using the default heuristic "
                f"(`moeframe tune CONFIG --output DIR` writes one; point {CONFIG_DIR_ENV} at DIR)"
            ),
            stacklevel=2,
        )
    return config


def clear_caches() -> None:
    """Forget loaded files, the tables found per shape and which shapes were warned about."""
    with _lock:
        _file_cache.clear()
        _table_cache.clear()
        _warned.clear()
