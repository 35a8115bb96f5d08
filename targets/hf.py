"""Target ``hf``: a standalone Hugging Face Trainer + PEFT script, ``launch.sh`` and, when
the spec asks for DeepSpeed, ``ds_config.json``.

``train.py`` imports torch, transformers and peft (PIL for image rows, datasets for hub
dataset ids, deepspeed when configured), never mixspec. Everything it needs from the Plan
is embedded as Python literals at its top: per-component trainable parameter names (in
a compact, exact form), learning rates, LoRA settings with exact target modules, counts,
and hashes. Before the first step it checks the model it loaded against them.

train.py and launch.sh are real files of the package, mixspec/programs/hf_train.py and
hf_launch.sh; this target fills their marked blocks (header, Plan; mixspec.programs inlines
the helpers), so only those differ between plans and a golden file diff shows exactly what a
spec change does. This module holds the decisions: what the Plan says in PEFT's terms, what
train.py cannot express (refused), and the data it embeds.
"""

from __future__ import annotations

import re

from .. import __version__, programs
from ..errors import Unsupported
from ..models.names import is_under, names_sha256
from ..planning.plan import Plan
from . import Target, TargetOptions
from ._common import (
    comment_text,
    compact_names,
    exact_regex,
    generated_header,
    json_text,
    py_assignments,
    sh_assignments,
)
from ._quant import quantization_data
from ._slurm import SBATCH_FILE, render_sbatch_sh, wants_sbatch
from .deepspeed import deepspeed_config_text, distributed_unsupported
from .fsdp import FSDP_FILE, describe as describe_fsdp, trainer_fsdp_config, unit_prefixes

_SAFE_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")


def _label(name: str) -> str:
    return name if _SAFE_LABEL.match(name) else comment_text(name)


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
        "plan_fingerprint": plan.fingerprint(),
        "optimizer_fingerprint": plan.optimizer_fingerprint(),
        "model": model_ref,
        "architecture": plan.architecture,
        "model_type": plan.model_type,
        "transformers_version": plan.versions.get("transformers", "unknown"),
        "multimodal": plan.multimodal,
        "roles": {r: list(p) for r, p in sorted(plan.roles.items())},
        "base_params": plan.totals.base_params,
        "base_names_sha256": names_sha256(base_names),
        "base_names": compact_names(base_names),
        "trainable_params": plan.totals.trainable_params,
        "trainable_names_sha256": names_sha256(trainable),
        "components": components,
        "lora": lora_settings(plan),
        **({"quantization": quantization_data(plan)} if plan.quantized else {}),
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


def quant_unsupported(plan: Plan) -> list[Unsupported]:
    """Quantized bases and bitsandbytes optimizers under DeepSpeed or FSDP2: not what train.py runs."""
    dist, out = plan.distributed, []
    if dist.fsdp and (plan.quantized or plan.training.optimizer != "adamw"):
        what = "quantize" if plan.quantized else f"training.optimizer {plan.training.optimizer}"
        out.append(Unsupported(
            "quantize-fsdp", None, f"{what} with distributed.fsdp: {dist.fsdp}",
            "FSDP2 shards parameters as DTensors; bitsandbytes' packed weights (uint8 quant_storage) and its "
            "optimizer's per-tensor states are not what train.py checks or mixspec estimates under FSDP2",
            "drop distributed.fsdp (plain DDP), or drop quantize / use optimizer: adamw"))
    if not dist.deepspeed:
        return out
    q = next((c for c in plan.components if c.quantize), None)
    if q is not None:
        why = ("ZeRO-3 partitions every parameter, and bitsandbytes' packed 4-bit/int8 weights with their "
               "quantization state are not partitioned by it (transformers needs a quant_storage equal to the "
               "weights' dtype and no k-bit fp32 upcast)" if dist.zero_stage == 3 else
               "mixspec's memory estimate and self-check for quantized bases are proven without DeepSpeed only")
        out.append(Unsupported("quantize-deepspeed", q.origin, f"quantize: {q.quantize.method} with DeepSpeed "
                               f"ZeRO-{dist.zero_stage}", why, "drop distributed.zero_stage (plain DDP), or drop quantize"))
    if plan.training.optimizer != "adamw":
        out.append(Unsupported(
            "optimizer-8bit-deepspeed", None, f"training.optimizer {plan.training.optimizer} with DeepSpeed",
            "DeepSpeed keeps its own fp32 master copy and partitions the optimizer's parameters; a bitsandbytes "
            "optimizer over them is not what mixspec estimates or checks", "use optimizer: adamw with DeepSpeed"))
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
        if plan.distributed.fsdp and not plan.units:
            out.append(Unsupported(
                "fsdp-no-units", None, f"distributed.fsdp: {plan.distributed.fsdp}",
                "no tower of this model has a stack of blocks to shard as FSDP units",
                "use zero_stage instead of fsdp"))
        out += quant_unsupported(plan)
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
        if plan.distributed.fsdp:
            out[FSDP_FILE] = json_text(trainer_fsdp_config(plan))
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

    from ..models.sources import read_config

    from ..errors import ModelSourceError

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
        if comp.quantize:
            extra += f"; base {comp.quantize.method} ({len(comp.quantize.modules)} Linear)"
        rows.append(f"  {_label(comp.name):<20} {comp.mode:<6} {lr:<12} {comp.trainable_params:>15,} trainable{extra}")
    if plan.unassigned_base_params:
        rows.append(f"  {'(unassigned)':<20} {'freeze':<6} {'':<12} {plan.unassigned_base_params:>15,} frozen")
    rows.append(f"  total: {plan.totals.trainable_params:,} trainable of {plan.totals.all_params:,} parameters")
    return rows


def render_train_py(plan: Plan, options: TargetOptions) -> str:
    """The text of train.py for a Plan: mixspec.programs' hf_train with its blocks filled."""
    header = generated_header(plan, "hf", extra=[
        "",
        "Components (the Plan; python train.py --check confirms it on the installed model):",
        *_summary_lines(plan),
    ])
    data = py_assignments({
        "PLAN": plan_data(plan, default_model_ref(plan, options)),
        "TRAINING": plan.training.to_json(),
        "DATA": plan.data.to_json() if plan.data else None,
        "OUTPUT_DIR": plan.output_dir or "output",
        "DISTRIBUTED": plan.distributed.to_json(),
        "DEEPSPEED_CONFIG": "ds_config.json" if plan.distributed.deepspeed else None,
        "FSDP_CONFIG": FSDP_FILE if plan.distributed.fsdp else None,
        "FSDP_UNITS": fsdp_units(plan),
    })
    return programs.render("hf_train", {"header": header, "plan": data})


def fsdp_units(plan: Plan) -> dict | None:
    """The block modules train.py checks are FSDP units after preparation (compact names)."""
    if not plan.distributed.fsdp:
        return None
    return compact_names([f"{prefix}.{i}" for prefix, indices in unit_prefixes(plan).items() for i in indices])


def render_launch_sh(plan: Plan) -> str:
    """launch.sh (torchrun by default, deepspeed or accelerate; single- or multi-node):
    mixspec.programs' hf_launch with its blocks filled."""
    dist = plan.distributed
    nodes, gpus = dist.nodes, dist.gpus_per_node
    setup = ", no DeepSpeed"
    if dist.deepspeed:
        setup = f", DeepSpeed ZeRO-{dist.zero_stage}" + (f", offload {dist.offload}" if dist.offload != "none" else "")
    elif dist.fsdp:
        setup = ", " + describe_fsdp(plan)
    header = generated_header(plan, "hf", extra=["", f"Planned for {nodes} node(s) x {gpus} GPU(s){setup}."])
    data = sh_assignments({"PLANNED_NNODES": nodes, "PLANNED_GPUS_PER_NODE": gpus})
    return programs.render("hf_launch", {"header": header, "plan": data})


TARGET = HfTarget
