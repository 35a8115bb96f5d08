"""Quantized bases and bitsandbytes optimizers as the targets see them: what train.py embeds,
and what each backend cannot express (refused, naming the difference)."""

from __future__ import annotations

import re

from ..errors import Unsupported
from ..planning.plan import Plan


def quantization_data(plan: Plan) -> dict | None:
    """What train.py needs to load the base quantized: the BitsAndBytesConfig values (the skip
    list as escaped full names: transformers matches each entry as a regex from the start of
    a module name up to a dot, or as a suffix, so an escaped full name skips exactly that
    module and everything under it) and, per component, the modules planned quantized."""
    q = plan.quant_config()
    if q is None:
        return None
    return {
        "method": q.method,
        "double_quant": q.double_quant,
        "compute_dtype": q.compute_dtype,
        "skip_modules": [re.escape(n) for n in plan.quant_skip_modules],
        "components": {c.name: list(c.quantize.modules) for c in plan.components if c.quantize},
    }


# the spec's optimizer -> transformers' optim name for it (bitsandbytes AdamW, 8 bit and/or paged)
HF_OPTIM_NAMES = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
                  "paged_adamw": "paged_adamw_32bit", "adamw_torch_8bit": "adamw_torch_8bit",
                  "adamw_torch_4bit": "adamw_torch_4bit"}
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def backend_quantizes_exactly(plan: Plan) -> bool:
    """A backend whose BitsAndBytesConfig has no skip list (ms-swift, LLaMA-Factory) quantizes
    exactly the Plan's modules."""
    return plan.quantized and plan.quant_is_default


def quant_refusals(plan: Plan, target: str, why_quant: str, why_optim: str,
                   quantize_ok: bool = False, optimizer_ok: bool = False, show_kept: bool = True) -> list[Unsupported]:
    """A target that cannot quantize exactly the Plan's modules, or build its optimizer."""
    out = []
    if quantize_ok and optimizer_ok:
        return out
    if quantize_ok:
        return [u for u in quant_refusals(plan, target, why_quant, why_optim) if u.code != "quantize-modules"]
    if optimizer_ok:
        return [u for u in quant_refusals(plan, target, why_quant, why_optim) if u.code != "optimizer-8bit"]
    kept = plan.quant_skip_modules
    if kept and show_kept:  # the difference from a backend that quantizes every Linear but lm_head
        why_quant += (f"; this Plan keeps {', '.join(kept[:4])}" + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
                      + " unquantized")
    for comp in plan.components:
        if comp.quantize:
            out.append(Unsupported(
                "quantize-modules", comp.origin,
                f"quantize: {comp.quantize.method} on component {comp.name!r} "
                f"({len(comp.quantize.modules)} Linear modules, the rest of the model 16-bit)",
                why_quant, "compile for the hf target (its BitsAndBytesConfig skips exactly the Plan's "
                           "unquantized modules), or drop quantize"))
    if plan.training.optimizer != "adamw":
        out.append(Unsupported(
            "optimizer-8bit", None, f"training.optimizer {plan.training.optimizer}", why_optim,
            "compile for the hf target (bitsandbytes optimizer over the Plan's groups), or use optimizer: adamw"))
    return out


def kbit_warnings(plan: Plan, backend: str) -> list[str]:
    """The Plan's memory estimate is the hf target's run: PEFT's k-bit preparation holds every
    non-quantized parameter in fp32; another backend may keep them in the training precision."""
    if not plan.quantized or plan.training.precision == "fp32":
        return []
    return [f"the memory estimate assumes PEFT's prepare_model_for_kbit_training (every non-quantized parameter "
            f"in fp32, as the hf target's train.py does); mixspec has not measured what {backend} keeps in fp32, "
            "so its weights may take less than estimated"]
