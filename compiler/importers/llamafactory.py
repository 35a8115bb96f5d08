"""`mixspec import --from llamafactory train.yaml`: what a LLaMA-Factory 0.9.5 training config
really trains on its model, as a mixspec spec, with every silent effect found on the way.

LLaMA-Factory decides what trains with a few switches (``finetuning_type``, the ``freeze_*``
flags, ``lora_target``, ``additional_target``, ``freeze_trainable_*``) whose meaning depends
on the model type and on each other. This module applies its 0.9.5 rules over the model's real
module tree: the per-model-type keys and substring tests live in mixspec's llamafactory target
(``mixspec.targets.llamafactory``), which runs them the other way; what only reading needs
(``lora_target: all``, freeze tuning, PEFT's ``modules_to_save``) is here. LLaMA-Factory has
one learning rate and one LoRA configuration, so every component of the spec gets them.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

from ..errors import Location, Problem, SpecError
from ..models.names import natural_key
from ..targets.llamafactory import (COMPOSITE_MODELS, LLAMAFACTORY_VERSION, _FLAG, _PART_LABEL, _PARTS,
                                    _forbidden, _full_trainable, _modules_to_save, _peft_list_match)
from ..models.tree import LORA_KINDS

from . import Imported, tied_copies, tied_copy_text
from ._common import (BackendQuantization, BaseReader, Config, Model, Part, gib, human, load_tree,
                      read_config, show, spec_optimizer, split_names, OPTIMIZER_HINT)
from ._llamafactory_keys import LLAMAFACTORY_KEYS, TRAINING_ARGUMENTS_KEYS

RULES = (f"LLaMA-Factory {LLAMAFACTORY_VERSION}: its selection rules re-implemented from its source "
         "(src/llamafactory/model/adapter.py, model/model_utils/visual.py, model/model_utils/misc.py, "
         "hparams/finetuning_args.py) and PEFT's target_modules / modules_to_save matching, applied to "
         "the model's module tree")

DEFAULT = f"LLaMA-Factory {LLAMAFACTORY_VERSION} default"
HF_DEFAULT = "transformers TrainingArguments default (LLaMA-Factory passes it through)"

# keys LLaMA-Factory 0.9.5 no longer accepts, with what replaced them
_REMOVED = {
    "train_mm_proj_only": ("removed in LLaMA-Factory 0.9.2: 0.9.5 refuses the key",
                           "write freeze_vision_tower: true, freeze_multi_modal_projector: false, "
                           "freeze_language_model: true (with finetuning_type: full)"),
    "visual_inputs": ("removed in LLaMA-Factory 0.9.0 (multimodal input is automatic): 0.9.5 refuses the key",
                      "remove it"),
    # renamed (hparams/*.py history: 0.9.3 commit b07628d, 0.9.2 commit 8f401e3)
    "new_special_tokens": ("renamed add_special_tokens in LLaMA-Factory 0.9.3: 0.9.5 refuses the old name",
                           "write add_special_tokens: with the same tokens"),
    "new_normal_tokens": ("renamed add_tokens in LLaMA-Factory 0.9.3: 0.9.5 refuses the old name",
                          "write add_tokens: with the same tokens"),
    "image_dir": ("renamed media_dir in LLaMA-Factory 0.9.2: 0.9.5 refuses the old name", "write media_dir:"),
    "image_resolution": ("replaced by image_max_pixels in LLaMA-Factory 0.9.2 (a pixel count, not a side): "
                         "0.9.5 refuses the old key", "write image_max_pixels: the side squared (512 -> 262144)"),
    "video_resolution": ("replaced by video_max_pixels in LLaMA-Factory 0.9.2 (a pixel count, not a side): "
                         "0.9.5 refuses the old key", "write video_max_pixels: the side squared (256 -> 65536)"),
}

# settings that change what trains, the learning rates or the memory, and that the spec
# language cannot say: set to anything but their default, the import stops with a reason
_NOT_EXPRESSIBLE = {
    "loraplus_lr_ratio": (None, "LoRA+ gives lora_B its own learning rate; a spec component has one lr"),
    "use_galore": (False, "GaLore projects full-parameter gradients; mixspec plans plain AdamW"),
    "use_apollo": (False, "APOLLO changes the optimizer; mixspec plans plain AdamW"),
    "use_badam": (False, "BAdam trains one block at a time; mixspec plans every trainable parameter at once"),
    "use_adam_mini": (False, "Adam-mini changes the optimizer states; mixspec plans plain AdamW"),
    "use_muon": (False, "Muon changes the optimizer; mixspec plans plain AdamW"),
    "adapter_name_or_path": (None, "training resumes or merges existing adapters whose targets are in their "
                                   "own adapter_config.json"),
    "pure_bf16": (False, "pure bf16 keeps the trained parameters in bf16; mixspec plans them in fp32"),
    "mixture_of_depths": (None, "mixture-of-depths converts the model"),
    "use_kt": (False, "KTransformers replaces the MoE experts"),
    "use_mca": (False, "Megatron-Core training is another engine"),
    "use_hyper_parallel": (False, "HyperParallel is another engine"),
    "train_from_scratch": (False, "training from scratch re-initialises the model"),
}

_LORA_ONLY = ("use_rslora", "use_dora", "loraplus_lr_ratio", "pissa_init")  # LLaMA-Factory raises outside LoRA
_LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target", "create_new_adapter")
_FREEZE_KEYS = ("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules")
_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
_STAGES = ("sft", "pt")
# keys that do not change what trains, the learning rates or the memory per GPU
_NO_EFFECT_NOTE = {
    "template": "the chat template; mixspec's llamafactory target chooses it from the model",
    "do_train": "",
    "stage": "",
}


def read(text: str, path: str) -> Imported:
    """What the LLaMA-Factory train.yaml ``text`` (read from ``path``) trains, as a spec; a
    ``llamafactory-cli train --key value ...`` command line (what the web UI previews) is read
    as the YAML it stands for."""
    command = _command_line(text, path)
    if isinstance(command, Problem):
        out = Imported(backend="llamafactory", rules=RULES, spec={})
        out.problems.append(command)
        return out
    return read_config("llamafactory", RULES, _Reader, text, path, command)


def _command_line(text: str, path: str):
    """The --key value pairs of a ``llamafactory-cli train`` command in ``text`` as located data
    (HfArgumentParser's reading: a bare --flag is true, values typed as YAML reads them), a
    located Problem, or None when ``text`` holds no such command (a YAML file)."""

    from ..language.yamlloc import Located

    from .shell import UnterminatedQuote, expand, split_commands

    # the web UI's preview comes in a ```bash fence; blank those lines, keeping line numbers
    text = "\n".join("" if line.lstrip().startswith("```") else line for line in text.splitlines())
    if not re.search(r"(llamafactory-cli|\blmf)\s+train\b", text) or _is_mapping(text):
        return None
    try:
        commands = split_commands(text)
    except UnterminatedQuote as exc:
        return Problem(Location(path, exc.line, exc.col), "", f"this {exc.quote} quote is never closed")
    words = next((c[i:] for c in commands for i in range(len(c) - 1)
                  if os.path.basename(c[i].text) in ("llamafactory-cli", "lmf") and c[i + 1].text == "train"), None)
    if words is None:
        return None
    where = lambda w: Location(path, w.line, w.col)  # noqa: E731
    if len(words) > 2 and not words[2].text.startswith("--"):
        return _file_with_overrides(words[2:], path)
    data, key_locs, value_locs = {}, {}, {}
    key = None
    for w in words[2:]:
        w = expand(w, {})
        if w.unresolved:
            return Problem(where(w), key or "", f"{w.raw or w.text!r} depends on {', '.join(w.unresolved)}, "
                           "which this command line does not set", "write the value itself")
        if w.text.startswith("--") and len(w.text) > 2:
            key, eq, value = w.text[2:].partition("=")
            key = key.replace("-", "_")
            data[key], key_locs[(key,)] = True, where(w)  # a bare --flag: true
            if eq:
                data[key], value_locs[(key,)] = _typed(value), where(w)
            continue
        if key is None or (key,) in value_locs:
            return Problem(where(w), key or "", f"{w.text!r}: one value per --key (LLaMA-Factory's parser "
                           "stops on the rest: \"Some specified arguments are not used\")",
                           "quote a value with spaces; join lists with commas")
        data[key], value_locs[(key,)] = _typed(w.text), where(w)
    return Located(path, data, value_locs, key_locs)


def _is_mapping(text: str) -> bool:
    """A YAML config (that merely mentions the command somewhere), not a command line."""
    import yaml

    try:
        return isinstance(yaml.safe_load(text), dict)
    except yaml.YAMLError:
        return False


def _file_with_overrides(words, path: str):
    """``llamafactory-cli train FILE.yaml key=value ...`` (hparams/parser.py read_args: the
    file, then OmegaConf.from_cli overrides): the file's keys where they are written, each
    override at its word on the command line."""
    from ..language.yamlloc import Located, load_located_text

    name = words[0].text
    bases = [os.getcwd()] + ([] if path.startswith("<") else [os.path.dirname(os.path.abspath(path))])
    found = next((os.path.join(b, name) for b in bases if os.path.isfile(os.path.join(b, name))), None)
    if found is None or not name.endswith((".yaml", ".yml")):
        return Problem(Location(path, words[0].line, words[0].col), "", f"this command trains from the file {name}, "
                       "which is not here" if found is None else f"{name}: mixspec imports a YAML config",
                       f"import that file: mixspec import --from llamafactory {name}")
    try:
        with open(found, encoding="utf-8") as fh:
            located = load_located_text(fh.read(1 << 20), name)
    except (OSError, SpecError) as exc:
        problems = getattr(exc, "problems", None)
        return problems[0] if problems else Problem(Location(path, words[0].line, words[0].col), "", str(exc))
    data = dict(located.data) if isinstance(located.data, dict) else {}
    key_locs, value_locs = dict(located.key_locs), dict(located.value_locs)
    for w in words[1:]:
        key, eq, value = w.text.partition("=")
        if not eq or not key:
            return Problem(Location(path, w.line, w.col), "", f"{w.text!r}: an override is key=value",
                           "write key=value (OmegaConf.from_cli)")
        data[key] = _typed(value)
        key_locs[(key,)] = value_locs[(key,)] = Location(path, w.line, w.col)
    return Located(name, data, value_locs, key_locs)


def _typed(value: str):
    """A command-line value as the config file would hold it (True, 8, 5e-05 ...)."""
    import yaml

    try:
        typed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return typed if isinstance(typed, (bool, int, float)) else value


class _Reader(BaseReader):
    launcher = "llamafactory-cli (NPROC_PER_NODE / NNODES)"

    def __init__(self, cfg: Config, out: Imported):
        super().__init__(cfg, out)
        self.model: Optional[Model] = None
        self.comp = None

    def run(self) -> None:
        """The config -> self.out: problems, effects, the spec and its Plan."""
        cfg = self.cfg
        self.check_keys()
        model = cfg.get("model_name_or_path", "str")
        if not model:
            if "model_name_or_path" not in cfg.data:
                cfg.out.problems.append(Problem(Location(cfg.path, 1, 1), "model_name_or_path",
                                                "LLaMA-Factory needs model_name_or_path",
                                                "add model_name_or_path: ORG/NAME or a local directory"))
            return
        ftype = self.read_method()
        if ftype is None:
            return
        self.ftype = ftype
        self.quantization = self.read_quantization()
        self.flags = tuple(cfg.get(_FLAG[part], "bool", default) for part, default in
                           zip(_PARTS, (True, True, False)))

        tree, config = load_tree(cfg, "model_name_or_path", model)
        self.lr = cfg.get("learning_rate", "float", 5e-5)
        training = self.training()
        distributed = self.distributed()
        data = self.data()
        if tree is None:
            return
        self.model = Model(tree)
        self.config = config
        self.comp = COMPOSITE_MODELS.get(tree.model_type)
        self.check_option_scope()
        self.resize_effects()
        if ftype == "full":
            self.full()
        elif ftype == "freeze":
            self.freeze()
        else:
            self.lora()
        output_dir = cfg.get("output_dir", "str")
        if output_dir:
            self.out.origins["output_dir"] = cfg.loc("output_dir")
        plan = self.assemble("model_name_or_path", model, {"training": training, "distributed": distributed,
                                                           "data": data, "output_dir": output_dir},
                             "finetuning_type", "check the freeze_* flags and lora_target")
        if plan is not None:
            self.decay_effects(plan, "LLaMA-Factory's Trainer")
        self.finish_unmodelled()

    def check_keys(self) -> None:
        """Reports keys LLaMA-Factory removed or does not know, and values a spec cannot express."""
        cfg = self.cfg
        known = LLAMAFACTORY_KEYS | TRAINING_ARGUMENTS_KEYS
        for key in cfg.data:
            if key in _REMOVED:
                why, fix = _REMOVED[key]
                cfg.error(key, f"{key} was {why}", fix, value=False)
                cfg.used.add(key)
            elif key not in known:
                cfg.unknown_key(key, known, f"LLaMA-Factory {LLAMAFACTORY_VERSION}")
                cfg.used.add(key)
        for key, (default, why) in _NOT_EXPRESSIBLE.items():
            if cfg.has(key) and cfg.data[key] not in (default, None, False):
                cfg.error(key, f"{key}: {cfg.data[key]!r} cannot be expressed in a mixspec spec: {why}",
                          "remove it to import the rest, or keep this run in LLaMA-Factory")
                cfg.used.add(key)

    def read_method(self) -> Optional[str]:
        """stage, do_train and finetuning_type -> the finetuning type (None when it cannot be expressed)."""
        cfg = self.cfg
        stage = cfg.get("stage", "str", "sft")
        if stage not in _STAGES:
            cfg.error("stage", f"stage: {stage} ({'preference' if stage in ('dpo', 'kto', 'rm') else 'RL'} "
                               "training) cannot be expressed: a mixspec spec describes supervised fine-tuning",
                      "import an sft config")
        if not cfg.get("do_train", "bool", False):
            cfg.effect("do_train" if cfg.has("do_train") else "", "not-training",
                       "do_train is not true: `llamafactory-cli train` loads the model and trains nothing "
                       "(transformers' default do_train is false)",
                       "set do_train: true; the spec below is what it would train")
        ftype = cfg.get("finetuning_type", "str", "lora")
        if ftype not in ("lora", "full", "freeze"):
            cfg.error("finetuning_type", f"finetuning_type: {ftype} cannot be expressed"
                      + (" (OFT: orthogonal fine-tuning)" if ftype == "oft" else ""),
                      "mixspec specs train parts fully or with LoRA: use full, freeze or lora")
            return None
        return ftype

    def origin_of(self, part: Part, key: str):
        if key == "lr":
            return self.src("learning_rate", f"{HF_DEFAULT}: learning_rate 5e-05")
        if key == "weight_decay":
            return self.src("weight_decay", HF_DEFAULT)
        if key == "train":
            if part.label == "additional_target":
                return self.cfg.loc("additional_target")
            return self.src("finetuning_type", f"{DEFAULT}: finetuning_type lora")
        if key == "modules":
            return self.part_source.get(part.label, self.src("finetuning_type", DEFAULT))
        if key.startswith("lora."):
            sub = key[5:]
            lf_key = {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "use_rslora",
                      "dora": "use_dora", "targets": "lora_target", "layers": "lora_target"}[sub]
            default = {"rank": 8, "alpha": "lora_rank * 2", "dropout": 0.0, "rslora": False, "dora": False,
                       "targets": "all", "layers": "all"}[sub]
            return self.src(lf_key, f"{DEFAULT}: {lf_key} {default}")
        return self.src("finetuning_type", DEFAULT)

    @property
    def part_source(self) -> dict:
        if not hasattr(self, "_part_source"):
            self._part_source = {}
        return self._part_source

    def read_quantization(self):
        """LLaMA-Factory's on-the-fly BitsAndBytesConfig (model/model_utils/quantization.py
        configure_quantization): quantization_bit 4 is quantization_type (nf4) with
        double_quantization (true), 8 is LLM.int8; no skip list (transformers' default)."""
        cfg = self.cfg
        bits = cfg.get("quantization_bit", "int", None, allow_none=True)
        for key in ("quantization_method", "quantization_type", "double_quantization"):
            cfg.used.add(key)
        if bits is None:
            return None
        cfg.used.add("quantization_bit")
        method = cfg.get("quantization_method", "str", "bitsandbytes")
        if method not in ("bitsandbytes", "bnb"):
            cfg.error("quantization_method", f"quantization_method: {method} cannot be expressed: mixspec plans "
                      "bitsandbytes quantization only", "use quantization_method: bitsandbytes")
            return None
        kind = cfg.get("quantization_type", "str", "nf4")
        if bits not in (4, 8) or (bits == 4 and kind not in ("nf4", "fp4")):
            cfg.error("quantization_bit", f"quantization_bit {bits} ({kind}): bitsandbytes quantizes to 4 bit "
                      "(nf4, fp4) or 8 bit", "use quantization_bit: 4 or 8")
            return None
        return BackendQuantization(method=kind if bits == 4 else "int8",
                                   double_quant=cfg.get("double_quantization", "bool", True),
                                   where=cfg.loc("quantization_bit"))

    # -- option scope: keys that do nothing under this finetuning_type or model ------------
    def check_option_scope(self) -> None:
        cfg, ftype = self.cfg, self.ftype
        if self.comp is None:
            for part in _PARTS:
                key = _FLAG[part]
                if cfg.has(key):
                    cfg.effect(key, "flag-no-effect",
                               f"{self.model.tree.model_type!r} is not in LLaMA-Factory {LLAMAFACTORY_VERSION}'s "
                               f"composite-model registry (model/model_utils/visual.py): {key} does nothing "
                               "(full trains every parameter, lora_target goes to PEFT unfiltered)",
                               f"remove {key}; select parts with lora_target (LoRA) or freeze tuning instead")
        if ftype == "full" and self.llama_pro:
            cfg.error("use_llama_pro", "LLaMA-Factory raises: `use_llama_pro` is only valid for Freeze or LoRA "
                      "training", "use finetuning_type: freeze or lora")
        for key in _LORA_ONLY:
            if ftype != "lora" and cfg.has(key) and cfg.data[key] not in (None, False):
                cfg.error(key, f"LLaMA-Factory refuses {key} with finetuning_type: {ftype} "
                               "(\"only valid for LoRA training\")", f"remove {key}, or use finetuning_type: lora")
        if ftype != "lora":
            for key in _LORA_KEYS:
                if cfg.has(key):
                    cfg.effect(key, "flag-no-effect", f"{key} applies only to finetuning_type: lora; "
                                                      f"with {ftype} it does nothing",
                               f"remove {key}, or use finetuning_type: lora")
                    cfg.used.add(key)
        if ftype != "freeze":
            for key in _FREEZE_KEYS:
                if cfg.has(key) and not (key == "freeze_trainable_layers" and self.llama_pro):
                    cfg.effect(key, "flag-no-effect", f"{key} applies only to finetuning_type: freeze; "
                                                      f"with {ftype} it does nothing",
                               f"remove {key}, or use finetuning_type: freeze")
                    cfg.used.add(key)

    # -- full ------------------------------------------------------------------------
    def canonical_params(self) -> list[str]:
        """model.named_parameters(): a tied tensor once, under its first name."""
        tree = self.model.tree
        return [p for p in self.model.params if p not in tree.tied]

    def part_of(self, name: str) -> str:
        if self.comp is None:
            return "other"
        for part in ("projector", "vision", "language"):
            if any(k in name for k in getattr(self.comp, part)):
                return part
        return "other"

    def add_parts_by_lf_part(self, trained: set[str], why: dict[str, object]) -> None:
        """Full parts, one per LLaMA-Factory part (its own words in groups)."""
        by: dict[str, set[str]] = {}
        for p in trained:
            by.setdefault(self.part_of(p), set()).add(p)
        labels = {"vision": "vision_tower", "projector": "multi_modal_projector", "language": "language_model",
                  "other": "other"}
        for part in ("vision", "projector", "language", "other"):
            names = by.get(part)
            if not names:
                continue
            if self.comp is None:
                group = "all parameters (finetuning_type: full)" if self.ftype == "full" else "trainable layers"
            elif part == "other":
                group = "outside LLaMA-Factory's vision/projector/language keys (always trained in full mode)"
            else:
                keys = ", ".join(getattr(self.comp, part))
                group = f"{_PART_LABEL[part]} ({keys})"
            label = labels[part]
            self.part_source[label] = why.get(part, self.src("finetuning_type", DEFAULT))
            self.parts.append(Part(label, group, "full", self.lr, self.model.with_tied(names)))

    def full(self) -> None:
        trained = _full_trainable(self.canonical_params(), self.comp, self.flags)
        why = {part: self.src(_FLAG[part], f"{DEFAULT}: {_FLAG[part]} {str(d).lower()}")
               for part, d in zip(_PARTS, (True, True, False))}
        self.add_parts_by_lf_part(trained, why)

    # -- freeze tuning (model/adapter.py _setup_freeze_tuning) ---------------------------------
    def num_layers(self) -> Optional[int]:
        config = self.config or {}
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
        for source in (text, config):
            if not source:
                continue
            for key in ("num_hidden_layers", "num_layers", "n_layer"):
                if isinstance(source.get(key), int) and source[key]:
                    return source[key]
        return None

    def freeze(self) -> None:
        """finetuning_type: freeze -> full Parts for the trainable layers, extra modules and projector."""
        cfg = self.cfg
        n_train = cfg.get("freeze_trainable_layers", "int", 2)
        modules = split_names(cfg.get("freeze_trainable_modules", "list_str", "all"))
        extra = split_names(cfg.get("freeze_extra_modules", "list_str", None, allow_none=True)) or []
        num_layers = self.num_layers()
        if not num_layers:
            cfg.error("finetuning_type", "LLaMA-Factory raises \"Current model does not support freeze tuning\": "
                                         "the config has no num_hidden_layers", "use finetuning_type: full or lora")
            return
        ids = self.llama_pro_layers(num_layers, "freeze_trainable_layers")
        if ids is False:
            return
        if ids is None:
            ids = range(max(0, num_layers - n_train), num_layers) if n_train > 0 else range(min(-n_train, num_layers))
        names = self.canonical_params()
        from ..targets.llamafactory import hidden_modules  # LLaMA-Factory's rule, once

        found = self.freeze_modules(modules, extra, ids, hidden_modules(names))
        if found is None:
            return
        trainable_layers, extras = found
        projector = list(self.comp.projector) if (self.comp and not self.flags[1]) else []
        forbidden = _forbidden(self.comp, self.flags)
        trained: dict[str, str] = {}
        for name in names:
            if any(f in name for f in forbidden):
                continue
            if any(t in name for t in trainable_layers):
                trained[name] = "layers"
            elif any(t in name for t in extras):
                trained[name] = "extra"
            elif any(t in name for t in projector):
                trained[name] = "projector"
        layer_text = (f"one in {ids.step} of {num_layers} layers (use_llama_pro: indices "
                      f"{', '.join(map(str, ids))})" if self.llama_pro else
                      (f"the last {n_train}" if n_train > 0 else f"the first {-n_train}")
                      + f" of {num_layers} layers (indices {ids.start}-{ids.stop - 1})")
        # the layer keys are substrings '.<i>.': they hit every stack numbered like the LLM's
        outside = sorted({p for p, why in trained.items() if why == "layers" and self.model.role_of(p) not in
                          ("language", None)}, key=natural_key)
        if outside:
            mods = sorted({p.rsplit(".", 1)[0] for p in outside}, key=natural_key)
            cfg.effect("freeze_trainable_layers" if cfg.has("freeze_trainable_layers") else "finetuning_type",
                       "freeze-layers-match-other-stacks",
                       f"freeze tuning selects layers by the substring '.<index>.', so {layer_text} also trains "
                       f"{human(self.model.numel(outside))} parameters outside the language model: {show(mods)}",
                       "freeze the vision tower (freeze_vision_tower: true), or train these parts on purpose "
                       "with a mixspec spec")
        self.extra_substring_effects(extras, trained)
        self.freeze_parts(trained, layer_text, modules)

    def freeze_modules(self, modules: list[str], extra: list[str], ids, hidden_and_not):
        """freeze_trainable_modules and freeze_extra_modules, checked against LLaMA-Factory's hidden
        and non-hidden module names -> (the '.<i>.<module>' keys of the trained layers, the extra
        modules), or None when one is not found (reported)."""
        cfg = self.cfg
        hidden, non_hidden = hidden_and_not
        trainable_layers: list[str] = []
        for module in modules:
            if module != "all" and module not in hidden:
                cfg.error("freeze_trainable_modules", f"LLaMA-Factory raises: module {module!r} is not found",
                          "choose from " + ", ".join(sorted(hidden)))
                return None
            for idx in ids:
                trainable_layers.append(f".{idx:d}.{module if module != 'all' else ''}")
        extras = []
        for module in extra:
            if module not in non_hidden:
                cfg.error("freeze_extra_modules", f"LLaMA-Factory raises: module {module!r} is not found",
                          "choose from " + ", ".join(sorted(non_hidden)))
                return None
            extras.append(module)
        return trainable_layers, extras

    def freeze_parts(self, trained: dict[str, str], layer_text: str, modules: list[str]) -> None:
        """Trained param -> why (layers, extra, projector)  ->  one full Part per reason, with its source."""
        groups = {"layers": ("trainable_layers", f"freeze tuning: {layer_text}"
                             + ("" if modules == ["all"] else f", modules {', '.join(modules)}"),
                             self.src("freeze_trainable_layers", f"{DEFAULT}: freeze_trainable_layers 2")),
                  "extra": ("extra_modules", "freeze tuning: freeze_extra_modules",
                            self.src("freeze_extra_modules", DEFAULT)),
                  "projector": ("multi_modal_projector", "multi-modal projector (freeze_multi_modal_projector: false)",
                                self.src("freeze_multi_modal_projector", DEFAULT))}
        for why in ("layers", "extra", "projector"):
            names_ = {p for p, w in trained.items() if w == why}
            if names_:
                label, group, source = groups[why]
                self.part_source[label] = source
                self.parts.append(Part(label, group, "full", self.lr, self.model.with_tied(names_)))

    @property
    def llama_pro(self) -> bool:
        return bool(self.cfg.get("use_llama_pro", "bool", False))

    def llama_pro_layers(self, num_layers: int, why_key: str):
        """use_llama_pro: the trained block indices, every stride-th (adapter.py
        _setup_freeze_tuning / misc.py find_expanded_modules: stride = num_layers //
        freeze_trainable_layers, ids stride-1, 2*stride-1, ...); None without it, False after
        a located problem (LLaMA-Factory raises)."""
        cfg = self.cfg
        if not self.llama_pro:
            return None
        k = cfg.get("freeze_trainable_layers", "int", 2)
        if k == 0 or num_layers % k != 0:
            cfg.error("freeze_trainable_layers" if cfg.has("freeze_trainable_layers") else "use_llama_pro",
                      f"LLaMA-Factory raises: `num_layers` {num_layers} should be divisible by "
                      f"`num_layer_trainable` {k} (use_llama_pro)",
                      "freeze_trainable_layers: the number of blocks the checkpoint was expanded by (num_expand)")
            return False
        stride = num_layers // k
        ids = range(stride - 1, num_layers + stride - 1, stride)
        cfg.effect("use_llama_pro", "llama-pro-blocks",
                   f"use_llama_pro trains blocks {', '.join(map(str, ids))} of {num_layers} (one in {stride}, "
                   f"freeze_trainable_layers {k}): the blocks LLaMA-Factory's scripts/llama_pro.py added if this "
                   f"checkpoint was expanded with num_expand {k}; on any other checkpoint they are original blocks",
                   "train on the checkpoint llama_pro.py wrote, with freeze_trainable_layers = its num_expand")
        return ids

    def extra_substring_effects(self, extras: list[str], trained: dict[str, str]) -> None:
        """freeze_extra_modules names match as substrings of parameter names (adapter.py: ``any(
        trainable_layer in name ...)``): 'proj' (meant: the projector) also trains every *_proj."""
        for module in extras:
            loose = sorted((p for p, why in trained.items() if why == "extra" and module in p
                            and f".{module}." not in f".{p}"), key=natural_key)
            if not loose:
                continue
            mods = sorted({p.rsplit(".", 1)[0] for p in loose}, key=natural_key)
            leaves = sorted({m.rsplit(".", 1)[-1] for m in mods})
            self.cfg.effect("freeze_extra_modules", "freeze-extra-substring",
                            f"freeze_extra_modules {module!r}: LLaMA-Factory trains every parameter whose name "
                            f"contains it, so it also trains {human(self.model.numel(loose))} parameters of "
                            f"{len(mods)} modules named {', '.join(leaves[:6])}{' ...' if len(leaves) > 6 else ''} "
                            f"({show(mods, 3)}), not only the module called {module!r}",
                            "train that module alone with a mixspec spec (a pattern component), or accept these")

    # -- LoRA ------------------------------------------------------------------------
    def find_all_linear_modules(self) -> list[str]:
        """model/model_utils/misc.py: leaf names of Linear modules outside lm_head, the
        projector keys and (freeze_vision_tower) the vision keys."""
        forbidden = {"lm_head"}
        mt = self.model.tree.model_type
        if mt == "chatglm":
            forbidden.add("output_layer")
        elif mt == "internlm2":
            forbidden.add("output")
        if self.comp is not None:
            forbidden.update(self.comp.projector)
            if self.flags[0]:
                forbidden.update(self.comp.vision)
        names = set()
        for m in self.model.tree.modules:
            if any(f in m.name for f in forbidden):
                continue
            if "Linear" in m.type and "Embedding" not in m.type:
                names.add(m.name.split(".")[-1])
        return sorted(names)

    def lora(self) -> None:
        cfg = self.cfg
        rank = cfg.get("lora_rank", "int", 8)
        alpha = cfg.get("lora_alpha", "float", None, allow_none=True) or rank * 2
        settings = {"rank": rank, "alpha": alpha, "dropout": cfg.get("lora_dropout", "float", 0.0),
                    "rslora": cfg.get("use_rslora", "bool", False), "dora": cfg.get("use_dora", "bool", False)}
        if isinstance(alpha, float) and alpha.is_integer():
            settings["alpha"] = int(alpha)
        targets = split_names(cfg.get("lora_target", "list_str", "all"))
        modules = self.model.modules
        all_targets = len(targets) == 1 and targets[0] == "all"
        if all_targets:
            targets = self.find_all_linear_modules()
        if self.llama_pro:  # misc.py find_expanded_modules: full names in the stride-th blocks
            num_layers = (self.config or {}).get("num_hidden_layers")
            if not isinstance(num_layers, int) or not num_layers:
                cfg.error("use_llama_pro", "LLaMA-Factory raises \"Model was not supported.\": use_llama_pro under "
                          "LoRA reads num_hidden_layers from the top of the config, which this model has not",
                          "use finetuning_type: freeze (it reads text_config), or remove use_llama_pro")
                return
            ids = self.llama_pro_layers(num_layers, "freeze_trainable_layers")
            if ids is False:
                return
            layers = [f".{i}." for i in ids]
            named, targets = targets, [m for m in modules if any(t in m for t in targets) and any(x in m for x in layers)]
        else:
            named = targets
        if self.comp is not None:
            blocked = _forbidden(self.comp, self.flags) + tuple(self.comp.lora_conflict)
            kept = [m for m in modules if any(t in m for t in targets) and not any(b in m for b in blocked)]
            chosen = _peft_list_match(modules, kept) if kept else set()
        else:
            blocked = ()
            chosen = _peft_list_match(modules, targets)
        by_name = self.model.tree.by_name
        bad = sorted((m for m in chosen if by_name[m].kind not in LORA_KINDS), key=natural_key)
        if bad:
            cfg.error("lora_target" if cfg.has("lora_target") else "finetuning_type",
                      f"PEFT refuses to start: LoRA cannot wrap {by_name[bad[0]].type} modules, and lora_target "
                      f"selects {len(bad)}: {show(bad)} (\"Target module ... is not supported\")",
                      "name Linear leaf modules (q_proj, v_proj, ...) or use lora_target: all")
            return
        if not chosen:
            cfg.error("lora_target" if cfg.has("lora_target") else "finetuning_type",
                      "PEFT refuses to start: no module gets LoRA (\"Target modules ... not found in the base model\")"
                      + (f"; every match contains a key of a frozen part or a conflict key ({', '.join(blocked)})"
                         if blocked else ""),
                      "check lora_target and the freeze_* flags against `mixspec tree MODEL`")
            return
        if not all_targets and not self.llama_pro:
            self.lora_target_effects(named, chosen, blocked)
        self.lora_flag_effects(chosen, all_targets)
        where = self.src("lora_target", f"{DEFAULT}: lora_target all")
        self.part_source["lora"] = where
        group = "LoRA (lora_target: " + ("all" if all_targets else ", ".join(named)) + ")" + (
            " in the use_llama_pro blocks" if self.llama_pro else "")
        resize = self.resize_key()
        if resize and not cfg.has("additional_target"):  # model/adapter.py: the embeddings join
            saved = self.additional_target(chosen, self.embedding_leaves(), resize)
        else:
            saved = self.additional_target(chosen)
        self.parts.append(Part("lora", group, "lora", self.lr, set(chosen), lora=settings))
        if saved:
            self.part_source["additional_target"] = cfg.loc(resize if resize and not cfg.has("additional_target")
                                                            else "additional_target")
            params = {p for m in saved for p in self.model.params_under(m)}
            self.parts.append(Part("additional_target", "additional_target (PEFT modules_to_save copies)", "full",
                                   self.lr, self.model.with_tied(params)))

    def lora_target_effects(self, targets: list[str], chosen: set[str], blocked) -> None:
        cfg = self.cfg
        modules = self.model.modules
        for t in targets:
            if self.comp is not None:
                hits = {m for m in chosen if t in m}
                raw = [m for m in modules if t in m]
            else:
                hits = {m for m in chosen if m == t or m.endswith("." + t)}
                raw = list(hits)
            if not hits:
                if raw:
                    keys = sorted({b for b in blocked for m in raw if b in m})
                    cfg.effect("lora_target", "lora-target-filtered",
                               f"lora_target {t!r} matches {len(raw)} modules ({show(sorted(raw, key=natural_key), 3)}), "
                               f"and LLaMA-Factory drops every one: their names contain {', '.join(map(repr, keys))} "
                               "(a part frozen by the freeze_* flags, or lora_conflict_keys)",
                               "set the freeze_* flag of that part to false, or remove the name")
                else:
                    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules
                                     if self.model.tree.by_name[m].kind in LORA_KINDS})
                    import difflib

                    close = difflib.get_close_matches(t, leaves, n=3, cutoff=0.5)
                    cfg.effect("lora_target", "lora-target-matches-nothing",
                               f"lora_target {t!r} matches no module of {self.model.tree.architecture}; "
                               "LLaMA-Factory and PEFT skip it without a word",
                               (f"did you mean {', '.join(close)}? " if close else "")
                               + "module names: mixspec tree MODEL")
                continue
            loose = sorted((m for m in hits if not (m == t or m.endswith("." + t))), key=natural_key)
            if self.comp is not None and loose:
                cfg.effect("lora_target", "lora-target-substring",
                           f"on {self.model.tree.model_type} LLaMA-Factory matches lora_target names as substrings: "
                           f"{t!r} also puts LoRA on {len(loose)} modules whose name only contains it "
                           f"({show(loose, 3)})",
                           "name the leaf modules exactly, or accept these")

    def lora_flag_effects(self, chosen: set[str], all_targets: bool) -> None:
        cfg, comp = self.cfg, self.comp
        if comp is None:
            return
        vision = sorted((m for m in chosen if any(k in m for k in comp.vision)), key=natural_key)
        if cfg.has("freeze_vision_tower") and not self.flags[0] and vision:
            cfg.effect("freeze_vision_tower", "flag-means-lora",
                       f"with finetuning_type: lora, freeze_vision_tower: false does not train the vision tower: "
                       f"it only lets LoRA reach it ({len(vision)} modules: {show(vision, 3)}); its "
                       f"{', '.join(k for k in comp.lora_conflict) or 'other'} modules and norms stay frozen",
                       "for a fully trained vision tower use finetuning_type: full, or a mixspec spec with "
                       "vision: {train: full} compiled to --target hf or swift")
        projector_mods = [m for m in self.model.modules if any(k in m for k in comp.projector)]
        on_projector = [m for m in chosen if any(k in m for k in comp.projector)]
        if cfg.has("freeze_multi_modal_projector") and not self.flags[1] and projector_mods and not on_projector:
            params = {p for m in projector_mods for p in self.model.params_under(m)}
            leaf = comp.projector[0].rsplit(".", 1)[-1]
            cfg.effect("freeze_multi_modal_projector", "projector-not-trained-under-lora",
                       "with finetuning_type: lora, freeze_multi_modal_projector: false does nothing: LoRA mode "
                       "never trains the projector fully, and "
                       + ("lora_target: all skips it (find_all_linear_modules excludes the projector keys "
                          f"{', '.join(comp.projector)})" if all_targets else "no lora_target names it")
                       + f"; its {human(self.model.numel(params))} parameters stay frozen "
                         "(LLaMA-Factory issues #6754, #8334)",
                       f"additional_target: {leaf} trains it as a PEFT modules_to_save copy (its weights held "
                       "twice), or use finetuning_type: full")

    # -- new tokens (model/patcher.py patch_tokenizer, model/adapter.py _setup_lora_tuning) ------
    def resize_key(self) -> Optional[str]:
        """The key that makes LLaMA-Factory resize the vocabulary: resize_vocab, or new tokens
        (add_tokens / add_special_tokens / new_special_tokens_config: patch_tokenizer sets
        resize_vocab once one of them is new to the tokenizer)."""
        cfg = self.cfg
        for key in ("resize_vocab", "new_special_tokens_config", "add_special_tokens", "add_tokens"):
            if cfg.has(key) and cfg.data[key] not in (None, False, "", []):
                cfg.used.add(key)
                return key
        return None

    def embedding_leaves(self) -> list[str]:
        """The last names of get_input_embeddings() and get_output_embeddings(): what
        _setup_lora_tuning puts in additional_target when the vocabulary is resized."""
        tree = self.model.tree
        return sorted({m.rsplit(".", 1)[-1] for m in (tree.input_embedding, tree.output_embedding) if m})

    def resize_effects(self) -> None:
        key = self.resize_key()
        if key is None:
            return
        cfg, tree = self.cfg, self.model.tree
        tokens = (f"{key}: new tokens make LLaMA-Factory set resize_vocab (model/patcher.py); "
                  if key != "resize_vocab" else "resize_vocab: ")
        rows = ("the embedding matrices grow to len(tokenizer) rounded up to 64 where the tokens do not fit "
                "their spare rows; those rows are not in this Plan's counts")
        how = {"lora": "under LoRA, LLaMA-Factory trains " + " and ".join(self.embedding_leaves())
                       + " in full as additional_target (PEFT modules_to_save copies; planned below)"
                       if not cfg.has("additional_target") else "additional_target is given, so LLaMA-Factory "
                       "does not add the embeddings: the new tokens' rows stay at their initial values",
               "freeze": "freeze tuning does not train " + " or ".join(
                   m for m in (tree.input_embedding, tree.output_embedding) if m) + ": the new tokens' rows stay "
                   "at their initial values",
               "full": "full training trains them with the rest"}[self.ftype]
        cfg.effect(key, "resize-vocab", tokens + how + "; " + rows + " (if every token is already in the "
                   "tokenizer, nothing is resized and nothing is added)",
                   "keep it if the tokens are new; with freeze tuning add the embeddings to freeze_extra_modules"
                   if self.ftype == "freeze" else "keep it if the tokens are new")

    def additional_target(self, chosen: set[str], names=None, key: str = "additional_target") -> list[str]:
        cfg = self.cfg
        if names is None:
            names = split_names(cfg.get("additional_target", "list_str", None, allow_none=True))
        if not names:
            return []
        all_modules = self.model.modules
        wrapped = _modules_to_save(all_modules, names)
        wrapped = sorted({m for m in wrapped if not any(m.startswith(w + ".") for w in wrapped)}, key=natural_key)
        for t in names:
            hits = [m for m in wrapped if m.endswith(t)]
            if not hits:
                cfg.effect(key, "additional-target-matches-nothing",
                           f"additional_target {t!r} matches no module; PEFT skips it without a word",
                           "module names: mixspec tree MODEL")
                continue
            loose = [m for m in hits if not (m == t or m.endswith("." + t))]
            if loose:
                cfg.effect(key, "additional-target-suffix",
                           f"PEFT matches modules_to_save names as plain suffixes: {t!r} also wraps "
                           f"{show(loose, 3)}", "give the full leaf name")
        overlap = [m for m in wrapped if m in chosen or any(c.startswith(m + ".") for c in chosen)]
        if overlap:
            cfg.error(key, f"additional_target wraps modules that also get LoRA: {show(overlap)}",
                      "a module is either a LoRA target or a modules_to_save copy; remove one")
            return []
        if wrapped:
            params = {p for m in wrapped for p in self.model.params_under(m)}
            n = self.model.numel(params)
            for module, param, partner in tied_copies(self.model.tree, wrapped):
                message, hint = tied_copy_text(module, param, partner, self.model.tree.param_numel[param],
                                               "additional_target" if key == "additional_target" else
                                               f"{key} (additional_target {', '.join(names)})")
                cfg.error(key, message, hint)
                return []
            cfg.effect(key, "additional-target-copy",
                       f"PEFT modules_to_save keeps each of {show(wrapped, 3)} frozen and trains a copy beside it: "
                       f"{human(n)} parameters held twice (+{gib(2 * n)} of weights in bf16 on every GPU beyond "
                       "what the spec's plan counts), saved under ...modules_to_save.default... names",
                       "the spec below trains these modules in place (train: full); compile it with --target hf "
                       "or swift to avoid the copy")
        return wrapped

    # -- training, distributed, data -----------------------------------------------------
    def training(self) -> dict:
        cfg = self.cfg
        t: dict = {}

        def put(key, value, origin):
            self.put(t, key, value, origin)

        self.read(t, "epochs", "num_train_epochs", "float", 3.0, f"{HF_DEFAULT}: 3.0")
        max_steps = cfg.get("max_steps", "int", -1)
        if max_steps and max_steps > 0:
            put("max_steps", max_steps, cfg.loc("max_steps"))
        self.read(t, "micro_batch_size", "per_device_train_batch_size", "int", 8, f"{HF_DEFAULT}: 8")
        self.read(t, "gradient_accumulation", "gradient_accumulation_steps", "int", 1, f"{HF_DEFAULT}: 1")
        bf16, fp16 = cfg.get("bf16", "bool", False), cfg.get("fp16", "bool", False)
        cfg.get("pure_bf16", "bool", False)
        if bf16:
            put("precision", "bf16", cfg.loc("bf16"))
        elif fp16:
            put("precision", "fp16", cfg.loc("fp16"))
        else:
            put("precision", "bf16", "neither bf16 nor fp16: LLaMA-Factory still loads the weights in bf16 where "
                                     "the GPU supports it (infer_optim_dtype) and upcasts the trained ones to fp32")
            cfg.effect("bf16" if cfg.has("bf16") else "", "no-mixed-precision",
                       "neither bf16 nor fp16 is set: LLaMA-Factory loads the model in bf16 (fp16 on GPUs without "
                       "bf16), upcasts only the trained parameters to fp32, and trains without autocast",
                       "set bf16: true (the spec says precision: bf16, which is what the weights get)")
        put("gradient_checkpointing", not cfg.get("disable_gradient_checkpointing", "bool", False),
            self.src("disable_gradient_checkpointing", f"{DEFAULT}: gradient checkpointing on"))
        self.read(t, "max_length", "cutoff_len", "int", 2048, f"{DEFAULT}: cutoff_len 2048")
        self.read(t, "weight_decay", "weight_decay", "float", 0.0, f"{HF_DEFAULT}: 0.0")
        warmup = cfg.get("warmup_ratio", "float", 0.0)
        if 0 <= warmup <= 1:
            put("warmup_ratio", warmup, self.src("warmup_ratio", f"{HF_DEFAULT}: 0.0"))
        sched = cfg.get("lr_scheduler_type", "str", "linear")
        if sched in _SCHEDULERS:
            put("lr_scheduler", sched, self.src("lr_scheduler_type", f"{HF_DEFAULT}: linear"))
        else:
            cfg.error("lr_scheduler_type", f"lr_scheduler_type: {sched} cannot be expressed",
                      "a spec's lr_scheduler is one of " + ", ".join(_SCHEDULERS))
        self.read(t, "max_grad_norm", "max_grad_norm", "float", 1.0, f"{HF_DEFAULT}: 1.0")
        self.read(t, "seed", "seed", "int", 42, f"{HF_DEFAULT}: 42")
        for key in ("logging_steps", "save_steps"):
            value = cfg.get(key, "float", 500)
            if math.isfinite(value) and value >= 1:
                put(key, int(value), self.src(key, f"{HF_DEFAULT}: 500"))
            else:
                cfg.unmodelled(key, "a fraction of the run (or not a count): the spec counts steps")
        optim = cfg.get("optim", "str", "adamw_torch")
        chosen, why = spec_optimizer(optim)
        if chosen:
            put("optimizer", chosen, self.src("optim", f"{HF_DEFAULT}: adamw"))
        else:
            cfg.error("optim", f"optim: {optim} cannot be expressed: {why}", OPTIMIZER_HINT)
        self.adam_settings(t)
        if cfg.get("warmup_steps", "float", 0):
            cfg.unmodelled("warmup_steps", "the spec has warmup_ratio only")
        return t

    def distributed(self) -> dict:
        def by_name(path: str):
            # LLaMA-Factory's own examples/deepspeed/ds_z{0,2,3}[_offload]_config.json
            m = re.search(r"ds_z([0-3])(_offload)?_config\.json$", path)
            if not m:
                return None
            stage = int(m.group(1))
            return {"zero_stage": stage, "offload": ("all" if stage == 3 else "optimizer") if m.group(2) else "none"}
        return self.deepspeed(by_name)

    def data(self) -> dict:
        cfg, o = self.cfg, self.out.origins
        out = {}
        dataset_dir = cfg.get("dataset_dir", "str", "data")
        for key, spec_key in (("dataset", "train"), ("eval_dataset", "eval")):
            names = split_names(cfg.get(key, "list_str", None, allow_none=True))
            names = [n for n in names if n]
            if not names:
                continue
            paths = [self.dataset_path(name, dataset_dir) for name in names]
            out[spec_key] = paths[0] if len(paths) == 1 else paths  # several: mixed, as LLaMA-Factory mixes them
            o[f"data.{spec_key}"] = cfg.loc(key)
        for key in ("media_dir", "dataset_dir"):
            cfg.used.add(key)
        if "train" in out:
            out["max_pixels"] = cfg.get("image_max_pixels", "int", 768 * 768)
            o["data.max_pixels"] = self.src("image_max_pixels", f"{DEFAULT}: image_max_pixels 589824 (768 x 768)")
            if cfg.has("image_min_pixels"):
                out["min_pixels"] = cfg.get("image_min_pixels", "int", 32 * 32)
                o["data.min_pixels"] = cfg.loc("image_min_pixels")
        return out

    def dataset_path(self, name: str, dataset_dir: str) -> str:
        """The file or hub id behind a dataset_info.json entry (as LLaMA-Factory finds it)."""
        bases = [os.getcwd()]
        if not self.cfg.path.startswith("<"):
            bases.append(os.path.dirname(os.path.abspath(self.cfg.path)))
        for base in bases:
            info_path = os.path.join(base, dataset_dir, "dataset_info.json")
            if not os.path.isfile(info_path):
                continue
            try:
                with open(info_path, encoding="utf-8") as fh:
                    info = json.loads(fh.read(1 << 22))
            except (OSError, ValueError):
                continue
            entry = info.get(name) if isinstance(info, dict) else None
            if not isinstance(entry, dict):
                continue
            if isinstance(entry.get("file_name"), str):
                path = entry["file_name"]
                return path if os.path.isabs(path) else os.path.normpath(os.path.join(dataset_dir, path))
            for key in ("hf_hub_url", "ms_hub_url", "om_hub_url"):
                if isinstance(entry.get(key), str):
                    return entry[key]
        return name

    def finish_unmodelled(self) -> None:
        def note(key: str) -> str:
            if key in _NO_EFFECT_NOTE:
                return _NO_EFFECT_NOTE[key]
            return "does not change which parameters train, their learning rates or the memory plan" \
                if key in _NEUTRAL else ""
        super().finish_unmodelled(note)


# keys known not to change what trains, the learning rates or the per-GPU memory plan
_NEUTRAL = frozenset("""
    logging_steps logging_dir logging_strategy report_to run_name plot_loss overwrite_output_dir overwrite_cache
    preprocessing_num_workers dataloader_num_workers dataloader_pin_memory ddp_timeout save_strategy
    save_total_limit save_only_model eval_strategy eval_steps per_device_eval_batch_size val_size
    do_eval do_predict predict_with_generate max_samples trust_remote_code image_max_pixels image_min_pixels
    video_max_pixels video_min_pixels video_fps video_maxlen flash_attn resume_from_checkpoint
    include_num_input_tokens_seen hub_model_id push_to_hub use_swanlab swanlab_project cache_dir
    template media_dir tokenized_path streaming buffer_size mix_strategy interleave_probs
    compute_accuracy disable_shuffling early_stopping_steps print_param_status
""".split())
