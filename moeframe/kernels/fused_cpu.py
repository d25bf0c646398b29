"""``fused_cpu``: the fast CPU kernel.

Sort-and-group once per call, then every expert's tokens go through two grouped GEMMs
with the activation, biases and routed weight applied in the GEMM epilogues; weights are
read in place, in the canonical layout and dtype (no gathered or converted copies), and
everything is accumulated in fp32.

Two paths, picked per expert by how many tokens it received (so, per call, by T):

* **decode** (at most 6 tokens for an expert): the weight rows are streamed once, in a few
  long contiguous runs, each element multiplied into every token: memory bound by design;
* **prefill** (7 tokens or more): tokens are packed 16 wide and every weight element is
  broadcast into 16 fused multiply-adds (6 weight rows x 16 tokens in registers), the
  tokens beyond the last full 16 taking the decode kernel on the same rows while they are
  in cache: compute bound.

Both run in a native core (C with AVX2/FMA and OpenMP, compiled on first use; see
:mod:`moeframe.kernels._fused_cpu_native`), whose result does not depend on the number of
threads.  Where it cannot be built (no compiler, no AVX2) the kernel runs the same
sort-and-group algorithm with torch operations (``backend = "torch"``): slower, same
result; ``moeframe explain`` shows which backend is in use.
"""

from __future__ import annotations

import collections
import itertools
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import attrs
import torch

from moeframe.config import option
from moeframe.kernels import ExpertWeights, Kernel, expert_mlp
from moeframe.kernels.activations import apply_activation

if TYPE_CHECKING:
    from moeframe.context import BuildContext

__all__ = ["FusedCpuParams", "FusedCpuKernel"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACTIVATION_CODES = {"silu": 0, "gelu": 1, "swigluoai": 2}
#: (token, k) pairs whose intermediate activations ([I] floats each) one native call keeps
#: at once; larger calls run in groups (this bounds the call's extra memory).
GROUP_PAIRS = 8192


class _ScratchPool:
    """The native core's scratch buffers, kept between calls and shared by every
    ``fused_cpu`` kernel of the process (one call at a time, under :attr:`lock`): fresh
    pages for megabytes of scratch on every call cost a few percent of a prefill.  A
    buffer grows on demand; one over :data:`KEPT_BYTES` is allocated for its call only.
    Everything goes through torch's allocator, so the profiler sees it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A buffer of at least ``numel`` elements (contents undefined); hold :attr:`lock`."""
        nbytes = numel * dtype.itemsize
        if nbytes > KEPT_BYTES:
            return torch.empty(numel, dtype=dtype)
        kept = self._buffers.get(name)
        if kept is None or kept.dtype != dtype or kept.numel() < numel:
            kept = self._buffers[name] = torch.empty(numel, dtype=dtype)
        return kept

    def release(self) -> None:
        """Drop the kept buffers (they are allocated again on the next call)."""
        with self.lock:
            self._buffers.clear()

    @property
    def kept_bytes(self) -> int:
        return sum(t.nbytes for t in self._buffers.values())


#: bytes up to which one scratch buffer is kept between calls
KEPT_BYTES = 32 * 1024**2
_SCRATCH = _ScratchPool()


@attrs.frozen
class _MatmulExperts:
    """The local experts of one call that torch's matmul computes, in order, with their
    token counts and (token, k) pairs (concatenated in that order)."""

    experts: list[int]
    counts: list[int]
    pairs: torch.Tensor
    native_pairs: int  # pairs left to the native core


@attrs.frozen
class FusedCpuParams:
    backend: str = option(
        "auto",
        help="'native' (the compiled AVX2 core; an error where it cannot be built), 'torch' (torch "
        "operations only) or 'auto' (native where possible, else torch)",
        choices=("auto", "native", "torch"),
    )
    matmul_tokens: int = option(
        0,
        help="an expert given at least this many tokens in one call has its two GEMMs done by torch's "
        "matmul (oneDNN/MKL, which use AVX-512 and AMX where the CPU has them) instead of the native core "
        "(bf16 on the amx_bf16 and avx512_bf16 variants: by their own AMX / vdpbf16ps kernel over repacked weights); "
        "0: the threshold measured for this CPU and dtype, -1: never (native backend only)",
        min=-1,
    )


class FusedCpuKernel(Kernel):
    """Grouped, fused experts on the CPU (see the module docstring); fp32 accumulation."""

    Params = FusedCpuParams

    def __init__(self, context: BuildContext, params: FusedCpuParams) -> None:
        super().__init__(context, params)
        self._native: Any = None
        self._why_not_native: str | None = None
        # the op (moeframe::fused_cpu_experts) finds this kernel by this key
        self._op_key = f"fused_cpu-{next(_OP_KEYS)}"
        _LIVE_KERNELS[self._op_key] = self
        self._misfits_warned: set[str] = set()
        if params.backend != "torch":
            from moeframe.kernels._fused_cpu_native import NativeUnavailable, load_native

            try:
                self._native = load_native()
            except NativeUnavailable as exc:
                if params.backend == "native":
                    from moeframe.errors import StackError

                    raise StackError(
                        f"stack.kernel_params.backend: kernel 'fused_cpu' cannot use its native core here: {exc}"
                    ) from None
                self._why_not_native = str(exc)
                warnings.warn(f"fused_cpu: native core unavailable ({exc}); using the torch path", stacklevel=2)
        else:
            self._why_not_native = "backend = 'torch'"

    @property
    def backend(self) -> str:
        """``"native"`` or ``"torch"``: the path this instance runs."""
        return "native" if self._native is not None else "torch"

    def describe(self) -> dict[str, Any]:
        op = "moeframe::fused_cpu_experts"
        if self._native is not None:
            dtype = self.model.torch_dtype
            threshold = self.matmul_threshold(dtype) if dtype in _DTYPE_CODES else None
            matmul = f", torch matmul from {threshold} tokens per expert" if threshold is not None else ""
            bf16 = self._bf16_kernels(dtype) if threshold is not None else None
            extra: dict[str, Any] = {}
            if bf16 is not None:  # the variant's own bf16 kernel takes those experts, on repacked weights
                from moeframe.memory import format_bytes

                m = self.model
                packed = self.packed_weight_bytes_for(dtype, m.num_experts, m.hidden_size, m.intermediate_size)
                how = "AMX-BF16 tiles" if bf16.kind == "amx" else "vdpbf16ps"
                refused = f"; {bf16.amx_refused}" if bf16.amx_refused else ""
                matmul = (
                    f", bf16 experts from {threshold} tokens per expert on {how}{refused} "
                    f"(repacked weights: {format_bytes(packed)})"
                )
                extra = {"bf16_experts": bf16.kind, "packed_weight_bytes": packed}
            return {
                "summary": f"native {self._native.isa}{matmul}",
                "backend": "native",
                "isa": self._native.isa,
                "matmul_from_tokens": threshold,
                "library": str(self._native.path),
                "op": op,
                "kept_scratch_bytes": _SCRATCH.kept_bytes,
                **extra,
            }
        return {
            "summary": f"torch path: {self._why_not_native}",
            "backend": "torch",
            "why": self._why_not_native,
            "op": op,
        }

    def release(self) -> None:
        """Free the scratch buffers kept between calls (shared by every ``fused_cpu`` kernel)."""
        _SCRATCH.release()

    # -- forward -------------------------------------------------------------------------
    def __call__(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        experts: ExpertWeights,
    ) -> torch.Tensor:
        num_tokens, hidden = hidden_states.shape
        if num_tokens == 0 or experts.w13.shape[0] == 0:
            return torch.zeros(num_tokens, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
        # through the registered op: torch.compile sees one node (with a fake implementation)
        return torch.ops.moeframe.fused_cpu_experts(
            hidden_states,
            topk_weights,
            topk_ids,
            *experts,  # w13, w2, b13, b2, expert_map: the op's parameters in ExpertWeights' order
            self._op_key,
        )

    def _compute(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        """The op's implementation for this kernel: the native core where it takes the
        inputs, else torch (a warning says why, once per reason; an error with
        ``backend = "native"``)."""
        if self._native is None:
            return self._forward_torch(hidden_states, topk_weights, topk_ids, experts)
        misfit = self._native_misfit(hidden_states, experts)
        if misfit is None:
            return self._forward_native(hidden_states, topk_weights, topk_ids, experts)
        if self.params.backend == "native":
            raise ValueError(f"fused_cpu (backend = 'native'): the native core does not take these inputs: {misfit}")
        if misfit not in self._misfits_warned:
            self._misfits_warned.add(misfit)
            warnings.warn(
                f"fused_cpu: the native core does not take these inputs ({misfit}); they run the torch path",
                stacklevel=2,
            )
        return self._forward_torch(hidden_states, topk_weights, topk_ids, experts)

    @staticmethod
    def _native_misfit(x: torch.Tensor, experts: ExpertWeights) -> str | None:
        """Why the native core cannot take these inputs, or ``None``."""
        if x.device.type != "cpu":
            return f"hidden_states on {x.device}"
        if x.dtype not in _DTYPE_CODES:
            return f"hidden_states in {x.dtype}"
        named = {"w13": experts.w13, "w2": experts.w2, "b13": experts.b13, "b2": experts.b2}
        for name, t in named.items():
            if t is None:
                continue
            if t.device.type != "cpu" or t.dtype != x.dtype:
                return f"{name} is {t.dtype} on {t.device}, hidden_states {x.dtype} on {x.device}"
            if not t.is_contiguous():
                return f"{name} is not contiguous (give the layer contiguous weights)"
        return None

    def _forward_native(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        lib = self._native
        x = x.contiguous()
        T, H = x.shape
        K = topk_ids.shape[1]
        E_local, two_i, _ = experts.w13.shape
        I = two_i // 2
        ids = topk_ids.to(torch.int64).contiguous()
        weights = topk_weights.to(torch.float32).contiguous()
        expert_map = None if experts.expert_map is None else experts.expert_map.to(torch.int32).contiguous()
        num_experts = E_local if expert_map is None else expert_map.shape[0]
        pairs = T * K
        nthreads = torch.get_num_threads()
        scratch_floats = lib.scratch_floats(H, I, T)

        out = torch.empty(T, H, dtype=x.dtype)
        hbuf_slots = lib.hbuf_slots(pairs, E_local, GROUP_PAIRS)
        act = self.activation

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        with _SCRATCH.lock:
            take = _SCRATCH.take
            acc = out if x.dtype == torch.float32 else take("acc", T * H)
            ints = take("ints", lib.ints_needed(pairs, E_local), torch.int32)
            hbuf = take("hbuf", hbuf_slots * I)
            scratch = take("scratch", nthreads * scratch_floats)
            split = self._split_for_matmul(x.dtype, ids, expert_map, num_experts, E_local)
            if split is not None:  # some experts go to torch.matmul; the native core skips them
                expert_map, big = split
            status = 0
            if split is None or big.native_pairs:
                status = lib.forward(
                    dtype=_DTYPE_CODES[x.dtype],
                    x=ptr(x),
                    T=T,
                    H=H,
                    ids=ptr(ids),
                    tw=ptr(weights),
                    topk=K,
                    expert_map=ptr(expert_map),
                    num_experts=num_experts,
                    w13=ptr(experts.w13),
                    w2=ptr(experts.w2),
                    b13=ptr(experts.b13),
                    b2=ptr(experts.b2),
                    local_experts=E_local,
                    I=I,
                    act_kind=_ACTIVATION_CODES[act.name],
                    alpha=act.alpha,
                    limit=act.limit,
                    out=ptr(out),
                    acc=ptr(acc),
                    ints=ptr(ints),
                    hbuf=ptr(hbuf),
                    hbuf_slots=hbuf_slots,
                    scratch=ptr(scratch),
                    scratch_floats=scratch_floats,
                    nthreads=nthreads,
                )
            if split is not None:
                acc_rows = acc[: T * H].view(T, H)
                if not big.native_pairs:
                    acc_rows.zero_()
                bf16 = self._bf16_kernels(x.dtype)
                if bf16 is not None:  # AMX-BF16 / AVX512-BF16 over repacked weights (bf16_packing)
                    self._bf16_experts(bf16, x, weights, big, experts, acc_rows)
                else:
                    self._matmul_experts(x, weights, big, experts, acc_rows)
                if x.dtype != torch.float32:
                    out.copy_(acc_rows)
        if status == -1:
            raise ValueError(f"topk_ids holds an expert id outside [0, {num_experts})")
        if status == -2:
            raise ValueError(f"expert_map holds a local index outside [-1, {E_local})")
        return out

    def matmul_threshold(self, dtype: torch.dtype) -> int | None:
        """Tokens per expert from which the native path hands an expert to torch's matmul
        (``None``: never), from :attr:`FusedCpuParams.matmul_tokens` or, when that is 0,
        the table of :func:`moeframe.kernels.cpu_isa.matmul_min_tokens`."""
        setting = self.params.matmul_tokens
        if setting < 0:
            return None
        if setting > 0:
            return setting
        from moeframe.kernels.cpu_isa import matmul_min_tokens

        return matmul_min_tokens(
            str(dtype).removeprefix("torch."), self._native.isa if self._native is not None else None
        )

    def _split_for_matmul(
        self,
        dtype: torch.dtype,
        ids: torch.Tensor,
        expert_map: torch.Tensor | None,
        num_experts: int,
        local_experts: int,
    ) -> tuple[torch.Tensor, _MatmulExperts] | None:
        """Which local experts get at least :meth:`matmul_threshold` tokens in this call:
        ``None`` when none does, else the expert map that hides them from the native core
        and their (token, k) pairs in expert order."""
        threshold = self.matmul_threshold(dtype)
        flat = ids.view(-1)
        if threshold is None or flat.numel() < threshold:
            return None
        if flat.numel() <= 64:  # decode: count in Python, microseconds instead of a few torch ops
            values = flat.tolist()
            if expert_map is not None:
                local_ids = expert_map.tolist()
                values = [local_ids[v] for v in values if 0 <= v < len(local_ids)]
            if max(collections.Counter(values).values(), default=0) < threshold:
                return None  # (ids outside the range are the native core's to report)
        if int(flat.min()) < 0 or int(flat.max()) >= num_experts:
            raise ValueError(f"topk_ids holds an expert id outside [0, {num_experts})")
        if expert_map is None:
            local = flat
            base_map = torch.arange(local_experts, dtype=torch.int32)
        else:
            if int(expert_map.min()) < -1 or int(expert_map.max()) >= local_experts:
                raise ValueError(f"expert_map holds a local index outside [-1, {local_experts})")
            local = expert_map[flat].to(torch.int64)
            base_map = expert_map
        counts = torch.bincount(local[local >= 0], minlength=local_experts)
        big_experts = counts >= threshold
        if not bool(big_experts.any()):
            return None
        # the native core skips the big experts (-1 in its map); their pairs, in expert order
        native_map = torch.where(big_experts[base_map.clamp(min=0).long()] & (base_map >= 0), -1, base_map)
        is_big = (local >= 0) & big_experts[local.clamp(min=0)]
        pairs = torch.nonzero(is_big).squeeze(1)
        pairs = pairs[torch.argsort(local[pairs], stable=True)]
        chosen = torch.nonzero(big_experts).squeeze(1)
        big = _MatmulExperts(
            experts=chosen.tolist(),
            counts=counts[chosen].tolist(),
            pairs=pairs,
            native_pairs=int((local >= 0).sum()) - pairs.numel(),
        )
        return native_map.to(torch.int32).contiguous(), big

    def _bf16_kernels(self, dtype: torch.dtype) -> Any:
        """The native bf16 kernels that take the experts handed over for their token count
        (variants ``amx_bf16``, ``avx512_bf16``), or ``None``: torch's matmul takes them."""
        if dtype != torch.bfloat16 or self._native is None:
            return None
        return getattr(self._native, "bf16", None)

    @property
    def packed_weight_bytes(self) -> int:
        """Bytes of repacked expert weights held for this process's ``fused_cpu`` kernels
        (bf16 weights on the ``amx_bf16`` and ``avx512_bf16`` variants: about the size of
        the bf16 expert weights again, packed once on first use; 0 elsewhere).  See
        :mod:`moeframe.kernels.bf16_packing`."""
        from moeframe.kernels.bf16_packing import PACKED

        return PACKED.nbytes

    def packed_weight_bytes_for(self, dtype: torch.dtype, num_experts: int, hidden: int, intermediate: int) -> int:
        """Bytes this kernel will add by repacking ``num_experts`` experts of this shape in
        ``dtype`` (0 where it packs nothing): for memory estimates before the first call."""
        if self._bf16_kernels(dtype) is None or self.matmul_threshold(dtype) is None:
            return 0
        from moeframe.kernels.bf16_packing import packed_bytes

        return packed_bytes(num_experts, hidden, intermediate)

    def derived_weight_bytes(self, num_experts: int, hidden: int, intermediate: int) -> int:
        """The repacked bf16 copy this kernel will keep (:meth:`packed_weight_bytes_for` in
        the model's dtype): see :meth:`Kernel.derived_weight_bytes`."""
        return self.packed_weight_bytes_for(self.model.torch_dtype, num_experts, hidden, intermediate)

    def _bf16_experts(
        self,
        bf16: Any,
        x: torch.Tensor,
        weights: torch.Tensor,
        big: _MatmulExperts,
        experts: ExpertWeights,
        acc: torch.Tensor,
    ) -> None:
        """``acc[t] += w[t,k] * f_e(x[t])`` for the big experts with the native bf16 kernels,
        on the weights' packed copy (made once, cached: :data:`bf16_packing.PACKED`); the
        experts are added in order, each output element by one thread."""
        from moeframe.kernels.bf16_packing import PACKED

        packed = PACKED.get(experts.w13, experts.w2)
        K = weights.shape[1]
        tw = weights.view(-1)[big.pairs]
        bf16.run(x, big.pairs // K, tw, big.experts, big.counts, packed, experts.b13, experts.b2, self.activation, acc,
                 take=_SCRATCH.take)  # fmt: skip

    def _matmul_experts(
        self, x: torch.Tensor, weights: torch.Tensor, big: _MatmulExperts, experts: ExpertWeights, acc: torch.Tensor
    ) -> None:
        """``acc[t] += w[t,k] * f_e(x[t])`` for the big experts, one after another (a fixed
        order: the result does not depend on the number of threads), with torch's matmul
        on each expert's gathered tokens and the weights read in place.  bf16 GEMMs
        return bf16 results (torch's CPU matmul has no fp32 output for them); fp16 ones
        would overflow where fp32 does not (65504 is fp16's largest value), so fp16 runs
        them in fp32 on widened copies (correct, not fast: the CPU table never picks this
        path for fp16).  The activation, biases, routed weights and sums are fp32."""
        K = weights.shape[1]
        flat_weights = weights.view(-1)
        pairs = big.pairs.split(big.counts)
        gemm_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        for e, p in zip(big.experts, pairs, strict=True):
            tok = p // K
            xs = x.index_select(0, tok).to(gemm_dtype)
            gate_up = torch.mm(xs, experts.w13[e].t().to(gemm_dtype)).float()
            if experts.b13 is not None:
                gate_up += experts.b13[e].float()
            h = apply_activation(gate_up, self.activation).to(gemm_dtype)
            y = torch.mm(h, experts.w2[e].t().to(gemm_dtype)).float()
            if experts.b2 is not None:
                y += experts.b2[e].float()
            y *= flat_weights[p].unsqueeze(1)
            acc.index_add_(0, tok, y)

    def _forward_torch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        T, H = x.shape
        K = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        local = flat if experts.expert_map is None else experts.expert_map.to(flat.device)[flat].to(flat.dtype)
        keep = torch.nonzero(local >= 0).squeeze(1)
        local = local[keep]
        order = torch.argsort(local, stable=True)
        pair = keep[order]
        counts = torch.bincount(local, minlength=experts.w13.shape[0]).tolist()
        token = pair // K
        xs = x[token].float()
        ys = torch.empty(pair.numel(), H, dtype=torch.float32, device=x.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            start += count
            ys[rows] = expert_mlp(xs[rows], experts, e, self.activation)
        ys *= topk_weights.reshape(-1)[pair].float().unsqueeze(1)
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        out.index_add_(0, token, ys)
        return out.to(x.dtype)


# -- the torch op -------------------------------------------------------------------------------
#: the live kernels by the key their op calls carry (a compiled graph holds the key as a
#: constant; the kernel's backend, ISA and parameters stay with the kernel)
_LIVE_KERNELS: weakref.WeakValueDictionary[str, FusedCpuKernel] = weakref.WeakValueDictionary()
_OP_KEYS = itertools.count()


@torch.library.custom_op("moeframe::fused_cpu_experts", mutates_args=())
def fused_cpu_experts(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    """``fused_cpu``'s experts computation as a torch op: ``[T, H]`` in the activation dtype,
    a new tensor.  ``kernel`` names the live :class:`FusedCpuKernel` whose backend and
    parameters apply (its ``_op_key``)."""
    instance = _LIVE_KERNELS.get(kernel)
    if instance is None:
        raise RuntimeError(f"moeframe::fused_cpu_experts: no live fused_cpu kernel {kernel!r} (was its layer deleted?)")
    return instance._compute(hidden_states, topk_weights, topk_ids, ExpertWeights(w13, w2, b13, b2, expert_map))


@fused_cpu_experts.register_fake
def _fused_cpu_experts_fake(
    hidden_states: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    expert_map: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    """The op's output for tracing (``torch.compile``, meta tensors): shape and dtype only."""
    return hidden_states.new_empty(hidden_states.shape)
