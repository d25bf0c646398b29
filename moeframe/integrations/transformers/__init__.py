"""moeframe inside Hugging Face transformers models (the ``moeframe[transformers]`` extra).

Two depths (see ``docs/transformers.md``):

* the experts computation only, as a transformers experts implementation
  (``register_experts``; HF's routing stays);
* whole MoE blocks replaced by :class:`moeframe.MoELayer` built from the model's config
  (``config_from_hf``, ``patch_model``, ``unpatch_model``).

Importing this package does not import transformers; the functions do, when called.
"""

from __future__ import annotations

from moeframe.integrations.transformers.config import SUPPORTED_FAMILIES, config_from_hf, moe_layer_indices
from moeframe.integrations.transformers.experts import check_experts_implementation, register_experts
from moeframe.integrations.transformers.patch import PatchedBlock, PatchedLayer, PatchReport, patch_model, unpatch_model

__all__ = [
    "SUPPORTED_FAMILIES",
    "register_experts",
    "check_experts_implementation",
    "config_from_hf",
    "moe_layer_indices",
    "patch_model",
    "unpatch_model",
    "PatchReport",
    "PatchedLayer",
    "PatchedBlock",
]
