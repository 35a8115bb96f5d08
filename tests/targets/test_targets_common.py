"""What every target shares: refuse-or-approximate decided once, one DeepSpeed config."""

from __future__ import annotations

import json

import pytest

from mixspec.errors import UnsupportedError
from mixspec.language.loader import load_spec_text
from mixspec.planning.resolve import plan_spec
from mixspec.targets import Target, TargetOptions, available_targets, render


def test_no_target_overrides_the_refuse_or_approximate_decision():
    for name, cls in available_targets().items():
        assert cls.render is Target.render, f"target {name} decides refusal itself"


# LoRA on the LLM, full ViT + merger, three LRs, ZeRO-3 + optimizer offload: swift needs a
# generated deepspeed.json (no built-in), LLaMA-Factory approximates the LRs
MIXED = """version: 1
model: Qwen/Qwen2.5-VL-7B-Instruct
components:
  vision: {train: full, lr: 2.0e-6}
  aligner: {train: full, lr: 1.0e-5}
  language: {train: lora, lr: 1.0e-4, lora: {rank: 16, alpha: 32, dropout: 0.05}}
data: {train: data/train.jsonl}
distributed: {nodes: 1, gpus_per_node: 8, zero_stage: 3, offload: optimizer}
"""


@pytest.fixture(scope="module")
def plan():
    return plan_spec(load_spec_text(MIXED, "spec.yaml"))


def test_one_deepspeed_config_for_every_target(plan):
    hf = json.loads(render(plan, "hf", TargetOptions())["ds_config.json"])
    assert json.loads(render(plan, "deepspeed", TargetOptions())["ds_config.json"]) == hf
    assert json.loads(render(plan, "swift", TargetOptions())["deepspeed.json"]) == hf
    lf = render(plan, "llamafactory", TargetOptions(approximate=True))
    assert json.loads(lf["ds_z3_config.json"]) == hf
    assert "optimizer" not in hf


@pytest.mark.parametrize("target,options", [("swift", {"plugin": False}), ("llamafactory", {})])
def test_approximable_parts_render_with_approximate_and_refuse_without(plan, target, options):
    with pytest.raises(UnsupportedError) as info:
        render(plan, target, TargetOptions(**options))
    assert info.value.items and all(i.approximable for i in info.value.items), \
        [(i.code, i.approximable) for i in info.value.items]
    files = render(plan, target, TargetOptions(approximate=True, **options))
    assert "APPROXIMATION" in "".join(files.values())


def test_approximate_never_covers_a_part_that_is_not_approximable(plan):
    import dataclasses

    no_data = dataclasses.replace(plan, data=None)
    whole_run_warmup = dataclasses.replace(plan, training=dataclasses.replace(plan.training, warmup_ratio=1.0))
    for target, bad in (("swift", no_data), ("llamafactory", no_data), ("hf", whole_run_warmup)):
        with pytest.raises(UnsupportedError) as info:
            render(bad, target, TargetOptions(approximate=True))
        assert info.value.items and not any(i.approximable for i in info.value.items), target


def test_name_helpers_are_inlined_from_the_package(plan):
    """train.py and the swift plugin carry mixspec.models.names' helpers verbatim (written once)."""
    from mixspec.programs import helpers_source

    helpers = helpers_source()
    assert "def expand_names(" in helpers and "def compact_names(" in helpers
    train_py = render(plan, "hf", TargetOptions())["train.py"]
    plugin = render(plan, "swift", TargetOptions())["mixspec_plugin.py"]
    for text in (train_py, plugin):
        assert helpers.rstrip("\n") in text
        assert text.count("def expand_names(") == 1 and "def _ranges(" not in text and "def expand(" not in text


FSDP_SPEC = MIXED.replace("zero_stage: 3, offload: optimizer", "fsdp: full_shard")


@pytest.mark.parametrize("target", ["deepspeed", "llamafactory"])
def test_fsdp_plan_is_refused_where_the_target_cannot_run_it(target):
    """Never DDP or DeepSpeed in place of the planned FSDP2: a refusal naming distributed.fsdp."""
    plan = plan_spec(load_spec_text(FSDP_SPEC, "spec.yaml"))
    assert plan.distributed.fsdp == "full_shard" and plan.distributed.engine == "fsdp"
    with pytest.raises(UnsupportedError) as info:
        render(plan, target, TargetOptions(approximate=True))
    assert [i.code for i in info.value.items] == ["fsdp-unsupported"]
    assert "distributed.fsdp: full_shard" in str(info.value)
