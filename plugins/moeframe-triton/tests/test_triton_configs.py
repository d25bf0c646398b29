"""Config lookup: exact and nearest batch size, override folder, shipped files, the
fallback warning (once per shape), the heuristic's validity."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeframe.errors import InputError
from moeframe_triton import configs
from moeframe_triton.configs import (
    CONFIG_DIR_ENV,
    SHARED_MEMORY_BUDGET,
    ConfigWarning,
    GemmConfig,
    MoEConfig,
    config_file_name,
    default_config,
    get_config,
    lookup_config,
    read_config_file,
    write_config_file,
)

SHAPE = {"E": 8, "N": 14336, "K": 4096, "dtype": "bfloat16"}
DEVICE = "NVIDIA H200"
SMALL = MoEConfig(16, GemmConfig(64, 128, 1, 4, 4), GemmConfig(64, 128, 1, 4, 4))
LARGE = MoEConfig(128, GemmConfig(64, 64, 8, 8, 3), GemmConfig(128, 64, 16, 8, 4))
MIDDLE = MoEConfig(64, GemmConfig(32, 64, 8, 4, 3), GemmConfig(64, 32, 8, 4, 2))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No user override folder, an empty 'shipped' folder, fresh caches."""
    monkeypatch.delenv(CONFIG_DIR_ENV, raising=False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(configs, "SHIPPED_DIR", shipped)
    configs.clear_caches()
    yield
    configs.clear_caches()


def write(folder: Path, entries: dict[int, MoEConfig], **shape) -> Path:
    s = {**SHAPE, **shape}
    path = folder / config_file_name(s["E"], s["N"], s["K"], s["dtype"], DEVICE)
    return write_config_file(path, entries, E=s["E"], N=s["N"], K=s["K"], dtype=s["dtype"], device_name=DEVICE)


def lookup(M: int, **shape) -> MoEConfig:
    s = {**SHAPE, **shape}
    return get_config(M, s["E"], s["N"], s["K"], s["dtype"], DEVICE)


def test_file_name_is_keyed_by_shape_dtype_and_device():
    assert (
        config_file_name(8, 14336, 4096, "bfloat16", "NVIDIA H200")
        == "E=8,N=14336,K=4096,device_name=NVIDIA_H200,dtype=bfloat16.json"
    )


def test_exact_batch_size(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "mine"))
    write(tmp_path / "mine", {1: SMALL, 64: MIDDLE, 1024: LARGE})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup(1) == SMALL and lookup(64) == MIDDLE and lookup(1024) == LARGE


def test_nearest_batch_size_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "mine"))
    write(tmp_path / "mine", {1: SMALL, 64: MIDDLE, 1024: LARGE})
    assert lookup(20) == SMALL  # |20-1| = 19 < |20-64| = 44
    assert lookup(40) == MIDDLE  # 24 < 39
    assert lookup(500) == MIDDLE  # 436 < 524
    assert lookup(600) == LARGE  # 424 < 536
    assert lookup(100_000) == LARGE
    write(tmp_path / "mine", {10: SMALL, 20: MIDDLE}, E=4)
    assert lookup(15, E=4) == SMALL  # a tie goes to the smaller batch size


def test_override_folder_beats_shipped_files(tmp_path, monkeypatch):
    write(configs.SHIPPED_DIR, {1: SMALL})
    assert lookup(1) == SMALL
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path / "mine"))
    write(tmp_path / "mine", {1: LARGE})
    assert lookup(1) == LARGE
    found = lookup_config(1, 8, 14336, 4096, "bfloat16", DEVICE)
    assert found is not None and found[1] == tmp_path / "mine" / config_file_name(8, 14336, 4096, "bfloat16", DEVICE)
    # the override folder does not have another shape: the shipped file is still used for it
    write(configs.SHIPPED_DIR, {1: MIDDLE}, E=16)
    assert lookup(1, E=16) == MIDDLE


def test_fallback_warns_once_per_shape_naming_the_file(recwarn):
    first = lookup(1)
    assert first == default_config(1, 8, 14336, 4096, "bfloat16")
    lookup(1)
    lookup(4096)  # same shape, another batch size: no new warning
    lookup(1, dtype="float16")  # another shape: one more
    found = [w for w in recwarn.list if issubclass(w.category, ConfigWarning)]
    assert len(found) == 2
    assert "E=8,N=14336,K=4096,device_name=NVIDIA_H200,dtype=bfloat16.json" in str(found[0].message)
    assert "dtype=float16.json" in str(found[1].message)
    assert CONFIG_DIR_ENV in str(found[0].message)


def test_shipped_folder_holds_only_real_files():
    """Only measured files may ship: every JSON there must parse (none is shipped yet)."""
    shipped = Path(configs.__file__).parent / "tuned_configs"
    assert (shipped / "README.md").is_file()
    files = sorted(shipped.glob("*.json"))
    guide = (Path(__file__).parents[3] / "docs" / "triton.md").read_text(encoding="utf-8")
    if not files:  # the guide must say so
        assert "No tuned file ships yet" in guide
    for path in files:
        assert read_config_file(path)
        doc = json.loads(path.read_text(encoding="utf-8"))
        # named as the lookup expects, from its own contents, and listed in the guide
        assert path.name == config_file_name(doc["E"], doc["N"], doc["K"], doc["dtype"], doc["device_name"])
        assert path.name in guide


def test_writing_merges_with_existing_entries(tmp_path):
    path = write(tmp_path, {1: SMALL})
    write(tmp_path, {64: MIDDLE, 1: LARGE})
    assert read_config_file(path) == {1: LARGE, 64: MIDDLE}
    doc = json.loads(path.read_text())
    assert doc["device_name"] == DEVICE and doc["E"] == 8 and list(doc["configs"]) == ["1", "64"]


def test_a_broken_file_is_a_user_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv(CONFIG_DIR_ENV, str(tmp_path))
    path = tmp_path / config_file_name(8, 14336, 4096, "bfloat16", DEVICE)
    path.write_text('{"configs": {"1": {"BLOCK_SIZE_M": 24, "up": {}, "down": {}}}}')
    with pytest.raises(InputError, match="E=8,N=14336"):
        lookup(1)
    path.write_text("not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_config_file(path)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    M=st.integers(1, 65536),
    E=st.integers(1, 512),
    N=st.integers(1, 32768),
    K=st.integers(1, 16384),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_heuristic_gives_valid_configs(M, E, N, K, dtype):
    cfg = default_config(M, E, N, K, dtype)
    for value in (cfg.block_m, cfg.up.block_n, cfg.up.block_k, cfg.down.block_n, cfg.down.block_k):
        assert value >= 16 and value & (value - 1) == 0
    assert cfg.up.block_n <= max(16, 2 * N) and cfg.down.block_n <= max(16, 2 * K)
    assert all(v <= SHARED_MEMORY_BUDGET for v in cfg.shared_memory_bytes(dtype).values())
    assert MoEConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_interpreter_selects_its_own_config_without_lookup(recwarn):
    import torch

    from moeframe_triton.fused_moe import select_config

    cfg = select_config(8, 8, 32, 64, torch.float32, torch.device("cpu"))
    assert cfg == configs.interpreter_config(8, 8, 32, 64, "float32")
    assert not [w for w in recwarn.list if issubclass(w.category, ConfigWarning)]
