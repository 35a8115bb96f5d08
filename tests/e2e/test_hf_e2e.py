"""End to end on CPU: the generated train.py against tiny random Qwen2.5-VL and LLaVA models.

Each test compiles a spec with mixspec, then runs what it wrote with the real backend
(transformers + PEFT, DeepSpeed for the ZeRO-2 case) and compares with the Plan:
the self-check (``--check``) confirms the planned count and fails on a model with one more
layer; two training steps leave frozen weights bit-identical and move every trained one;
every trainable parameter's optimizer LR equals the Plan; save -> reload reproduces the
trained model exactly; the merge step writes a model that computes the same logits.

The Qwen2.5-VL rows are text-only: transformers' Qwen2.5-VL processor needs torchvision
(its video processor), which the CPU torch of this project cannot import. LLaVA's
processor needs no torchvision, so its rows carry images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mixspec.language.loader import load_spec  # noqa: E402
from mixspec.output import write_files  # noqa: E402
from mixspec.planning.resolve import plan_spec  # noqa: E402
from mixspec.targets import TargetOptions, render  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_tiny_vlm  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "qwen": make_tiny_vlm.make_tiny_qwen25vl(root / "qwen25vl"),
        "qwen3": make_tiny_vlm.make_tiny_qwen25vl(root / "qwen25vl-3layers", num_layers=3),
        "llava": make_tiny_vlm.make_tiny_llava(root / "llava"),
    }


TEXT_ROWS = [
    {"messages": [{"role": "user", "content": "What is the colour of the sky?"},
                  {"role": "assistant", "content": "The sky is blue."}]},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "one, two, three"},
                  {"role": "user", "content": "And four?"},
                  {"role": "assistant", "content": "four"}]},
    {"messages": [{"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hello, how are you today?"}]},
    {"messages": [{"role": "user", "content": "Name a shape."},
                  {"role": "assistant", "content": "A triangle."}]},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


QWEN_SPEC = """\
version: 1
model: {model}
components:
  language:
    train: lora
    lr: 2.0e-4
    lora: {{rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}}
  embeddings: {{train: full, lr: 1.0e-5}}
  lm_head: {{train: full, lr: 3.0e-5, weight_decay: 0.1}}
  vision: {{train: freeze}}
training: {{epochs: 1, max_steps: 2, micro_batch_size: 2, gradient_accumulation: 1, precision: fp32,
           gradient_checkpointing: false, max_length: 128, logging_steps: 1, lr_scheduler: constant,
           save_steps: 100}}
data: {{train: data.jsonl}}
{extra}
output_dir: {out}
"""

LLAVA_SPEC = """\
version: 1
model: {model}
components:
  early_vit:
    modules: ['model\\.vision_tower\\.(embeddings|pre_layrnorm|encoder\\.layers\\.0)']
    train: full
    lr: 2.0e-6
  aligner: {{train: full, lr: 1.0e-4}}
  language:
    train: lora
    lr: 2.0e-4
    lora: {{rank: 4, alpha: 8, dropout: 0.0, targets: all-linear}}
  late_mlp:
    modules: ['model\\.language_model\\.layers\\.1\\.mlp']
    train: lora
    lr: 5.0e-4
    lora: {{rank: 8, alpha: 4, dropout: 0.1, targets: all-linear}}
training: {{epochs: 1, max_steps: 2, micro_batch_size: 2, gradient_accumulation: 1, precision: fp32,
           gradient_checkpointing: true, max_length: 256, logging_steps: 1, lr_scheduler: constant}}
data: {{train: data.jsonl}}
output_dir: {out}
"""


def compile_spec(workdir: Path, text: str):
    """Write the spec, plan it and compile it for hf into workdir/out; returns (plan, out dir)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = workdir / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    files = render(plan, "hf", TargetOptions())
    out = workdir / "out"
    write_files(out, files, force=True)
    return plan, out


def import_train(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def named(model):
    return {n: p for n, p in model.named_parameters()}


def group_lr_by_name(trainer, module):
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    return {module.plan_name(n): lr_of.get(id(p)) for n, p in trainer.model.named_parameters() if p.requires_grad}


def group_wd_by_name(trainer, module):
    wd_of = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    return {module.plan_name(n): wd_of.get(id(p)) for n, p in trainer.model.named_parameters() if p.requires_grad}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_two_steps_match_plan(trainer, module, plan, before):
    """Frozen weights bit-identical, trained ones moved, each trainable param at its planned LR."""
    after = named(trainer.model)
    planned = plan.trainable_lrs()
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert {module.plan_name(n) for n in trainable} == set(planned)
    for name, param in after.items():
        if name in trainable:
            assert not torch.equal(param.detach(), before[name]), f"trained parameter did not move: {name}"
        else:
            assert torch.equal(param.detach(), before[name]), f"frozen parameter changed: {name}"
    assert group_lr_by_name(trainer, module) == planned
    assert group_wd_by_name(trainer, module) == plan.trainable_weight_decays()
    assert sum(p.numel() for p in after.values() if p.requires_grad) == plan.totals.trainable_params


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


# -- the self-check ---------------------------------------------------------------------

def test_check_confirms_the_plan_and_fails_on_another_model(models, tmp_path):
    plan, out = compile_spec(tmp_path, QWEN_SPEC.format(model=models["qwen"], extra="", out=tmp_path / "run"))
    write_jsonl(tmp_path / "data.jsonl", TEXT_ROWS)
    ok = run_script(out / "train.py", "--check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    count = f"{plan.totals.trainable_params:,}"
    assert f"planned trainable parameters: {count}\n" in ok.stdout
    assert f"actual trainable parameters:  {count}\n" in ok.stdout
    assert "self-check passed" in ok.stdout

    bad = run_script(out / "train.py", "--check", "--model", models["qwen3"], cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "mixspec self-check failed: model structure" in bad.stderr
    assert ("model.language_model.layers (language): the model has 3 (0-2), the plan was made for 2 (0-1)"
            in bad.stderr)
    assert "Traceback" not in bad.stderr
    # the unchecked path refuses the same model before any training step
    bad_train = run_script(out / "train.py", "--model", models["qwen3"], "--max-steps", "1", cwd=tmp_path)
    assert bad_train.returncode == 1
    assert "the model has 3 (0-2), the plan was made for 2 (0-1)" in bad_train.stderr
    assert not (tmp_path / "run").exists()


# -- Qwen2.5-VL: standalone run, merge ---------------------------------------------------

def test_qwen_standalone_train_save_merge(models, tmp_path):
    plan, out = compile_spec(tmp_path, QWEN_SPEC.format(model=models["qwen"], extra="", out="run"))
    write_jsonl(tmp_path / "data.jsonl", TEXT_ROWS)
    result = run_script(out / "train.py", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = tmp_path / "run" / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "trained_params.safetensors",
                 "mixspec_plan.json", "tokenizer.json"):
        assert (final / name).is_file(), name
    # per-component monitoring reached the log of each step
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    steps = [h for h in state["log_history"] if "loss" in h]
    assert len(steps) == 2
    for entry in steps:
        for comp in ("language", "embeddings", "lm_head"):
            assert entry[f"grad_norm/{comp}"] > 0
            assert entry[f"update_ratio/{comp}"] > 0
            assert entry[f"lr/{comp}"] == plan.component(comp).lr

    merged = tmp_path / "merged"
    result = run_script(out / "train.py", "--merge", final, "--out", merged, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()

    module = import_train(out / "train.py", "train_qwen_merge")
    trained = module.load_trained(str(final), str(models["qwen"]))
    import transformers

    plain = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(merged, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(models["qwen"])
    ids = tokenizer(["<|im_start|>user\nWhat is the colour of the sky?<|im_end|>\n"], return_tensors="pt").input_ids
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.testing.assert_close(logits(plain, batch), logits(trained, batch), rtol=1e-5, atol=1e-5)
    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(models["qwen"], dtype=torch.float32)
    assert not torch.allclose(logits(base, batch), logits(plain, batch))


# -- in-process: exact checks on the trainer -----------------------------------------------

def test_qwen_two_steps_in_process_reload_exact(models, tmp_path):
    plan, out = compile_spec(tmp_path, QWEN_SPEC.format(model=models["qwen"], extra="", out=tmp_path / "run"))
    write_jsonl(tmp_path / "data.jsonl", TEXT_ROWS)
    module = import_train(out / "train.py", "train_qwen_inproc")
    args = module.parse_args(["--data", str(tmp_path / "data.jsonl")])
    trainer = module.build_trainer(args)
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    assert_two_steps_match_plan(trainer, module, plan, before)
    groups = {g["name"]: (g["lr"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
    assert groups == {"language/decay": (2e-4, 0.0), "embeddings/decay": (1e-5, 0.0),
                      "lm_head/decay": (3e-5, 0.1)}

    ckpt = tmp_path / "saved"
    trainer.save_model(str(ckpt))
    reloaded = module.load_trained(str(ckpt), str(models["qwen"]))
    got, want = named(reloaded), named(trainer.model)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].detach(), want[name].detach()), name
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert torch.equal(logits(reloaded, batch), logits(trainer.model, batch))


def test_bf16_frozen_weights_16_bit_trained_ones_fp32(models, tmp_path):
    """As the memory estimate assumes: frozen weights in bf16, trained ones (and adapters) in fp32."""
    spec = QWEN_SPEC.replace("precision: fp32", "precision: bf16")
    plan, out = compile_spec(tmp_path, spec.format(model=models["qwen"], extra="", out=tmp_path / "run"))
    write_jsonl(tmp_path / "data.jsonl", TEXT_ROWS)
    module = import_train(out / "train.py", "train_qwen_bf16")
    trainer = module.build_trainer(module.parse_args(["--data", str(tmp_path / "data.jsonl")]))
    params = named(trainer.model)
    assert {p.dtype for p in params.values() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params.values() if not p.requires_grad} == {torch.bfloat16}
    before = snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    assert_two_steps_match_plan(trainer, module, plan, before)


def test_llava_images_two_lora_components(models, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    make_tiny_vlm.make_image(images / "red.png", (56, 56), (200, 30, 30))
    make_tiny_vlm.make_image(images / "blue.png", (80, 64), (30, 30, 200))
    rows = [
        {"messages": [{"role": "user", "content": "<image>What colour is this?"},
                      {"role": "assistant", "content": "Red."}], "images": ["img/red.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": "Blue."}], "images": [str(images / "blue.png")]},
        {"messages": [{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": "A square."}],
         "images": ["img/blue.png"]},
        TEXT_ROWS[0],
    ]
    write_jsonl(tmp_path / "data.jsonl", rows)
    # weight decay on trained LayerNorms, biases and CLIP's 1-D class embedding: the Plan exempts them
    spec = LLAVA_SPEC.replace("train: full\n    lr: 2.0e-6", "train: full\n    lr: 2.0e-6\n    weight_decay: 0.05")
    spec = spec.replace("aligner: {{train: full, lr: 1.0e-4}}", "aligner: {{train: full, lr: 1.0e-4, weight_decay: 0.02}}")
    plan, out = compile_spec(tmp_path, spec.format(model=models["llava"], out=tmp_path / "run"))

    module = import_train(out / "train.py", "train_llava_inproc")
    trainer = module.build_trainer(module.parse_args(["--data", str(tmp_path / "data.jsonl")]))
    item = trainer.train_dataset[0]
    assert int((item["inputs"]["input_ids"] == make_tiny_vlm.LLAVA_IMAGE_TOKEN_ID).sum()) == 16
    assert item["inputs"]["pixel_values"].shape == (1, 3, 56, 56)
    assert int((item["labels"] != -100).sum()) > 0

    # PEFT got each component's own rank, scaling and dropout, on exactly the planned modules
    from peft.tuners.lora import LoraLayer

    base = trainer.model.get_base_model()
    wrapped = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    late, lang = plan.component("late_mlp").lora, plan.component("language").lora
    assert set(wrapped) == set(late.targets) | set(lang.targets)
    for name in late.targets:
        layer = wrapped[name]
        assert layer.r["default"] == 8 and layer.scaling["default"] == 4 / 8
        assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout) and layer.lora_dropout["default"].p == 0.1
    for name in lang.targets:
        layer = wrapped[name]
        assert layer.r["default"] == 4 and layer.scaling["default"] == 8 / 4
        assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)

    before = snapshot(trainer.model)
    trainer.train()
    assert_two_steps_match_plan(trainer, module, plan, before)
    # the optimizer's weight decay per parameter, against the module types of the real model
    wd = group_wd_by_name(trainer, module)
    for name, param in base.named_parameters():
        if name not in wd or ".lora_" in name:
            continue
        owner = base.get_submodule(name.rsplit(".", 1)[0])
        exempt = isinstance(owner, torch.nn.LayerNorm) or param.ndim < 2
        assert wd[name] == (0.0 if exempt else 0.05 if "vision_tower" in name else 0.02), name
    assert wd["model.vision_tower.pre_layrnorm.weight"] == 0.0
    assert wd["model.vision_tower.embeddings.class_embedding"] == 0.0
    assert wd["model.vision_tower.embeddings.patch_embedding.weight"] == 0.05
    assert wd["model.multi_modal_projector.linear_1.weight"] == 0.02

    ckpt = tmp_path / "saved"
    trainer.save_model(str(ckpt))
    reloaded = module.load_trained(str(ckpt), str(models["llava"]))
    got, want = named(reloaded), named(trainer.model)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name].detach(), want[name].detach()), name
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[3]])
    assert torch.equal(logits(reloaded, batch), logits(trainer.model, batch))


# -- DeepSpeed ZeRO-2, one CPU process ----------------------------------------------------

_DS_DRIVER = textwrap.dedent('''\
    import json, os, sys, importlib.util
    os.environ.update(DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a minutes-long op build
    import torch
    spec = importlib.util.spec_from_file_location("train_ds", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    trainer = mod.build_trainer(mod.parse_args(["--data", sys.argv[2]]))
    base = mod.load_model(mod.PLAN["model"])
    initial = {n: p.detach().clone() for n, p in base.named_parameters()}
    trainer.train()
    change = {}
    for name, p in trainer.model.named_parameters():
        name = mod.plan_name(name)
        if name in initial:
            change[name] = float((p.detach().float() - initial[name]).abs().max())
    print("RESULT " + json.dumps({
        "engine": type(trainer.model_wrapped).__name__,
        "optimizer": type(trainer.optimizer).__name__,
        "groups": [[g.get("name"), g["lr"]] for g in trainer.optimizer.param_groups],
        "config_has_optimizer": "optimizer" in trainer.accelerator.state.deepspeed_plugin.deepspeed_config,
        "change": change,
    }))
''')


def test_deepspeed_zero2_keeps_per_group_lrs(models, tmp_path):
    pytest.importorskip("deepspeed")
    plan, out = compile_spec(tmp_path, QWEN_SPEC.format(
        model=models["qwen"], extra="distributed: {zero_stage: 2}", out=tmp_path / "run").replace(
        "lm_head: {train: full, lr: 3.0e-5, weight_decay: 0.1}", "lm_head: {train: full, lr: 3.0e-5}"))
    assert (out / "ds_config.json").is_file()
    write_jsonl(tmp_path / "data.jsonl", TEXT_ROWS)
    driver = tmp_path / "drive.py"
    driver.write_text(_DS_DRIVER, encoding="utf-8")
    result = run_script(driver, out / "train.py", tmp_path / "data.jsonl", "29517", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("RESULT "))
    data = json.loads(line[len("RESULT "):])
    assert data["engine"] == "DeepSpeedEngine"
    assert data["config_has_optimizer"] is False
    assert data["groups"] == [["language/decay", 2e-4], ["embeddings/decay", 1e-5], ["lm_head/decay", 3e-5]]
    # Adam moves each weight by about lr per step: two steps, at most 2 x the component's LR
    for comp in ("embeddings", "lm_head"):
        lr = plan.component(comp).lr
        largest = max(data["change"][n] for n in plan.component(comp).params)
        assert 1.5 * lr < largest <= 2.05 * lr, (comp, largest, lr)
    frozen = [n for n in plan.unassigned_params + plan.component("vision").params]
    assert all(data["change"][n] == 0.0 for n in frozen)
