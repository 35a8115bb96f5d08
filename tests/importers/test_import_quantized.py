"""Importers read quantized bases and bitsandbytes optimizers with each backend's own rule.

axolotl (qlora + load_in_4bit), LLaMA-Factory (quantization_bit) and ms-swift (--quant_method
bnb) all build a BitsAndBytesConfig without a skip list, so transformers' default decides:
every plain Linear but the output embedding, tied weights and the last module. The oracle is
transformers itself: a tiny Qwen2.5-VL loaded with that config, and the modules it replaced
by bnb.nn.Linear4bit / Linear8bitLt, against each imported spec's Plan.
"""

from __future__ import annotations

import textwrap
import warnings

import pytest

from mixspec.importers import read

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinymodels import build_model, tiny_config

    model = build_model(tiny_config("qwen2_5_vl"))
    path = tmp_path_factory.mktemp("qtiny") / "qwen"
    model.save_pretrained(path)
    return type(model), path


def replaced_by_transformers(tiny, bits: int) -> set[str]:
    """What transformers quantizes with the backends' BitsAndBytesConfig (no skip list)."""
    import transformers

    cls, path = tiny
    config = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") if bits == 4
              else transformers.BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=torch.float32)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    return {n for n, m in model.named_modules() if isinstance(m, kind)}


LLM = r"model\.language_model\.layers\.\d+\.(mlp|self_attn)\.(up|down|gate|q|k|v|o)_proj"


def axolotl(path, extra=""):
    return read("axolotl", textwrap.dedent(f"""\
        base_model: {path}
        load_in_4bit: true
        adapter: qlora
        lora_r: 8
        lora_alpha: 16
        lora_target_modules: '{LLM}'
        learning_rate: 2.0e-4
        optimizer: paged_adamw_8bit
        bf16: true
        """) + extra, "qlora.yml")


def llamafactory(path, bits=4):
    return read("llamafactory", textwrap.dedent(f"""\
        model_name_or_path: {path}
        quantization_bit: {bits}
        stage: sft
        do_train: true
        finetuning_type: lora
        lora_target: all
        optim: adamw_bnb_8bit
        learning_rate: 1.0e-4
        bf16: true
        """), "train.yaml")


def swift(path):
    return read("swift", f"swift sft --model {path} --tuner_type lora --quant_method bnb --quant_bits 4 "
                         "--optim paged_adamw_32bit --torch_dtype bfloat16 --freeze_vit true\n", "train.sh")


def planned_quantized(imported) -> set[str]:
    assert imported.ok and imported.plan is not None, [p.render() for p in imported.problems]
    return {m for c in imported.plan.components if c.quantize for m in c.quantize.modules}


@pytest.mark.parametrize("backend,optimizer", [("axolotl", "paged_adamw_8bit"), ("llamafactory", "adamw_8bit"),
                                               ("swift", "paged_adamw")])
def test_4bit_imports_quantize_what_transformers_replaces(tiny, backend, optimizer):
    imported = {"axolotl": axolotl, "llamafactory": llamafactory, "swift": swift}[backend](tiny[1])
    assert planned_quantized(imported) == replaced_by_transformers(tiny, 4)
    plan = imported.plan
    assert plan.quant_config().method == "nf4" and plan.quant_config().double_quant
    assert plan.training.optimizer == optimizer
    # the vision tower and aligner are quantized too (no skip list): held by a frozen component
    assert imported.spec["components"]["quantized_base"]["modules"] == [r"model\.visual"]


def test_8bit_import_quantizes_what_transformers_replaces(tiny):
    imported = llamafactory(tiny[1], bits=8)
    assert planned_quantized(imported) == replaced_by_transformers(tiny, 8)
    assert imported.plan.quant_config().method == "int8"


@pytest.mark.parametrize("name,spec", [("adamw_bnb_8bit", "adamw_8bit"), ("adamw_8bit", "adamw_8bit"),
                                       ("paged_adamw_8bit", "paged_adamw_8bit"), ("paged_adamw_32bit", "paged_adamw"),
                                       ("adamw_torch_fused", "adamw"), ("adamw_torch_8bit", "adamw_torch_8bit"),
                                       ("adamw_torch_4bit", "adamw_torch_4bit")])
def test_optimizer_names_map_to_the_same_optimizer(name, spec):
    text = f"base_model: Qwen/Qwen2.5-VL-7B-Instruct\nadapter: lora\nlora_r: 8\nlora_alpha: 16\n" \
           f"lora_target_modules: '{LLM}'\nlearning_rate: 1.0e-4\noptimizer: {name}\n"
    imported = read("axolotl", text, "c.yml")
    assert imported.ok, [p.render() for p in imported.problems]
    assert imported.plan.training.optimizer == spec


@pytest.mark.parametrize("backend,text,where,words", [
    ("axolotl", "base_model: Qwen/Qwen2.5-VL-7B-Instruct\noptimizer: adamw_torch_fp8\nlearning_rate: 1.0e-4\n",
     "c.yml:2:12", "mixspec plans AdamW"),
    ("axolotl", "base_model: Qwen/Qwen2.5-VL-7B-Instruct\noptimizer: muon\nlearning_rate: 1.0e-4\n",
     "c.yml:2:12", "mixspec plans AdamW"),
    ("axolotl", "base_model: Qwen/Qwen2.5-VL-7B-Instruct\nload_in_8bit: true\nlearning_rate: 1.0e-4\n",
     "c.yml:2:15", "needs adapter: lora"),
    ("llamafactory", "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nquantization_bit: 4\n"
                     "quantization_method: hqq\n", "c.yml:3:22", "bitsandbytes quantization only"),
    ("swift", "swift sft --model Qwen/Qwen2.5-VL-7B-Instruct --tuner_type lora --quant_method bnb --quant_bits 2\n",
     "c.yml:1:84", "4 bit (nf4, fp4) or 8 bit"),
])
def test_what_cannot_be_planned_is_located(backend, text, where, words):
    imported = read(backend, text, "c.yml")
    errors = [p for p in imported.problems if p.severity == "error"]
    assert any(str(p.location) == where and words in p.render() for p in errors), [p.render() for p in errors]


def test_a_fully_trained_module_the_backend_quantizes_is_refused():
    # axolotl: QLoRA on the LLM with the aligner in modules_to_save (trained fully), while the
    # base is quantized without a skip list: the aligner's Linear weights would be 4-bit
    imported = axolotl("Qwen/Qwen2.5-VL-7B-Instruct", "lora_modules_to_save: [merger]\n")
    assert not imported.ok
    problem = next(p for p in imported.problems if "trains fully" in p.message)
    assert "model.visual.merger.mlp.0" in problem.message and str(problem.location) == "qlora.yml:2:1"


def test_an_empty_deepspeed_key_is_no_deepspeed():
    # every axolotl example leaves `deepspeed:` empty (null): axolotl then runs without DeepSpeed
    imported = axolotl("Qwen/Qwen2.5-VL-7B-Instruct", "deepspeed:\nfsdp:\n")
    assert imported.ok, [p.render() for p in imported.problems]
    assert imported.plan.distributed.zero_stage is None
