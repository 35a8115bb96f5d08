"""mixspec import --from swift: what a ``swift sft`` command line really trains.

Reads a shell script (or one command line) holding ``swift sft ...``, resolves the model as
``mixspec plan`` does, and applies ms-swift's own selection rules over the model's real
module tree, each rule naming the swift function it mirrors (ms-swift 4.6.0 for
``--tuner_type``; 3.12.6 for 3.x's ``--train_type``):

- full tuner (``TunerMixin.prepare_model``, swift/pipelines/train/tuner.py): every parameter
  trainable, then ``freeze_parameters_ratio`` (the first parameters in model order), the
  ``freeze_parameters`` prefixes (plain ``str.startswith``, no dot boundary) with, on a
  multimodal model, the LLM / ViT / aligner prefixes of ``--freeze_llm/vit/aligner``
  (``TunerArguments._init_multimodal_full``), ``freeze_parameters_regex`` (``re.search``),
  then ``trainable_parameters`` prefixes (plus the aligner when ``--freeze_aligner false``)
  and ``trainable_parameters_regex`` unfreeze;
- LoRA (``get_target_modules``): ``--target_regex`` (a full-match regex), or ``all-linear``
  on a multimodal model = ``get_multimodal_target_regex`` over the parts the freeze flags
  leave (every other ``--target_modules`` entry ignored), on a text model
  ``find_all_linears``; a list matched by PEFT as dot-bounded suffixes; ``modules_to_save``
  (PEFT: a trained copy of every module whose name ends with an entry);
- ``lora_llm`` (4.x, swift/tuner_plugin/lora_llm.py): LoRA (rank, alpha only) on the LLM's
  linears, the whole ViT and aligner trained;
- learning rates: ``--vit_lr``/``--aligner_lr`` switch on the ``multimodal`` optimizer
  unless ``--optimizer`` is given (ViT = vision_tower minus aligner, aligner, and at
  --learning_rate the LLM: in 4.6 every other trainable parameter too, in 3.x only the
  language_model prefixes, the rest in no optimizer group); otherwise one LR for all.

Everything else it finds on the way becomes an Effect (with a fix) or an Unmodelled flag.
"""

from __future__ import annotations

import bisect
import difflib
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import Location, ModelSourceError, Problem, SpecError, quoted
from . import Effect, Imported, Unmodelled, tied_copies, tied_copy_text
from ._common import (
    DEEPSPEED_NOT_HERE,
    OPTIMIZER_HINT,
    BackendQuantization,
    find_file,
    quantize_imported,
    read_json,
    spec_optimizer,
    zero_settings,
)
from .shell import ASSIGNMENT, UnterminatedQuote, Word, expand, split_commands
from ..models.names import is_under, natural_key
from ..models.tree import EMBEDDING, LORA_KINDS, ModuleTree

RULES = {4: "ms-swift 4.x (rules of 4.6.0)", 3: "ms-swift 3.x (rules of 3.12.6)"}
DEFAULT = {4: "ms-swift 4.x default", 3: "ms-swift 3.x default"}

# flags whose value may stay unknown (computed by the shell): what each changes instead
_SHELL_UNKNOWN = {
    "gradient_accumulation_steps": "it sets the global batch", "num_train_epochs": "it sets the run's length",
    "max_steps": "it sets the run's length", "save_steps": "checkpoints", "logging_steps": "logging",
    "seed": "the random seed", "output_dir": "where checkpoints go", "dataset": "the data",
    "val_dataset": "the evaluation data",
}
# the training commands read here (`swift pt` parses SftArguments' subclass, same options)
_COMMANDS = {("swift", "sft"), ("swift", "pt"), ("swift", "rlhf")}
_MEGATRON = ("Megatron-SWIFT trains with Megatron-Core (tensor / pipeline / expert parallel shards, "
             "Megatron's module names and optimizer): mixspec import does not read it")
# swift's names for its tuner types that mixspec can say (others are refused)
_TUNERS = ("full", "lora", "lora_llm")
_GROUP_LABEL = {"vit": "ViT", "aligner": "aligner", "llm": "LLM", "other": "outside ViT/aligner/LLM",
                "all": "all trainable"}
_LR_FLAG = {"vit": "--vit_lr", "aligner": "--aligner_lr", "llm": "--learning_rate", "other": "--learning_rate",
            "all": "--learning_rate"}

# flags that say what trains, how, and with which settings: read here
_MODELLED = {
    "quant_method", "quant_bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
    "model", "model_type", "tuner_type", "train_type", "freeze_llm", "freeze_vit", "freeze_aligner",
    "freeze_parameters", "freeze_parameters_regex", "freeze_parameters_ratio", "trainable_parameters",
    "trainable_parameters_regex", "target_modules", "target_regex", "modules_to_save", "lora_rank", "lora_alpha",
    "lora_dropout", "use_rslora", "use_dora", "lora_bias", "learning_rate", "vit_lr", "aligner_lr", "optimizer",
    "optim", "lorap_lr_ratio", "use_galore", "torch_dtype", "bf16", "fp16", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "deepspeed", "num_train_epochs", "max_steps", "weight_decay",
    "warmup_ratio", "gradient_checkpointing", "lr_scheduler_type", "max_grad_norm", "seed", "logging_steps",
    "save_steps", "dataset", "val_dataset", "output_dir", "adam_beta1", "adam_beta2", "adam_epsilon", "max_pixels",
}
# flags that never change which parameters train or at which LR (listed, with this note)
_HARMLESS = {
    "template", "use_hf", "check_model", "report_to", "dataloader_num_workers", "eval_steps", "save_total_limit",
    "save_only_model", "split_dataset_ratio", "add_version", "system", "model_author", "model_name",
    "per_device_eval_batch_size", "logging_first_step", "dataloader_persistent_workers", "load_from_cache_file",
    "dataset_num_proc", "streaming", "eval_strategy", "save_strategy", "attn_impl", "padding_free", "packing",
    "vit_gradient_checkpointing", "use_liger_kernel", "external_plugins", "callbacks",
    "loss_scale", "truncation_strategy", "metric_for_best_model", "greater_is_better", "ddp_timeout",
    "create_checkpoint_symlink", "logging_dir", "run_name", "overwrite_output_dir", "model_kwargs",
}
_ENV_MODELLED = {"NPROC_PER_NODE", "NNODES", "CUDA_VISIBLE_DEVICES", "MAX_PIXELS", "NODE_RANK", "MASTER_ADDR",
                 "MASTER_PORT"}
_DS_BUILTIN = {"zero0": (0, "none"), "zero1": (1, "none"), "zero2": (2, "none"), "zero3": (3, "none"),
               "zero2_offload": (2, "optimizer"), "zero3_offload": (3, "all")}
_DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "float32": "fp32", "fp32": "fp32", "float": "fp32"}
_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
_TRUE = {"true", "1", "yes", "y", "t", "on"}
_FALSE = {"false", "0", "no", "n", "f", "off"}
_LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules",
               "target_regex", "modules_to_save", "lora_bias")
_FULL_FLAGS = ("freeze_parameters", "freeze_parameters_regex", "freeze_parameters_ratio", "trainable_parameters",
               "trainable_parameters_regex")


@dataclass
class Flag:
    name: str
    where: Location
    values: list  # Words after it (expanded); [] for a bare flag
    spelled: str  # as written, e.g. "--vit_lr"


class _Fail(Exception):
    """A located problem that stops the import (collected, then reported)."""


@dataclass
class _Truth:
    """What swift trains: each fully trained base parameter and each LoRA module, with its LR
    and the group (vit/aligner/llm/other/all) that gave it."""

    full: dict = field(default_factory=dict)  # param -> (lr, group)
    lora: dict = field(default_factory=dict)  # module -> (lr, group)
    copies: list = field(default_factory=list)  # modules_to_save modules (trained as copies)
    lora_settings: Optional[dict] = None


# -- reading the command line ----------------------------------------------------------------
class _Reader:
    def __init__(self, text: str, path: str):
        self.text = text
        self.path = path
        self.imp = Imported(backend="swift", rules="", spec={})
        self.flags: dict[str, Flag] = {}
        self.env: dict[str, tuple[str, Location, bool]] = {}  # name -> (value, where, exported)
        self.version = 4
        self.command = "sft"
        self.unknown: dict[str, Word] = {}  # flags whose value the shell computes (see unknown_value)
        self.rlhf_type = ""

    def loc(self, word: Word) -> Location:
        return Location(self.path, word.line, word.col)

    def problem(self, where: Location, key: str, message: str, hint: str = "") -> None:
        self.imp.problems.append(Problem(where, key, message, hint))

    def effect(self, code: str, where: Location, message: str, fix: str) -> None:
        self.imp.effects.append(Effect(code, where, message, fix))

    # the swift command and its environment
    def find_command(self) -> Optional[list[Word]]:
        shell_vars: dict[str, str] = {}
        found = []
        seen: list[list[Word]] = []  # other swift / megatron commands
        try:
            commands = split_commands(self.text)
        except UnterminatedQuote as exc:
            raise _Fail(Problem(Location(self.path, exc.line, exc.col), "",
                                f"this {exc.quote} quote is never closed", "close it (the shell would stop here)"))
        for words in commands:
            head = 0
            assigns = []
            while head < len(words) and ASSIGNMENT.match(words[head].text.replace("\0", "$")):
                assigns.append(words[head])
                head += 1
            rest = words[head:]
            if rest and rest[0].text == "export":
                for w in rest[1:]:
                    w = expand(w, shell_vars)
                    m = ASSIGNMENT.match(w.text)
                    if m:
                        shell_vars[m.group(1)] = m.group(2)
                        self.env[m.group(1)] = (m.group(2), self.loc(w), True)
                    elif w.text in shell_vars:  # export NAME after NAME=value
                        self.env[w.text] = (shell_vars[w.text], self.loc(w), True)
                continue
            if not rest:
                for w in assigns:
                    w = expand(w, shell_vars)
                    m = ASSIGNMENT.match(w.text)
                    shell_vars[m.group(1)] = m.group(2)
                    if m.group(1) in _ENV_MODELLED and m.group(1) not in self.env:
                        self.env[m.group(1)] = (m.group(2), self.loc(w), False)
                continue
            launcher = Path(rest[0].text).name if len(rest) >= 2 else ""
            if launcher in ("swift", "megatron") and (launcher, rest[1].text) not in _COMMANDS:
                seen.append(rest)
                continue
            if (launcher, rest[1].text if len(rest) >= 2 else "") in _COMMANDS:
                cmd_env = {}
                for w in assigns:
                    w = expand(w, shell_vars)
                    m = ASSIGNMENT.match(w.text)
                    cmd_env[m.group(1)] = (m.group(2), self.loc(w), True)
                found.append((rest, cmd_env, dict(shell_vars)))
        if not found:
            self._no_command(seen)
            return None
        if len(found) > 1:
            lines = ", ".join(str(cmd[0][0].line) for cmd in found)
            self.problem(self.loc(found[1][0][0]), "", f"{len(found)} `{'/'.join(sorted({'swift ' + c[0][1].text for c in found}))}` commands (lines {lines}); "
                         "mixspec import reads one", "cut the one to import into its own file, or pipe it: "
                         "sed -n 'A,Bp' FILE | mixspec import --from swift -")
            return None
        words, cmd_env, shell_vars = found[0]
        self.command = words[1].text
        self.env.update(cmd_env)
        self.vars = shell_vars
        return words

    def _no_command(self, seen: list[list[Word]]) -> None:
        if not seen:
            self.problem(Location(self.path, 1, 1), "", "no `swift sft` command found (nor `swift pt` / `swift rlhf`)",
                         "give a shell script or a command line that runs `swift sft ...`")
            return
        words = seen[0]
        what = f"{Path(words[0].text).name} {words[1].text}"
        why = (_MEGATRON if words[0].text.endswith("megatron") else
               "which trains nothing (mixspec import reads `swift sft`, `swift pt` and `swift rlhf`)")
        self.problem(self.loc(words[0]), "", f"this is `{what}`" + (": " if "megatron" in what else ", ") + why,
                     "import the `swift sft` run it belongs to" if not words[0].text.endswith("megatron") else
                     "to audit what trains, import the same flags as a `swift sft` command line (Megatron's "
                     "--tuner_type defaults to full, swift sft's to lora)")

    def parse_flags(self, words: list[Word]) -> None:
        current: Optional[Flag] = None
        for raw in words[2:]:
            w = expand(raw, self.vars)
            if w.text.startswith("--") and len(w.text) > 2 and not w.unresolved:
                name, eq, value = w.text[2:].partition("=")
                name = name.replace("-", "_")
                if name in self.flags:
                    prev = self.flags[name]
                    self.effect("flag-repeated", self.loc(w),
                                f"--{name} is given again (first at {prev.where}); swift takes the last one",
                                f"remove one of the two --{name}")
                current = Flag(name, self.loc(w), [], w.text.partition("=")[0])
                if eq:
                    current.values.append(Word(value, w.line, w.col + len(name) + 3, value))
                self.flags[name] = current
                continue
            if "$@" in w.unresolved or "$*" in w.unresolved:
                self.imp.unmodelled.append(Unmodelled(self.loc(w), w.raw or w.text,
                                                      "the script's own arguments reach swift here (they override)"))
                current = None
                continue
            if current is None:
                self.imp.unmodelled.append(Unmodelled(self.loc(w), w.text, "a word before any --flag"))
                continue
            current.values.append(w)

    # typed values -----------------------------------------------------------------------
    def _value(self, name: str) -> Optional[Word]:
        flag = self.flags.get(name)
        if flag is None:
            return None
        if not flag.values:
            return Word("", flag.where.line, flag.where.col)
        word = flag.values[0]
        if word.unresolved and name in _SHELL_UNKNOWN:
            self.unknown_value(name, word)
            return None
        if word.unresolved:
            raise _Fail(Problem(self.loc(word), f"--{name}",
                                f"its value {word.raw or word.text!r} depends on {', '.join(word.unresolved)}, "
                                + ("a command mixspec does not run" if any(u.startswith("$(") for u in word.unresolved)
                                   else "which this file does not set") + " (mixspec needs it: it can change what trains, an LR or "
                                "the memory)",
                                "set the variable in the file, or write the value itself"))
        if len(flag.values) > 1:
            raise _Fail(Problem(self.loc(flag.values[1]), f"--{name}",
                                f"takes one value, got {len(flag.values)}: {' '.join(v.text for v in flag.values)}",
                                "quote a value with spaces; give list values only to list flags"))
        return word

    def unknown_value(self, name: str, word: Word) -> None:
        """A value the shell computes and mixspec cannot (``$(nproc)``, an unset variable) on a
        flag that changes neither what trains nor an LR nor the memory per GPU: listed as
        unknown, the default stands in the spec."""
        if name not in self.unknown:
            self.unknown[name] = word
            self.imp.unmodelled.append(Unmodelled(
                self.loc(word), f"--{name} {word.raw or word.text}",
                f"unknown: the value depends on {', '.join(word.unresolved)}, which mixspec does not evaluate; the "
                f"spec keeps the default ({_SHELL_UNKNOWN[name]}, not what trains, the LRs or the memory per GPU)"))

    def get_str(self, name: str, default=None):
        w = self._value(name)
        if w is None:
            return default
        if not w.text:
            raise _Fail(Problem(self.flags[name].where, f"--{name}", "needs a value"))
        return w.text

    def get_bool(self, name: str, default: bool) -> bool:
        w = self._value(name)
        if w is None:
            return default
        if not w.text:  # a bare --flag: HfArgumentParser reads it as true
            return True
        low = w.text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _Fail(Problem(self.loc(w), f"--{name}", f"must be true or false (got {w.text!r})"))

    def get_num(self, name: str, default, kind=float):
        w = self._value(name)
        if w is None:
            return default
        try:
            value = kind(w.text)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError
        except ValueError:
            raise _Fail(Problem(self.loc(w), f"--{name}",
                                f"must be {'an integer' if kind is int else 'a number'} (got {w.text!r})")) from None
        return value

    def get_list(self, name: str) -> Optional[list[Word]]:
        flag = self.flags.get(name)
        if flag is None:
            return None
        for w in flag.values:
            if w.unresolved and name in _SHELL_UNKNOWN:
                self.unknown_value(name, w)
                return None
            if w.unresolved:
                raise _Fail(Problem(self.loc(w), f"--{name}",
                                    f"value {w.raw or w.text!r} depends on {', '.join(w.unresolved)}, which this "
                                    "file does not set", "set the variable in the file, or write the value"))
        return list(flag.values)

    def origin(self, name: str) -> str:
        if name in self.unknown:
            return f"{self.loc(self.unknown[name])} --{name}: unknown ({self.unknown[name].raw}), default used"
        flag = self.flags.get(name)
        if flag is not None:
            return f"{flag.where} {flag.spelled}"
        return f"{DEFAULT[self.version]} (--{name})"


# -- a train.sh mixspec compiled with its plugin (--tuner_type mixspec) -------------------------
PLUGIN = "mixspec"  # targets/swift.py PLUGIN_NAME: the tuner and optimizer mixspec_plugin.py registers


def _plugin_data(r: _Reader) -> tuple[dict, Path]:
    """The Plan blocks of the --external_plugins file (literals, read with ast: never run)."""
    import ast

    flag = r.flags.get("external_plugins")
    if flag is None or not flag.values:
        raise _Fail(Problem(r.flags["tuner_type" if r.version >= 4 else "train_type"].where, "--external_plugins",
                            f"tuner {PLUGIN!r} is registered by mixspec_plugin.py, and no --external_plugins "
                            "names it", "import the train.sh mixspec wrote, beside its mixspec_plugin.py"))
    word = flag.values[0]
    name = Path((word.raw or word.text).strip("\"'")).name  # "$HERE/mixspec_plugin.py": the script's directory
    bases = ([] if r.path.startswith("<") else [Path(r.path).resolve().parent]) + [Path.cwd()]
    found = find_file(str(b / name) for b in bases)
    if found is None:
        raise _Fail(Problem(r.loc(word), "--external_plugins", f"{name} is not beside the script: it holds what "
                            "this run trains", "import the train.sh in the directory mixspec compiled it to"))
    values = {}
    try:
        for node in ast.parse(Path(found).read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id in ("SWIFT_VERSION", "PLAN_FINGERPRINT", "PLAN_MODEL", "LORA", "COMPONENTS"):
                values[node.targets[0].id] = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Fail(Problem(r.loc(word), "--external_plugins", f"cannot read the Plan in {name}: {exc}")) from None
    if "COMPONENTS" not in values:
        raise _Fail(Problem(r.loc(word), "--external_plugins", f"{name} is not a mixspec plugin (no COMPONENTS)",
                            "give the mixspec_plugin.py that mixspec compile wrote"))
    return values, Path(found)


def _from_plugin(r: _Reader, tuner: str) -> None:
    """What a mixspec-compiled train.sh trains: the plugin's COMPONENTS (each parameter's
    component, mode, LR and weight decay) and LORA (one adapter's settings), as a spec of
    exact pattern components; the plugin's own fingerprint checks the result."""
    from ..models.names import expand_names
    from ..planning.resolve import covering
    from ..targets._common import exact_regex

    data, where = _plugin_data(r)
    tree = r.tree
    all_names = list(tree.param_shapes)
    alias_of = defaultdict(list)
    for alias, canon in tree.tied.items():
        alias_of[canon].append(alias)
    truth, components = _Truth(), {}
    lora = data.get("LORA") or {}
    truth.lora_settings = {"rank": lora.get("r"), "alpha": lora.get("lora_alpha"), "dropout": lora.get("lora_dropout"),
                           "rslora": lora.get("use_rslora"), "dora": lora.get("use_dora")}
    for c in data["COMPONENTS"]:
        names = sorted(expand_names(c["params"]), key=natural_key)
        name = _free_name(components, c["name"] + ("_part" if c["name"] in r.roles.prefixes else ""))
        comp = {"train": c["mode"], "lr": c["lr"], "weight_decay": c["weight_decay"]}
        if c["mode"] == "lora":
            mods = sorted({n.split(".lora_A.")[0] for n in names if ".lora_A." in n}, key=natural_key)
            comp["modules"] = _patterns(mods, exact_regex)
            comp["lora"] = {k: truth.lora_settings[k] for k in ("rank", "alpha", "dropout")}
            comp["lora"].update({k: True for k in ("rslora", "dora") if truth.lora_settings[k]})
            comp["lora"]["targets"] = "all-linear"
            comp["_targets"] = mods
            truth.lora.update((m, (c["lr"], "all")) for m in mods)
        else:
            params = set(names) | {a for n in names for a in alias_of.get(n, ())}
            comp["modules"] = _patterns(covering(params, all_names), exact_regex)
            truth.full.update((n, (c["lr"], "all")) for n in names if n not in tree.tied)
        components[name] = comp
        r.imp.groups[name] = f"mixspec plugin: component {c['name']}"
        r.imp.origins[f"components.{name}"] = f"{where.name} COMPONENTS {c['name']}"
    r.imp.spec = {"version": 1, "model": r.source.path if r.source.kind == "local" else r.source.ref,
                  "components": components}
    r.imp.origins["model"] = r.origin("model")
    _training(r, r.imp.spec, tuner)
    _env_and_unmodelled(r)
    r.imp.unmodelled = [u for u in r.imp.unmodelled if not u.key.startswith(("--external_plugins", "--optimizer"))]
    r.imp.unmodelled.sort(key=lambda u: (u.where.line, u.where.col))
    if not r.imp.ok:
        return
    r.imp.plan = _verify(r, truth)
    if r.imp.plan is not None and r.imp.plan.fingerprint() != data.get("PLAN_FINGERPRINT"):
        r.imp.problems.append(Problem(r.flags["external_plugins"].where, "--external_plugins", (
            f"the Plan read from {where.name} does not give its own fingerprint {data.get('PLAN_FINGERPRINT')} "
            f"(got {r.imp.plan.fingerprint()}): the plugin was edited, or compiled for another model"),
            "compile the spec again"))
        r.imp.plan = None


# -- flag names: ms-swift's parser stops on any option it does not define ---------------------
# names of earlier ms-swift versions: ReleaseNote3.0.md ("... is renamed to ...") for 2.x -> 3.x,
# Command-line-parameters.md of 4.0 ("In ms-swift 3.x, the parameter name is train_type")
_RENAMED = {  # old name -> (its version, the name in 3.x, the name in 4.x)
    "sft_type": ("2.x", "train_type", "tuner_type"), "model_id_or_path": ("2.x", "model", "model"),
    "template_type": ("2.x", "template", "template"), "quantization_bit": ("2.x", "quant_bits", "quant_bits"),
    "check_model_is_latest": ("2.x", "check_model", "check_model"),
    "batch_size": ("2.x", "per_device_train_batch_size", "per_device_train_batch_size"),
    "eval_batch_size": ("2.x", "per_device_eval_batch_size", "per_device_eval_batch_size"),
    "use_flash_attn": ("2.x", "attn_impl", "attn_impl"),
    "bnb_4bit_comp_dtype": ("2.x", "bnb_4bit_compute_dtype", "bnb_4bit_compute_dtype"),
    "dtype": ("2.x", "torch_dtype", "torch_dtype"), "add_output_dir_suffix": ("2.x", "add_version", "add_version"),
    "lora_target_modules": ("2.x", "target_modules", "target_modules"),
    "train_type": ("3.x", "train_type", "tuner_type"),
}


def _check_flag_names(r: _Reader) -> bool:
    """Every flag must be one the command's ms-swift parser defines (argparse also takes a
    unique prefix, and ``--no_X`` for a boolean X that defaults to true): a located problem
    for each other one, with did-you-mean or the name it was renamed to. False if any."""
    from ._swift_keys import RLHF_3, RLHF_4, SFT_3, SFT_4

    version = 3 if "train_type" in r.flags and "tuner_type" not in r.flags else 4
    known = {(3, False): SFT_3, (4, False): SFT_4, (3, True): RLHF_3, (4, True): RLHF_4}[
        (version, r.command == "rlhf")]
    lenient = "ignore_args_error" in r.flags and r.get_bool("ignore_args_error", False)
    ok = True
    for name, flag in list(r.flags.items()):
        if name.startswith("no_") and name in known and name[3:] in known:  # store_false of a true default
            if flag.values:
                r.problem(r.loc(flag.values[0]), flag.spelled, "takes no value: argparse leaves "
                          f"{flag.values[0].text!r} over and ms-swift stops (remaining_argv)",
                          f"write {flag.spelled} alone, or --{name[3:]} false")
                ok = False
                continue
            flag.values = [Word("false", flag.where.line, flag.where.col)]
            _rename_flag(r, name, name[3:])
            continue
        if name in known:
            continue
        longer = sorted(k for k in known if k.startswith(name))
        if len(longer) == 1 and longer[0] not in r.flags:  # argparse's allow_abbrev
            r.effect("flag-abbreviated", flag.where, f"{flag.spelled} is not a swift option, but argparse reads "
                     f"it as the only one it begins: --{longer[0]}", f"write --{longer[0]}")
            _rename_flag(r, name, longer[0])
        elif lenient:
            r.effect("flag-ignored", flag.where, f"{flag.spelled}: ms-swift has no such option; with "
                     "--ignore_args_error it warns (remaining_argv) and goes on without it", f"remove {flag.spelled}")
            del r.flags[name]
        else:
            r.problem(flag.where, flag.spelled, *_unknown_flag_text(name, known, version, longer))
            ok = False
    return ok


def _unknown_flag_text(name: str, known, version: int, longer: list) -> tuple[str, str]:
    stop = f"ms-swift {version}.x has no such option and stops on it (ValueError: remaining_argv)"
    if name in _RENAMED:
        old, new3, new4 = _RENAMED[name]
        if name == new3:  # 3.x's own name, given beside --tuner_type
            return (f"this is the ms-swift 3.x name of --tuner_type: {stop}",
                    "keep --tuner_type (ms-swift 4.x), or only --train_type (3.x)")
        if new3 == new4:
            return f"this is the ms-swift {old} name of --{new4}: {stop}", f"write --{new4}"
        return (f"this is the ms-swift {old} name of --{new4} (--{new3} in 3.x): {stop}",
                f"write --{new4} (ms-swift 4.x) or --{new3} (3.x)")
    if len(longer) > 1:
        return (f"an ambiguous abbreviation of {', '.join('--' + k for k in longer[:4])}"
                + (" and more" if len(longer) > 4 else "") + ": argparse stops", "write the option in full")
    from ._swift_keys import RLHF_4

    if name in RLHF_4:
        return stop, f"--{name} is a `swift rlhf` option: this command is `swift sft`/`swift pt`"
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return stop, (f"did you mean --{close[0]}?" if close else "remove it, or check it against ms-swift's "
                  "Command-line-parameters.md")


def _rename_flag(r: _Reader, old: str, new: str) -> None:
    flag = r.flags.pop(old)
    flag.name = new
    r.flags[new] = flag


def _rlhf(r: _Reader, tuner: str) -> None:
    """`swift rlhf`: the policy model's trainable set and LRs come from the same tuner, freeze
    and LR flags as `swift sft` (RLHFArguments extends SftArguments); what the Plan leaves out
    is said. Reward-model and PPO training add a value head (a new Linear) the tree lacks."""
    kind = r.get_str("rlhf_type", "dpo")
    where = r.flags["rlhf_type"].where if "rlhf_type" in r.flags else Location(r.path, *_first_pos(r))
    if kind in ("rm", "ppo"):
        raise _Fail(Problem(where, "--rlhf_type", f"--rlhf_type {kind} trains a new value head "
                            "(a Linear from the hidden size to 1) the model has not got; mixspec plans the model's "
                            "own modules", "import the dpo/kto/cpo/orpo/simpo/grpo/gkd runs only"))
    extra = []
    if kind in ("dpo", "kto", "grpo") and tuner == "full":
        extra.append("a frozen reference copy of the model (full tuner; for grpo unless --beta 0), not in the "
                     "memory estimate")
    if kind in ("gkd",) or "teacher_model" in r.flags:
        extra.append("the frozen teacher model, not in the memory estimate")
    if kind == "grpo":
        extra.append("generation (rollouts) and its KV cache or vLLM engine")
    r.effect("rlhf", where, f"swift rlhf --rlhf_type {kind}: the trainable parameters and their LRs are imported "
             "(same tuner, freeze and LR flags as swift sft) and planned as supervised training; not in the Plan: "
             f"the {kind} loss" + "".join(f"; {e}" for e in extra),
             "read the Plan for what trains; budget memory for the rest yourself")
    r.rlhf_type = kind


# -- swift's rules over the module tree -------------------------------------------------------
def _norm_digits(name: str) -> str:
    return re.sub(r"\d+\.", "{}.", name)


def find_all_linears(tree: ModuleTree, root: str, extra_embedding: bool = False) -> set[str]:
    """swift.utils.find_all_linears over the module ``root`` (``""``: the whole model): the
    suffix names of its Linear-like modules (class name containing 'linear'), never one whose
    name contains lm_head/score/v_head/classifier, each suffix made long enough that no other
    module of ``root`` ends with it (swift.utils.find_layers)."""
    ignore = ("lm_head", "score", "v_head", "classifier", "lora_A", "lora_B", "base_layer")

    def cond(name: str, m) -> bool:
        cls = m.type.lower()
        is_layer = (extra_embedding and m.kind == EMBEDDING) or (
            "linear" in cls and "glulinear" not in cls and "gemma4clippablelinear" not in cls)
        return is_layer and all(layer not in name for layer in ignore)

    under = [m for m in tree.modules if m.name == root or not root or m.name.startswith(root + ".")]
    rel = [((m.name[len(root) + 1:] if root and m.name != root else ("" if root else m.name)), m) for m in under]
    inner = {_norm_digits(name) for name, m in rel if not cond(_norm_digits(name), m)}
    found = set()
    for name, m in rel:
        if not cond(name, m):
            continue
        parts = name.split(".")
        leaf = parts.pop()
        for node in inner:
            while parts and node.endswith(_norm_digits(leaf)):
                leaf = f"{parts.pop()}.{leaf}"
        found.add(leaf)
    return found


def multimodal_target_regex(tree: ModuleTree, sw, freeze_llm=False, freeze_vit=True, freeze_aligner=True,
                            include_embedding=False) -> str:
    """swift.utils.get_multimodal_target_regex: LoRA targets of the parts the freeze flags
    leave, aligners nested in an included part excluded, lm_head never."""
    modules = ((() if freeze_llm else sw.language_model) + (() if freeze_vit else sw.vision_tower)
               + (() if freeze_aligner else sw.aligner))
    if not modules:
        raise ValueError("nothing left to put LoRA on")
    res = []
    for module in modules:
        rejected = [a for a in sw.aligner if a.startswith(f"{module}.")] if (not freeze_vit or not freeze_llm) else []
        info = tree.by_name.get(module)
        if info is None:
            continue
        if "linear" in info.type.lower() and module.endswith("lm_head"):
            targets = set()
        else:
            targets = find_all_linears(tree, module, include_embedding)
        if not targets:
            continue
        rejected_pattern = rf'(?!({"|".join(rejected)}))' if rejected else ""
        module_pattern = rf"{rejected_pattern}{re.escape(module)}"
        if "" in targets:
            res.append(module_pattern)
        names = sorted(t for t in targets if t)
        if names:
            res.append(rf'{module_pattern}(?=\.).*\.({"|".join(names)})')
    return rf'^({"|".join(res)})$'


def _starts(name: str, prefixes) -> bool:
    return any(name.startswith(p) for p in prefixes)


def _human(n: int) -> str:
    return f"{n:,}"


# -- the import -----------------------------------------------------------------------------
def read(text: str, path: str) -> Imported:
    """Read a `swift sft` command line (a shell script) as ms-swift would run it."""
    r = _Reader(text, path)
    try:
        _read(r)
    except _Fail as exc:
        r.imp.problems.append(exc.args[0])
    return r.imp


def _read(r: _Reader) -> None:
    """The swift command line in r -> r.imp filled: problems, effects, the spec and its verified Plan."""
    words = r.find_command()
    if words is None:
        return
    r.parse_flags(words)
    if not _check_flag_names(r):
        return
    tuner = _tuner(r)
    tree, sw, roles, source = _model(r, words)
    multimodal = bool(sw and sw.multimodal)
    if tuner == PLUGIN:  # a train.sh mixspec compiled: its plugin holds the Plan
        r.tree, r.sw, r.roles, r.source = tree, sw, roles, source
        _from_plugin(r, tuner)
        return

    truth = _Truth()
    lr, vit_lr, aligner_lr, lr_mode = _learning_rates(r, tuner, multimodal)
    all_params = [p for p in tree.param_shapes if p not in tree.tied]
    r.tree, r.sw, r.roles, r.source = tree, sw, roles, source
    trainable_full = _trainable(r, truth, tuner, all_params, multimodal)
    lrs = {"vit": vit_lr if vit_lr is not None else lr, "aligner": aligner_lr if aligner_lr is not None else lr,
           "llm": lr, "all": lr}
    _group_lrs(r, truth, trainable_full, all_params, lr_mode, lrs)
    _lr_effects(r, truth, lr_mode, vit_lr, aligner_lr, lr, tuner)
    _lm_head_effects(r, tuner, truth)
    _spec_and_plan(r, truth, lr_mode, tuner)


def _tuner(r: _Reader) -> str:
    """The flags in r -> the tuner (full, lora, lora_llm or the plugin); sets r.version and the rules,
    reads an rlhf command's flags; a tuner mixspec cannot express stops the import."""
    flags = r.flags
    r.version = 3 if "train_type" in flags else 4
    r.imp.rules = RULES[r.version]
    tuner_flag = "train_type" if r.version == 3 else "tuner_type"
    tuner = r.get_str(tuner_flag, "lora")
    if tuner not in _TUNERS and tuner != PLUGIN:
        raise _Fail(Problem(flags[tuner_flag].where, f"--{tuner_flag}",
                            f"tuner {tuner!r}: mixspec expresses full, lora and lora_llm training only",
                            "a spec has train: full / lora / freeze per component"))
    if r.command == "rlhf":
        _rlhf(r, tuner)
    if tuner == "lora_llm" and r.version == 3:
        raise _Fail(Problem(flags[tuner_flag].where, "--train_type",
                            "ms-swift 3.x has no lora_llm tuner (it came with 4.0: --tuner_type lora_llm)",
                            "on 3.x, lora_llm's behaviour needs a plugin (--train_type custom), which mixspec "
                            "import cannot read; use --tuner_type with ms-swift 4.x"))
    return tuner


def _model(r: _Reader, words: list[Word]):
    """--model (resolved as `mixspec plan` resolves a spec's model) -> (tree, swift's layout or None,
    roles, source); a multimodal family whose swift layout mixspec does not know stops the import."""
    flags = r.flags
    model_ref = r.get_str("model")
    if model_ref is None:
        raise _Fail(Problem(Location(r.path, words[0].line, words[0].col), "--model", "no --model given",
                            "swift sft needs --model (a hub id or a local directory)"))
    from ..models.sources import find_model
    from ..models.tree import get_tree

    base_dir = None if r.path.startswith("<") else Path(r.path).resolve().parent
    model_word = r._value("model")
    try:
        source = find_model(model_ref, base_dir=base_dir)
        tree = get_tree(source)
    except ModelSourceError as exc:
        raise _Fail(Problem(r.loc(model_word), "--model", exc.message, exc.hint)) from None
    from ..models.registry import find_roles
    from ..targets.swift import SWIFT_MODELS

    sw = SWIFT_MODELS.get(tree.model_type)
    roles = find_roles(tree)
    if sw is None and "vision" in roles.prefixes:
        raise _Fail(Problem(r.loc(model_word), "--model",
                            f"mixspec does not know ms-swift's module layout (model_arch: ViT/aligner/LLM "
                            f"prefixes) for model_type {tree.model_type!r}, which freeze_*, all-linear and "
                            "vit_lr/aligner_lr depend on",
                            "families known: " + ", ".join(sorted(SWIFT_MODELS))))
    mt = r.get_str("model_type")
    if mt is not None and sw is not None and mt != sw.model_type:
        r.effect("model-type", flags["model_type"].where,
                 f"--model_type {mt} is not the ms-swift model type mixspec knows for this {tree.model_type} "
                 f"config ({sw.model_type}); its module layout is read as {sw.model_type}'s",
                 f"use --model_type {sw.model_type}")
    return tree, sw, roles, source


def _learning_rates(r: _Reader, tuner: str, multimodal: bool):
    """The LR and optimizer flags -> (lr, vit_lr, aligner_lr, lr_mode 'single' or 'multimodal');
    sets r.optimizer; an optimizer mixspec cannot express stops the import."""
    flags = r.flags
    lr_default = 1e-5 if tuner == "full" else 1e-4
    lr = r.get_num("learning_rate", lr_default)
    vit_lr = r.get_num("vit_lr", None)
    aligner_lr = r.get_num("aligner_lr", None)
    optimizer = r.get_str("optimizer")
    for name in ("learning_rate", "vit_lr", "aligner_lr"):
        value = {"learning_rate": lr, "vit_lr": vit_lr, "aligner_lr": aligner_lr}[name]
        if value is not None and value <= 0:
            raise _Fail(Problem(flags[name].where, f"--{name}", f"must be > 0 (got {value!r})",
                                "a part that should not train is frozen, not given LR 0"))
    if r.get_num("lorap_lr_ratio", None) or r.get_bool("use_galore", False):
        flag = flags.get("lorap_lr_ratio") or flags["use_galore"]
        raise _Fail(Problem(flag.where, flag.spelled, "LoRA+ / GaLore optimizers: mixspec cannot express them",
                            "remove it to import the rest"))
    if optimizer not in (None, "default", "multimodal"):
        raise _Fail(Problem(flags["optimizer"].where, "--optimizer",
                            f"optimizer plugin {optimizer!r}: mixspec expresses AdamW with per-part LRs only"))
    optim = r.get_str("optim", "adamw_torch")
    r.optimizer, why = spec_optimizer(optim)  # swift's optimizers build transformers' optim class
    if r.optimizer is None:
        raise _Fail(Problem(flags["optim"].where, "--optim", f"{optim!r}: {why}", OPTIMIZER_HINT))
    lr_mode = _lr_mode(r, optimizer, lr, vit_lr, aligner_lr)
    if lr_mode == "multimodal" and not multimodal:
        raise _Fail(Problem((flags.get("vit_lr") or flags.get("aligner_lr") or flags["optimizer"]).where, "--vit_lr",
                            "swift's multimodal optimizer needs a multimodal model with a ViT and an aligner",
                            "use --learning_rate alone on a text model"))
    return lr, vit_lr, aligner_lr, lr_mode


def _lr_mode(r: _Reader, optimizer, lr, vit_lr, aligner_lr) -> str:
    """--optimizer and the per-part LRs -> 'multimodal' when swift's multimodal optimizer gives
    them, else 'single' (noting a per-part LR another --optimizer ignores)."""
    if vit_lr is not None or aligner_lr is not None:
        if optimizer is None or optimizer == "multimodal":
            return "multimodal"
        for name in ("vit_lr", "aligner_lr"):
            if name in r.flags:
                r.effect("lr-ignored", r.flags[name].where,
                         f"--{name} has no effect: --optimizer {optimizer} replaces swift's multimodal optimizer, "
                         f"so every trainable parameter gets --learning_rate {lr:g}",
                         "remove --optimizer (swift then chooses its multimodal optimizer)")
        return "single"
    return "multimodal" if optimizer == "multimodal" else "single"


def _trainable(r: _Reader, truth: _Truth, tuner: str, all_params: list[str], multimodal: bool) -> set[str]:
    """The tuner and its flags -> the base parameters trained in full (LoRA modules go into truth)."""
    trainable_full: set[str] = set()
    if tuner == "full":
        trainable_full = _full_trainable(r, all_params, multimodal)
        _flags_not_applying(r, _LORA_FLAGS, "full", "LoRA tuners (lora, lora_llm)")
    elif tuner == "lora":
        _lora_targets(r, truth, multimodal)
        _flags_not_applying(r, _FULL_FLAGS, "lora", "the full tuner")
    else:  # lora_llm
        trainable_full = _lora_llm(r, truth)
    return trainable_full


def _group_lrs(r: _Reader, truth: _Truth, trainable_full: set[str], all_params: list[str], lr_mode: str,
               lrs: dict) -> None:
    """What trains -> truth.full / truth.lora with each one's (LR, swift optimizer group); notes
    tensors in no group (3.x) and a run that trains nothing."""
    def group_of(name: str) -> str:
        if lr_mode != "multimodal":
            return "all"
        from ..targets.swift import swift_group

        g = swift_group(name, r.sw)
        return "llm" if g == "other" and r.version >= 4 else g

    dropped: list[str] = []
    for p in sorted(trainable_full):
        g = group_of(p)
        if g == "other":  # 3.x: in no optimizer group
            dropped.append(p)
            continue
        truth.full[p] = (lrs[g], g)
    for m in list(truth.lora):
        g = group_of(m)
        if g == "other":
            dropped.append(m)
            del truth.lora[m]
            continue
        truth.lora[m] = (lrs[g], g)
    for m in truth.copies:
        for p in _params_under(all_params, m):
            g = group_of(p)
            if g == "other":
                dropped.append(p)
                continue
            truth.full[p] = (lrs[g], g)
    if dropped:
        flags = r.flags
        where = (flags.get("vit_lr") or flags.get("aligner_lr") or flags.get("optimizer")).where
        r.effect("no-optimizer", where,
                 f"{len(dropped)} trainable tensors ({_few(dropped)}) lie outside swift's ViT/aligner/LLM prefixes; "
                 "ms-swift 3.x's multimodal optimizer puts them in no group, so they get gradients and never change",
                 "freeze them, or upgrade to ms-swift 4.6 (which trains them at --learning_rate)")
    if not truth.full and not truth.lora:
        r.effect("nothing-trained", Location(r.path, *_first_pos(r)),
                 "no parameter is trainable: swift stops or trains nothing",
                 "check the freeze flags against: mixspec tree " + r.source.ref)


def _spec_and_plan(r: _Reader, truth: _Truth, lr_mode: str, tuner: str) -> None:
    """What swift trains -> r.imp's spec, origins, groups, training settings, and (when nothing
    stopped it) the Plan verified against truth, quantized as the command asks."""
    spec, origins, groups = _build_spec(r, truth, lr_mode, tuner)
    r.imp.spec = spec
    r.imp.origins.update(origins)
    r.imp.groups.update(groups)
    _training(r, spec, tuner)
    _env_and_unmodelled(r)
    r.imp.unmodelled.sort(key=lambda u: (u.where.line, u.where.col))
    if not r.imp.ok:
        return
    plan = _verify(r, truth)
    quant = _quantization(r)
    if plan is not None and quant is not None:
        plan = quantize_imported(r.imp, r.tree, plan, quant, lambda: _verify(r, truth))
    r.imp.plan = plan
    if plan is not None:
        _weight_decay_effect(r, plan)
        _precision_effect(r, plan, tuner, truth)


def _precision_effect(r: _Reader, plan, tuner: str, truth: _Truth) -> None:
    """swift holds fully trained parameters in the dtype ``swift_full_params_dtype`` gives (the
    rule the swift target routes to its plugin by), while a spec's Plan holds them in fp32
    master weights (what the swift target's plugin does). Under --deepspeed, DeepSpeed's
    ZeRO/bf16 optimizers keep fp32 master copies of every trainable parameter themselves, so
    there is nothing to report."""
    from ..targets.swift import swift_full_params_dtype

    t = plan.training
    held, casts = swift_full_params_dtype(tuner, t.precision)
    if not truth.full or held == t.trained_dtype or r.flags.get("deepspeed") is not None:
        return
    flag = r.flags.get("torch_dtype")
    r.effect("full-params-dtype", flag.where if flag else Location(r.path, *_first_pos(r)),
             f"swift holds the {len(truth.full)} fully trained tensors ({_few(sorted(truth.full))}) in "
             f"{held} and updates them there ({casts}): "
             f"updates below {t.precision}'s resolution are lost; the spec's Plan keeps them in fp32 "
             f"(frozen ones in {t.precision})",
             "compile the spec for swift (its plugin keeps fp32 master weights for them), or --torch_dtype float32")


def _params_under(all_params, module: str) -> list[str]:
    return [p for p in all_params if p == module or p.startswith(module + ".")]


def _few(names, n: int = 3) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _flags_not_applying(r: _Reader, names, tuner: str, where: str) -> None:
    for name in names:
        if name in r.flags:
            r.effect("flag-for-other-tuner", r.flags[name].where,
                     f"--{name} has no effect with --{'train' if r.version == 3 else 'tuner'}_type {tuner}: "
                     f"only {where} read it", f"remove --{name}, or use the tuner it belongs to")


def _near(r: _Reader, prefix: str) -> str:
    """A suggestion for a prefix that matches nothing: the module names it most likely meant."""
    modules = [m.name for m in r.tree.modules if m.name]
    tail = prefix.split(".")
    for k in range(len(tail), 0, -1):
        end = ".".join(tail[-k:])
        hits = [m for m in modules if m == end or m.endswith("." + end)]
        if hits:
            return hits[0]
    close = difflib.get_close_matches(prefix, modules, n=1, cutoff=0.6)
    return close[0] if close else ""


def _check_prefixes(r: _Reader, name: str, words: list[Word], all_params, what: str) -> None:
    """Prefixes (swift: str.startswith) that match nothing (#7226) or more than the module
    they name (``layers.1`` also matches ``layers.10``-``layers.19``)."""
    for w in words:
        prefix = w.text
        hits = [p for p in all_params if p.startswith(prefix)]
        if not hits:
            near = _near(r, prefix)
            r.effect("pattern-matches-nothing", r.loc(w),
                     f"--{name} {prefix}: no parameter name starts with it, so it {what} nothing"
                     + (f" (this model's names look like {near})" if near else ""),
                     f"use --{name} {near}." if near else f"list the names with: mixspec tree {r.source.ref}")
            continue
        beyond = sorted({_module_of(p, prefix) for p in hits if p != prefix and p[len(prefix)] != "."})
        if beyond and not prefix.endswith("."):
            r.effect("prefix-matches-more", r.loc(w),
                     f"--{name} {prefix}: swift matches prefixes with str.startswith, so it also {what} "
                     f"{_few(beyond)} ({len([p for p in hits if not is_under(p, prefix)])} tensors)",
                     f"end the prefix with a dot: --{name} {prefix}.")


def _module_of(param: str, prefix: str) -> str:
    """The dotted name segment a prefix ran into: 'model.layers.1' in 'model.layers.10.x' -> model.layers.10."""
    rest = param[len(prefix):]
    return prefix + rest.split(".")[0]


def _full_trainable(r: _Reader, all_params: list[str], multimodal: bool) -> set[str]:
    """TunerMixin.prepare_model, full branch, with TunerArguments._init_multimodal_full."""
    sw, numel = r.sw, r.tree.param_numel
    trainable = set(all_params)
    ratio = r.get_num("freeze_parameters_ratio", 0.0)
    if ratio > 0:
        sizes = [numel[p] for p in all_params]
        cumulative, total = [], 0
        for s in sizes:
            total += s
            cumulative.append(total)
        idx = bisect.bisect_right(cumulative, int(total * ratio))
        trainable -= set(all_params[:idx])
    freeze = [w.text for w in (r.get_list("freeze_parameters") or [])]
    trainable_prefixes = [w.text for w in (r.get_list("trainable_parameters") or [])]
    if multimodal:
        fl, fv, fa = (r.get_bool("freeze_llm", False), r.get_bool("freeze_vit", True),
                      r.get_bool("freeze_aligner", True))
        freeze += list(sw.language_model if fl else ()) + list(sw.vision_tower if fv else ()) + list(
            sw.aligner if fa else ())
        if not fa:
            trainable_prefixes += list(sw.aligner)
    else:
        for name in ("freeze_llm", "freeze_vit", "freeze_aligner"):
            if name in r.flags:
                r.effect("flag-for-multimodal", r.flags[name].where,
                         f"--{name} has no effect: {r.tree.model_type} is a text model for ms-swift",
                         f"remove --{name}")
    _check_prefixes(r, "freeze_parameters", r.get_list("freeze_parameters") or [], all_params, "freezes")
    _check_prefixes(r, "trainable_parameters", r.get_list("trainable_parameters") or [], all_params, "unfreezes")
    trainable = {p for p in trainable if not _starts(p, freeze)}
    trainable -= _regex_hits(r, "freeze_parameters_regex", all_params)
    trainable |= {p for p in all_params if _starts(p, trainable_prefixes)}
    trainable |= _regex_hits(r, "trainable_parameters_regex", all_params)
    return trainable


def _regex_hits(r: _Reader, name: str, all_params) -> set[str]:
    """The parameter names a --*_parameters_regex finds (swift: re.search)."""
    value = r.get_str(name)
    if value is None:
        return set()
    try:
        rx = re.compile(value)
    except re.error as exc:
        # swift logs a warning and ignores an invalid regex
        r.effect("invalid-regex", r.flags[name].where,
                 f"--{name} {quoted(value)} is not a valid Python regex ({exc}); swift warns and ignores it",
                 "fix the regex")
        return set()
    hit = {p for p in all_params if rx.search(p)}
    if not hit:
        r.effect("pattern-matches-nothing", r.flags[name].where, f"--{name} {quoted(value)} matches no parameter name",
                 f"check the names with: mixspec tree {r.source.ref}")
    return hit


def _lora_settings(r: _Reader) -> dict:
    rank = r.get_num("lora_rank", 8, int)
    alpha = r.get_num("lora_alpha", 32.0)
    dropout = r.get_num("lora_dropout", 0.05)
    for name, value, ok in (("lora_rank", rank, rank >= 1), ("lora_alpha", alpha, alpha > 0),
                            ("lora_dropout", dropout, 0 <= dropout < 1)):
        if not ok:
            raise _Fail(Problem(r.flags[name].where, f"--{name}", f"out of range (got {value!r})"))
    return {"rank": rank, "alpha": alpha, "dropout": dropout,
            "rslora": r.get_bool("use_rslora", False), "dora": r.get_bool("use_dora", False)}


def _lora_targets(r: _Reader, truth: _Truth, multimodal: bool) -> None:
    """get_target_modules + PEFT's matching, then modules_to_save: the flags in r -> truth.lora
    (the LoRA modules), truth.copies and truth.lora_settings."""
    truth.lora_settings = _lora_settings(r)
    if r.get_str("lora_bias", "none") != "none":
        raise _Fail(Problem(r.flags["lora_bias"].where, "--lora_bias",
                            "lora_bias all trains every bias: mixspec cannot express it", "remove --lora_bias"))
    modules = [m for m in r.tree.modules if m.name]
    target_regex = r.get_str("target_regex")
    entries = r.get_list("target_modules")
    names = [w.text for w in entries] if entries is not None else ["all-linear"]
    origin = r.flags.get("target_regex") or r.flags.get("target_modules")
    where = origin.where if origin else Location(r.path)
    if target_regex is not None:
        if entries is not None:
            r.effect("target-modules-ignored", r.flags["target_modules"].where,
                     "--target_modules has no effect: --target_regex replaces it", "remove one of the two")
        rx = _compile_target(r, target_regex, "target_regex")
        chosen = [m for m in modules if rx.fullmatch(m.name)]
    elif "all-linear" in names and multimodal:
        chosen = _multimodal_targets(r, modules, names, entries)
    else:
        chosen = _listed_targets(r, modules, names, entries)
    if target_regex is not None or "all-linear" not in names or not multimodal:
        for name in ("freeze_llm", "freeze_vit", "freeze_aligner"):
            if name in r.flags:
                r.effect("flag-for-other-tuner", r.flags[name].where,
                         f"--{name} has no effect here: with LoRA, swift reads it only for --target_modules "
                         "all-linear on a multimodal model", f"remove --{name}, or choose the targets with it")
    bad = [m for m in chosen if m.kind not in LORA_KINDS]
    if bad:
        raise _Fail(Problem(where, origin.spelled if origin else "--target_modules",
                            f"PEFT cannot put LoRA on {bad[0].name} ({bad[0].type})"
                            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + ": swift stops",
                            "narrow the targets to Linear, Embedding or Conv modules"))
    if not chosen:
        raise _Fail(Problem(where, origin.spelled if origin else "--target_modules",
                            "the LoRA targets match no module: PEFT stops (target modules not found)",
                            f"list the names with: mixspec tree {r.source.ref}"))
    for m in chosen:
        truth.lora[m.name] = None
    _modules_to_save(r, truth, modules)


def _multimodal_targets(r: _Reader, modules: list, names: list[str], entries) -> list:
    """all-linear on a multimodal model (swift's one regex over the unfrozen parts) -> the modules
    it chooses; notes the entries it drops and freeze_* flags that mean LoRA, not full training."""
    fl, fv, fa = (r.get_bool("freeze_llm", False), r.get_bool("freeze_vit", True),
                  r.get_bool("freeze_aligner", True))
    try:
        rx_text = multimodal_target_regex(r.tree, r.sw, fl, fv, fa, "all-embedding" in names)
    except ValueError:
        raise _Fail(Problem(r.flags["freeze_llm"].where, "--freeze_llm",
                            "with the LLM, ViT and aligner all frozen, all-linear leaves nothing for LoRA: "
                            "swift stops (assertion in get_multimodal_target_regex)",
                            "unfreeze the part LoRA should go on")) from None
    rx = re.compile(rx_text)
    chosen = [m for m in modules if rx.fullmatch(m.name)]
    ignored = [w for w in entries or [] if w.text not in ("all-linear", "all-embedding")]
    for w in ignored:
        r.effect("target-modules-ignored", r.loc(w),
                 f"--target_modules {w.text}: on a multimodal model all-linear becomes one regex over the "
                 "unfrozen parts and every other entry is dropped",
                 "drop all-linear and list the modules, or use --target_regex")
    if not fv and "freeze_vit" in r.flags:
        r.effect("freeze-vit-means-lora", r.flags["freeze_vit"].where,
                 "--freeze_vit false with LoRA puts LoRA adapters on the ViT's linears; it does not train "
                 "the ViT fully",
                 "to train the ViT fully next to LoRA on the LLM, use --tuner_type lora_llm (or a mixspec spec "
                 "with vision: {train: full} compiled for swift)")
    if not fa and "freeze_aligner" in r.flags:
        r.effect("freeze-aligner-means-lora", r.flags["freeze_aligner"].where,
                 "--freeze_aligner false with LoRA puts LoRA adapters on the aligner's linears; it does not "
                 "train the aligner fully", "use --modules_to_save with the aligner, or --tuner_type lora_llm")
    return chosen


def _listed_targets(r: _Reader, modules: list, names: list[str], entries) -> list:
    """--target_modules as names PEFT matches by suffix (all-linear / all-embedding expanded) ->
    the modules chosen; notes each entry that matches nothing."""
    listed = list(names)
    if "all-linear" in listed:
        listed.remove("all-linear")
        listed += sorted(find_all_linears(r.tree, ""))
    if "all-embedding" in listed:
        listed.remove("all-embedding")
        listed += sorted(_find_embeddings(r.tree))
    chosen = [m for m in modules if any(m.name == t or m.name.endswith("." + t) for t in listed)]
    for w in entries or []:
        if w.text in ("all-linear", "all-embedding"):
            continue
        if not any(m.name == w.text or m.name.endswith("." + w.text) for m in modules):
            near = _near(r, w.text)
            r.effect("pattern-matches-nothing", r.loc(w),
                     f"--target_modules {w.text}: no module name is or ends with .{w.text}",
                     f"use --target_modules {near.rsplit('.', 1)[-1]}" if near else
                     f"list the names with: mixspec tree {r.source.ref}")
    return chosen


def _modules_to_save(r: _Reader, truth: _Truth, modules: list) -> None:
    """--modules_to_save -> truth.copies (the shallowest copied modules); a tied copy or a LoRA
    target inside a copy stops the import; notes what each copy costs."""
    copied = _copied_modules(r, modules)
    from ..models.names import shallowest

    top = shallowest(copied)
    for module, param, partner in tied_copies(r.tree, top):
        message, hint = tied_copy_text(module, param, partner, r.tree.param_numel[param],
                                       f"--modules_to_save {copied[module].text}")
        raise _Fail(Problem(r.loc(copied[module]), "--modules_to_save", message, hint))
    inside = [t for t in truth.lora if any(is_under(t, c) for c in top)]
    if inside:
        raise _Fail(Problem(r.loc(copied[top[0]]), "--modules_to_save",
                            f"LoRA targets inside a modules_to_save module ({_few(inside)}): mixspec cannot "
                            "express a LoRA adapter inside a trained copy", "exclude them from the LoRA targets"))
    numel = r.tree.param_numel
    by_word: dict[int, list[str]] = defaultdict(list)
    words = {}
    for c in top:
        truth.copies.append(c)
        by_word[id(copied[c])].append(c)
        words[id(copied[c])] = copied[c]
    for key, mods in by_word.items():
        n = sum(numel[p] for p in numel if p not in r.tree.tied and any(p == c or p.startswith(c + ".") for c in mods))
        r.effect("modules-to-save-copy", r.loc(words[key]),
                 f"--modules_to_save {words[key].text}: PEFT trains a copy of {_few(mods)} ({_human(n)} parameters) "
                 f"and keeps the frozen original beside it: {_human(n)} more parameters in memory "
                 f"({n * 2 / 2**30:.2f} GiB in bf16), the copy's weights renamed (...modules_to_save.default...) "
                 "in checkpoints",
                 "the spec trains them in place (train: full); compiled for swift it needs no copy")


def _copied_modules(r: _Reader, modules: list) -> dict[str, Word]:
    """--modules_to_save entries (PEFT copies every module whose name ends with one) -> module name
    -> the word that copied it; notes entries matching nothing or more than the named module."""
    wanted = []
    for w in r.get_list("modules_to_save") or []:
        if w.text == "all-embedding":
            wanted += [(w, e) for e in sorted(_find_embeddings(r.tree))]
        elif w.text == "all-norm":
            wanted += [(w, e) for e in sorted(_find_norms(r.tree))]
        else:
            wanted.append((w, w.text))
    copied: dict[str, Word] = {}
    for w, entry in wanted:
        hits = [m.name for m in modules if m.name.endswith(entry)]
        if not hits:
            near = _near(r, entry)
            r.effect("pattern-matches-nothing", r.loc(w),
                     f"--modules_to_save {entry}: no module name ends with it, so nothing is trained through it",
                     f"use --modules_to_save {near}" if near else f"list the names with: mixspec tree {r.source.ref}")
        beyond = [h for h in hits if h != entry and not h.endswith("." + entry)]
        if beyond:
            r.effect("suffix-matches-more", r.loc(w),
                     f"--modules_to_save {entry}: PEFT matches it with str.endswith, so it also copies "
                     f"{_few(beyond)} ({len(beyond)} modules whose last name only ends with {entry})",
                     "name the module with its full dotted name, e.g. --modules_to_save "
                     + (next((h for h in hits if h.endswith("." + entry) or h == entry), hits[0])))
        for h in hits:
            copied.setdefault(h, w)
    return copied


def _compile_target(r: _Reader, text: str, name: str):
    try:
        return re.compile(text)
    except re.error as exc:
        raise _Fail(Problem(r.flags[name].where, f"--{name}", f"not a valid regex: {exc}")) from None


def _find_embeddings(tree: ModuleTree) -> set[str]:
    return {m.name.rsplit(".", 1)[-1] for m in tree.modules if m.kind == EMBEDDING and m.name}


def _find_norms(tree: ModuleTree) -> set[str]:
    return {m.name.rsplit(".", 1)[-1] for m in tree.modules
            if m.name and (m.norm == "layernorm" or "rmsnorm" in m.type.lower())}


def _lora_llm(r: _Reader, truth: _Truth) -> set[str]:
    """swift/tuner_plugin/lora_llm.py: LoraConfig(r, lora_alpha, target_modules=regex) and the
    ViT + aligner prefixes trainable; every other LoRA and freeze flag ignored."""
    tree, sw = r.tree, r.sw
    if sw is None or not sw.multimodal:
        raise _Fail(Problem(r.flags["tuner_type"].where, "--tuner_type",
                            "lora_llm needs a multimodal model (it trains the ViT and aligner fully)",
                            "use --tuner_type lora on a text model"))
    settings = _lora_settings(r)
    truth.lora_settings = dict(settings, dropout=0.0, rslora=False, dora=False)
    ignored = {"lora_dropout": "PEFT's default dropout 0 is used", "use_rslora": "", "use_dora": "",
               "target_modules": "LoRA goes on every LLM linear", "target_regex": "LoRA goes on every LLM linear",
               "modules_to_save": "", "lora_bias": "", "freeze_llm": "", "freeze_vit": "the ViT is always trained",
               "freeze_aligner": "the aligner is always trained", "init_weights": ""}
    for name, why in ignored.items():
        if name in r.flags:
            r.effect(f"lora_llm-ignores-{name}", r.flags[name].where,
                     f"--tuner_type lora_llm ignores --{name}" + (f": {why}" if why else ""),
                     "a mixspec spec says it, and compiled for swift its plugin applies it"
                     if name in ("lora_dropout", "use_rslora", "use_dora") else f"remove --{name}")
    _flags_not_applying(r, _FULL_FLAGS, "lora_llm", "the full tuner")
    rx = re.compile(multimodal_target_regex(tree, sw))
    for m in tree.modules:
        if m.name and rx.fullmatch(m.name):
            truth.lora[m.name] = None
    # deep_getattr(model, prefix).requires_grad_(True) for the ViT and aligner
    return {p for p in tree.param_shapes
            if p not in tree.tied and any(is_under(p, pre) for pre in sw.vision_tower + sw.aligner)}


def _lr_effects(r: _Reader, truth: _Truth, lr_mode: str, vit_lr, aligner_lr, lr, tuner: str) -> None:
    """--vit_lr/--aligner_lr that reach nothing; parts left at the base LR."""
    trained_groups = defaultdict(int)
    numel = r.tree.param_numel
    for p, (_, g) in truth.full.items():
        trained_groups[g] += numel[p]
    lora_groups = {g for _, g in truth.lora.values()}
    if lr_mode == "multimodal":
        for name, group in (("vit_lr", "vit"), ("aligner_lr", "aligner")):
            if name in r.flags and not trained_groups.get(group) and group not in lora_groups:
                why = {"vit": "the ViT", "aligner": "the aligner"}[group]
                r.effect("lr-reaches-nothing", r.flags[name].where,
                         f"--{name} has no effect: nothing in {why} is trained"
                         + (" (--freeze_vit defaults to true)" if group == "vit" and tuner == "full" else ""),
                         f"train {why} (--freeze_{'vit' if group == 'vit' else 'aligner'} false) or remove --{name}")
        for name, group in (("vit_lr", "vit"), ("aligner_lr", "aligner")):
            if name not in r.flags and trained_groups.get(group):
                r.effect("base-lr", Location(r.path, *_first_pos(r)),
                         f"the {_GROUP_LABEL[group]} ({_human(trained_groups[group])} parameters) trains at "
                         f"--learning_rate {lr:g}: --{name} is not given",
                         f"give --{name} for the {_GROUP_LABEL[group]}")
    elif tuner == "lora_llm" or (truth.full and truth.lora):
        full_n = sum(trained_groups.values())
        flag = r.flags.get("learning_rate")
        r.effect("base-lr", flag.where if flag else Location(r.path, *_first_pos(r)),
                 f"the fully trained parts ({_human(full_n)} parameters) and the LoRA adapters share one LR, "
                 f"--learning_rate {lr:g}" + ("" if flag else " (swift's default for LoRA)"),
                 "give --vit_lr/--aligner_lr (swift's multimodal optimizer) for the ViT and aligner"
                 if r.sw and r.sw.multimodal else "swift's flags give a text model one LR; a mixspec spec gives "
                 "each part its own (compiled for swift, through its plugin)")


def _first_pos(r: _Reader) -> tuple[int, int]:
    flag = r.flags.get("tuner_type") or r.flags.get("train_type") or r.flags.get("model")
    return (flag.where.line, flag.where.col)


def _lm_head_effects(r: _Reader, tuner: str, truth: _Truth) -> None:
    """swift's "LLM" (language_model prefixes) holds lm_head (and the input embedding lies in
    model.language_model): #6079."""
    sw = r.sw
    if not (sw and sw.multimodal and tuner == "full"):
        return
    head = [p for p in truth.full if is_under(p, r.roles.prefixes.get("lm_head", ()))
            or is_under(p, r.roles.prefixes.get("embeddings", ()))]
    numel = r.tree.param_numel
    if head and not r.get_bool("freeze_llm", False):
        flag = r.flags.get("freeze_llm")
        where = flag.where if flag else Location(r.path, *_first_pos(r))
        r.effect("lm-head-in-llm", where,
                 f"swift's LLM ({', '.join(sw.language_model)}) holds the input embedding and lm_head: training "
                 f"the LLM fully trains {_few(head)} too ({_human(sum(numel[p] for p in head))} parameters)",
                 "to keep them frozen: --freeze_parameters " + " ".join(
                     sorted(set(r.roles.prefixes.get('embeddings', ())) | set(r.roles.prefixes.get('lm_head', ())))))
    if r.version == 3 and r.get_bool("freeze_llm", False) and "freeze_llm" in r.flags:
        r.effect("lm-head-version", r.flags["freeze_llm"].where,
                 "--freeze_llm true freezes lm_head since ms-swift 3.11 (PR #6651); before, lm_head stayed "
                 "trainable and counted as 'LLM' nowhere (#6079: 589.57M trainable for a projector-only run)",
                 "on ms-swift < 3.11 add --freeze_parameters lm_head")


# -- the spec ------------------------------------------------------------------------------------
@dataclass
class _SpecDraft:
    """The spec's components as they are built, with each one's origins and swift group label."""

    lr_mode: str
    lr_origin: dict  # swift group -> the origin of its LR
    tuner_origin: str
    components: dict = field(default_factory=dict)
    origins: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    used_roles: set = field(default_factory=set)

    def add(self, name: str, comp: dict, group: str, extra: str) -> None:
        """One component named `name`, trained in swift group `group` -> components, groups, origins."""
        self.components[name] = comp
        text = f"swift {group}: {_LR_FLAG[group]}" if self.lr_mode == "multimodal" else "swift: --learning_rate"
        self.groups[name] = text + extra
        self.origins[f"components.{name}"] = self.tuner_origin
        self.origins[f"components.{name}.lr"] = self.lr_origin[group]


def _build_spec(r: _Reader, truth: _Truth, lr_mode: str, tuner: str):
    """Components whose Plan is exactly `truth`: a role component where a swift group covers
    whole roles, else a pattern component with the exact modules. -> (spec, origins, groups)."""
    lr_origin = {"vit": r.origin("vit_lr"), "aligner": r.origin("aligner_lr"), "llm": r.origin("learning_rate"),
                 "all": r.origin("learning_rate")}
    draft = _SpecDraft(lr_mode, lr_origin, r.origin("train_type" if r.version == 3 else "tuner_type"))
    _full_components(r, truth, draft)
    if truth.lora:
        _lora_components(r, truth, draft, tuner)
    components, roles = draft.components, r.roles
    if not components:
        components["language" if "language" in roles.prefixes else "trained"] = {"train": "freeze"}
        if "trained" in components:
            components["trained"]["modules"] = [".*"]
    spec = {"version": 1, "model": r.source.path if r.source.kind == "local" else r.source.ref,
            "components": components}
    draft.origins["model"] = r.origin("model")
    return spec, draft.origins, draft.groups


def _full_components(r: _Reader, truth: _Truth, draft: _SpecDraft) -> None:
    """truth.full (fully trained parameters, with their tied aliases), by (group, lr, role) ->
    draft: a role component where it covers the whole role, else one listing the exact modules."""
    from ..planning.resolve import covering
    from ..targets._common import exact_regex

    tree, roles = r.tree, r.roles
    all_names = list(tree.param_shapes)
    role_params: dict[str, set] = defaultdict(set)
    for p in all_names:
        role = roles.role_of(p)
        if role:
            role_params[role].add(p)
    alias_of = defaultdict(list)
    for alias, canon in tree.tied.items():
        alias_of[canon].append(alias)
    by_group: dict[tuple, set] = defaultdict(set)
    for p, (lr, g) in truth.full.items():
        by_group[(g, lr)].add(p)
        by_group[(g, lr)].update(alias_of.get(p, ()))
    copies = set(truth.copies)
    role_order = ("vision", "aligner", "language", "embeddings", "lm_head", "audio")
    parts: dict[tuple, set] = defaultdict(set)  # (group, lr, role) -> params
    for (g, lr), params in by_group.items():
        for p in params:
            parts[(g, lr, roles.role_of(p) or "")].add(p)

    def order(key):
        role = key[2]
        return (role_order.index(role) if role in role_order else len(role_order), role, key[0], key[1])

    for (g, lr, role) in sorted(parts, key=order):
        params = parts[(g, lr, role)]
        via_copy = any(is_under(p, c) for p in params for c in copies)
        how = " (a modules_to_save copy in swift)" if via_copy else ""
        if role and role_params[role] <= params and role not in draft.used_roles:
            name = role
            comp = {"train": "full", "lr": lr}
            draft.used_roles.add(role)
        else:  # part of a role (or of no role): the exact modules
            name = _free_name(draft.components, f"{role}_part" if role else "other")
            comp = {"modules": _patterns(covering(params, all_names), exact_regex), "train": "full", "lr": lr}
        draft.add(name, comp, g, how)


def _lora_components(r: _Reader, truth: _Truth, draft: _SpecDraft, tuner: str) -> None:
    """truth.lora (LoRA modules), by (group, lr, role) -> draft: a role component when the role is
    still free, else one listing the exact modules; each with its LoRA settings' origins."""
    from ..targets._common import exact_regex

    s = truth.lora_settings
    lora_opts = {"rank": s["rank"], "alpha": s["alpha"], "dropout": s["dropout"]}
    if s["rslora"]:
        lora_opts["rslora"] = True
    if s["dora"]:
        lora_opts["dora"] = True
    by_lgroup: dict[tuple, list] = defaultdict(list)
    for m, (lr, g) in truth.lora.items():
        by_lgroup[(g, lr, r.roles.role_of(m) or "")].append(m)
    origins, tuner_origin = draft.origins, draft.tuner_origin
    for (g, lr, role), mods in sorted(by_lgroup.items()):
        if role and role not in draft.used_roles and role not in draft.components:
            name = role
            comp = {"train": "lora", "lr": lr, "lora": dict(lora_opts, targets="all-linear")}
            draft.used_roles.add(role)
        else:
            name = _free_name(draft.components, f"lora_{g}")
            comp = {"modules": _patterns(sorted(mods, key=natural_key), exact_regex), "train": "lora", "lr": lr,
                    "lora": dict(lora_opts, targets="all-linear")}
        comp["_targets"] = sorted(mods, key=natural_key)
        draft.add(name, comp, g, ", LoRA")
        for key, flag in (("rank", "lora_rank"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout"),
                          ("rslora", "use_rslora"), ("dora", "use_dora")):
            origins[f"components.{name}.lora.{key}"] = r.origin(flag)
        if tuner == "lora_llm":
            origins[f"components.{name}.lora.dropout"] = f"{tuner_origin} (lora_llm: PEFT's default 0)"
        origins[f"components.{name}.lora.targets"] = (
            r.origin("target_regex") if "target_regex" in r.flags else r.origin("target_modules")
            if tuner == "lora" else tuner_origin)


def _free_name(components: dict, base: str) -> str:
    name, i = base, 2
    while name in components:
        name, i = f"{base}_{i}", i + 1
    return name


def _patterns(names, exact_regex) -> list[str]:
    """Regexes full-matching exactly ``names``, each within the spec's 2,000-character limit."""
    out, chunk = [], []
    for n in names:
        if chunk and len(exact_regex(chunk + [n])) > 1900:
            out.append(exact_regex(chunk))
            chunk = []
        chunk.append(n)
    if chunk:
        out.append(exact_regex(chunk))
    return out


def _verify(r: _Reader, truth: _Truth):
    """Resolve the spec against the tree; per LoRA component, targets from the simplest form
    (all-linear, a list of leaf names, the exact regex) that gives exactly swift's modules.
    Returns the Plan, or records a problem."""
    from ..api import _load_dict
    from ..planning.resolve import resolve
    from ..targets._common import exact_regex

    spec = r.imp.spec
    pending = {name: c.pop("_targets") for name, c in spec["components"].items() if "_targets" in c}
    options = {name: ["all-linear", sorted({m.rsplit(".", 1)[-1] for m in mods}),
                      "^(?:" + exact_regex(mods) + ")$"] for name, mods in pending.items()}
    for name in pending:
        spec["components"][name]["lora"]["targets"] = options[name].pop(0)
    plan = None
    for _ in range(4):
        try:
            plan = resolve(_load_dict(spec, r.path), r.tree, model_source=r.source.kind, model_path=r.source.path)
        except SpecError as exc:
            bad = {p.path.split(".")[1] for p in exc.problems if p.severity == "error" and p.path.count(".") >= 1}
            stuck = [n for n in bad if n in pending and options[n]]
            if not stuck:
                r.imp.problems.extend(Problem(Location(r.path), p.path, "the imported spec does not resolve: "
                                              + p.message, p.hint) for p in exc.problems if p.severity == "error")
                return None
            for n in stuck:
                spec["components"][n]["lora"]["targets"] = options[n].pop(0)
            continue
        wrong = [c.name for c in plan.components if c.name in pending
                 and set(c.lora.targets if c.lora else ()) != set(pending[c.name])]
        if not wrong:
            break
        if not all(options[n] for n in wrong):
            r.imp.problems.append(Problem(Location(r.path), "", "internal: no targets form gives swift's LoRA "
                                          f"modules for {', '.join(wrong)}"))
            return None
        for n in wrong:
            spec["components"][n]["lora"]["targets"] = options[n].pop(0)
    got_full = {p: c.lr for c in plan.components if c.mode == "full" for p in c.params}
    want_full = {p: lr for p, (lr, _) in truth.full.items()}
    got_lora = {t: c.lr for c in plan.components if c.lora for t in c.lora.targets}
    want_lora = {m: lr for m, (lr, _) in truth.lora.items()}
    if got_full != want_full or got_lora != want_lora:
        diff = sorted(set(got_full.items()) ^ set(want_full.items()))[:3] + sorted(
            set(got_lora.items()) ^ set(want_lora.items()))[:3]
        r.imp.problems.append(Problem(Location(r.path), "", f"internal: the imported spec's Plan differs from what "
                                      f"swift trains: {diff}"))
        return None
    return plan


def _weight_decay_effect(r: _Reader, plan) -> None:
    from ..planning.decay import transformers_rule_differs

    differ = [n for c in plan.components for n in transformers_rule_differs(c, plan.layernorm_modules)]
    if differ:
        flag = r.flags.get("weight_decay")
        wd = plan.components[0].weight_decay if plan.components else 0
        r.effect("weight-decay-rule", flag.where if flag else Location(r.path, *_first_pos(r)),
                 f"swift decides which parameters decay by transformers' rule (torch LayerNorm modules, names "
                 f"with bias/norm); mixspec exempts biases, every norm module and 1-D parameters: the two differ "
                 f"on {len(differ)} trained tensors ({_few(differ)}), which swift decays at {wd:g}"
                 + ("" if flag else " (swift's default --weight_decay 0.1)"),
                 "the spec keeps mixspec's rule (compiled for swift, its plugin applies it); for swift's exact "
                 "behaviour use --weight_decay 0")


# -- training, data, distributed ---------------------------------------------------------------
def _training(r: _Reader, spec: dict, tuner: str) -> None:
    """The training, data, distributed and output flags -> spec's training, data, distributed and
    output_dir sections, with each value's origin in r.imp.origins."""
    world_nodes = int(_env_num(r, "NNODES", 1))
    world_gpus = int(_env_num(r, "NPROC_PER_NODE", 1))
    t: dict = {}
    _batching(r, t, world_nodes * world_gpus)
    _precision_and_length(r, t)
    _schedule(r, t)
    spec["training"] = t
    data = _data(r)
    if data:
        spec["data"] = data
    spec["distributed"] = _distributed(r, world_nodes, world_gpus)
    out = r.get_str("output_dir")
    if out is not None:
        spec["output_dir"] = out
        r.imp.origins["output_dir"] = r.origin("output_dir")


def _batching(r: _Reader, t: dict, world: int) -> None:
    """Epochs, max steps, batch size and gradient accumulation (swift's default from 16 samples
    over `world` GPUs) -> t."""
    o = r.imp.origins
    epochs = r.get_num("num_train_epochs", 3.0)
    if epochs <= 0:
        raise _Fail(Problem(r.flags["num_train_epochs"].where, "--num_train_epochs", f"must be > 0 (got {epochs})"))
    t["epochs"] = epochs
    o["training.epochs"] = r.origin("num_train_epochs") if "num_train_epochs" in r.flags else \
        "transformers' default (--num_train_epochs 3)"
    steps = r.get_num("max_steps", -1, int)
    if steps and steps > 0:
        t["max_steps"] = steps
        o["training.max_steps"] = r.origin("max_steps")
    bs = r.get_num("per_device_train_batch_size", 1, int)
    t["micro_batch_size"] = bs
    o["training.micro_batch_size"] = r.origin("per_device_train_batch_size")
    ga = r.get_num("gradient_accumulation_steps", None, int)
    if ga is None and r.rlhf_type == "grpo":  # RLHFArguments._set_default
        ga = 1
        o["training.gradient_accumulation"] = "ms-swift default for --rlhf_type grpo"
    elif ga is None:
        ga = max(1, math.ceil(16 / bs / world))
        o["training.gradient_accumulation"] = (f"{DEFAULT[r.version]}: ceil(16 / batch {bs} / "
                                               f"{world} GPUs)")
        if "gradient_accumulation_steps" in r.unknown:
            o["training.gradient_accumulation"] = r.origin("gradient_accumulation_steps") + \
                f" ({o['training.gradient_accumulation']})"
    else:
        o["training.gradient_accumulation"] = r.origin("gradient_accumulation_steps")
    t["gradient_accumulation"] = ga


def _precision_and_length(r: _Reader, t: dict) -> None:
    """--torch_dtype (default: the model config's), gradient checkpointing and --max_length
    (default: the model's max_position_embeddings) -> t."""
    o = r.imp.origins
    dtype = r.get_str("torch_dtype")
    if dtype is None:
        cfg = r.source.config
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype")
                    or (cfg.get("text_config") or {}).get("dtype") or "bfloat16")
        o["training.precision"] = f"{DEFAULT[r.version]}: the model config's dtype ({dtype})"
    else:
        o["training.precision"] = r.origin("torch_dtype")
    if dtype not in _DTYPES:
        raise _Fail(Problem(r.flags["torch_dtype"].where if "torch_dtype" in r.flags else Location(r.path),
                            "--torch_dtype", f"{dtype!r}: one of bfloat16, float16, float32"))
    t["precision"] = _DTYPES[dtype]
    t["gradient_checkpointing"] = r.get_bool("gradient_checkpointing", True)
    o["training.gradient_checkpointing"] = r.origin("gradient_checkpointing")
    max_length = r.get_num("max_length", None, int)
    if max_length is None:
        cfg = r.source.config
        max_length = int((cfg.get("text_config") or {}).get("max_position_embeddings")
                         or cfg.get("max_position_embeddings") or 2048)
        o["training.max_length"] = f"{DEFAULT[r.version]}: the model's max length (max_position_embeddings)"
    else:
        o["training.max_length"] = r.origin("max_length")
    t["max_length"] = max_length


def _schedule(r: _Reader, t: dict) -> None:
    """Weight decay, warmup, the LR scheduler, the optimizer's numbers and its name -> t."""
    o = r.imp.origins
    t["weight_decay"] = r.get_num("weight_decay", 0.1)
    o["training.weight_decay"] = r.origin("weight_decay")
    warmup = r.get_num("warmup_ratio", 0.0)
    if not 0 <= warmup < 1:
        raise _Fail(Problem(r.flags["warmup_ratio"].where, "--warmup_ratio",
                            f"must be in [0, 1) (got {warmup}); swift refuses 1 and more"))
    t["warmup_ratio"] = warmup
    o["training.warmup_ratio"] = r.origin("warmup_ratio")
    sched = r.get_str("lr_scheduler_type", "cosine")
    if sched not in _SCHEDULERS:
        raise _Fail(Problem(r.flags["lr_scheduler_type"].where, "--lr_scheduler_type",
                            f"{sched!r}: mixspec's lr_scheduler is one of {', '.join(_SCHEDULERS)}"))
    t["lr_scheduler"] = sched
    o["training.lr_scheduler"] = r.origin("lr_scheduler_type")
    for key, flag, default, kind in (("max_grad_norm", "max_grad_norm", 1.0, float), ("seed", "seed", 42, int),
                                     ("logging_steps", "logging_steps", 5, int), ("save_steps", "save_steps", 500, int),
                                     # swift's own AdamW defaults (beta2 0.95, not torch's 0.999)
                                     ("adam_beta1", "adam_beta1", 0.9, float),
                                     ("adam_beta2", "adam_beta2", 0.95, float),
                                     ("adam_epsilon", "adam_epsilon", 1e-8, float)):
        t[key] = r.get_num(flag, default, kind)
        o[f"training.{key}"] = r.origin(flag)
    if getattr(r, "optimizer", "adamw") not in (None, "adamw"):
        t["optimizer"] = r.optimizer
        o["training.optimizer"] = r.origin("optim")


def _data(r: _Reader) -> dict:
    """--dataset / --val_dataset and the image pixel caps (MAX_PIXELS, MIN_PIXELS, --max_pixels)
    -> the spec's data section ({} when no dataset is named)."""
    o = r.imp.origins
    data = {}
    for key, flag in (("train", "dataset"), ("eval", "val_dataset")):
        words = r.get_list(flag)
        if words:  # several: swift mixes them, and so does a spec's list
            data[key] = words[0].text if len(words) == 1 else [w.text for w in words]
            o[f"data.{key}"] = r.origin(flag)
    for name, key in (("MAX_PIXELS", "max_pixels"), ("MIN_PIXELS", "min_pixels")):
        if name in r.env and data:
            value, where, _ = r.env[name]
            if value.isdigit() and int(value) > 0:
                data[key] = int(value)
                o[f"data.{key}"] = f"{where} {name}"
    # --max_pixels (TemplateArguments): every multimodal template rescales images to it first,
    # so with MAX_PIXELS (the Qwen-VL processors' own cap) the smaller one holds
    cap = r.get_num("max_pixels", None, int)
    if cap is not None and data:
        if cap < 1:
            raise _Fail(Problem(r.flags["max_pixels"].where, "--max_pixels", f"must be >= 1 (got {cap})"))
        if cap < data.get("max_pixels", cap + 1):
            data["max_pixels"] = cap
            o["data.max_pixels"] = r.origin("max_pixels")
    return data


def _distributed(r: _Reader, world_nodes: int, world_gpus: int) -> dict:
    """NNODES, NPROC_PER_NODE and --deepspeed -> the spec's distributed section (a DeepSpeed path
    the script computes is recorded as unmodelled)."""
    o = r.imp.origins
    d = {"nodes": world_nodes, "gpus_per_node": world_gpus}
    o["distributed.nodes"] = f"{r.env['NNODES'][1]} NNODES" if "NNODES" in r.env else "NNODES unset: 1 node"
    o["distributed.gpus_per_node"] = (f"{r.env['NPROC_PER_NODE'][1]} NPROC_PER_NODE" if "NPROC_PER_NODE" in r.env
                                      else "NPROC_PER_NODE unset: 1 process")
    ds_flag = r.flags.get("deepspeed")
    ds_name = None
    if ds_flag is not None and ds_flag.values and ds_flag.values[0].unresolved:
        # a path built from variables the script does not set (e.g. "$HERE/deepspeed.json")
        r.imp.unmodelled.append(Unmodelled(ds_flag.where, f"--deepspeed {ds_flag.values[0].raw}",
                                           DEEPSPEED_NOT_HERE))
    else:
        ds_name = r.get_str("deepspeed")
    if ds_name is not None:
        d.update(_deepspeed(r, ds_name))
    return d


def _deepspeed(r: _Reader, name: str) -> dict:
    """zero_stage / offload of --deepspeed: one of swift's bundled names (zero2, zero3_offload,
    ...) or a JSON file, read where swift would find it (the working directory, then the
    script's); a file that is not here is listed, the spec planned without ZeRO."""
    o = r.imp.origins
    if name in _DS_BUILTIN:
        stage, offload = _DS_BUILTIN[name]
        got = {"zero_stage": stage, "offload": offload}
    else:
        bases = [Path.cwd()] + ([] if r.path.startswith("<") else [Path(r.path).resolve().parent])
        found = find_file(str(b / name) for b in bases)
        ds = read_json(found) if found else None
        if ds is None:
            r.imp.unmodelled.append(Unmodelled(r.flags["deepspeed"].where, f"--deepspeed {name}", DEEPSPEED_NOT_HERE))
            return {}
        got = ds if isinstance(ds, str) else zero_settings(ds)
        if isinstance(got, str):
            raise _Fail(Problem(r.flags["deepspeed"].where, "--deepspeed", f"cannot read the DeepSpeed config "
                                f"{name}: {got}", "give a readable DeepSpeed JSON file"))
    o["distributed.zero_stage"] = r.origin("deepspeed")
    if got["offload"] == "none":
        del got["offload"]
    else:
        o["distributed.offload"] = r.origin("deepspeed")
    return got


def _env_num(r: _Reader, name: str, default: int) -> int:
    if name not in r.env:
        return default
    value, where, exported = r.env[name]
    if not value.isdigit() or int(value) < 1:
        raise _Fail(Problem(where, name, f"must be a positive integer (got {value!r})"))
    if not exported:
        r.effect("env-not-exported", where,
                 f"{name}={value} is a shell variable, not exported: swift does not see it and runs with its default",
                 f"export {name}={value}, or put it before swift sft on the same line")
        return default
    return int(value)


# flags mixspec does not model that change what the spec's plan says
_UNMODELLED_NOTES: dict[str, str] = {}


def _quantization(r: _Reader):
    """swift's BitsAndBytesConfig (swift/llm/argument/base_args/quant_args.py): --quant_method bnb
    with --quant_bits 4 (--bnb_4bit_quant_type nf4, --bnb_4bit_use_double_quant true) or 8; no skip
    list, so transformers' default (output embedding, tied weights, the last module)."""
    method = r.get_str("quant_method")
    if method is None:
        return None
    flag = r.flags["quant_method"]
    if method != "bnb":
        raise _Fail(Problem(flag.where, "--quant_method", f"{method!r}: mixspec plans bitsandbytes quantization only",
                            "use --quant_method bnb"))
    bits = r.get_num("quant_bits", None, int)
    kind = r.get_str("bnb_4bit_quant_type", "nf4")
    if bits not in (4, 8) or kind not in ("nf4", "fp4"):
        raise _Fail(Problem((r.flags.get("quant_bits") or flag).where, "--quant_bits",
                            f"bnb quantizes to 4 bit (nf4, fp4) or 8 bit (got {bits}, {kind})", "use --quant_bits 4 or 8"))
    return BackendQuantization(method=kind if bits == 4 else "int8",
                               double_quant=r.get_bool("bnb_4bit_use_double_quant", True), where=flag.where)


def _env_and_unmodelled(r: _Reader) -> None:
    if "CUDA_VISIBLE_DEVICES" in r.env and "NPROC_PER_NODE" not in r.env:
        value, where, _ = r.env["CUDA_VISIBLE_DEVICES"]
        gpus = [g for g in value.split(",") if g.strip()]
        if len(gpus) > 1:
            r.effect("device-map", where,
                     f"CUDA_VISIBLE_DEVICES lists {len(gpus)} GPUs but NPROC_PER_NODE is not set: swift runs one "
                     "process and splits the model across the GPUs (device_map), it does not train data parallel",
                     f"set NPROC_PER_NODE={len(gpus)} for data parallel training")
    for name, (value, where, exported) in sorted(r.env.items(), key=lambda kv: (kv[1][1].line, kv[1][1].col)):
        if name not in _ENV_MODELLED and exported:
            r.imp.unmodelled.append(Unmodelled(where, f"{name}={value}", "environment variable"))
    for name, flag in r.flags.items():
        if name in _MODELLED:
            continue
        note = ("does not change which parameters train or their LR" if name in _HARMLESS
                else _UNMODELLED_NOTES.get(name, ""))
        shown = " ".join([flag.spelled] + [w.text for w in flag.values])
        r.imp.unmodelled.append(Unmodelled(flag.where, shown, note))
