"""Cross-backend parity: one spec, compiled to hf and to swift, both run for real (2 steps on
a tiny random Qwen2.5-VL with image rows). Each run records every parameter its optimizer
holds: (name, learning rate, weight decay, dtype), and every other parameter's dtype. The
records must be equal to each other and to the Plan (its LRs, its weight decays with
mixspec's no-decay rule, its trained dtype; the frozen parameters in its frozen dtype).

- hf: the generated train.py, imported and driven (build_trainer, train) by the ms-swift
  venv's python (Qwen2.5-VL's processor needs torchvision); the record is read from
  ``trainer.optimizer`` after the 2 steps.
- swift: the generated train.sh (``swift sft``, with mixspec's plugin where the Plan needs it),
  plus the test-only callback ``mixspec_test_optimizer`` (tests/e2e/swift_dump_plugin.py),
  which records swift's optimizer whatever built it.

Needs the ms-swift venv (default .venv-swift or $MIXSPEC_SWIFT_VENV). Run:
pytest -m slow tests/e2e/test_parity.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_tiny_vlm  # noqa: E402
from swift_venv import DUMP_PLUGIN, MARKS, PYTHON, RUN_ARGS, swift_env  # noqa: E402

pytestmark = MARKS

from mixspec.language.loader import load_spec  # noqa: E402
from mixspec.output import write_files  # noqa: E402
from mixspec.planning.resolve import plan_spec  # noqa: E402
from mixspec.targets import TargetOptions, render  # noqa: E402
from mixspec.targets import swift as swift_target  # noqa: E402

ENV = swift_env(MAX_PIXELS=str(112 * 112))
SWIFT_EXTRA = [*RUN_ARGS, "--callbacks", "mixspec_test_optimizer", "--save_strategy", "no"]

SPEC = """\
version: 1
model: {model}
components:
{components}
training: {{max_steps: 2, micro_batch_size: 1, gradient_accumulation: 1, precision: {precision},
           gradient_checkpointing: true, max_length: 1024, lr_scheduler: constant,
           weight_decay: 0.0, logging_steps: 1, save_steps: 100, seed: 1}}
data: {{train: {data}}}
output_dir: {out}
"""

SEED_PLUGIN = """\
  vision: {train: full, lr: 1.0e-5, weight_decay: 0.1}
  aligner: {train: full, lr: 3.0e-4}
  language:
    train: lora
    lr: 4.0e-3
    lora: {rank: 8, alpha: 16, dropout: 0.05, targets: all-linear}
"""
FULL_THREE_LRS = """\
  vision: {train: full, lr: 1.0e-5}
  aligner: {train: full, lr: 3.0e-4}
  language: {train: full, lr: 1.0e-3}
"""
LORA_ONLY = """\
  vision: {train: freeze}
  aligner: {train: freeze}
  language:
    train: lora
    lr: 2.0e-4
    lora: {rank: 8, alpha: 16, dropout: 0.05, targets: all-linear}
"""
# what --tuner_type lora_llm says exactly: the seed case without LoRA dropout and ViT decay
LORA_LLM = SEED_PLUGIN.replace("dropout: 0.05", "dropout: 0").replace(", weight_decay: 0.1", "")
CASES = [
    # the seed case, with decay on the ViT (whose RMSNorm weights the Plan exempts and
    # transformers' rule does not) and LoRA dropout: swift runs it through mixspec's plugin
    pytest.param(SEED_PLUGIN, "fp32", "plugin", id="seed-plugin-fp32"),
    pytest.param(SEED_PLUGIN, "bf16", "plugin", id="seed-plugin-bf16"),
    # full ViT, aligner and LLM at one LR each: swift's own flags (full tuner, --vit_lr,
    # --aligner_lr and its multimodal optimizer), no plugin
    pytest.param(FULL_THREE_LRS, "fp32", "full", id="full-three-lrs-flags-fp32"),
    # the same in bf16: swift's full tuner would train the full parameters in bf16 (the Plan:
    # fp32 master weights), so the target routes it to the plugin, which holds them in fp32
    pytest.param(FULL_THREE_LRS, "bf16", "plugin", id="full-three-lrs-plugin-bf16"),
    # what lora_llm does exactly, in bf16: it too would train the ViT and aligner in bf16
    pytest.param(LORA_LLM, "bf16", "plugin", id="lora-llm-plugin-bf16"),
    # in fp16 lora_llm is exact: swift casts fp16 trainable parameters of adapter tuners to fp32
    pytest.param(LORA_LLM, "fp16", "lora_llm", id="lora-llm-flags-fp16"),
    # LoRA only, in bf16: no full parameter, the adapters are fp32 (PEFT's autocast_adapter_dtype),
    # so swift's own LoRA flags stay exact
    pytest.param(LORA_ONLY, "bf16", "lora", id="lora-only-flags-bf16"),
]

HF_DRIVER = r'''
import importlib.util, json, sys
path, data, out, record = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("train_parity", path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
trainer = mod.build_trainer(mod.parse_args(["--data", data, "--output-dir", out]))
trainer.train()
assert trainer.state.global_step == 2, trainer.state.global_step
names = {id(p): mod.plan_name(n) for n, p in trainer.model.named_parameters()}
rows = {}
for group in trainer.optimizer.param_groups:
    for param in group["params"]:
        rows[names[id(param)]] = {"lr": group.get("initial_lr", group["lr"]),
                                  "weight_decay": group["weight_decay"],
                                  "dtype": str(param.dtype).replace("torch.", "")}
held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
frozen = {mod.plan_name(n).replace(".base_layer.", "."): str(p.dtype).replace("torch.", "")
          for n, p in trainer.model.named_parameters() if id(p) not in held}
with open(record, "w") as fh:
    json.dump({"optimizer": rows, "frozen": frozen}, fh, indent=1, sort_keys=True)
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    model = make_tiny_vlm.make_tiny_qwen25vl(root / "qwen25vl")
    data = make_tiny_vlm.colour_rows(root)
    return {"root": root, "model": model, "data": data}


def _run(cmd, cwd, log):
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    log.write_text(text, encoding="utf-8")
    assert proc.returncode == 0, text[-6000:]
    return text


def _plan_record(plan) -> dict:
    wds = plan.trainable_weight_decays()
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[plan.training.trained_dtype]
    return {n: {"lr": lr, "weight_decay": wds[n], "dtype": dtype} for n, lr in plan.trainable_lrs().items()}


@pytest.mark.parametrize("components,precision,tuner", CASES)
def test_hf_and_swift_optimizers_hold_the_same_parameters_as_the_plan(tiny, request, components, precision,
                                                                       tuner):
    case = request.node.callspec.id
    folder = tiny["root"] / case
    folder.mkdir()
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(model=tiny["model"], components=components, precision=precision,
                                data=tiny["data"], out=folder / "swift-run"), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    assert swift_target.decide(plan, TargetOptions()).tuner == tuner
    want = _plan_record(plan)
    # the case exercises both kinds of weight decay, or none
    assert len({r["weight_decay"] for r in want.values()}) == (2 if "weight_decay: 0.1" in components else 1)

    write_files(folder / "hf", render(plan, "hf", TargetOptions()))
    write_files(folder / "swift", render(plan, "swift", TargetOptions()))

    driver = folder / "hf_driver.py"
    driver.write_text(HF_DRIVER, encoding="utf-8")
    hf_record = folder / "hf_record.json"
    _run([str(PYTHON), str(driver), str(folder / "hf" / "train.py"), str(tiny["data"]),
          str(folder / "hf-run"), str(hf_record)], folder, folder / "hf.log")
    # --external_plugins takes a list and the last flag wins: name mixspec's plugin again
    plugins = ([str(folder / "swift" / swift_target.PLUGIN_FILE)] if tuner == "plugin" else []) + [str(DUMP_PLUGIN)]
    cpu_bf16 = ["--use_cpu", "true"] if precision != "fp32" else []  # no bf16 GPU here
    _run(["bash", str(folder / "swift" / "train.sh"), *SWIFT_EXTRA, *cpu_bf16, "--external_plugins", *plugins],
         folder, folder / "swift.log")

    hf_both = json.loads(hf_record.read_text())
    hf = hf_both["optimizer"]
    swift = json.loads((folder / "swift-run" / "optimizer_record.json").read_text())
    # frozen parameters: held in the training precision by both (the Plan's frozen_dtype)
    frozen_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[plan.training.frozen_dtype]
    swift_frozen = json.loads((folder / "swift-run" / "frozen_dtypes.json").read_text())
    assert hf_both["frozen"] == swift_frozen
    assert set(swift_frozen.values()) == {frozen_dtype}, sorted(set(swift_frozen.values()))
    assert set(hf) == set(want), sorted(set(hf) ^ set(want))[:10]
    assert set(swift) == set(want), sorted(set(swift) ^ set(want))[:10]
    for name in want:
        assert hf[name] == swift[name] == want[name], (name, hf[name], swift[name], want[name])
    if tuner == "plugin":  # the plugin's own report says the same
        report = json.loads((folder / "swift-run" / "mixspec_check.json").read_text())
        assert report["lr_by_param"] == {n: r["lr"] for n, r in want.items()}
        assert report["weight_decay_by_param"] == {n: r["weight_decay"] for n, r in want.items()}
        assert report["dtype_by_param"] == {n: r["dtype"] for n, r in want.items()}
    print(json.dumps({"case": case, "tensors": len(want), "frozen_dtype": plan.training.frozen_dtype,
                      "no_decay": sum(1 for r in want.values() if r["weight_decay"] == 0.0),
                      "lrs": sorted({r["lr"] for r in want.values()})}))
