"""mixspec import --from axolotl: what an axolotl 0.19 config really trains.

Oracles mixspec did not compute:
- counts measured with a real axolotl on a tiny Qwen2.5-VL
  (shared/research/llamafactory-axolotl-cpu.md: 90,496 for LoRA r4 on the LLM plus the merger
  as modules_to_save, 240,896 for `unfrozen_parameters: ['^model.visual.+']`, and
  `'^model\\.visual\\..*'` freezing everything);
- with AXOLOTL_PYTHON set (opt-in, slow): axolotl 0.19.0's own functions on a tiny model
  (loaders/adapter.py _build_peft_lora_config + PEFT, utils/freeze.py freeze_layers_except,
  OptimizerMixin.create_optimizer_grouped_parameters), compared name by name and LR by LR with
  the imported spec's Plan. The venv that test needs (about 1.8 GB, a few minutes, not in CI):

      python3 -m venv /tmp/axo-venv && /tmp/axo-venv/bin/pip install torch==2.13.0
      /tmp/axo-venv/bin/pip install axolotl==0.19.0 --no-deps
      /tmp/axo-venv/bin/pip install -c <(echo torch==2.13.0) accelerate transformers==5.16.1 \\
          peft==0.20.0 pillow datasets trl addict numba bitsandbytes posthog
      AXOLOTL_PYTHON=/tmp/axo-venv/bin/python pytest -m slow tests/importers/test_import_axolotl.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import codes, effect
from mixspec.api import plan_spec
from mixspec.importers import read
from mixspec.importers.axolotl import LayerNamePattern
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "targets"))  # the LLaMA-Factory target's test cases
from test_target_llamafactory import _tiny_qwen25vl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QWEN_VL = "Qwen/Qwen2.5-VL-7B-Instruct"
LLM_REGEX = "'model.language_model.*(q|k|v|o|gate|up|down)_proj'"


def axo(text: str, path: str = "config.yml"):
    return read("axolotl", textwrap.dedent(text), path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(_tiny_qwen25vl(tmp_path_factory.mktemp("axo") / "tiny"))


# -- counts measured with a real axolotl (research/llamafactory-axolotl-cpu.md) -----------------

def test_lora_plus_modules_to_save_count_measured_with_axolotl(tiny):
    imp = axo(f"base_model: {tiny}\nadapter: lora\nlora_r: 4\nlora_alpha: 8\n"
              f"lora_target_modules: {LLM_REGEX}\nlora_modules_to_save: [merger]\nlearning_rate: 1.0e-4\n")
    assert imp.ok, [p.render() for p in imp.problems]
    plan = plan_spec(imp.spec)
    assert plan.totals.trainable_params == 90_496
    copy = effect(imp, "modules-to-save-copy")
    assert "82,304 parameters held twice" in copy.message and str(copy.where) == "config.yml:6:1"


def test_unfrozen_visual_count_measured_with_axolotl(tiny):
    imp = axo(f"base_model: {tiny}\nunfrozen_parameters: ['^model.visual.+']\nlearning_rate: 1.0e-5\n")
    plan = plan_spec(imp.spec)
    assert plan.totals.trainable_params == 240_896
    assert set(imp.spec["components"]) == {"vision", "aligner"}


def test_escaped_dots_freeze_everything_as_measured(tiny):
    imp = axo(f"base_model: {tiny}\nunfrozen_parameters: ['^model\\.visual\\..*']\nlearning_rate: 1.0e-5\n")
    assert not imp.ok
    e = effect(imp, "unfrozen-pattern-matches-nothing")
    assert str(e.where) == "config.yml:2:23" and "backslash" in e.message
    assert e.fix == "write '^model.visual..+'"
    assert any("trains no parameter" in p.message for p in imp.problems)


# -- silent effects --------------------------------------------------------------------------

def test_unfrozen_parameters_freeze_the_lora_weights():
    imp = axo(f"""\
        base_model: {QWEN_VL}
        adapter: lora
        lora_r: 16
        lora_alpha: 32
        lora_target_modules: {LLM_REGEX}
        unfrozen_parameters:
          - 'base_model.model.model.visual.merger.+'
        learning_rate: 2.0e-4
        """)
    assert imp.ok
    e = effect(imp, "unfrozen-parameters-freeze-lora")
    assert "196 of 196 LoRA modules" in e.message and "#1188" in e.message
    assert str(e.where) == "config.yml:6:1"
    plan = plan_spec(imp.spec)
    assert not any(c.mode == "lora" for c in plan.components)
    assert plan.totals.trainable_params == 44_574_464  # the merger alone
    # naming the adapters keeps them
    imp = axo(f"base_model: {QWEN_VL}\nadapter: lora\nlora_r: 16\nlora_alpha: 32\n"
              f"lora_target_modules: {LLM_REGEX}\nunfrozen_parameters: ['.+merger.+', '.+lora_']\n"
              "learning_rate: 2.0e-4\n")
    assert "unfrozen-parameters-freeze-lora" not in [x.code for x in imp.effects]
    plan = plan_spec(imp.spec)
    assert plan.component("language").lora.added_params == 40_370_176


def test_lr_groups_leave_biases_and_norms_at_the_base_lr():
    imp = axo(f"""\
        base_model: {QWEN_VL}
        unfrozen_parameters: ['model.visual.+']
        lr_groups:
          - name: vit
            modules: [visual.blocks]
            lr: 2.0e-6
        learning_rate: 1.0e-5
        """)
    assert imp.ok, [p.render() for p in imp.problems]
    e = effect(imp, "lr-groups-skip-no-decay")
    assert str(e.where) == "config.yml:4:5"
    assert "base learning rate 1e-05, not 2e-06" in e.message and "attn.qkv.bias" in e.message
    lrs = plan_spec(imp.spec).trainable_lrs()
    assert lrs["model.visual.blocks.0.attn.qkv.weight"] == 2e-6
    assert lrs["model.visual.blocks.0.attn.qkv.bias"] == 1e-5
    assert lrs["model.visual.blocks.0.norm1.weight"] == 2e-6  # RMSNorm 'norm1': transformers' rule decays it
    assert lrs["model.visual.merger.mlp.0.weight"] == 1e-5
    # Qwen2.5-VL-7B ViT: 32 blocks x (qkv, proj, gate/up/down) biases = 160 parameters at the base LR
    assert "160 biases and norm weights" in e.message


def test_lora_target_linear_on_a_vlm_reaches_the_vit_and_then_fails_on_a_sequential_index():
    imp = axo(f"base_model: {QWEN_VL}\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
              "learning_rate: 1.0e-4\n")
    assert not imp.ok
    assert "lora-target-linear-whole-model" in [e.code for e in imp.effects]
    (problem,) = [p for p in imp.problems if p.severity == "error"]
    assert str(problem.location) == "config.yml:5:21"
    assert "'0', '2'" in problem.message and "Qwen2_5_VLDecoderLayer" in problem.message


def test_unknown_keys_are_ignored_by_axolotl_and_reported():
    imp = axo(f"base_model: {QWEN_VL}\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj]\n"
              "unfrozen_paramters: ['.+']\nlearning_rate: 1.0e-4\n")
    e = effect(imp, "unknown-key-ignored")
    assert str(e.where) == "config.yml:6:1" and "'unfrozen_parameters'" in e.fix


def test_lora_target_list_item_matching_nothing():
    imp = axo(f"base_model: {QWEN_VL}\nadapter: lora\nlora_r: 8\nlora_alpha: 16\n"
              "lora_target_modules: [q_proj, 'model.*v_proj']\nlearning_rate: 1.0e-4\n")
    e = effect(imp, "lora-target-matches-nothing")
    assert "'model.*v_proj'" in e.message and "not a regex" in e.message
    plan = plan_spec(imp.spec)
    assert {t.rsplit(".", 1)[-1] for c in plan.components if c.lora for t in c.lora.targets} == {"q_proj"}


def test_lora_keys_without_adapter_do_nothing():
    imp = axo(f"base_model: {QWEN_VL}\nlora_r: 8\nunfrozen_parameters: ['model.visual.merger.+']\n"
              "learning_rate: 1.0e-4\n")
    assert str(effect(imp, "flag-no-effect").where) == "config.yml:2:1"


@pytest.mark.parametrize("text,where,words", [
    (f"base_model: {QWEN_VL}\nadapter: qlora\nlearning_rate: 1.0e-4\n", "config.yml:2:10", "load_in_4bit: true"),
    (f"base_model: {QWEN_VL}\nadapter: lora\nlora_target_modules: [q_proj]\nlearning_rate: 1.0e-4\n",
     "config.yml:2:1", "lora_r and lora_alpha"),
    (f"base_model: {QWEN_VL}\nunfrozen_parameters: ['model.embed.+[:100]']\nlearning_rate: 1.0e-4\n",
     "config.yml:2:23", "range of a tensor"),
    (f"base_model: {QWEN_VL}\noptimizer: adamw_anyprecision\nlearning_rate: 1.0e-4\n", "config.yml:2:12",
     "mixspec plans AdamW"),
    (f"base_model: {QWEN_VL}\n", "config.yml:1:1", "requires learning_rate"),
    ("learning_rate: [1\n", "config.yml:2:1", "YAML syntax error"),
])
def test_problems_are_located(text, where, words):
    imp = axo(text)
    errors = [p for p in imp.problems if p.severity == "error"]
    assert any(str(p.location) == where and words in p.render() for p in errors), [p.render() for p in errors]


def test_layer_name_pattern_reading():
    # research: '^model\.visual\..*' matched nothing, '^model.visual.+' worked
    assert not LayerNamePattern(r"^model\.visual\..*").match("model.visual.blocks.0.attn.qkv.weight")
    assert LayerNamePattern("^model.visual.+").match("model.visual.blocks.0.attn.qkv.weight")
    assert not LayerNamePattern("^model.visual.+").match("model_visual_x")


# -- opt-in: axolotl's own functions ----------------------------------------------------------

_ORACLE = textwrap.dedent("""
    import json, os, sys, types
    os.environ["AXOLOTL_DO_NOT_TRACK"] = "1"
    import torch, transformers, yaml
    from transformers import AutoConfig, Trainer
    from peft import get_peft_model
    from axolotl.utils.dict import DictDefault
    from axolotl.loaders.adapter import _build_peft_lora_config
    from axolotl.utils.freeze import freeze_layers_except
    from axolotl.core.trainers.mixins.optimizer import OptimizerMixin

    model_dir, config_path = sys.argv[1], sys.argv[2]
    cfg = DictDefault(yaml.safe_load(open(config_path)))
    if cfg.adapter and cfg.lora_dropout is None:
        cfg.lora_dropout = 0.0  # what axolotl's schema (validate_lora_dropout) fills in
    raw = json.load(open(os.path.join(model_dir, "config.json")))
    config = AutoConfig.for_model(**raw)
    model = getattr(transformers, raw["architectures"][0])._from_config(config, dtype=torch.float32)
    try:
        if cfg.adapter == "lora":
            model = get_peft_model(model, _build_peft_lora_config(model, cfg))
        if cfg.unfrozen_parameters:
            freeze_layers_except(model, cfg.unfrozen_parameters)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}))
        sys.exit(0)
    lr = float(cfg.learning_rate)
    stub = types.SimpleNamespace(args=types.SimpleNamespace(
        lr_groups=cfg.lr_groups, weight_decay=cfg.weight_decay or 0.0,
        embedding_lr_scale=cfg.embedding_lr_scale, embedding_lr=cfg.embedding_lr))
    stub.get_decay_parameter_names = lambda m: Trainer.get_decay_parameter_names(stub, m)
    groups = OptimizerMixin.create_optimizer_grouped_parameters(stub, model, {"lr": lr})
    names = {id(p): n for n, p in model.named_parameters()}
    def plain(n):
        n = n[len("base_model.model."):] if n.startswith("base_model.model.") else n
        return n.replace(".modules_to_save.default.", ".")
    out = {}
    for g in groups:
        for p in g["params"]:
            out[plain(names[id(p)])] = g["lr"]
    trainable = sorted(plain(n) for n, p in model.named_parameters() if p.requires_grad)
    print(json.dumps({"lrs": out, "trainable": trainable}))
""")

ORACLE_CASES = [
    "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: " + LLM_REGEX + "\n"
    "unfrozen_parameters: ['base_model.model.model.visual.merger.+']\n"
    "lr_groups: [{name: merger, modules: [visual.merger], lr: 1.0e-5}]\n",
    "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.05\nlora_target_modules: [q_proj, v_proj, qkv]\n"
    "lora_modules_to_save: [merger]\nlr_groups: [{name: attn, modules: [self_attn], lr: 5.0e-5}]\n",
    "unfrozen_parameters: ['model.visual.blocks.1.+', 'model.language_model.norm.+', 'lm_head.+']\n"
    "lr_groups: [{name: vit, modules: [visual.blocks], lr: 1.0e-6}]\nembedding_lr_scale: 0.1\n",
    "lr_groups: [{name: visual, modules: [visual], lr: 1.0e-6}, {name: mlp, modules: [mlp], lr: 3.0e-6}]\n",
    "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n",
    "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_modules: " + LLM_REGEX + "\npeft_use_dora: true\n"
    "unfrozen_parameters: ['.+lora_', '.+visual.merger.+']\n",
]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AXOLOTL_PYTHON"),
                    reason="set AXOLOTL_PYTHON to a python with axolotl==0.19.0 (see this file's docstring)")
def test_axolotl_own_functions_train_what_the_import_says(tiny, tmp_path):
    (tmp_path / "oracle.py").write_text(_ORACLE)
    failures = []
    for i, case in enumerate(ORACLE_CASES):
        text = f"base_model: {tiny}\n{case}learning_rate: 2.0e-4\n"
        path = tmp_path / f"case{i}.yml"
        path.write_text(text)
        run = subprocess.run([os.environ["AXOLOTL_PYTHON"], str(tmp_path / "oracle.py"), tiny, str(path)],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "AXOLOTL_DO_NOT_TRACK": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        imp = read("axolotl", text, str(path))
        if "error" in got:
            # axolotl (PEFT) refuses this config: so must the import, for the same modules
            if imp.ok:
                failures.append((case, "axolotl refused, the import did not", got["error"]))
            continue
        assert imp.ok, [p.render() for p in imp.problems]
        lrs = plan_spec(imp.spec).trainable_lrs()
        if got["trainable"] != sorted(lrs):
            failures.append((case, sorted(set(got["trainable"]) ^ set(lrs))[:8]))
        elif got["lrs"] != lrs:
            failures.append((case, sorted((n, got["lrs"].get(n), lrs.get(n)) for n in set(lrs) | set(got["lrs"])
                                          if got["lrs"].get(n) != lrs.get(n))[:8]))
    assert not failures, failures


@pytest.mark.parametrize("text", [
    f"base_model: {QWEN_VL}\nlearning_rate: 1.0e-4\nlogging_steps: .inf\nsave_steps: .nan\n",
    f"base_model: {QWEN_VL}\nlearning_rate: 1.0e-4\nlr_groups: {{a: 1}}\ndatasets: 3\ndeepspeed: [1]\n",
    f"base_model: {QWEN_VL}\nlearning_rate: 1.0e-4\nlr_groups: [{{name: x}}, 3]\nunfrozen_parameters: ['(']\n",
    f"base_model: {QWEN_VL}\nlearning_rate: -1\nunfrozen_parameters: ['model.visual.merger.+']\n",
    f"base_model: {QWEN_VL}\nadapter: lora\nlora_r: 0\nlora_alpha: 8\nlora_target_modules: '('\nlearning_rate: 1\n",
    "base_model: 7\nlearning_rate: x\n",
])
def test_odd_values_give_problems_or_a_spec_never_a_traceback(text):
    imp = axo(text)
    for p in imp.problems:
        assert p.location.file == "config.yml" and p.message
    if imp.ok:
        plan_spec(imp.spec)


def test_cli_imports_writes_the_spec_and_refuses_with_locations(run_cli, tmp_path):
    good = tmp_path / "config.yml"
    good.write_text(f"base_model: {QWEN_VL}\nunfrozen_parameters: ['model.visual.+']\n"
                    "lr_groups: [{name: vit, modules: [visual.blocks], lr: 2.0e-6}]\nlearning_rate: 1.0e-5\n")
    out = tmp_path / "spec.yaml"
    ok = run_cli("import", "--from", "axolotl", str(good), "-o", str(out))
    assert ok.exit_code == 0, ok.stderr
    assert "lr-groups-skip-no-decay" in ok.stdout
    assert plan_spec(str(out)).trainable_lrs() == plan_spec(axo(good.read_text(), str(good)).spec).trainable_lrs()
    bad = tmp_path / "bad.yml"
    bad.write_text(f"base_model: {QWEN_VL}\nadapter: qlora\nlearning_rate: 1.0e-4\n")
    refused = run_cli("import", "--from", "axolotl", str(bad), "-o", str(tmp_path / "no.yaml"))
    assert refused.exit_code == 1 and "Traceback" not in refused.stderr
    assert f"{bad}:2:10: error: adapter:" in refused.stderr
    assert not (tmp_path / "no.yaml").exists()


def test_weight_decay_rule_differences_are_named():
    imp = axo(f"base_model: {QWEN_VL}\nunfrozen_parameters: ['model.visual.blocks.0.+', 'lm_head.+']\n"
              "weight_decay: 0.1\nlearning_rate: 1.0e-5\n")
    texts = [e.message for e in imp.effects if e.code == "weight-decay-rule"]
    assert any("embeddings no weight decay" in t and "lm_head.weight" in t for t in texts)
    assert any("model.visual.blocks.0.norm1.weight" in t for t in texts)  # an RMSNorm named norm1


@pytest.mark.parametrize("extra, reported", [
    ("bf16: true\n", True),                                         # loaded and updated in bf16
    ("fp16: true\n", True),
    ("", False),                                                    # fp32: nothing to say
    ("bf16: true\ndeepspeed: deepspeed_configs/zero2.json\n", False),  # ZeRO keeps fp32 masters
])
def test_fully_trained_parameters_in_half_precision_are_said(extra, reported):
    """axolotl's cfg.torch_dtype is the training precision (utils/config) and the model is loaded
    in it, so a full fine-tune (here: unfrozen_parameters on the merger) updates bf16/fp16
    weights, where the spec's Plan keeps fp32 master weights."""
    got = axo(f"base_model: {QWEN_VL}\nlearning_rate: 1.0e-5\n"
              "unfrozen_parameters: ['model.visual.merger.*']\n" + extra)
    assert got.ok, [p.render() for p in got.problems]
    assert ("full-params-dtype" in codes(got)) == reported, codes(got)
    if reported:
        e = effect(got, "full-params-dtype")
        assert e.where.line == 4 and "aligner" in e.message and "fp32 master" in e.message
    # LoRA alone trains nothing fully: no effect in any precision
    lora = axo(f"base_model: {QWEN_VL}\nlearning_rate: 1.0e-4\nadapter: lora\nlora_r: 8\nlora_alpha: 16\n"
               "lora_target_modules: [q_proj, v_proj]\n" + extra)
    assert "full-params-dtype" not in codes(lora)
