"""ms-swift target: a ``train.sh`` with the ``swift sft`` command for a Plan, exactly or not at all.

ms-swift's flags can say some Plans exactly: full training with freeze flags or a trainable
regex; LoRA with an exact ``--target_regex``; LoRA on the whole LLM next to a fully trained
ViT and aligner (``--tuner_type lora_llm``); one learning rate, or one per swift group
(ViT, aligner, LLM) through ``--vit_lr``/``--aligner_lr``. What the flags cannot say exactly
(LoRA dropout under lora_llm, a full lm_head next to LoRA, two learning rates inside the ViT,
...) goes into a generated ``--external_plugins`` file: a tuner registered for swift and an
optimizer with the Plan's groups, both checking the Plan at start. With ``--no-plugin`` the
target refuses instead, naming each part, where the spec says it, and why.

Facts about ms-swift used here are in research/ms-swift.md; each rule below names the swift
code it mirrors. Everything is decided from the Plan alone.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

from .. import programs
from ..planning.decay import transformers_rule_differs
from ..errors import Location, Unsupported, UnsupportedError
from ..models.names import is_under
from ..planning.plan import ComponentPlan, Plan
from . import Target, TargetOptions
from ._common import (comment_line, compact_names, exact_regex, generated_header, json_text,
                      py_assignments, sh_assignments, sh_word)
from ._quant import TORCH_DTYPES, backend_quantizes_exactly, kbit_warnings
from ._slurm import SBATCH_FILE, render_sbatch_sh, wants_sbatch
from .deepspeed import deepspeed_config
from .fsdp import FSDP_FILE, describe as describe_fsdp, trainer_fsdp_config
from ..planning.units import wrap_classes

PLUGIN_FILE = "mixspec_plugin.py"
DEEPSPEED_FILE = "deepspeed.json"
PLUGIN_NAME = "mixspec"  # the --tuner_type / --optimizer name the plugin registers
FULL_PARAMS_FILE = "full_params.safetensors"  # what the plugin saves beside the LoRA adapter


@dataclass(frozen=True)
class SwiftModel:
    """How ms-swift 4.x knows a model family: its model_type, template and the module
    prefixes of ``MultiModelKeys`` (swift/model/model_arch.py, transformers >= 4.52 names)."""

    model_type: str
    template: str
    language_model: tuple[str, ...] = ()
    vision_tower: tuple[str, ...] = ()
    aligner: tuple[str, ...] = ()
    # swift's own flag paths (FLAG_PATHS) that a test has run end to end on this family with
    # the real ms-swift; every other Plan for the family goes through the plugin
    proven: frozenset = frozenset()

    @property
    def multimodal(self) -> bool:
        return bool(self.vision_tower)


_QWEN_VL = (("model.language_model", "lm_head"), ("model.visual",), ("model.visual.merger",))
_LLAVA_HF = (("model.language_model", "lm_head"), ("model.vision_tower",), ("model.multi_modal_projector",))

# swift's own ways to say a Plan, besides the plugin (--tuner_type/--optimizer mixspec):
FLAG_PATHS = {
    "full": "--tuner_type full (+ --freeze_llm/vit/aligner or --trainable_parameters_regex)",
    "lora": "--tuner_type lora --target_regex",
    "lora_llm": "--tuner_type lora_llm (+ --vit_lr/--aligner_lr)",
    "multimodal_lr": "--vit_lr/--aligner_lr (swift's multimodal optimizer)",
}
_ALL_PATHS = frozenset(FLAG_PATHS)
_LORA_LLM = frozenset({"lora_llm"})  # lora_llm (with its --vit_lr/--aligner_lr) run on the family

# Hugging Face config model_type -> ms-swift model, and the flag paths proven on it: the one
# table of families x paths. tests/e2e/test_swift_e2e.py runs, with the real ms-swift, the
# plugin on every family here and each proven path on its family; test_swift_model_table_*
# checks model_type, template and prefixes against swift's registry. A path swift has not
# been seen to run on a family is not trusted from the registry alone (lora_llm reads the
# ViT/aligner prefixes as attributes of the PEFT-wrapped model, and on Idefics3 one of them
# resolves to nothing). Text-only families are left out: their swift model_type and
# template depend on the checkpoint (Qwen2 vs Qwen2.5), not on config.json.
SWIFT_MODELS: dict[str, SwiftModel] = {
    "qwen2_vl": SwiftModel("qwen2_vl", "qwen2_vl", *_QWEN_VL, proven=_LORA_LLM),
    "qwen2_5_vl": SwiftModel("qwen2_5_vl", "qwen2_5_vl", *_QWEN_VL, proven=_ALL_PATHS),
    "qwen3_vl": SwiftModel("qwen3_vl", "qwen3_vl", ("model.language_model", "lm_head"), ("model.visual",),
                           ("model.visual.merger", "model.visual.deepstack_merger_list"), proven=_LORA_LLM),
    "gemma3": SwiftModel("gemma3_vision", "gemma3_vision", *_LLAVA_HF, proven=_LORA_LLM),
    "paligemma": SwiftModel("paligemma", "paligemma", *_LLAVA_HF, proven=_LORA_LLM),
    "llava": SwiftModel("llava1_5_hf", "llava1_5_hf", *_LLAVA_HF, proven=_LORA_LLM),
    "llava_onevision": SwiftModel("llava_onevision_hf", "llava_onevision_hf", *_LLAVA_HF),
    "mllama": SwiftModel("llama3_2_vision", "llama3_2_vision", ("model.language_model", "lm_head"),
                         ("model.vision_model",), ("model.multi_modal_projector",), proven=_LORA_LLM),
    "idefics3": SwiftModel("idefics3", "idefics3", ("model.text_model",), ("model.vision_model",),
                           ("model.connector",)),
    # the Hugging Face-native InternVL (OpenGVLab/InternVL3*-hf); swift's remote-code
    # InternVL is internvl_chat, which mixspec does not plan (auto_map)
    "internvl": SwiftModel("internvl", "internvl_hf", *_LLAVA_HF),
}


def families_table() -> str:
    """The families x paths table, as the README shows it (a test keeps the two equal)."""
    head = ["config model_type", "swift --model_type / --template", "plugin", *FLAG_PATHS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for hf_type, sw in sorted(SWIFT_MODELS.items()):
        cells = [f"`{hf_type}`", f"`{sw.model_type}` / `{sw.template}`", "yes"]
        cells += ["yes" if p in sw.proven else "plugin" for p in FLAG_PATHS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def proven(model_type: str, path: str) -> bool:
    """Whether swift's flag path has been run end to end on this family (text models: the
    flags do not depend on a family's module layout)."""
    sw = SWIFT_MODELS.get(model_type)
    return sw is None or not sw.multimodal or path in sw.proven


# swift's built-in DeepSpeed configs (swift/config/<name>.json): (stage, offload) -> name
_DS_BUILTIN = {
    (0, "none"): "zero0", (1, "none"): "zero1", (2, "none"): "zero2", (3, "none"): "zero3",
    (2, "optimizer"): "zero2_offload", (3, "all"): "zero3_offload",
}

_PRECISION = {  # spec precision -> (--torch_dtype, --bf16, --fp16); swift turns fp16 on for float32
    "bf16": ("bfloat16", True, False),
    "fp16": ("float16", False, True),
    "fp32": ("float32", False, False),
}

_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant",
               "constant_with_warmup": "constant_with_warmup"}

# names find_all_linears skips inside the LLM (swift/utils/transformers_utils.py)
_LORA_LLM_SKIPPED = ("lm_head", "score", "v_head", "classifier")


def sh_quote(value) -> str:
    """One shell word that the shell reads back as exactly the value's text."""
    return sh_word(_fmt(value))


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


# -- exact regular expressions over names ---------------------------------------------------
def anchored_regex(selected, universe, suffix: str = "") -> str:
    """``^(?:...)suffix$`` matching every name in ``selected`` and nothing else in ``universe``
    (``suffix`` ``(?:\\..+)?`` takes every name under a module); checked, with a plain
    alternation of the names as the fallback."""
    selected = sorted(set(selected))
    body = exact_regex(selected)
    if _matches(f"^(?:{body})$", set(universe) | set(selected)) != set(selected):
        body = "|".join(re.escape(n) for n in selected)
    return f"^(?:{body}){suffix}$"


def _matches(rx: str, names) -> set:
    pat = re.compile(rx)
    return {n for n in names if pat.fullmatch(n)}


# -- the decision ----------------------------------------------------------------------------
@dataclass
class Decision:
    """How the Plan is expressed for swift: flags, or the plugin, and why."""

    tuner: str = "full"  # full | lora | lora_llm | plugin
    lr_mode: str = "single"  # single | multimodal | plugin
    flags: list = field(default_factory=list)  # (flag, value) pairs for tuner and LRs
    hard: list = field(default_factory=list)  # Unsupported even with the plugin
    plugin_reasons: list = field(default_factory=list)  # Unsupported without the plugin
    notes: list = field(default_factory=list)  # comment lines for train.sh
    approx_flags: Optional[list] = None  # flags for --approximate --no-plugin, when every reason allows

    @property
    def plugin(self) -> bool:
        return bool(self.plugin_reasons)


def _starts(name: str, prefixes) -> bool:
    """swift's own prefix test: plain ``str.startswith`` (no dot boundary)."""
    return any(name.startswith(p) for p in prefixes)


class _View:
    """What the swift target reads from a Plan, precomputed."""

    def __init__(self, plan: Plan, options: TargetOptions):
        self.plan = plan
        self.options = options
        self.swift = SWIFT_MODELS.get(plan.model_type)
        self.all_params = sorted({p for c in plan.components for p in c.params} | set(plan.unassigned_params))
        self.modules = sorted({".".join(p.split(".")[:i]) for p in self.all_params
                               for i in range(1, p.count(".") + 1)})
        self.trainable: dict[str, ComponentPlan] = {}
        for comp in plan.components:
            for name in comp.trainable_names:
                self.trainable[name] = comp
        self.lora = [c for c in plan.components if c.mode == "lora" and c.lora]
        self.full = [c for c in plan.components if c.mode == "full" and c.params]
        self.active = [c for c in plan.components if c.trainable_names]
        self.owner = {p: c for c in plan.components for p in c.params}
        self.layernorm = frozenset(plan.layernorm_modules)

    def role_names(self, role: str) -> set[str]:
        prefixes = self.plan.roles.get(role, ())
        return {p for p in self.all_params if is_under(p, prefixes)}


def _u(code: str, comp: Optional[ComponentPlan], what: str, why: str, hint: str = "",
       origin: Optional[Location] = None, approximable: bool = False) -> Unsupported:
    """``approximable``: swift's flags still run and differ only in this (--approximate
    --no-plugin writes it as a comment); otherwise no flags approximate it."""
    return Unsupported(code, origin or (comp.origin if comp else None), what, why, hint, approximable)


_PLUGIN_HINT = "without --no-plugin, mixspec writes a swift plugin (--external_plugins) that does this exactly"


def decide(plan: Plan, options: TargetOptions) -> Decision:
    """Choose the swift flags for a Plan, or the plugin, collecting every reason."""
    view = _View(plan, options)
    d = Decision()
    if not (plan.data and plan.data.train):
        d.hard.append(_u("no-data", None, "a run without training data",
                         "swift sft needs a training dataset (--dataset)",
                         "add data: {train: data/train.jsonl} (a jsonl file or a dataset id) to the spec",
                         origin=Location(plan.spec_path)))
    _check_model(view, d)
    _check_lora_settings(view, d)
    if not view.active:
        d.hard.append(_u("nothing-trained", None, "this plan", "no component trains any parameter",
                         "give at least one component train: full or lora",
                         origin=Location(plan.spec_path)))
        return d
    if view.lora and view.full:
        blockers = _lora_llm_blockers(view)
        if not blockers and not proven(plan.model_type, "lora_llm"):
            blockers.append(_unproven(view, "lora_llm"))
        blockers += _precision_blockers(view, "lora_llm")
        if not blockers:
            d.tuner = "lora_llm"
            _lora_llm_flags(view, d)
            return d
        d.plugin_reasons.extend(blockers)
        d.tuner = "plugin"
        d.lr_mode = "plugin"
        if all(b.approximable for b in blockers):
            approx = Decision()
            _lora_llm_flags(view, approx)
            d.approx_flags = approx.flags
        return d
    path = "lora" if view.lora else "full"
    if not proven(plan.model_type, path):
        d.plugin_reasons.append(_unproven(view, path))
        d.tuner = "plugin"
        d.lr_mode = "plugin"
        return d
    d.tuner = path
    if view.lora:
        _lora_flags(view, d)
    else:
        _full_flags(view, d)
    _lr_flags(view, d)
    dtype_reasons = _precision_blockers(view, path)
    if dtype_reasons:  # swift's tuner would train the full parts in the wrong dtype: the plugin's does not
        if not d.plugin_reasons:
            d.approx_flags = list(d.flags)
        elif not all(r.approximable for r in d.plugin_reasons):
            d.approx_flags = None
        d.plugin_reasons.extend(dtype_reasons)
        d.tuner = "plugin"
        d.lr_mode = "plugin"
    return d


def swift_full_params_dtype(tuner: str, precision: str) -> tuple[str, str]:
    """The dtype swift's flags hold and update fully trained parameters in, for a tuner
    (full, lora, lora_llm) and a training precision, and why (ms-swift 4.6.0,
    TunerMixin.prepare_model in swift/pipelines/train/tuner.py): swift loads the whole model in
    --torch_dtype; its ``full`` branch casts nothing, adapter tuners cast trainable parameters to
    fp32 only when they are fp16 ("fix bug: Attempting to unscale FP16 gradients")."""
    if precision == "fp32":
        return "fp32", "--torch_dtype float32"
    if tuner != "full" and precision == "fp16":
        return "fp32", "swift casts fp16 trainable parameters of adapter tuners up"
    return precision, "the full tuner casts nothing" if tuner == "full" else "swift casts only fp16 trainable parameters up"


def _precision_blockers(view: _View, path: str) -> list[Unsupported]:
    """Where swift's flag path would hold fully trained parameters in another dtype than the
    Plan's (``trained_dtype``: fp32 master weights, frozen parameters in the training precision).

    swift's rule is ``swift_full_params_dtype``; LoRA weights are fp32 anyway (PEFT's
    autocast_adapter_dtype, kept since swift passes no lora_dtype). So in bf16 both full and
    lora_llm train full parameters in bf16, in fp16 the full tuner trains them in fp16, and
    ``--torch_dtype float32`` would hold the frozen parameters in fp32 (not the Plan's frozen
    dtype, nor its memory). One item per fully trained component."""
    t = view.plan.training
    held, casts = swift_full_params_dtype(path, t.precision)
    if held == t.trained_dtype:
        return []
    dtype = _PRECISION[t.precision][0]
    why = (f"--tuner_type {path} loads the model with --torch_dtype {dtype} and trains full parameters in "
           f"{t.precision} ({casts}), where the Plan holds them in {t.trained_dtype} (master weights; frozen "
           f"ones in {t.precision}), so updates below {t.precision}'s resolution would be lost; "
           f"--torch_dtype float32 would hold the frozen parameters in fp32 instead")
    return [_u("full-params-dtype", comp, f"components.{comp.name} trained fully in {t.trained_dtype}", why,
               _PLUGIN_HINT + " (it holds trained parameters in fp32); or set training.precision: "
               + ("fp32 or fp16" if path == "lora_llm" else "fp32"),
               approximable=True)
            for comp in view.full if comp.trainable_names]


def _unproven(view: _View, path: str) -> Unsupported:
    """The Plan fits one of swift's flag paths, but no test has run that path on this family."""
    return _u(f"unproven-{path}", None, f"{FLAG_PATHS[path]} on model_type {view.plan.model_type!r}",
              "mixspec uses a swift flag path only on families where a test has run it end to end with "
              "the real ms-swift, and this one has not been (see the families x paths table in the README)",
              _PLUGIN_HINT, origin=Location(view.plan.spec_path))


def _check_model(view: _View, d: Decision) -> None:
    plan = view.plan
    if plan.model_source == "local" and not view.options.model_override and view.swift is None:
        d.hard.append(_u(
            "swift-model-type", None, f"the local model directory {plan.model_path}",
            f"ms-swift needs --model_type and --template for a local directory, and mixspec knows "
            f"no ms-swift model type for model_type {plan.model_type!r} (the template depends on "
            f"the checkpoint, not on config.json)",
            "name the model by its hub id in the spec (model: ORG/NAME), or compile for another target",
            origin=Location(plan.spec_path)))


def _check_lora_settings(view: _View, d: Decision) -> None:
    if len(view.lora) < 2:
        return
    first = view.lora[0]
    key = _lora_key(first)
    for comp in view.lora[1:]:
        if _lora_key(comp) != key:
            d.hard.append(_u(
                "lora-settings-differ", comp, f"components.{comp.name}.lora",
                f"its LoRA settings (rank, alpha, dropout, rslora, dora) differ from those of "
                f"component {first.name!r}; swift and mixspec's swift plugin build one PEFT adapter",
                "give the LoRA components the same rank, alpha, dropout, rslora and dora"))


def _lora_key(comp: ComponentPlan):
    lo = comp.lora
    return (lo.rank, lo.alpha, lo.dropout, lo.rslora, lo.dora)


# -- lora_llm ---------------------------------------------------------------------------------
def _lora_llm_blockers(view: _View) -> list[Unsupported]:
    """Every way the Plan differs from what ``--tuner_type lora_llm`` does
    (swift/tuner_plugin/lora_llm.py): LoRA (rank, alpha; PEFT defaults for the rest) on every
    Linear of the LLM but lm_head, the whole ViT and aligner fully trained, nothing else."""
    out: list[Unsupported] = []
    sw = view.swift
    first_lora = view.lora[0]
    if view.options.swift_version == 3:
        out.append(_u("swift3-no-lora_llm", first_lora, "LoRA on the LLM next to a fully trained ViT/aligner",
                      "ms-swift 3.x has no lora_llm tuner (it came with 4.0)", _PLUGIN_HINT))
    if sw is None or not sw.multimodal:
        for comp in view.full:
            out.append(_u("lora-and-full", comp, f"components.{comp.name} (full) next to LoRA",
                          "swift's flags train a whole module next to LoRA only through lora_llm (ViT and "
                          "aligner of a multimodal model mixspec maps to swift) or --modules_to_save, which "
                          "mixspec does not use: PEFT trains a copy of the module (its parameters renamed, "
                          f"{comp.base_params:,} more in memory)", _PLUGIN_HINT))
        return out
    vit_aligner = {p for p in view.all_params if is_under(p, sw.vision_tower + sw.aligner)}
    skip = view.role_names("lm_head") | view.role_names("embeddings")
    llm_body = {p for p in view.all_params
                if is_under(p, sw.language_model) and p not in skip}
    lora_claimed = {p for c in view.lora for p in c.params}
    full_names = {p for c in view.full for p in c.params}

    for comp in view.lora:
        out.extend(_lora_llm_lora_blockers(comp, sw))
    not_lora = sorted(llm_body - lora_claimed)
    if not_lora:
        for comp, names in _by_owner(view, not_lora):
            label = f"components.{comp.name} ({comp.mode})" if comp else "unassigned parameters"
            out.append(_u("lora_llm-llm-not-lora", comp,
                          f"{label} in the LLM: {_few(names)}",
                          f"lora_llm puts LoRA on every Linear of the LLM ({', '.join(sw.language_model[:1])}); "
                          f"these {len(names)} parameters are not in a LoRA component",
                          _PLUGIN_HINT, origin=None if comp else Location(view.plan.spec_path)))
    not_full = sorted(vit_aligner - full_names)
    if not_full:
        for comp, names in _by_owner(view, not_full):
            label = f"components.{comp.name} ({comp.mode})" if comp else "unassigned parameters"
            out.append(_u("lora_llm-vit-not-full", comp, f"{label} in the ViT/aligner: {_few(names)}",
                          f"next to LoRA, swift's flags train full parts only with lora_llm, which trains the "
                          f"whole ViT and aligner ({', '.join(sw.vision_tower + sw.aligner)}) fully, but the spec "
                          f"does not train these {len(names)} parameters fully",
                          _PLUGIN_HINT, origin=None if comp else Location(view.plan.spec_path)))
    for comp in view.full:
        extra = sorted(p for p in comp.params if p not in vit_aligner)
        if extra:
            out.append(_u("lora_llm-full-outside-vit", comp, f"components.{comp.name} (full) on {_few(extra)}",
                          "next to LoRA, swift's flags train full parts only with lora_llm, which trains "
                          "fully only the ViT and the aligner", _PLUGIN_HINT))
    out.extend(_group_lr_blockers(view, strict_outside=False))
    out.extend(_weight_decay_blockers(view))
    return out


def _lora_llm_lora_blockers(comp, sw) -> list[Unsupported]:
    """One LoRA component -> how its settings differ from lora_llm's (every Linear of the LLM,
    all blocks, PEFT's defaults for dropout, rslora and dora)."""
    out: list[Unsupported] = []
    lo = comp.lora
    what = f"components.{comp.name}.lora"
    if lo.targets_spec != "all-linear":
        out.append(_u("lora_llm-targets", comp, f"{what}.targets {lo.targets_spec!r}",
                      "lora_llm puts LoRA on every Linear of the LLM (targets: all-linear)", _PLUGIN_HINT))
    if lo.layers is not None:
        out.append(_u("lora_llm-layers", comp, f"{what}.layers",
                      "lora_llm puts LoRA on every block of the LLM", _PLUGIN_HINT))
    if lo.dropout != 0:
        out.append(_u("lora_llm-dropout", comp, f"{what}.dropout {lo.dropout!r}",
                      "lora_llm ignores --lora_dropout (PEFT's default 0 is used)",
                      _PLUGIN_HINT + "; or set dropout: 0 to use --tuner_type lora_llm", approximable=True))
    if lo.rslora:
        out.append(_u("lora_llm-rslora", comp, f"{what}.rslora", "lora_llm ignores --use_rslora", _PLUGIN_HINT,
                      approximable=True))
    if lo.dora:
        out.append(_u("lora_llm-dora", comp, f"{what}.dora", "lora_llm ignores --use_dora", _PLUGIN_HINT,
                      approximable=True))
    outside = [t for t in lo.targets if not is_under(t, sw.language_model)]
    if outside:
        out.append(_u("lora_llm-outside-llm", comp, f"{what} on {_few(outside)}",
                      "lora_llm puts LoRA only on the LLM", _PLUGIN_HINT))
    skipped = [t for t in lo.targets if any(s in t for s in _LORA_LLM_SKIPPED)]
    if skipped:
        out.append(_u("lora_llm-skipped-names", comp, f"{what} on {_few(skipped)}",
                      "lora_llm skips Linear modules whose names contain " + "/".join(_LORA_LLM_SKIPPED),
                      _PLUGIN_HINT))
    return out


def _by_owner(view: _View, names: list[str]):
    groups: dict[str, list[str]] = defaultdict(list)
    comps: dict[str, Optional[ComponentPlan]] = {}
    for n in names:
        comp = view.owner.get(n)
        key = comp.name if comp else ""
        groups[key].append(n)
        comps[key] = comp
    order = {c.name: i for i, c in enumerate(view.plan.components)}
    for key in sorted(groups, key=lambda k: order.get(k, len(order))):
        yield comps[key], groups[key]


def _few(names, n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _lora_llm_flags(view: _View, d: Decision) -> None:
    lo = view.lora[0].lora
    groups = _swift_groups(view)
    lr = {g: _group_lr(view, names) for g, names in groups.items() if names}
    llm_lr = lr.get("llm")
    d.flags += [("tuner_type", "lora_llm"), ("lora_rank", lo.rank), ("lora_alpha", lo.alpha),
                ("learning_rate", llm_lr), ("vit_lr", lr.get("vit", llm_lr)),
                ("aligner_lr", lr.get("aligner", llm_lr))]
    d.lr_mode = "multimodal"
    d.notes.append("--tuner_type lora_llm: LoRA (rank, alpha) on every Linear of the LLM, the whole ViT "
                   "and aligner trained fully; --vit_lr/--aligner_lr switch on swift's multimodal optimizer.")


# -- flags for plain full / LoRA training ---------------------------------------------------------
def _full_flags(view: _View, d: Decision) -> None:
    """Full tuner: swift makes every parameter trainable, then freezes ``freeze_parameters``
    prefixes (multimodal: freeze_llm/vit/aligner add theirs, and freeze_aligner false adds the
    aligner to ``trainable_parameters``), then unfreezes ``trainable_parameters`` (the
    ``full`` branch of TunerMixin.prepare_model). Simulated on the Plan's names."""
    target = set(view.trainable)
    names = view.all_params
    sw = view.swift
    d.flags.append(("tuner_type", "full"))
    if sw is not None and sw.multimodal:
        for fl, fv, fa in itertools.product((True, False), repeat=3):
            freeze = (sw.language_model if fl else ()) + (sw.vision_tower if fv else ()) + (sw.aligner if fa else ())
            unfreeze = sw.aligner if not fa else ()
            got = {n for n in names if not _starts(n, freeze) or _starts(n, unfreeze)}
            if got == target:
                d.flags += [("freeze_llm", fl), ("freeze_vit", fv), ("freeze_aligner", fa)]
                return
        d.flags += [("freeze_llm", True), ("freeze_vit", True), ("freeze_aligner", True)]
    elif target == set(names):
        return
    covering = sorted({m for c in view.full for m in c.modules})
    rx = anchored_regex(covering, view.modules + names, suffix=r"(?:\..+)?")
    if _matches(rx, names) != target:  # a parameter claimed on its own: list parameters instead
        rx = anchored_regex(sorted(target), names)
    d.flags += [("freeze_parameters_ratio", 1), ("trainable_parameters_regex", rx)]


def _lora_flags(view: _View, d: Decision) -> None:
    lo = view.lora[0].lora
    targets = sorted({t for c in view.lora for t in c.lora.targets})
    rx = anchored_regex(targets, view.modules)
    d.flags += [("tuner_type", "lora"), ("target_regex", rx), ("lora_rank", lo.rank),
                ("lora_alpha", lo.alpha), ("lora_dropout", lo.dropout), ("use_rslora", lo.rslora),
                ("use_dora", lo.dora)]


# -- learning rates and weight decay --------------------------------------------------------------
def swift_group(name: str, sw: SwiftModel) -> str:
    """The group swift's multimodal optimizer puts a parameter (or module) name in
    (swift/optimizers/multimodal.py, plain ``startswith`` prefixes): "aligner", "vit"
    (vision_tower minus aligner), "llm" (language_model), or "other"."""
    if _starts(name, sw.aligner):
        return "aligner"
    if _starts(name, sw.vision_tower):
        return "vit"
    if _starts(name, sw.language_model):
        return "llm"
    return "other"


def _swift_groups(view: _View) -> dict[str, list[str]]:
    """Trainable names by the group swift's multimodal optimizer puts them in."""
    groups: dict[str, list[str]] = {"vit": [], "aligner": [], "llm": [], "other": []}
    for name in sorted(view.trainable):
        groups[swift_group(name, view.swift)].append(name)
    return groups


def _group_lr(view: _View, names: list[str]) -> float:
    """The LR of a swift group: that of its first component in spec order."""
    return _comps_of(view, names)[0].lr


def _group_lr_blockers(view: _View, strict_outside: bool) -> list[Unsupported]:
    out = []
    labels = {"vit": "ViT (--vit_lr)", "aligner": "aligner (--aligner_lr)", "llm": "LLM (--learning_rate)"}
    groups = _swift_groups(view)
    for group in ("vit", "aligner", "llm"):
        comps = _comps_of(view, groups[group])
        if len({c.lr for c in comps}) > 1:
            first = comps[0]
            for comp in comps[1:]:
                if comp.lr != first.lr:
                    out.append(_u("lr-within-group", comp, f"components.{comp.name}.lr {comp.lr!r}",
                                  f"swift's multimodal optimizer gives its {labels[group]} group one learning "
                                  f"rate, and component {first.name!r} in the same group has {first.lr!r}",
                                  _PLUGIN_HINT, approximable=True))
    if strict_outside and groups["other"]:
        for comp in _comps_of(view, groups["other"]):
            names = [n for n in groups["other"] if view.trainable[n] is comp]
            out.append(_u("lr-outside-groups", comp, f"components.{comp.name} ({_few(names)})",
                          "with --vit_lr/--aligner_lr, swift's multimodal optimizer groups parameters by its "
                          "ViT/aligner/LLM prefixes, and before ms-swift 4.6 gives a trainable parameter "
                          "outside them no update at all", _PLUGIN_HINT))
    return out


def _comps_of(view: _View, names) -> list[ComponentPlan]:
    seen: dict[str, ComponentPlan] = {}
    for n in names:
        comp = view.trainable[n]
        seen.setdefault(comp.name, comp)
    order = {c.name: i for i, c in enumerate(view.plan.components)}
    return sorted(seen.values(), key=lambda c: order[c.name])


def _weight_decay_blockers(view: _View) -> list[Unsupported]:
    """Where swift's flags cannot give each trained parameter the Plan's weight decay: one
    --weight_decay for all, and transformers' rule for which parameters decay (swift's
    default and multimodal optimizers use Trainer.get_decay_parameter_names)."""
    out = []
    first = view.active[0]
    for comp in view.active[1:]:
        if comp.weight_decay != first.weight_decay:
            out.append(_u("weight-decay", comp, f"components.{comp.name}.weight_decay {comp.weight_decay!r}",
                          f"swift's flags give one --weight_decay, and component {first.name!r} has "
                          f"{first.weight_decay!r}", _PLUGIN_HINT, approximable=True))
    for comp in view.active:
        differ = transformers_rule_differs(comp, view.layernorm)
        if differ:
            out.append(_u("weight-decay-rule", comp, f"weight decay of components.{comp.name} on {_few(differ)}",
                          f"swift's optimizer decides which parameters decay by transformers' rule "
                          f"(torch LayerNorm modules, names with bias/norm), which differs from the Plan's "
                          f"(biases, norm modules by type, 1-D parameters) on {len(differ)} of its parameters",
                          _PLUGIN_HINT, approximable=True))
    return out


def _lr_flags(view: _View, d: Decision) -> None:
    reasons = _weight_decay_blockers(view)
    lrs = sorted({c.lr for c in view.active})
    flags: list = []
    if len(lrs) == 1:
        flags.append(("learning_rate", lrs[0]))
        mode = "single"
    elif view.swift is None or not view.swift.multimodal:
        first = view.active[0]
        for comp in view.active[1:]:
            if comp.lr != first.lr:
                reasons.append(_u("lr-text-model", comp, f"components.{comp.name}.lr {comp.lr!r}",
                                  f"swift's flags give this model one --learning_rate, and component "
                                  f"{first.name!r} has {first.lr!r}", _PLUGIN_HINT, approximable=True))
        flags.append(("learning_rate", first.lr))
        mode = "single"
    else:
        reasons.extend(_group_lr_blockers(view, strict_outside=True))
        if not proven(view.plan.model_type, "multimodal_lr"):
            reasons.append(_unproven(view, "multimodal_lr"))
        groups = _swift_groups(view)
        lr = {g: _group_lr(view, names) for g, names in groups.items() if names and g != "other"}
        base = lr.get("llm", lr.get("aligner", lr.get("vit")))
        flags += [("learning_rate", base), ("vit_lr", lr.get("vit", base)),
                  ("aligner_lr", lr.get("aligner", base))]
        mode = "multimodal"
    if reasons:
        d.plugin_reasons.extend(reasons)
        d.lr_mode = "plugin"
        if all(r.approximable for r in reasons):
            d.approx_flags = d.flags + flags
        return
    d.flags += flags
    d.lr_mode = mode
    if mode == "multimodal":
        d.notes.append("--vit_lr/--aligner_lr switch on swift's multimodal optimizer: one LR each for the "
                       "ViT, the aligner and the LLM (--learning_rate).")


# -- DeepSpeed -----------------------------------------------------------------------------------
def _deepspeed(plan: Plan, d: Decision) -> tuple[Optional[str], Optional[dict]]:
    """The --deepspeed value: a swift built-in name, or a generated JSON (no optimizer block:
    one would replace the optimizer and its per-component groups)."""
    stage, offload = plan.distributed.zero_stage, plan.distributed.offload
    if stage is None:
        if offload != "none" and not plan.distributed.fsdp:  # FSDP2 offloads itself (the --fsdp JSON)
            d.hard.append(_u("deepspeed-offload", None, f"distributed.offload {offload!r}",
                             "CPU offload needs DeepSpeed: set distributed.zero_stage",
                             origin=Location(plan.spec_path)))
        return None, None
    if (stage, offload) in _DS_BUILTIN:
        return _DS_BUILTIN[(stage, offload)], None
    if offload == "optimizer" and stage in (1, 3):
        return None, deepspeed_config(plan)
    d.hard.append(_u("deepspeed-offload", None, f"distributed: zero_stage {stage} with offload {offload!r}",
                     "DeepSpeed offloads parameters only with ZeRO-3, and the optimizer only with ZeRO >= 1",
                     origin=Location(plan.spec_path)))
    return None, None


# -- FSDP2 ---------------------------------------------------------------------------------------
def swift_fsdp_json(plan: Plan) -> dict:
    """ms-swift's --fsdp JSON (swift/arguments/sft_args.py _init_fsdp, 4.6): ``fsdp`` is the
    Trainer's legacy option string, ``fsdp_config`` the Trainer's fsdp_config. The config is the
    hf target's (mixspec.targets.fsdp: version 2, the blocks of every tower as units, the full
    state dict at save time); its ``reshard_after_forward`` and ``cpu_offload`` win over the
    string (transformers only setdefaults them from it). ``fsdp_version`` is the key swift reads
    (for FSDP_VERSION); transformers strips the prefix to the same ``version``."""
    config = trainer_fsdp_config(plan)
    config = {"fsdp_version": config.pop("version"), **config}
    words = [plan.distributed.fsdp, "auto_wrap"] + (["offload"] if plan.distributed.offload == "all" else [])
    return {"fsdp": " ".join(words), "fsdp_config": config}


def _fsdp_refusals(plan: Plan, options: TargetOptions) -> list[Unsupported]:
    """What keeps ms-swift's FSDP2 from running the Plan exactly (none: it runs it)."""
    fsdp = plan.distributed.fsdp
    if not fsdp:
        return []
    what, out = f"distributed.fsdp: {fsdp} (swift)", []
    if options.swift_version < 4:
        out.append(Unsupported("fsdp-swift3", None, what,
                               "mixspec's FSDP2 output is proven with ms-swift 4.x only (a real 2-process run of "
                               "its train.sh); 3.x reads --fsdp JSON only from 3.12",
                               "compile for ms-swift 4 (--swift-version 4), or use zero_stage"))
    if not plan.units:
        out.append(Unsupported("fsdp-no-units", None, what,
                               "no tower of this model has a stack of blocks to shard as FSDP units",
                               "use zero_stage instead of fsdp"))
    if plan.training.precision != "fp32" and plan.training.trained_dtype != "fp32":
        out.append(Unsupported(
            "fsdp-trained-dtype", None, f"{what} with trained_dtype {plan.training.trained_dtype}",
            "accelerate's fsdp2_prepare_model upcasts every trainable parameter to fp32 under mixed precision "
            "(FSDP2 wants one dtype for the trained parameters of a unit)", "keep trained weights in fp32"))
    if plan.quantized or plan.training.optimizer != "adamw":
        out.append(Unsupported(
            "quantize-fsdp", None, what + (" with quantize" if plan.quantized else
                                           f" with training.optimizer {plan.training.optimizer}"),
            "FSDP2 shards parameters as DTensors; bitsandbytes' packed weights and its optimizer's states are "
            "not what the plugin checks or mixspec estimates under FSDP2",
            "drop distributed.fsdp, or drop quantize / use optimizer: adamw"))
    return out


# -- the target ------------------------------------------------------------------------------------
class SwiftTarget(Target):
    name = "swift"
    description = "ms-swift 4.x (or 3.x): train.sh with `swift sft`, plus a plugin where flags cannot be exact"

    def warnings(self, plan: Plan, options: TargetOptions) -> list[str]:
        return kbit_warnings(plan, "ms-swift")

    def unsupported(self, plan: Plan, options: TargetOptions) -> list[Unsupported]:
        """What stops an exact compile: hard limits, plus the plugin's reasons under --no-plugin."""
        from ._quant import quant_refusals

        refused = _fsdp_refusals(plan, options)
        if refused:
            return refused
        d = decide(plan, options)
        _deepspeed(plan, d)
        refused = quant_refusals(
            plan, self.name,
            "ms-swift's --quant_method bnb builds a BitsAndBytesConfig without llm_int8_skip_modules "
            "(swift/llm/argument/base_args/quant_args.py), so transformers quantizes every Linear but the "
            "output embedding",
            "mixspec builds swift's optimizer itself (plugin or multimodal groups) as 32-bit AdamW",
            quantize_ok=backend_quantizes_exactly(plan))
        if options.plugin:
            return list(d.hard) + refused
        return list(d.hard) + list(d.plugin_reasons) + refused

    def files(self, plan: Plan, options: TargetOptions) -> dict[str, str]:
        d = decide(plan, options)
        ds_name, ds_json = _deepspeed(plan, d)
        use_plugin = d.plugin and options.plugin
        files = {"train.sh": _train_sh(plan, options, d, ds_name, ds_json is not None, use_plugin)}
        if ds_json is not None:
            files[DEEPSPEED_FILE] = json_text(ds_json)
        if plan.distributed.fsdp:
            files[FSDP_FILE] = json_text(swift_fsdp_json(plan))
        if use_plugin:
            files[PLUGIN_FILE] = _plugin_py(plan, options, d)
        if wants_sbatch(plan, options):
            files[SBATCH_FILE] = render_sbatch_sh(plan, options, "swift", "train.sh")
        return files


TARGET = SwiftTarget


# -- train.sh ------------------------------------------------------------------------------------
def _model_flags(plan: Plan, options: TargetOptions, sw: Optional[SwiftModel]) -> list:
    flags: list = []
    if options.model_override:
        flags.append(("model", options.model_override))
    elif plan.model_source == "local":
        flags.append(("model", plan.model_path))
    else:
        flags.append(("model", plan.model))
        if plan.model_source in ("catalog", "hf-cache"):
            flags.append(("use_hf", True))
    if sw is not None:
        flags += [("model_type", sw.model_type), ("template", sw.template)]
    return flags


def _training_flags(plan: Plan, d: Decision, sw: Optional[SwiftModel]) -> list:
    t = plan.training
    dtype, bf16, fp16 = _PRECISION[t.precision]
    flags: list = [("torch_dtype", dtype), ("bf16", bf16), ("fp16", fp16)]
    q = plan.quant_config()
    if q is not None:  # exact only when swift's skip-less BitsAndBytesConfig gives the Plan's modules
        flags += [("quant_method", "bnb"), ("quant_bits", 8 if q.method == "int8" else 4)]
        if q.method != "int8":
            flags += [("bnb_4bit_quant_type", q.method), ("bnb_4bit_use_double_quant", q.double_quant),
                      ("bnb_4bit_compute_dtype", TORCH_DTYPES[q.compute_dtype])]
    if t.max_steps:
        flags.append(("max_steps", t.max_steps))
    else:
        flags.append(("num_train_epochs", t.epochs))
    flags += [
        ("per_device_train_batch_size", t.micro_batch_size),
        ("gradient_accumulation_steps", t.gradient_accumulation),
        ("max_length", t.max_length),
        ("gradient_checkpointing", t.gradient_checkpointing),
    ]
    if sw is not None and sw.multimodal:
        vit_trained = any(_starts(n, sw.vision_tower) for n in _trainable_names(plan))
        # the default differs by version (4.2-4.5.2: not freeze_vit; later: gradient_checkpointing)
        flags.append(("vit_gradient_checkpointing", bool(t.gradient_checkpointing and vit_trained)))
    wd = next(c.weight_decay for c in plan.components if c.trainable_names)
    flags += [
        ("optim", "adamw_torch"),
        ("adam_beta1", t.adam_beta1), ("adam_beta2", t.adam_beta2), ("adam_epsilon", t.adam_epsilon),
        ("weight_decay", wd),
        ("max_grad_norm", t.max_grad_norm),
        ("lr_scheduler_type", _SCHEDULERS[t.lr_scheduler]),
        ("warmup_ratio", t.warmup_ratio),
        ("seed", t.seed),
        ("logging_steps", t.logging_steps),
        ("save_steps", t.save_steps),
    ]
    return flags


def _trainable_names(plan: Plan):
    for comp in plan.components:
        yield from comp.trainable_names


def _data_flags(plan: Plan) -> list:
    flags: list = []
    if plan.data and plan.data.train:
        flags.append(("dataset", plan.data.train))
    if plan.data and plan.data.eval:
        flags.append(("val_dataset", plan.data.eval))
    flags.append(("split_dataset_ratio", 0))
    if plan.output_dir:
        flags += [("output_dir", plan.output_dir), ("add_version", False)]
    return flags


def _pixel_env_lines(plan: Plan) -> list[str]:
    """data.max_pixels / data.min_pixels as ms-swift reads them (MAX_PIXELS / MIN_PIXELS, read by
    the templates of families that resize to a pixel budget): without them swift uses its own
    default (12,845,056 pixels for Qwen2-VL), not the images the Plan was estimated for."""
    if plan.data is None or not any(r in plan.roles for r in ("vision",)):
        return []
    lines = [f"export MAX_PIXELS={sh_quote(plan.data.max_pixels)}"]
    if plan.data.min_pixels is not None:
        lines.append(f"export MIN_PIXELS={sh_quote(plan.data.min_pixels)}")
    return lines


def _env_lines(plan: Plan) -> list[str]:
    nodes, gpus = plan.distributed.nodes, plan.distributed.gpus_per_node
    lines = _pixel_env_lines(plan)
    if gpus > 1 or nodes > 1:
        lines.append(f"export NPROC_PER_NODE={sh_quote(gpus)}")
    if nodes > 1:
        lines += [
            f"export NNODES={sh_quote(nodes)}",
            f'export NODE_RANK="${{NODE_RANK:?set NODE_RANK to the rank of this node, 0 to {nodes - 1}}}"',
            'export MASTER_ADDR="${MASTER_ADDR:?set MASTER_ADDR to the address of the node with NODE_RANK=0}"',
            'export MASTER_PORT="${MASTER_PORT:-29500}"',
        ]
    return lines


def _summary_lines(plan: Plan) -> list[str]:
    rows = []
    for c in plan.components:
        if not c.trainable_names:
            rows.append((c.name, "frozen", "", f"{c.base_params:,}", ""))
        elif c.mode == "lora":
            lo = c.lora
            extra = f"LoRA on {len(lo.targets)} modules: rank {lo.rank}, alpha {_fmt(lo.alpha)}, dropout {_fmt(lo.dropout)}"
            extra += ", rslora" if lo.rslora else ""
            extra += ", dora" if lo.dora else ""
            rows.append((c.name, "lora", f"lr {c.lr!r}", f"{c.trainable_params:,}", extra))
        else:
            rows.append((c.name, "full", f"lr {c.lr!r}", f"{c.trainable_params:,}", ""))
    if plan.unassigned_base_params:
        rows.append(("(unassigned)", "frozen", "", f"{plan.unassigned_base_params:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        line = f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}} parameters"
        lines.append((line + ("  " + r[4] if r[4] else "")).rstrip())
    lines.append(f"  trainable: {plan.totals.trainable_params:,} of {plan.totals.all_params:,} parameters")
    return lines


def _train_sh(plan: Plan, options: TargetOptions, d: Decision, ds_name: Optional[str],
              ds_generated: bool, use_plugin: bool) -> str:
    """train.sh: mixspec.programs' swift_train with its blocks filled.

    ms-swift 4.6 loads config, tokenizer, processor and model with trust_remote_code=True
    (swift/model/register.py: ModelLoader.default_trust_remote_code) and has no flag to turn it
    off, so the program's ``model_code_check`` block looks for code in the model directory
    before swift starts (Python files anywhere in it, or ``auto_map`` in one of its JSON
    configs), in the compiled model or the last ``--model`` passed to train.sh (swift reads the
    last one too). It is kept unless the spec allows the model's own code."""
    sw = SWIFT_MODELS.get(plan.model_type)
    approximate = d.plugin and not use_plugin
    # HERE: the directory of train.sh, for the files it passes to swift from next to it
    here = use_plugin or ds_generated or bool(plan.distributed.fsdp)
    env = ['HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"'] if here else []
    exports = _env_lines(plan)
    if exports:
        env += ["", *exports]
    model = dict(_model_flags(plan, options, sw))["model"]
    filled = {
        "header": _train_sh_header(plan, options, d, use_plugin, approximate),
        "env": "".join(line + "\n" for line in env),
        "command": _swift_sft(plan, options, d, sw, ds_name, ds_generated, use_plugin, approximate),
    }
    if plan.trust_remote_code:  # no check: the spec allows the model's own code
        filled["model_code_check"] = (
            "# The spec allows the model repo's own code (trust_remote_code: true), and ms-swift\n"
            "# loads models with trust_remote_code=True: no check for code in the model directory.\n")
    else:
        filled["model_code_check"] = programs.KEEP
        filled["plan"] = sh_assignments({"MODEL": model})
    return programs.render("swift_train", filled)


def _train_sh_header(plan: Plan, options: TargetOptions, d: Decision, use_plugin: bool, approximate: bool) -> str:
    v = options.swift_version
    out = generated_header(plan, "swift", extra=[
        f"For ms-swift {v}.x (`swift sft`)" + (", compiled with --swift-version 3." if v == 3 else "."),
        "Do not edit: change the spec and compile again.",
    ]).splitlines()
    out.append("#")
    out += ["# " + comment_line(line) for line in _summary_lines(plan)]
    out.append("#")
    if plan.distributed.fsdp:
        out.append("# " + comment_line(f"--fsdp {FSDP_FILE}: {describe_fsdp(plan)}; units (the blocks of every "
                                       f"tower): {', '.join(wrap_classes(plan.units))}"))
    if use_plugin:
        uses = "tuner and optimizer" if d.tuner == "plugin" else "optimizer"
        out.append(f"# {PLUGIN_FILE} (--external_plugins) registers the {uses} {PLUGIN_NAME!r}: "
                   "the flags cannot say this Plan exactly, because:")
        for item in d.plugin_reasons:
            where = f"{item.origin}: " if item.origin else ""
            out.append("#   - " + comment_line(f"{where}{item.what}: {item.why}"))
        out.append("# The plugin checks the trainable parameters, their learning rates and weight decays")
        out.append("# against the Plan before the first step, and stops with a diff if they differ.")
    elif approximate:
        out.append("# APPROXIMATION (--approximate --no-plugin): this run differs from the Plan in:")
        for item in d.plugin_reasons:
            where = f"{item.origin}: " if item.origin else ""
            out.append("#   - " + comment_line(f"{where}{item.what}: {item.why}"))
    if use_plugin:
        out.append("# --learning_rate is only what swift logs; the plugin's optimizer gives each part its own.")
    else:
        for note in d.notes:
            out.append("# " + comment_line(note))
    return "".join(line + "\n" for line in out)


def _swift_sft(plan: Plan, options: TargetOptions, d: Decision, sw: Optional[SwiftModel], ds_name: Optional[str],
               ds_generated: bool, use_plugin: bool, approximate: bool) -> str:
    """The `swift sft` command: one flag a line, extra arguments last."""
    tuner_flag = "tuner_type" if options.swift_version >= 4 else "train_type"
    args: list[str] = []
    for flag, value in _model_flags(plan, options, sw):
        args.append(f"--{flag} {sh_quote(value)}")
    if use_plugin:
        args.append(f'--external_plugins "$HERE/{PLUGIN_FILE}"')
        # the tuner: the plugin's, or swift's own when its flags are exact (LRs are the problem)
        flags = [("tuner_type", PLUGIN_NAME)] if d.tuner == "plugin" else list(d.flags)
        flags += [("optimizer", PLUGIN_NAME), ("learning_rate", _first_lr(plan))]
    elif approximate:
        if d.approx_flags is None:
            raise UnsupportedError("swift", d.plugin_reasons)
        flags = list(d.approx_flags)
    else:
        flags = list(d.flags)
    for flag, value in flags:
        if flag == "tuner_type":
            flag = tuner_flag
        args.append(f"--{flag} {sh_quote(value)}")
    for flag, value in _training_flags(plan, d, sw):
        args.append(f"--{flag} {sh_quote(value)}")
    if ds_name:
        args.append(f"--deepspeed {sh_quote(ds_name)}")
    elif ds_generated:
        args.append(f'--deepspeed "$HERE/{DEEPSPEED_FILE}"')
    if plan.distributed.fsdp:
        args.append(f'--fsdp "$HERE/{FSDP_FILE}"')
    for flag, value in _data_flags(plan):
        words = value if isinstance(value, list) else [value]  # --dataset a.jsonl b.jsonl: swift mixes them
        args.append(f"--{flag} " + " ".join(sh_quote(w) for w in words))
    args.append('"$@"')
    return "".join(line + "\n" for line in ["swift sft \\", *(f"    {a} \\" for a in args[:-1]), f"    {args[-1]}"])


def _lora_comps(plan: Plan) -> list[ComponentPlan]:
    return [c for c in plan.components if c.mode == "lora" and c.lora]


def _first_lr(plan: Plan) -> float:
    return next(c.lr for c in plan.components if c.trainable_names)


# -- the plugin ------------------------------------------------------------------------------------
def _plugin_py(plan: Plan, options: TargetOptions, d: Decision) -> str:
    """mixspec_plugin.py: mixspec.programs' swift_plugin with its blocks filled."""
    components = []
    for c in plan.components:
        if not c.trainable_names:
            continue
        components.append({"name": c.name, "mode": c.mode, "lr": c.lr, "weight_decay": c.weight_decay,
                           "params": compact_names(c.trainable_names), "no_decay": compact_names(c.no_decay)})
    lora_comps = _lora_comps(plan)
    lora = None
    if lora_comps:
        lo = lora_comps[0].lora
        lora = {"r": lo.rank, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout, "use_rslora": lo.rslora,
                "use_dora": lo.dora,
                "target_modules": compact_names(sorted({t for c in lora_comps for t in c.lora.targets}))}
    reasons = ["Why a plugin:"]
    for item in d.plugin_reasons:
        where = f"{item.origin}: " if item.origin else ""
        reasons.append("  - " + comment_line(f"{where}{item.what}: {item.why}"))
    header = generated_header(plan, "swift", extra=[
        f"An ms-swift {options.swift_version}.x plugin, loaded by train.sh with --external_plugins"
        f" ({'--tuner_type' if options.swift_version >= 4 else '--train_type'} {PLUGIN_NAME}"
        f" --optimizer {PLUGIN_NAME}). Do not edit.",
        *reasons,
    ])
    data = py_assignments({
        "SWIFT_VERSION": options.swift_version,
        "PLAN_FINGERPRINT": plan.fingerprint(),
        "OPTIMIZER_FINGERPRINT": plan.optimizer_fingerprint(),
        "PLAN_MODEL": plan.model,
        "PLAN_VERSIONS": dict(sorted(plan.versions.items())),
        "FULL_PARAMS_FILE": FULL_PARAMS_FILE,
        "TRAINED_DTYPE": _PRECISION[plan.training.trained_dtype][0],
        "LORA": lora,
        "COMPONENTS": components,
    })
    return programs.render("swift_plugin", {"header": header, "plan": data})
