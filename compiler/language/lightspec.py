"""A light check of spec data, for the console script: no pydantic for a spec that is plainly valid.

Importing pydantic and building mixspec.language.spec's models is about half the CPU time of a warm
`mixspec validate` (~0.08 of ~0.17 s). Most specs are plainly valid, so ``light_spec(data)``
checks the data against the same rules as those models and, when every value is plainly
what they accept, returns the same values as plain read-only objects (the attributes and
``model_dump`` that mixspec reads). It returns None for anything it is not sure of (any
error, and also values pydantic would coerce: ``version: true``, a non-finite number, an
empty list or string, a key that is not a string, ...): then the loader validates with
pydantic, which words every problem. So a spec it accepts is one pydantic accepts with the
same values, and every problem comes from one place. tests/language/test_lightspec.py checks this on
every spec fixture and on generated specs, and that ``RULES`` below has the models' keys,
defaults and bounds (change mixspec.language.spec and that test says what to change here).
"""

from __future__ import annotations

import math
import re

from .spec_names import COMPONENT_NAME_PATTERN

# field -> (kind, default, bounds); default REQUIRED = must be given. Kinds: int, float, bool,
# str, enum:<a|b> (strings), stage (ZeRO stage ints), modules (non-empty list of non-empty
# strings), files (a non-empty string or a list like modules), targets, layers, lora (the
# LoraOptions mapping); "?" suffix: null allowed
REQUIRED = object()
RULES: dict[str, dict[str, tuple]] = {
    "Spec": {
        "version": ("version", REQUIRED, {}),
        "model": ("str", REQUIRED, {"min_length": 1}),
        "components": ("components", REQUIRED, {}),
        "training": ("Training", None, {}),
        "data": ("Data?", None, {}),
        "distributed": ("Distributed", None, {}),
        "output_dir": ("str?", None, {"min_length": 1}),
        "trust_remote_code": ("bool", False, {}),
    },
    "Training": {
        "epochs": ("float", 1, {"gt": 0}),
        "max_steps": ("int?", None, {"ge": 1}),
        "micro_batch_size": ("int", 1, {"ge": 1}),
        "gradient_accumulation": ("int", 1, {"ge": 1}),
        "precision": ("enum:bf16|fp16|fp32", "bf16", {}),
        "gradient_checkpointing": ("bool", True, {}),
        "max_length": ("int", 2048, {"ge": 1}),
        "optimizer": ("enum:adamw|adamw_8bit|paged_adamw_8bit|paged_adamw|adamw_torch_8bit|adamw_torch_4bit", "adamw", {}),
        "weight_decay": ("float", 0.0, {"ge": 0}),
        "warmup_ratio": ("float", 0.0, {"ge": 0, "le": 1}),
        "lr_scheduler": ("enum:cosine|linear|constant|constant_with_warmup", "cosine", {}),
        "max_grad_norm": ("float", 1.0, {"gt": 0}),
        "seed": ("int", 42, {"ge": 0}),
        "logging_steps": ("int", 10, {"ge": 1}),
        "save_steps": ("int", 500, {"ge": 1}),
        "adam_beta1": ("float", 0.9, {"ge": 0, "lt": 1}),
        "adam_beta2": ("float", 0.999, {"ge": 0, "lt": 1}),
        "adam_epsilon": ("float", 1e-8, {"gt": 0}),
    },
    "Data": {
        "train": ("files", REQUIRED, {}),
        "eval": ("files?", None, {}),
        "max_pixels": ("int", 1003520, {"ge": 1}),
        "min_pixels": ("int?", None, {"ge": 1}),
        "images_per_sample": ("int", 1, {"ge": 0}),
    },
    "Distributed": {
        "nodes": ("int", 1, {"ge": 1}),
        "gpus_per_node": ("int", 1, {"ge": 1}),
        "zero_stage": ("stage?", None, {}),
        "offload": ("enum:none|optimizer|all", "none", {}),
        "gpu_memory_gb": ("float?", None, {"gt": 0}),
        "fsdp": ("enum:full_shard|shard_grad_op?", None, {}),
    },
    "FreezeComponent": {
        "train": ("enum:freeze", REQUIRED, {}),
        "modules": ("modules?", None, {"min_length": 1}),
        "quantize": ("enum:nf4|fp4|int8?", None, {}),
        "quantize_options": ("QuantizeOptions?", None, {}),
    },
    "FullComponent": {
        "train": ("enum:full", REQUIRED, {}),
        "lr": ("float", REQUIRED, {"gt": 0}),
        "modules": ("modules?", None, {"min_length": 1}),
        "weight_decay": ("float?", None, {"ge": 0}),
    },
    "LoraComponent": {
        "train": ("enum:lora", REQUIRED, {}),
        "lr": ("float", REQUIRED, {"gt": 0}),
        "modules": ("modules?", None, {"min_length": 1}),
        "lora": ("LoraOptions", None, {}),
        "quantize": ("enum:nf4|fp4|int8?", None, {}),
        "quantize_options": ("QuantizeOptions?", None, {}),
        "weight_decay": ("float?", None, {"ge": 0}),
    },
    "QuantizeOptions": {
        "double_quant": ("bool", True, {}),
        "compute_dtype": ("enum:bf16|fp16|fp32?", None, {}),
    },
    "LoraOptions": {
        "rank": ("int", 8, {"ge": 1, "le": 4096}),
        "alpha": ("float", 16, {"gt": 0}),
        "dropout": ("float", 0.0, {"ge": 0, "lt": 1}),
        "targets": ("targets", "all-linear", {}),
        "layers": ("layers?", None, {}),
        "rslora": ("bool", False, {}),
        "dora": ("bool", False, {}),
    },
}
_COMPONENT_MODELS = {"freeze": "FreezeComponent", "full": "FullComponent", "lora": "LoraComponent"}
_SAFE_INT = 2 ** 53  # larger ints: how pydantic converts or bounds them is its business
_NAME = re.compile(COMPONENT_NAME_PATTERN.removeprefix("^").removesuffix("$"))


def default(model: str, key: str):
    """The default of a spec key, e.g. ``default("Data", "max_pixels")`` (those of mixspec.language.spec)."""
    value = RULES[model][key][1]
    if value is REQUIRED:
        raise KeyError(f"{model}.{key} has no default")
    return value


class LightModel:
    """A validated mapping as read-only attributes, with pydantic's ``model_dump``."""

    __slots__ = ("_model", "_values")

    def __init__(self, model: str, values: dict):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"{self._model} has no field {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError(f"{self._model} is read-only")

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it through __init__
        return (LightModel, (self._model, self._values))

    def __eq__(self, other) -> bool:
        return isinstance(other, LightModel) and (self._model, self._values) == (other._model, other._values)

    __hash__ = None

    def __repr__(self) -> str:
        return f"{self._model}({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def model_dump(self, mode: str = "python") -> dict:
        """pydantic's: mode "json" writes a float field's int default (epochs: 1) as a float."""
        rules = RULES[self._model]
        out = {}
        for key, value in self._values.items():
            value = _dump(value, mode)
            if mode == "json" and type(value) is int and rules[key][0].rstrip("?") == "float":
                value = float(value)
            out[key] = value
        return out


def _dump(value, mode: str):
    if isinstance(value, LightModel):
        return value.model_dump(mode)
    if isinstance(value, dict):
        return {k: _dump(v, mode) for k, v in value.items()}
    if isinstance(value, list):
        return [_dump(v, mode) for v in value]
    return value


class _Unsure(Exception):
    """The data is not plainly valid: pydantic decides."""


def light_spec(data: object) -> LightModel | None:
    """The spec's values if pydantic's Spec model plainly accepts ``data``, else None."""
    try:
        return _model("Spec", data)
    except _Unsure:
        return None


def _model(name: str, data: object) -> LightModel:
    if type(data) is not dict:
        raise _Unsure
    rules = RULES[name]
    for key in data:
        if key not in rules:
            raise _Unsure
    values = {}
    for key, (kind, default, bounds) in rules.items():
        if key in data:
            values[key] = _value(kind, data[key], bounds)
        elif default is REQUIRED:
            raise _Unsure
        elif kind in ("Training", "Distributed", "LoraOptions"):
            values[key] = _model(kind, {})  # default_factory
        else:
            values[key] = default
    return LightModel(name, values)


def _value(kind: str, value: object, bounds: dict):
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind in RULES:
        return _model(kind, value)
    if kind == "int":
        if type(value) is not int or abs(value) > _SAFE_INT:
            raise _Unsure
        return _bounded(value, bounds)
    if kind == "float":
        if type(value) is int and abs(value) <= _SAFE_INT:
            value = float(value)
        if type(value) is not float or not math.isfinite(value):
            raise _Unsure
        return _bounded(value, bounds)
    if kind == "bool":
        if type(value) is not bool:
            raise _Unsure
        return value
    if kind == "str":
        if type(value) is not str or len(value) < bounds.get("min_length", 0):
            raise _Unsure
        return value
    if kind.startswith("enum:"):
        if type(value) is not str or value not in kind[5:].split("|"):
            raise _Unsure
        return value
    if kind == "version":
        if type(value) is not int or value != 1:
            raise _Unsure
        return value
    if kind == "stage":
        if type(value) is not int or value not in (0, 1, 2, 3):
            raise _Unsure
        return value
    if kind == "modules":
        return _strings(value)
    if kind == "files":  # one file (or dataset id) or a non-empty list of them
        return value if type(value) is str and value else _strings(value)
    if kind == "targets":
        if type(value) is str and value:
            return value
        return _strings(value)
    if kind == "layers":
        if type(value) is str:
            return value
        if type(value) is not list or not value or any(type(v) is not int for v in value):
            raise _Unsure
        return list(value)
    if kind == "components":
        return _components(value)
    raise _Unsure  # a kind this module does not know


def _bounded(value, bounds: dict):
    for op, limit in bounds.items():
        ok = {"gt": value > limit, "ge": value >= limit, "lt": value < limit, "le": value <= limit}.get(op, True)
        if not ok:
            raise _Unsure
    return value


def _strings(value) -> list:
    """A non-empty list of non-empty strings."""
    if type(value) is not list or not value or any(type(v) is not str or not v for v in value):
        raise _Unsure
    return list(value)


def _components(value) -> dict:
    if type(value) is not dict or not value:
        raise _Unsure
    out = {}
    for name, comp in value.items():
        if type(name) is not str or not _NAME.fullmatch(name) or type(comp) is not dict:
            raise _Unsure
        model = _COMPONENT_MODELS.get(comp.get("train")) if type(comp.get("train")) is str else None
        if model is None:
            raise _Unsure
        out[name] = _model(model, comp)
    return out
