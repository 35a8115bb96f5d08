#!/usr/bin/env python3
# --- mixspec: header (generated) ---
# mixspec's own copy of train.py (the hf target's program): `mixspec compile SPEC --target hf`
# writes train.py from it, with this header, the Plan and the helpers filled in.
# --- end mixspec: header ---
"""Fine-tune a model exactly as its mixspec Plan says, with the Hugging Face Trainer and PEFT.

Run
    python train.py                        one process (one GPU, or CPU)
    bash launch.sh                         the planned nodes and GPUs (torchrun/deepspeed/accelerate)
    python train.py --check                setup and self-check only: builds the model from its
                                           config (no weights, no data) and confirms the Plan
    python train.py --merge CHECKPOINT --out DIR
                                           base model + trained parts + LoRA merged into a
                                           complete Hugging Face model directory

Options override the Plan's defaults: --model (path or hub id), --data, --eval-data,
--max-bad-rows, --data-workers, --output-dir, --overwrite, --max-steps, --precision, --deepspeed,
--report-to, --resume (python train.py --help).

Self-check. Before the first step the script compares the loaded model with the Plan:
every parameter name and the total count (so another model, another transformers version or
a model with one layer more is caught), then the set of trainable parameters, their count and
each one's optimizer learning rate and weight decay (the Plan's optimizer fingerprint). With a quantized
base (the spec's quantize), the modules bitsandbytes holds must be exactly the planned ones, per
component (--check prints them, planned and found). Any difference stops the run with exit
status 1 and a readable diff.

Data: a .jsonl file, one conversation per line (a hub dataset id with the same columns works too):
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "<image>What is in the picture?"},
                  {"role": "assistant", "content": "A red square."}],
     "images": ["images/0001.png"]}
  - messages: roles system / user / assistant; content is a string, where each "<image>"
    marks where the next image of "images" goes, or a list of parts in the Hugging Face form
    ({"type": "text", "text": ...}, {"type": "image"}).
  - images: paths (relative to the .jsonl file's directory, or absolute); optional. A row
    with images but no "<image>" marker gets them in front of its first user message.
  - text-only rows simply leave out "images".
  Each row goes through the model's own chat template and processor, whole, in one call: every
  model input equals what the processor returns for that conversation (a micro-batch is the
  processor's own batch of its rows, right-padded). Loss is computed on the assistant turns
  only (their text and the template's end-of-turn tokens). Prefix-LM families (PaliGemma) take
  one user and one assistant message: prompt and answer (the processor's suffix). Rows longer
  than training.max_length tokens lose their end; a cut inside or before an image's tokens, or
  one that keeps no answer token, refuses the row.
  Before the model loads, every row of --data / --eval-data (one or more files) goes through
  the same code in N processes (--data-workers N: this one and N-1 workers): the run stops naming every bad row
  (file:line: why), or --max-bad-rows N skips at most N of them, each printed. The result is
  cached (~/.cache/mixspec/data-check) for the same files, images, processor and max_length.
  python train.py --preview-data N --preview-out DIR writes the first N rows as training sees
  them (DIR/row{i}.safetensors, DIR/preview.txt with the labelled text decoded) and exits.

Saving. Each checkpoint (and OUTPUT_DIR/final at the end) holds the LoRA adapter
(adapter_model.safetensors, adapter_config.json), the fully trained parameters
(trained_params.safetensors, base-model names), the processor/tokenizer and mixspec_plan.json.
A run refuses an OUTPUT_DIR that holds an earlier run's final model (or its checkpoints, without
--resume) unless --overwrite. load_trained(CHECKPOINT) rebuilds the trained model exactly;
--merge writes it as a plain Hugging Face model directory. A quantized (QLoRA) run merges into the dequantized base weights,
the ones the adapter was trained against, and writes an unquantized model.

Monitoring. At each logging step the log gets, per component, grad_norm/NAME (gradient norm
before clipping), update_ratio/NAME (|weight change| / |weight| of that step) and lr/NAME (the
LR of that step); the Trainer's own learning_rate is its first optimizer group's, lr/ of the
first trained component.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib  # noqa: F401 (the helpers use it)
import json
import math
import os
import re
import shlex
import shutil
import sys
import warnings

# -- helpers: names, ranges and the self-check's hashes (mixspec.models.names, inlined) --
# --- mixspec: helpers (generated) ---
from mixspec.models.names import INDEX, compact_names, expand_names, fingerprint, names_sha256, natural_key, ranges  # noqa: F401
# --- end mixspec: helpers ---

# -- the Plan (generated by mixspec; edit the spec and recompile rather than this) -------
# Names are compact: {"model.layers.{}.mlp.up_proj": "0-27"} stands for layers 0 to 27
# (expand_names). DEEPSPEED_CONFIG and FSDP_CONFIG are relative to this file's directory (None:
# no DeepSpeed / no FSDP2); FSDP_UNITS: the tower blocks FSDP2 must shard as units.
# --- mixspec: plan (generated) ---
PLAN = {
    "spec": "",
    "mixspec_version": "",
    "plan_fingerprint": "",
    "optimizer_fingerprint": "",
    "model": "",
    "architecture": "",
    "model_type": "",
    "transformers_version": "",
    "multimodal": False,
    "roles": {},
    "base_params": 0,
    "base_names_sha256": "",
    "base_names": {},
    "trainable_params": 0,
    "trainable_names_sha256": "",
    "components": [],
    "lora": None,
}

TRAINING = {
    "epochs": 1.0,
    "max_steps": None,
    "micro_batch_size": 1,
    "gradient_accumulation": 1,
    "precision": "bf16",
    "gradient_checkpointing": True,
    "max_length": 2048,
    "optimizer": "adamw",
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
    "lr_scheduler": "cosine",
    "max_grad_norm": 1.0,
    "seed": 42,
    "logging_steps": 10,
    "save_steps": 500,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-08,
    "trained_dtype": "fp32",
    "frozen_dtype": "bf16",
}

DATA = None

OUTPUT_DIR = "output"

DISTRIBUTED = {
    "nodes": 1,
    "gpus_per_node": 1,
    "zero_stage": None,
    "offload": "none",
    "gpu_memory_gb": None,
}

DEEPSPEED_CONFIG = None

FSDP_CONFIG = None

FSDP_UNITS = None
# --- end mixspec: plan ---

PEFT_PREFIX = "base_model.model."
CHECKPOINT_WRAPPED = "._checkpoint_wrapped_module"  # torch's checkpoint_wrapper (FSDP activation checkpointing)
TRAINED_PARAMS_FILE = "trained_params.safetensors"
PLAN_FILE = "mixspec_plan.json"
IMAGE_MARKER = "<image>"
# prefix-LM families: the prompt is attended both ways (token_type_ids 0), the answer causally (1)
PREFIX_LM_TYPES = ("paligemma",)
HERE = os.path.dirname(os.path.abspath(__file__))
# data.max_pixels / data.min_pixels: the limits of image processors that resize to a pixel budget
DATA_PIXELS = {k: (DATA or {}).get(k) for k in ("max_pixels", "min_pixels") if (DATA or {}).get(k)}


# -- command line ----------------------------------------------------------------------
# parsed before torch and transformers load (seconds), so that --help and a mistyped option
# answer at once
def data_files(value):
    """data.train / data.eval / --data as a list of files (a spec may give one or a list)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune as planned by mixspec (see the header of this file).")
    p.add_argument("--check", action="store_true", help="setup and self-check only (config, no weights, no data); exit 0 or 1")
    p.add_argument("--model", default=PLAN["model"], help="model directory or hub id (default: the spec's)")
    p.add_argument("--data", nargs="+", default=data_files((DATA or {}).get("train")),
                   help="training data: .jsonl files or a hub dataset id")
    p.add_argument("--eval-data", nargs="+", default=data_files((DATA or {}).get("eval")),
                   help="evaluation data, evaluated at each save")
    p.add_argument("--max-bad-rows", type=int, metavar="N", default=0,
                   help="skip at most N rows the data check refuses (each printed) instead of stopping")
    p.add_argument("--data-workers", type=int, metavar="N", default=None,
                   help="processes for the data check: this one and N-1 workers (default: one per core, at most 8, one per 200 rows)")
    p.add_argument("--output-dir", default=OUTPUT_DIR, help="checkpoints and the final model")
    p.add_argument("--overwrite", action="store_true",
                   help="let this run replace the final model and checkpoints an earlier run left in --output-dir")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (default: ds_config.json next to this file, if planned)")
    p.add_argument("--fsdp-config", default=None,
                   help="FSDP2 config, the Trainer's fsdp_config (default: fsdp_config.json next to this file, if planned)")
    p.add_argument("--report-to", default="none", help="none, tensorboard, wandb, ...")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="override training.precision (e.g. fp32 for a CPU smoke test)")
    p.add_argument("--resume", nargs="?", const=True, default=None, help="resume from the last (or the given) checkpoint")
    p.add_argument("--no-update-ratio", action="store_true", help="log gradient norms only (no weight copy at logging steps)")
    p.add_argument("--preview-data", type=int, metavar="N", default=None,
                   help="process the first N rows as training would, write them to --preview-out and exit")
    p.add_argument("--preview-out", metavar="DIR", default=None,
                   help="with --preview-data: where to write row{i}.safetensors and preview.txt (default preview/)")
    p.add_argument("--merge", metavar="CHECKPOINT", help="merge CHECKPOINT into a complete model directory (--out)")
    p.add_argument("--out", help="with --merge: where to write the merged model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="with --merge: weights dtype")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help or a bad option exits here; main() parses again (cheap), as it does when imported

# the heavy imports, after the command line (E402: on purpose)
import torch  # noqa: E402
import transformers  # noqa: E402

# transformers' Trainer is imported where a run trains (plan_trainer_class, training_arguments):
# the data check's worker processes import this file and never train (a second saved a worker)


# -- names ------------------------------------------------------------------------------
def plan_name(name):
    """A parameter's name in the Plan: its name in the base model (PEFT's wrapper prefix and
    the activation-checkpoint wrapper FSDP puts around each unit removed)."""
    name = name.replace(CHECKPOINT_WRAPPED, "")
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def numel(param):
    quant_state = getattr(param, "quant_state", None)  # bitsandbytes 4-bit: two values a byte
    if quant_state is not None:
        return math.prod(quant_state.shape)
    return int(getattr(param, "ds_numel", 0) or param.numel())  # ZeRO-3 partitions report ds_numel


def role_of(name):
    best, size = None, -1
    for role, prefixes in PLAN["roles"].items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > size:
                best, size = role, len(prefix)
    return best


_BLOCK = re.compile(r"^(.*?)\.(0|[1-9][0-9]*)(?=\.|$)")


def describe_name_diff(actual, planned, what):
    """Readable lines for two differing sets of names: block counts first, then the rest."""
    only_model, only_plan = actual - planned, planned - actual
    lines, explained = [], set()

    def blocks(names):
        out = {}
        for n in names:
            m = _BLOCK.match(n)
            if m:
                out.setdefault(m.group(1), set()).add(int(m.group(2)))
        return out

    in_model, in_plan = blocks(actual), blocks(planned)
    for prefix in sorted(set(in_model) | set(in_plan), key=natural_key):
        a, b = in_model.get(prefix, set()), in_plan.get(prefix, set())
        if a and b and a != b:
            role = role_of(prefix)
            label = f"{prefix} ({role})" if role else prefix
            lines.append(f"{label}: the model has {len(a)} ({ranges(a)}), the plan was made for {len(b)} ({ranges(b)})")
            for n in only_model | only_plan:
                m = _BLOCK.match(n)
                if m and m.group(1) == prefix and int(m.group(2)) in a ^ b:
                    explained.add(n)
    for label, names in (("only in the model", only_model - explained), ("only in the plan", only_plan - explained)):
        if names:
            shown = [f"{t} [{i}]" if i else t for t, i in compact_names(names).items()]
            more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
            lines.append(f"{what} {label} ({len(names)}): " + ", ".join(shown[:8]) + more)
    return lines


# -- reporting --------------------------------------------------------------------------
def is_main_process():
    return int(os.environ.get("RANK", "0")) == 0


def say(text):
    if is_main_process():
        print(text, flush=True)


class PlanMismatch(Exception):
    """The model or the optimizer differs from the Plan."""

    def __init__(self, title, problems):
        self.title, self.problems = title, list(problems)
        hint = ("the Plan was made for " + PLAN["architecture"] + " from " + json.dumps(PLAN["model"])
                + " with transformers " + PLAN["transformers_version"] + " (this run: transformers "
                + transformers.__version__ + "); recompile the spec against the model you train, "
                "or pass --model with the model the Plan was made for")
        super().__init__("mixspec self-check failed: " + title + "\n" + "\n".join("  - " + p for p in self.problems)
                         + "\n  hint: " + hint)


def fail(exc):
    sys.stderr.write(str(exc) + "\n")
    raise SystemExit(1)


# -- model ------------------------------------------------------------------------------
def model_class():
    cls = getattr(transformers, PLAN["architecture"], None)
    if cls is None:
        fail(PlanMismatch("model class", [f"transformers {transformers.__version__} has no class {PLAN['architecture']}"]))
    return cls


def load_model(model_ref, meta=False, dtype=torch.float32, quantize=True):
    """The planned model class, from a local dir or hub id; on the meta device (no weights) if
    meta; with the Plan's quantized modules held by bitsandbytes unless quantize is False."""
    cls = model_class()
    quant = PLAN.get("quantization") if quantize else None
    try:
        if meta:
            config = transformers.AutoConfig.from_pretrained(config_source(model_ref))
            with torch.device("meta"):
                model = cls._from_config(config)
            return quantize_meta(model) if quant else model
        if quant:
            return cls.from_pretrained(model_ref, dtype=dtype, quantization_config=bnb_config(),
                                       device_map=quantized_device_map())
        # frozen weights in the training dtype; setup_model upcasts the trained ones to fp32
        return cls.from_pretrained(model_ref, dtype=dtype)
    except (OSError, ValueError) as exc:  # missing files, no network, a config of another model
        fail(f"error: cannot load {model_ref!r} as {PLAN['architecture']}: " + " ".join(str(exc).split())[:400]
             + "\n  hint: pass --model with a local model directory or a hub id you can reach")


def config_source(model_ref):
    """Where --check reads the config: a local model directory, else (for the planned model)
    model_config.json next to this file, the config the Plan was made from, so the check
    needs no network; another hub id goes to the hub."""
    shipped = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_config.json")
    if not os.path.isdir(model_ref) and model_ref == PLAN["model"] and os.path.isfile(shipped):
        say(f"config: {shipped} (the config the plan was made from; --model DIR checks another)")
        return shipped
    return model_ref


def check_structure(model):
    """Every base parameter name and the total count must equal the Plan's."""
    names = {n: numel(p) for n, p in model.named_parameters()}
    planned = expand_names(PLAN["base_names"])
    problems = describe_name_diff(set(names), planned, "parameters")
    if not problems and names_sha256(names) != PLAN["base_names_sha256"]:
        problems.append("the embedded list of parameter names does not match its hash (train.py was edited?)")
    total = sum(names.values())
    if total != PLAN["base_params"]:
        problems.append(f"the model has {total:,} parameters, the plan was made for {PLAN['base_params']:,}")
    return problems


# -- quantized base (bitsandbytes) -------------------------------------------------------
# PLAN["quantization"] (present only when a component has quantize): the BitsAndBytesConfig
# values and, per component, the full names of the Linear modules planned quantized. The skip
# list holds escaped full names of everything else transformers would replace (a short name
# like "vision_tower" does not skip model.vision_tower's children).
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw": "PagedAdamW"}
TORCHAO_OPTIMIZERS = {"adamw_torch_8bit": "AdamW8bit", "adamw_torch_4bit": "AdamW4bit"}  # torchao.optim
QUANTIZED_CLASSES = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' modules (PEFT's LoRA wrappers come later)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bnb_config():
    q = PLAN["quantization"]
    if q["method"] == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(q["skip_modules"]))
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q["method"], bnb_4bit_use_double_quant=q["double_quant"],
        bnb_4bit_compute_dtype=DTYPES[q["compute_dtype"]], llm_int8_skip_modules=list(q["skip_modules"]))


def quantized_device_map():
    """bitsandbytes loads onto one device: this process's GPU (torchrun's LOCAL_RANK), or the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def quantize_meta(model):
    """--check: the replacement from_pretrained makes, done by transformers on the meta model
    with the same skip list (plus the model class's own fp32 modules, as from_pretrained adds)."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    skip = list(PLAN["quantization"]["skip_modules"]) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config())


def quantized_report(model):
    """(problems, rows): per component, the modules planned quantized against those bitsandbytes
    holds in the loaded model; a quantized module in no component is a problem too."""
    found = {n for n, m in model.named_modules() if type(m).__name__ in QUANTIZED_CLASSES}
    problems, rows, planned_all = [], [], set()
    for name, modules in (PLAN.get("quantization") or {}).get("components", {}).items():
        planned = set(modules)
        planned_all |= planned
        got = found & planned
        rows.append((name, len(planned), len(got)))
        if got != planned:
            problems += describe_name_diff(got, planned, f"component {name}: quantized modules")
    if found - planned_all:
        problems += describe_name_diff(found - planned_all, set(), "quantized modules outside the planned ones")
    return problems, rows


def print_quantized(rows):
    q = PLAN["quantization"]
    say(f"{'component':<20} {'quantized':<10} {'planned':>15} {'found':>15}")
    for name, planned, got in rows:
        say(f"{name:<20} {q['method']:<10} {planned:>15,} {got:>15,}")


@contextlib.contextmanager
def peft_calls():
    """Around PEFT's calls: transformers 5.2x renamed gradient checkpointing to activation
    checkpointing (is_activation_checkpointing, activation_checkpointing_enable); PEFT (0.21)
    still reads and calls the old names, each time with a FutureWarning the user can do
    nothing about. Only those are silenced; the model is the same either way."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",
                                category=FutureWarning)
        yield


def prepare_kbit(model):
    """PEFT's k-bit preparation: every non-quantized parameter to fp32 (mixspec's estimate counts
    it), input gradients for gradient checkpointing through frozen quantized layers."""
    from peft import prepare_model_for_kbit_training

    checkpointing = TRAINING["gradient_checkpointing"]
    with peft_calls():
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None)


def apply_plan(model):
    """Freeze everything, add the planned LoRA adapters, unfreeze the fully trained parameters."""
    model.requires_grad_(False)
    lora = PLAN["lora"]
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            use_rslora=lora["rslora"], use_dora=lora["dora"], bias="none", task_type="CAUSAL_LM",
            target_modules=lora["target_modules"],  # a regex PEFT full-matches: exactly the planned modules
            rank_pattern=dict(lora["rank_pattern"]), alpha_pattern=dict(lora["alpha_pattern"]),
        )
        with peft_calls():
            model = get_peft_model(model, config)
        base = model.get_base_model()
        for override in lora["dropout_overrides"]:  # PEFT has one dropout per adapter
            regex = re.compile(override["modules"])
            for name, module in base.named_modules():
                if regex.fullmatch(name) and "default" in getattr(module, "lora_dropout", {}):
                    p = override["dropout"]
                    module.lora_dropout["default"] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
    full = set()
    for comp in PLAN["components"]:
        if comp["mode"] == "full":
            full |= expand_names(comp["trainable"])
    for name, param in model.named_parameters():
        if plan_name(name) in full:
            param.requires_grad_(True)  # trained in place: no copy (unlike PEFT modules_to_save)
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def planned_trainable():
    """Planned trainable parameter name -> component entry."""
    out = {}
    for comp in PLAN["components"]:
        for name in expand_names(comp["trainable"]):
            out[name] = comp
    return out


def trainable_report(model):
    """(problems, rows): the trainable set and counts against the Plan, per component."""
    actual = {plan_name(n): numel(p) for n, p in model.named_parameters() if p.requires_grad}
    planned = planned_trainable()
    problems = describe_name_diff(set(actual), set(planned), "trainable parameters")
    if not problems and names_sha256(actual) != PLAN["trainable_names_sha256"]:
        problems.append("the embedded trainable names do not match their hash (train.py was edited?)")
    total = sum(actual.values())
    if total != PLAN["trainable_params"]:
        problems.append(f"{total:,} trainable parameters, the plan has {PLAN['trainable_params']:,}")
    rows = []
    for comp in PLAN["components"]:
        names = expand_names(comp["trainable"])
        got = sum(v for n, v in actual.items() if n in names)
        rows.append((comp["name"], comp["mode"], comp["lr"], comp["trainable_params"], got))
        if got != comp["trainable_params"]:
            problems.append(f"component {comp['name']}: {got:,} trainable parameters, the plan has {comp['trainable_params']:,}")
    return problems, rows


def print_counts(rows, total):
    say(f"{'component':<20} {'mode':<6} {'lr':>10} {'planned':>15} {'actual':>15}")
    for name, mode, lr, planned, got in rows:
        lr_text = f"{lr:g}" if lr is not None else "-"
        say(f"{name:<20} {mode:<6} {lr_text:>10} {planned:>15,} {got:>15,}")
    say(f"{'total':<20} {'':<6} {'':>10} {PLAN['trainable_params']:>15,} {total:>15,}")


# -- optimizer --------------------------------------------------------------------------
def planned_no_decay():
    """Trainable parameters the Plan exempts from weight decay (biases, norms, 1-D)."""
    return {name for comp in PLAN["components"] for name in expand_names(comp["no_decay"])}


def planned_weight_decay(name, comp, no_decay):
    return 0.0 if name in no_decay else comp["weight_decay"]


def param_groups(model):
    """One optimizer group per component and decay kind, from trainable parameters only, none
    empty; which parameters decay is the Plan's decision, not a rule of this script."""
    planned = planned_trainable()
    no_decay = planned_no_decay()
    buckets = {}
    for name, param in model.named_parameters():
        comp = planned.get(plan_name(name))
        if comp is None or not param.requires_grad:
            continue
        kind = "no_decay" if plan_name(name) in no_decay else "decay"
        buckets.setdefault((comp["name"], kind), []).append(param)
    groups = []
    for comp in PLAN["components"]:
        for kind in ("decay", "no_decay"):
            params = buckets.get((comp["name"], kind))
            if params:
                groups.append({"params": params, "lr": comp["lr"], "name": comp["name"] + "/" + kind,
                               "weight_decay": comp["weight_decay"] if kind == "decay" else 0.0})
    return groups


def group_lr(group, want):
    """A group's learning rate as a number. torchao's optimizers hold it as an fp32 tensor: one
    equal to the planned LR in fp32 is the planned LR (the precision torchao computes in)."""
    lr = group["lr"]
    if not torch.is_tensor(lr):
        return lr
    if want is not None and torch.tensor(want, dtype=lr.dtype).item() == lr.item():
        return want
    return lr.item()


def lr_problems(groups, model):
    """Each trainable parameter in exactly one group, at its planned LR and weight decay; the
    Plan's optimizer fingerprint (names, LRs and weight decays)."""
    group_of = {}
    problems = []
    for g in groups:
        for p in g["params"]:
            if id(p) in group_of:
                problems.append(f"a parameter is in groups {group_of[id(p)]['name']} and {g['name']}")
            group_of[id(p)] = g
    planned = planned_trainable()
    no_decay = planned_no_decay()
    actual = {}
    for name, param in model.named_parameters():
        g = group_of.pop(id(param), None)
        name = plan_name(name)
        if param.requires_grad:
            if g is None:
                problems.append(f"{name} is trainable but in no optimizer group")
                continue
            comp = planned.get(name)
            want = comp["lr"] if comp else None
            lr = group_lr(g, want)
            actual[name] = (lr, g.get("weight_decay", 0.0))
            if lr != want:
                problems.append(f"{name}: learning rate {lr!r}, the plan says {want!r}")
            want_wd = planned_weight_decay(name, comp, no_decay) if comp else None
            if g.get("weight_decay", 0.0) != want_wd:
                problems.append(f"{name}: weight decay {g.get('weight_decay', 0.0)!r}, the plan says {want_wd!r}")
        elif g is not None:
            problems.append(f"{name} is frozen but in optimizer group {g['name']}")
    if group_of:
        problems.append(f"{len(group_of)} optimizer parameters are not parameters of the model")
    got = fingerprint({n: lr for n, (lr, _) in actual.items()}, {n: wd for n, (_, wd) in actual.items()})
    if not problems and got != PLAN["optimizer_fingerprint"]:
        problems.append(f"names, learning rates and weight decays hash to {got}, "
                        f"the plan's optimizer fingerprint is {PLAN['optimizer_fingerprint']}")
    return problems


def deepspeed_config_dict(path):
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def make_optimizer(groups, args):
    """AdamW over the planned groups (DeepSpeedCPUAdam when ZeRO offloads the optimizer; the
    bitsandbytes class when the Plan's optimizer is 8-bit or paged; torchao's for its 8-/4-bit)."""
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    ds = args.deepspeed if isinstance(args.deepspeed, dict) else deepspeed_config_dict(args.deepspeed)
    offload = ((ds or {}).get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    name = BNB_OPTIMIZERS.get(TRAINING["optimizer"])
    if name is not None:  # bitsandbytes: 8-bit blockwise and/or paged states, the same groups
        import bitsandbytes

        return getattr(bitsandbytes.optim, name)(groups, **kwargs)
    name = TORCHAO_OPTIMIZERS.get(TRAINING["optimizer"])
    if name is not None:  # torchao: low-bit blockwise states, the same groups
        try:
            import torchao.optim
        except ImportError:
            fail(f"error: training.optimizer {TRAINING['optimizer']} is torchao's {name}, and torchao is not "
                 "installed\n  hint: pip install torchao")
        return getattr(torchao.optim, name)(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


# -- FSDP2 (distributed.fsdp) -----------------------------------------------------------
# tests only: on a machine without GPUs accelerate never picks FSDP (a CPU run is MULTI_CPU,
# i.e. DDP); with this set to 1 train.py switches accelerate's state to FSDP itself, so the
# same fsdp2_prepare_model shards over gloo. Never needed (nor honoured) where a GPU is.
FSDP_ON_CPU = "MIXSPEC_FSDP_ON_CPU"


def fsdp_path(args):
    if args.fsdp_config:
        return args.fsdp_config
    return os.path.join(HERE, FSDP_CONFIG) if FSDP_CONFIG else None


def fsdp_config_dict(args):
    path = fsdp_path(args)
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def local_shard(tensor):
    """A DTensor's local shard (FSDP2 parameters and gradients); other tensors as they are."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def engine_text(args):
    """Which engine runs the step and what it shards (said at start)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = fsdp_config_dict(args)
    if fsdp:
        how = ("weights, gradients and optimizer states sharded, each unit resharded after its forward"
               if fsdp.get("reshard_after_forward", True) else
               "gradients and optimizer states sharded, weights gathered from forward to backward")
        offload = "; parameters, gradients and optimizer states offloaded to CPU" if fsdp.get("cpu_offload") else ""
        return (f"engine: FSDP2 over {world} process(es): {how}{offload}; units: "
                + ", ".join(fsdp.get("transformer_layer_cls_to_wrap") or []))
    ds = deepspeed_path(args)
    if ds:
        zero = (deepspeed_config_dict(ds) or {}).get("zero_optimization", {})
        stage = zero.get("stage", 0)
        what = ("nothing sharded", "optimizer states sharded", "gradients and optimizer states sharded",
                "weights, gradients and optimizer states sharded")[stage]
        return f"engine: DeepSpeed ZeRO-{stage} over {world} process(es): {what}"
    if world > 1:
        return f"engine: DDP over {world} processes: nothing sharded (every process holds the whole model)"
    return "engine: one process, nothing sharded"


def fsdp_setup(trainer):
    """After the Trainer made its accelerator: FSDP2 must be what accelerate runs (never DDP in
    its place); on CPU with MIXSPEC_FSDP_ON_CPU=1, make it so."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    if os.environ.get(FSDP_ON_CPU) != "1" or not no_accelerator() or state.distributed_type != DistributedType.MULTI_CPU:
        fail(f"error: the plan shards with FSDP2 but accelerate set up {state.distributed_type} "
             f"({state.num_processes} process(es)); never DDP in its place\n  hint: launch on GPUs with "
             f"torchrun or accelerate (bash launch.sh); on a machine without GPUs only tests may set "
             f"{FSDP_ON_CPU}=1, with 2 or more processes")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    # as accelerate's own FSDP setup does: each later AcceleratorState() copies PartialState's
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


def fsdp_problems(model, optimizer):
    """After preparation: every planned block is an FSDP unit, every parameter a DTensor shard,
    and the optimizer's groups hold the sharded parameters at the planned LRs and weight decays
    (accelerate swaps them in; model and optimizer go through one prepare call)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = {plan_name(n) for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    problems = [f"{n} is not an FSDP unit" for n in sorted(expand_names(FSDP_UNITS or {}) - units, key=natural_key)][:5]
    plain = [plan_name(n) for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        problems.append(f"{len(plain)} parameters are not sharded (e.g. {plain[0]})")
    return problems + lr_problems(optimizer.param_groups, model)


# -- per-component monitoring -----------------------------------------------------------
class ComponentMonitor:
    """Gradient norm (before clipping) and update/weight ratio per component, at logging steps."""

    def __init__(self, model, update_ratio=True):
        planned = planned_trainable()
        self.params = {}
        for name, param in model.named_parameters():
            comp = planned.get(plan_name(name))
            if comp is not None and param.requires_grad:
                self.params.setdefault(comp["name"], []).append(param)
        self.update_ratio = update_ratio
        self.before = None
        self.pending = {}

    sharded = False  # FSDP2: each rank holds a shard of every parameter and gradient

    @staticmethod
    def _grad(param, deepspeed):
        if deepspeed:
            from deepspeed.utils import safe_get_full_grad

            return safe_get_full_grad(param)
        return local_shard(param.grad)

    @staticmethod
    def _weight(param, deepspeed):
        if deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(param)
            if full is not None:
                return full
        return local_shard(param.data)

    def _over_ranks(self, values):
        """Sums of squares over the shards of every rank (FSDP2); as they are otherwise."""
        if not self.sharded:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def measure_grads(self, deepspeed=False, scale=1.0):
        comps, sums, seen = list(self.params), [], []
        for comp in comps:
            total, any_grad = 0.0, False
            for p in self.params[comp]:
                g = self._grad(p, deepspeed)
                if g is not None:
                    total += float(g.detach().float().pow(2).sum())
                    any_grad = True
            sums.append(total)
            seen.append(float(any_grad))
        sums, seen = self._over_ranks(sums), self._over_ranks(seen)
        for comp, total, any_grad in zip(comps, sums, seen, strict=True):
            # no gradient at all (e.g. a vision tower on text-only batches) logs 0.0
            self.pending[f"grad_norm/{comp}"] = math.sqrt(total) / scale if any_grad else 0.0
        if self.update_ratio:
            self.before = {comp: [self._weight(p, deepspeed).detach().float().cpu().clone() for p in params]
                           for comp, params in self.params.items()}

    def measure_updates(self, deepspeed=False):
        if self.before is None:
            return
        comps, nums, dens = list(self.params), [], []
        for comp in comps:
            num = den = 0.0
            for p, old in zip(self.params[comp], self.before[comp], strict=True):
                new = self._weight(p, deepspeed).detach().float().cpu()
                num += float((new - old).pow(2).sum())
                den += float(old.pow(2).sum())
            nums.append(num)
            dens.append(den)
        nums, dens = self._over_ranks(nums), self._over_ranks(dens)
        for comp, num, den in zip(comps, nums, dens, strict=True):
            self.pending[f"update_ratio/{comp}"] = math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")
        self.before = None

    def pop(self):
        out, self.pending = self.pending, {}
        return out


class _UpdateCallbackBody:
    """The body of PlanTrainer's callback (a TrainerCallback: plan_trainer_class)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.monitor.measure_updates(self.trainer.is_deepspeed_enabled)
        # each component's LR of this step, read where the Trainer reads its learning_rate
        # (before the scheduler steps): lr/<first component> equals the Trainer's key; float():
        # torchao's optimizers hold it as a tensor
        groups = getattr(self.trainer.optimizer, "param_groups", None) or []
        self.trainer.step_lrs = {str(g["name"]).rsplit("/", 1)[0]: float(g["lr"]) for g in groups
                                 if str(g.get("name", "")).endswith(("/decay", "/no_decay"))}

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.check_optimizer_after_wrap()


@functools.lru_cache(maxsize=None)
def plan_trainer_class():
    """PlanTrainer: transformers' Trainer with _PlanTrainerBody's methods (and its callback),
    made on first use."""
    from transformers import Trainer, TrainerCallback

    callback = type("_UpdateCallback", (_UpdateCallbackBody, TrainerCallback), {"__module__": __name__})
    return type("PlanTrainer", (_PlanTrainerBody, Trainer),
                {"__module__": __name__, "__doc__": _PlanTrainerBody.__doc__, "callback_class": callback})


class _PlanTrainerBody:
    """Trainer whose optimizer has the Plan's per-component groups (DeepSpeed keeps them:
    the DeepSpeed JSON has no optimizer block), checked before the first step, and whose
    checkpoints hold the fully trained parameters next to the LoRA adapter."""

    callback_class = None  # the TrainerCallback plan_trainer_class makes of _UpdateCallbackBody

    def __init__(self, *args, update_ratio=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor = ComponentMonitor(self.model, update_ratio=update_ratio)
        self._planned_group_lrs = None
        self._engine_wrapped = False
        self.step_lrs = {}
        self.add_callback(self.callback_class(self))

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is not None:
            return self.optimizer
        model = (args[0] if args else kwargs.get("model")) or self.model
        groups = param_groups(model)
        problems = lr_problems(groups, model)
        if problems:
            fail(PlanMismatch("optimizer learning rates and weight decays", problems))
        self._planned_group_lrs = [(g["lr"], g["weight_decay"]) for g in groups]
        self.optimizer = make_optimizer(groups, self.args)
        problems = lr_problems(self.optimizer.param_groups, model)  # the optimizer as built
        if problems:
            fail(PlanMismatch("the optimizer's learning rates and weight decays", problems))
        return self.optimizer

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp:
            fsdp_setup(self)

    def check_optimizer_after_wrap(self):
        """After DeepSpeed/accelerate wrapped the optimizer: the same groups, at the same LRs
        and weight decays; under FSDP2 the sharded model and its optimizer (fsdp_problems)."""
        if self.is_fsdp_enabled:
            problems = fsdp_problems(self.model, self.optimizer)
            if problems:
                fail(PlanMismatch("FSDP2 after preparation", problems))
            say(f"FSDP2 check passed: {len(expand_names(FSDP_UNITS or {}))} planned blocks are units, every "
                "parameter a shard, optimizer groups at the planned learning rates")
            # the monitor's parameters were replaced by their shards
            self.monitor = ComponentMonitor(self.model, update_ratio=self.monitor.update_ratio)
            self.monitor.sharded = True
        groups = getattr(self.optimizer, "param_groups", None)
        if groups is None or self._planned_group_lrs is None:
            return
        got = [(g.get("initial_lr", g["lr"]), g.get("weight_decay")) for g in groups]
        if got != self._planned_group_lrs:
            fail(PlanMismatch("optimizer after wrapping", [
                f"(learning rate, weight decay) of the optimizer groups are {got}, "
                f"the plan's groups have {self._planned_group_lrs}"]))

    def _due(self):
        step = self.state.global_step + 1
        return step % self.args.logging_steps == 0 or (step == 1 and self.args.logging_first_step)

    def training_step(self, model, inputs, *args, **kwargs):
        measure = self.accelerator.sync_gradients and self._due()
        if self.is_deepspeed_enabled and not self._engine_wrapped:
            self._wrap_engine_step()
        self._measure_in_engine = measure
        loss = super().training_step(model, inputs, *args, **kwargs)
        if measure and not self.is_deepspeed_enabled:
            scaler = getattr(self.accelerator, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            self.monitor.measure_grads(deepspeed=False, scale=scale)
        return loss

    def _wrap_engine_step(self):
        # DeepSpeed steps inside backward (accelerate calls engine.step() there): measure the
        # reduced gradients between the two, before DeepSpeed clips and zeroes them
        engine = self.model_wrapped
        original = engine.step

        def step(*a, **k):
            if self._measure_in_engine:
                self.monitor.measure_grads(deepspeed=True)
            return original(*a, **k)

        engine.step = step
        self._engine_wrapped = True

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self.monitor.pop())
            for comp, lr in self.step_lrs.items():
                logs.setdefault("lr/" + comp, lr)
        return super().log(logs, *args, **kwargs)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        save_trained_parts(state_dict, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, TRAINED_PARAMS_FILE)
        if os.path.isfile(path) and not self.is_deepspeed_enabled and not self.is_fsdp_enabled:  # their checkpoints hold them
            load_trained_parts(self.accelerator.unwrap_model(model or self.model), path)


def full_names():
    names = set()
    for comp in PLAN["components"]:
        if comp["mode"] == "full":
            names |= expand_names(comp["trainable"])
    return names


def save_trained_parts(state_dict, output_dir):
    """The fully trained parameters, under their base-model names, plus the Plan."""
    from safetensors.torch import save_file

    by_name = {plan_name(k): v for k, v in state_dict.items()}
    wanted = sorted(full_names())
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise RuntimeError(f"cannot save {len(missing)} trained parameters (e.g. {missing[0]}): not in the state dict")
    tensors = {n: by_name[n].detach().cpu().contiguous().clone() for n in wanted}
    os.makedirs(output_dir, exist_ok=True)
    if tensors:
        save_file(tensors, os.path.join(output_dir, TRAINED_PARAMS_FILE), metadata={"format": "pt"})
    with open(os.path.join(output_dir, PLAN_FILE), "w", encoding="utf-8") as fh:
        json.dump(PLAN, fh, indent=1, sort_keys=True)


def load_trained_parts(model, path):
    from safetensors.torch import load_file

    tensors = load_file(path)
    params = {plan_name(n): p for n, p in model.named_parameters()}
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(full_names() - set(tensors))
    if unknown or missing:
        fail(PlanMismatch(f"trained parameters in {path}", [f"not in the model: {n}" for n in unknown[:5]]
                          + [f"missing from the file: {n}" for n in missing[:5]]))
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))


def load_trained(checkpoint, model_ref=None, dtype=torch.float32):
    """Base model + trained parameters + LoRA adapter of a checkpoint: the trained model."""
    model = load_model(model_ref or PLAN["model"])
    if PLAN.get("quantization"):
        # the adapter was trained against the quantized weights: merge into them, dequantized
        # (as PEFT's merge on a bitsandbytes base does), not into the original 16-bit checkpoint
        model = model.dequantize()
    problems = check_structure(model)
    if problems:
        fail(PlanMismatch("model structure", problems))
    path = os.path.join(checkpoint, TRAINED_PARAMS_FILE)
    if full_names():
        if not os.path.isfile(path):
            fail(PlanMismatch("checkpoint", [f"{path} is missing: it holds the fully trained parameters"]))
        load_trained_parts(model, path)
    if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        from peft import PeftModel

        with peft_calls():
            model = PeftModel.from_pretrained(model, checkpoint)
    return model.to(dtype)


# -- data -------------------------------------------------------------------------------
class DataError(Exception):
    pass


class RowError(DataError):
    """One row training cannot take: where it is (file:line) and why."""

    def __init__(self, where, reason):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


# a row is one conversation with image paths: far below this; a longer line is refused unread
MAX_ROW_BYTES = 16 * 1024 * 1024
DATA_SUFFIXES = (".jsonl", ".json")


def missing_data_file(path):
    """The error for a data file that is not there (None when it is, or when it is a hub id)."""
    looks_like_file = path.endswith(DATA_SUFFIXES) or path.startswith(("/", "./", "../", "~"))
    if os.path.exists(path) or not looks_like_file:  # else a hub dataset id (ORG/NAME)
        return None
    return DataError(f"error: data file {path}: no such file (cwd {os.getcwd()})\n"
                     "  hint: pass --data FILE (and --eval-data FILE) or fix data.train / data.eval in the spec")


def _physical_lines(fh):
    """(line number, bytes or None when longer than MAX_ROW_BYTES, byte length) of each line,
    never holding more than MAX_ROW_BYTES + 1 bytes of one line in memory."""
    lineno = 0
    while True:
        chunk = fh.readline(MAX_ROW_BYTES + 1)
        if not chunk:
            return
        lineno += 1
        if len(chunk) <= MAX_ROW_BYTES or chunk.endswith(b"\n"):
            yield lineno, chunk, len(chunk)
            continue
        size = len(chunk)
        while chunk and not chunk.endswith(b"\n"):  # skip the rest of an overlong line
            chunk = fh.readline(1 << 20)
            size += len(chunk)
        yield lineno, None, size


_BOM = ("starts with a UTF-8 byte order mark (BOM), which Python's JSON reader refuses: save the file without it "
        "(e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE)")
_TOO_DEEP = "not valid JSON here: nested deeper than a JSON reader follows (a row is messages and image paths)"


def _parse_line(raw, size):
    """(row, None) or (None, why the line is no row)."""
    if raw is None:
        return None, f"line of {size:,} bytes, over the limit of {MAX_ROW_BYTES:,} (images go in as file paths)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    if not text.strip():
        return None, None
    if text.startswith("\ufeff"):
        return None, _BOM
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, _TOO_DEEP
    except ValueError as exc:  # valid JSON Python will not read: an integer of more digits than its limit
        return None, "not readable JSON: " + " ".join(str(exc).split())[:200]
    if not isinstance(row, dict):
        return None, f"a row must be a JSON object with \"messages\", got {type(row).__name__}"
    return row, None


def scan_rows(path):
    """(rows, refused) of a .jsonl/.json file or hub dataset: every line that is no row is a
    refusal {file, line, reason}; rows carry where they come from (_where, _file, _line, _base)."""
    missing = missing_data_file(path)
    if missing is not None:
        raise missing
    if not path.endswith(DATA_SUFFIXES):
        try:
            import datasets

            ds = datasets.load_dataset(path, split="train")
        except Exception as exc:  # no network, no such dataset, no datasets package
            raise DataError(f"error: data {path}: not a .jsonl/.json file here, and cannot be loaded as a dataset: "
                            f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]) from None
        return [dict(row, _where=f"{path}[{i}]", _file=path, _line=None, _index=i, _base=os.getcwd())
                for i, row in enumerate(ds)], []
    base = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DataError(f"error: data file {path} is a directory\n  hint: give a .jsonl or .json file "
                        "(several: a list in data.train / data.eval, or --data A.jsonl B.jsonl)")
    try:
        return _scan_file(path, base)
    except OSError as exc:  # unreadable (permissions, I/O): said once, for the file
        raise DataError(f"error: data file {path}: cannot read it: {exc.strerror or exc}") from None


def _scan_file(path, base):
    rows, refused = [], []
    with open(path, "rb") as fh:
        if path.endswith(".json") and fh.read(64).lstrip().lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"["):
            return _scan_json_array(path, base)
        fh.seek(0)
        for lineno, raw, size in _physical_lines(fh):
            row, why = _parse_line(raw, size)
            if why is not None:
                refused.append({"file": path, "line": lineno, "reason": why})
            elif row is not None:
                rows.append(dict(row, _where=f"{path}:{lineno}", _file=path, _line=lineno, _base=base))
    return rows, refused


def _scan_json_array(path, base):
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        return [], [{"file": path, "line": 1, "reason": _BOM}]
    try:
        items = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = getattr(exc, "lineno", None) or raw[: getattr(exc, "start", 0)].count(b"\n") + 1
        return [], [{"file": path, "line": line, "reason": f"not a valid JSON array: {exc}"}]
    except RecursionError:
        return [], [{"file": path, "line": None, "reason": _TOO_DEEP}]
    except ValueError as exc:  # an integer of more digits than Python reads
        return [], [{"file": path, "line": None, "reason": "not readable JSON: " + " ".join(str(exc).split())[:200]}]
    rows, refused = [], []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            rows.append(dict(item, _where=f"{path}[{i}]", _file=path, _line=None, _index=i, _base=base))
        else:
            refused.append({"file": path, "line": None, "index": i,
                            "reason": f"a row must be a JSON object with \"messages\", got {type(item).__name__}"})
    return rows, refused


def read_rows(path):
    """Rows of a .jsonl/.json file, or of a hub dataset (train split); a line that is no row
    stops here, naming it (data_check collects them all instead)."""
    rows, refused = scan_rows(path)
    if refused:
        first = refused[0]
        raise RowError(f"{first['file']}:{first['line']}", first["reason"])
    return rows


ROLES = ("system", "user", "assistant")


def _parts(content, where):
    if isinstance(content, str):
        pieces = content.split(IMAGE_MARKER)
        out = []
        for i, piece in enumerate(pieces):
            if i:
                out.append({"type": "image"})
            if piece:
                out.append({"type": "text", "text": piece})
        return out
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise RowError(where, "content parts must be {'type': 'text', 'text': ...} or {'type': 'image'}")
            out.append({"type": "image"} if part["type"] == "image" else {"type": "text", "text": str(part.get("text", ""))})
        return out
    raise RowError(where, "message content must be a string or a list of parts")


def _messages(row, where):
    """The row's messages in the chat template's parts form; roles and answers checked."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError(where, "needs a non-empty \"messages\" list")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            got = f"role {role!r}" if isinstance(m, dict) else f"a {type(m).__name__}"
            raise RowError(where, f"message {i + 1} has {got}; each message needs role system, user or assistant")
        content = _parts(m.get("content", ""), where)
        if role == "assistant" and not "".join(p.get("text", "") for p in content).strip():
            raise RowError(where, f"message {i + 1} is an empty assistant answer: nothing to learn from")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError(where, "no assistant message to learn from")
    return out


def conversation(row, multimodal):
    """(messages in the chat template's form, images) of a row, validated."""
    where = row.get("_where", "row")
    out = _messages(row, where)
    images = row.get("images") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list):
        raise RowError(where, f"\"images\" must be a list of paths, got {type(images).__name__}")
    markers = sum(1 for m in out for p in m["content"] if p["type"] == "image")
    if images and markers == 0:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise RowError(where, "images but no user message to put them in")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
        markers = len(images)
    if markers != len(images):
        raise RowError(where, f"{markers} image markers but {len(images)} images")
    if not multimodal:
        if images:
            raise RowError(where, "images, but the model has no vision tower")
        out = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])} for m in out]
    return out, images


def _image_path(image, base, where):
    if not isinstance(image, str) or not image:
        raise RowError(where, "each image must be a path (a non-empty string)")
    if re.match(r"[a-z][a-z0-9+.-]*://", image, re.I):
        raise RowError(where, f"image {image[:200]} is a URL: rows are read from local files (download it and give its path)")
    path = image if os.path.isabs(image) else os.path.join(base, image)
    if not os.path.isfile(path):
        raise RowError(where, f"image not found: {path}")
    return path


def _open_image(image, base, where="row"):
    """The image as RGB; beyond PIL's pixel limit (Image.MAX_IMAGE_PIXELS) it is refused from
    its header, before anything is decoded (a decompression bomb never reaches memory)."""
    from PIL import Image

    if hasattr(image, "convert"):  # a PIL image (hub datasets)
        return image.convert("RGB")
    path = _image_path(image, base, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except Exception as exc:
        raise RowError(where, f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


class ConversationEncoder:
    """Rows -> exactly what the family's own processor makes of each whole conversation, plus labels.

    Every model input (input_ids, attention_mask, pixel_values, image_grid_thw,
    cross_attention_mask, token_type_ids, ...) is the processor's output for the whole
    conversation rendered by the chat template, in one call, as
    processor.apply_chat_template(..., tokenize=True) would give it. The only key this script
    adds is labels: -100 everywhere except the tokens of the assistant turns (with the
    end-of-turn tokens the template emits). Assistant tokens are located by processing the
    conversation up to each turn: those token ids must be a prefix of the whole
    conversation's, or the row is refused (the template or tokenizer merges tokens across the
    turn boundary). Prefix-LM families (PaliGemma) take the prompt as text and the answer as
    the processor's suffix, their own training convention: token_type_ids 0 on the prompt
    (attended both ways), 1 on the answer (causal)."""

    def __init__(self, tokenizer, processor, max_length, multimodal, processor_error=None, model_type=None):
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.multimodal = multimodal
        self.processor_error = processor_error
        self.model_type = model_type or PLAN["model_type"]
        self.prefix_lm = self.model_type in PREFIX_LM_TYPES
        owner = processor if processor is not None and getattr(processor, "chat_template", None) else tokenizer
        if not self.prefix_lm and not getattr(owner, "chat_template", None):
            raise DataError("the model has no chat template (tokenizer_config.json / chat_template.jinja)")
        self.template_owner = owner
        tokenizer.padding_side = "right"  # batches: every row starts at position 0, labels line up
        self.image_ids = image_token_ids(tokenizer, processor)
        self.image_token_id = None
        # the token an image expands to: the tokenizer's own where it names one (Gemma 3's processor
        # calls its <start_of_image> marker image_token; the 256 soft tokens are the tokenizer's)
        image_token = getattr(processor, "image_token", None) if processor is not None else None
        image_token = getattr(tokenizer, "image_token", None) or image_token if processor is not None else None
        if isinstance(image_token, str):
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        # prefix tokens from the whole conversation's expanded text (see fast_prefix_length):
        # on while every check of it against the processor agrees; the shapes already checked
        self.fast_prefix = processor is not None and not self.prefix_lm
        self.fast_checked = set()
        self.expanded = None
        self.renderers = {}  # add_generation_prompt -> the template owner's own render call (see render)

    def render(self, messages, add_generation_prompt=False, where="row"):
        """The chat template's text of messages (_render); a conversation the template refuses
        (its raise_exception, or an error inside it) is a RowError naming the template's words."""
        try:
            return self._render(messages, add_generation_prompt)
        except DataError:
            raise
        except Exception as exc:  # jinja2's TemplateError from raise_exception, a TypeError inside it, ...
            raise RowError(where, "the chat template refuses this conversation: "
                           f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]) from None

    def _render(self, messages, add_generation_prompt):
        """template_owner.apply_chat_template(messages, tokenize=False). Its first call with each
        add_generation_prompt records the one render_jinja_template call it makes inside; later
        calls make that call directly with the recorded arguments and these messages (what
        apply_chat_template adds around it, resolving the template and its arguments, does not
        depend on the messages), when the recorded call got these very messages (its
        normalization left them as they are)."""
        renderer = self.renderers.get(add_generation_prompt)
        if renderer is None:
            text, renderer = _recorded_render(self.template_owner, messages, add_generation_prompt)
            self.renderers[add_generation_prompt] = renderer
            return text
        if renderer is False:
            return self.template_owner.apply_chat_template(messages, tokenize=False,
                                                           add_generation_prompt=add_generation_prompt)
        return renderer(messages)

    def process(self, texts, images, suffixes=None, where="row", record=False):
        """One call of the processor (the tokenizer for text-only models) on whole conversations.
        record: keep the text the processor gave its tokenizer (self.expanded) for fast_prefix_length."""
        self.expanded = None if record else self.expanded
        if record and self.fast_prefix:
            inner = self.processor.tokenizer
            self.processor.tokenizer = recorder = _RecordingTokenizer(inner)
            try:
                out = self.process(texts, images, suffixes, where)
            finally:
                self.processor.tokenizer = inner
            self.expanded = recorder.expanded(texts[0], out["input_ids"])
            return out
        kw = {"return_tensors": "pt"}
        if len(texts) > 1:
            kw["padding"] = True
        bos = getattr(self.tokenizer, "bos_token", None)
        if not self.prefix_lm and bos and all(t.startswith(bos) for t in texts):
            kw["add_special_tokens"] = False  # the template wrote BOS (as apply_chat_template does)
        try:
            if self.processor is None:
                out = self.tokenizer(texts, **kw)
            else:
                if suffixes is not None:
                    kw["suffix"] = suffixes
                has_images = any(len(imgs) for imgs in images)
                out = self.processor(text=texts, images=images if has_images else None, **kw)
        except DataError:
            raise
        except Exception as exc:  # the family's processor refuses the row(s): name them
            bad = next((c for t in texts for c in t if "\ud800" <= c <= "\udfff"), None)
            if bad is not None:  # valid JSON (a \u escape), no text: tokenizers take UTF-8 only
                raise RowError(where, f"has a lone surrogate \\u{ord(bad):04x} (a JSON \\u escape of half a character), "
                               "which is not text; fix the row") from None
            raise RowError(where, f"{type(self.processor or self.tokenizer).__name__} cannot take this: "
                            f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]) from None
        return {k: v for k, v in out.items() if torch.is_tensor(v) and k != "labels"}

    def prefix_lm_parts(self, messages, where):
        """(prompt text with image markers, answer) of a single-turn row of a prefix-LM family."""
        roles = [m["role"] for m in messages]
        if roles != ["user", "assistant"]:
            raise RowError(where, f"{self.model_type} is a prefix-LM (prompt, then answer): a row must be "
                            f"one user message and one assistant message, got {', '.join(roles)}")
        marker = getattr(self.processor, "image_token", IMAGE_MARKER)

        def text(m):
            return "".join(marker if p["type"] == "image" else p["text"] for p in m["content"])

        return text(messages[0]), text(messages[1])

    def encode_row(self, row, index=0):
        """{'text', 'suffix', 'images', 'inputs' (this row alone, as one micro-batch), 'labels', 'where',
        'length', 'answer_tokens', 'image_tokens' (before the max_length cut), 'kept_answer_tokens',
        'answer_turns_past' (assistant turns wholly past max_length, not located)}."""
        inner = getattr(self.processor, "image_processor", None)
        if inner is None or self.fast_prefix:  # the prefixes' tokens come from the tokenizer alone
            return self._encode_row(row, index)
        # a row's images go through the image processor once: locating its assistant turns
        # processes the conversation again up to each turn, with the same images
        self.processor.image_processor = _OneRowImages(inner)
        try:
            return self._encode_row(row, index)
        finally:
            self.processor.image_processor = inner

    def _encode_row(self, row, index):
        where = row.get("_where", f"row {index}")
        messages, images = conversation(row, self.multimodal)
        if images and self.processor is None:
            raise RowError(where, f"has images, but no image processor could be loaded for this model: "
                            f"{self.processor_error}")
        pil = [_open_image(img, row.get("_base", "."), where) for img in images]
        if self.prefix_lm:
            prompt, answer = self.prefix_lm_parts(messages, where)
            inputs = self.process([prompt], [pil], suffixes=[answer], where=where)
            types = inputs.get("token_type_ids")
            if types is None:
                raise RowError(where, "the processor gave no token_type_ids for the answer")
            labels = torch.where(types[0] == 1, inputs["input_ids"][0], torch.full_like(types[0], -100))
            text, suffix, listed, past = prompt, answer, None, 0
        else:
            text, suffix = self.render(messages, where=where), None
            inputs = self.process([text], [pil], where=where, record=True)
            labels, past = self.assistant_labels(messages, text, pil, inputs["input_ids"][0], where)
            listed = self.expanded[3] if self.expanded else None  # this row's ids as a list, when recorded
        length, answer = int(inputs["input_ids"].shape[1]), int((labels != -100).sum())
        image_tokens = self.count_image_tokens(inputs["input_ids"][0], listed)
        inputs, labels = self.cut(inputs, labels, where)
        kept = answer if labels.shape[0] == length else int((labels != -100).sum())
        if not kept:
            raise RowError(where, f"{length} tokens, none of them an answer token within max_length {self.max_length}")
        # length, answer_tokens, image_tokens: before the cut (what the data check reports); answer
        # turns wholly past max_length are not located: counted as turns, not tokens
        return {"text": text, "suffix": suffix, "images": pil, "inputs": inputs, "labels": labels, "where": where,
                "length": length, "answer_tokens": answer, "kept_answer_tokens": kept, "image_tokens": image_tokens,
                "answer_turns_past": past}

    def count_image_tokens(self, ids, listed=None):
        """Tokens that stand for image content (the processor's image token, else every image-framing
        token). listed: the same ids as a list (counted faster)."""
        if self.image_token_id is not None and listed is not None:
            return listed.count(self.image_token_id)
        if self.image_token_id is not None:
            return int((ids == self.image_token_id).sum())
        return int(torch.isin(ids, torch.tensor(sorted(self.image_ids))).sum()) if self.image_ids else 0

    def assistant_labels(self, messages, full, pil, ids, where):
        """Each assistant turn's tokens: from where the generation prompt ends (or, for templates
        whose generation prompt differs from how they render a finished turn, where the turn's
        {% generation %} block starts) to the end of the turn with its end-of-turn tokens.
        (labels, assistant turns not located): once a turn ends at or past max_length, every later
        turn starts past the cut and keeps no label, so it is not located (a conversation of
        thousands of turns costs turns up to max_length, not thousands squared renders)."""
        labels = torch.full_like(ids, -100)
        blocks, last = None, 0
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for k, i in enumerate(turns):
            if k and last >= self.max_length:
                return labels, len(turns) - k
            prompt = self.render(messages[:i], add_generation_prompt=True, where=where)
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1], where=where)
            # the earlier turns + generation prompt a prefix of this turn, and this turn of the
            # whole: earlier turns render the same once later turns follow
            before = prompt if upto.startswith(prompt) else self.render(messages[:i], where=where) if i else ""
            if not (full.startswith(upto) and upto.startswith(before)):
                raise RowError(where, "the chat template renders earlier turns differently once later "
                                "turns follow, so assistant turns cannot be located")
            if upto.startswith(prompt):
                start = len(prompt)
            else:
                if blocks is None:
                    blocks = self.generation_blocks(messages, full)
                start = next((s for s, e in blocks if len(before) <= s < len(upto)), None) if blocks else None
                if start is None:
                    raise RowError(where, "the chat template's generation prompt differs from how it renders "
                                    "an assistant turn, and it marks no {% generation %} block, so the assistant "
                                    "tokens cannot be located")
            first = self.prefix_length(full[:start], pil, ids, where)
            last = self.prefix_length(upto, pil, ids, where) if upto != full else int(ids.shape[0])
            labels[first:last] = ids[first:last]
        return labels, 0

    def generation_blocks(self, messages, full):
        """Character spans of the template's {% generation %} blocks, as transformers tracks them."""
        template = getattr(self.template_owner, "chat_template", None)
        if not isinstance(template, str) or "generation" not in template:
            return []
        try:
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, spans = render_jinja_template(conversations=[messages], chat_template=template,
                                                    return_assistant_tokens_mask=True,
                                                    **self.tokenizer.special_tokens_map)
        except Exception:
            return []
        return [tuple(s) for s in spans[0]] if rendered and rendered[0] == full else []

    def prefix_length(self, text, pil, ids, where):
        """Tokens of the conversation's first len(text) characters; they must be a prefix of ids.
        Processing that prefix again is what defines them; fast_prefix_length gives the same
        number from the whole conversation's expanded text once the processor has agreed with it
        on a row of the same shape (and never refuses a row itself)."""
        n_images = sum(text.count(t) for t in self.image_markers()) if pil else 0
        shape = (len(pil), n_images)
        fast = self.fast_prefix_length(text, ids)
        if fast is not None and shape in self.fast_checked:
            return fast
        exact = self.slow_prefix_length(text, pil, n_images, ids, where)
        if fast is not None:
            if fast == exact:
                self.fast_checked.add(shape)
            else:  # the processor's expansion of a prefix is not the prefix of its expansion
                self.fast_prefix = False
        return exact

    def fast_prefix_length(self, text, ids):
        """The tokens of text (a prefix of the whole conversation with no image after it) as the
        tokenizer makes of the processor's expanded whole text cut where text ends, when they are
        a prefix of ids; else None (the caller processes text again)."""
        if not self.fast_prefix or self.expanded is None:
            return None
        full, expanded, call, whole = self.expanded
        rest = full[len(text):] if full.startswith(text) else None
        if not rest or any(m in rest for m in self.image_markers()) or not expanded.endswith(rest):
            return None
        got = call(expanded[: len(expanded) - len(rest)])
        if got is None or len(got) > len(whole) or got != whole[: len(got)]:
            return None
        return len(got)

    def slow_prefix_length(self, text, pil, n_images, ids, where):
        if n_images > len(pil):
            n_images = len(pil)
        got = self.process([text], [pil[:n_images]], where=where)["input_ids"][0]
        if got.shape[0] > ids.shape[0] or not torch.equal(got, ids[: got.shape[0]]):
            raise RowError(where, "the conversation up to an assistant turn does not tokenize as a prefix of "
                            "the whole conversation (the chat template or tokenizer merges tokens across the "
                            "turn boundary), so its assistant tokens cannot be located exactly")
        return int(got.shape[0])

    def image_markers(self):
        token = getattr(self.processor, "image_token", None)
        return [token] if isinstance(token, str) and token else [IMAGE_MARKER]

    def cut(self, inputs, labels, where):
        """Rows longer than max_length lose their end (every token-aligned key), never inside or
        after an image's tokens and never every answer token: such a row is refused with the
        max_length it would need."""
        length = int(inputs["input_ids"].shape[1])
        if length <= self.max_length:
            return inputs, labels
        ids = inputs["input_ids"][0]
        image_end = 0
        if self.image_ids:
            at = torch.isin(ids, torch.tensor(sorted(self.image_ids))).nonzero()
            image_end = int(at[-1]) + 1 if len(at) else 0
        answer_at = (labels != -100).nonzero()
        answer_end = int(answer_at[0]) + 1 if len(answer_at) else 0
        if max(image_end, answer_end) > self.max_length:
            what = "cut an image" if image_end > self.max_length else "leave no answer token"
            raise RowError(where, f"{length} tokens; cutting at max_length {self.max_length} would {what} "
                           f"(it needs max_length >= {max(image_end, answer_end)}; raise training.max_length "
                           "or shorten the row)")
        out = {k: (v[:, : self.max_length] if token_aligned(v, inputs["input_ids"]) else v) for k, v in inputs.items()}
        return out, labels[: self.max_length]


def _recorded_render(owner, messages, add_generation_prompt):
    """(owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=...), a function
    messages -> the same for other messages, or False). The function calls render_jinja_template
    with the arguments apply_chat_template gave it here; False when that cannot be recorded
    exactly (no such call in the owner's module, more than one call, positional arguments, a
    conversation changed on the way, a batch, a result other than the text returned)."""
    def call():
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    scope = getattr(getattr(type(owner), "apply_chat_template", None), "__globals__", None)
    real = scope.get("render_jinja_template") if isinstance(scope, dict) else None
    if not callable(real):
        return call(), False
    calls = []

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    scope["render_jinja_template"] = recording  # for this one call (the owner's module, this process)
    try:
        text = call()
    finally:
        scope["render_jinja_template"] = real
    if len(calls) != 1:
        return text, False
    args, kwargs, out = calls[0]
    same = (not args and kwargs.get("conversations") == [messages] and not kwargs.get("return_assistant_tokens_mask")
            and kwargs.get("add_generation_prompt") == add_generation_prompt
            and isinstance(out, tuple) and out and out[0] == [text])
    if not same:
        return text, False
    fixed = {k: v for k, v in kwargs.items() if k != "conversations"}

    def render(other):
        return real(conversations=[other], **fixed)[0][0]

    return text, render


class _RecordingTokenizer:
    """The processor's tokenizer, recording the texts it is called on (the conversation with
    each image marker expanded) and with which arguments."""

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_calls", [])

    def __call__(self, *args, **kwargs):
        out = self._inner(*args, **kwargs)
        self._calls.append((args, kwargs, out))
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def expanded(self, given, input_ids):
        """(the text as given, the expanded text, a function: expanded text -> token ids as the
        processor would get them, the ids as a list) when the processor called the tokenizer once
        on one text and returned exactly its ids; else None."""
        if len(self._calls) != 1 or input_ids.shape[0] != 1:
            return None
        args, kwargs, out = self._calls[0]
        text = kwargs.get("text", args[0] if args else None)
        if isinstance(text, (list, tuple)) and len(text) == 1:
            text = text[0]
        ids = out.get("input_ids") if hasattr(out, "get") else None
        if not isinstance(text, str) or not (torch.equal(ids, input_ids) if torch.is_tensor(ids) and ids.dim() == 2
                                             else _id_list(ids) == input_ids[0].tolist()):
            return None
        whole = input_ids[0].tolist()
        # the same arguments but plain lists back: the ids do not depend on the tensor type
        rest = {k: v for k, v in kwargs.items() if k not in ("text", "return_tensors")}
        inner, batched = self._inner, isinstance(kwargs.get("text", args[0] if args else None), (list, tuple))
        backend = _plain_backend(inner, args, rest)
        if backend is not None:
            return given, text, backend, whole

        def call(prefix):
            try:
                got = inner(*([[prefix] if batched else prefix] + list(args[1:])), **rest) if args else \
                    inner(text=[prefix] if batched else prefix, **rest)
            except Exception:
                return None
            return _id_list(got.get("input_ids"))

        return given, text, call, whole


# what a recorded call may pass for the Rust tokenizer to take the text as transformers' call does:
# a padding side (nothing is padded), whether to add special tokens, the tensor type (ids only)
_PLAIN_CALL_KEYS = {"padding_side", "add_special_tokens", "padding", "truncation"}


@functools.lru_cache(maxsize=None)
def _plain_class(cls):
    """Whether a tokenizer class calls and encodes exactly as transformers' TokenizersBackend does."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return (issubclass(cls, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls._encode_plus is TokenizersBackend._encode_plus)


def _plain_backend(tokenizer, args, kwargs):
    """text -> ids from the `tokenizers` library itself, what tokenizer(text, **kwargs) hands it
    (transformers' TokenizersBackend call: set no truncation or padding, encode, wrap the ids), or
    None unless the call is exactly that: the base class's own call and encode, one text, no
    padding or truncation asked or set, special tokens split as the tokenizer says, no
    input/target modes."""
    rust = getattr(tokenizer, "_tokenizer", None)
    if (not _plain_class(type(tokenizer)) or hasattr(tokenizer, "_switch_to_input_mode") or len(args) > 1
            or not set(kwargs) <= _PLAIN_CALL_KEYS or kwargs.get("padding") not in (None, False)
            or kwargs.get("truncation") not in (None, False) or rust is None):
        return None
    if rust.truncation is not None or rust.padding is not None \
            or rust.encode_special_tokens != bool(tokenizer.split_special_tokens):
        return None
    add = kwargs.get("add_special_tokens", True)
    fast = getattr(rust, "encode_batch_fast", None)  # the same ids without character offsets

    def call(prefix):
        return fast([prefix], add_special_tokens=add)[0].ids if fast else rust.encode(prefix, add_special_tokens=add).ids

    return call


def _id_list(value):
    """One row's token ids as a list (from a tensor, an array or nested lists); callers compare
    it with a list of ints, so anything else in it never matches."""
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    return value if isinstance(value, list) else None


class _OneRowImages:
    """An image processor that answers a call repeated with the very same images (the same
    objects, sizes and arguments) from its last result, as a fresh shallow copy (processors pop
    keys from it); it lives for one row, so an id() reused by another row's image never hits."""

    def __init__(self, inner):
        self._inner, self._key, self._value = inner, None, None

    def __call__(self, *args, **kwargs):
        import copy

        key = (_images_key(args), _images_key(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if key != self._key or self._value is None:
            self._key, self._value = None, self._inner(*args, **kwargs)
            self._key = key
        return copy.copy(self._value)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _images_key(value):
    if isinstance(value, (list, tuple)):
        return tuple(_images_key(v) for v in value)
    if hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image: this object, as it is now
        return ("image", id(value), value.size, value.mode)
    return repr(value)


def image_token_ids(tokenizer, processor):
    """Ids of the tokens that stand for or frame images (never cut by max_length)."""
    names = set()
    for owner in (processor, tokenizer):
        if owner is None:
            continue
        for attr in dir(owner):
            if not re.search(r"image|img|vision|boi|eoi", attr) or attr.startswith("_"):
                continue
            try:
                value = getattr(owner, attr)
            except Exception:
                continue
            if isinstance(value, str) and value and attr.endswith(("token", "tag")):
                names.add(value)
    ids = set()
    for name in names:
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


def token_aligned(value, input_ids):
    """A processor output with one entry per token (input_ids, attention_mask, token_type_ids,
    cross_attention_mask, ...), as opposed to an image tensor."""
    return value.dim() >= 2 and tuple(value.shape[:2]) == tuple(input_ids.shape)


class ConversationDataset(torch.utils.data.Dataset):
    """Rows, encoded on access; structure and image files checked up front for every row."""

    def __init__(self, rows, encoder):
        self.rows = rows
        self.encoder = encoder
        for i, row in enumerate(rows):  # cheap checks now, not hours into training
            _, images = conversation(row, encoder.multimodal)
            for img in images:
                if not hasattr(img, "convert"):
                    _image_path(img, row.get("_base", "."), row.get("_where", f"row {i}"))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.encoder.encode_row(self.rows[index], index)


class Collator:
    """A micro-batch as the family's processor batches a list of conversations (one call,
    right-padded), with each row's labels placed on its tokens. A row alone is its own
    processor output unchanged."""

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, items):
        if len(items) == 1:
            batch = dict(items[0]["inputs"])
        else:
            where = ", ".join(it["where"] for it in items)
            suffixes = [it["suffix"] for it in items] if self.encoder.prefix_lm else None
            batch = self.encoder.process([it["text"] for it in items], [it["images"] for it in items],
                                         suffixes=suffixes, where=where)
            ids = batch["input_ids"]
            if ids.shape[1] > self.encoder.max_length:
                batch = {k: (v[:, : self.encoder.max_length] if token_aligned(v, ids) else v) for k, v in batch.items()}
            for i, it in enumerate(items):  # the batch must hold each row exactly as processed alone
                alone = it["inputs"]["input_ids"][0]
                n = alone.shape[0]
                row = batch["input_ids"][i]
                if not torch.equal(row[:n], alone) or int(batch["attention_mask"][i].sum()) != n:
                    raise RowError(it["where"], "the processor tokenizes this row differently inside a batch "
                                    "than alone; use micro_batch_size 1")
        labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
        for i, it in enumerate(items):
            labels[i, : it["labels"].shape[0]] = it["labels"]
        batch["labels"] = labels
        return batch


def apply_pixel_limits(processor, model_ref, limits):
    """data.max_pixels / data.min_pixels into an image processor that resizes to a pixel budget
    (one whose class takes these arguments, e.g. Qwen2-VL's), reloaded with them; others (a fixed
    size, tiles) keep their own. The names applied."""
    image_processor = getattr(processor, "image_processor", None)
    known = set(getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {}))
    kw = {k: v for k, v in (limits or {}).items() if v and (k in known or hasattr(image_processor, k))}
    if image_processor is not None and kw:
        processor.image_processor = type(image_processor).from_pretrained(model_ref, **kw)
    return sorted(kw)


def first_sentence(exc):
    """An exception as one line: its type and its message's first sentence (transformers'
    messages go on for lines of advice about the hub)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: " + re.split(r"(?<=[.!?:])\s", text, maxsplit=1)[0][:300]


# the names tokenizers and processors are saved under (save_pretrained's and older hub layouts'):
# a local model dir with none of them holds no processing at all (a config-only copy)
_PROCESSING_FILE = re.compile(r"(tokenizer|vocab|merges|spiece|sentencepiece|special_tokens|added_tokens|chat_template"
                              r"|[a-z_]*processor)[\w.-]*|[\w.-]+\.(model|tiktoken)")


def processing_error(model_ref, exc):
    """The DataError for a model whose tokenizer cannot be loaded: what the dir lacks, and
    where the files are."""
    if os.path.isdir(model_ref) and not any(_PROCESSING_FILE.fullmatch(f) for f in os.listdir(model_ref)):
        what = f"model dir {model_ref} has no tokenizer or processor files (tokenizer_config.json, preprocessor_config.json, ...)"
    else:
        what = f"cannot load the tokenizer of {model_ref}: {first_sentence(exc)}"
    return DataError(f"error: {what}\n  hint: pass --model DIR with a directory that has them (the model as downloaded, "
                     "or this one with the tokenizer and processor files copied in); --check needs only config.json")


def load_processing(model_ref, multimodal=None, quiet=False, pixel_limits=None):
    """(tokenizer, processor or None, why the processor could not be loaded). Raises
    DataError when not even the tokenizer loads."""
    multimodal = PLAN["multimodal"] if multimodal is None else multimodal
    reason = None
    if multimodal:
        try:
            processor = transformers.AutoProcessor.from_pretrained(model_ref)
            apply_pixel_limits(processor, model_ref, DATA_PIXELS if pixel_limits is None else pixel_limits)
            if hasattr(processor, "image_processor"):
                tokenizer = processor.tokenizer
                if tokenizer.pad_token_id is None:
                    tokenizer.pad_token = tokenizer.eos_token
                return tokenizer, processor, None
            reason = f"AutoProcessor gave {type(processor).__name__}"
        except Exception as exc:  # e.g. a video processor that needs torchvision
            reason = first_sentence(exc)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_ref)
    except Exception as exc:  # transformers raises OSError, ValueError, TypeError ... for a missing or broken one
        raise processing_error(model_ref, exc) from exc
    if reason and not quiet:  # only now: with no tokenizer either, the error above says it all
        say(f"warning: no image processor ({reason}); text-only rows work, rows with images fail")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, None, reason


def data_setup(model_ref):
    """What reading rows depends on besides the rows: the processor's files and pixel limits,
    the family, max_length."""
    return {"model": model_ref, "model_type": PLAN["model_type"], "multimodal": PLAN["multimodal"],
            "max_length": TRAINING["max_length"], "mixspec_version": PLAN["mixspec_version"],
            "pixel_limits": DATA_PIXELS}


def make_encoder(model_ref, setup=None, quiet=False):
    setup = setup or data_setup(model_ref)
    tokenizer, processor, why = load_processing(setup["model"], setup["multimodal"], quiet=quiet,
                                                pixel_limits=setup.get("pixel_limits") or {})
    return ConversationEncoder(tokenizer, processor, setup["max_length"], setup["multimodal"], why,
                               model_type=setup["model_type"])


# -- data check: every row through encode_row before step 1 (also `mixspec data check`) --
DATA_CHECK_FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx", ".pkl")


def check_row(encoder, row):
    """(what training takes of the row, None) or (None, why it is refused): encode_row itself."""
    try:
        item = encoder.encode_row(row)
    except RowError as exc:
        return None, exc.reason
    except DataError as exc:
        return None, str(exc)
    return {"length": item["length"], "answer_tokens": item["answer_tokens"],
            "kept_answer_tokens": item["kept_answer_tokens"], "image_tokens": item["image_tokens"],
            "answer_turns_past": item["answer_turns_past"],
            "image_sizes": [list(img.size) for img in item["images"]]}, None


_WORKER = {}


def _check_worker_init(setup):
    """A spawned worker's start: the processor loaded afresh (setup None: a forked worker, which
    has this process's encoder already)."""
    import gc

    torch.set_num_threads(1)  # one process per core: torch's own threads would only compete
    if setup is not None:
        _WORKER["encoder"] = make_encoder(setup["model"], setup, quiet=True)
    gc.freeze()  # what is loaded lives as long as the worker: collections row after row need not rescan it


def worker_start_method():
    """How check workers start: "fork" where the platform has it and this process holds no CUDA
    context (a fork costs milliseconds and hands the worker this process's loaded processor, its
    recorded template calls included), else "spawn" (a fresh interpreter imports torch and
    transformers and loads the processor: seconds). A forked worker sets torch to one thread
    before any work, as a DataLoader worker does, so it never waits on a thread pool it did not
    inherit."""
    import multiprocessing

    if sys.platform != "linux" or "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    if torch.cuda.is_initialized():
        return "spawn"
    return "fork"


@contextlib.contextmanager
def check_worker_pool(processes, setup, encoder):
    """A ProcessPoolExecutor of check workers (worker_start_method()), each with a loaded encoder."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = worker_start_method()
    if method == "spawn":
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_check_worker_init, initargs=(setup,)) as pool:
            yield pool
        return
    # forked: the workers start at the first task, with this encoder and the environment as it is
    # then; tokenizers' own threads are off in them (older releases said so on stderr, once per
    # worker, when the variable was unset; 0.23 is silent)
    _WORKER["encoder"] = encoder
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_check_worker_init, initargs=(None,)) as pool:
            pool.submit(os.getpid).result()  # every worker forked now (fork pools start all at once)
            _restore_env("TOKENIZERS_PARALLELISM", before)
            yield pool
    finally:
        _restore_env("TOKENIZERS_PARALLELISM", before)
        _WORKER.pop("encoder", None)


def _restore_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _check_chunk(rows):
    return [check_row(_WORKER["encoder"], row) for row in rows]


class Progress:
    """rows/s and ETA on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self, total, label="data check"):
        import time

        self.total, self.done, self.label = total, 0, label
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty() and is_main_process()

    def advance(self, n, final=False):
        import time

        self.done += n
        now = time.monotonic()
        if not self.tty or (now - self.last < 0.2 and not final):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0
        sys.stderr.write(f"\r{self.label}: {self.done:,}/{self.total:,} rows  {rate:,.0f} rows/s  ETA {eta:,.0f} s   ")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def check_rows(rows, setup, workers=1, encoder=None, progress=True, used=None):
    """check_row of every row, in order: in this process (workers 1), or in this process and
    up to workers - 1 worker processes that each load the processor once (_check_in_parallel).
    used: a dict that gets the number of processes that checked rows ("processes")."""
    import gc

    bar = Progress(len(rows)) if progress else None
    encoder = encoder or make_encoder(setup["model"], setup, quiet=True)
    gc.freeze()  # as in a worker (_check_worker_init), for the rows' loop
    try:
        if used is not None:
            used["processes"] = 1
        if workers <= 1 or len(rows) < 2:
            out = []
            for row in rows:
                out.append(check_row(encoder, row))
                if bar:
                    bar.advance(1)
        else:
            out = _check_in_parallel(rows, setup, workers, encoder, bar, used)
    finally:
        gc.unfreeze()
    if bar:
        bar.advance(0, final=True)
    return out


# a worker's start: forked, a fraction of a second; spawned (importing torch and transformers,
# loading the processor), 3 to 5 s of CPU on the machines measured. Workers are started only when
# the rows left would take this process longer
WORKER_START_S = {"fork": 0.25, "spawn": 4.0}
PROBE_S = 0.5  # this process's rows/s is measured on its first rows for this long


def _check_in_parallel(rows, setup, workers, encoder, bar, used=None):
    """The rows in chunks, in order. This process checks the first chunks alone for PROBE_S; when
    the rest would take it longer than a worker's start (WORKER_START_S), workers - 1 worker
    processes (check_worker_pool) take the rest from the front while this one takes them from
    the back, until it meets a chunk a worker has started; else it checks them all (a small
    file never waits for a worker to start)."""
    import time

    size = max(1, min(64, len(rows) // (workers * 8) or 1))
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    results = [None] * len(chunks)
    begin, first = time.monotonic(), 0
    while first < len(chunks) and (first == 0 or time.monotonic() - begin < PROBE_S):
        results[first] = [check_row(encoder, row) for row in chunks[first]]
        if bar:
            bar.advance(len(chunks[first]))
        first += 1
    rate = sum(len(c) for c in chunks[:first]) / max(time.monotonic() - begin, 1e-9)
    if sum(len(c) for c in chunks[first:]) / rate <= WORKER_START_S[worker_start_method()]:
        for i in range(first, len(chunks)):
            results[i] = [check_row(encoder, row) for row in chunks[i]]
            if bar:
                bar.advance(len(chunks[i]))
    else:
        _share_with_workers(chunks, first, results, setup, workers, encoder, bar)
        if used is not None:
            used["processes"] = workers
    return [item for part in results for item in part]


def _share_with_workers(chunks, first, results, setup, workers, encoder, bar):
    """chunks[first:] into results: the workers from the front, this process from the back."""
    front = [first]  # the workers' chunks before this one are done and reported

    def report(own=0):
        while front[0] < len(chunks) and not futures[front[0]].cancelled() and futures[front[0]].done():
            own += len(chunks[front[0]])
            front[0] += 1
        if bar:
            bar.advance(own)

    with check_worker_pool(workers - 1, setup, encoder) as pool:
        futures = [None] * first + [pool.submit(_check_chunk, chunk) for chunk in chunks[first:]]
        try:
            for i in reversed(range(first, len(chunks))):
                if not futures[i].cancel():  # a worker has it: every chunk before it is theirs too
                    break
                results[i] = [check_row(encoder, row) for row in chunks[i]]
                report(len(chunks[i]))
            for i in range(first, len(chunks)):
                if results[i] is None:
                    results[i] = futures[i].result()
                    report()
        except BaseException:  # Ctrl-C, a worker that died: the chunks no worker has begun are dropped
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _percentiles(values):
    if not values:
        return {"min": None, "p50": None, "p95": None, "p99": None, "max": None}
    values = sorted(values)

    def at(q):  # nearest rank: a length some row really has
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    return {"min": values[0], "p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": values[-1]}


def _histogram(values, bins=12):
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = {}
    for v in values:
        counts[(v - low) // width] = counts.get((v - low) // width, 0) + 1
    return [{"from": low + i * width, "to": low + (i + 1) * width - 1, "rows": counts.get(i, 0)}
            for i in range(max(counts) + 1)]


def reason_kind(reason):
    """A refusal reason without its numbers, paths and quoted values: what groups refusals."""
    text = re.sub(r"'[^']*'", "'...'", reason)  # repr()'d values; keys are written in double quotes
    text = re.sub(r"(?<![\w.])(/|\./|\.\./)?[\w.-]+(/[\w.-]+)+", "PATH", text)
    return re.sub(r"(?<![\w-])(0x[0-9a-f]+|\d[\d,]*)", "N", text)


def data_report(parts, max_length):
    """The check's report: parts is [(split, file, rows, refused lines, results)] ."""
    refused, files, accepted = [], [], []
    for split, path, rows, bad_lines, results in parts:
        bad = list(bad_lines) + [dict({"file": path, "line": row.get("_line"), "reason": why},
                                      **({"index": row["_index"]} if row.get("_index") is not None else {}))
                                 for row, (_, why) in zip(rows, results, strict=True) if why is not None]
        bad.sort(key=lambda r: (r["line"] or 0, r.get("index") or 0))
        good = [stats for stats, _ in results if stats is not None]
        refused += bad
        accepted += good
        files.append({"file": path, "split": split, "rows": len(rows) + len(bad_lines), "accepted": len(good),
                      "refused": len(bad), "over_max_length": sum(s["length"] > max_length for s in good),
                      # [line (or index), tokens] of each accepted row: the real length distribution
                      "lengths": [[row.get("_line") or row.get("_index"), stats["length"]]
                                  for row, (stats, _) in zip(rows, results, strict=True) if stats is not None]})
    lengths = [s["length"] for s in accepted]
    over = [s for s in accepted if s["length"] > max_length]
    groups = {}
    for r in refused:
        groups[reason_kind(r["reason"])] = groups.get(reason_kind(r["reason"]), 0) + 1
    return {
        "format": DATA_CHECK_FORMAT, "rows": sum(f["rows"] for f in files), "accepted": len(accepted),
        "refused": refused, "reasons": [{"reason": k, "count": n} for k, n in sorted(groups.items(), key=lambda kv: -kv[1])],
        "max_length": max_length, "tokens": _percentiles(lengths), "histogram": _histogram(lengths),
        "over_max_length": len(over),
        "truncation": {"tokens_lost": sum(s["length"] - max_length for s in over),
                       "answers_cut": sum(s["kept_answer_tokens"] < s["answer_tokens"] or s.get("answer_turns_past", 0) > 0
                                          for s in over),
                       # of the turns cut inside; turns wholly past max_length are counted as turns
                       "answer_tokens_lost": sum(s["answer_tokens"] - s["kept_answer_tokens"] for s in over),
                       "answer_turns_past": sum(s.get("answer_turns_past", 0) for s in over)},
        "images": _image_report(accepted), "files": files,
    }


def _image_report(accepted):
    """Images per row, their sizes (pixels, smallest and largest) and tokens per image."""
    with_images = [s for s in accepted if s["image_sizes"]]
    sizes = [tuple(x) for s in with_images for x in s["image_sizes"]]
    per_row = {}
    for s in accepted:
        per_row[str(len(s["image_sizes"]))] = per_row.get(str(len(s["image_sizes"])), 0) + 1
    by_area = sorted(sizes, key=lambda wh: (wh[0] * wh[1], wh))
    return {"rows_with_images": len(with_images), "images": len(sizes), "images_per_row": per_row,
            "pixels": _percentiles([w * h for w, h in sizes]),
            "smallest": list(by_area[0]) if by_area else None, "largest": list(by_area[-1]) if by_area else None,
            "tokens_per_image": _percentiles([round(s["image_tokens"] / len(s["image_sizes"])) for s in with_images])}


def data_check_cache_dir():
    """mixspec's cache directory (MIXSPEC_CACHE_DIR, else $XDG_CACHE_HOME/mixspec, else ~/.cache/mixspec)."""
    base = os.environ.get("MIXSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mixspec")
    return os.path.join(base, "data-check")


def _hash_file(path, h):
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def data_check_key(files, rows, setup):
    """What a check's result depends on: the data files' contents, each image's path, size and
    mtime, the processor's files (every file of the model directory but weights), max_length,
    the family and mixspec's version. None (no cache) for a hub model id or dataset."""
    model = setup["model"]
    if not os.path.isdir(model) or not all(os.path.isfile(path) for _, path in files):
        return None
    h = hashlib.sha256(json.dumps([DATA_CHECK_FORMAT, {k: v for k, v in setup.items() if k != "model"}],
                                  sort_keys=True).encode())
    for split, path in files:
        h.update(f"\0data {split} {path}\0".encode())
        _hash_file(path, h)
    for name in sorted(os.listdir(model)):
        full = os.path.join(model, name)
        if os.path.isfile(full) and not name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"\0model {name}\0".encode())
            _hash_file(full, h)
    for row in rows:
        images = row.get("images") or []
        for image in [images] if isinstance(images, str) else images if isinstance(images, list) else []:
            path = os.path.join(row["_base"], image) if isinstance(image, str) else ""
            try:
                st = os.stat(path)
                h.update(f"\0{path} {st.st_size} {st.st_mtime_ns}".encode())
            except (OSError, ValueError):
                h.update(f"\0{path} -".encode())
    return h.hexdigest()[:40]


def load_cached_check(key):
    if key is None:
        return None
    try:
        with open(os.path.join(data_check_cache_dir(), key + ".json"), encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        return None
    return report if report.get("key") == key else None


def save_cached_check(key, report):
    """Written whole or not at all (a temporary file renamed), so a reader never sees half."""
    if key is None:
        return
    folder = data_check_cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{key}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh)
        os.replace(tmp, os.path.join(folder, key + ".json"))
    except OSError as exc:  # a read-only home: the check still stands, it is only not kept
        say(f"warning: data check not cached ({exc})")


def _cache_writable():
    """Whether rank 0 can leave its result where the other ranks look (else they check themselves)."""
    folder = data_check_cache_dir()
    while not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent
    return os.access(folder, os.W_OK)


def row_id(row):
    return (row.get("_file"), row.get("_line"), row.get("_index"))


def refusal_id(refusal):
    return (refusal["file"], refusal.get("line"), refusal.get("index"))


def refusal_where(refusal):
    if refusal.get("line") is not None:
        return f"{refusal['file']}:{refusal['line']}"
    return f"{refusal['file']}[{refusal['index']}]" if refusal.get("index") is not None else refusal["file"]


def auto_workers(rows, workers=None):
    """Processes for a check (this one and the workers it starts): as asked, else one per core
    (at most 8) but one per 200 rows at most (a worker's start, importing torch and loading the
    processor, costs seconds)."""
    if workers:
        return workers
    return max(1, min(8, os.cpu_count() or 1, len(rows) // 200))


def check_data(files, setup, workers=None, progress=True, cache=True, wait=False):
    """(report, rows per split) of every row of files [(split, path)] run through encode_row,
    the code training runs; a cached report of the same files, processor and max_length is
    used as it is. wait: another process (rank 0) checks; wait for its cached report."""
    scanned = [(split, path, *scan_rows(path)) for split, path in files]
    all_rows = [row for _, _, rows, _ in scanned for row in rows]
    key = data_check_key(files, all_rows, setup) if cache else None
    rows = {}
    for split, _, part, _ in scanned:
        rows.setdefault(split, []).extend(part)
    while wait and key is not None and load_cached_check(key) is None and _cache_writable():
        import time

        time.sleep(1.0)
    cached = load_cached_check(key)
    if cached is not None:
        return dict(cached, cached=True), rows
    import time

    start = time.monotonic()
    encoder = make_encoder(setup["model"], setup, quiet=True)  # no chat template etc.: raises here, once
    n = auto_workers(all_rows, workers)
    used = {}
    results = check_rows(all_rows, setup, n, encoder=encoder, progress=progress, used=used)
    parts, at = [], 0
    for split, path, part, bad_lines in scanned:
        parts.append((split, path, part, bad_lines, results[at:at + len(part)]))
        at += len(part)
    report = data_report(parts, setup["max_length"])
    report["key"] = key
    save_cached_check(key, report)
    seconds = time.monotonic() - start
    # workers: the processes that checked rows (this one and the workers it started)
    return dict(report, cached=False, seconds=round(seconds, 3), workers=used.get("processes", 1)), rows


def preview_data(args):
    """--preview-data N: the first N rows as training sees them, one micro-batch per row."""
    from safetensors.torch import save_file

    if not args.data:
        fail(DataError("no training data: set data.train in the spec or pass --data"))
    out_dir = args.preview_out or "preview"
    try:
        encoder = make_encoder(args.model)
        rows = [row for path in data_files(args.data) for row in read_rows(path)][: args.preview_data]
        collate = Collator(encoder)
        os.makedirs(out_dir, exist_ok=True)
        lines = []
        for i, row in enumerate(rows):
            item = encoder.encode_row(row, i)
            batch = collate([item])
            save_file({k: v.contiguous() for k, v in batch.items()}, os.path.join(out_dir, f"row{i}.safetensors"))
            labelled = batch["labels"][0]
            text = encoder.tokenizer.decode(labelled[labelled != -100].tolist())
            n_image_tokens = (int((batch["input_ids"] == encoder.image_token_id).sum())
                              if encoder.image_token_id is not None else 0)
            lines.append(f"row {i} ({item['where']}): {len(item['images'])} image(s), "
                         f"{int(batch['input_ids'].shape[1])} tokens, {int((labelled != -100).sum())} labelled, "
                         f"{n_image_tokens} image tokens")
            for key in sorted(batch):
                lines.append(f"  {key}: {tuple(batch[key].shape)} {str(batch[key].dtype).replace('torch.', '')}")
            lines.append("  labelled text: " + json.dumps(text, ensure_ascii=False))
    except (DataError, OSError) as exc:
        fail(exc)
    with open(os.path.join(out_dir, "preview.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    say(f"wrote {len(rows)} row(s) to {out_dir}: row0.safetensors ... and preview.txt")
    return 0


# -- entry points -----------------------------------------------------------------------
def deepspeed_path(args):
    if args.deepspeed:
        return args.deepspeed
    return os.path.join(HERE, DEEPSPEED_CONFIG) if DEEPSPEED_CONFIG else None


def no_accelerator():
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def training_arguments(args):
    t = TRAINING
    ds = deepspeed_path(args)
    if ds and "optimizer" in (deepspeed_config_dict(ds) or {}):
        fail(PlanMismatch("DeepSpeed config", [f"{ds} has an optimizer block: it would replace the per-component groups"]))
    lrs = [c["lr"] for c in PLAN["components"] if c["trainable_params"]]
    precision = args.precision or t["precision"]
    kw = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation"],
        num_train_epochs=t["epochs"],
        max_steps=args.max_steps or t["max_steps"] or -1,
        learning_rate=lrs[0],  # what the Trainer logs (group 0); every group has its own LR
        weight_decay=0.0,  # per group
        lr_scheduler_type=t["lr_scheduler"],
        max_grad_norm=t["max_grad_norm"],
        seed=t["seed"],
        logging_steps=t["logging_steps"],
        save_strategy="steps",
        save_steps=t["save_steps"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=no_accelerator() and not ds,  # bf16 autocast on a CPU-only machine (smoke tests)
        gradient_checkpointing=t["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if t["gradient_checkpointing"] else None,
        remove_unused_columns=False,
        report_to=args.report_to,
        deepspeed=ds,
        optim="adamw_torch",
        adam_beta1=t["adam_beta1"],
        adam_beta2=t["adam_beta2"],
        adam_epsilon=t["adam_epsilon"],
        # DDP: a multimodal model skips parts on some batches (the vision tower and projector on
        # text-only batches, Mllama's cross-attention layers without images, LLaVA's last vision
        # layer always), so search for unused parameters whenever it is multimodal
        ddp_find_unused_parameters=bool(PLAN["multimodal"]),
    )
    fsdp = fsdp_config_dict(args)
    if fsdp:
        kw.update(fsdp=True, fsdp_config=fsdp, ddp_find_unused_parameters=None)
        if fsdp.get("activation_checkpointing"):  # FSDP's own (a hand-edited config): the Trainer refuses both
            kw.update(gradient_checkpointing=False, gradient_checkpointing_kwargs=None)
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in fields:  # transformers >= 5.2x renamed gradient checkpointing
        kw["activation_checkpointing"] = kw.pop("gradient_checkpointing")
        kw["activation_checkpointing_kwargs"] = kw.pop("gradient_checkpointing_kwargs")
    if "warmup_ratio" in fields:
        kw["warmup_ratio"] = t["warmup_ratio"]
    else:  # transformers 5: a float below 1 is a ratio
        kw["warmup_steps"] = float(t["warmup_ratio"])
    if args.eval_data:
        kw.update(eval_strategy="steps", eval_steps=t["save_steps"], per_device_eval_batch_size=t["micro_batch_size"])
    return TrainingArguments(**kw)


def weights_dtype(precision, deepspeed):
    """Frozen weights in 16 bit for bf16/fp16 runs (DeepSpeed casts the module itself)."""
    if precision == "fp32" or deepspeed:
        return torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float16


def setup_model(model_ref, meta=False, dtype=torch.float32):
    """Load, check the structure, apply the Plan, check the trainable set. Raises PlanMismatch."""
    model = load_model(model_ref, meta=meta, dtype=dtype)
    problems = check_structure(model)
    if problems:
        raise PlanMismatch("model structure", problems)
    quant_rows = None
    if PLAN.get("quantization"):
        problems, quant_rows = quantized_report(model)
        if problems:
            raise PlanMismatch("quantized modules", problems)
        if not meta:
            model = prepare_kbit(model)
    model = apply_plan(model)
    if not meta and dtype != torch.float32:
        # fp32 master weights for what is trained: mixed precision autocasts, and
        # small-LR components keep their updates (mixspec's estimate counts 4+4+8 bytes)
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
    problems, rows = trainable_report(model)
    if problems:
        raise PlanMismatch("trainable parameters", problems)
    problems = lr_problems(param_groups(model), model)
    if problems:
        raise PlanMismatch("optimizer learning rates and weight decays", problems)
    if quant_rows is not None:
        print_quantized(quant_rows)
    return model, rows


def run_check(args):
    """--check: the setup and the self-check on the model built from its config; 0 or 1."""
    say(f"mixspec self-check: {PLAN['architecture']} from {args.model} (plan fingerprint {PLAN['plan_fingerprint']})")
    try:
        model, rows = setup_model(args.model, meta=True)
    except PlanMismatch as exc:
        say(f"planned trainable parameters: {PLAN['trainable_params']:,}")
        sys.stderr.write(str(exc) + "\n")
        return 1
    total = sum(numel(p) for p in model.parameters() if p.requires_grad)
    print_counts(rows, total)
    say(f"planned trainable parameters: {PLAN['trainable_params']:,}")
    say(f"actual trainable parameters:  {total:,}")
    say("self-check passed: trainable parameters, counts and learning rates equal the plan"
        + (" (and the quantized modules)" if PLAN.get("quantization") else ""))
    return 0


def preflight_data(args):
    """(train rows, eval rows or None), after every row went through the data check (cached):
    a missing file or a refused row stops here, before the model loads, naming every bad
    row; --max-bad-rows N skips at most N of them, each printed."""
    files = [("train", p) for p in data_files(args.data)] + [("eval", p) for p in data_files(args.eval_data)]
    if not data_files(args.data):
        fail(DataError("error: no training data\n  hint: set data.train in the spec or pass --data FILE"))
    for _, path in files:
        if missing_data_file(path) is not None:
            fail(missing_data_file(path))
    follower = int(os.environ.get("LOCAL_RANK", "0")) != 0  # rank 0 of the node checks, the others wait
    try:
        report, rows = check_data(files, data_setup(args.model), workers=args.data_workers,
                                  progress=not follower, wait=follower)
    except (DataError, OSError) as exc:
        fail(exc)
    refused = report["refused"]
    say(f"data check: {report['rows']:,} rows, {report['accepted']:,} accepted, {len(refused):,} refused"
        + (" (cached result of the same files, processor and max_length)" if report.get("cached") else ""))
    if len(refused) > args.max_bad_rows:
        fail(DataError("\n".join(f"{refusal_where(r)}: {r['reason']}" for r in refused)
                       + f"\nerror: {len(refused):,} of {report['rows']:,} rows cannot be trained on; stopped before "
                       "loading the model\n  hint: fix these rows, or pass --max-bad-rows N to skip at most N of them"))
    for r in refused:
        say(f"skipped {refusal_where(r)}: {r['reason']}")
    if refused:
        say(f"skipped {len(refused):,} of {report['rows']:,} rows (--max-bad-rows {args.max_bad_rows})")
    bad = {refusal_id(r) for r in refused}
    train = [row for row in rows.get("train", []) if row_id(row) not in bad]
    evals = [row for row in rows.get("eval", []) if row_id(row) not in bad]
    if not train:
        fail(DataError("error: no training row left after the data check"))
    return train, evals or None


def build_trainer(args):
    """Everything up to trainer.train(): arguments, checked model, data, trainer."""
    transformers.set_seed(TRAINING["seed"])
    say(engine_text(args))
    targs = training_arguments(args)  # before the model: ZeRO-3 partitions it while loading
    dtype = weights_dtype(args.precision or TRAINING["precision"], deepspeed_path(args))
    train_rows, eval_rows = preflight_data(args)  # before the model: bad data costs no weights loaded
    try:
        model, rows = setup_model(args.model, dtype=dtype)
    except PlanMismatch as exc:
        fail(exc)
    total = sum(numel(p) for p in model.parameters() if p.requires_grad)
    print_counts(rows, total)
    try:
        encoder = make_encoder(args.model)
        train_ds = ConversationDataset(train_rows, encoder)
        eval_ds = ConversationDataset(eval_rows, encoder) if eval_rows else None
    except (DataError, OSError) as exc:
        fail(exc)
    say(log_keys_text())
    return plan_trainer_class()(
        model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=Collator(encoder), processing_class=encoder.processor or encoder.tokenizer,
        update_ratio=not args.no_update_ratio,
    )


def log_keys_text():
    """What the log's learning-rate keys are: the Trainer logs one LR, mixspec one per component."""
    trained = [c["name"] for c in PLAN["components"] if c["trainable_params"]]
    return (f"log: learning_rate is the Trainer's own key, the LR of its first optimizer group (component {trained[0]}); "
            f"each component trains at its own LR, logged as lr/<component> ({', '.join('lr/' + n for n in trained)})")


def earlier_run(args):
    """(the final model dir or None, the checkpoint dirs) an earlier run left in --output-dir."""
    final = os.path.join(args.output_dir, "final")
    try:
        entries = sorted(os.listdir(args.output_dir), key=natural_key)
    except OSError:  # not there yet
        entries = []
    checkpoints = [os.path.join(args.output_dir, e) for e in entries
                   if re.fullmatch(r"checkpoint-\d+", e) and os.path.isdir(os.path.join(args.output_dir, e))]
    return (final if os.path.exists(final) else None), checkpoints


def refuse_overwrite(args):
    """Stop before anything loads when this run would write over an earlier run's model (or
    restart over its checkpoints without --resume); --overwrite allows it: the old checkpoints
    go now (a later --resume must not find them), the old final model when the new one is saved."""
    final, checkpoints = earlier_run(args)
    if args.overwrite:
        if checkpoints and not args.resume and is_main_process():
            for path in checkpoints:
                shutil.rmtree(path)
        return
    if final:
        fail(DataError(f"error: {final} exists (the model of an earlier run); this run would overwrite it\n"
                       "  hint: pass --overwrite to replace it, or --output-dir DIR to keep it"))
    if checkpoints and not args.resume:
        fail(DataError(f"error: {checkpoints[-1]} exists ({len(checkpoints)} checkpoint(s) of an earlier run in "
                       f"{args.output_dir}); a new run would write over them\n"
                       "  hint: pass --resume to continue that run, --overwrite to start over (its checkpoints are "
                       "deleted), or --output-dir DIR"))


def train(args):
    refuse_overwrite(args)  # before the data check and the model: seconds, not minutes
    trainer = build_trainer(args)
    try:
        trainer.train(resume_from_checkpoint=args.resume)
    except DataError as exc:
        fail(exc)
    final = os.path.join(args.output_dir, "final")
    if os.path.isdir(final) and trainer.args.should_save:  # --overwrite: replaced whole, no old file left in it
        shutil.rmtree(final)
    trainer.save_model(final)
    say(f"saved {final}: LoRA adapter, {TRAINED_PARAMS_FILE} and {PLAN_FILE}; merge with: "
        f"python {shlex.quote(script_path())} --merge {shlex.quote(final)} --out MERGED_DIR")
    return 0


def script_path():
    """This script as it was invoked (so that a printed command can be pasted where it was
    run), or its own path when another program imported it."""
    invoked = sys.argv[0] if sys.argv else ""
    if invoked and os.path.exists(invoked) and os.path.samefile(invoked, __file__):
        return invoked
    return os.path.abspath(__file__)


def merge(args):
    if not args.out:
        fail(DataError("--merge needs --out DIR"))
    dtype = getattr(torch, args.dtype)
    model = load_trained(args.merge, args.model, dtype=dtype)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(args.out, safe_serialization=True)
    for loader in (transformers.AutoProcessor, transformers.AutoTokenizer):
        try:
            loader.from_pretrained(args.merge).save_pretrained(args.out)
            break
        except Exception:
            continue
    say(f"merged model written to {args.out}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    if args.check:
        return run_check(args)
    if args.preview_data is not None:
        return preview_data(args)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
