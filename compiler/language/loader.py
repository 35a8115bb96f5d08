"""load_spec(path) -> LoadedSpec: parse, validate, and locate every problem."""

from __future__ import annotations

import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING, Any

from . import patterns
from ..errors import Diagnostics, Location, Problem, SpecError, quoted
from .spec_names import ROLE_SYNONYMS, ROLES
from .yamlloc import Located, load_located, load_located_text

if TYPE_CHECKING:
    from pydantic import BaseModel


@dataclass(frozen=True)
class LoadedSpec:
    """A validated Spec together with where each of its keys came from."""

    spec: Any  # a mixspec.language.spec.Spec (a lightspec.LightModel with the same values when loaded light)
    source: Located
    path: str
    warnings: tuple[Problem, ...] = field(default=())

    def loc(self, *path) -> Location:
        return self.source.loc(tuple(path))

    def value_loc(self, *path) -> Location:
        return self.source.value_loc(tuple(path))


def load_spec(path: str | Path, light: bool = False) -> LoadedSpec:
    """Read and validate a spec file; raises SpecError listing every problem.

    ``light``: a plainly valid spec is checked without pydantic (mixspec.language.lightspec; the
    values are the same, held as plain read-only objects); the console script uses it."""
    located = load_located(path)
    return _validate(located, str(path), light)


def load_spec_text(text: str, name: str = "<spec>", light: bool = False) -> LoadedSpec:
    """Validate spec text (for tests and tools); same errors as ``load_spec``."""
    return _validate(load_located_text(text, name), name, light)


def _validate(located: Located, path: str, light: bool = False) -> LoadedSpec:
    diags = Diagnostics()
    data = located.data
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {_type_name(data)}"
        diags.error(located.loc(()), "", f"a spec must be a mapping of keys, got {got}",
                    "a spec is a mapping, at least: version: 1, model: <catalog id or model dir> and "
                    "components: {language: {train: lora, lr: 1.0e-4}} (mixspec models lists the ids)")
        raise SpecError(diags.problems)
    spec = None
    if light:  # the same values as pydantic's, or None: then pydantic checks and words the problems
        from .lightspec import light_spec

        spec = light_spec(data)
    if spec is None:
        if light:
            build_spec_models_without_plugin_scan()
        from pydantic import ValidationError

        from .spec import Spec

        try:
            spec = Spec.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                diags.problems.append(_problem_from_pydantic(err, located))
            spec = None
    _check_components(data, located, diags)
    _check_distributed(data, located, diags)
    _check_option_lookalikes(data, located, diags)
    diags.raise_if_errors()
    assert spec is not None  # every pydantic error became a problem above
    return LoadedSpec(spec, located, path, tuple(diags.warnings))


# -- semantic checks the models alone cannot express ---------------------------------------

# Resolving costs components x patterns x module names; real specs have a handful of each,
# and these caps keep a hostile spec (CI runs specs from pull requests) to well under a second
MAX_COMPONENTS = 64
MAX_PATTERNS = 64  # module patterns plus regex LoRA targets, over the whole spec


def _check_components(data: dict, located: Located, diags: Diagnostics) -> None:
    components = data.get("components")
    if not isinstance(components, dict):
        return
    if len(components) > MAX_COMPONENTS:
        diags.error(located.loc(("components",)), "components",
                    f"{len(components)} components, more than the limit of {MAX_COMPONENTS}",
                    "a component can select many modules: combine patterns with |")
        return
    regexes: list[tuple[str, tuple]] = []
    for name, comp in components.items():
        if not isinstance(comp, dict):
            continue
        base = ("components", name)
        if comp.get("train") not in ("freeze", "full", "lora"):
            _check_keys_without_mode(comp, base, located, diags)
        if name == "unassigned":
            diags.error(located.loc(base), f"components.{name}",
                        "'unassigned' is reserved for parameters no component claims",
                        "choose another component name")
        modules = comp.get("modules")
        if name in ROLES and modules is not None:
            diags.error(
                located.loc(base + ("modules",)), f"components.{name}.modules",
                f"'{name}' is a role name, so it selects by role and cannot also list modules",
                f"rename the component (e.g. '{name}_part') to select by pattern",
            )
        if name not in ROLES and name != "unassigned" and modules is None:
            close = difflib.get_close_matches(name, ROLES, n=1) or [ROLE_SYNONYMS.get(name.lower())]
            hint = (f"did you mean the role '{close[0]}'?" if close[0] else
                    f"add modules: [regex, ...] or use a role name ({', '.join(ROLES)})")
            diags.error(located.loc(base), f"components.{name}",
                        f"'{name}' is not a role name, so it must select modules with `modules:`", hint)
        if isinstance(modules, list):
            for i, pattern in enumerate(modules):
                if isinstance(pattern, str):
                    regexes.append((pattern, base + ("modules", i)))
        _check_quantize(comp, base, located, diags)
        lora = comp.get("lora")
        if isinstance(lora, dict):
            targets = lora.get("targets")
            if isinstance(targets, str) and targets != "all-linear":
                regexes.append((targets, base + ("lora", "targets")))
            layers = lora.get("layers")
            if isinstance(layers, str):
                try:
                    patterns.parse_layers(layers)
                except ValueError as exc:
                    diags.error(located.value_loc(base + ("lora", "layers")),
                                f"components.{name}.lora.layers", str(exc),
                                'write block indices like "20-27" or "0,2,4-6"')
    if len(regexes) > MAX_PATTERNS:
        path = regexes[MAX_PATTERNS][1]
        diags.error(located.value_loc(path), _dotted(path),
                    f"the spec has {len(regexes)} patterns, more than the limit of {MAX_PATTERNS}",
                    "one pattern can match many modules: combine patterns with |")
        return
    for pattern, path in regexes:
        _check_regex(pattern, path, located, diags)


def _check_quantize(comp: dict, base: tuple, located: Located, diags: Diagnostics) -> None:
    """quantize_options say how nf4/fp4 weights are held: without a 4-bit quantize they mean nothing."""
    options, method = comp.get("quantize_options"), comp.get("quantize")
    if options is None or comp.get("train") == "full":  # full: pydantic's error says it
        return
    where = located.loc(base + ("quantize_options",))
    if method is None:
        diags.error(where, _dotted(base + ("quantize_options",)), "quantize_options without quantize",
                    "add quantize: nf4 (or fp4, int8), or remove quantize_options")
    elif method == "int8" and isinstance(options, dict) and options:
        diags.error(where, _dotted(base + ("quantize_options",)),
                    f"quantize_options ({', '.join(map(str, options))}) apply to nf4 and fp4 only, not int8",
                    "remove quantize_options, or use quantize: nf4")


def _check_keys_without_mode(comp: dict, base: tuple, located: Located, diags: Diagnostics) -> None:
    """pydantic picks a component's model by its `train` value, so without a valid one it
    checks no other key; report unknown keys anyway, against every mode's keys."""
    from . import spec as spec_mod

    allowed = sorted(set(spec_mod.FreezeComponent.model_fields) | set(spec_mod.FullComponent.model_fields)
                     | set(spec_mod.LoraComponent.model_fields))
    for key in comp:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "allowed keys: " + ", ".join(allowed)
        diags.error(located.loc(base + (key,)), _dotted(base + (key,)), f"unknown key {key!r}", hint)


def _check_option_lookalikes(data: dict, located: Located, diags: Diagnostics) -> None:
    """Paths and ids go on backend command lines: one starting with '-' would read as an option."""
    data_section = data.get("data") if isinstance(data.get("data"), dict) else {}
    for path, value in ((("model",), data.get("model")), (("output_dir",), data.get("output_dir")),
                        (("data", "train"), data_section.get("train")),
                        (("data", "eval"), data_section.get("eval"))):
        if isinstance(value, str) and value.startswith("-"):
            diags.error(located.value_loc(path), _dotted(path),
                        f"must not start with '-' (got {_shown(value)}): a command line would read it as an option",
                        f"write ./{value} for a relative path")


def _check_distributed(data: dict, located: Located, diags: Diagnostics) -> None:
    dist = data.get("distributed")
    if not isinstance(dist, dict):
        return
    stage, offload = dist.get("zero_stage"), dist.get("offload", "none")
    if dist.get("fsdp") is not None:
        _check_fsdp(dist, located, diags)
        return
    if offload in ("optimizer", "all") and (stage is None or stage == 0):
        diags.error(located.value_loc(("distributed", "offload")), "distributed.offload",
                    f"offload {offload!r} needs DeepSpeed ZeRO stage 1-3",
                    "set distributed.zero_stage (offload: all needs zero_stage: 3)")
    elif offload == "all" and isinstance(stage, int) and stage != 3:
        diags.error(located.value_loc(("distributed", "offload")), "distributed.offload",
                    f"offload 'all' (parameters too) needs ZeRO stage 3 (got zero_stage {stage})",
                    "set zero_stage: 3, or offload: optimizer")


def _check_fsdp(dist: dict, located: Located, diags: Diagnostics) -> None:
    """FSDP2 replaces DeepSpeed, and offloads all or nothing (parameters, gradients and
    optimizer states together): DeepSpeed's optimizer-only offload has no FSDP form."""
    if dist.get("zero_stage") is not None:
        diags.error(located.loc(("distributed", "zero_stage")), "distributed.zero_stage",
                    "zero_stage and fsdp both set: a run shards with DeepSpeed ZeRO or with FSDP2, not both",
                    "remove zero_stage (FSDP2 full_shard is like ZeRO-3, shard_grad_op like ZeRO-2), or remove fsdp")
    if dist.get("offload") == "optimizer":
        diags.error(located.value_loc(("distributed", "offload")), "distributed.offload",
                    "offload 'optimizer' is DeepSpeed's: FSDP2 offloads parameters, gradients and optimizer "
                    "states together or nothing",
                    "use offload: all (everything to CPU) or none with fsdp; for optimizer-only offload use "
                    "zero_stage instead of fsdp")


def _check_regex(pattern: str, path: tuple, located: Located, diags: Diagnostics) -> None:
    try:
        patterns.compile_pattern(pattern)
    except patterns.PatternError as exc:
        diags.error(located.value_loc(path), _dotted(path), str(exc), exc.hint)


# -- pydantic errors, rewritten for humans ---------------------------------------------------

def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _type_name(value: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _strip_union_tags(loc: tuple, data: object) -> tuple:
    """Drop the discriminator tag pydantic inserts into paths (components.x.lora.<field>)."""
    out: list = []
    i = 0
    while i < len(loc):
        out.append(loc[i])
        if len(out) == 2 and out[0] == "components" and i + 1 < len(loc) and loc[i + 1] in (
            "freeze", "full", "lora"
        ):
            comp = data.get("components", {}).get(out[1]) if isinstance(data, dict) else None
            if isinstance(comp, dict) and comp.get("train") == loc[i + 1]:
                i += 1  # skip the tag
        i += 1
    return tuple(p for p in out if p != "[key]")


def _model_at(path: tuple, data: object) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path`` (for 'did you mean')."""
    from . import spec as spec_mod
    from .spec import Spec

    model: type[BaseModel] | None = Spec
    node = data
    i = 0
    while model is not None and i < len(path):
        key = path[i]
        node = node.get(key) if isinstance(node, dict) else None
        if model is Spec and key == "components":
            if i + 1 >= len(path):
                return None
            comp = node.get(path[i + 1]) if isinstance(node, dict) else None
            train = comp.get("train") if isinstance(comp, dict) else None
            model = {"freeze": spec_mod.FreezeComponent, "full": spec_mod.FullComponent,
                     "lora": spec_mod.LoraComponent}.get(train)
            node = comp
            i += 2
            continue
        field_info = model.model_fields.get(key)
        if field_info is None:
            return None
        model = _first_model(field_info.annotation)
        i += 1
    return model


def _first_model(annotation) -> type[BaseModel] | None:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found:
            return found
    return None


_RANGE_KINDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")

_MISSING_HINTS = {
    "lr": "full and lora components need their own learning rate, e.g. lr: 1.0e-5",
    "version": "add version: 1 (the only version of the spec language so far)",
    "model": "add model: with a catalog id (mixspec models), a Hugging Face id or a local directory",
    "components": "add components:, e.g. language: {train: lora, lr: 1.0e-4}",
    "train": "a data section needs train: path/to/train.jsonl",
}

# what a value out of range is, for the keys a newcomer gets wrong (by the key's own name)
_RANGE_HINTS = {
    "rank": "the LoRA rank is the adapter's inner dimension, a whole number >= 1 (8, 16, 32 or 64 are usual)",
    "alpha": "LoRA alpha scales the adapter (alpha / rank); twice the rank is usual, e.g. alpha: 32 for rank 16",
    "dropout": "a probability in [0, 1): 0.0 (off) to 0.1 are usual",
    "lr": "a learning rate is a positive number, e.g. 1.0e-5 for a full ViT, 1.0e-4 for LoRA",
    "weight_decay": "0.0 (off) to 0.1 are usual",
    "micro_batch_size": "samples per GPU per step, a whole number >= 1",
    "gradient_accumulation": "micro-batches summed per optimizer step, a whole number >= 1",
    "epochs": "passes over the data, a number > 0",
    "max_length": "tokens per sample after the chat template, e.g. 4096",
}

_TYPE_WORDS = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "string_type": "a string", "dict_type": "a mapping", "list_type": "a list",
    "model_type": "a mapping", "literal_error": None, "int_from_float": "an integer",
}


def _problem_from_pydantic(err: dict, located: Located) -> Problem:
    data = located.data
    loc = _strip_union_tags(tuple(err["loc"]), data)
    kind = err["type"]
    dotted = _dotted(loc)
    value = err.get("input")
    hint = ""
    if kind == "extra_forbidden":
        return _unknown_key_problem(loc, dotted, located)
    if kind == "missing":
        key = loc[-1]
        message = f"missing required key {key!r}"
        hint = _MISSING_HINTS.get(str(key), "")
        # a missing key has no location of its own: point at its parent mapping
        return Problem(located.loc(loc[:-1]), dotted, message, hint)
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return _train_tag_problem(err, kind, loc, located)
    got = f" (got {_shown(value)})"
    if isinstance(value, float) and not math.isfinite(value) and kind in _RANGE_KINDS + ("value_error",):
        # .nan fails `> 0` before the finiteness check runs; say what is really wrong
        message = f"must be a finite number{got}"
        hint = "write a plain number, e.g. 1.0e-4"
    elif kind in _RANGE_KINDS:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[kind]
        limit = next(iter(err.get("ctx", {}).values()), "")
        message = f"must be {op} {_bound(limit)}{got}"
        hint = _RANGE_HINTS.get(str(loc[-1]) if loc else "", "")
    elif kind == "literal_error":
        message = f"must be {err['ctx']['expected']}{got}"
        if isinstance(value, str):
            close = difflib.get_close_matches(value, re.findall(r"'([^']*)'", str(err["ctx"]["expected"])), n=1)
            hint = f"did you mean {close[0]!r}?" if close else ""
            if loc and loc[-1] == "quantize":  # 'int4' is nearer int8 as text, nf4 in meaning
                hint = "4 bit: nf4 (QLoRA's usual) or fp4; 8 bit: int8"
    elif kind in _TYPE_WORDS:
        message = f"must be {_TYPE_WORDS[kind]}{got}"
        if isinstance(value, bool):
            hint = "booleans are not numbers; write the value itself"
        elif isinstance(value, str) and kind in ("float_type", "int_type"):
            hint = "write the number without quotes"
    elif kind == "string_pattern_mismatch" and loc[:1] == ("components",) and len(loc) == 2:
        message = f"component names must be identifiers (letters, digits, _ or -){got}"
        hint = "e.g. " + (re.sub(r"[^A-Za-z0-9_\-]+", "_", str(value)).strip("_") or "late_vit_blocks")
        # the offending text is the key itself, not the mapping under it
        return Problem(located.loc(loc), dotted, message, hint)
    elif kind == "too_short":
        message = "must not be empty"
        if loc == ("components",):
            hint = "list at least one component, e.g. language: {train: lora, lr: 1.0e-4}"
    elif kind == "value_error":
        message = str(err["msg"]).removeprefix("Value error, ") + got
    else:
        message = err["msg"] + got
    return Problem(located.value_loc(loc), dotted, message, hint)


def _unknown_key_problem(loc: tuple, dotted: str, located: Located) -> Problem:
    """A key the model at loc[:-1] does not have -> the problem, with the nearest allowed key
    (or why that kind of component has no such key) as the hint."""
    data = located.data
    hint = ""
    key = loc[-1] if loc else ""
    parent = _model_at(loc[:-1], data)
    allowed = sorted(parent.model_fields) if parent else []
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    message = f"unknown key {key!r}"
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif allowed:
        hint = "allowed keys: " + ", ".join(allowed)
    if key == "lr" and parent is not None and parent.__name__ == "FreezeComponent":
        hint = "a frozen component has no learning rate; remove lr or set train: full or lora"
    if key == "lora" and parent is not None and parent.__name__ != "LoraComponent":
        hint = "LoRA options belong to components with train: lora"
    if key in ("quantize", "quantize_options") and parent is not None and parent.__name__ == "FullComponent":
        message = "a fully trained component cannot be quantized (its weights are trained in place)"
        hint = "train it with lora over the quantized weights (QLoRA), freeze it, or drop quantize"
    return Problem(located.loc(loc), dotted, message, hint)


def _train_tag_problem(err: dict, kind: str, loc: tuple, located: Located) -> Problem:
    """A component whose train: is missing or not freeze/full/lora -> the problem, at train:."""
    message = "must be one of freeze, full, lora"
    if kind == "union_tag_invalid":
        message += f" (got {err['ctx'].get('tag')!r})"
        loc = loc + ("train",)
    else:
        message = "missing required key 'train' (freeze, full or lora)"
    return Problem(located.loc(loc), _dotted(loc), message, "e.g. train: full")


def _bound(limit: object) -> str:
    """A range limit without float noise: 0.0 reads as 0."""
    if isinstance(limit, float) and limit.is_integer():
        return str(int(limit))
    return str(limit)


def _shown(value: object) -> str:
    """A value as the user would write it in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
    if isinstance(value, (dict, list)):
        return f"a {_type_name(value)}" if value else ("[]" if isinstance(value, list) else "{}")
    text = quoted(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_spec_models_without_plugin_scan() -> None:
    """Build the spec's pydantic models without pydantic's plugin scan (the loader calls this
    for ``light`` loads, the console script's, when a spec needs pydantic after all).

    When it builds its first model class pydantic looks for plugins among the entry points
    of every installed distribution, importing importlib.metadata to do so: ~15-20 ms of a
    ~0.17 s warm validate, the very import the tree cache goes out of its way to avoid
    (mixspec.models.tree._lib_version). mixspec's spec models use no plugins. So, in the console
    script's process only, while mixspec.language.spec builds its models, pydantic's loader module
    answers "no plugins"; then it is removed again, and any later model (transformers', on
    a cold build) gets pydantic's real loader."""
    import types

    name = "pydantic.plugin._loader"
    if "mixspec.language.spec" in sys.modules or name in sys.modules:
        return
    import pydantic.version

    if not pydantic.version.VERSION.startswith("2."):  # the loader's shape this was written against
        return
    stub = types.ModuleType(name)
    stub.get_plugins = lambda: ()
    sys.modules[name] = stub
    try:
        from . import spec  # noqa: F401  (builds the models)
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
