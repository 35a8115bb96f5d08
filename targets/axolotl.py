"""Target axolotl: an axolotl 0.19 config.yml (+ the DeepSpeed JSON) that trains exactly the
Plan, or a refusal naming why.

axolotl decides what trains with a few keys, and mixspec writes only those whose outcome,
by axolotl's own rules (the ones `mixspec import --from axolotl` re-implements from its
source: compiler/importers/axolotl.py), is the Plan:

- LoRA: ``adapter: lora`` with ``lora_target_modules`` a regex PEFT full-matches against
  module names (exactly the Plan's targets), one rank/alpha/dropout/rslora/dora;
- full: no adapter, and where part of the model stays frozen ``unfrozen_parameters``
  (axolotl's LayerNamePattern: '.' is a literal dot unless followed by '+', matched from the
  start; each pattern ends with '$', so it names whole parameters).

Refused: more than one learning rate (axolotl's ``lr_groups`` take only parameters that decay,
``embedding_lr`` only embeddings), a fully trained part beside LoRA (a PEFT modules_to_save
copy), parameters held in fp32 while trained where axolotl updates them in bf16/fp16 (full
training without DeepSpeed), weight decay where axolotl's rule differs from the Plan's, a
quantized base and bitsandbytes optimizers (not checked against axolotl's own code).
"""

from __future__ import annotations

import posixpath
from typing import Optional

from ..planning.decay import transformers_rule_differs
from ..errors import Location, Unsupported
from ..models.names import compact_names, expand_names, natural_key
from ..planning.plan import Plan
from . import Target, TargetOptions
from ._common import exact_regex, generated_header, yaml_value
from ._quant import quant_refusals
from .deepspeed import deepspeed_config_text
from .llamafactory import _out_dir

AXOLOTL_VERSION = "0.19.0"
_HINT = "compile to --target hf (or swift), which express it exactly"


def _where(plan: Plan) -> Location:
    return Location(plan.spec_path)


def _unsupported(plan: Plan) -> list[Unsupported]:
    out: list[Unsupported] = []
    trainable = [c for c in plan.components if c.trainable_names]
    if not trainable:
        return [Unsupported("nothing-trainable", _where(plan), "a Plan that trains nothing",
                            "axolotl needs something to train", "give one component train: full or train: lora")]
    if not plan.data or not plan.data.train:
        out.append(Unsupported("no-data", _where(plan), "a run without training data",
                               "axolotl's config must name datasets", "add data: {train: path/to/train.jsonl}"))
    lrs = {c.lr for c in trainable}
    if len(lrs) > 1:
        for c in trainable:
            out.append(Unsupported(
                "per-component-lr", c.origin, f"component {c.name!r} at learning rate {c.lr!r}",
                "axolotl has one learning_rate; its lr_groups take only the parameters that decay (biases "
                "and norms stay at the base LR) and embedding_lr only embeddings", f"use one lr, or {_HINT}"))
    lora = [c for c in trainable if c.mode == "lora"]
    full = [c for c in trainable if c.mode == "full"]
    if lora and full:
        for c in full:
            out.append(Unsupported(
                "full-with-lora", c.origin, f"component {c.name!r} trained fully beside LoRA",
                "beside a LoRA adapter axolotl trains a module fully only as lora_modules_to_save: a PEFT copy "
                "(other parameter names, its weights held twice)", f"train it with LoRA too, or {_HINT}"))
    settings = {(c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora, c.lora.dora) for c in lora}
    if len(settings) > 1:
        out.append(Unsupported("lora-settings", lora[1].origin, "LoRA settings that differ between components",
                               "axolotl builds one LoRA adapter (one lora_r, lora_alpha, lora_dropout)",
                               f"give every LoRA component the same settings, or {_HINT}"))
    t = plan.training
    if full and t.precision != "fp32" and not plan.distributed.deepspeed:
        for c in full:
            out.append(Unsupported(
                "full-params-dtype", c.origin, f"component {c.name!r} trained fully in fp32",
                f"axolotl loads the model in {t.precision} and updates fully trained parameters there (no fp32 "
                "master weights without DeepSpeed); the Plan keeps fp32 masters for them",
                f"set distributed.zero_stage (DeepSpeed keeps fp32 masters), precision: fp32, or {_HINT}"))
    out += _decay(plan, trainable)
    out += quant_refusals(
        plan, "axolotl",
        "mixspec has not checked which modules axolotl's adapter: qlora / load_in_4bit leaves unquantized",
        "mixspec has not checked axolotl's bitsandbytes optimizers against the Plan's parameter groups")
    return out


def _decay(plan: Plan, trainable) -> list[Unsupported]:
    """axolotl's optimizer decays by transformers' rule and never decays embeddings."""
    out = []
    layernorm = frozenset(plan.layernorm_modules)
    for c in trainable:
        if not c.weight_decay:
            continue
        differ = transformers_rule_differs(c, layernorm)
        emb = [n for n in c.trainable_names if c.mode == "full" and ("embed_tokens" in n or "lm_head" in n)]
        if differ or emb:
            shown = ", ".join((differ + emb)[:3])
            out.append(Unsupported(
                "weight-decay-rule", c.origin, f"weight decay of component {c.name!r} on {shown}",
                "axolotl's optimizer chooses the parameters that decay by transformers' rule (torch LayerNorm "
                "modules, names with bias/norm) and never decays embeddings; the Plan decides by module type "
                "and shape", f"set weight_decay: 0, or {_HINT}"))
    return out


def unfrozen_patterns(names) -> list[str]:
    """LayerNamePattern strings matching exactly ``names``: one per compacted name, its index
    run as an alternation, '$' at the end (patterns match from the start only)."""
    out = []
    for template, indices in compact_names(sorted(names, key=natural_key)).items():
        if template.count("{}") == 1:
            ids = sorted({name[len(template.split("{}")[0]):].split(".")[0] for name in
                          expand_names({template: indices})}, key=int)
            alt = ids[0] if len(ids) == 1 else "(" + "|".join(ids) + ")"
            out.append(template.replace("{}", alt) + "$")
        else:
            out += [n + "$" for n in sorted(expand_names({template: indices}), key=natural_key)]
    return out


class AxolotlTarget(Target):
    name = "axolotl"
    description = f"axolotl {AXOLOTL_VERSION} config.yml"

    def unsupported(self, plan: Plan, options: TargetOptions) -> list[Unsupported]:
        return _unsupported(plan)

    def files(self, plan: Plan, options: TargetOptions) -> dict[str, str]:
        files: dict[str, str] = {}
        ds_name = None
        if plan.distributed.deepspeed:
            ds_name = f"ds_z{plan.distributed.zero_stage}_config.json"
            files[ds_name] = deepspeed_config_text(plan)
        out_dir = _out_dir(options)
        files["config.yml"] = _config(plan, options, ds_name and posixpath.join(out_dir, ds_name))
        return files


def _config(plan: Plan, options: TargetOptions, ds_path: Optional[str]) -> str:
    t = plan.training
    trainable = [c for c in plan.components if c.trainable_names]
    lora = [c for c in trainable if c.mode == "lora"]
    lines = generated_header(plan, "axolotl", extra=[
        f"For axolotl {AXOLOTL_VERSION}: axolotl train config.yml (run where the spec's paths are relative to).",
        "Do not edit: change the spec and compile again."]).splitlines()

    def key(k, v):
        lines.append(f"{k}: {yaml_value(v)}")

    def items(k, values):
        lines.append(f"{k}:")
        lines.extend(f"  - {yaml_value(v)}" for v in values)

    key("base_model", options.model_override or plan.model)
    if plan.trust_remote_code:
        key("trust_remote_code", True)
    if "vision" in plan.roles:  # axolotl's multimodal path (processor, no packing, raw columns)
        key("processor_type", "AutoProcessor")
        key("skip_prepare_dataset", True)
        key("remove_unused_columns", False)
        key("sample_packing", False)
    if lora:
        lo = lora[0].lora
        key("adapter", "lora")
        key("lora_r", lo.rank)
        key("lora_alpha", int(lo.alpha) if float(lo.alpha).is_integer() else lo.alpha)
        key("lora_dropout", float(lo.dropout))
        key("peft_use_rslora", bool(lo.rslora))
        key("peft_use_dora", bool(lo.dora))
        # a string: PEFT full-matches it against every module name
        key("lora_target_modules", exact_regex(sorted({m for c in lora for m in c.lora.targets}, key=natural_key)))
    else:
        trained = {n for c in trainable for n in c.trainable_names}
        everything = {p for c in plan.components for p in c.params} | set(plan.unassigned_params)
        if trained != everything:
            items("unfrozen_parameters", unfrozen_patterns(trained))
    lines.append("datasets:")
    lines.append(f"  - path: {yaml_value(plan.data.train)}")
    lines.append("    type: chat_template")
    key("sequence_len", t.max_length)
    key("micro_batch_size", t.micro_batch_size)
    key("gradient_accumulation_steps", t.gradient_accumulation)
    key("num_epochs", float(t.epochs))
    if t.max_steps:
        key("max_steps", t.max_steps)
    key("learning_rate", float(trainable[0].lr))
    key("weight_decay", float(trainable[0].weight_decay or 0.0))
    key("optimizer", "adamw_torch_fused")
    key("adam_beta1", float(t.adam_beta1))
    key("adam_beta2", float(t.adam_beta2))
    key("adam_epsilon", float(t.adam_epsilon))
    key("lr_scheduler", t.lr_scheduler)
    key("warmup_ratio", float(t.warmup_ratio))
    key("max_grad_norm", float(t.max_grad_norm))
    key("bf16", t.precision == "bf16")
    key("fp16", t.precision == "fp16")
    key("gradient_checkpointing", bool(t.gradient_checkpointing))
    key("seed", t.seed)
    key("logging_steps", t.logging_steps)
    key("save_steps", t.save_steps)
    key("output_dir", plan.output_dir or "./model-out")
    if ds_path:
        key("deepspeed", ds_path)
    return "\n".join(lines) + "\n"


TARGET = AxolotlTarget
