"""LLaMA-Factory 0.9.5: a training YAML (train.yaml), a dataset_info.json and a DeepSpeed
JSON, or a refusal naming every part of the Plan LLaMA-Factory cannot express.

LLaMA-Factory decides what trains with a handful of options, not per parameter:

- one ``learning_rate`` (and one ``weight_decay``) for every trainable parameter;
- ``finetuning_type: full`` trains every parameter except those whose name contains a
  key of a part whose ``freeze_vision_tower`` / ``freeze_multi_modal_projector`` /
  ``freeze_language_model`` flag is set; the keys are LLaMA-Factory's own, per
  model_type (``COMPOSITE_MODELS`` in ``model/model_utils/visual.py``), and are plain
  substring tests, not mixspec's roles;
- ``finetuning_type: lora`` puts one LoRA configuration on the modules named by
  ``lora_target``; on a registered model_type a name is kept when it contains a target as
  a substring and no key of a frozen part nor a ``lora_conflict_keys`` entry
  (``patch_target_modules``), then PEFT matches the list by name or dotted suffix.

This module re-implements those rules (from the v0.9.5 source) over the Plan's parameter
names, chooses the flags whose outcome equals the Plan, and refuses when none does. It
never runs LLaMA-Factory: its install needs about 6.6 GB and its own torch build.
"""

from __future__ import annotations

import itertools
import re
import json
import posixpath
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

from .. import __version__
from ..planning.decay import transformers_rule_differs
from ..errors import Location, Unsupported
from ..models.names import natural_key
from ..planning.plan import ComponentPlan, Plan
from ..planning.resolve import covering
from . import Target, TargetOptions
from ._common import comment_line, yaml_value as _yaml_value
from ._quant import HF_OPTIM_NAMES, backend_quantizes_exactly, kbit_warnings
from .deepspeed import deepspeed_config_text, fsdp_unsupported

LLAMAFACTORY_VERSION = "0.9.5"


@dataclass(frozen=True)
class _Composite:
    """LLaMA-Factory's ``CompositeModel`` keys (substrings of parameter/module names)."""

    projector: tuple[str, ...]
    vision: tuple[str, ...]
    language: tuple[str, ...]
    lora_conflict: tuple[str, ...] = ()


# LLaMA-Factory v0.9.5, src/llamafactory/model/model_utils/visual.py, with the defaults of
# _register_composite_model filled in. A model_type missing here is not composite there:
# no freeze_* flag has any effect and lora_target goes to PEFT unchanged.
COMPOSITE_MODELS: dict[str, _Composite] = {
    "dots_ocr": _Composite(("vision_tower.merger",), ("vision_tower",), ("model", "lm_head"), ("merger",)),
    "gemma3": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "gemma3n": _Composite(("multi_modal_projector",), ("vision_tower", "audio_tower"), ("language_model", "lm_head"),
                          ("timm_model", "subsample_conv_projection")),
    "gemma4": _Composite(("model.embed_vision", "model.embed_audio"), ("vision_tower", "audio_tower"),
                         ("language_model", "lm_head"), ("per_layer_projection_norm",)),
    "glm4v": _Composite(("visual.merger",), ("visual.patch_embed", "visual.blocks"), ("language_model", "lm_head"),
                        ("patch_embed",)),
    "glm4v_moe": _Composite(("visual.merger",), ("visual.patch_embed", "visual.blocks"),
                            ("language_model", "lm_head"), ("patch_embed",)),
    "glm_ocr": _Composite(("visual.merger",), ("visual.patch_embed", "visual.blocks"), ("language_model", "lm_head"),
                          ("patch_embed",)),
    "internvl": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "interns1": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "Keye": _Composite(("mlp_AR",), ("visual.vision_model.patch_embedding", "visual.vision_model.encoder"),
                       ("model", "lm_head"), ("patch_embedding",)),
    "kimi_vl": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "llama4": _Composite(("multi_modal_projector",), ("vision_model",), ("language_model", "lm_head")),
    "llava": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "llava_next": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "llava_next_video": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "minicpmv": _Composite(("resampler",), ("vpm",), ("llm",)),
    "minicpmv4_6": _Composite(("model.merger",), ("model.vision_tower",), ("model.language_model", "lm_head")),
    "minicpmo": _Composite(("resampler",), ("vpm", "apm", "audio_avg_pooler", "audio_projection_layer", "tts"),
                           ("llm",), ("audio_projection_layer",)),
    "mistral3": _Composite(("model.multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "mllama": _Composite(("multi_modal_projector",), ("vision_model",), ("language_model", "lm_head")),
    "paligemma": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
    "qwen2_audio": _Composite(("multi_modal_projector",), ("audio_tower",), ("language_model", "lm_head")),
    "qwen2_5_omni_thinker": _Composite(("visual.merger", "audio_tower.proj"),
                                       ("visual.patch_embed", "visual.blocks", "audio_tower"), ("model", "lm_head"),
                                       ("patch_embed",)),
    "qwen2_vl": _Composite(("visual.merger",), ("visual.patch_embed", "visual.blocks"), ("language_model", "lm_head"),
                           ("patch_embed",)),
    "qwen2_5_vl": _Composite(("visual.merger",), ("visual.patch_embed", "visual.blocks"),
                             ("language_model", "lm_head"), ("patch_embed",)),
    "qwen3_vl": _Composite(("visual.merger",),
                           ("visual.pos_embed", "visual.patch_embed", "visual.blocks", "visual.deepstack_merger_list"),
                           ("language_model", "lm_head"), ("patch_embed",)),
    "qwen3_vl_moe": _Composite(("visual.merger",),
                               ("visual.pos_embed", "visual.patch_embed", "visual.blocks",
                                "visual.deepstack_merger_list"),
                               ("language_model", "lm_head"), ("patch_embed",)),
    "qwen3_omni_moe_thinker": _Composite(("visual.merger", "audio_tower.proj"),
                                         ("visual.pos_embed", "visual.patch_embed", "visual.blocks",
                                          "visual.deepstack_merger_list", "audio_tower"),
                                         ("language_model", "lm_head"), ("patch_embed",)),
    "qwen3_5": _Composite(("model.visual.merger",), ("visual.pos_embed", "visual.patch_embed", "visual.blocks"),
                          ("language_model", "lm_head"), ("patch_embed",)),
    "qwen3_5_moe": _Composite(("model.visual.merger",), ("visual.pos_embed", "visual.patch_embed", "visual.blocks"),
                              ("language_model", "lm_head"), ("patch_embed",)),
    "video_llava": _Composite(("multi_modal_projector",), ("vision_tower",), ("language_model", "lm_head")),
}

# Chat templates (``template:``), from LLaMA-Factory v0.9.5 extras/constants.py: first the
# model id, then the model_type where every registered model of that type uses one template.
TEMPLATES_BY_MODEL = {
    "Qwen/Qwen3-VL-2B-Instruct": "qwen3_vl_nothink",
    "Qwen/Qwen3-VL-4B-Instruct": "qwen3_vl_nothink",
    "Qwen/Qwen3-VL-8B-Instruct": "qwen3_vl_nothink",
    "Qwen/Qwen3-VL-32B-Instruct": "qwen3_vl_nothink",
    "Qwen/Qwen3-VL-2B-Thinking": "qwen3_vl",
    "Qwen/Qwen3-VL-4B-Thinking": "qwen3_vl",
    "Qwen/Qwen3-VL-8B-Thinking": "qwen3_vl",
    "Qwen/Qwen3-VL-32B-Thinking": "qwen3_vl",
    "meta-llama/Llama-3.1-8B": "llama3",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3",
    "meta-llama/Meta-Llama-3.1-8B": "llama3",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama/Llama-3.2-1B-Instruct": "llama3",
    "meta-llama/Llama-3.2-3B-Instruct": "llama3",
}
TEMPLATES_BY_MODEL_TYPE = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "qwen2": "qwen",
    "gemma3": "gemma3",
    "paligemma": "paligemma",
    "llava": "llava",
    "mllama": "mllama",
}

# file extensions LLaMA-Factory loads from a local path (data/loader.py FILEEXT2TYPE)
_FILE_EXTENSIONS = (".arrow", ".csv", ".json", ".jsonl", ".parquet", ".txt")

_PARTS = ("vision", "projector", "language")
_PART_LABEL = {"vision": "vision tower", "projector": "multi-modal projector", "language": "language model"}
_FLAG = {"vision": "freeze_vision_tower", "projector": "freeze_multi_modal_projector",
         "language": "freeze_language_model"}
# LLaMA-Factory's defaults: vision tower and projector frozen, language model trained
_DEFAULT_FLAGS = (True, True, False)
# every (freeze_vision_tower, freeze_multi_modal_projector, freeze_language_model), the
# defaults first, then by how many flags differ from them: ties are broken the same way always
_FLAG_COMBOS = sorted(itertools.product((True, False), repeat=3),
                      key=lambda c: (sum(a != b for a, b in zip(c, _DEFAULT_FLAGS)), [not x for x in c]))

DATASET_TRAIN = "mixspec_train"
DATASET_EVAL = "mixspec_eval"

_HINT_OTHER_TARGET = "compile to --target hf (or swift), which express it exactly"


# -- small renderers (kept private: literal quoting for this YAML only) ------------------------

def _num(value: float) -> str:
    """A learning rate or decay as people write it in messages."""
    return f"{value:g}"


def _show(names: Iterable[str], limit: int = 4) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f" and {len(names) - limit} more"
    return text


def _forbidden(comp: Optional[_Composite], flags: tuple[bool, bool, bool]) -> tuple[str, ...]:
    """get_forbidden_modules: the keys of every part whose freeze flag is set."""
    if comp is None:
        return ()
    keys: list[str] = []
    for part, frozen in zip(_PARTS, flags):
        if frozen:
            keys.extend(getattr(comp, part))
    return tuple(keys)


def _full_trainable(names: Iterable[str], comp: Optional[_Composite], flags) -> set[str]:
    """_setup_full_tuning: trainable = no forbidden key is a substring of the name."""
    keys = _forbidden(comp, flags)
    return {n for n in names if not any(k in n for k in keys)}


def _freeze_trainable(names: Iterable[str], ids, modules: Iterable[str], extras: Iterable[str],
                      comp: Optional[_Composite], flags) -> set[str]:
    """adapter.py _setup_freeze_tuning: a name containing '.<i>.<module>' for a trainable layer
    i ('all': any module), an extra module name or (freeze_multi_modal_projector: false) a
    projector key, as substrings, and no key of a frozen part."""
    keys = [f".{i:d}.{m if m != 'all' else ''}" for m in modules for i in ids] + list(extras)
    if comp is not None and not flags[1]:
        keys += list(comp.projector)
    forbidden = _forbidden(comp, flags)
    return {n for n in names if any(k in n for k in keys) and not any(f in n for f in forbidden)}


def hidden_modules(names: Iterable[str]) -> tuple[set[str], set[str]]:
    """_setup_freeze_tuning's module names: inside a layer ('.0.'/'.1.' followed by the name),
    and outside any numbered layer (the parameter's module's last name)."""
    hidden, non_hidden = set(), set()
    for name in names:
        if ".0." in name:
            hidden.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None and "." in name:
            non_hidden.add(name.split(".")[-2])
    return hidden, non_hidden


def _num_layers(plan: Plan) -> Optional[int]:
    """The layer count _setup_freeze_tuning reads: text_config's, else the config's
    num_hidden_layers / num_layers / n_layer (None without a readable config)."""
    from ..errors import ModelSourceError
    from ..models.sources import read_config

    if not plan.model_path:
        return None
    try:
        config = read_config(Path(plan.model_path) / "config.json", plan.model)
    except ModelSourceError:
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    for source in (text, config):
        for key in ("num_hidden_layers", "num_layers", "n_layer"):
            if source and isinstance(source.get(key), int) and source[key]:
                return source[key]
    return None


def _peft_list_match(modules: Iterable[str], targets: Iterable[str]) -> set[str]:
    """PEFT with target_modules as a list: the exact name, or a dot-bounded suffix."""
    wanted = set(targets)
    out = set()
    for m in modules:
        parts = m.split(".")
        if any(".".join(parts[i:]) in wanted for i in range(len(parts))):
            out.add(m)
    return out


def _lora_modules(modules: list[str], targets: list[str], comp: Optional[_Composite], flags) -> set[str]:
    """The modules that get LoRA: patch_target_modules (composite models), then PEFT."""
    if comp is None:
        return _peft_list_match(modules, targets)
    blocked = _forbidden(comp, flags) + comp.lora_conflict
    kept = [m for m in modules if any(t in m for t in targets) and not any(b in m for b in blocked)]
    return _peft_list_match(modules, kept)


def _modules_to_save(modules: list[str], targets: list[str]) -> set[str]:
    """PEFT _set_trainable: a module is wrapped when its name ends with a target (not dot-bounded)."""
    return {m for m in modules if any(m.endswith(t) for t in targets)}


# -- the analysis: what the Plan needs, what LLaMA-Factory gives ------------------------------

@dataclass
class _Analysis:
    """Settings that render the Plan, and every part that cannot be rendered exactly."""

    deviations: list[Unsupported] = field(default_factory=list)  # approximable with --approximate
    hard: list[Unsupported] = field(default_factory=list)  # no approximation either
    comments: dict[str, list[str]] = field(default_factory=dict)  # YAML key -> approximation notes
    finetuning_type: str = "full"
    flags: Optional[tuple[bool, bool, bool]] = None
    learning_rate: float = 0.0
    weight_decay: float = 0.0
    lora: Optional[dict] = None
    lora_targets: list[str] = field(default_factory=list)
    additional_target: list[str] = field(default_factory=list)
    template: Optional[str] = None
    freeze: dict = field(default_factory=dict)  # finetuning_type freeze: its freeze_* keys

    def note(self, key: str, text: str) -> None:
        self.comments.setdefault(key, []).append(text)


def _spec_location(plan: Plan) -> Location:
    return Location(plan.spec_path)


def _where(c: ComponentPlan) -> str:
    return f"{c.name!r} ({c.origin})"


class _Analyser:
    def __init__(self, plan: Plan, options: TargetOptions):
        self.plan = plan
        self.options = options
        self.out = _Analysis()
        self.comp = COMPOSITE_MODELS.get(plan.model_type)
        canonical = {p for c in plan.components for p in c.params} | set(plan.unassigned_params)
        self.names = sorted(canonical | set(plan.tied), key=natural_key)
        self.holder: dict[str, Optional[str]] = {p: c.name for c in plan.components for p in c.params}
        for alias, canon in plan.tied.items():
            self.holder[alias] = self.holder.get(canon)
        self.modules = sorted({".".join(n.split(".")[:i]) for n in self.names for i in range(1, n.count(".") + 1)},
                              key=natural_key)
        self.full = [c for c in plan.components if c.mode == "full" and c.params]
        self.lora = [c for c in plan.components if c.mode == "lora" and c.lora is not None]
        self.trainable = [c for c in plan.components if c in self.full or c in self.lora]
        trained = {p for c in self.full for p in c.params}
        trained |= {alias for alias, canon in plan.tied.items() if canon in trained}
        self.trained = trained

    def run(self) -> _Analysis:
        self.check_data()
        self.check_template()
        if not self.trainable:
            self.out.hard.append(Unsupported(
                "nothing-trainable", _spec_location(self.plan), "a Plan that trains nothing",
                "every component is frozen or claims no parameter; LLaMA-Factory needs something to train",
                "give one component train: full or train: lora"))
            return self.out
        self.check_precision()
        self.check_one_value("learning_rate", "lr", "per-component-lr", "learning rate")
        self.check_one_value("weight_decay", "weight_decay", "per-component-weight-decay", "weight decay")
        self.check_decay_rule()
        if self.lora:
            self.out.finetuning_type = "lora"
            self.check_lora_settings()
            self.check_full_beside_lora()
            self.check_lora_targets()
        else:
            self.out.finetuning_type = "full"
            self.check_full_parts()
        return self.out

    # -- data and template -------------------------------------------------------------
    def check_data(self) -> None:
        if not self.plan.data or not self.plan.data.train:
            self.out.hard.append(Unsupported(
                "no-data", _spec_location(self.plan), "a run without training data",
                "the spec has no data section; LLaMA-Factory's YAML must name a dataset",
                "add data: {train: path/to/train.jsonl}"))

    def check_template(self) -> None:
        plan = self.plan
        template = TEMPLATES_BY_MODEL.get(plan.model) or TEMPLATES_BY_MODEL_TYPE.get(plan.model_type)
        if template is None:
            known = ", ".join(sorted(TEMPLATES_BY_MODEL_TYPE))
            self.out.hard.append(Unsupported(
                "no-template", _spec_location(plan), f"the chat template of {plan.model} ({plan.model_type})",
                "LLaMA-Factory needs `template:` and mixspec knows no template for this model",
                f"mixspec maps the model_types {known} and a few model ids; use --target hf"))
        self.out.template = template

    # -- global values -----------------------------------------------------------------
    def check_precision(self) -> None:
        if self.plan.training.precision == "fp32":
            self.out.deviations.append(Unsupported(
                "precision-fp32", _spec_location(self.plan), "training.precision: fp32",
                "LLaMA-Factory without bf16/fp16 still loads the weights in bf16 or fp16 when the GPU "
                "supports it and upcasts only the trainable ones (infer_optim_dtype): frozen weights "
                "are not fp32",
                "use precision: bf16, or --target hf"))
            self.out.note("bf16", "approximate: the Plan asks for fp32; LLaMA-Factory keeps frozen weights "
                                  "in bf16/fp16 where the GPU supports them")

    def _dominant(self, comps: list[ComponentPlan]) -> ComponentPlan:
        """The component that trains the most parameters (the first such, in spec order)."""
        return max(comps, key=lambda c: (c.trainable_params, -comps.index(c)))

    def check_one_value(self, key: str, attr: str, code: str, label: str) -> None:
        values = {getattr(c, attr) for c in self.trainable}
        chosen = (approximate_learning_rate(values) if key == "learning_rate"
                  else getattr(self._dominant(self.trainable), attr))
        setattr(self.out, key, chosen)
        if len(values) == 1:
            return
        listing = ", ".join(f"{c.name}={_num(getattr(c, attr))}" for c in self.trainable)
        extra = " (its only LR groups are LoRA+'s lora_A/lora_B)" if key == "learning_rate" else ""
        for c in self.trainable:
            self.out.deviations.append(Unsupported(
                code, c.origin, f"component {c.name!r} at {label} {_num(getattr(c, attr))}",
                f"LLaMA-Factory trains every parameter with one {key}{extra}; this Plan has "
                f"{len(values)}: {listing}",
                f"give every trainable component the same {attr}, or {_HINT_OTHER_TARGET}"))
            if getattr(c, attr) != chosen:
                factor = f" ({chosen / c.lr:.3g}x)" if key == "learning_rate" else ""
                self.out.note(key, f"approximate: component {_where(c)} has {label} "
                                   f"{_num(getattr(c, attr))} in the Plan; here it is {_num(chosen)}{factor}")

    def check_decay_rule(self) -> None:
        """LLaMA-Factory's Trainer decides which parameters decay by transformers' rule (torch
        LayerNorm modules, names with bias/norm); the Plan decides by module type and shape."""
        layernorm = frozenset(self.plan.layernorm_modules)
        for c in self.trainable:
            differ = transformers_rule_differs(c, layernorm)
            if not differ:
                continue
            shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            self.out.deviations.append(Unsupported(
                "weight-decay-rule", c.origin, f"weight decay of component {c.name!r} on {shown}",
                "LLaMA-Factory's Trainer chooses the parameters that decay by transformers' rule (torch "
                "LayerNorm modules, names with bias/norm), which differs from the Plan's (biases, norm "
                f"modules by type, 1-D parameters) on {len(differ)} of them",
                f"set weight_decay: 0, or {_HINT_OTHER_TARGET}"))
            self.out.note("weight_decay", f"approximate: transformers' rule decides which parameters of "
                                          f"{_where(c)} decay; the Plan differs on {len(differ)} of them")

    # -- LoRA ----------------------------------------------------------------------------
    @staticmethod
    def _lora_settings(c: ComponentPlan) -> tuple:
        lo = c.lora
        return (lo.rank, lo.alpha, lo.dropout, lo.rslora, lo.dora)

    def check_lora_settings(self) -> None:
        main = self._dominant(self.lora)
        rank, alpha, dropout, rslora, dora = self._lora_settings(main)
        self.out.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "rslora": rslora, "dora": dora}
        others = [c for c in self.lora if self._lora_settings(c) != self._lora_settings(main)]
        if not others:
            return
        names = ("rank", "alpha", "dropout", "rslora", "dora")
        for c in self.lora:
            mine = dict(zip(names, self._lora_settings(c)))
            self.out.deviations.append(Unsupported(
                "lora-settings-differ", c.origin,
                f"the LoRA settings of component {c.name!r} "
                f"({', '.join(f'{k}={v}' for k, v in mine.items())})",
                "LLaMA-Factory applies one LoRA configuration (lora_rank, lora_alpha, lora_dropout, "
                "use_rslora, use_dora) to every target; the Plan's LoRA components differ",
                f"give the LoRA components the same lora options, or {_HINT_OTHER_TARGET}"))
        for c in others:
            mine = dict(zip(names, self._lora_settings(c)))
            diff = ", ".join(f"{k} {mine[k]} -> {self.out.lora[k]}" for k in names if mine[k] != self.out.lora[k])
            self.out.note("lora_rank", f"approximate: component {_where(c)} uses the LoRA settings of "
                                       f"{main.name!r} here: {diff}")

    def check_full_beside_lora(self) -> None:
        module_set = set(self.modules)
        for c in self.full:
            self.out.deviations.append(Unsupported(
                "full-with-lora", c.origin, f"component {c.name!r} trained fully beside LoRA",
                "in LoRA mode LLaMA-Factory trains a module fully only through additional_target (PEFT "
                "modules_to_save): a trainable copy of it, with other parameter names "
                "(...modules_to_save.default...) and its weights held twice; freeze_* flags do not "
                "train anything in LoRA mode",
                f"train {c.name!r} with LoRA too, or freeze it, or {_HINT_OTHER_TARGET}"))
            single = [m for m in c.modules if m not in module_set]
            if single:
                self.out.hard.append(Unsupported(
                    "full-with-lora", c.origin, f"parameters {_show(single)} of component {c.name!r}",
                    "not even an approximation: PEFT modules_to_save wraps whole modules, and these "
                    "are single parameters of a module the component does not own entirely",
                    "select whole modules, or compile to --target hf"))
                continue
            wanted = self._wrappable(c.modules)
            wrapped = _modules_to_save(self.modules, wanted)
            wrapped = {m for m in wrapped if not any(m.startswith(w + ".") for w in wrapped)}
            if wrapped != set(wanted):
                extra = sorted(wrapped - set(wanted), key=natural_key)
                self.out.hard.append(Unsupported(
                    "full-with-lora", c.origin, f"component {c.name!r} as additional_target",
                    "not even an approximation: PEFT matches additional_target names as plain suffixes "
                    f"and would also wrap {_show(extra)}",
                    "select other modules, or compile to --target hf"))
                continue
            self.out.additional_target.extend(wanted)
            self.out.note("additional_target",
                          f"approximate: component {_where(c)} is trained as PEFT modules_to_save copies of "
                          f"{_show(c.modules)} ({c.base_params:,} parameters held twice, saved under "
                          "modules_to_save names)")

    def _wrappable(self, modules: Iterable[str]) -> list[str]:
        """Replace containers whose children are numbered (ModuleList, which modules_to_save
        refuses, or Sequential) by those children, recursively."""
        out: list[str] = []
        for m in modules:
            children = sorted({n[len(m) + 1:].split(".")[0] for n in self.names if n.startswith(m + ".")})
            if children and all(ch.isdigit() for ch in children) and m in set(self.modules):
                out.extend(self._wrappable(f"{m}.{ch}" for ch in sorted(children, key=int)))
            else:
                out.append(m)
        return out

    def check_lora_targets(self) -> None:
        wanted = set()
        for c in self.lora:
            wanted.update(c.lora.targets)
        targets = sorted(wanted, key=natural_key)
        self.out.lora_targets = targets
        got = self.best_flags(lambda flags: _lora_modules(self.modules, targets, self.comp, flags), wanted)
        if got == wanted:
            return
        for c in self.lora:
            mine = set(c.lora.targets)
            missing = sorted(mine - got, key=natural_key)
            if missing:
                keys = [k for k in (self.comp.lora_conflict if self.comp else ()) if any(k in m for m in missing)]
                why = (f"LLaMA-Factory never puts LoRA on a {self.plan.model_type} module whose name contains "
                       f"{', '.join(repr(k) for k in keys)} (lora_conflict_keys)" if keys else
                       "LLaMA-Factory's target filtering (patch_target_modules) drops them under every "
                       "combination of freeze_* flags")
                self.out.deviations.append(Unsupported(
                    "lora-targets", c.origin,
                    f"LoRA on {len(missing)} modules of component {c.name!r}: {_show(missing)}", why,
                    f"drop these modules from the LoRA targets, or {_HINT_OTHER_TARGET}"))
                self.out.note("lora_target", f"approximate: no LoRA on {_show(missing)} "
                                             f"(component {_where(c)})")
        extra = sorted(got - wanted, key=natural_key)
        if extra:
            culprits = [c for c in self.lora if any(t in m for m in extra for t in c.lora.targets)] or self.lora
            for c in culprits:
                self.out.deviations.append(Unsupported(
                    "lora-targets", c.origin, f"the LoRA targets of component {c.name!r}",
                    f"LLaMA-Factory matches lora_target names as substrings and would also put LoRA on "
                    f"{len(extra)} modules the Plan leaves alone: {_show(extra)}",
                    f"adjust the targets, or {_HINT_OTHER_TARGET}"))
            self.out.note("lora_target", f"approximate: LoRA also on {_show(extra)}, which the Plan leaves alone")

    # -- full fine-tuning ----------------------------------------------------------------
    def best_flags(self, outcome, wanted: set) -> set:
        """The freeze_* flag combination whose outcome (what LLaMA-Factory would train under
        it) differs least from ``wanted`` (the first exact one); it becomes the YAML's flags.
        Returns that outcome."""
        best = None
        for flags in _FLAG_COMBOS:
            got = outcome(flags)
            miss = len(got ^ wanted)
            if best is None or miss < best[0]:
                best = (miss, flags, got)
            if miss == 0:
                break
        _, flags, got = best
        self.out.flags = flags if self.comp else None
        return got

    def check_full_parts(self) -> None:
        got = self.best_flags(lambda flags: _full_trainable(self.names, self.comp, flags), self.trained)
        if got == self.trained or self.freeze_tuning():
            return
        self.explain_full_mismatch()
        extra = got - self.trained
        lost = self.trained - got
        if extra:
            self.out.note("finetuning_type", f"approximate: also trains {_show(covering(extra, self.names))}, "
                                             "which the Plan freezes")
        if lost:
            self.out.note("finetuning_type", f"approximate: freezes {_show(covering(lost, self.names))}, "
                                             "which the Plan trains")

    def freeze_tuning(self) -> bool:
        """finetuning_type: freeze where it trains exactly the Plan's parameters: the last (or
        first) n layers, all their modules or some, plus extra modules by name; the same rule
        the importer applies (_freeze_trainable)."""
        num_layers = _num_layers(self.plan)
        if not num_layers:
            return False
        canonical = [n for n in self.names if n not in self.plan.tied]  # named_parameters(): a tied pair once
        hidden, non_hidden = hidden_modules(canonical)
        trained = {n for n in canonical if n in self.trained}
        outside = {n.split(".")[-2] for n in trained if re.search(r"\.\d+\.", n) is None and "." in n}
        extras = sorted(outside & non_hidden)
        inside = sorted({m for m in hidden if any(f".{m}" in n for n in trained)})
        for flags in (_FLAG_COMBOS if self.comp else [(True, True, False)]):
            for n in range(1, num_layers + 1):
                for ids, n_train in ((range(num_layers - n, num_layers), n), (range(n), -n)):
                    for modules in (["all"], inside):
                        if modules and _freeze_trainable(canonical, ids, modules, extras, self.comp,
                                                         flags) == trained:
                            self.out.finetuning_type = "freeze"
                            self.out.flags = flags if self.comp else None
                            self.out.freeze = {"freeze_trainable_layers": n_train,
                                               "freeze_trainable_modules": ",".join(modules),
                                               "freeze_extra_modules": ",".join(extras)}
                            return True
        return False

    def _part_members(self) -> dict[str, set[str]]:
        members = {}
        if self.comp:
            for part in _PARTS:
                keys = getattr(self.comp, part)
                members[part] = {n for n in self.names if any(k in n for k in keys)}
        return members

    def _frozen_by_holder(self, frozen: set[str]) -> str:
        groups: dict[str, set[str]] = {}
        for n in frozen:
            groups.setdefault(self.holder.get(n) or "unassigned", set()).add(n)
        parts = []
        for holder in sorted(groups):
            label = "unassigned" if holder == "unassigned" else f"component {holder!r}"
            parts.append(f"{_show(covering(groups[holder], self.names), 3)} ({label})")
        return "; ".join(parts)

    def explain_full_mismatch(self) -> None:
        members = self._part_members()
        in_some_part = set().union(*members.values()) if members else set()
        before = len(self.out.deviations)
        for part, names in members.items():
            trained = names & self.trained
            frozen = names - self.trained
            if not trained or not frozen:
                continue
            keys = ", ".join(getattr(self.comp, part))
            for c in self.full:
                if not set(c.params) & trained:
                    continue
                self.out.deviations.append(Unsupported(
                    "full-part-mismatch", c.origin,
                    f"component {c.name!r} (full) as part of LLaMA-Factory's {_PART_LABEL[part]}",
                    f"for {self.plan.model_type} LLaMA-Factory trains or freezes its {_PART_LABEL[part]} "
                    f"(parameter names containing {keys}) as a whole ({_FLAG[part]}), and the Plan "
                    f"freezes the rest of it: {self._frozen_by_holder(frozen)}",
                    f"train all of it at one lr, or {_HINT_OTHER_TARGET}"))
        rest_frozen = {n for n in self.names if n not in in_some_part and n not in self.trained}
        if rest_frozen:
            if self.comp:
                why = (f"LLaMA-Factory's full fine-tuning always trains the parameters of a "
                       f"{self.plan.model_type} model outside its vision/projector/language keys")
            else:
                why = (f"{self.plan.model_type} has no entry in LLaMA-Factory's composite-model registry, "
                       "so full fine-tuning trains every parameter (freeze_* flags do nothing)")
            by_holder: dict[Optional[str], set[str]] = {}
            for n in rest_frozen:
                by_holder.setdefault(self.holder.get(n), set()).add(n)
            comps = {c.name: c for c in self.plan.components}
            for holder in sorted(by_holder, key=lambda h: (h is None, h or "")):
                names = by_holder[holder]
                shown = _show(covering(names, self.names))
                if holder is None:
                    origin, what = _spec_location(self.plan), f"unassigned (frozen) parameters {shown}"
                else:
                    origin, what = comps[holder].origin, f"frozen parameters of component {holder!r}: {shown}"
                self.out.deviations.append(Unsupported(
                    "full-part-mismatch", origin, what, why,
                    f"train them too, or use LoRA, or {_HINT_OTHER_TARGET}"))
        if len(self.out.deviations) == before:
            self.out.deviations.append(Unsupported(
                "full-part-mismatch", _spec_location(self.plan), "the set of fully trained parameters",
                "no combination of freeze_vision_tower / freeze_multi_modal_projector / "
                "freeze_language_model trains exactly it (LLaMA-Factory's keys overlap here)",
                _HINT_OTHER_TARGET))


# -- rendering ---------------------------------------------------------------------------------

class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str = "") -> None:
        self.lines.append(f"# {comment_line(text)}".rstrip())

    def blank(self) -> None:
        self.lines.append("")

    def section(self, title: str) -> None:
        self.lines += ["", f"### {title}"]

    def key(self, key: str, value, notes: dict[str, list[str]] | None = None) -> None:
        for note in (notes or {}).get(key, ()):
            self.comment(note)
        self.lines.append(f"{key}: {_yaml_value(value)}")

    def folded(self, key: str, items: list[str], notes: dict[str, list[str]] | None = None) -> None:
        """A comma-separated list, one item per line (a folded scalar joins lines with spaces;
        LLaMA-Factory strips each item after splitting on commas)."""
        for note in (notes or {}).get(key, ()):
            self.comment(note)
        self.lines.append(f"{key}: >-")
        for i, item in enumerate(items):
            self.lines.append(f"  {item}{',' if i < len(items) - 1 else ''}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def approximate_learning_rate(lrs) -> float:
    """The one LR --approximate gives every component: the geometric midpoint of the lowest
    and the highest, rounded to 3 significant digits. It does the least harm in the sense
    that no component's LR is off by a larger factor than under any other single LR (the
    extremes are off by sqrt(max/min), one up, one down); the largest component's LR would
    leave the others off by up to max/min (a LoRA part at 2e-4 beside embeddings at 5e-6:
    40x too slow)."""
    lo, hi = min(lrs), max(lrs)
    return float(f"{(lo * hi) ** 0.5:.3g}")


def _out_dir(options: TargetOptions) -> str:
    """The output directory as train.yaml names it: relative to where `llamafactory-cli train`
    runs (where mixspec compile ran, as its header says), never this machine's absolute -o."""
    out = options.extra.get("out_dir") if options.extra else None
    if not out:
        return "."
    out = posixpath.normpath(str(out))
    if out.startswith("/"):
        import os

        out = posixpath.relpath(out, os.getcwd())
    return out


def _is_local_path(path: str) -> bool:
    return (path.lower().endswith(_FILE_EXTENSIONS) or path.startswith(("/", "./", "../", "~"))
            or path in (".", ".."))


def _files(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def dataset_names(plan: Plan, split: str, prefix: str) -> list[str]:
    """dataset_info.json names of a split's files: the prefix alone for one file, prefix_1, prefix_2, ... for several."""
    files = _files(getattr(plan.data, split))
    return [prefix] if len(files) == 1 else [f"{prefix}_{i}" for i in range(1, len(files) + 1)]


def multimodal_plan(plan: Plan) -> bool:
    return "vision" in plan.roles


def _dataset_entry(path: str, out_dir: str, multimodal: bool) -> dict:
    entry: dict = {}
    if _is_local_path(path):
        # LLaMA-Factory joins file_name to dataset_dir (the output directory)
        if path.startswith(("/", "~")):
            entry["file_name"] = path
        elif out_dir.startswith("/"):
            # launched from where mixspec compile ran: that is where the relative path points
            entry["file_name"] = posixpath.abspath(path)
        else:
            entry["file_name"] = posixpath.relpath(path, out_dir)
    else:
        entry["hf_hub_url"] = path
    entry["formatting"] = "sharegpt"
    entry["columns"] = {"messages": "messages", **({"images": "images"} if multimodal else {})}
    entry["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant", "system_tag": "system"}
    return entry


class LlamaFactoryTarget(Target):
    """LLaMA-Factory 0.9.5 ``llamafactory-cli train`` YAML."""

    name = "llamafactory"
    description = f"LLaMA-Factory {LLAMAFACTORY_VERSION} training YAML (llamafactory-cli train)"

    def analyse(self, plan: Plan, options: TargetOptions) -> _Analysis:
        return _Analyser(plan, options).run()

    def unsupported(self, plan: Plan, options: TargetOptions) -> list[Unsupported]:
        """Hard limits, then the deviations: each has its comment in the YAML, so each is
        approximable (Target.render decides)."""
        from ._quant import quant_refusals

        refused = fsdp_unsupported(
            plan, "llamafactory", "LLaMA-Factory takes FSDP from an accelerate config (accelerate launch), with no "
            "hook where mixspec could check the sharded model and its optimizer groups after preparation; mixspec "
            "writes no FSDP2 config it cannot check",
            "compile for hf (its train.py runs FSDP2 and checks it), or use zero_stage with llamafactory")
        if refused:
            return refused
        analysis = self.analyse(plan, options)
        refused = quant_refusals(
            plan, self.name,
            "LLaMA-Factory's quantization_bit builds a BitsAndBytesConfig without llm_int8_skip_modules "
            "(model/model_utils/quantization.py), so transformers quantizes every Linear but the output "
            "embedding",
            "mixspec has not checked LLaMA-Factory's optim names against the Plan's groups",
            quantize_ok=backend_quantizes_exactly(plan) and _lf_quantization_exact(plan),
            optimizer_ok=True)  # its Trainer builds transformers' optim (bitsandbytes AdamW) over its groups
        q = plan.quant_config()
        if q is not None and backend_quantizes_exactly(plan) and not _lf_quantization_exact(plan):
            refused.append(Unsupported(
                "quantize-compute-dtype", None, f"quantize_options.compute_dtype {q.compute_dtype} with "
                f"training.precision {plan.training.precision}",
                "LLaMA-Factory computes 4-bit layers in the model's compute dtype", "leave compute_dtype unset"))
        if plan.quantized and analysis.finetuning_type != "lora":
            refused.append(Unsupported(
                "quantize-needs-lora", None, f"a quantized base with finetuning_type {analysis.finetuning_type}",
                "LLaMA-Factory allows quantization_bit with finetuning_type lora only", "compile for the hf target"))
        return analysis.hard + refused + [replace(d, approximable=True) for d in analysis.deviations]

    def warnings(self, plan: Plan, options: TargetOptions) -> list[str]:
        """With --approximate: each component whose LR changes, and by which factor."""
        if not options.approximate:
            return kbit_warnings(plan, "LLaMA-Factory")
        chosen = self.analyse(plan, options).learning_rate
        return [f"--approximate: component {c.name!r} trains at learning rate {_num(chosen)} instead of "
                f"{_num(c.lr)}: {chosen / c.lr:.3g}x"
                for c in plan.components if c.trainable_params and c.lr is not None and c.lr != chosen]

    def files(self, plan: Plan, options: TargetOptions) -> dict[str, str]:
        a = self.analyse(plan, options)
        out_dir = _out_dir(options)
        files: dict[str, str] = {}
        ds_name = None
        dist = plan.distributed
        if dist.deepspeed:
            ds_name = f"ds_z{dist.zero_stage}_config.json"
            files[ds_name] = deepspeed_config_text(plan)
        multimodal = "vision" in plan.roles or "audio" in plan.roles
        info = {}
        for split, prefix in (("train", DATASET_TRAIN), ("eval", DATASET_EVAL)):
            for name, path in zip(dataset_names(plan, split, prefix), _files(getattr(plan.data, split)), strict=True):
                info[name] = _dataset_entry(path, out_dir, multimodal)
        files["dataset_info.json"] = json.dumps(info, indent=2) + "\n"
        files["train.yaml"] = self._yaml(plan, options, a, out_dir, ds_name)
        return files

    # -- train.yaml ----------------------------------------------------------------------------
    def _yaml(self, plan: Plan, options: TargetOptions, a: _Analysis, out_dir: str,
              ds_name: Optional[str]) -> str:
        """The Plan and its analysis -> the LLaMA-Factory YAML: header, then model, method, dataset,
        output, train and eval sections."""
        y = _Lines()
        self._header(y, plan, options, a, out_dir)
        _yaml_model(y, plan, options)
        _yaml_method(y, a, out_dir, ds_name)
        _yaml_dataset(y, plan, a, out_dir)
        _yaml_train(y, plan, a)
        return y.text()

    def _header(self, y: _Lines, plan: Plan, options: TargetOptions, a: _Analysis, out_dir: str) -> None:
        totals = plan.totals
        y.comment(f"Generated by mixspec {__version__} from {plan.spec_path}; recompile instead of editing.")
        y.comment(f"LLaMA-Factory {LLAMAFACTORY_VERSION} training config for {plan.model} ({plan.model_type}).")
        if options.approximate and a.deviations:
            y.comment("")
            y.comment(f"APPROXIMATION (--approximate): {len(a.deviations)} part(s) of the Plan are not "
                      "expressed exactly; each deviation is a comment above its key.")
        y.comment("")
        y.comment("Run from the directory the spec's data and output paths are relative to (where")
        y.comment("mixspec compile ran):")
        y.comment(f"  llamafactory-cli train {posixpath.join(out_dir, 'train.yaml')}")
        nodes, gpus = plan.distributed.nodes, plan.distributed.gpus_per_node
        if nodes > 1:
            y.comment(f"on each of the {nodes} nodes, {gpus} GPUs each:")
            y.comment(f"  FORCE_TORCHRUN=1 NNODES={nodes} NODE_RANK=<0..{nodes - 1}> MASTER_ADDR=<node 0> "
                      f"MASTER_PORT=29500 NPROC_PER_NODE={gpus} llamafactory-cli train "
                      f"{posixpath.join(out_dir, 'train.yaml')}")
        elif gpus > 1:
            y.comment(f"({gpus} GPUs: llamafactory-cli starts torchrun itself when it sees more than one)")
        y.comment("")
        if not (options.approximate and a.deviations):
            y.comment("At start LLaMA-Factory logs the count; for this Plan it must read")
            all_params = totals.all_params
            y.comment(f"  trainable params: {totals.trainable_params:,} || all params: {all_params:,} || "
                      f"trainable%: {100 * totals.trainable_params / all_params:.4f}")
            y.comment(f"(Plan fingerprint {plan.fingerprint()}.)")
        y.comment(f"mixspec chose these settings by re-implementing LLaMA-Factory {LLAMAFACTORY_VERSION}'s rules (its")
        y.comment("freeze_* keys, substring tests and LoRA target filtering); mixspec's tests do not run")
        y.comment("LLaMA-Factory, whose install needs about 6.6 GB and its own torch build.")


TARGET = LlamaFactoryTarget


def _lf_quantization_exact(plan: Plan) -> bool:
    """LLaMA-Factory's 4-bit compute dtype is the model's (the training precision)."""
    q = plan.quant_config()
    return q is None or q.method == "int8" or q.compute_dtype == plan.training.precision


def _yaml_model(y: _Lines, plan: Plan, options: TargetOptions) -> None:
    """The model section: the model path and its bitsandbytes quantization."""
    y.section("model")
    y.key("model_name_or_path", options.model_override or plan.model)
    q = plan.quant_config()
    if q is not None:  # unsupported() let it through: no skip list gives exactly the Plan's modules
        y.key("quantization_bit", 8 if q.method == "int8" else 4)
        y.key("quantization_method", "bitsandbytes")
        if q.method != "int8":
            y.key("quantization_type", q.method)
            y.key("double_quantization", q.double_quant)


def _yaml_method(y: _Lines, a: _Analysis, out_dir: str, ds_name: Optional[str]) -> None:
    """The method section: the finetuning type, freeze flags, LoRA settings and DeepSpeed config."""
    notes = a.comments
    y.section("method")
    y.key("stage", "sft")
    y.key("do_train", True)
    y.key("finetuning_type", a.finetuning_type, notes)
    if a.flags is not None:
        for part, frozen in zip(_PARTS, a.flags):
            y.key(_FLAG[part], frozen)
    for key, value in a.freeze.items():
        if value != "":
            y.key(key, value)
    if a.finetuning_type == "lora":
        lo = a.lora
        alpha = int(lo["alpha"]) if float(lo["alpha"]).is_integer() else lo["alpha"]
        y.key("lora_rank", lo["rank"], notes)
        y.key("lora_alpha", alpha)
        y.key("lora_dropout", float(lo["dropout"]))
        y.key("use_rslora", bool(lo["rslora"]))
        y.key("use_dora", bool(lo["dora"]))
        y.folded("lora_target", a.lora_targets, notes)
        if a.additional_target:
            y.folded("additional_target", a.additional_target, notes)
    if ds_name:
        y.key("deepspeed", posixpath.join(out_dir, ds_name))


def _yaml_dataset(y: _Lines, plan: Plan, a: _Analysis, out_dir: str) -> None:
    """The dataset section: datasets, template, cutoff length and image pixel limits."""
    t = plan.training
    y.section("dataset")
    y.key("dataset", ",".join(dataset_names(plan, "train", DATASET_TRAIN)))  # several: LLaMA-Factory mixes them
    if plan.data.eval:
        y.key("eval_dataset", ",".join(dataset_names(plan, "eval", DATASET_EVAL)))
    y.key("dataset_dir", out_dir)
    y.key("media_dir", ".")
    y.key("template", a.template)
    y.key("cutoff_len", t.max_length)
    if multimodal_plan(plan):  # else LLaMA-Factory resizes to its own 768 x 768 limit
        y.key("image_max_pixels", plan.data.max_pixels)
        if plan.data.min_pixels is not None:
            y.key("image_min_pixels", plan.data.min_pixels)


def _yaml_train(y: _Lines, plan: Plan, a: _Analysis) -> None:
    """The output, train and (with an eval set) eval sections."""
    t = plan.training
    notes = a.comments
    y.section("output")
    y.key("output_dir", plan.output_dir or "output")
    y.key("logging_steps", t.logging_steps)
    y.key("save_steps", t.save_steps)
    y.key("report_to", "none")

    y.section("train")
    y.key("per_device_train_batch_size", t.micro_batch_size)
    y.key("gradient_accumulation_steps", t.gradient_accumulation)
    y.key("learning_rate", float(a.learning_rate), notes)
    y.key("num_train_epochs", float(t.epochs))
    if t.max_steps:
        y.key("max_steps", t.max_steps)
    y.key("lr_scheduler_type", t.lr_scheduler)
    y.key("warmup_ratio", float(t.warmup_ratio))
    y.key("weight_decay", float(a.weight_decay), notes)
    y.key("max_grad_norm", float(t.max_grad_norm))
    y.key("optim", HF_OPTIM_NAMES[t.optimizer])
    y.key("adam_beta1", float(t.adam_beta1))
    y.key("adam_beta2", float(t.adam_beta2))
    y.key("adam_epsilon", float(t.adam_epsilon))
    y.key("seed", t.seed)
    precision = t.precision
    y.key("bf16", precision == "bf16", notes)
    y.key("fp16", precision == "fp16")
    if not t.gradient_checkpointing:
        y.key("disable_gradient_checkpointing", True)

    if plan.data.eval:
        y.section("eval (the spec sets no cadence: evaluate whenever a checkpoint is saved)")
        y.key("per_device_eval_batch_size", t.micro_batch_size)
        y.key("eval_strategy", "steps")
        y.key("eval_steps", t.save_steps)
