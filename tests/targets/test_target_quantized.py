"""Targets and a quantized base / bitsandbytes optimizer: emitted exactly, or refused naming why.

hf: train.py's BitsAndBytesConfig skips the Plan's unquantized modules (the run itself is
proven in tests/e2e/test_hf_qlora_e2e.py). ms-swift and LLaMA-Factory build their
BitsAndBytesConfig without a skip list: their flags are emitted only when transformers'
default quantizes exactly the Plan's modules (mixspec.planning.quantize.bnb_replaced, checked against
transformers' own replacement in tests/importers/test_import_quantized.py), else refused.
"""

from __future__ import annotations

import ast

import pytest

from mixspec.errors import UnsupportedError
from mixspec.language.loader import load_spec_text
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, render

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
SEED = f"""version: 1
model: {MODEL}
components:
  vision: {{train: full, lr: 2.0e-6}}
  aligner: {{train: full, lr: 1.0e-5}}
  language: {{train: lora, lr: 1.0e-4, quantize: nf4}}
training: {{optimizer: adamw_8bit}}
data: {{train: data/train.jsonl}}
"""
ALL_QUANTIZED = """version: 1
model: Qwen/Qwen2.5-VL-7B-Instruct
components:
  language: {{train: lora, lr: 1.0e-4, quantize: nf4{opts}}}
  vision: {{train: freeze, quantize: nf4{opts}}}
  aligner: {{train: freeze, quantize: nf4{opts}}}
training: {{optimizer: {optimizer}, precision: bf16}}
data: {{train: data/train.jsonl}}
"""


def plan_of(text: str):
    return plan_spec(load_spec_text(text, "spec.yaml"))


def refusal(plan, target: str) -> str:
    with pytest.raises(UnsupportedError) as err:
        render(plan, target, TargetOptions())
    return str(err.value)


def embedded(train_py: str, name: str):
    tree = ast.parse(train_py)
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == name)
    return ast.literal_eval(node.value)


def test_hf_embeds_the_skip_list_as_escaped_full_names():
    plan = plan_of(SEED)
    q = embedded(render(plan, "hf", TargetOptions())["train.py"], "PLAN")["quantization"]
    assert q["skip_modules"] == ["lm_head", r"model\.visual"]
    assert q["method"] == "nf4" and q["double_quant"] is True and q["compute_dtype"] == "bf16"
    assert q["components"]["language"] == list(plan.component("language").quantize.modules)
    assert len(q["components"]["language"]) == 196  # 28 layers x 7 projections


@pytest.mark.parametrize("stage,words", [(3, "ZeRO-3 partitions every parameter"), (2, "proven without DeepSpeed")])
def test_hf_refuses_a_quantized_base_under_deepspeed(stage, words):
    plan = plan_of(SEED.replace("training: {optimizer: adamw_8bit}",
                                f"distributed: {{zero_stage: {stage}}}"))
    text = refusal(plan, "hf")
    assert "spec.yaml:6:3" in text and words in text


def test_hf_refuses_a_bitsandbytes_optimizer_under_deepspeed():
    plan = plan_of(SEED.replace(", quantize: nf4", "").replace("training: {optimizer: adamw_8bit}",
                                                                "training: {optimizer: adamw_8bit}\n"
                                                                "distributed: {zero_stage: 2}"))
    assert "training.optimizer adamw_8bit with DeepSpeed" in refusal(plan, "hf")


@pytest.mark.parametrize("target", ["swift", "llamafactory"])
def test_backends_without_a_skip_list_refuse_the_seed_split_naming_the_difference(target):
    text = refusal(plan_of(SEED), target)
    assert "quantize: nf4 on component 'language'" in text
    assert "this Plan keeps lm_head, model.visual unquantized" in text


def test_swift_flags_when_its_quantization_is_exact():
    plan = plan_of(ALL_QUANTIZED.format(opts=", quantize_options: {double_quant: false}", optimizer="adamw"))
    assert plan.quant_is_default and plan.quant_skip_modules == ("lm_head",)
    script = render(plan, "swift", TargetOptions())["train.sh"]
    for flag in ("--quant_method bnb", "--quant_bits 4", "--bnb_4bit_quant_type nf4",
                 "--bnb_4bit_use_double_quant false", "--bnb_4bit_compute_dtype bfloat16"):
        assert flag in script
    # the optimizer swift's plugin / multimodal groups build is 32-bit AdamW
    plan8 = plan_of(ALL_QUANTIZED.format(opts="", optimizer="adamw_8bit"))
    assert "training.optimizer adamw_8bit" in refusal(plan8, "swift")


@pytest.mark.parametrize("optimizer,optim", [("adamw_8bit", "adamw_bnb_8bit"), ("paged_adamw", "paged_adamw_32bit"),
                                             ("paged_adamw_8bit", "paged_adamw_8bit"), ("adamw_torch_8bit", "adamw_torch_8bit"),
                                             ("adamw_torch_4bit", "adamw_torch_4bit")])
def test_llamafactory_keys_when_its_quantization_is_exact(optimizer, optim):
    plan = plan_of(ALL_QUANTIZED.format(opts="", optimizer=optimizer))
    yaml = render(plan, "llamafactory", TargetOptions())["train.yaml"]
    for line in ("quantization_bit: 4", "quantization_method: bitsandbytes", "quantization_type: nf4",
                 "double_quantization: true", f"optim: {optim}"):
        assert f"\n{line}\n" in yaml, line


def test_llamafactory_refuses_a_compute_dtype_other_than_the_precision():
    plan = plan_of(ALL_QUANTIZED.format(opts=", quantize_options: {compute_dtype: fp32}", optimizer="adamw"))
    assert "compute_dtype fp32 with training.precision bf16" in refusal(plan, "llamafactory")


def test_deepspeed_target_refuses_both():
    plan = plan_of(SEED + "distributed: {zero_stage: 2}\n")
    text = refusal(plan, "deepspeed")
    assert "quantize: nf4 on component 'language'" in text and "training.optimizer adamw_8bit" in text


def test_diff_names_a_change_of_base_weights_and_optimizer(run_cli, tmp_path):
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(SEED.replace(", quantize: nf4", "").replace("optimizer: adamw_8bit", "optimizer: adamw"))
    new.write_text(SEED)
    result = run_cli("diff", str(old), str(new))
    assert "base weights language: not quantized -> nf4 (196 Linear, double_quant true, compute bf16)" in result.stdout
    assert "setting training.optimizer: adamw -> adamw_8bit" in result.stdout


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adamw_torch_8bit",
                                       "adamw_torch_4bit"])
def test_transformers_optim_name_builds_what_train_py_builds(optimizer, tmp_path):
    """The optim name a backend's Trainer gets (LLaMA-Factory's optim; what importers read back)
    makes transformers build the optimizer class train.py builds for the spec's optimizer."""
    pytest.importorskip("bitsandbytes")
    if optimizer.startswith("adamw_torch"):
        pytest.importorskip("torchao.optim")
    import importlib

    from transformers import Trainer, TrainingArguments

    from mixspec.programs import hf_train
    from mixspec.targets._quant import HF_OPTIM_NAMES

    args = TrainingArguments(output_dir=str(tmp_path), optim=HF_OPTIM_NAMES[optimizer], use_cpu=True)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if optimizer in hf_train.BNB_OPTIMIZERS:
        want = getattr(importlib.import_module("bitsandbytes.optim"), hf_train.BNB_OPTIMIZERS[optimizer])
    elif optimizer in hf_train.TORCHAO_OPTIMIZERS:
        want = getattr(importlib.import_module("torchao.optim"), hf_train.TORCHAO_OPTIMIZERS[optimizer])
    else:
        import torch

        want = torch.optim.AdamW
    if cls is not want:  # bitsandbytes: transformers takes the generic class with optim_bits / is_paged
        import bitsandbytes.optim as bo

        bits, paged = kwargs.get("optim_bits", 32), kwargs.get("is_paged", False)
        assert cls is bo.AdamW and want.__name__ == ("Paged" if paged else "") + "AdamW" + ("8bit" if bits == 8 else "")
