"""Check mixspec's memory estimate against a real GPU (weights + gradients + optimizer states).

Usage (on a machine with a CUDA GPU; needs torch, transformers, peft — not mixspec):
    python benchmarks/gpu_memory_check.py CASE_DIR [CASE_DIR ...]
Each CASE_DIR holds ``plan.json`` (``mixspec plan SPEC --json``) and the model's
``config.json``. For each case the script builds the real model on the GPU with random
weights in the training dtype, applies the Plan as the generated hf target does (PEFT LoRA
on the Plan's exact modules, requires_grad on full components, trained parameters upcast to fp32, AdamW with one group per
component), gives every trainable parameter a gradient, takes one optimizer step, and
compares ``torch.cuda.memory_allocated()`` with the estimate's weights + gradients +
optimizer states (single GPU, no DeepSpeed; activations are excluded on both sides).
Prints one JSON line per case.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def run_case(case: Path) -> dict:
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import CONFIG_MAPPING

    plan = json.loads((case / "plan.json").read_text())
    config_dict = json.loads((case / "config.json").read_text())
    precision = plan["training"]["precision"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    cls = getattr(transformers, config.architectures[0])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    t0 = time.time()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = cls._from_config(config, dtype=dtype)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    lora_comps = [c for c in plan["components"] if c["mode"] == "lora" and c["lora"]]
    if lora_comps:
        lo = lora_comps[0]["lora"]
        targets = sorted({m for c in lora_comps for m in c["lora"]["target_modules"]})
        model = get_peft_model(model, LoraConfig(
            r=lo["rank"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
            use_rslora=lo["rslora"], use_dora=lo["dora"], target_modules=targets))
    named = dict(model.named_parameters())
    prefix = "base_model.model." if lora_comps else ""
    groups = []
    for comp in plan["components"]:
        if comp["mode"] == "full":
            params = [named[prefix + n] for n in comp["param_names"]]
            for p in params:
                p.requires_grad_(True)
        elif comp["mode"] == "lora":
            mods = set(comp["lora"]["target_modules"])
            params = [p for n, p in named.items() if p.requires_grad
                      and any(n.startswith(prefix + m + ".lora_") for m in mods)]
        else:
            continue
        if params:
            groups.append({"params": params, "lr": comp["lr"]})
    if dtype != torch.float32:
        # as the hf target's train.py: frozen weights 16 bit, trained ones upcast to fp32
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer = torch.optim.AdamW(groups, foreach=False)
    optimizer.step()
    torch.cuda.synchronize()
    measured = torch.cuda.memory_allocated() - base_mem
    est = plan["estimate"]["per_gpu_bytes"]
    predicted = est["weights"] + est["gradients"] + est["optimizer_states"]
    result = {
        "case": case.name, "precision": precision, "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "trainable_measured": trainable, "trainable_plan": plan["totals"]["trainable_params"],
        "bytes_measured": measured, "bytes_predicted": predicted,
        "ratio_measured_over_predicted": round(measured / predicted, 5),
        "seconds": round(time.time() - t0, 1),
    }
    del optimizer, model, named, groups
    torch.cuda.empty_cache()
    return result


def main(argv: list[str]) -> int:
    ok = True
    for arg in argv:
        result = run_case(Path(arg))
        print(json.dumps(result), flush=True)
        ok &= result["trainable_measured"] == result["trainable_plan"]
        ok &= abs(result["ratio_measured_over_predicted"] - 1) < 0.02
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
