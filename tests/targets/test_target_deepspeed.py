"""Target deepspeed: the JSON DeepSpeed's own parser accepts, for every ZeRO stage, offload
mode and precision, once the Trainer has filled its "auto" values from the TrainingArguments
the generated train.py builds; those values agree with the spec; no optimizer block;
refusals for what DeepSpeed cannot run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest

from mixspec.errors import UnsupportedError
from mixspec.language.loader import load_spec
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, render
from mixspec.targets.deepspeed import deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
AUTO_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
             "gradient_clipping", "bf16.enabled", "fp16.enabled"}

COMBOS = [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"),
          (3, "none"), (3, "optimizer"), (3, "all")]


@pytest.fixture(scope="module")
def base_plan():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return plan_spec(load_spec(Path("examples/qwen25vl-7b-mixed.yaml")))
    finally:
        os.chdir(cwd)


@pytest.fixture
def clean_hf_deepspeed():
    """HfTrainerDeepSpeedConfig registers itself globally (ZeRO-3 would then partition every
    model loaded later in this process): unregister it after each test."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def variant(plan, stage, offload, precision="bf16", **training):
    return dataclasses.replace(
        plan, distributed=dataclasses.replace(plan.distributed, zero_stage=stage, offload=offload),
        training=dataclasses.replace(plan.training, precision=precision, **training))


def auto_paths(config, prefix=""):
    out = set()
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= auto_paths(value, path + ".")
        elif value == "auto":
            out.add(path)
    return out


def training_arguments_of(plan, tmp_path, name, monkeypatch):
    """The TrainingArguments the generated train.py builds (DeepSpeed left out: the test
    resolves the JSON itself, as the Trainer does). This machine has no bf16 GPU, which
    TrainingArguments(bf16=True) checks for; the values are what this test is about."""
    import transformers.training_args

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda *a, **k: True)
    text = render(plan, "hf", TargetOptions())["train.py"]
    path = tmp_path / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEEPSPEED_CONFIG = None
    return module.training_arguments(module.parse_args(["--output-dir", str(tmp_path / "run")]))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("stage,offload", COMBOS)
def test_deepspeed_parser_accepts_the_resolved_config(base_plan, tmp_path, monkeypatch, clean_hf_deepspeed,
                                                      stage, offload, precision):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    plan = variant(base_plan, stage, offload, precision, micro_batch_size=3, gradient_accumulation=5,
                   max_grad_norm=0.7)
    files = render(plan, "deepspeed", TargetOptions())
    assert list(files) == ["ds_config.json"]
    assert files["ds_config.json"] == render(plan, "hf", TargetOptions())["ds_config.json"]
    config = json.loads(files["ds_config.json"])
    assert "optimizer" not in config and "scheduler" not in config
    assert auto_paths(config) == AUTO_KEYS
    assert config["zero_optimization"]["stage"] == stage
    zero = config["zero_optimization"]
    assert ("offload_optimizer" in zero) == (offload in ("optimizer", "all"))
    assert ("offload_param" in zero) == (offload == "all")

    args = training_arguments_of(plan, tmp_path, f"train_ds_{stage}_{offload}_{precision}", monkeypatch)
    hf = HfTrainerDeepSpeedConfig(config)
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, model=object(), num_training_steps=100)
    resolved = hf.config
    assert auto_paths(resolved) == set()
    assert resolved["train_micro_batch_size_per_gpu"] == 3
    assert resolved["gradient_accumulation_steps"] == 5
    assert resolved["train_batch_size"] == 3 * 5 * args.world_size
    assert resolved["gradient_clipping"] == 0.7
    assert resolved["bf16"]["enabled"] is (precision == "bf16")
    assert resolved["fp16"]["enabled"] is (precision == "fp16")
    parsed = DeepSpeedConfig(resolved)
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_accumulation_steps == 5 and parsed.train_micro_batch_size_per_gpu == 3
    assert parsed.bfloat16_config.enabled is (precision == "bf16")
    assert parsed.float16_config.enabled is (precision == "fp16")


def test_deepspeed_parser_is_a_real_check(base_plan, clean_hf_deepspeed):
    """The validation above can fail: DeepSpeed rejects a broken variant of our JSON."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = deepspeed_config(variant(base_plan, 2, "none"))
    config.update(train_batch_size=6, train_micro_batch_size_per_gpu=3, gradient_accumulation_steps=2,
                  gradient_clipping=1.0, bf16={"enabled": True}, fp16={"enabled": False})
    DeepSpeedConfig(json.loads(json.dumps(config)))  # consistent: accepted
    for broken in ({"zero_optimization": {**config["zero_optimization"], "stage": 7}},
                   {"zero_optimization": {**config["zero_optimization"], "overlap_comm": "maybe"}},
                   {"train_batch_size": 5}):
        with pytest.raises(Exception):
            DeepSpeedConfig({**config, **broken})


def test_generated_json_is_the_hf_targets(base_plan):
    text = render(base_plan, "deepspeed", TargetOptions())["ds_config.json"]
    assert text == (ROOT / "tests/targets/deepspeed/qwen25vl-7b-mixed/ds_config.json").read_text()
    assert text == (ROOT / "tests/targets/hf/qwen25vl-7b-mixed/ds_config.json").read_text()
    assert json.loads(text)["_comment"].startswith("Generated by mixspec ")


@pytest.mark.parametrize("stage,offload,codes", [
    (None, "none", ["no-zero-stage"]),
    (None, "optimizer", ["no-zero-stage", "offload-without-deepspeed"]),
    (0, "optimizer", ["offload-needs-zero"]),
    (2, "all", ["offload-all-needs-zero3"]),
    (1, "all", ["offload-all-needs-zero3"]),
])
def test_refusals(base_plan, stage, offload, codes):
    # the loader already rejects these offload combinations in a spec; the targets refuse
    # them again for Plans made any other way
    plan = variant(base_plan, stage, offload)
    with pytest.raises(UnsupportedError) as info:
        render(plan, "deepspeed", TargetOptions(approximate=True))
    assert [i.code for i in info.value.items] == codes
    hf_codes = [c for c in codes if c != "no-zero-stage"]
    if hf_codes:  # the hf target refuses the same distributed setups
        with pytest.raises(UnsupportedError) as info:
            render(plan, "hf", TargetOptions())
        assert [i.code for i in info.value.items] == hf_codes
    else:  # and without a ZeRO stage it simply writes no DeepSpeed JSON
        assert sorted(render(plan, "hf", TargetOptions())) == ["launch.sh", "model_config.json", "train.py"]


def test_cli_deepspeed_target_writes_the_json_alone(run_cli, tmp_path):
    result = run_cli("compile", "examples/llava15-projector-only.yaml", "--target", "deepspeed", "-o", str(tmp_path))
    assert result.exit_code == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["ds_config.json"]
    refused = run_cli("compile", "examples/gemma3-4b-lora-language.yaml", "--target", "deepspeed")
    assert refused.exit_code == 1
    assert "cannot express a spec without distributed.zero_stage" in refused.stderr
