"""One MoE layer straight from a transformers checkpoint directory (``MoELayer.load_hf``).

A checkpoint directory holds ``config.json`` and the weights in ``*.safetensors`` files:
one ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.  The
weights are stored as ``save_pretrained`` writes them, which is not the in-memory layout:

=====================  ==============================================================
family                 experts on disk
=====================  ==============================================================
Qwen2/3-MoE, DS-V3     ``mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``
Mixtral                ``block_sparse_moe.experts.{e}.w1/w3/w2.weight``
GPT-OSS                ``mlp.experts.gate_up_proj [E, H, 2I]`` (gate/up interleaved),
                       ``gate_up_proj_bias``, ``down_proj [E, I, H]``, ``down_proj_bias``
Llama-4                ``feed_forward.experts.gate_up_proj [E, H, 2I]``, ``down_proj``
=====================  ==============================================================

The on-disk names are mapped to the in-memory ones with transformers' own checkpoint
conversion mapping (``transformers.conversion_mapping``: its renamings, and its
converters' operations for per-expert tensors), so a family whose mapping changes in
transformers is read the way transformers reads it.  The in-memory block is then mapped
to moeframe's tensors by the table ``patch_model`` uses too
(:data:`moeframe.integrations.transformers.blocks.BLOCKS`).

Only the tensors of the requested layer are read, lazily (safetensors' ``safe_open``),
and of the experts only this rank's (``parallel.ep_size > 1``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from moeframe.errors import ConfigError, InputError
from moeframe.integrations.transformers.blocks import BLOCKS, HFTensor

if TYPE_CHECKING:
    from moeframe.config import Config
    from moeframe.layer import MoELayer
    from moeframe.parallel import ParallelContext
    from moeframe.weights import WeightSpec
    from moeframe.workspace import Workspace

__all__ = [
    "is_checkpoint_dir",
    "read_hf_config",
    "hf_layer_config",
    "load_hf",
    "load_layer_weights",
    "config_from_args",
    "load_checkpoint_weights",
    "split_checkpoint_argument",
    "check_kernel_on_checkpoint",
]

INDEX_FILE = "model.safetensors.index.json"


# -- the directory ---------------------------------------------------------------------------
def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory with a ``config.json`` (a transformers checkpoint)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def read_hf_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict, with one-line errors for a
    missing directory or file, bad JSON and quantized checkpoints."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        raise InputError(f"checkpoint directory {str(root)!r} not found")
    path = root / "config.json"
    if not path.is_file():
        raise InputError(
            f"{root}: no config.json; a transformers checkpoint directory holds config.json and *.safetensors "
            "(what save_pretrained writes)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    for where, cfg in (("", raw), ("text_config.", raw.get("text_config"))):
        quantization = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if quantization:
            method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
            raise InputError(
                f"{path}: the checkpoint is quantized ({where}quantization_config.quant_method = {method!r}); "
                "moeframe reads unquantized checkpoints (float32, bfloat16, float16) until a kernel supports "
                f"{method} weights"
            )
    return raw


def hf_layer_config(
    checkpoint_dir: str | Path,
    layer: int | None = None,
    *,
    overrides: Mapping[str, Any] | Any = None,
) -> tuple[Config, int]:
    """The moeframe config of one MoE layer of a checkpoint, and the layer index (the
    first MoE layer when ``layer`` is None).  A layer that is not an MoE layer is a
    one-line error listing the MoE layers."""
    from moeframe.integrations.transformers.config import config_from_hf, hf_text_config, moe_layer_indices

    raw = read_hf_config(checkpoint_dir)
    label = str(Path(checkpoint_dir) / "config.json")
    try:
        moe_layers = moe_layer_indices(raw)
        num_layers = int(getattr(hf_text_config(raw), "num_hidden_layers", 0) or 0)
        config = config_from_hf(raw, overrides=overrides)
    except ConfigError as exc:
        raise exc.with_source(label) from None
    if not moe_layers:
        raise InputError(f"{label}: the model has no MoE layer (nothing to load)")
    if layer is None:
        layer = moe_layers[0]
    elif isinstance(layer, bool) or not isinstance(layer, int):
        raise InputError(f"layer must be an integer, got {layer!r}")
    if layer not in moe_layers:
        where = f"has {num_layers} decoder layers (0..{num_layers - 1})" if not 0 <= layer < num_layers else "is dense"
        raise InputError(
            f"{label}: layer {layer} is not an MoE layer (the model {where}); its MoE layers: {_ranges(moe_layers)}"
        )
    return attrs.evolve(config, source=f"{Path(checkpoint_dir)} (layer {layer})"), layer


def _ranges(indices: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``"1-3, 5"``"""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


# -- the files ---------------------------------------------------------------------------------
class _Files:
    """The checkpoint's safetensors files, opened lazily, and which file holds which tensor."""

    def __init__(self, root: Path, stack: ExitStack) -> None:
        from safetensors import SafetensorError, safe_open

        self.root = root
        self._stack = stack
        self._open: dict[str, Any] = {}
        self._safe_open = safe_open
        self._error = SafetensorError
        index = root / INDEX_FILE
        self.where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InputError(f"{index}: not a safetensors index ({type(exc).__name__}: {exc})") from None
            self.where = {str(k): str(v) for k, v in weight_map.items()}
            self.described = f"the shards of {INDEX_FILE}"
        else:
            files = sorted(p.name for p in root.glob("*.safetensors"))
            if not files:
                raise InputError(f"{root}: no *.safetensors file (and no {INDEX_FILE})")
            for name in files:
                for key in self.file(name).keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    self.where[key] = name
            self.described = ", ".join(files)

    def file(self, name: str) -> Any:
        handle = self._open.get(name)
        if handle is None:
            path = self.root / name
            if not path.is_file():
                raise InputError(f"{path}: listed in {INDEX_FILE} but not found")
            try:
                handle = self._stack.enter_context(self._safe_open(str(path), framework="pt"))
            except (self._error, OSError) as exc:
                raise InputError(f"{path}: not a readable safetensors file ({exc})") from None
            self._open[name] = handle
        return handle

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.file(self.where[key]).get_slice(key).get_shape())

    def tensor(self, key: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        self.check_shape(key, expected)
        return self.file(self.where[key]).get_tensor(key)

    def rows(self, key: str, index: int, expected: tuple[int, ...]) -> torch.Tensor:
        """``tensor[index]`` of a stacked tensor, reading only that slice."""
        self.check_shape(key, expected)
        return self.file(self.where[key]).get_slice(key)[index : index + 1][0]

    def check_shape(self, key: str, expected: tuple[int, ...] | None) -> None:
        if expected is None:
            return
        shape = self.shape(key)
        if shape != tuple(expected):
            raise InputError(
                f"{self.root / self.where[key]}: tensor {key!r} has shape {list(shape)}, expected {list(expected)}"
            )


# -- transformers' conversion mapping ---------------------------------------------------------------
@attrs.define
class _Source:
    """How one in-memory tensor is stored: one key as it is, or per expert through a converter."""

    key: str | None = None
    converter: Any = None
    #: converter source pattern -> {expert id: on-disk key}
    per_expert: dict[str, dict[int, str]] = attrs.field(factory=dict)


def _conversions(model_type: str) -> tuple[list[Any], list[Any]]:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def _expert_id(pattern: str, key: str) -> int | None:
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match else None


def _sources(files: _Files, model_type: str, prefix_re: re.Pattern[str]) -> tuple[str | None, dict[str, _Source]]:
    """The block prefix and, for each in-memory tensor name of the block (relative to it),
    where it is on disk."""
    from transformers.core_model_loading import apply_renamings, rename_source_key

    renamings, converters = _conversions(model_type)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix: str | None = None
    out: dict[str, _Source] = {}
    for key in files.where:
        target, pattern = rename_source_key(key, renamings, converters)
        match = prefix_re.search(target)
        if match is None:
            continue
        if prefix is None:
            prefix = target[: match.end()]
        elif not target.startswith(prefix):
            continue  # another model's layer of the same index (a vision tower, say)
        name = target[len(prefix) :]
        source = out.setdefault(name, _Source())
        if pattern is None:
            source.key = key
            continue
        source.converter = by_pattern[pattern]
        expert = _expert_id(pattern, apply_renamings(key, renamings))
        if expert is not None:
            source.per_expert.setdefault(pattern, {})[expert] = key
    return prefix, out


def _run_ops(converter: Any, tensors: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """transformers' own operations of ``converter`` on one expert's tensors."""
    data: dict[str, Any] = dict(tensors)
    for op in converter.operations:
        data = op.convert(
            data, source_patterns=list(converter.source_patterns), target_patterns=list(converter.target_patterns)
        )
    (result,) = data.values()
    return result[0]


_SUPPORTED_OPS = ("MergeModulelist", "Concatenate")


# -- reading one layer -------------------------------------------------------------------------------
@attrs.define
class _LayerReader:
    files: _Files
    block_prefix: str
    sources: dict[str, _Source]
    #: moeframe tensor name -> where it is in the in-memory block
    tensors: dict[str, HFTensor]

    def where(self, name: str) -> str:
        return f"{self.block_prefix}{name}"

    def missing(self, name: str, expert: int | None = None) -> InputError:
        shown = self.where(name)
        if expert is not None:
            shown = f"{shown} of expert {expert}"
        return InputError(f"{self.files.root}: no tensor for {shown!r} in {self.files.described}")

    def disk_name(self, pattern: str, e: int) -> str:
        """The on-disk name of expert ``e``'s tensor for a converter's source ``pattern``:
        another expert's name with the id replaced (the renamed form when none exists)."""
        for source in self.sources.values():
            for other, key in source.per_expert.get(pattern, {}).items():
                return re.sub(rf"(experts\.){other}(\.)", rf"\g<1>{e}\2", key, count=1)
        return f"{self.block_prefix}{pattern.lstrip('.').replace('*', str(e))}"

    def plain(self, name: str, expected: tuple[int, ...] | None) -> torch.Tensor:
        source = self.sources.get(name)
        if source is None or source.key is None:
            raise self.missing(name)
        return self.files.tensor(source.key, expected)

    def expert(self, hf: HFTensor, e: int, num_experts: int, canonical: tuple[int, ...]) -> torch.Tensor:
        """Expert ``e``'s slice of the in-memory stacked tensor ``hf``, in moeframe's
        canonical layout of shape ``canonical`` (``w13 [2I, H]``, ``w2 [H, I]``, ``b13 [2I]``...)."""
        (name,) = hf.paths
        source = self.sources.get(name)
        if source is None:
            raise self.missing(name)
        transposed = hf.transposed and len(canonical) == 2
        stored = canonical[::-1] if transposed else canonical
        if source.converter is None:
            assert source.key is not None
            t = self.files.rows(source.key, e, (num_experts, *stored))
        else:
            t = self._converted(source.converter, name, e, stored)
        if transposed:
            t = t.t()
        if hf.interleaved:
            t = torch.cat([t[0::2], t[1::2]], dim=0)
        return t

    def _converted(self, converter: Any, name: str, e: int, stored: tuple[int, ...]) -> torch.Tensor:
        """Expert ``e``'s in-memory tensor from its on-disk tensors, by transformers' own operations."""
        ops = [type(op).__name__ for op in converter.operations]
        if any(op not in _SUPPORTED_OPS for op in ops):
            raise InputError(
                f"{self.files.root}: transformers converts {self.where(name)!r} with {', '.join(ops)}, "
                f"which moeframe does not read (it reads {', '.join(_SUPPORTED_OPS)})"
            )
        patterns = list(converter.source_patterns)
        per_source = (stored[0] // len(patterns), *stored[1:])
        tensors: dict[str, list[torch.Tensor]] = {}
        for pattern in patterns:
            key = self.sources[name].per_expert.get(pattern, {}).get(e)
            if key is None:
                raise InputError(
                    f"{self.files.root}: missing tensor {self.disk_name(pattern, e)!r} (expert {e} of "
                    f"{self.where(name)!r}) in {self.files.described}"
                )
            tensors[pattern] = [self.files.tensor(key, per_source)]
        return _run_ops(converter, tensors)


def _reader(files: _Files, config: Config, hf_raw: Mapping[str, Any], layer: int) -> _LayerReader:
    from moeframe.integrations.transformers.config import family_of, hf_text_config

    family = family_of(hf_raw).name
    block = BLOCKS[family]
    model_type = str(getattr(hf_text_config(hf_raw), "model_type", family))
    prefix_re = re.compile(rf"(?:^|\.)layers\.{layer}\.{re.escape(block.attribute)}\.")
    prefix, sources = _sources(files, model_type, prefix_re)
    if prefix is None:
        raise InputError(
            f"{files.root}: no tensor of layer {layer}'s MoE block "
            f"(names containing 'layers.{layer}.{block.attribute}.' "
            f"once read as transformers reads them) in {files.described}"
        )
    return _LayerReader(files, prefix, sources, block.tensors(config))


def _read_into(spec: WeightSpec, reader: _LayerReader, out: torch.Tensor) -> None:
    """Fill ``out`` (this rank's part of ``spec``) from the checkpoint; the experts one at
    a time, so that no second copy of them exists at any moment."""
    shard: Callable[[torch.Tensor], torch.Tensor] = spec.shard or (lambda t: t)
    hf = reader.tensors.get(spec.name)
    if hf is None:
        raise InputError(f"{reader.files.root}: moeframe's {spec.name!r} has no counterpart in the checkpoint")
    if spec.expert_dim:
        ids = range(spec.shape[0]) if spec.local_experts is None else spec.local_experts
        for slot, e in enumerate(ids):
            out[slot].copy_(shard(reader.expert(hf, e, spec.shape[0], tuple(spec.shape[1:]))))
    elif len(hf.paths) > 1:  # rows of several tensors (the shared expert's gate and up)
        rows = spec.shape[0] // len(hf.paths)
        out.copy_(shard(torch.cat([reader.plain(p, (rows, *spec.shape[1:])) for p in hf.paths], dim=0)))
    else:
        out.copy_(shard(reader.plain(hf.paths[0], spec.shape)))


def _read_layer(
    specs: list[WeightSpec], config: Config, checkpoint_dir: str | Path, layer_index: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """This rank's part of every tensor in ``specs``, read from decoder layer
    ``layer_index``'s MoE block into fresh (uninitialised) tensors of the spec's dtype on
    ``device``.  Missing or mis-shaped tensors are one-line
    :class:`~moeframe.errors.InputError` naming the tensor and the file."""
    root = Path(checkpoint_dir)
    raw = read_hf_config(root)
    out: dict[str, torch.Tensor] = {}
    with ExitStack() as stack, torch.no_grad():
        files = _Files(root, stack)
        reader = _reader(files, config, raw, layer_index)
        for spec in specs:
            out[spec.name] = torch.empty(spec.local_shape(), dtype=spec.dtype, device=device)
            _read_into(spec, reader, out[spec.name])
    return out


def load_layer_weights(layer: MoELayer, checkpoint_dir: str | Path, layer_index: int) -> None:
    """Fill an existing ``layer``'s tensors (this rank's part) with decoder layer
    ``layer_index``'s MoE block of the checkpoint.  Missing or mis-shaped tensors are
    one-line :class:`~moeframe.errors.InputError` naming the tensor and the file."""
    root = Path(checkpoint_dir)
    raw = read_hf_config(root)
    tensors = layer.tensors
    with ExitStack() as stack, torch.no_grad():
        files = _Files(root, stack)
        reader = _reader(files, layer.config, raw, layer_index)
        for spec in layer.weight_specs:
            _read_into(spec, reader, tensors[spec.name])


def load_hf(
    cls: type[MoELayer],
    checkpoint_dir: str | Path,
    layer: int | None = None,
    *,
    overrides: Mapping[str, Any] | Any = None,
    device: torch.device | str | None = None,
    parallel: ParallelContext | None = None,
    workspace: Workspace | None = None,
) -> MoELayer:
    """See :meth:`moeframe.MoELayer.load_hf`.

    The layer's tensors are read from the checkpoint into uninitialised tensors and the
    layer is built holding them (``MoELayer(tensors=...)``): nothing is initialised and
    then overwritten.  The stack is composed first, without allocating, for the shapes,
    this rank's experts and the memory check, which comes before any read."""
    from moeframe.composer import build_stack
    from moeframe.context import BuildContext
    from moeframe.layer import layer_needs, layer_weight_specs
    from moeframe.memory import check_fits
    from moeframe.parallel import ParallelContext
    from moeframe.workspace import Workspace

    config, index = hf_layer_config(checkpoint_dir, layer, overrides=overrides)
    where = torch.device(device or "cpu")
    parallel = parallel or ParallelContext.from_config(config.parallel)
    parallel.check_same_config(config)
    stack = build_stack(BuildContext(config, where, parallel, Workspace(), {}))
    specs = layer_weight_specs(config, parallel, stack)
    check_fits(layer_needs(config, specs, stack), where, "the layer")
    tensors = _read_layer(specs, config, checkpoint_dir, index, where)
    return cls(config, device=where, parallel=parallel, workspace=workspace, tensors=tensors)


# -- the command line -------------------------------------------------------------------------------
def config_from_args(args: Any, extra: Mapping[str, Any] | None = None) -> Config | None:
    """For the commands' CONFIG argument: the config of one MoE layer when CONFIG is a
    directory (a transformers checkpoint; ``--layer`` picks the layer), else None.  The
    checkpoint and layer are kept on ``args`` for :func:`load_checkpoint_weights`."""
    layer = getattr(args, "layer", None)
    path = Path(str(args.config))
    if not path.is_dir():
        if layer is not None:
            raise InputError(
                f"--layer applies to a transformers checkpoint directory as CONFIG (a directory with config.json), "
                f"not to {str(args.config)!r}"
            )
        return None
    overrides = list(getattr(args, "overrides", []) or []) + [f"{k}={v}" for k, v in (extra or {}).items()]
    config, index = hf_layer_config(path, layer, overrides=overrides)
    args.hf_checkpoint = (path, index)
    return config


def load_checkpoint_weights(args: Any, layer: MoELayer) -> None:
    """Fill ``layer`` from the checkpoint :func:`config_from_args` found, if any."""
    found = getattr(args, "hf_checkpoint", None)
    if found is not None:
        load_layer_weights(layer, *found)


@attrs.frozen
class CheckpointCase:
    """One case of ``moeframe check HF_DIR``: a kernel on one layer of a checkpoint."""

    layer: int
    dtype: str
    num_tokens: int

    @property
    def id(self) -> str:
        return f"layer{self.layer}-{self.dtype}-T{self.num_tokens}"


def split_checkpoint_argument(arguments: list[str], layer: int | None) -> tuple[Path | None, list[str]]:
    """``moeframe check``'s positional arguments: (a checkpoint directory given first, or
    None; the kernel names)."""
    if arguments and Path(arguments[0]).is_dir():
        return Path(arguments[0]), list(arguments[1:])
    if layer is not None:
        raise InputError(
            "--layer applies to a transformers checkpoint directory given as the first argument "
            "(a directory with config.json), e.g. moeframe check HF_DIR fused_cpu --layer 1"
        )
    return None, list(arguments)


def check_kernel_on_checkpoint(
    name: str,
    checkpoint_dir: str | Path,
    layer: int | None,
    device: torch.device | str,
    token_counts: list[int],
    dtypes: list[str] | None = None,
) -> list[Any]:
    """Kernel ``name`` on one MoE layer of a checkpoint (its weights, its router), against
    the reference stack on the same weights, for each token count and dtype (default:
    the checkpoint's).  A dtype or device the kernel does not support gives no case."""
    from moeframe.cli.run import seeded_hidden_states
    from moeframe.conformance import CaseResult
    from moeframe.errors import StackError
    from moeframe.layer import MoELayer
    from moeframe.numerics import compare

    results = []
    chosen: list[str | None] = list(dtypes) if dtypes else [None]
    for dtype in chosen:
        overrides: dict[str, Any] = {"stack.kernel": name}
        if dtype is not None:
            overrides["model.dtype"] = dtype
        config, index = hf_layer_config(checkpoint_dir, layer, overrides=overrides)
        try:
            moe = MoELayer.load_hf(checkpoint_dir, index, overrides=overrides, device=device)
        except StackError:
            continue  # the kernel does not run this dtype or device: no case
        reference = moe.reference()
        m = config.model
        for num_tokens in token_counts:
            case = CheckpointCase(index, m.dtype, num_tokens)
            x = seeded_hidden_states(num_tokens, m.hidden_size, m.torch_dtype, moe.config.seed, device)
            with torch.inference_mode():
                try:
                    out = moe(x)
                except Exception as exc:  # report, do not stop the other cases
                    results.append(CaseResult(case, None, f"{type(exc).__name__}: {exc}"))  # type: ignore[arg-type]
                    continue
                expected = reference(x)
            results.append(CaseResult(case, compare(out, expected)))  # type: ignore[arg-type]
    return results
