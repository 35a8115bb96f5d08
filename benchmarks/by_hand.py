"""The by-hand dry run mixspec is measured against (issue 7).

What a user writes today to learn how many parameters a mixed fine-tune trains, with no
weights and no GPU: load the config with AutoConfig, build the model on the meta device,
wrap the LLM with PEFT LoRA (every Linear of the language model, rank 16), set the vision
tower (merger included) trainable, count.

    python benchmarks/by_hand.py MODEL_DIR

MODEL_DIR holds a Qwen2-VL / Qwen2.5-VL config.json (e.g. compiler/models/catalog/Qwen/
Qwen2.5-VL-72B-Instruct). Prints one JSON line: seconds per phase and the counts, which
benchmarks/speed.py compares with ``mixspec plan --json`` for the same setup.
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForImageTextToText  # noqa: E402

LLM_LINEAR = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def main(model_dir: str, rank: int = 16, alpha: int = 32) -> dict:
    t_import = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    t_build = time.perf_counter()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05,
                                             target_modules=LLM_LINEAR))
    t_peft = time.perf_counter()
    for name, param in model.named_parameters():
        if ".model.visual." in name:
            param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    t_count = time.perf_counter()
    return {
        "import_s": round(t_import - T0, 3), "build_s": round(t_build - t_import, 3),
        "peft_s": round(t_peft - t_build, 3), "count_s": round(t_count - t_peft, 3),
        "trainable_params": trainable, "all_params": total,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
