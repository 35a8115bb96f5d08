"""Run inside the axolotl venv: axolotl's own load_cfg (what `axolotl train` runs first:
validate_config, normalize_config, the datasets' normalization) on a config.yml, then, on the
model built from base_model's config on the meta device (no weights), what axolotl/PEFT would
train: the modules PEFT's own matcher selects for lora_target_modules, or the parameters
axolotl's freeze_layers_except leaves trainable for unfrozen_parameters. Prints one JSON line."""

import json
import sys

import torch
import transformers
from axolotl.cli.config import load_cfg
from axolotl.utils.freeze import freeze_layers_except
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

KEYS = ["adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate",
        "unfrozen_parameters", "optimizer", "bf16", "fp16", "weight_decay", "peft_use_rslora",
        "peft_use_dora", "deepspeed"]


def meta_model(path):
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        try:
            return transformers.AutoModelForImageTextToText.from_config(config)
        except ValueError:
            return transformers.AutoModelForCausalLM.from_config(config)


def loaded_trainable(cfg):
    """What `axolotl train` builds before its trainer: setup_model_and_tokenizer (tokenizer,
    ModelLoader: model then PEFT, then unfrozen_parameters) on the weights at base_model."""
    from axolotl.train import setup_model_and_tokenizer

    model = setup_model_and_tokenizer(cfg)[0]
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


cfg = load_cfg(sys.argv[1])
out = {"resolved": {k: cfg.get(k) for k in KEYS}}
model = meta_model(cfg.base_model)
if cfg.adapter == "lora":
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules)
    out["lora_modules"] = sorted(n for n, _ in model.named_modules() if n and check_target_module_exists(lc, n))
elif cfg.unfrozen_parameters:
    freeze_layers_except(model, cfg.unfrozen_parameters)
    out["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
if "--load" in sys.argv:
    out["loaded_trainable"] = loaded_trainable(cfg)
print("PROBE " + json.dumps(out, default=str))
