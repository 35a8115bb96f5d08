"""Quantized bases and bitsandbytes optimizers as the targets see them: what train.py embeds,
and what each backend cannot express (refused, naming the difference)."""

from __future__ import annotations

import re

from mixspec.errors import Unsupported
from mixspec.plan import Plan


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


def quant_refusals(plan: Plan, target: str, why_quant: str, why_optim: str) -> list[Unsupported]:
    """A target that cannot quantize exactly the Plan's modules, or build its optimizer."""
    out = []
    kept = plan.quant_skip_modules
    if kept:
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
