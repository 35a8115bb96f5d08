"""mixspec import --from llamafactory: what a LLaMA-Factory 0.9.5 train.yaml really trains.

Oracles mixspec did not compute:
- counts measured with a real LLaMA-Factory 0.9.5 on a tiny Qwen2.5-VL
  (shared/research/llamafactory-axolotl-cpu.md): the imported spec must plan exactly them;
- the round trip through mixspec's llamafactory target: compile a spec, import the
  train.yaml, plan again: the same components, modes, LRs and exact counts;
- with LLAMAFACTORY_PYTHON set (opt-in, slow): LLaMA-Factory's own argument parser and model
  loader on the user's config, compared name by name with the imported spec's Plan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import codes, effect
from mixspec.api import plan_spec, render
from mixspec.errors import UnsupportedError
from mixspec.importers import read
from mixspec.language.loader import load_spec, load_spec_text
from mixspec.planning.resolve import plan_spec as resolve_plan
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "targets"))  # the LLaMA-Factory target's test cases
from test_target_llamafactory import EXACT, OWN_SPECS, _tiny_qwen25vl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QWEN_VL = "Qwen/Qwen2.5-VL-7B-Instruct"
TINY_BASE = 19_763_008


def lf(text: str, path: str = "train.yaml"):
    return read("llamafactory", textwrap.dedent(text), path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(_tiny_qwen25vl(tmp_path_factory.mktemp("lf") / "tiny"))


def head(model: str, method: str) -> str:
    return f"model_name_or_path: {model}\nstage: sft\ndo_train: true\n{textwrap.dedent(method)}" \
           "dataset: demo\nlearning_rate: 1.0e-4\nbf16: true\n"


# -- counts measured with a real LLaMA-Factory 0.9.5 (research/llamafactory-axolotl-cpu.md) ------

MEASURED = [
    # (method lines, trainable params, total params as LLaMA-Factory logs them)
    ("finetuning_type: lora\nlora_rank: 4\nlora_target: all\nfreeze_vision_tower: true\n"
     "freeze_multi_modal_projector: false\n", 8_192, TINY_BASE + 8_192),
    ("finetuning_type: lora\nlora_rank: 4\nlora_target: all\nadditional_target: merger\n", 90_496,
     19_853_504),
    ("finetuning_type: lora\nlora_rank: 4\nlora_target: all\nadditional_target: visual\n", 249_088,
     20_012_096),
    ("finetuning_type: lora\nlora_rank: 4\nlora_target: all\nfreeze_vision_tower: false\n", 15_872, None),
    ("finetuning_type: full\nfreeze_vision_tower: false\nfreeze_language_model: true\n"
     "freeze_multi_modal_projector: false\n", 240_896, TINY_BASE),
    ("finetuning_type: full\nfreeze_vision_tower: false\nfreeze_language_model: true\n", 158_592, TINY_BASE),
]


@pytest.mark.parametrize("method,trainable,total", MEASURED, ids=range(len(MEASURED)))
def test_counts_measured_with_llamafactory(tiny, method, trainable, total):
    imp = lf(head(tiny, method))
    assert imp.ok, [p.render() for p in imp.problems]
    plan = plan_spec(imp.spec)
    assert plan.totals.base_params == TINY_BASE
    assert plan.totals.trainable_params == trainable
    if total is not None:
        # modules_to_save copies add their parameters to LLaMA-Factory's "all params"; the spec
        # trains them in place, and the copy effect names exactly what the difference is
        copies = sum(int(e.message.split(" parameters held twice")[0].rsplit(": ", 1)[-1].replace(",", ""))
                     for e in imp.effects if e.code == "additional-target-copy")
        assert plan.totals.all_params + copies == total


def test_additional_target_is_a_full_component_with_the_copy_effect(tiny):
    imp = lf(head(tiny, "finetuning_type: lora\nlora_rank: 4\nadditional_target: merger\n"))
    assert imp.spec["components"]["aligner"] == {"train": "full", "lr": 1.0e-4}
    assert imp.groups["aligner"] == "additional_target (PEFT modules_to_save copies)"
    copy = effect(imp, "additional-target-copy")
    assert str(copy.where) == "train.yaml:6:1"
    assert "82,304 parameters held twice" in copy.message and "model.visual.merger" in copy.message
    assert "0.00 GiB" in copy.message  # 2 x 82,304 bytes in bf16
    assert str(imp.origins["components.aligner.train"]) == "train.yaml:6:1"


# -- silent effects --------------------------------------------------------------------------

def test_projector_not_trained_under_lora():
    imp = lf(head(QWEN_VL, "finetuning_type: lora\nlora_target: all\nfreeze_multi_modal_projector: false\n"))
    assert imp.ok
    e = effect(imp, "projector-not-trained-under-lora")
    assert str(e.where) == "train.yaml:6:1"
    assert "44,574,464 parameters stay frozen" in e.message and "#6754" in e.message
    assert "additional_target: merger" in e.fix
    assert list(imp.spec["components"]) == ["language"]  # the merger is not trained
    plan = plan_spec(imp.spec)
    assert not any(n.startswith("model.visual") for n in plan.trainable_lrs())


def test_freeze_vision_tower_false_under_lora_means_lora_on_the_vit():
    imp = lf(head(QWEN_VL, "finetuning_type: lora\nfreeze_vision_tower: false\n"))
    e = effect(imp, "flag-means-lora")
    assert "160 modules" in e.message and "patch_embed" in e.message  # 32 blocks x 5 Linear
    plan = plan_spec(imp.spec)
    vision = plan.component("vision")
    assert vision.mode == "lora" and len(vision.lora.targets) == 160
    assert not any(t.startswith("model.visual.patch_embed") for t in vision.lora.targets)


@pytest.mark.parametrize("method,key,line", [
    # Qwen2.5-7B (text) is not a composite model: freeze_* flags do nothing
    ("finetuning_type: full\nfreeze_vision_tower: false\n", "freeze_vision_tower", 5),
    ("finetuning_type: full\nlora_rank: 64\n", "lora_rank", 5),
    ("finetuning_type: lora\nfreeze_trainable_layers: 4\n", "freeze_trainable_layers", 5),
    ("finetuning_type: full\nadditional_target: lm_head\n", "additional_target", 5),
])
def test_flags_ignored_by_this_finetuning_type_or_model(method, key, line):
    imp = lf(head("Qwen/Qwen2.5-7B-Instruct", method))
    assert imp.ok
    hits = [e for e in imp.effects if e.code == "flag-no-effect"]
    assert [(str(e.where), key in e.message) for e in hits] == [(f"train.yaml:{line}:1", True)]


def test_full_ignores_flags_outside_the_registry_and_trains_everything():
    imp = lf(head("Qwen/Qwen2.5-7B-Instruct", "finetuning_type: full\nfreeze_language_model: true\n"))
    plan = plan_spec(imp.spec)
    assert plan.totals.trainable_params == plan.totals.base_params == 7_615_616_512


def test_lora_target_matching_nothing_and_filtered_targets():
    imp = lf(head(QWEN_VL, "finetuning_type: lora\nlora_target: q_proj,qkv_proj,qkv\n"))
    assert imp.ok
    nothing = effect(imp, "lora-target-matches-nothing")
    assert "'qkv_proj'" in nothing.message and str(nothing.where) == "train.yaml:5:1"
    assert nothing.fix.startswith("did you mean")
    filtered = effect(imp, "lora-target-filtered")
    assert "'qkv'" in filtered.message and "'visual.blocks'" in filtered.message
    plan = plan_spec(imp.spec)
    (comp,) = [c for c in plan.components if c.mode == "lora"]
    assert comp.lora.targets_spec == ["q_proj"] and len(comp.lora.targets) == 28


def test_lora_target_substring_matches_are_named():
    imp = lf(head(QWEN_VL, "finetuning_type: lora\nlora_target: proj\nfreeze_vision_tower: false\n"))
    e = effect(imp, "lora-target-substring")
    assert "'proj' also puts LoRA on" in e.message
    plan = plan_spec(imp.spec)
    targets = {t for c in plan.components if c.lora for t in c.lora.targets}
    # every *_proj of the LLM, the ViT's attn.proj and its gate/up/down_proj; never patch_embed.proj
    assert len(targets) == 28 * 7 + 32 * 4
    assert "model.visual.patch_embed.proj" not in targets


def test_freeze_tuning_layers_also_hit_the_vision_blocks(tiny):
    imp = lf(head(tiny, "finetuning_type: freeze\nfreeze_trainable_layers: 1\nfreeze_vision_tower: false\n"))
    e = effect(imp, "freeze-layers-match-other-stacks")
    assert "model.visual.blocks.1" in e.message
    plan = plan_spec(imp.spec)
    trained = set(plan.trainable_lrs())
    assert any(n.startswith("model.visual.blocks.1.") for n in trained)
    assert any(n.startswith("model.language_model.layers.1.") for n in trained)
    assert not any(".0." in n for n in trained)
    # the default keeps the ViT out: no effect, only the LLM's last layer
    imp = lf(head(tiny, "finetuning_type: freeze\nfreeze_trainable_layers: 1\n"))
    assert "freeze-layers-match-other-stacks" not in codes(imp)
    assert all(n.startswith("model.language_model.layers.1.") for n in plan_spec(imp.spec).trainable_lrs())


def test_weight_decay_rule_and_missing_precision_and_do_train():
    imp = lf("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nfinetuning_type: full\n"
             "freeze_vision_tower: false\nfreeze_language_model: true\nweight_decay: 0.1\n")
    assert {"weight-decay-rule", "no-mixed-precision", "not-training"} <= set(codes(imp))
    assert "norm1" in effect(imp, "weight-decay-rule").message
    assert imp.spec["training"]["precision"] == "bf16"


# -- problems: located, never a traceback -----------------------------------------------------

@pytest.mark.parametrize("text,where,words", [
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nfreeze_vison_tower: false\n", "train.yaml:2:1",
     "did you mean 'freeze_vision_tower'"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\ntrain_mm_proj_only: true\n", "train.yaml:2:1",
     "freeze_multi_modal_projector: false"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nquantization_bit: 3\n", "train.yaml:2:19", "bitsandbytes quantizes to 4 bit"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nlearning_rate: fast\n", "train.yaml:2:16", "a number"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nlora_target: mlp\n", "train.yaml:2:14",
     "LoRA cannot wrap Qwen2MLP"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nfinetuning_type: full\nuse_dora: true\n", "train.yaml:3:11",
     "only valid for LoRA"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nfinetuning_type: oft\n", "train.yaml:2:18", "OFT"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nlr_scheduler_type: cosine_with_min_lr\n", "train.yaml:2:20",
     "cannot be expressed"),
    ("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nfinetuning_type: freeze\nfreeze_trainable_modules: mlpp\n",
     "train.yaml:3:27", "'mlpp' is not found"),
    ("model_name_or_path: no/such-model\n", "train.yaml:1:21", "not found"),
    ("model_name_or_path: [a\n", "train.yaml:2:1", "YAML syntax error"),
    ("- a\n- b\n", "train.yaml:1:1", "expected a YAML mapping"),
    ("", "train.yaml:1:1", "empty"),
    ("stage: sft\n", "train.yaml:1:1", "needs model_name_or_path"),
])
def test_problems_are_located(text, where, words):
    imp = lf(text)
    assert not imp.ok
    errors = [p for p in imp.problems if p.severity == "error"]
    assert any(str(p.location) == where and words in p.render() for p in errors), [p.render() for p in errors]


def test_unmodelled_keys_are_listed_never_dropped():
    imp = lf(head(QWEN_VL, "finetuning_type: lora\n") + "plot_loss: true\ntemplate: qwen2_vl\nadam_beta2: 0.95\n"
             "dataset_dir: data\nmax_samples: 1000\n")
    keys = {u.key for u in imp.unmodelled}
    assert {"plot_loss", "template", "max_samples"} <= keys
    # every key is either read into the spec or listed
    data = yaml.safe_load(head(QWEN_VL, "finetuning_type: lora\n"))
    assert not set(data) & {"plot_loss"}
    # AdamW's betas are spec keys: read, with their origin, never listed
    assert "adam_beta2" not in keys and imp.spec["training"]["adam_beta2"] == 0.95
    assert str(imp.origins["training.adam_beta2"]).endswith(":1")


def test_import_is_deterministic():
    text = head(QWEN_VL, "finetuning_type: lora\nlora_target: q_proj,v_proj\nadditional_target: merger\n")
    a, b = lf(text), lf(text)
    assert a.spec == b.spec and a.origins == b.origins and codes(a) == codes(b)


# -- round trip through mixspec's llamafactory target --------------------------------------------

def _essence(plan) -> tuple:
    """What must survive the round trip: each trained component's mode, LR, weight decay,
    parameters and LoRA setup (not its name), the totals and the training settings."""
    comps = set()
    for c in plan.components:
        if not c.trainable_params:
            continue
        lora = None
        if c.lora:
            lora = (c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora, c.lora.dora, c.lora.targets)
        comps.add((c.mode, c.lr, c.weight_decay, c.params if c.mode == "full" else (), lora, c.trainable_params))
    t = plan.training
    training = (t.epochs, t.max_steps, t.micro_batch_size, t.gradient_accumulation, t.precision,
                t.gradient_checkpointing, t.max_length, t.warmup_ratio, t.lr_scheduler, t.max_grad_norm, t.seed)
    d = plan.distributed
    return (frozenset(comps), plan.totals, training, (d.zero_stage, d.offload), plan.output_dir or "output",
            plan.data.train if plan.data else None, plan.optimizer_fingerprint())


def _round_trip(plan, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("out")
    out.mkdir(exist_ok=True)
    files = render(plan, "llamafactory", out_dir=str(out))
    for name, body in files.items():
        (out / name).write_text(body)
    imp = read("llamafactory", files["train.yaml"], "out/train.yaml")
    assert imp.ok, [p.render() for p in imp.problems]
    again = plan_spec(imp.spec)
    assert _essence(again) == _essence(plan)
    return imp


def _expressible_specs() -> list[Path]:
    return sorted((ROOT / "examples").glob("*.yaml")) + sorted(OWN_SPECS.glob("*.yaml"))


@pytest.mark.parametrize("spec_path", _expressible_specs(), ids=lambda p: p.stem)
def test_round_trip_examples_and_golden_specs(spec_path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = resolve_plan(load_spec(spec_path.relative_to(ROOT)))
    try:
        render(plan, "llamafactory")
    except UnsupportedError:
        pytest.skip("the llamafactory target refuses this spec (nothing to round-trip)")
    _round_trip(plan, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", sorted(EXACT))
def test_round_trip_golden_cases(case, tmp_path, monkeypatch):
    plan = resolve_plan(load_spec_text(EXACT[case][0], "spec.yaml"))
    imp = _round_trip(plan, tmp_path, monkeypatch)
    # what the target writes runs as planned: no surprise beyond the flag that lets LoRA reach the ViT
    assert {e.code for e in imp.effects} <= {"flag-means-lora"}


def test_round_trip_of_an_approximation_keeps_the_copy(tmp_path, monkeypatch):
    """--approximate writes a full part beside LoRA as additional_target: re-importing gives
    that part back as a full component (at the one LR), with the copy named as an effect."""
    text = ("version: 1\nmodel: Qwen/Qwen2.5-VL-7B-Instruct\ncomponents:\n"
            "  aligner: {train: full, lr: 1.0e-4}\n  language: {train: lora, lr: 1.0e-4}\n"
            "data: {train: data/train.jsonl}\n")
    plan = resolve_plan(load_spec_text(text, "spec.yaml"))
    monkeypatch.chdir(tmp_path)
    files = render(plan, "llamafactory", approximate=True, out_dir="out")
    imp = read("llamafactory", files["train.yaml"], "out/train.yaml")
    assert imp.ok and "additional-target-copy" in codes(imp)
    again = plan_spec(imp.spec)
    assert set(again.trainable_lrs()) == set(plan.trainable_lrs())
    assert again.totals.trainable_params == plan.totals.trainable_params


# -- opt-in: the real LLaMA-Factory 0.9.5 reads the user's config ------------------------------

_PROBE = textwrap.dedent("""
    import json, os, sys
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from omegaconf import OmegaConf
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer, load_model
    cfg = OmegaConf.to_container(OmegaConf.load(sys.argv[1]))
    cfg.update(output_dir=sys.argv[2], use_cpu=True, bf16=False, fp16=False)
    model_args, _, training_args, finetuning_args, _ = get_train_args(cfg)
    model = load_model(load_tokenizer(model_args)["tokenizer"], model_args, finetuning_args, is_trainable=True)
    def plain(n):
        n = n[len("base_model.model."):] if n.startswith("base_model.model.") else n
        return n.replace(".modules_to_save.default.", ".")
    print(json.dumps({"trainable": sorted(plain(n) for n, p in model.named_parameters() if p.requires_grad),
                      "lr": training_args.learning_rate}))
""")

REAL_CASES = [
    ("qwen", "finetuning_type: lora\nlora_rank: 4\nfreeze_multi_modal_projector: false\n"),
    ("qwen", "finetuning_type: lora\nlora_rank: 4\nlora_target: q_proj,qkv,nothing_here\n"
             "freeze_vision_tower: false\nadditional_target: merger\n"),
    ("qwen", "finetuning_type: lora\nlora_rank: 4\nlora_target: proj\nfreeze_vision_tower: false\n"),
    ("qwen", "finetuning_type: full\nfreeze_vision_tower: false\nfreeze_language_model: true\n"),
    ("qwen", "finetuning_type: freeze\nfreeze_trainable_layers: 1\nfreeze_vision_tower: false\n"),
    ("qwen", "finetuning_type: freeze\nfreeze_trainable_layers: -1\nfreeze_trainable_modules: mlp\n"
             "freeze_extra_modules: norm\nfreeze_multi_modal_projector: false\n"),
    ("llava", "finetuning_type: lora\nlora_rank: 4\nlora_target: all\nadditional_target: multi_modal_projector\n"),
    ("llava", "finetuning_type: full\nfreeze_vision_tower: false\n"),
]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LLAMAFACTORY_PYTHON"),
                    reason="set LLAMAFACTORY_PYTHON to a python with llamafactory==0.9.5 installed")
def test_real_llamafactory_trains_what_the_import_says(tmp_path, monkeypatch):
    """LLaMA-Factory's own get_train_args + load_model on the user's config: its trainable
    names (modules_to_save copies under the original names) equal the imported spec's Plan."""
    import importlib.util

    builder = ROOT / "tests" / "fixtures" / "make_tiny_vlm.py"
    module_spec = importlib.util.spec_from_file_location("make_tiny_vlm", builder)
    make = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(make)
    monkeypatch.chdir(tmp_path)
    models = {"qwen": make.make_tiny_qwen25vl(tmp_path / "qwen"), "llava": make.make_tiny_llava(tmp_path / "llava")}
    (tmp_path / "probe.py").write_text(_PROBE)
    template = {"qwen": "qwen2_vl", "llava": "llava"}
    failures = []
    for i, (model, method) in enumerate(REAL_CASES):
        text = (f"model_name_or_path: {models[model]}\nstage: sft\ndo_train: true\n{method}"
                f"dataset: identity\ndataset_dir: {tmp_path}\ntemplate: {template[model]}\n"
                "learning_rate: 3.0e-5\nbf16: true\n")
        (tmp_path / "dataset_info.json").write_text(json.dumps({"identity": {"file_name": "x.json"}}))
        path = tmp_path / f"case{i}.yaml"
        path.write_text(text)
        imp = read("llamafactory", text, str(path))
        assert imp.ok, [p.render() for p in imp.problems]
        plan = plan_spec(imp.spec)
        run = subprocess.run([os.environ["LLAMAFACTORY_PYTHON"], "probe.py", str(path), str(tmp_path / f"run{i}")],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        if got["trainable"] != sorted(plan.trainable_lrs()) or {got["lr"]} != set(plan.trainable_lrs().values()):
            failures.append((method, sorted(set(got["trainable"]) ^ set(plan.trainable_lrs()))[:10]))
    assert not failures, failures


@pytest.mark.parametrize("text", [
    "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nlogging_steps: .inf\nsave_steps: .nan\n",
    "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nlora_target: {a: 1}\ndeepspeed: [1]\ndataset: {x: 1}\n",
    "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nlearning_rate: -1\nlora_rank: 0\n",
    "model_name_or_path: 7\nfinetuning_type: [lora]\n",
    "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\ndeepspeed: /no/such/ds.json\n",
    "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nadditional_target: ''\nlora_target: ','\n",
])
def test_odd_values_give_problems_or_a_spec_never_a_traceback(text):
    imp = lf(text)
    for p in imp.problems:
        assert p.location.file == "train.yaml" and p.message
    if imp.ok:
        plan_spec(imp.spec)


def test_a_bad_value_is_located_at_the_users_key():
    imp = lf(head(QWEN_VL, "finetuning_type: lora\nlora_rank: 0\n"))
    # (lora_alpha defaults to lora_rank * 2, so it is 0 too)
    assert ("train.yaml:5:1", "components.language.lora.rank") in [(str(p.location), p.path) for p in imp.problems]


# -- the real published configs (the catalog's copies of shared/models) ----------------------------

@pytest.mark.parametrize("model,method,trainable,total", [
    # LLaVA-1.5-7B projector: Linear 1024->4096 and 4096->4096 with biases; total published exactly
    ("llava-hf/llava-1.5-7b-hf", "finetuning_type: full\nfreeze_multi_modal_projector: false\n"
     "freeze_language_model: true\n", 1024 * 4096 + 4096 + 4096 * 4096 + 4096, 7_063_427_072),
    # Qwen2.5-VL-7B: the whole ViT with its merger, published as 676.6M of 8.29B
    (QWEN_VL, "finetuning_type: full\nfreeze_vision_tower: false\nfreeze_multi_modal_projector: false\n"
     "freeze_language_model: true\n", 676_550_144, 8_292_166_656),
])
def test_counts_on_published_configs(model, method, trainable, total):
    imp = lf(head(model, method))
    plan = plan_spec(imp.spec)
    assert (plan.totals.trainable_params, plan.totals.base_params) == (trainable, total)


def test_tied_qwen2vl_language_part_trains_the_shared_embedding_once():
    # Qwen2-VL-2B ties lm_head to embed_tokens: LLaMA-Factory's language keys hold both names
    imp = lf(head("Qwen/Qwen2-VL-2B-Instruct", "finetuning_type: full\n"))
    assert imp.ok
    plan = plan_spec(imp.spec)
    vision = sum(c.base_params for c in plan.components if c.mode == "freeze") + plan.unassigned_base_params
    assert plan.totals.trainable_params + vision == plan.totals.base_params == 2_208_985_600
    assert {"embeddings", "lm_head", "language"} <= set(imp.spec["components"])


def test_cli_imports_writes_the_spec_and_refuses_with_locations(run_cli, tmp_path):
    good = tmp_path / "train.yaml"
    good.write_text(head(QWEN_VL, "finetuning_type: lora\nfreeze_multi_modal_projector: false\n"))
    out = tmp_path / "spec.yaml"
    ok = run_cli("import", "--from", "llamafactory", str(good), "-o", str(out))
    assert ok.exit_code == 0, ok.stderr
    assert "projector-not-trained-under-lora" in ok.stdout
    assert plan_spec(str(out)).fingerprint() == plan_spec(lf(good.read_text(), str(good)).spec).fingerprint()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nfreeze_vison_tower: false\n")
    refused = run_cli("import", "--from", "llamafactory", str(bad), "-o", str(tmp_path / "no.yaml"))
    assert refused.exit_code == 1 and "Traceback" not in refused.stderr
    assert f"{bad}:2:1: error: freeze_vison_tower:" in refused.stderr
    assert not (tmp_path / "no.yaml").exists()


# -- new tokens: patch_tokenizer sets resize_vocab, _setup_lora_tuning adds the embeddings ------------
LLAMA = "meta-llama/Llama-3.1-8B"
LLAMA_EMBED = 128_256 * 4_096  # vocab_size x hidden_size of the published config


def test_new_special_tokens_under_lora_train_both_embeddings_as_copies():
    """LLaMA-Factory #6285's shape: add_special_tokens under LoRA on Llama-3-8B trains
    embed_tokens and lm_head (additional_target) beside the adapters: 1.05 B more."""
    imp = lf(head(LLAMA, "finetuning_type: lora\nlora_target: all\nadd_special_tokens: <think>,</think>\n"))
    assert imp.ok, [p.render() for p in imp.problems]
    plan = plan_spec(imp.spec)
    full = {c.name: c.trainable_params for c in plan.components if c.mode == "full"}
    assert sum(full.values()) == 2 * LLAMA_EMBED == 1_050_673_152
    assert set(plan.trainable_lrs()) >= {"model.embed_tokens.weight", "lm_head.weight"}
    e = effect(imp, "resize-vocab")
    assert str(e.where) == "train.yaml:6:1" and "trains embed_tokens and lm_head in full as additional_target" \
        in e.message
    assert "1,050,673,152 parameters held twice" in effect(imp, "additional-target-copy").message
    assert "add_special_tokens" not in {u.key for u in imp.unmodelled}


@pytest.mark.parametrize("method,says", [
    ("finetuning_type: freeze\nadd_tokens: foo\n", "freeze tuning does not train model.embed_tokens or lm_head"),
    ("finetuning_type: full\nresize_vocab: true\n", "full training trains them with the rest"),
    ("finetuning_type: lora\nadd_special_tokens: <a>\nadditional_target: embed_tokens\n",
     "additional_target is given, so LLaMA-Factory does not add the embeddings"),
])
def test_new_tokens_under_each_finetuning_type(method, says):
    imp = lf(head(LLAMA, method))
    assert imp.ok and says in effect(imp, "resize-vocab").message
    plan = plan_spec(imp.spec)
    if "additional_target" in method:  # only the user's target is copied
        assert "lm_head.weight" not in plan.trainable_lrs() and "model.embed_tokens.weight" in plan.trainable_lrs()


def test_new_tokens_on_a_tied_model_are_refused_at_the_key():
    imp = lf(head("Qwen/Qwen2.5-VL-3B-Instruct", "finetuning_type: lora\nadd_special_tokens: <a>\n"))
    assert not imp.ok and imp.problems[0].render().startswith("train.yaml:5:21: error: add_special_tokens: ")
    assert "tied" in imp.problems[0].message


# -- freeze_extra_modules: a substring of parameter names ------------------------------------------
def test_freeze_extra_modules_proj_also_trains_every_proj_of_the_llm(tmp_path):
    """'proj' (Idefics3's connector.modality_projection.proj, meant: the projector) also trains
    every *_proj of the LLM; counted here by LLaMA-Factory's own test over the real model's
    named_parameters (adapter.py: any(module in name))."""
    import torch
    import transformers

    config = transformers.Idefics3Config()
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    imp = lf(f"model_name_or_path: {tmp_path}\nstage: sft\ndo_train: true\nfinetuning_type: freeze\n"
             "freeze_trainable_layers: 0\nfreeze_extra_modules: proj\ndataset: demo\nbf16: true\n")
    assert imp.ok, [p.render() for p in imp.problems]
    with torch.device("meta"):
        model = transformers.Idefics3ForConditionalGeneration(config)
    # idefics3 is not in LLaMA-Factory 0.9.5's composite-model registry (visual.py): no part is
    # forbidden, the vision tower's *_proj train too
    want = {n: p.numel() for n, p in model.named_parameters() if "proj" in n}
    plan = plan_spec(imp.spec)
    assert plan.totals.trainable_params == sum(want.values()) > 6_000_000_000
    e = effect(imp, "freeze-extra-substring")
    exact = sum(v for n, v in want.items() if ".proj." in n)
    assert str(e.where) == "train.yaml:6:1"
    assert f"also trains {sum(want.values()) - exact:,} parameters" in e.message and "q_proj" in e.message


# -- command lines: `llamafactory-cli train --key value ...` (the web UI's preview) -------------------
PREVIEW = """\
```bash
llamafactory-cli train \\
    --stage sft \\
    --do_train True \\
    --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \\
    --finetuning_type full \\
    --freeze_vision_tower False \\
    --freeze_multi_modal_projector False \\
    --learning_rate 5e-06 \\
    --dataset mllm_demo \\
    --bf16 True \\
    --plot_loss
```
"""


def test_a_command_line_is_read_as_the_yaml_it_stands_for():
    """The preview's --key value pairs give the same import as the YAML file with those keys."""
    got = lf(PREVIEW, "cmd.sh")
    assert got.ok, [p.render() for p in got.problems]
    yaml_text = "".join(f"{k}: {v}\n" for k, v in (
        ("stage", "sft"), ("do_train", "true"), ("model_name_or_path", QWEN_VL), ("finetuning_type", "full"),
        ("freeze_vision_tower", "false"), ("freeze_multi_modal_projector", "false"), ("learning_rate", "5.0e-6"),
        ("dataset", "mllm_demo"), ("bf16", "true"), ("plot_loss", "true")))
    want = lf(yaml_text)
    assert got.spec == want.spec
    assert plan_spec(got.spec).trainable_lrs() == plan_spec(want.spec).trainable_lrs()
    assert str(got.origins["model"]) == "cmd.sh:5:5"
    assert [u.key for u in got.unmodelled] == ["plot_loss"]


@pytest.mark.parametrize("extra,message", [
    ("--lora_rannk 4", "cmd.sh:12:17: error: lora_rannk: LLaMA-Factory 0.9.5 does not know this key"),
    ("--lora_target q_proj v_proj", "cmd.sh:12:38: error: lora_target: 'v_proj': one value per --key"),
    ("--output_dir $OUT", "cmd.sh:12:30: error: output_dir: '$OUT' depends on $OUT"),
])
def test_command_line_problems_are_located(extra, message):
    got = lf(PREVIEW.replace("--plot_loss", "--plot_loss " + extra), "cmd.sh")
    assert not got.ok and got.problems[0].render().startswith(message), got.problems[0].render()


def test_a_command_line_with_a_yaml_file_and_overrides(tmp_path, monkeypatch):
    """hparams/parser.py read_args: the file, then OmegaConf.from_cli key=value overrides."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora.yaml").write_text(head(LLAMA, "finetuning_type: lora\nlora_target: all\n"))
    got = lf("FORCE_TORCHRUN=1 llamafactory-cli train lora.yaml lora_rank=16 learning_rate=2e-5\n", "run.sh")
    assert got.ok, [p.render() for p in got.problems]
    lora = plan_spec(got.spec).component("language")
    assert (lora.lora.rank, lora.lr) == (16, 2e-5)
    assert str(got.origins["model"]) == "lora.yaml:1:1"
    missing = lf("llamafactory-cli train nowhere.yaml\n", "run.sh")
    assert missing.problems[0].render().startswith(
        "run.sh:1:24: error: this command trains from the file nowhere.yaml, which is not here")


# -- use_llama_pro: every stride-th block of an expanded checkpoint ------------------------------------
def _llama_pro_blocks(num_layers: int, k: int) -> list[int]:
    """LLaMA Pro's own layout (scripts/llama_pro.py): after every num_layers/k original blocks
    a copy is inserted; these are the copies' indices in the expanded model."""
    split = (num_layers - k) // k  # original blocks per group in the expanded model of num_layers blocks
    return [(split + 1) * g + split for g in range(k)]


@pytest.mark.parametrize("method,mode", [
    ("finetuning_type: freeze\nuse_llama_pro: true\nfreeze_trainable_layers: 8\n", "full"),
    ("finetuning_type: lora\nuse_llama_pro: true\nfreeze_trainable_layers: 8\nlora_target: all\n", "lora"),
])
def test_use_llama_pro_trains_the_expanded_blocks(method, mode):
    """Llama-3.1-8B's 32 blocks read as a 24-block model expanded by 8 (num_expand 8): the
    blocks trained are the 8 llama_pro.py inserted."""
    imp = lf(head(LLAMA, method))
    assert imp.ok, [p.render() for p in imp.problems]
    plan = plan_spec(imp.spec)
    blocks = sorted({int(n.split(".")[2]) for n in plan.trainable_lrs()})
    assert blocks == _llama_pro_blocks(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert {c.mode for c in plan.components if c.trainable_params} == {mode}
    assert "blocks 3, 7, 11, 15, 19, 23, 27, 31 of 32" in effect(imp, "llama-pro-blocks").message
    assert "flag-no-effect" not in codes(imp)


@pytest.mark.parametrize("method,message", [
    ("finetuning_type: freeze\nuse_llama_pro: true\nfreeze_trainable_layers: 5\n",
     "train.yaml:6:26: error: freeze_trainable_layers: LLaMA-Factory raises: `num_layers` 32 should be divisible"),
    ("finetuning_type: full\nuse_llama_pro: true\n",
     "train.yaml:5:16: error: use_llama_pro: LLaMA-Factory raises: `use_llama_pro` is only valid for Freeze or LoRA"),
])
def test_use_llama_pro_refusals_are_llamafactorys(method, message):
    imp = lf(head(LLAMA, method))
    assert not imp.ok and imp.problems[0].render().startswith(message)


@pytest.mark.parametrize("key,value,message,hint", [
    ("new_special_tokens", "<think>", "new_special_tokens was renamed add_special_tokens in LLaMA-Factory 0.9.3",
     "write add_special_tokens: with the same tokens"),
    ("new_normal_tokens", "foo", "new_normal_tokens was renamed add_tokens", "write add_tokens:"),
    ("image_resolution", "512", "image_resolution was replaced by image_max_pixels", "(512 -> 262144)"),
    ("image_dir", "data", "image_dir was renamed media_dir", "write media_dir:"),
])
def test_renamed_keys_name_their_successor(key, value, message, hint):
    imp = lf(head(LLAMA, f"finetuning_type: lora\n{key}: {value}\n"))
    text = imp.problems[0].render()
    assert not imp.ok and text.startswith(f"train.yaml:5:1: error: {key}: {message}") and hint in text


def test_a_yaml_that_mentions_the_command_is_still_a_yaml():
    imp = lf(head(LLAMA, "finetuning_type: lora\nrun_name: llamafactory-cli train\n"))
    assert imp.ok and imp.spec["model"] == LLAMA


def test_every_dataset_and_the_image_pixel_limits_are_imported(tmp_path):
    """dataset: a,b (mixed by LLaMA-Factory) becomes data.train [a, b]; image_max_pixels and
    image_min_pixels become data.max_pixels and data.min_pixels."""
    (tmp_path / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.jsonl"}}))
    got = lf(f"""\
        model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct
        stage: sft
        do_train: true
        finetuning_type: lora
        lora_target: all
        dataset: a,b
        dataset_dir: {tmp_path}
        image_max_pixels: 200704
        image_min_pixels: 3136
        learning_rate: 1.0e-4
        """)
    assert got.ok, [p.render() for p in got.problems]
    assert got.spec["data"]["train"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert (got.spec["data"]["max_pixels"], got.spec["data"]["min_pixels"]) == (200704, 3136)
