"""`mixspec import --from axolotl config.yml`: what an axolotl 0.19 config really trains on its
model, as a mixspec spec, with every silent effect found on the way.

axolotl builds the PEFT model first (``lora_target_modules`` / ``lora_target_linear`` /
``lora_modules_to_save``), then ``unfrozen_parameters`` freezes every parameter of that
PEFT-wrapped model its regexes do not match (the LoRA weights included), then its optimizer
puts the parameters that decay into the ``lr_groups`` whose module strings they contain,
leaving biases and norms at the base learning rate. This module re-implements those steps
over the model's module tree, under the parameter names axolotl sees.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Optional

from ..planning.decay import torch_layernorm_modules, transformers_decays
from ..errors import Location, Problem, quoted
from ..models.names import natural_key
from ..models.tree import EMBEDDING, LORA_KINDS

from . import Imported, tied_copies, tied_copy_text
from ._axolotl_keys import AXOLOTL_KEYS
from ._common import (OPTIMIZER_HINT, BackendQuantization, BaseReader, Config, Model, Part, gib, human, load_tree,
                      read_config, show, spec_optimizer)

AXOLOTL_VERSION = "0.19.0"
RULES = (f"axolotl {AXOLOTL_VERSION}: derived from its source (axolotl/loaders/adapter.py "
         "find_all_linear_names and _build_peft_lora_config, axolotl/utils/freeze.py freeze_layers_except "
         "and LayerNamePattern, axolotl/core/trainers/mixins/optimizer.py create_optimizer_grouped_parameters) "
         "and PEFT's target_modules / modules_to_save matching, checked against those axolotl functions on a "
         "tiny Qwen2.5-VL (tests/importers/test_import_axolotl.py, opt-in with AXOLOTL_PYTHON)")

DEFAULT = f"axolotl {AXOLOTL_VERSION} default"
_PEFT = "base_model.model."
_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")

# settings the spec language cannot say, when set
_NOT_EXPRESSIBLE = {
    "loraplus_lr_ratio": "LoRA+ gives lora_B its own learning rate; a spec component has one lr",
    "lora_target_parameters": "LoRA on raw parameters (MoE experts); mixspec puts LoRA on modules",
    "lora_exclude_modules": "PEFT exclude_modules is not modelled by mixspec import",
    "peft_layers_to_transform": "PEFT layers_to_transform is not modelled by mixspec import",
    "lora_rank_pattern": "per-module LoRA ranks; a spec component has one rank",
    "lora_alpha_pattern": "per-module LoRA alphas; a spec component has one alpha",
    "peft_layer_replication": "layer replication changes the model",
    "peft_trainable_token_indices": "training only some embedding rows",
    "lora_model_dir": "training resumes an existing adapter whose targets are in its own adapter_config.json",
    "rl": "preference / RL training; a mixspec spec describes supervised fine-tuning",
    "relora": "ReLoRA restarts and merges adapters",
    "freeze_mm_modules": "not modelled yet by mixspec import",
}


def read(text: str, path: str) -> Imported:
    """What the axolotl config ``text`` (read from ``path``) trains, as a spec."""
    return read_config("axolotl", RULES, _Reader, text, path)


class LayerNamePattern:
    """axolotl/utils/freeze.py LayerNamePattern: every '.' not followed by '+' becomes a literal
    dot, an optional trailing ``[start:end]`` range, and ``re.match`` (anchored at the start only)."""

    def __init__(self, pattern: str):
        self.raw = pattern
        m = re.match(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$", pattern)
        self.range = m.groups()[1:] if m else None
        name = m.group(1) if m else pattern
        self.regex = re.compile(re.sub(r"\.(?!\+)", "\\.", name))

    def match(self, name: str) -> bool:
        return self.regex.match(name) is not None


class _Reader(BaseReader):
    launcher = "the launcher (accelerate / torchrun / deepspeed)"

    def __init__(self, cfg: Config, out: Imported):
        super().__init__(cfg, out)
        self.sources: dict = {}

    def run(self) -> None:
        cfg = self.cfg
        for key in cfg.data:
            if key not in AXOLOTL_KEYS:
                close = difflib.get_close_matches(key, sorted(AXOLOTL_KEYS), n=1, cutoff=0.75)
                cfg.effect(key, "unknown-key-ignored",
                           f"axolotl {AXOLOTL_VERSION}'s config schema has no key {key!r}: validate_config drops "
                           "it without a word, so it does nothing",
                           f"did you mean {close[0]!r}?" if close else "remove it")
                cfg.used.add(key)
        for key, why in _NOT_EXPRESSIBLE.items():
            if cfg.has(key) and cfg.data[key] not in (None, False, [], {}):
                cfg.error(key, f"{key} cannot be expressed in a mixspec spec: {why}",
                          "remove it to import the rest, or keep this run in axolotl")
                cfg.used.add(key)
        model = cfg.get("base_model", "str")
        if not model:
            if not cfg.has("base_model"):
                self.out.problems.append(Problem(Location(cfg.path, 1, 1), "base_model", "axolotl needs base_model",
                                                 "add base_model: ORG/NAME or a local directory"))
            return
        adapter = cfg.get("adapter", "str", None, allow_none=True)
        if adapter not in (None, "", "lora", "qlora"):
            cfg.error("adapter", f"adapter: {adapter} cannot be expressed",
                      "mixspec specs train parts fully, with LoRA, or with LoRA over a quantized base: adapter: lora, qlora or none")
            return
        self.quantization = self.read_quantization(adapter)
        if any(p.severity == "error" for p in self.out.problems):
            return
        self.adapter = "lora" if adapter == "qlora" else adapter or None
        lr = cfg.get("learning_rate", "float")
        if lr is None:
            if not cfg.has("learning_rate"):
                self.out.problems.append(Problem(Location(cfg.path, 1, 1), "learning_rate",
                                                 "axolotl requires learning_rate", "add learning_rate: 2.0e-5"))
            return
        self.lr = lr
        tree, _ = load_tree(cfg, "base_model", model)
        training = self.training()
        distributed = self.distributed()
        data = self.data()
        if tree is None:
            return
        self.model = Model(tree)
        self.layernorm = frozenset(torch_layernorm_modules(tree))
        names = self.peft_names()
        if names is None:
            self.finish_unmodelled()
            return
        trainable = self.unfreeze(names)
        self.assign(trainable)
        self.out.origins["output_dir"] = self.src("output_dir", f"{DEFAULT}: ./model-out")
        plan = self.assemble("base_model", model, {"training": training, "distributed": distributed, "data": data,
                                                   "output_dir": cfg.get("output_dir", "str", "./model-out")},
                             "unfrozen_parameters" if cfg.has("unfrozen_parameters") else "adapter",
                             "check unfrozen_parameters and the LoRA targets")
        if plan is not None:
            self.decay_effects(plan, "axolotl's optimizer")
            self.precision_effect(plan)
        self.finish_unmodelled()

    def read_quantization(self, adapter):
        """axolotl's BitsAndBytesConfig (loaders/model.py): adapter qlora with load_in_4bit is nf4
        with double quantization, lora with load_in_8bit is LLM.int8, both without a skip list
        (transformers' default: output embedding, tied weights, last module) unless
        bnb_config_kwargs says otherwise."""
        cfg = self.cfg
        four, eight = cfg.get("load_in_4bit", "bool", False), cfg.get("load_in_8bit", "bool", False)
        kwargs = cfg.raw("bnb_config_kwargs", None) or {}
        if adapter == "qlora" and not four:
            cfg.error("adapter", "adapter: qlora needs load_in_4bit: true (axolotl refuses it otherwise)",
                      "add load_in_4bit: true")
        elif four and adapter != "qlora":
            cfg.error("load_in_4bit", "load_in_4bit without adapter: qlora: axolotl quantizes for QLoRA only",
                      "set adapter: qlora")
        elif eight and adapter != "lora":
            cfg.error("load_in_8bit", "load_in_8bit needs adapter: lora (quantized weights are not trained)",
                      "set adapter: lora, or remove load_in_8bit")
        if not (four or eight) or any(p.severity == "error" for p in self.out.problems):
            return None
        if not isinstance(kwargs, dict) or set(kwargs) - {"bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                                                           "llm_int8_skip_modules"}:
            cfg.error("bnb_config_kwargs", "bnb_config_kwargs: only bnb_4bit_quant_type, bnb_4bit_use_double_quant "
                      "and llm_int8_skip_modules are modelled", "remove the others to import the rest")
            return None
        skip = kwargs.get("llm_int8_skip_modules")
        key = "load_in_4bit" if four else "load_in_8bit"
        cfg.used.update({key, "bnb_config_kwargs"} & set(cfg.data))
        return BackendQuantization(
            method=str(kwargs.get("bnb_4bit_quant_type", "nf4")) if four else "int8",
            double_quant=bool(kwargs.get("bnb_4bit_use_double_quant", True)), where=cfg.loc(key),
            skip=tuple(map(str, skip)) if isinstance(skip, list) else None)

    def precision_effect(self, plan) -> None:
        """axolotl loads the model in the training precision (cfg.torch_dtype: bf16 for bf16,
        fp16 for fp16; utils/config) and its trainer updates fully trained parameters there; only
        a full fine-tune upcasts norm and embedding modules to fp32 first
        (ModelLoader._configure_embedding_dtypes). The spec's Plan keeps fp32 master weights.
        Under DeepSpeed the ZeRO optimizer keeps fp32 masters itself; FSDP is not modelled."""
        cfg, t = self.cfg, plan.training
        full = [c.name for c in plan.components if c.mode == "full" and c.trainable_params]
        if t.precision == "fp32" or not full or cfg.has("deepspeed") or cfg.has("fsdp") or cfg.has("fsdp_config"):
            return
        key = "bf16" if t.precision == "bf16" else "fp16"
        cfg.effect(key if cfg.has(key) else "", "full-params-dtype",
                   f"axolotl loads the model in {t.precision} and updates the fully trained parameters there "
                   f"in spec component(s) {show(sorted(full), 3)}"
                   + (" (a full fine-tune first upcasts norm and embedding modules to fp32)" if not self.adapter else "")
                   + f": updates below {t.precision}'s resolution are lost; the spec's Plan keeps fp32 master weights "
                   f"for them (frozen ones in {t.precision})",
                   "compile the spec (hf or swift targets keep fp32 masters), or train under DeepSpeed")

    def origin_of(self, part: Part, key: str):
        if key == "lr":
            return self.sources.get(("lr", part.label), self.cfg.loc("learning_rate"))
        if key == "train":
            return self.sources.get(("train", part.label), self.src("adapter", f"{DEFAULT}: no adapter (full)"))
        if key == "modules":
            return self.sources.get(("train", part.label), self.src("adapter", DEFAULT))
        if key.startswith("lora."):
            sub = key[5:]
            ax = {"rank": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout", "rslora": "peft_use_rslora",
                  "dora": "peft_use_dora", "targets": "lora_target_modules", "layers": "lora_target_modules"}[sub]
            if sub in ("targets", "layers") and self.cfg.has("lora_target_linear"):
                return self.cfg.loc("lora_target_linear")
            return self.src(ax, f"{DEFAULT}: {ax} " + {"dropout": "0.0", "rslora": "false", "dora": "false"}.get(sub, ""))
        return self.src("adapter", DEFAULT)

    # -- the PEFT model's parameter names ----------------------------------------------
    def lora_modules(self) -> Optional[set[str]]:
        cfg, tree = self.cfg, self.model.tree
        targets = cfg.get("lora_target_modules", "list_str", None, allow_none=True)
        if cfg.get("lora_target_linear", "bool", False):
            linear = set()
            for m in tree.modules:
                if m.name and "Linear" in m.type and m.type != "LlamaLinearScalingRotaryEmbedding":
                    linear.add(m.name.split(".")[-1])
            out_emb = "embed_out" if tree.model_type == "gpt_neox" else "lm_head"
            linear.discard(out_emb)
            as_list = targets if isinstance(targets, list) else ([targets] if targets else [])
            targets = sorted(set(as_list) | linear)
            self.linear_effect(targets)
        if not targets:
            cfg.error("lora_target_modules" if cfg.has("lora_target_modules") else "adapter",
                      "adapter: lora with no target: set lora_target_modules or lora_target_linear: true",
                      "e.g. lora_target_linear: true")
            return None
        modules = self.model.modules
        if isinstance(targets, str):
            try:
                regex = re.compile(targets)
            except re.error as exc:
                cfg.error("lora_target_modules", f"PEFT cannot compile the regex {quoted(targets)}: {exc}",
                          "fix the regex (a string value is full-matched against module names)")
                return None
            chosen = {m for m in modules if regex.fullmatch(m)}
        else:
            chosen = {m for m in modules if any(m == t or m.endswith("." + t) for t in targets)}
            if cfg.has("lora_target_modules") and isinstance(cfg.data["lora_target_modules"], list):
                for t in cfg.data["lora_target_modules"]:
                    if isinstance(t, str) and not any(m == t or m.endswith("." + t) for m in modules):
                        cfg.effect("lora_target_modules", "lora-target-matches-nothing",
                                   f"lora_target_modules {t!r} matches no module of {tree.architecture}; PEFT "
                                   "skips it without a word (a list item is a module name or suffix, not a regex)",
                                   "module names: mixspec tree MODEL; a regex must be the whole value "
                                   "(lora_target_modules: 'model.*(q|v)_proj')")
        bad = sorted((m for m in chosen if tree.by_name[m].kind not in LORA_KINDS), key=natural_key)
        if bad:
            culprits = sorted({t for t in targets for m in bad if m == t or m.endswith("." + t)}) \
                if isinstance(targets, list) else [targets]
            linear = cfg.get("lora_target_linear", "bool", False)
            cfg.error("lora_target_linear" if linear else "lora_target_modules",
                      f"PEFT refuses to start: LoRA cannot wrap {tree.by_name[bad[0]].type} modules, and the target "
                      f"name(s) {', '.join(map(repr, culprits))} select {show(bad)}"
                      + (" (lora_target_linear takes the last name segment of every Linear, e.g. the index of a "
                         "Linear inside a Sequential)" if linear else ""),
                      "list lora_target_modules yourself (a regex over full names, or leaf names that are not "
                      "numbers) instead of lora_target_linear" if linear else "target Linear leaf modules")
            return None
        if not chosen:
            cfg.error("lora_target_modules", "PEFT refuses to start: no module matches the LoRA targets",
                      "module names: mixspec tree MODEL")
            return None
        return chosen

    def linear_effect(self, targets: list[str]) -> None:
        """lora_target_linear takes Linear leaf names from the whole model: on a multimodal model
        the vision tower and projector get LoRA too."""
        roles = {}
        for m in self.model.modules:
            if any(m == t or m.endswith("." + t) for t in targets):
                role = self.model.role_of(m)
                if role in ("vision", "aligner", "audio"):
                    roles.setdefault(role, []).append(m)
        if roles:
            text = "; ".join(f"{len(v)} modules of the {r} ({show(sorted(v, key=natural_key), 2)})"
                             for r, v in sorted(roles.items()))
            self.cfg.effect("lora_target_linear", "lora-target-linear-whole-model",
                            "lora_target_linear collects Linear leaf names from the whole model, so LoRA also lands "
                            f"outside the language model: {text}",
                            "list lora_target_modules as a regex over the language model "
                            "(e.g. 'model.language_model.*(q|k|v|o|gate|up|down)_proj') to keep LoRA there")

    def peft_names(self) -> Optional[dict[str, tuple]]:
        """Every parameter name axolotl's model has (after PEFT), mapped to what it stands for:
        ("base", name), ("lora", module), ("copy", name), ("original", name) or ("base_of_lora", name),
        and whether PEFT leaves it trainable."""
        tree, cfg = self.model.tree, self.cfg
        canonical = [p for p in self.model.params if p not in tree.tied]
        names: dict[str, tuple] = {}
        if self.adapter is None:
            for lora_key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                             "lora_modules_to_save", "peft_use_rslora", "peft_use_dora"):
                if cfg.has(lora_key):
                    cfg.effect(lora_key, "flag-no-effect", f"{lora_key} applies only with adapter: lora; this "
                                                           "config has no adapter (full fine-tuning)",
                               f"remove {lora_key}, or set adapter: lora")
                    cfg.used.add(lora_key)
            for p in canonical:
                names[p] = ("base", p, True)
            self.lora_settings = None
            self.lora_mods = set()
            self.saved = []
            return names
        r, alpha = cfg.get("lora_r", "int"), cfg.get("lora_alpha", "float")
        if r is None or alpha is None:
            missing = [k for k, v in (("lora_r", r), ("lora_alpha", alpha)) if v is None]
            self.out.problems.append(Problem(cfg.loc("adapter"), ", ".join(missing),
                                             f"adapter: lora without {' and '.join(missing)}: axolotl hands PEFT "
                                             "None and the run fails", "set lora_r and lora_alpha"))
            return None
        self.lora_settings = {"rank": r, "alpha": int(alpha) if float(alpha).is_integer() else alpha,
                              "dropout": cfg.get("lora_dropout", "float", 0.0),
                              "rslora": bool(cfg.get("peft_use_rslora", "bool", False)),
                              "dora": bool(cfg.get("peft_use_dora", "bool", False))}
        mods = self.lora_modules()
        if mods is None:
            return None
        saved = self.modules_to_save(mods)
        if saved is None:
            return None
        self.lora_mods, self.saved = mods, saved
        dora = self.lora_settings["dora"]
        for p in canonical:
            owner, _, local = p.rpartition(".")
            copy = next((s for s in saved if p.startswith(s + ".")), None)
            if owner in mods:
                names[f"{_PEFT}{owner}.base_layer.{local}"] = ("base_of_lora", p, False)
            elif copy is not None:
                rest = p[len(copy) + 1:]
                names[f"{_PEFT}{copy}.original_module.{rest}"] = ("original", p, False)
                names[f"{_PEFT}{copy}.modules_to_save.default.{rest}"] = ("copy", p, True)
            else:
                names[f"{_PEFT}{p}"] = ("base", p, False)
        for m in sorted(mods):
            kind = tree.by_name[m].kind
            adapters = ["lora_embedding_A.default", "lora_embedding_B.default"] if kind == EMBEDDING else \
                ["lora_A.default.weight", "lora_B.default.weight"]
            if dora and kind != EMBEDDING:
                adapters.append("lora_magnitude_vector.default.weight")
            for a in adapters:
                names[f"{_PEFT}{m}.{a}"] = ("lora", m, True)
        return names

    def modules_to_save(self, lora_mods: set[str]) -> Optional[list[str]]:
        cfg = self.cfg
        wanted = cfg.get("lora_modules_to_save", "list_str", None, allow_none=True)
        if not wanted:
            return []
        if isinstance(wanted, str):
            wanted = [wanted]
        wrapped = [m for m in self.model.modules if any(m.endswith(t) for t in wanted)]
        wrapped = sorted({m for m in wrapped if not any(m.startswith(w + ".") for w in wrapped)}, key=natural_key)
        for t in wanted:
            if not any(m.endswith(t) for m in wrapped):
                cfg.effect("lora_modules_to_save", "modules-to-save-matches-nothing",
                           f"lora_modules_to_save {t!r} matches no module; PEFT skips it without a word",
                           "module names: mixspec tree MODEL")
        overlap = [m for m in wrapped if m in lora_mods or any(x.startswith(m + ".") for x in lora_mods)]
        if overlap:
            cfg.error("lora_modules_to_save", f"modules that also get LoRA: {show(overlap)}",
                      "a module is either a LoRA target or a modules_to_save copy")
            return None
        for module, param, partner in tied_copies(self.model.tree, wrapped):
            message, hint = tied_copy_text(module, param, partner, self.model.tree.param_numel[param],
                                           "lora_modules_to_save")
            cfg.error("lora_modules_to_save", message, hint)
            return None
        if wrapped:
            params = {p for m in wrapped for p in self.model.params_under(m)}
            n = self.model.numel(params)
            cfg.effect("lora_modules_to_save", "modules-to-save-copy",
                       f"PEFT modules_to_save keeps each of {show(wrapped, 3)} frozen and trains a copy beside it: "
                       f"{human(n)} parameters held twice (+{gib(2 * n)} of weights in bf16 on every GPU beyond what "
                       "the spec's plan counts)",
                       "the spec below trains these modules in place (train: full); compile it with --target hf or "
                       "swift to avoid the copy")
        return wrapped

    # -- unfrozen_parameters -----------------------------------------------------------
    def unfreeze(self, names: dict[str, tuple]) -> dict[str, tuple]:
        cfg = self.cfg
        patterns = cfg.get("unfrozen_parameters", "list_str", None, allow_none=True)
        if not patterns:
            return {n: v for n, v in names.items() if v[2]}
        if isinstance(patterns, str):
            patterns = [patterns]
        compiled = []
        for i, raw in enumerate(patterns):
            try:
                pat = LayerNamePattern(raw)
            except re.error as exc:
                self.out.problems.append(Problem(cfg.value_loc("unfrozen_parameters", i), f"unfrozen_parameters[{i}]",
                                                 f"axolotl cannot compile {raw!r}: {exc}", "fix the regex"))
                continue
            if pat.range is not None:
                self.out.problems.append(Problem(cfg.value_loc("unfrozen_parameters", i), f"unfrozen_parameters[{i}]",
                                                 f"{raw!r} trains only a range of a tensor (gradient zeroing); a spec "
                                                 "trains whole parameters", "drop the [start:end] range"))
            compiled.append((i, pat))
        trainable = {}
        for name, value in names.items():
            if any(p.match(name) for _, p in compiled):
                trainable[name] = value
        for i, pat in compiled:
            if any(pat.match(n) for n in names):
                continue
            self.out.effects.append(_effect(cfg.value_loc("unfrozen_parameters", i), "unfrozen-pattern-matches-nothing",
                                            f"unfrozen_parameters {quoted(pat.raw)} matches no parameter: "
                                            + self.why_no_match(pat.raw), self.fix_no_match(pat.raw, names)))
        if self.adapter:
            frozen_lora = sorted({v[1] for n, v in names.items() if v[0] == "lora" and n not in trainable},
                                 key=natural_key)
            if frozen_lora:
                kept = len(self.lora_mods) - len(frozen_lora)
                self.cfg.effect("unfrozen_parameters", "unfrozen-parameters-freeze-lora",
                                "unfrozen_parameters freezes every parameter it does not match, the LoRA weights "
                                f"included (axolotl #1188, #1464): the adapters of {len(frozen_lora)} of "
                                f"{len(self.lora_mods)} LoRA modules stay frozen ({show(frozen_lora, 3)})"
                                + ("" if kept else "; no LoRA weight trains"),
                                "add a pattern for them, e.g. '.+lora_' (names start with base_model.model.), or "
                                "drop unfrozen_parameters")
            frozen_copies = sorted({v[1] for n, v in names.items() if v[0] == "copy" and n not in trainable})
            if frozen_copies:
                self.cfg.effect("unfrozen_parameters", "unfrozen-parameters-freeze-modules-to-save",
                                f"unfrozen_parameters also freezes the modules_to_save copies it does not match: "
                                f"{show(frozen_copies, 3)}", "add a pattern for '.+modules_to_save.+'")
        return trainable

    def why_no_match(self, raw: str) -> str:
        if "\\." in raw:
            return ("axolotl turns every '.' not followed by '+' into a literal dot, so each '\\.' here asks for a "
                    "backslash in the name")
        if ".*" in raw:
            return "axolotl turns every '.' not followed by '+' into a literal dot: '.*' means 'any number of dots'"
        if self.adapter and raw.lstrip("^").startswith("model"):
            return "with adapter: lora the names start with base_model.model. (axolotl matches from the start)"
        return "axolotl matches it from the start of each parameter name (re.match)"

    def fix_no_match(self, raw: str, names) -> str:
        candidate = raw.replace("\\.", ".").replace(".*", ".+")
        if self.adapter and candidate.lstrip("^").startswith("model."):
            candidate = ("^" if candidate.startswith("^") else "") + _PEFT + candidate.lstrip("^")
        if candidate != raw and any(LayerNamePattern(candidate).match(n) for n in names):
            return f"write {quoted(candidate)}"
        return f"parameter names look like {quoted(next(iter(names)))}; use '.+' for 'anything'"

    # -- learning rates: create_optimizer_grouped_parameters ------------------------------
    def assign(self, trainable: dict[str, tuple]) -> None:
        """What trains (name -> (what, base, _)) -> self.parts: full and LoRA parts, one per
        (lr, lr group), with their sources; problems and effects for what a spec cannot say."""
        groups = self.lr_groups()
        if groups is None:
            return
        lora_lr, full, skipped = self.sort_by_lr(trainable, groups)
        lookup, group_lr, group_index = groups
        for group, params in skipped.items():
            self.out.effects.append(_effect(
                self.cfg.value_loc("lr_groups", group_index[group]), "lr-groups-skip-no-decay",
                f"lr group {group!r} takes only parameters that decay: {len(params)} biases and norm weights its "
                f"modules match stay at the base learning rate {self.lr:g}, not {group_lr[group]:g} "
                f"({show(sorted(params, key=natural_key), 3)})",
                "accept it, or set the base learning_rate to the group's (mixspec specs say each part's lr "
                "explicitly)"))
        self.full_parts(full)
        self.lora_parts(lora_lr)
        self.embedding_decay_effect()

    def lr_groups(self):
        """lr_groups -> (module pattern -> group name, group -> lr, group -> its index), or None
        when lr_groups is not a list (reported)."""
        cfg = self.cfg
        groups = cfg.raw("lr_groups", None)
        lookup: dict[str, str] = {}
        group_lr: dict[str, float] = {}
        group_index: dict[str, int] = {}
        if groups is not None:
            if not isinstance(groups, list):
                cfg.error("lr_groups", "expected a list of {name, modules, lr}", "see axolotl's lr_groups")
                return None
            for i, g in enumerate(groups):
                ok = (isinstance(g, dict) and isinstance(g.get("name"), str) and isinstance(g.get("modules"), list)
                      and all(isinstance(m, str) for m in g["modules"]) and isinstance(g.get("lr"), (int, float))
                      and not isinstance(g.get("lr"), bool))
                if not ok:
                    self.out.problems.append(Problem(cfg.value_loc("lr_groups", i), f"lr_groups[{i}]",
                                                     "expected {name: str, modules: [str, ...], lr: number}",
                                                     "fix this lr group"))
                    continue
                for m in g["modules"]:
                    lookup[m] = g["name"]
                group_lr[g["name"]] = float(g["lr"])
                group_index[g["name"]] = i
        return lookup, group_lr, group_index

    def sort_by_lr(self, trainable: dict[str, tuple], groups):
        """Each trained tensor -> its (lr, label, source): (LoRA module -> those seen, (lr, label,
        source) -> full base params, lr group -> no-decay params it skips)."""
        cfg = self.cfg
        lookup, group_lr, group_index = groups
        emb_scale = cfg.get("embedding_lr_scale", "float", None, allow_none=True)
        emb_lr = cfg.get("embedding_lr", "float", None, allow_none=True)
        emb_value = self.lr * emb_scale if emb_scale else (emb_lr if emb_lr else self.lr)
        lora_lr: dict[str, set] = {}
        full: dict[tuple, set] = {}
        skipped: dict[str, set[str]] = {}
        for name, (what, base, _) in sorted(trainable.items()):
            if what == "original":
                self.out.problems.append(Problem(cfg.loc("unfrozen_parameters"), "unfrozen_parameters",
                                                 f"unfreezes {name}, the frozen original beside a modules_to_save copy "
                                                 "(it gets no gradient but takes optimizer memory)",
                                                 "narrow the pattern"))
                continue
            if what == "base_of_lora":
                self.out.problems.append(Problem(cfg.loc("unfrozen_parameters"), "unfrozen_parameters",
                                                 f"trains {base} fully beneath its own LoRA adapter: a spec puts a "
                                                 "module in one component, LoRA or full", "narrow the pattern"))
                continue
            plain = name[len(_PEFT):] if name.startswith(_PEFT) else name
            plain = plain.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
            if name.endswith("modules_to_save.default.weight") or "embed_tokens" in name or "lm_head" in name:
                lr, label = emb_value, ("embeddings" if emb_value != self.lr else None)
                src = self.src("embedding_lr_scale" if emb_scale else "embedding_lr", cfg.loc("learning_rate"))
            elif transformers_decays(plain, self.layernorm):
                hits = [m for m in lookup if m in name]
                if hits:
                    label = lookup[hits[0]]
                    lr = group_lr[label]
                    src = cfg.value_loc("lr_groups", group_index[label])
                else:
                    lr, label, src = self.lr, None, cfg.loc("learning_rate")
            else:
                lr, label, src = self.lr, None, cfg.loc("learning_rate")
                hits = [m for m in lookup if m in name]
                if hits:
                    skipped.setdefault(lookup[hits[0]], set()).add(base)
            if what == "lora":
                lora_lr.setdefault(base, set()).add((lr, label, src))
            else:
                origin = "copy" if what == "copy" else ("unfrozen" if cfg.has("unfrozen_parameters") else "full")
                full.setdefault((lr, label or origin, src), set()).add(base)
        return lora_lr, full, skipped

    def full_parts(self, full: dict[tuple, set]) -> None:
        """(lr, label, source) -> fully trained base params  ->  one full Part each, with its sources."""
        cfg = self.cfg
        for (lr, label, src), params in sorted(full.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            group = {"copy": "lora_modules_to_save (PEFT modules_to_save copies)",
                     "unfrozen": "unfrozen_parameters", "full": "all parameters (no adapter)",
                     "embeddings": "embeddings (embedding_lr / embedding_lr_scale)"}.get(label, f"lr_groups {label!r}")
            train_src = {"copy": cfg.loc("lora_modules_to_save"), "unfrozen": cfg.loc("unfrozen_parameters")}.get(
                label, self.src("unfrozen_parameters", f"{DEFAULT}: no adapter (full)"))
            self.sources[("lr", label)] = src
            self.sources[("train", label)] = train_src
            self.parts.append(Part(label, group, "full", lr, self.model.with_tied(params)))

    def lora_parts(self, lora_lr: dict[str, set]) -> None:
        """LoRA module -> the (lr, label, source)s of its weights  ->  one LoRA Part per (lr, label);
        a module whose weights fall in different lr groups is reported."""
        by_lr: dict[tuple, set[str]] = {}
        for module, values in lora_lr.items():
            if len(values) > 1:
                self.out.problems.append(Problem(self.cfg.loc("lr_groups"), "lr_groups",
                                                 f"the LoRA weights of {module} fall in different lr groups",
                                                 "a spec gives one lr per LoRA module; match whole modules"))
                continue
            (lr, label, src), = values
            by_lr.setdefault((lr, label or "lora", src), set()).add(module)
        for (lr, label, src), modules in sorted(by_lr.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            self.sources[("lr", label)] = src
            self.sources[("train", label)] = self.src("adapter", DEFAULT)
            group = "LoRA" if label == "lora" else f"LoRA in lr_groups {label!r}"
            self.parts.append(Part(label, group, "lora", lr, modules, lora=self.lora_settings))

    def embedding_decay_effect(self) -> None:
        """Notes that axolotl's optimizer does not decay embeddings where the spec's plan does."""
        wd = self.cfg.get("weight_decay", "float", 0.0)
        if wd:
            emb = sorted({b for p in self.parts if p.mode == "full" for b in p.names
                          if "embed_tokens" in b or "lm_head" in b})
            if emb:
                self.cfg.effect("weight_decay", "weight-decay-rule",
                                f"axolotl's optimizer gives embeddings no weight decay ({show(emb, 2)}); the spec's "
                                "plan decays them like any 2-D weight", "accept the difference, or set weight_decay: 0")

    # -- training, distributed, data -----------------------------------------------------
    def training(self) -> dict:
        cfg = self.cfg
        t: dict = {}

        def put(key, value, origin):
            self.put(t, key, value, origin)

        self.read(t, "epochs", "num_epochs", "float", 1.0, f"{DEFAULT}: 1.0")
        max_steps = cfg.get("max_steps", "int", None, allow_none=True)
        if max_steps and max_steps > 0:
            put("max_steps", max_steps, cfg.loc("max_steps"))
        self.read(t, "micro_batch_size", "micro_batch_size", "int", 1, f"{DEFAULT}: 1")
        self.read(t, "gradient_accumulation", "gradient_accumulation_steps", "int", 1, f"{DEFAULT}: 1")
        bf16 = cfg.raw("bf16", None)
        fp16 = cfg.get("fp16", "bool", None, allow_none=True)
        if bf16 in (True, "auto", "full"):
            put("precision", "bf16", cfg.loc("bf16"))
        elif fp16:
            put("precision", "fp16", cfg.loc("fp16"))
        else:
            put("precision", "fp32", self.src("bf16", f"{DEFAULT}: neither bf16 nor fp16"))
        gc = cfg.raw("gradient_checkpointing", False)
        put("gradient_checkpointing", bool(gc), self.src("gradient_checkpointing", f"{DEFAULT}: false"))
        if gc in ("offload", "offload_disk"):
            cfg.unmodelled("gradient_checkpointing", f"{gc}: activations offloaded; the spec plans them on the GPU")
        self.read(t, "max_length", "sequence_len", "int", 512, f"{DEFAULT}: 512")
        self.read(t, "weight_decay", "weight_decay", "float", 0.0, f"{DEFAULT}: 0.0")
        warmup = cfg.get("warmup_ratio", "float", None, allow_none=True)
        if warmup is not None and 0 <= warmup <= 1:
            put("warmup_ratio", warmup, cfg.loc("warmup_ratio"))
        if cfg.get("warmup_steps", "int", None, allow_none=True):
            cfg.unmodelled("warmup_steps", "the spec has warmup_ratio only")
        sched = cfg.get("lr_scheduler", "str", "cosine", allow_none=True) or "cosine"
        if sched in _SCHEDULERS:
            put("lr_scheduler", sched, self.src("lr_scheduler", f"{DEFAULT}: cosine"))
        else:
            cfg.error("lr_scheduler", f"lr_scheduler: {sched} cannot be expressed",
                      "a spec's lr_scheduler is one of " + ", ".join(_SCHEDULERS))
        self.read(t, "max_grad_norm", "max_grad_norm", "float", 1.0, "transformers default: 1.0")
        seed = cfg.get("seed", "int", None, allow_none=True)
        if seed is not None:
            put("seed", seed, cfg.loc("seed"))
        for key in ("logging_steps", "save_steps"):
            value = cfg.get(key, "float", None, allow_none=True)
            if value is not None and math.isfinite(value) and value >= 1:
                put(key, int(value), cfg.loc(key))
            elif value is not None:
                cfg.unmodelled(key, "a fraction of the run (or not a count): the spec counts steps")
        optim = cfg.get("optimizer", "str", "adamw_torch_fused", allow_none=True) or "adamw_torch_fused"
        chosen, why = spec_optimizer(optim)
        if chosen:
            put("optimizer", chosen, self.src("optimizer", f"{DEFAULT}: adamw_torch_fused"))
        else:
            cfg.error("optimizer", f"optimizer: {optim} cannot be expressed: {why}", OPTIMIZER_HINT)
        self.adam_settings(t)
        return t

    def distributed(self) -> dict:
        def by_name(path: str):
            # axolotl's own deepspeed_configs/zero{1,2,3}[_bf16][_cpuoffload...].json
            m = re.search(r"zero([0-3])(?:_bf16)?(_cpuoffload_all|_cpuoffload_params|_cpuoffload)?\.json$", path)
            if not m:
                return None
            return {"zero_stage": int(m.group(1)), "offload": {None: "none", "_cpuoffload": "optimizer"}.get(
                m.group(2), "all")}
        return self.deepspeed(by_name)

    def data(self) -> dict:
        cfg = self.cfg
        out = {}
        for key, spec_key in (("datasets", "train"), ("test_datasets", "eval")):
            value = cfg.raw(key, None)
            if not isinstance(value, list) or not value:
                continue
            first = value[0]
            path = first.get("path") if isinstance(first, dict) else None
            if isinstance(path, str) and path:
                out[spec_key] = path
                self.out.origins[f"data.{spec_key}"] = cfg.value_loc(key, 0)
            if len(value) > 1:
                cfg.unmodelled(key, f"a spec names one {spec_key} dataset: the others are not carried over")
        if "train" not in out:
            out.pop("eval", None)
        return out


def _effect(where, code, message, fix):
    from . import Effect

    return Effect(code, where, message, fix)
