"""The Plan's typed run settings: defaults in one place, and every target emits exactly them.

The oracle for "emits" is transformers' own argument parser (HfArgumentParser over
TrainingArguments): the hf target's train.py builds TrainingArguments itself, swift parses
its command line and LLaMA-Factory its YAML into the same dataclass. A Plan whose optimizer
settings are all off their defaults must come out of each parser unchanged, so no target
can hard-code a value.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex

import pytest
import yaml

from mixspec.language.loader import load_spec_text
from mixspec.planning.resolve import plan_spec
from mixspec.language.settings import DataSettings, DistributedSettings, TrainingSettings
from mixspec.language.spec import Data, Distributed, Training
from mixspec.targets import TargetOptions, render

SPEC = """version: 1
model: Qwen/Qwen2.5-7B-Instruct
components:
  language: {train: full, lr: 1.0e-5}
  embeddings: {train: full, lr: 1.0e-5}
  lm_head: {train: full, lr: 1.0e-5}
training: {max_steps: 7}
data: {train: data/train.jsonl}
"""

# every optimizer-side setting away from its default
OFF_DEFAULTS = dict(adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, max_grad_norm=0.5,
                    warmup_ratio=0.25, lr_scheduler="linear", seed=7)
# TrainingSettings name -> TrainingArguments field
ARG_OF = {"adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2", "adam_epsilon": "adam_epsilon",
          "max_grad_norm": "max_grad_norm", "lr_scheduler": "lr_scheduler_type", "seed": "seed",
          "max_steps": "max_steps", "micro_batch_size": "per_device_train_batch_size",
          "gradient_accumulation": "gradient_accumulation_steps"}


@pytest.fixture(autouse=True)
def bf16_allowed(monkeypatch):
    """TrainingArguments(bf16=True) checks for a bf16 GPU, which this machine lacks; the values
    parsed are what these tests are about."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)


@pytest.fixture(scope="module")
def plan():
    # AdamW's betas and epsilon through the spec's own keys, the rest set on the Plan
    betas = {k: OFF_DEFAULTS[k] for k in ("adam_beta1", "adam_beta2", "adam_epsilon")}
    text = SPEC.replace("training: {max_steps: 7}", "training: {max_steps: 7, " + ", ".join(
        f"{k}: {v}" for k, v in betas.items()) + "}")
    base = plan_spec(load_spec_text(text, "spec.yaml"))
    assert {k: getattr(base.training, k) for k in betas} == betas
    rest = {k: v for k, v in OFF_DEFAULTS.items() if k not in betas}
    return dataclasses.replace(base, training=dataclasses.replace(base.training, **rest))


def test_spec_keys_have_their_defaults_only_in_the_spec_models():
    """Each spec key of training/distributed/data is a required field of its settings class
    (no second default); the Plan adds only what it decides itself."""
    for model, cls in ((Training, TrainingSettings), (Distributed, DistributedSettings), (Data, DataSettings)):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(model.model_fields) <= set(fields), cls
        for key in model.model_fields:
            assert fields[key].default is dataclasses.MISSING, f"{cls.__name__}.{key} repeats a default"
    decided = {f.name for f in dataclasses.fields(TrainingSettings)} - set(Training.model_fields)
    assert decided == {"trained_dtype"}


def test_adamw_defaults_are_torchs():
    import torch

    plan = plan_spec(load_spec_text(SPEC, "spec.yaml"))
    defaults = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert (plan.training.adam_beta1, plan.training.adam_beta2) == defaults["betas"]
    assert plan.training.adam_epsilon == defaults["eps"]
    assert (plan.training.trained_dtype, plan.training.frozen_dtype) == ("fp32", "bf16")


def test_plan_json_keeps_the_spec_keys_in_order_and_adds_the_decided_ones():
    plan = plan_spec(load_spec_text(SPEC, "spec.yaml"))
    data = json.loads(plan.to_json_text())
    spec_keys = list(Training.model_fields)
    assert list(data["training"])[:len(spec_keys)] == spec_keys
    assert list(data["training"])[len(spec_keys):] == ["trained_dtype", "frozen_dtype"]
    assert data["training"]["frozen_dtype"] == "bf16" and data["training"]["trained_dtype"] == "fp32"
    # fsdp (the last key) is shown only when set, so plans without it keep their JSON
    assert list(data["distributed"]) == [k for k in Distributed.model_fields if k != "fsdp"]
    fsdp = plan_spec(load_spec_text(SPEC + "distributed: {fsdp: full_shard}\n", "spec.yaml"))
    assert list(json.loads(fsdp.to_json_text())["distributed"]) == list(Distributed.model_fields)
    assert list(data["data"]) == list(Data.model_fields)
    assert (data["data"]["train"], data["data"]["eval"]) == ("data/train.jsonl", None)


def _check(args, plan, warmup_ratio=None):
    """``warmup_ratio``: the value swift/LLaMA-Factory were given, for a transformers here that
    no longer has the field (5.2x reads a float warmup_steps below 1 as a ratio)."""
    t = plan.training
    for key, arg in ARG_OF.items():
        got = getattr(args, arg)
        got = getattr(got, "value", got)  # SchedulerType enum
        assert got == getattr(t, key), (key, got)
    if hasattr(args, "warmup_ratio"):
        assert args.warmup_ratio == t.warmup_ratio
    elif warmup_ratio is not None:
        assert float(warmup_ratio) == t.warmup_ratio
    else:
        assert args.warmup_steps == t.warmup_ratio
    assert args.optim.value == "adamw_torch"


def _parse(args_or_dict):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    if isinstance(args_or_dict, dict):
        return parser.parse_dict(args_or_dict, allow_extra_keys=True)[0]
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    words = []
    for flag, value in zip(args_or_dict[::2], args_or_dict[1::2]):
        if flag[2:] in known:
            words += [flag, value]
    return parser.parse_args_into_dataclasses(words, return_remaining_strings=True)[0]


def test_hf_train_py_builds_the_plans_training_arguments(plan, tmp_path):
    path = tmp_path / "train_settings.py"
    path.write_text(render(plan, "hf", TargetOptions())["train.py"], encoding="utf-8")
    spec = importlib.util.spec_from_file_location("train_settings", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _check(module.training_arguments(module.parse_args(["--output-dir", str(tmp_path / "run")])), plan)


def test_swift_flags_parse_to_the_plans_training_arguments(plan, tmp_path):
    train_sh = render(plan, "swift", TargetOptions())["train.sh"]
    command = train_sh[train_sh.index("swift sft \\\n"):].replace("\\\n", " ")
    words = shlex.split(command, comments=True)[2:]
    args = _parse(words + ["--output_dir", str(tmp_path / "run")])
    _check(args, plan, warmup_ratio=words[words.index("--warmup_ratio") + 1])


def test_llamafactory_yaml_parses_to_the_plans_training_arguments(plan):
    cfg = yaml.safe_load(render(plan, "llamafactory", TargetOptions())["train.yaml"])
    _check(_parse(cfg), plan, warmup_ratio=cfg["warmup_ratio"])
