"""Target ``hf``: a standalone Hugging Face Trainer + PEFT script, ``launch.sh`` and, when
the spec asks for DeepSpeed, ``ds_config.json``.

``train.py`` imports torch, transformers and peft (PIL for image rows, datasets for hub
dataset ids, deepspeed when configured), never mixspec. Everything it needs from the Plan
is embedded as Python literals at its top: per-component trainable parameter names (in
a compact, exact form), learning rates, LoRA settings with exact target modules, counts,
and hashes. Before the first step it checks the model it loaded against them.

The script's logic is fixed text (``_TRAIN_PY``); only the data block differs between
plans, so a golden file diff shows exactly what a spec change does.
"""

from __future__ import annotations

import hashlib
import re

from mixspec import __version__
from mixspec.errors import Unsupported
from mixspec.names import is_under
from mixspec.plan import Plan
from mixspec.targets import Target, TargetOptions
from mixspec.targets._common import (
    comment_text,
    compact_names,
    exact_regex,
    generated_header,
    inline_source,
    py_literal,
    sh_word,
)
from mixspec.targets._slurm import SBATCH_FILE, render_sbatch_sh, wants_sbatch
from mixspec.targets.deepspeed import deepspeed_config_text, distributed_unsupported

_SAFE_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")


def _label(name: str) -> str:
    return name if _SAFE_LABEL.match(name) else comment_text(name)


def names_sha256(names) -> str:
    """The hash train.py recomputes: sha256 of the sorted names joined by newlines."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def lora_settings(plan: Plan) -> dict | None:
    """How PEFT expresses the Plan's LoRA components: one LoraConfig whose target_modules
    is a regex full-matching exactly the planned module names; rank/alpha of every further
    component through rank_pattern/alpha_pattern keys anchored with ``^`` (PEFT matches
    them as ``(.*\\.)?(KEY)$``), dropout of further components set per module."""
    comps = [c for c in plan.components if c.mode == "lora" and c.lora]
    if not comps:
        return None
    first = comps[0].lora
    all_targets = [t for c in comps for t in c.lora.targets]
    rank_pattern, alpha_pattern, dropout_overrides = {}, {}, []
    for comp in comps[1:]:
        key = "^(?:" + exact_regex(comp.lora.targets) + ")"
        if comp.lora.rank != first.rank:
            rank_pattern[key] = comp.lora.rank
        if comp.lora.alpha != first.alpha:
            alpha_pattern[key] = comp.lora.alpha
        if comp.lora.dropout != first.dropout:
            dropout_overrides.append({"component": comp.name, "modules": exact_regex(comp.lora.targets),
                                      "dropout": comp.lora.dropout})
    return {
        "r": first.rank,
        "alpha": first.alpha,
        "dropout": first.dropout,
        "rslora": first.rslora,
        "dora": first.dora,
        "target_modules": "(?:" + exact_regex(all_targets) + ")",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "dropout_overrides": dropout_overrides,
    }


def plan_data(plan: Plan, model_ref: str) -> dict:
    """The Plan, as train.py embeds it (plain data only)."""
    base_names = [p for c in plan.components for p in c.params] + list(plan.unassigned_params)
    trainable = plan.trainable_lrs()
    components = []
    for comp in plan.components:
        entry = {
            "name": comp.name,
            "mode": comp.mode,
            "lr": comp.lr,
            "weight_decay": comp.weight_decay,
            "trainable_params": comp.trainable_params,
            "trainable": compact_names(comp.trainable_names),
            "no_decay": compact_names(comp.no_decay),
        }
        if comp.lora:
            entry["lora"] = {"rank": comp.lora.rank, "alpha": comp.lora.alpha,
                             "dropout": comp.lora.dropout, "rslora": comp.lora.rslora,
                             "dora": comp.lora.dora, "targets": compact_names(comp.lora.targets)}
        components.append(entry)
    return {
        "spec": plan.spec_path,
        "mixspec_version": __version__,
        "fingerprint": plan.fingerprint(),
        "model": model_ref,
        "architecture": plan.architecture,
        "model_type": plan.model_type,
        "transformers_version": plan.versions.get("transformers", "unknown"),
        "multimodal": any(r in plan.roles for r in ("vision", "audio")),
        "roles": {r: list(p) for r, p in sorted(plan.roles.items())},
        "base_params": plan.totals.base_params,
        "base_names_sha256": names_sha256(base_names),
        "base_names": compact_names(base_names),
        "trainable_params": plan.totals.trainable_params,
        "trainable_names_sha256": names_sha256(trainable),
        "components": components,
        "lora": lora_settings(plan),
    }


def default_model_ref(plan: Plan, options: TargetOptions) -> str:
    """What train.py loads by default: --model, else the spec's model (a local dir as the
    absolute path mixspec resolved, since the spec's relative path was relative to it)."""
    if options.model_override:
        return options.model_override
    if plan.model_source == "local":
        return plan.model_path
    return plan.model


def lora_unsupported(plan: Plan) -> list[Unsupported]:
    """What PEFT (with the merge step train.py documents) cannot express exactly."""
    out = []
    tied_weights = set(plan.tied) | set(plan.tied.values())
    comps = [c for c in plan.components if c.mode == "lora" and c.lora]
    for comp in comps:
        tied = [t for t in comp.lora.targets if f"{t}.weight" in tied_weights]
        if tied:
            partner = sorted({plan.tied.get(f"{t}.weight") or next(a for a, c in plan.tied.items() if c == f"{t}.weight")
                              for t in tied})
            out.append(Unsupported(
                "lora-on-tied-weight", comp.origin, f"LoRA on {', '.join(tied)} (component {comp.name!r})",
                f"its weight is tied to {', '.join(partner)}: merging the adapter would change both modules",
                "train that module with train: full (both tied names then train together), or leave it out of the LoRA targets"))
    if len({c.lora.rslora for c in comps}) > 1:
        out.append(Unsupported(
            "lora-mixed-rslora", comps[1].origin, "rslora on some LoRA components but not on others",
            "PEFT's use_rslora applies to a whole adapter", "use the same rslora setting on every LoRA component"))
    if len({c.lora.dora for c in comps}) > 1:
        out.append(Unsupported(
            "lora-mixed-dora", comps[1].origin, "DoRA on some LoRA components but not on others",
            "PEFT's use_dora applies to a whole adapter", "use the same dora setting on every LoRA component"))
    return out


# Families whose image rows the test suite has run through train.py end to end (tests/e2e/
# test_hf_families.py): --preview-data equal, key by key, to the family's processor on the whole
# conversation; labels exactly the assistant turns; a mixed micro-batch of 2 trained for 2 steps;
# earlier logits unchanged when the last answer token changes. README: "hf target: families".
IMAGE_ROWS_PROVEN = (
    "gemma3", "idefics3", "internvl", "llava", "llava_next", "llava_onevision", "mllama", "paligemma",
    "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "smolvlm",
)


def feed_unsupported(plan: Plan) -> list[Unsupported]:
    """Trained parts that train.py cannot feed: it reads text and images, no audio."""
    out = []
    audio = tuple(plan.roles.get("audio") or ())
    unfed = audio + (tuple(plan.roles.get("aligner") or ()) if audio and "vision" not in plan.roles else ())
    if not unfed:
        return out
    for comp in plan.components:
        if any(is_under(n, unfed) for n in comp.trainable_names):
            out.append(Unsupported(
                "no-audio-input", comp.origin, f"training component {comp.name!r} (audio encoder or its projector)",
                "train.py feeds text and images only: without audio rows these parameters never get a gradient",
                f"freeze {comp.name!r} for the hf target, or use a backend with an audio data path (swift)"))
    return out


class HfTarget(Target):
    name = "hf"
    description = "standalone Hugging Face Trainer + PEFT script (train.py), launch.sh, ds_config.json"

    def warnings(self, plan: Plan, options: TargetOptions) -> list[str]:
        if "vision" in plan.roles and plan.model_type not in IMAGE_ROWS_PROVEN:
            return [f"image rows of model_type {plan.model_type!r} are not proven by mixspec's tests (proven: "
                    f"{', '.join(IMAGE_ROWS_PROVEN)}); run python train.py --preview-data 4 and read "
                    "preview/preview.txt before training"]
        return []

    def unsupported(self, plan: Plan, options: TargetOptions) -> list[Unsupported]:
        out = lora_unsupported(plan)
        out += feed_unsupported(plan)
        out += distributed_unsupported(plan, require_zero=False)
        ratio = plan.training.warmup_ratio
        if ratio >= 1:
            out.append(Unsupported(
                "warmup-ratio-one", None, f"training.warmup_ratio {ratio}",
                "transformers 5 reads a warmup of 1.0 as one step, not the whole run",
                "use a warmup_ratio below 1"))
        if not any(c.trainable_params for c in plan.components):
            out.append(Unsupported("nothing-trainable", None, "a plan that trains nothing",
                                   "the Trainer needs at least one trainable parameter",
                                   "give at least one component train: full or lora"))
        return out

    def files(self, plan: Plan, options: TargetOptions) -> dict[str, str]:
        out = {"train.py": render_train_py(plan, options), "launch.sh": render_launch_sh(plan)}
        if plan.distributed.deepspeed:
            out["ds_config.json"] = deepspeed_config_text(plan)
        if wants_sbatch(plan, options):
            out[SBATCH_FILE] = render_sbatch_sh(plan, options, "hf", "launch.sh")
        config = model_config_text(plan)
        if config is not None:
            out[MODEL_CONFIG] = config
        return out


# the config the Plan was made from, next to train.py: `--check` builds the model from it
# when the planned model is not a local directory here (a hub id offline, a path on
# another machine)
MODEL_CONFIG = "model_config.json"


def model_config_text(plan: Plan) -> str | None:
    """The model's config.json as the Plan saw it (None for a plan without a readable model dir)."""
    if not plan.model_path:
        return None
    import json
    from pathlib import Path

    from mixspec.sources import read_config

    from mixspec.errors import ModelSourceError

    try:
        config = read_config(Path(plan.model_path) / "config.json", plan.model)
    except ModelSourceError:  # a Plan made by hand, or a model dir gone since: --check reads --model
        return None
    return json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _summary_lines(plan: Plan) -> list[str]:
    rows = []
    for comp in plan.components:
        lr = f"lr {comp.lr:g}" if comp.lr is not None else ""
        extra = ""
        if comp.lora:
            extra = (f" rank {comp.lora.rank}, alpha {comp.lora.alpha:g}, dropout {comp.lora.dropout:g}"
                     f"{', rslora' if comp.lora.rslora else ''}{', dora' if comp.lora.dora else ''},"
                     f" {len(comp.lora.targets)} modules")
        rows.append(f"  {_label(comp.name):<20} {comp.mode:<6} {lr:<12} {comp.trainable_params:>15,} trainable{extra}")
    if plan.unassigned_base_params:
        rows.append(f"  {'(unassigned)':<20} {'freeze':<6} {'':<12} {plan.unassigned_base_params:>15,} frozen")
    rows.append(f"  total: {plan.totals.trainable_params:,} trainable of {plan.totals.all_params:,} parameters")
    return rows


def render_train_py(plan: Plan, options: TargetOptions) -> str:
    """The text of train.py for a Plan."""
    model_ref = default_model_ref(plan, options)
    data = plan_data(plan, model_ref)
    training = plan.training.to_json()
    dist = plan.distributed.to_json()
    header = "#!/usr/bin/env python3\n" + generated_header(plan, "hf", extra=[
        "",
        "Components (the Plan; python train.py --check confirms it on the installed model):",
        *_summary_lines(plan),
    ])
    blocks = {
        "__MIXSPEC_HEADER__\n": header,
        "__MIXSPEC_PLAN__": py_literal(data, lead=len("PLAN = ")),
        "__MIXSPEC_TRAINING__": py_literal(training, lead=len("TRAINING = ")),
        "__MIXSPEC_DATA__": py_literal(plan.data.to_json() if plan.data else None, lead=len("DATA = ")),
        "__MIXSPEC_OUTPUT_DIR__": py_literal(plan.output_dir or "output", lead=len("OUTPUT_DIR = ")),
        "__MIXSPEC_DISTRIBUTED__": py_literal(dist, lead=len("DISTRIBUTED = ")),
        "__MIXSPEC_DEEPSPEED__": py_literal("ds_config.json" if plan.distributed.deepspeed else None),
        "__MIXSPEC_NAME_HELPERS__": inline_source().rstrip("\n"),
    }
    text = _TRAIN_PY
    for marker, value in blocks.items():
        assert text.count(marker) == 1, marker
        text = text.replace(marker, value)
    return text


def render_launch_sh(plan: Plan) -> str:
    """launch.sh: torchrun (default), deepspeed or accelerate, single- or multi-node."""
    dist = plan.distributed
    nodes, gpus = dist.nodes, dist.gpus_per_node
    uses_ds = dist.deepspeed
    header = "#!/usr/bin/env bash\n" + generated_header(plan, "hf", extra=[
        "",
        f"Planned for {nodes} node(s) x {gpus} GPU(s)" + (f", DeepSpeed ZeRO-{dist.zero_stage}"
                                                          + (f", offload {dist.offload}" if dist.offload != "none" else "")
                                                          if uses_ds else ", no DeepSpeed") + ".",
        "Usage:  bash launch.sh [train.py options]          (on every node for multi-node runs)",
        "  LAUNCHER=torchrun|deepspeed|accelerate   which launcher (default torchrun)",
        "  NNODES, GPUS_PER_NODE                    override the planned sizes",
        "  NODE_RANK, MASTER_ADDR, MASTER_PORT      multi-node rendezvous (node 0's address)",
        "  HOSTFILE                                 deepspeed launcher, multi-node: run on node 0 only,",
        "                                           which starts every node over ssh (pdsh) from it;",
        "                                           without it, run on every node (deepspeed --no_ssh)",
    ])
    body = _LAUNCH_SH
    body = body.replace("__NNODES__", sh_word(str(nodes))).replace("__GPUS__", sh_word(str(gpus)))
    return header + body


_LAUNCH_SH = r'''set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT="$HERE/train.py"
NNODES="${NNODES:-__NNODES__}"
GPUS_PER_NODE="${GPUS_PER_NODE:-__GPUS__}"
LAUNCHER="${LAUNCHER:-torchrun}"
MASTER_PORT="${MASTER_PORT:-29500}"

if [ "$NNODES" -gt 1 ]; then
  if [ "$LAUNCHER" != deepspeed ] || [ -z "${HOSTFILE:-}" ]; then
    : "${NODE_RANK:?multi-node: set NODE_RANK (0..NNODES-1) on each node}"
  fi
  : "${MASTER_ADDR:?multi-node: set MASTER_ADDR to node 0 address}"
fi

case "$LAUNCHER" in
  torchrun)
    if [ "$NNODES" -eq 1 ]; then
      exec torchrun --standalone --nnodes 1 --nproc_per_node "$GPUS_PER_NODE" "$SCRIPT" "$@"
    fi
    exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$SCRIPT" "$@"
    ;;
  deepspeed)
    if [ "$NNODES" -eq 1 ]; then
      exec deepspeed --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT" "$SCRIPT" "$@"
    fi
    if [ -n "${HOSTFILE:-}" ]; then
      # run on node 0 only: the deepspeed launcher starts every node over ssh (pdsh)
      exec deepspeed --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$SCRIPT" "$@"
    fi
    # run on every node (by hand, or srun): one launcher per node, no ssh; its hostfile only
    # tells it the world (NNODES x GPUS_PER_NODE), no host in it is contacted
    hostfile="$(mktemp)"
    trap 'rm -f "$hostfile"' EXIT
    for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$GPUS_PER_NODE"; done > "$hostfile"
    deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$hostfile" --num_nodes "$NNODES" \
      --num_gpus "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$SCRIPT" "$@"
    ;;
  accelerate)
    if [ "$NNODES" -eq 1 ]; then
      exec accelerate launch --multi_gpu --num_machines 1 --num_processes "$GPUS_PER_NODE" \
        --main_process_port "$MASTER_PORT" "$SCRIPT" "$@"
    fi
    exec accelerate launch --multi_gpu --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
      --num_processes "$((NNODES * GPUS_PER_NODE))" --main_process_ip "$MASTER_ADDR" \
      --main_process_port "$MASTER_PORT" "$SCRIPT" "$@"
    ;;
  *)
    echo "launch.sh: unknown LAUNCHER '$LAUNCHER' (torchrun, deepspeed or accelerate)" >&2
    exit 2
    ;;
esac
'''


_TRAIN_PY = r'''__MIXSPEC_HEADER__
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
--output-dir, --max-steps, --precision, --deepspeed, --report-to, --resume (python train.py --help).

Self-check. Before the first step the script compares the loaded model with the Plan:
every parameter name and the total count (so another model, another transformers version or
a model with one layer more is caught), then the set of trainable parameters, their count and
each one's optimizer learning rate and weight decay (the Plan's fingerprint). Any difference
stops the run with exit status 1 and a readable diff.

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
  than training.max_length tokens are cut; a cut through an image is an error naming the row.
  python train.py --preview-data N --preview-out DIR writes the first N rows as training sees
  them (DIR/row{i}.safetensors, DIR/preview.txt with the labelled text decoded) and exits.

Saving. Each checkpoint (and OUTPUT_DIR/final at the end) holds the LoRA adapter
(adapter_model.safetensors, adapter_config.json), the fully trained parameters
(trained_params.safetensors, base-model names), the processor/tokenizer and mixspec_plan.json.
load_trained(CHECKPOINT) rebuilds the trained model exactly; --merge writes it as a plain
Hugging Face model directory.

Monitoring. At each logging step the log gets, per component, grad_norm/NAME (gradient norm
before clipping) and update_ratio/NAME (|weight change| / |weight| of that step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys

import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainingArguments

# -- the Plan (generated by mixspec; edit the spec and recompile rather than this) -------
PLAN = __MIXSPEC_PLAN__

TRAINING = __MIXSPEC_TRAINING__

DATA = __MIXSPEC_DATA__

OUTPUT_DIR = __MIXSPEC_OUTPUT_DIR__

DISTRIBUTED = __MIXSPEC_DISTRIBUTED__

DEEPSPEED_CONFIG = __MIXSPEC_DEEPSPEED__  # relative to this file's directory

PEFT_PREFIX = "base_model.model."
TRAINED_PARAMS_FILE = "trained_params.safetensors"
PLAN_FILE = "mixspec_plan.json"
IMAGE_MARKER = "<image>"
# prefix-LM families: the prompt is attended both ways (token_type_ids 0), the answer causally (1)
PREFIX_LM_TYPES = ("paligemma",)
HERE = os.path.dirname(os.path.abspath(__file__))


# -- names ------------------------------------------------------------------------------
__MIXSPEC_NAME_HELPERS__


def names_sha256(names):
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def plan_name(name):
    """A parameter's name in the Plan: its name in the base model (PEFT's wrapper prefix removed)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def numel(param):
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


def load_model(model_ref, meta=False, dtype=torch.float32):
    """The planned model class, from a local dir or hub id; on the meta device (no weights) if meta."""
    cls = model_class()
    try:
        if meta:
            config = transformers.AutoConfig.from_pretrained(config_source(model_ref))
            with torch.device("meta"):
                return cls._from_config(config)
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


def lr_problems(groups, model):
    """Each trainable parameter in exactly one group, at its planned LR and weight decay; the
    Plan's fingerprint (names, LRs and weight decays)."""
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
            actual[name] = (g["lr"], g.get("weight_decay", 0.0))
            comp = planned.get(name)
            want = comp["lr"] if comp else None
            if g["lr"] != want:
                problems.append(f"{name}: learning rate {g['lr']!r}, the plan says {want!r}")
            want_wd = planned_weight_decay(name, comp, no_decay) if comp else None
            if g.get("weight_decay", 0.0) != want_wd:
                problems.append(f"{name}: weight decay {g.get('weight_decay', 0.0)!r}, the plan says {want_wd!r}")
        elif g is not None:
            problems.append(f"{name} is frozen but in optimizer group {g['name']}")
    if group_of:
        problems.append(f"{len(group_of)} optimizer parameters are not parameters of the model")
    text = "\n".join(f"{n}={lr!r} wd={wd!r}" for n, (lr, wd) in sorted(actual.items()))
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
    if not problems and fingerprint != PLAN["fingerprint"]:
        problems.append(f"names, learning rates and weight decays hash to {fingerprint}, "
                        f"the plan's fingerprint is {PLAN['fingerprint']}")
    return problems


def deepspeed_config_dict(path):
    if not path:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def make_optimizer(groups, args):
    """AdamW over the planned groups (DeepSpeedCPUAdam when ZeRO offloads the optimizer)."""
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    ds = args.deepspeed if isinstance(args.deepspeed, dict) else deepspeed_config_dict(args.deepspeed)
    offload = ((ds or {}).get("zero_optimization", {}).get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


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

    @staticmethod
    def _grad(param, deepspeed):
        if deepspeed:
            from deepspeed.utils import safe_get_full_grad

            return safe_get_full_grad(param)
        return param.grad

    @staticmethod
    def _weight(param, deepspeed):
        if deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(param)
            if full is not None:
                return full
        return param.data

    def measure_grads(self, deepspeed=False, scale=1.0):
        for comp, params in self.params.items():
            total = None
            for p in params:
                g = self._grad(p, deepspeed)
                if g is not None:
                    sq = g.detach().float().pow(2).sum()
                    total = sq if total is None else total + sq
            # no gradient at all (e.g. a vision tower on text-only batches) logs 0.0
            self.pending[f"grad_norm/{comp}"] = math.sqrt(float(total)) / scale if total is not None else 0.0
        if self.update_ratio:
            self.before = {comp: [self._weight(p, deepspeed).detach().float().cpu().clone() for p in params]
                           for comp, params in self.params.items()}

    def measure_updates(self, deepspeed=False):
        if self.before is None:
            return
        for comp, params in self.params.items():
            num = den = 0.0
            for p, old in zip(params, self.before[comp]):
                new = self._weight(p, deepspeed).detach().float().cpu()
                num += float((new - old).pow(2).sum())
                den += float(old.pow(2).sum())
            self.pending[f"update_ratio/{comp}"] = math.sqrt(num) / math.sqrt(den) if den > 0 else float("nan")
        self.before = None

    def pop(self):
        out, self.pending = self.pending, {}
        return out


class _UpdateCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.monitor.measure_updates(self.trainer.is_deepspeed_enabled)

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.check_optimizer_after_wrap()


class PlanTrainer(Trainer):
    """Trainer whose optimizer has the Plan's per-component groups (DeepSpeed keeps them:
    the DeepSpeed JSON has no optimizer block), checked before the first step, and whose
    checkpoints hold the fully trained parameters next to the LoRA adapter."""

    def __init__(self, *args, update_ratio=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor = ComponentMonitor(self.model, update_ratio=update_ratio)
        self._planned_group_lrs = None
        self._engine_wrapped = False
        self.add_callback(_UpdateCallback(self))

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

    def check_optimizer_after_wrap(self):
        """After DeepSpeed/accelerate wrapped the optimizer: the same groups, at the same LRs
        and weight decays."""
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
            for group in getattr(self.optimizer, "param_groups", None) or []:
                if str(group.get("name", "")).endswith("/decay") or str(group.get("name", "")).endswith("/no_decay"):
                    logs.setdefault("lr/" + group["name"].rsplit("/", 1)[0], group["lr"])
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
        if os.path.isfile(path) and not self.is_deepspeed_enabled:
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

        model = PeftModel.from_pretrained(model, checkpoint)
    return model.to(dtype)


# -- data -------------------------------------------------------------------------------
class DataError(Exception):
    pass


def read_rows(path):
    """Rows of a .jsonl/.json file, or of a hub dataset (train split) for anything else."""
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if path.endswith(".json") and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
        base = os.path.dirname(os.path.abspath(path))
        return [dict(row, _where=f"{path}:{i + 1}", _base=base) for i, row in enumerate(rows)]
    import datasets

    ds = datasets.load_dataset(path, split="train")
    return [dict(row, _where=f"{path}[{i}]", _base=os.getcwd()) for i, row in enumerate(ds)]


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
                raise DataError(f"{where}: content parts must be {{'type': 'text', 'text': ...}} or {{'type': 'image'}}")
            out.append({"type": "image"} if part["type"] == "image" else {"type": "text", "text": str(part.get("text", ""))})
        return out
    raise DataError(f"{where}: message content must be a string or a list of parts")


def conversation(row, multimodal):
    """(messages in the chat template's form, images) of a row, validated."""
    where = row.get("_where", "row")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: needs a non-empty \"messages\" list")
    images = row.get("images") or []
    if isinstance(images, str):
        images = [images]
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: each message needs role system, user or assistant")
        out.append({"role": m["role"], "content": _parts(m.get("content", ""), where)})
    markers = sum(1 for m in out for p in m["content"] if p["type"] == "image")
    if images and markers == 0:
        first_user = next((m for m in out if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: images but no user message to put them in")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
        markers = len(images)
    if markers != len(images):
        raise DataError(f"{where}: {markers} image markers but {len(images)} images")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message to learn from")
    if not multimodal:
        if images:
            raise DataError(f"{where}: images, but the model has no vision tower")
        out = [{"role": m["role"], "content": "".join(p["text"] for p in m["content"])} for m in out]
    return out, images


def _image_path(image, base, where):
    if not isinstance(image, str) or not image:
        raise DataError(f"{where}: each image must be a path (a non-empty string)")
    path = image if os.path.isabs(image) else os.path.join(base, image)
    if not os.path.isfile(path):
        raise DataError(f"{where}: image not found: {path}")
    return path


def _open_image(image, base, where="row"):
    from PIL import Image

    if hasattr(image, "convert"):  # a PIL image (hub datasets)
        return image.convert("RGB")
    path = _image_path(image, base, where)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:
        raise DataError(f"{where}: cannot read image {path}: {type(exc).__name__}: {exc}") from None


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

    def __init__(self, tokenizer, processor, max_length, multimodal, processor_error=None):
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length
        self.multimodal = multimodal
        self.processor_error = processor_error
        self.prefix_lm = PLAN["model_type"] in PREFIX_LM_TYPES
        owner = processor if processor is not None and getattr(processor, "chat_template", None) else tokenizer
        if not self.prefix_lm and not getattr(owner, "chat_template", None):
            raise DataError("the model has no chat template (tokenizer_config.json / chat_template.jinja)")
        self.template_owner = owner
        tokenizer.padding_side = "right"  # batches: every row starts at position 0, labels line up
        self.image_ids = image_token_ids(tokenizer, processor)
        self.image_token_id = None
        image_token = getattr(processor, "image_token", None) if processor is not None else None
        if isinstance(image_token, str):
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def render(self, messages, add_generation_prompt=False):
        return self.template_owner.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)

    def process(self, texts, images, suffixes=None, where="row"):
        """One call of the processor (the tokenizer for text-only models) on whole conversations."""
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
            raise DataError(f"{where}: {type(self.processor or self.tokenizer).__name__} cannot take this: "
                            f"{type(exc).__name__}: " + " ".join(str(exc).split())[:300]) from None
        return {k: v for k, v in out.items() if torch.is_tensor(v) and k != "labels"}

    def prefix_lm_parts(self, messages, where):
        """(prompt text with image markers, answer) of a single-turn row of a prefix-LM family."""
        roles = [m["role"] for m in messages]
        if roles != ["user", "assistant"]:
            raise DataError(f"{where}: {PLAN['model_type']} is a prefix-LM (prompt, then answer): a row must be "
                            f"one user message and one assistant message, got {', '.join(roles)}")
        marker = getattr(self.processor, "image_token", IMAGE_MARKER)

        def text(m):
            return "".join(marker if p["type"] == "image" else p["text"] for p in m["content"])

        return text(messages[0]), text(messages[1])

    def encode_row(self, row, index=0):
        """{'text', 'suffix', 'images', 'inputs' (this row alone, as one micro-batch), 'labels', 'where'}."""
        where = row.get("_where", f"row {index}")
        messages, images = conversation(row, self.multimodal)
        if images and self.processor is None:
            raise DataError(f"{where}: has images, but no image processor could be loaded for this model: "
                            f"{self.processor_error}")
        pil = [_open_image(img, row.get("_base", "."), where) for img in images]
        if self.prefix_lm:
            prompt, answer = self.prefix_lm_parts(messages, where)
            inputs = self.process([prompt], [pil], suffixes=[answer], where=where)
            types = inputs.get("token_type_ids")
            if types is None:
                raise DataError(f"{where}: the processor gave no token_type_ids for the answer")
            labels = torch.where(types[0] == 1, inputs["input_ids"][0], torch.full_like(types[0], -100))
            text, suffix = prompt, answer
        else:
            text, suffix = self.render(messages), None
            inputs = self.process([text], [pil], where=where)
            labels = self.assistant_labels(messages, text, pil, inputs["input_ids"][0], where)
        inputs, labels = self.cut(inputs, labels, where)
        if bool((labels == -100).all()):
            raise DataError(f"{where}: no assistant token within max_length {self.max_length}")
        return {"text": text, "suffix": suffix, "images": pil, "inputs": inputs, "labels": labels, "where": where}

    def assistant_labels(self, messages, full, pil, ids, where):
        """Each assistant turn's tokens: from where the generation prompt ends (or, for templates
        whose generation prompt differs from how they render a finished turn, where the turn's
        {% generation %} block starts) to the end of the turn with its end-of-turn tokens."""
        labels = torch.full_like(ids, -100)
        blocks = None
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i]) if i else ""
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError(f"{where}: the chat template renders earlier turns differently once later "
                                "turns follow, so assistant turns cannot be located")
            if upto.startswith(prompt):
                start = len(prompt)
            else:
                if blocks is None:
                    blocks = self.generation_blocks(messages, full)
                start = next((s for s, e in blocks if len(before) <= s < len(upto)), None) if blocks else None
                if start is None:
                    raise DataError(f"{where}: the chat template's generation prompt differs from how it renders "
                                    "an assistant turn, and it marks no {% generation %} block, so the assistant "
                                    "tokens cannot be located")
            first = self.prefix_length(full[:start], pil, ids, where)
            last = self.prefix_length(upto, pil, ids, where)
            labels[first:last] = ids[first:last]
        return labels

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
        """Tokens of the conversation's first len(text) characters; they must be a prefix of ids."""
        n_images = sum(text.count(t) for t in self.image_markers()) if pil else 0
        if n_images > len(pil):
            n_images = len(pil)
        got = self.process([text], [pil[:n_images]], where=where)["input_ids"][0]
        if got.shape[0] > ids.shape[0] or not torch.equal(got, ids[: got.shape[0]]):
            raise DataError(f"{where}: the conversation up to an assistant turn does not tokenize as a prefix of "
                            "the whole conversation (the chat template or tokenizer merges tokens across the "
                            "turn boundary), so its assistant tokens cannot be located exactly")
        return int(got.shape[0])

    def image_markers(self):
        token = getattr(self.processor, "image_token", None)
        return [token] if isinstance(token, str) and token else [IMAGE_MARKER]

    def cut(self, inputs, labels, where):
        """Rows longer than max_length lose their end (every token-aligned key); never an image."""
        length = int(inputs["input_ids"].shape[1])
        if length <= self.max_length:
            return inputs, labels
        tail = inputs["input_ids"][0, self.max_length:]
        if self.image_ids and bool(torch.isin(tail, torch.tensor(sorted(self.image_ids))).any()):
            raise DataError(f"{where}: {length} tokens; cutting at max_length {self.max_length} would cut an image "
                            "(raise training.max_length or shorten the row)")
        out = {k: (v[:, : self.max_length] if token_aligned(v, inputs["input_ids"]) else v) for k, v in inputs.items()}
        return out, labels[: self.max_length]


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
                    raise DataError(f"{it['where']}: the processor tokenizes this row differently inside a batch "
                                    "than alone; use micro_batch_size 1")
        labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
        for i, it in enumerate(items):
            labels[i, : it["labels"].shape[0]] = it["labels"]
        batch["labels"] = labels
        return batch


def load_processing(model_ref):
    """(tokenizer, processor or None, why the processor could not be loaded)."""
    if PLAN["multimodal"]:
        try:
            processor = transformers.AutoProcessor.from_pretrained(model_ref)
            if hasattr(processor, "image_processor"):
                tokenizer = processor.tokenizer
                if tokenizer.pad_token_id is None:
                    tokenizer.pad_token = tokenizer.eos_token
                return tokenizer, processor, None
            reason = f"AutoProcessor gave {type(processor).__name__}"
        except Exception as exc:  # e.g. a video processor that needs torchvision
            reason = f"{type(exc).__name__}: " + " ".join(str(exc).split())[:160]
        say(f"warning: no image processor ({reason}); text-only rows work, rows with images fail")
    else:
        reason = None
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_ref)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, None, reason


def make_encoder(model_ref):
    tokenizer, processor, why = load_processing(model_ref)
    return ConversationEncoder(tokenizer, processor, TRAINING["max_length"], PLAN["multimodal"], why)


def preview_data(args):
    """--preview-data N: the first N rows as training sees them, one micro-batch per row."""
    from safetensors.torch import save_file

    if not args.data:
        fail(DataError("no training data: set data.train in the spec or pass --data"))
    out_dir = args.preview_out or "preview"
    try:
        encoder = make_encoder(args.model)
        rows = read_rows(args.data)[: args.preview_data]
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
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune as planned by mixspec (see the header of this file).")
    p.add_argument("--check", action="store_true", help="setup and self-check only (config, no weights, no data); exit 0 or 1")
    p.add_argument("--model", default=PLAN["model"], help="model directory or hub id (default: the spec's)")
    p.add_argument("--data", default=(DATA or {}).get("train"), help="training data (.jsonl) or hub dataset id")
    p.add_argument("--eval-data", default=(DATA or {}).get("eval"), help="evaluation data, evaluated at each save")
    p.add_argument("--output-dir", default=OUTPUT_DIR, help="checkpoints and the final model")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (default: ds_config.json next to this file, if planned)")
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
    import dataclasses

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
    return model, rows


def run_check(args):
    """--check: the setup and the self-check on the model built from its config; 0 or 1."""
    say(f"mixspec self-check: {PLAN['architecture']} from {args.model} (plan fingerprint {PLAN['fingerprint']})")
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
    say("self-check passed: trainable parameters, counts and learning rates equal the plan")
    return 0


def build_trainer(args):
    """Everything up to trainer.train(): arguments, checked model, data, trainer."""
    transformers.set_seed(TRAINING["seed"])
    targs = training_arguments(args)  # before the model: ZeRO-3 partitions it while loading
    dtype = weights_dtype(args.precision or TRAINING["precision"], deepspeed_path(args))
    try:
        model, rows = setup_model(args.model, dtype=dtype)
    except PlanMismatch as exc:
        fail(exc)
    total = sum(numel(p) for p in model.parameters() if p.requires_grad)
    print_counts(rows, total)
    if not args.data:
        fail(DataError("no training data: set data.train in the spec or pass --data"))
    try:
        encoder = make_encoder(args.model)
        train_rows = read_rows(args.data)
        eval_rows = read_rows(args.eval_data) if args.eval_data else None
        train_ds = ConversationDataset(train_rows, encoder)
        eval_ds = ConversationDataset(eval_rows, encoder) if eval_rows else None
    except (DataError, OSError) as exc:
        fail(exc)
    return PlanTrainer(
        model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=Collator(encoder), processing_class=encoder.processor or encoder.tokenizer,
        update_ratio=not args.no_update_ratio,
    )


def train(args):
    trainer = build_trainer(args)
    try:
        trainer.train(resume_from_checkpoint=args.resume)
    except DataError as exc:
        fail(exc)
    final = os.path.join(args.output_dir, "final")
    trainer.save_model(final)
    say(f"saved {final}: LoRA adapter, {TRAINED_PARAMS_FILE} and {PLAN_FILE}; merge with: python train.py --merge {final} --out MERGED_DIR")
    return 0


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
'''

TARGET = HfTarget
