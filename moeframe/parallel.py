"""Ranks and collectives: how a layer's work is split over processes.

Layout of the world (W = ep_size * tp_size ranks)::

    rank r: ep_rank = r // tp_size, tp_rank = r % tp_size
            dp_rank = r // (W // dp_size)   (ranks with one dp_rank share their tokens)

Experts are spread over the EP ranks (``placement``: ``linear`` or ``round_robin``); each
expert's intermediate dimension over the TP ranks.  Every collective goes through
:class:`Collectives`, a thin layer over :mod:`torch.distributed`, so that tests can count
them.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch

from moeframe.config import ParallelConfig
from moeframe.errors import ConfigError, InputError, UserError

__all__ = ["Collectives", "CountingCollectives", "ParallelContext", "expert_placement"]


def expert_placement(num_experts: int, ep_size: int, placement: str) -> list[list[int]]:
    """Global expert ids held by each EP rank.

    ``linear``: contiguous ranges, the remainder going to the lower ranks;
    ``round_robin``: expert e on rank e % ep_size.
    """
    if placement == "round_robin":
        return [list(range(r, num_experts, ep_size)) for r in range(ep_size)]
    base, rem = divmod(num_experts, ep_size)
    out, start = [], 0
    for r in range(ep_size):
        n = base + (1 if r < rem else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


class Collectives:
    """The collectives moeframe uses, over :mod:`torch.distributed` process groups."""

    def all_reduce(self, tensor: torch.Tensor, group: Any = None, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op], group=group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, tensor.contiguous(), group=group)
        return out

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        group: Any = None,
    ) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_to_all_single(
            output, input.contiguous(), list(output_split_sizes), list(input_split_sizes), group=group
        )
        return output

    def reduce_scatter(self, output: torch.Tensor, inputs: list[torch.Tensor], group: Any = None) -> torch.Tensor:
        import torch.distributed as dist

        dist.reduce_scatter(output, [t.contiguous() for t in inputs], group=group)
        return output

    def broadcast_object(self, obj: Any, src: int = 0, group: Any = None) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=group)
        return box[0]

    def all_gather_object(self, obj: Any, group: Any = None) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out


class CountingCollectives(Collectives):
    """Collectives that count their calls by name (for tests of "reduce exactly once").

    With ``inner=None`` it runs in one process: every group has one member, so the
    collectives are identities.
    """

    def __init__(self, inner: Collectives | None = None) -> None:
        self.inner = inner
        self.counts: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def all_reduce(self, tensor: torch.Tensor, group: Any = None, op: str = "sum") -> torch.Tensor:
        self._count(f"all_reduce_{op}")
        return self.inner.all_reduce(tensor, group, op) if self.inner else tensor

    def all_gather(self, tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        self._count("all_gather")
        return self.inner.all_gather(tensor, group) if self.inner else [tensor.clone()]

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        group: Any = None,
    ) -> torch.Tensor:
        self._count("all_to_all_single")
        if self.inner:
            return self.inner.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group)
        output.copy_(input)
        return output

    def reduce_scatter(self, output: torch.Tensor, inputs: list[torch.Tensor], group: Any = None) -> torch.Tensor:
        self._count("reduce_scatter")
        if self.inner:
            return self.inner.reduce_scatter(output, inputs, group)
        output.copy_(inputs[0])
        return output

    def broadcast_object(self, obj: Any, src: int = 0, group: Any = None) -> Any:
        return self.inner.broadcast_object(obj, src, group) if self.inner else obj

    def all_gather_object(self, obj: Any, group: Any = None) -> list[Any]:
        return self.inner.all_gather_object(obj, group) if self.inner else [obj]

    def reset(self) -> None:
        self.counts.clear()


class ParallelContext:
    """This process's place among the ranks, its groups and its experts."""

    def __init__(
        self,
        config: ParallelConfig | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        collectives: Collectives | None = None,
        groups: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or ParallelConfig()
        self.rank = rank
        self.world_size = world_size
        self.collectives = collectives or Collectives()
        self.groups = groups or {}
        c = self.config
        self.tp_size, self.ep_size, self.dp_size = c.tp_size, c.resolved_ep_size(world_size), c.dp_size
        self.tp_rank = rank % c.tp_size
        self.ep_rank = rank // c.tp_size
        self.dp_rank = rank // max(1, world_size // c.dp_size)
        #: ranks that hold the same tokens (reduce the layer's output over them)
        self.token_group_size = world_size // c.dp_size

    # -- construction ------------------------------------------------------------------
    @classmethod
    def single(cls, config: ParallelConfig | None = None, collectives: Collectives | None = None) -> ParallelContext:
        """One process: every size is 1."""
        config = config or ParallelConfig()
        validate_world(config, 1)
        return cls(config, collectives=collectives)

    @classmethod
    def from_config(cls, config: ParallelConfig, collectives: Collectives | None = None) -> ParallelContext:
        """From the default process group (initialising it from torchrun's environment
        when needed); a single-process context when the config asks for one rank."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            if not os.environ.get("WORLD_SIZE", "").strip() or _environment_int("WORLD_SIZE", os.environ) <= 1:
                return cls.single(config, collectives)
            init_from_environment(config)
        world = dist.get_world_size()
        rank = dist.get_rank()
        validate_world(config, world)
        groups = _make_groups(config, world)
        return cls(config, rank=rank, world_size=world, collectives=collectives, groups=groups)

    # -- experts -------------------------------------------------------------------------
    def local_experts(self, num_experts: int) -> list[int]:
        if self.ep_size == 1:
            return list(range(num_experts))
        return expert_placement(num_experts, self.ep_size, self.config.placement)[self.ep_rank]

    def expert_owner(self, num_experts: int) -> torch.Tensor:
        """``[E]`` int64: the EP rank holding each expert."""
        owner = torch.empty(num_experts, dtype=torch.int64)
        for r, ids in enumerate(expert_placement(num_experts, self.ep_size, self.config.placement)):
            owner[ids] = r
        return owner

    def expert_map(self, num_experts: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """``[E]`` int32 global id -> local index, -1 for other ranks' experts; None with EP = 1."""
        if self.ep_size == 1:
            return None
        mapping = torch.full((num_experts,), -1, dtype=torch.int32)
        local = self.local_experts(num_experts)
        mapping[local] = torch.arange(len(local), dtype=torch.int32)
        return mapping.to(device)

    # -- collectives used by the layer --------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def reduce_output(self, output: torch.Tensor) -> torch.Tensor:
        """Sum a partial output over the ranks that share these tokens (once per layer)."""
        if self.token_group_size == 1:
            return output
        return self.collectives.all_reduce(output, group=self.groups.get("token"))

    def max_tokens(self, num_tokens: int, device: torch.device | str = "cpu") -> int:
        """The largest token count over the ranks that run collectives together.

        Without data parallelism every rank holds the same tokens: no collective needed.
        """
        if not self.distributed or self.dp_size == 1:
            return num_tokens
        t = torch.tensor([num_tokens], dtype=torch.int64, device=device)
        self.collectives.all_reduce(t, group=self.groups.get("ep"), op="max")
        return int(t.item())

    def check_same_config(self, config: Any) -> None:
        """Raise the same :class:`ConfigError` on every rank when the ranks' configs differ."""
        if not self.distributed:
            return
        fingerprints = self.collectives.all_gather_object(config.fingerprint())
        if len(set(fingerprints)) == 1:
            return
        # every rank saw the same fingerprints, so every rank gathers the whole configs
        everyone = self.collectives.all_gather_object(config.to_dict())
        for rank, fp in enumerate(fingerprints):
            if fp != fingerprints[0]:
                path, a, b = _first_difference(everyone[0], everyone[rank])
                raise ConfigError(
                    "",
                    f"the config differs between ranks: {path} is {a!r} on rank 0 but {b!r} on rank {rank}; "
                    "every rank must be given the same config",
                )

    def describe(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "dp_rank": self.dp_rank,
            "ep_rank": self.ep_rank,
            "tp_rank": self.tp_rank,
            "dp_size": self.dp_size,
            "ep_size": self.ep_size,
            "tp_size": self.tp_size,
            "placement": self.config.placement,
        }


#: the variables a launcher (torchrun, ``moeframe run --nproc``) gives every rank
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")


def _environment_int(name: str, env: Any) -> int:
    text = env.get(name, "")
    if not text.strip().isdigit():
        raise InputError(
            f"{name}={text!r} is not a non-negative integer; launch with torchrun or `moeframe run --nproc N`"
        )
    return int(text)


def check_launch_environment(env: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` from a launcher's variables, or one-line
    :class:`~moeframe.errors.InputError` naming what is missing or inconsistent (say,
    ``WORLD_SIZE`` set by hand without ``RANK``)."""
    env = os.environ if env is None else env
    world = _environment_int("WORLD_SIZE", env)
    missing = [v for v in LAUNCH_VARIABLES if not env.get(v, "").strip()]
    if missing:
        raise InputError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "launch the ranks with torchrun or `moeframe run --nproc N`, or unset WORLD_SIZE for one process"
        )
    rank = _environment_int("RANK", env)
    if rank >= world:
        raise InputError(f"RANK={rank} but WORLD_SIZE={world}: a rank must be below the world size")
    return rank, world


def init_from_environment(config: ParallelConfig) -> None:
    """Initialise the default process group from torchrun's environment variables
    (NCCL when a GPU is present, else gloo), with the config's collective timeout.

    Missing variables and ranks that never join (the rendezvous times out after
    ``parallel.timeout_s``) are one-line :class:`~moeframe.errors.UserError`."""
    import torch.distributed as dist

    rank, world = check_launch_environment()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=config.timeout_s))
    except dist.DistError as exc:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"rank {rank} of {world}: the other ranks did not join within parallel.timeout_s = {config.timeout_s:g} s "
            f"at {where} ({first}); start every rank (torchrun or `moeframe run --nproc {world}`)"
        ) from None


def validate_world(config: ParallelConfig, world: int) -> None:
    """Raise a :class:`ConfigError` unless ``config`` fits ``world`` ranks."""
    ep = config.resolved_ep_size(world)
    where = "this is one process" if world == 1 else f"the world has {world} ranks"
    hint = "; launch with torchrun (or `moeframe run --nproc N`)" if world == 1 else ""
    if ep * config.tp_size != world:
        raise ConfigError(
            "parallel",
            f"ep_size ({ep}) * tp_size ({config.tp_size}) must equal the number of ranks, but {where}{hint}",
        )
    if world % config.dp_size:
        raise ConfigError("parallel.dp_size", f"{config.dp_size} must divide the number of ranks, but {where}{hint}")


def _make_groups(config: ParallelConfig, world: int) -> dict[str, Any]:
    """Create the sub-groups (every rank must call this, in the same order)."""
    import torch.distributed as dist

    groups: dict[str, Any] = {"ep": None}  # the EP group is the whole world
    per_dp = world // config.dp_size
    token_groups = [list(range(d * per_dp, (d + 1) * per_dp)) for d in range(config.dp_size)]
    rank = dist.get_rank()
    if config.dp_size == 1:
        groups["token"] = None
    else:
        for ranks in token_groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                groups["token"] = g
    return groups


def _first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path or "(config)", a, b


def launch_local_ranks(argv: Sequence[str], nproc: int, grace_s: float = 30.0) -> list[int]:
    """Run ``argv`` once per rank on this machine with the variables torchrun gives its
    workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``
    on a free port); the ranks' output goes to this process's stdout and stderr.

    Returns each rank's exit status.  When a rank fails, the others get ``grace_s``
    seconds to finish (their collectives fail once its connections close) and are then
    terminated (status ``-15``).  Ctrl-C terminates every rank.
    """
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    procs = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            GROUP_RANK="0",
        )
        if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        procs.append(subprocess.Popen(list(argv), env=env))
    try:
        deadline: float | None = None
        while any(p.poll() is None for p in procs):
            if deadline is None and any(p.returncode not in (None, 0) for p in procs):
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        raise
    return [int(p.returncode) for p in procs]
