"""Where each family's MoE block keeps moeframe's tensors: the one table of HF names.

transformers' in-memory MoE block (what a model holds, and what its conversion mapping
turns a checkpoint's on-disk names into) is described here once per family, for both
users of it:

* :func:`~moeframe.integrations.transformers.patch_model` takes the tensors from a live
  block (sharing them, rearranging them in place, or converting a copy);
* :meth:`moeframe.MoELayer.load_hf` reads the same in-memory names from a checkpoint,
  after transformers' own conversion mapping (``transformers.conversion_mapping``) has
  mapped the on-disk names to them: the on-disk names are not in this table.

Importing this module does not import transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from moeframe.config import Config

__all__ = ["HFTensor", "BlockSpec", "BLOCKS", "block_spec"]


@attrs.frozen
class HFTensor:
    """Where one moeframe tensor is in an HF MoE block (names relative to the block), and
    how the HF tensor is laid out compared with moeframe's canonical one."""

    #: one name, or several whose rows are concatenated (the shared expert's gate and up)
    paths: tuple[str, ...]
    #: stored ``[E, in, out]`` (``x @ W``) where moeframe's is ``[E, out, in]``
    transposed: bool = False
    #: gate and up in alternate columns (GPT-OSS) where moeframe's has gate rows, then up rows
    interleaved: bool = False

    @property
    def as_is(self) -> bool:
        return len(self.paths) == 1 and not (self.transposed or self.interleaved)


@attrs.frozen
class BlockSpec:
    """One family's MoE block in transformers 5."""

    #: the decoder layer's attribute holding the block (``layers.{i}.<attribute>``)
    attribute: str
    #: class names of the block
    classes: tuple[str, ...]
    #: the router submodule's name and the index of the logits in its output
    router: str
    logits_index: int
    #: "plain": returns the output; "scores": ``(out, router_scores)``; "logits": ``(out, router_logits)``
    returns: str
    #: moeframe tensor name -> where it is in the block, for the tensors ``config`` needs
    #: (the shared expert's only with a ``shared_experts`` wrapper, its gate only when gated)
    tensors: Callable[[Config], dict[str, HFTensor]] = attrs.field(repr=False)
    #: whether a live block's layout changes are made in place (the HF tensors become views
    #: of moeframe's); False: converted into copies (GPT-OSS: no view expresses gate/up
    #: interleaving, so its experts are converted, together)
    in_place: bool = True


def _shared(prefix: str, gate: str | None) -> Callable[[Config], dict[str, HFTensor]]:
    def tensors(config: Config) -> dict[str, HFTensor]:
        wrappers = [w for w in config.stack.wrappers if w.name == "shared_experts"]
        if not wrappers:
            return {}
        out = {
            "shared.w13": HFTensor((f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight")),
            "shared.w2": HFTensor((f"{prefix}.down_proj.weight",)),
        }
        if gate is not None and any(w.params.gated for w in wrappers):
            out["shared.gate.weight"] = HFTensor((gate,))
        return out

    return tensors


def _block(
    router: str,
    *,
    experts_transposed: bool = False,
    experts_interleaved: bool = False,
    bias: bool = False,
    extra: dict[str, HFTensor] | None = None,
    shared: Callable[[Config], dict[str, HFTensor]] | None = None,
) -> Callable[[Config], dict[str, HFTensor]]:
    def tensors(config: Config) -> dict[str, HFTensor]:
        out = {
            "router.weight": HFTensor((f"{router}.weight",)),
            "experts.w13": HFTensor(("experts.gate_up_proj",), experts_transposed, experts_interleaved),
            "experts.w2": HFTensor(("experts.down_proj",), experts_transposed),
            **(extra or {}),
        }
        if bias:
            out["experts.b13"] = HFTensor(("experts.gate_up_proj_bias",), interleaved=experts_interleaved)
            out["experts.b2"] = HFTensor(("experts.down_proj_bias",))
        if shared is not None:
            out.update(shared(config))
        return out

    return tensors


#: family -> its MoE block (transformers 5)
BLOCKS: dict[str, BlockSpec] = {
    "mixtral": BlockSpec("mlp", ("MixtralSparseMoeBlock",), "gate", 0, "plain", _block("gate")),
    "qwen2_moe": BlockSpec(
        "mlp",
        ("Qwen2MoeSparseMoeBlock",),
        "gate",
        0,
        "plain",
        _block("gate", shared=_shared("shared_expert", "shared_expert_gate.weight")),
    ),
    "qwen3_moe": BlockSpec("mlp", ("Qwen3MoeSparseMoeBlock",), "gate", 0, "plain", _block("gate")),
    "deepseek_v3": BlockSpec(
        "mlp",
        ("DeepseekV3MoE",),
        "gate",
        0,
        "plain",
        _block(
            "gate",
            extra={"router.e_score_correction_bias": HFTensor(("gate.e_score_correction_bias",))},
            shared=_shared("shared_experts", None),
        ),
    ),
    "gpt_oss": BlockSpec(
        "mlp",
        ("GptOssMLP",),
        "router",
        0,
        "scores",
        _block(
            "router",
            experts_transposed=True,
            experts_interleaved=True,
            bias=True,
            extra={"router.bias": HFTensor(("router.bias",))},
        ),
        in_place=False,
    ),
    "llama4": BlockSpec(
        "feed_forward",
        ("Llama4TextMoe",),
        "router",
        1,
        "logits",
        _block("router", experts_transposed=True, shared=_shared("shared_expert", None)),
    ),
}


def block_spec(family: str) -> BlockSpec:
    """The block of ``family`` (one of ``SUPPORTED_FAMILIES``)."""
    return BLOCKS[family]
