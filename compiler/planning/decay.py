"""Which trained parameters get weight decay: mixspec's rule, decided once, in the Plan.

mixspec's rule (every target emits it, or refuses): a trained parameter gets its
component's weight decay unless

- its module is a normalisation layer, by the module's type on the tree (a torch
  LayerNorm, GroupNorm, RMSNorm, BatchNorm or InstanceNorm, or any class whose name ends
  in ``Norm``: ``Qwen2RMSNorm``, ``Gemma3RMSNorm``, ...), or
- it is a bias (its own name is ``bias`` or ends in ``_bias``), or
- it has fewer than two dimensions (LLaVA's ``class_embedding``, LLaVA-NeXT's
  ``image_newline``, Mllama's gates, DoRA's magnitude vectors).

LoRA's A and B matrices (and LoRA embedding A/B) are 2-D and decay.

Backends that decide by themselves use transformers' rule instead
(``Trainer.get_decay_parameter_names``: no decay inside a ``torch.nn.LayerNorm`` and for
names matching bias/norm patterns); ``transformers_decays`` mirrors it so a target can
tell whether the backend's own rule gives the Plan's sets.
"""

from __future__ import annotations

import re

from ..models.tree import NORM_TORCH_LAYERNORM, ModuleTree

NO_DECAY_NORM, NO_DECAY_BIAS, NO_DECAY_1D = "norm", "bias", "1-D"

# transformers.Trainer.get_decay_parameter_names (4.5x-5.x): searched in the lower-cased name
_TRANSFORMERS_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def no_decay_reason(tree: ModuleTree, name: str) -> str | None:
    """Why a base parameter of the tree gets no weight decay (None: it decays)."""
    owner, _, local = name.rpartition(".")
    module = tree.by_name.get(owner)
    if module is not None and module.norm:
        return NO_DECAY_NORM
    if local == "bias" or local.endswith("_bias"):
        return NO_DECAY_BIAS
    if len(tree.param_shapes[name]) < 2:
        return NO_DECAY_1D
    return None


def adapter_no_decay(name: str) -> bool:
    """A LoRA adapter parameter (PEFT naming): only DoRA's 1-D magnitude vector is exempt."""
    return ".lora_magnitude_vector." in name


def transformers_decays(name: str, layernorm_modules) -> bool:
    """transformers' rule for one parameter name (base or adapter, without PEFT's prefix,
    which matches none of its patterns): ``layernorm_modules`` are the torch LayerNorm
    modules of the model (no parameter under one decays)."""
    if _TRANSFORMERS_NO_DECAY.search(name.lower()):
        return False
    parts = name.split(".")
    return not any(".".join(parts[:i]) in layernorm_modules for i in range(1, len(parts)))


def torch_layernorm_modules(tree: ModuleTree) -> tuple[str, ...]:
    """Names of the tree's torch.nn.LayerNorm modules (what transformers' rule looks for)."""
    return tuple(m.name for m in tree.modules if m.norm == NORM_TORCH_LAYERNORM and m.name)


def transformers_rule_differs(comp, layernorm_modules) -> list[str]:
    """The trained parameters of a component (a ComponentPlan) whose weight decay would differ
    if transformers' rule chose the decay set; empty when the component has no weight decay."""
    if not comp.weight_decay:
        return []  # no decay at all: which rule decides makes no difference
    exempt = set(comp.no_decay)
    return [n for n in comp.trainable_names if transformers_decays(n, layernorm_modules) != (n not in exempt)]
