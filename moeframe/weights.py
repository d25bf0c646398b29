"""The layer's tensors: their names and shapes, deterministic initialisation, safetensors
input/output, and conversion of other layouts to the canonical one at load time.

Canonical layout (nn.Linear convention, ``[out, in]``)::

    experts.w13 [E, 2I, H]   rows [0, I) gate, rows [I, 2I) up
    experts.w2  [E, H, I]
    experts.b13 [E, 2I]      (model.expert_bias)
    experts.b2  [E, H]       (model.expert_bias)
    router.weight [E, H]     (+ router.bias [E], router.e_score_correction_bias [E])
    shared.w13 [2*Is, H], shared.w2 [H, Is], shared.gate.weight [1, H]   (shared_experts)

Under expert parallelism a rank materialises only its experts (dim 0 of ``experts.*``);
under tensor parallelism only its slice of the intermediate dimension.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from moeframe.errors import InputError
from moeframe.files import atomic_write_bytes

__all__ = [
    "WeightSpec",
    "expert_weight_specs",
    "materialize",
    "load_safetensors",
    "save_safetensors",
    "convert_gpt_oss_experts",
    "tp_rows",
    "tp_gate_up_rows",
    "tp_cols",
    "tp_first_rank_only",
]

Shard = Callable[[torch.Tensor], torch.Tensor]


@attrs.frozen
class WeightSpec:
    """One tensor the layer owns.

    ``shape`` is the tensor's full (single-process) shape.  When ``expert_dim`` is set,
    dim 0 indexes experts and only ``local_experts`` (global ids) are materialised;
    ``shard`` maps one full slice (one expert's, or the whole tensor) to this rank's part.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    init: str = attrs.field(default="normal", validator=attrs.validators.in_(("normal", "zeros", "ones")))
    std: float = 1.0
    expert_dim: bool = False
    local_experts: tuple[int, ...] | None = None
    shard: Shard | None = attrs.field(default=None, eq=False)

    def local_shape(self) -> tuple[int, ...]:
        """This rank's shape, from the shapes alone (nothing is allocated)."""
        probe_shape = self.shape[1:] if self.expert_dim else self.shape
        if self.shard is not None:
            # dims beyond what torch can describe: the unsharded shape bounds it
            with contextlib.suppress(RuntimeError, ValueError, OverflowError):
                probe_shape = tuple(self.shard(torch.empty(probe_shape, device="meta")).shape)
        if self.expert_dim:
            count = self.shape[0] if self.local_experts is None else len(self.local_experts)
            return (count, *probe_shape)
        return tuple(probe_shape)

    def nbytes(self) -> int:
        n = 1
        for d in self.local_shape():
            n *= int(d)
        return n * self.dtype.itemsize


def _generator(seed: int, name: str, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + index) % (2**63 - 1))
    return g


def _init_slice(spec: WeightSpec, shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    if spec.init == "zeros":
        return torch.zeros(shape)
    if spec.init == "ones":
        return torch.ones(shape)
    return torch.randn(tuple(shape), generator=_generator(seed, spec.name, index)) * spec.std


def materialize(spec: WeightSpec, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's part of the tensor, initialised from ``seed`` alone.

    Every expert's slice depends only on (seed, name, expert id), so a rank holding some
    experts gets exactly the values the single-process layer holds for them.
    """
    shard = spec.shard or (lambda t: t)
    if spec.expert_dim:
        experts = range(spec.shape[0]) if spec.local_experts is None else spec.local_experts
        parts = [shard(_init_slice(spec, spec.shape[1:], seed, e)) for e in experts]
        full = torch.stack(parts) if parts else torch.empty(spec.local_shape())
    else:
        full = shard(_init_slice(spec, spec.shape, seed, 0))
    return full.to(device=device, dtype=spec.dtype).contiguous()


# -- tensor-parallel shards ------------------------------------------------------------
def tp_rows(rank: int, size: int) -> Shard:
    """Split dim 0 (e.g. an intermediate-size dim) into ``size`` parts; keep part ``rank``."""
    return lambda t: t.chunk(size, dim=0)[rank] if size > 1 else t


def tp_cols(rank: int, size: int) -> Shard:
    """Split the last dim into ``size`` parts; keep part ``rank``."""
    return lambda t: t.chunk(size, dim=-1)[rank] if size > 1 else t


def tp_gate_up_rows(rank: int, size: int) -> Shard:
    """For ``[2I, ...]``: keep this rank's part of the gate rows and of the up rows."""

    def shard(t: torch.Tensor) -> torch.Tensor:
        if size == 1:
            return t
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)

    return shard


def tp_first_rank_only(rank: int) -> Shard:
    """A tensor added to a partial sum (a bias after a TP-split GEMM): zero except on rank 0."""
    return lambda t: t if rank == 0 else torch.zeros_like(t)


def expert_weight_specs(model: Any, parallel: Any) -> list[WeightSpec]:
    """The specs of ``experts.*`` for this rank (all experts, whole, in one process)."""
    E, H, I = model.num_experts, model.hidden_size, model.intermediate_size
    dtype = model.torch_dtype
    local = tuple(parallel.local_experts(E)) if parallel.ep_size > 1 else None
    tp_rank, tp_size = parallel.tp_rank, parallel.tp_size
    specs = [
        WeightSpec(
            "experts.w13",
            (E, 2 * I, H),
            dtype,
            std=H**-0.5,
            expert_dim=True,
            local_experts=local,
            shard=tp_gate_up_rows(tp_rank, tp_size),
        ),
        WeightSpec(
            "experts.w2",
            (E, H, I),
            dtype,
            std=I**-0.5,
            expert_dim=True,
            local_experts=local,
            shard=tp_cols(tp_rank, tp_size),
        ),
    ]
    if model.expert_bias:
        specs += [
            WeightSpec(
                "experts.b13",
                (E, 2 * I),
                dtype,
                std=0.1,
                expert_dim=True,
                local_experts=local,
                shard=tp_gate_up_rows(tp_rank, tp_size),
            ),
            WeightSpec(
                "experts.b2",
                (E, H),
                dtype,
                std=0.1,
                expert_dim=True,
                local_experts=local,
                shard=tp_first_rank_only(tp_rank),
            ),
        ]
    return specs


# -- safetensors ---------------------------------------------------------------------
#: environment variable: ``1`` makes NaN or inf in a weights file an error instead of a warning
STRICT_WEIGHTS_ENV = "MOEFRAME_STRICT_WEIGHTS"


def strict_weights_default() -> bool:
    """Whether ``MOEFRAME_STRICT_WEIGHTS`` asks for NaN or inf in weights to be an error."""
    import os

    return os.environ.get(STRICT_WEIGHTS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_readable_file(path: str | Path, what: str) -> Path:
    """``path`` as a :class:`Path` when it names a file; otherwise one-line
    :class:`~moeframe.errors.InputError` saying whether it is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a directory; give a .safetensors file")
    if not path.is_file():
        raise InputError(
            f"{what} {str(path)!r} not found" if not path.exists() else f"{what} {str(path)!r} is not a regular file"
        )
    return path


def convert_loaded(name: str, tensor: torch.Tensor, dtype: torch.dtype, where: str) -> tuple[torch.Tensor, int]:
    """``tensor`` converted to ``dtype`` and the number of its values that the conversion
    turned from finite into inf (a narrower range).  Only floating-point tensors convert:
    integers and booleans are refused (one line naming the tensor)."""
    if not tensor.is_floating_point():
        raise InputError(
            f"{where}: tensor {name!r} is stored as {str(tensor.dtype).removeprefix('torch.')}; "
            f"only floating-point tensors are loaded (the layer is {str(dtype).removeprefix('torch.')})"
        )
    out = tensor.to(dtype)
    overflowed = 0
    if tensor.dtype != dtype and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
        overflowed = int((torch.isinf(out) & torch.isfinite(tensor)).sum())
    return out, overflowed


def report_nonfinite(
    where: str,
    nonfinite: Mapping[str, int],
    overflowed: Mapping[str, int],
    strict: bool,
    dtype_names: Mapping[str, str] | None = None,
) -> None:
    """Warn once (or, ``strict``, raise) about tensors holding NaN or inf; warn about
    conversions that lost range."""
    import warnings

    if overflowed:
        names = ", ".join(
            f"{k} ({v} values{' from ' + dtype_names[k] if dtype_names and k in dtype_names else ''})"
            for k, v in overflowed.items()
        )
        warnings.warn(f"{where}: converting to the layer's dtype turned finite values into inf: {names}", stacklevel=3)
    if nonfinite:
        names = ", ".join(f"{k} ({v})" for k, v in nonfinite.items())
        if strict:
            raise InputError(
                f"{where}: tensors hold NaN or inf values: {names} (refused: {STRICT_WEIGHTS_ENV} "
                "or --strict-weights is set)"
            )
        warnings.warn(
            f"{where}: tensors hold NaN or inf values: {names}; the output will likely be non-finite "
            f"({STRICT_WEIGHTS_ENV}=1 or --strict-weights makes this an error)",
            stacklevel=3,
        )


def load_safetensors(
    path: str | Path,
    specs: Iterable[WeightSpec],
    device: torch.device | str = "cpu",
    strict: bool | None = None,
    check_values: bool = True,
) -> dict[str, torch.Tensor]:
    """Read this rank's part of each tensor in ``specs`` from a safetensors file.

    Only the local experts' slices are read.  Missing, unexpected or misshapen tensors,
    and tensors that are not floating-point (int32, bool...), are
    :class:`~moeframe.errors.InputError`, naming the tensor.  Floating-point tensors
    convert to the layer's dtype; a conversion that turns finite values into inf warns.
    Tensors holding NaN or inf are named in one warning, or refused when ``strict``
    (default: the ``MOEFRAME_STRICT_WEIGHTS`` environment variable); ``check_values=False``
    skips that scan (for a second load of the same file).
    """
    from safetensors import SafetensorError, safe_open

    path = check_readable_file(path, "weights file")
    strict = strict_weights_default() if strict is None else strict
    specs = list(specs)
    out: dict[str, torch.Tensor] = {}
    nonfinite: dict[str, int] = {}
    overflowed: dict[str, int] = {}
    stored: dict[str, str] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            wanted = {s.name for s in specs}
            extra = sorted(names - wanted)
            if extra:
                raise InputError(f"{path}: unexpected tensor {extra[0]!r}; this layer has: {', '.join(sorted(wanted))}")
            for spec in specs:
                if spec.name not in names:
                    raise InputError(f"{path}: missing tensor {spec.name!r} of shape {list(spec.shape)}")
                tslice = f.get_slice(spec.name)
                shape = tuple(tslice.get_shape())
                if shape != spec.shape:
                    raise InputError(
                        f"{path}: tensor {spec.name!r} has shape {list(shape)}, expected {list(spec.shape)}"
                    )
                shard = spec.shard or (lambda t: t)
                if spec.expert_dim:
                    experts = range(spec.shape[0]) if spec.local_experts is None else spec.local_experts
                    parts = [shard(tslice[e : e + 1][0]) for e in experts]
                    tensor = torch.stack(parts) if parts else torch.empty(spec.local_shape(), dtype=spec.dtype)
                else:
                    tensor = shard(tslice[:])
                converted, lost = convert_loaded(spec.name, tensor, spec.dtype, str(path))
                if lost:
                    overflowed[spec.name] = lost
                    stored[spec.name] = str(tensor.dtype).removeprefix("torch.")
                if check_values:
                    bad = int((~torch.isfinite(tensor)).sum())
                    if bad:
                        nonfinite[spec.name] = bad
                out[spec.name] = converted.to(device=device).contiguous()
    except SafetensorError as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
    if check_values:
        report_nonfinite(str(path), nonfinite, overflowed, strict, stored)
    return out


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    option: str = "output",
) -> None:
    """Write ``tensors`` to ``path`` atomically: the file is whole or absent, never half-written.

    The path follows :func:`moeframe.files.atomic_output`'s rules (the folder must exist;
    a FIFO, device or directory is refused; a symbolic link is written through).  The
    bytes are serialised in memory and written to moeframe's one temporary file, so a
    writer killed mid-write leaves at most that file behind.
    """
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    atomic_write_bytes(path, data, option)


# -- other layouts --------------------------------------------------------------------
def convert_gpt_oss_experts(
    gate_up_proj: torch.Tensor,
    gate_up_proj_bias: torch.Tensor | None,
    down_proj: torch.Tensor,
    down_proj_bias: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """GPT-OSS expert tensors -> canonical ``experts.*`` tensors (done once, at load time).

    GPT-OSS stores ``gate_up_proj [E, H, 2I]`` (``x @ W``) with gate in the even columns
    and up in the odd ones, ``gate_up_proj_bias [E, 2I]`` interleaved the same way,
    ``down_proj [E, I, H]`` and ``down_proj_bias [E, H]``.
    """
    if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise InputError("gate_up_proj and down_proj must be 3-d [E, H, 2I] and [E, I, H]")
    E, H, two_i = gate_up_proj.shape
    if two_i % 2 or down_proj.shape != (E, two_i // 2, H):
        raise InputError(
            f"GPT-OSS shapes do not fit: gate_up_proj {list(gate_up_proj.shape)}, down_proj {list(down_proj.shape)}"
        )
    gate = gate_up_proj[..., 0::2]
    up = gate_up_proj[..., 1::2]
    out = {
        "experts.w13": torch.cat([gate, up], dim=-1).transpose(1, 2).contiguous(),
        "experts.w2": down_proj.transpose(1, 2).contiguous(),
    }
    if gate_up_proj_bias is not None:
        out["experts.b13"] = torch.cat(
            [gate_up_proj_bias[..., 0::2], gate_up_proj_bias[..., 1::2]], dim=-1
        ).contiguous()
    if down_proj_bias is not None:
        out["experts.b2"] = down_proj_bias.contiguous()
    return out
