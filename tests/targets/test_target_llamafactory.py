"""The LLaMA-Factory target: exact YAML where LLaMA-Factory 0.9.5 can express the Plan, the
exact refusal items where it cannot, golden files, determinism.

LLaMA-Factory itself is not installed here (about 6.6 GB and its own torch build). What
pins the re-implemented rules to the real thing are the counts measured with a real
LLaMA-Factory 0.9.5 install on a tiny Qwen2.5-VL (shared/research/llamafactory-axolotl-cpu.md):
``test_counts_measured_with_llamafactory`` builds the same tiny model and checks that the
flags this target emits give exactly those counts. The opt-in slow test at the end runs a
real install when LLAMAFACTORY_PYTHON points at one.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from mixspec.errors import UnsupportedError
from mixspec.language.loader import load_spec, load_spec_text
from mixspec.api import plan_spec as plan_dict
from mixspec.importers import read
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, available_targets, render
from mixspec.targets._common import _yaml_str
from mixspec.targets.llamafactory import COMPOSITE_MODELS, TARGET, _full_trainable, _lora_modules

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "targets" / "llamafactory"
OWN_SPECS = ROOT / "tests" / "targets" / "specs" / "llamafactory"
UPDATE = os.environ.get("MIXSPEC_UPDATE_GOLDEN") == "1"

QWEN_VL = "Qwen/Qwen2.5-VL-7B-Instruct"
QWEN3_VL = "Qwen/Qwen3-VL-8B-Instruct"
QWEN_TEXT = "Qwen/Qwen2.5-7B-Instruct"
LLAVA = "llava-hf/llava-1.5-7b-hf"
GEMMA3 = "google/gemma-3-4b-it"
DATA = "data: {train: data/train.jsonl}\n"


def spec(model: str, *components: str, tail: str = DATA) -> str:
    """Spec text whose i-th component sits at spec.yaml line 4 + i, column 3."""
    return f"version: 1\nmodel: {model}\ncomponents:\n" + "".join(f"  {c}\n" for c in components) + tail


@functools.lru_cache(maxsize=None)
def plan_of(text: str):
    return plan_spec(load_spec_text(text, "spec.yaml"))


def compile_yaml(text: str, **options) -> tuple[dict, dict[str, str]]:
    files = render(plan_of(text), "llamafactory", TargetOptions(**options))
    return yaml.safe_load(files["train.yaml"]), files


def refusal(text: str, **options) -> list[tuple[str, str, str]]:
    with pytest.raises(UnsupportedError) as info:
        render(plan_of(text), "llamafactory", TargetOptions(**options))
    assert info.value.target == "llamafactory"
    return [(i.code, str(i.origin), i.what) for i in info.value.items]


def lf_split(value: str) -> list[str]:
    """FinetuningArguments.__post_init__'s split_arg (LLaMA-Factory 0.9.5)."""
    return [item.strip() for item in value.split(",")]


def flags(cfg: dict) -> tuple:
    return (cfg.get("freeze_vision_tower"), cfg.get("freeze_multi_modal_projector"),
            cfg.get("freeze_language_model"))


# -- exact cases: the YAML, parsed ----------------------------------------------------------

EXACT = {
    # ViT + merger at one lr: everything but LLaMA-Factory's language keys
    "qwen-vision-and-aligner": (
        spec(QWEN_VL, "vision: {train: full, lr: 1.0e-5}", "aligner: {train: full, lr: 1.0e-5}",
             "language: {train: freeze}"),
        {"finetuning_type": "full", "flags": (False, False, True), "learning_rate": 1.0e-5}),
    "qwen-aligner-only": (
        spec(QWEN_VL, "aligner: {train: full, lr: 1.0e-5}"),
        {"finetuning_type": "full", "flags": (True, False, True), "learning_rate": 1.0e-5}),
    # mixspec's vision role (model.visual minus the merger) equals LLaMA-Factory's vision keys
    "qwen-vision-only": (
        spec(QWEN_VL, "vision: {train: full, lr: 2.0e-6}"),
        {"finetuning_type": "full", "flags": (False, True, True), "learning_rate": 2.0e-6}),
    # LLaMA-Factory's language part holds the embeddings and lm_head too
    "qwen-whole-llm": (
        spec(QWEN_VL, "language: {train: full, lr: 1.0e-5}", "embeddings: {train: full, lr: 1.0e-5}",
             "lm_head: {train: full, lr: 1.0e-5}"),
        {"finetuning_type": "full", "flags": (True, True, False), "learning_rate": 1.0e-5}),
    # a pattern component that coincides with LLaMA-Factory's projector keys
    "qwen-merger-by-pattern": (
        spec(QWEN_VL, "merger: {modules: ['model\\.visual\\.merger'], train: full, lr: 1.0e-5}"),
        {"finetuning_type": "full", "flags": (True, False, True), "learning_rate": 1.0e-5}),
    "llava-projector-only": (
        spec(LLAVA, "vision: {train: freeze}", "aligner: {train: full, lr: 1.0e-3}", "language: {train: freeze}"),
        {"finetuning_type": "full", "flags": (True, False, True), "learning_rate": 1.0e-3}),
    # not in LLaMA-Factory's composite registry: full trains everything, no freeze_* keys
    "text-everything": (
        spec(QWEN_TEXT, "language: {train: full, lr: 1.0e-5}", "embeddings: {train: full, lr: 1.0e-5}",
             "lm_head: {train: full, lr: 1.0e-5}"),
        {"finetuning_type": "full", "flags": (None, None, None), "learning_rate": 1.0e-5}),
    "qwen-language-lora": (
        spec(QWEN_VL, "language: {train: lora, lr: 1.0e-4, lora: {rank: 16, alpha: 32, dropout: 0.05}}"),
        {"finetuning_type": "lora", "flags": (True, True, False), "learning_rate": 1.0e-4,
         "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "use_rslora": False, "use_dora": False}),
    # LoRA on the ViT needs freeze_vision_tower: false (in LoRA mode that is what it means)
    "qwen-vision-lora-dora": (
        spec(QWEN_VL, "vision: {train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 8, rslora: true, dora: true}}"),
        {"finetuning_type": "lora", "flags": (False, True, False), "lora_rank": 4, "lora_alpha": 8,
         "use_rslora": True, "use_dora": True}),
    "qwen-aligner-lora": (
        spec(QWEN_VL, "aligner: {train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 6.5}}"),
        {"finetuning_type": "lora", "flags": (True, False, False), "lora_alpha": 6.5}),
    # two LoRA components with the same settings and lr: one lora_target list
    "qwen-two-lora-components": (
        spec(QWEN_VL, "vision: {train: lora, lr: 1.0e-4, lora: {rank: 8}}",
             "language: {train: lora, lr: 1.0e-4, lora: {rank: 8}}"),
        {"finetuning_type": "lora", "flags": (False, True, False), "lora_rank": 8, "lora_alpha": 16}),
    "llava-qv-one-layer": (
        spec(LLAVA, "language: {train: lora, lr: 1.0e-4, lora: {targets: [q_proj, v_proj], layers: '1'}}"),
        {"finetuning_type": "lora", "flags": (True, True, False)}),
    "text-lora-with-embedding": (
        spec(QWEN_TEXT, "language: {train: lora, lr: 1.0e-4}",
             "embeddings: {train: lora, lr: 1.0e-4, lora: {targets: [embed_tokens]}}"),
        {"finetuning_type": "lora", "flags": (None, None, None)}),
    "gemma3-language-lora": (
        spec(GEMMA3, "language: {train: lora, lr: 2.0e-4, lora: {rank: 16, alpha: 32}}"),
        {"finetuning_type": "lora", "flags": (True, True, False), "learning_rate": 2.0e-4}),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_exact(case):
    text, expect = EXACT[case]
    plan = plan_of(text)
    assert TARGET().unsupported(plan, TargetOptions()) == []
    cfg, files = compile_yaml(text)
    assert cfg["stage"] == "sft" and cfg["do_train"] is True
    for key, value in expect.items():
        got = flags(cfg) if key == "flags" else cfg[key]
        assert got == value, key
        assert type(got) is type(value), key
    lora_components = [c for c in plan.components if c.lora]
    if cfg["finetuning_type"] == "lora":
        wanted = sorted({t for c in lora_components for t in c.lora.targets})
        assert sorted(lf_split(cfg["lora_target"])) == wanted
        assert "additional_target" not in cfg
    else:
        assert not lora_components and "lora_target" not in cfg
    assert set(files) == {"train.yaml", "dataset_info.json"}
    assert cfg["learning_rate"] in {c.lr for c in plan.components if c.mode != "freeze"}


def test_lora_target_is_exact_under_llamafactory_rules():
    """Feed the emitted lora_target and flags through the re-implemented rules: the modules
    that get LoRA are exactly the Plan's targets, no more (substring tests) and no fewer."""
    text = EXACT["qwen-two-lora-components"][0]
    plan = plan_of(text)
    cfg, _ = compile_yaml(text)
    names = sorted({p for c in plan.components for p in c.params} | set(plan.unassigned_params))
    modules = sorted({m for n in names for m in _prefixes(n)})
    got = _lora_modules(modules, lf_split(cfg["lora_target"]), COMPOSITE_MODELS["qwen2_5_vl"], flags(cfg))
    assert got == {t for c in plan.components if c.lora for t in c.lora.targets}
    # with LLaMA-Factory's defaults the ViT targets would be dropped: the flag matters
    dropped = _lora_modules(modules, lf_split(cfg["lora_target"]), COMPOSITE_MODELS["qwen2_5_vl"],
                            (True, True, False))
    assert not any(m.startswith("model.visual.") for m in dropped)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_full_flags_reproduce_the_plan_under_llamafactory_rules():
    text = EXACT["qwen-vision-and-aligner"][0]
    plan = plan_of(text)
    cfg, _ = compile_yaml(text)
    names = {p for c in plan.components for p in c.params} | set(plan.unassigned_params)
    trained = _full_trainable(names, COMPOSITE_MODELS["qwen2_5_vl"], flags(cfg))
    assert trained == set(plan.trainable_lrs())


# -- refusals: the exact items ----------------------------------------------------------------

REFUSED = {
    "per-component-lr": (
        spec(QWEN_VL, "vision: {train: full, lr: 2.0e-6}", "aligner: {train: full, lr: 1.0e-5}"),
        [("per-component-lr", "spec.yaml:4:3", "component 'vision' at learning rate 2e-06"),
         ("per-component-lr", "spec.yaml:5:3", "component 'aligner' at learning rate 1e-05")]),
    "per-component-weight-decay": (
        spec(QWEN_VL, "vision: {train: full, lr: 1.0e-5, weight_decay: 0.1}", "aligner: {train: full, lr: 1.0e-5}"),
        [("per-component-weight-decay", "spec.yaml:4:3", "component 'vision' at weight decay 0.1"),
         ("per-component-weight-decay", "spec.yaml:5:3", "component 'aligner' at weight decay 0"),
         # the ViT's RMSNorm weights: transformers' rule decays them, the Plan does not
         ("weight-decay-rule", "spec.yaml:4:3", "weight decay of component 'vision' on "
          "model.visual.blocks.0.norm1.weight, model.visual.blocks.0.norm2.weight, "
          "model.visual.blocks.1.norm1.weight and 61 more")]),
    # the motivating case: one lr per part, and full parts beside LoRA
    "mixed-full-and-lora": (
        spec(QWEN_VL, "vision: {train: full, lr: 2.0e-6}", "aligner: {train: full, lr: 1.0e-5}",
             "language: {train: lora, lr: 1.0e-4}"),
        [("per-component-lr", "spec.yaml:4:3", "component 'vision' at learning rate 2e-06"),
         ("per-component-lr", "spec.yaml:5:3", "component 'aligner' at learning rate 1e-05"),
         ("per-component-lr", "spec.yaml:6:3", "component 'language' at learning rate 0.0001"),
         ("full-with-lora", "spec.yaml:4:3", "component 'vision' trained fully beside LoRA"),
         ("full-with-lora", "spec.yaml:5:3", "component 'aligner' trained fully beside LoRA")]),
    # same lr, still refused: a full part beside LoRA would be a modules_to_save copy
    "full-beside-lora-same-lr": (
        spec(QWEN_TEXT, "language: {train: lora, lr: 1.0e-4}", "lm_head: {train: full, lr: 1.0e-4}"),
        [("full-with-lora", "spec.yaml:5:3", "component 'lm_head' trained fully beside LoRA")]),
    # LLaMA-Factory's language keys also hold embed_tokens and lm_head, and freeze tuning takes
    # the first or last layers only: a middle run of LLM layers is neither
    "llm-middle-layers": (
        spec(QWEN_VL, "mid: {modules: ['model\\.language_model\\.layers\\.(1[0-9])'], train: full, lr: 1.0e-5}"),
        [("full-part-mismatch", "spec.yaml:4:3", "component 'mid' (full) as part of LLaMA-Factory's language model")]),
    # a pattern component that is only part of LLaMA-Factory's vision keys
    "late-vit-blocks": (
        spec(QWEN_VL, "late: {modules: ['model\\.visual\\.blocks\\.(2[4-9]|3[01])'], train: full, lr: 1.0e-5}"),
        [("full-part-mismatch", "spec.yaml:4:3", "component 'late' (full) as part of LLaMA-Factory's vision tower")]),
    "vision-with-a-frozen-block": (
        spec(QWEN_VL, "vision: {train: full, lr: 1.0e-5}",
             "block0: {modules: ['model\\.visual\\.blocks\\.0'], train: freeze}"),
        [("full-part-mismatch", "spec.yaml:4:3", "component 'vision' (full) as part of LLaMA-Factory's vision tower")]),
    # mixspec's Qwen3-VL aligner holds the deepstack mergers, LLaMA-Factory's vision keys too
    "qwen3-aligner": (
        spec(QWEN3_VL, "aligner: {train: full, lr: 1.0e-5}"),
        [("full-part-mismatch", "spec.yaml:4:3", "component 'aligner' (full) as part of LLaMA-Factory's vision tower")]),
    # outside the composite registry full trains everything, and freeze tuning takes the first
    # or last layers only: the frozen rest is named
    "text-middle-layers": (
        spec(QWEN_TEXT, "mid: {modules: ['model\\.layers\\.(1[0-9])'], train: full, lr: 1.0e-5}"),
        [("full-part-mismatch", "spec.yaml", "unassigned (frozen) parameters lm_head, model.embed_tokens, "
          "model.layers.0, model.layers.1 and 17 more")]),
    # lora_conflict_keys: never LoRA on patch_embed for the Qwen-VL family
    "lora-on-patch-embed": (
        spec(QWEN_VL, "vision: {train: lora, lr: 1.0e-4, lora: {targets: [patch_embed.proj, qkv]}}"),
        [("lora-targets", "spec.yaml:4:3",
          "LoRA on 1 modules of component 'vision': model.visual.patch_embed.proj")]),
    "lora-settings-differ": (
        spec(QWEN_VL, "vision: {train: lora, lr: 1.0e-4, lora: {rank: 8}}",
             "language: {train: lora, lr: 1.0e-4, lora: {rank: 16}}"),
        [("lora-settings-differ", "spec.yaml:4:3",
          "the LoRA settings of component 'vision' (rank=8, alpha=16.0, dropout=0.0, rslora=False, dora=False)"),
         ("lora-settings-differ", "spec.yaml:5:3",
          "the LoRA settings of component 'language' (rank=16, alpha=16.0, dropout=0.0, rslora=False, dora=False)")]),
    "fp32": (
        spec(QWEN_VL, "aligner: {train: full, lr: 1.0e-5}", tail="training: {precision: fp32}\n" + DATA),
        [("precision-fp32", "spec.yaml", "training.precision: fp32")]),
    "no-data": (
        spec(QWEN_VL, "aligner: {train: full, lr: 1.0e-5}", tail=""),
        [("no-data", "spec.yaml", "a run without training data")]),
    "nothing-trainable": (
        spec(QWEN_VL, "aligner: {train: freeze}"),
        [("nothing-trainable", "spec.yaml", "a Plan that trains nothing")]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused(case):
    text, expect = REFUSED[case]
    assert refusal(text) == expect
    assert [(i.code, str(i.origin), i.what) for i in TARGET().unsupported(plan_of(text), TargetOptions())] == expect


def test_refusal_reasons_name_llamafactory_facts():
    items = {i.code: i for i in TARGET().unsupported(plan_of(REFUSED["llm-middle-layers"][0]), TargetOptions())}
    why = items["full-part-mismatch"].why
    assert "language_model, lm_head" in why and "freeze_language_model" in why
    assert "lm_head, model.language_model.embed_tokens, model.language_model.layers.0 and 18 more (unassigned)" in why
    items = {i.code: i for i in TARGET().unsupported(plan_of(REFUSED["qwen3-aligner"][0]), TargetOptions())}
    assert "visual.deepstack_merger_list" in items["full-part-mismatch"].why
    items = {i.code: i for i in TARGET().unsupported(plan_of(REFUSED["lora-on-patch-embed"][0]), TargetOptions())}
    assert "'patch_embed' (lora_conflict_keys)" in items["lora-targets"].why
    items = TARGET().unsupported(plan_of(REFUSED["mixed-full-and-lora"][0]), TargetOptions())
    assert "modules_to_save" in items[-1].why and "twice" in items[-1].why
    assert "this Plan has 3: vision=2e-06, aligner=1e-05, language=0.0001" in items[0].why


def test_no_template_for_an_unknown_local_model(tmp_path):
    config = json.loads((ROOT / "compiler/models/catalog/Qwen/Qwen3-VL-8B-Instruct/config.json").read_text())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    text = spec(str(tmp_path / "m"), "language: {train: lora, lr: 1.0e-4}")
    assert refusal(text) == [("no-template", "spec.yaml", f"the chat template of {tmp_path / 'm'} (qwen3_vl)")]


# -- --approximate -----------------------------------------------------------------------------

def test_approximate_mixed_spec_comments_every_deviation():
    text = REFUSED["mixed-full-and-lora"][0]
    cfg, files = compile_yaml(text, approximate=True)
    yaml_text = files["train.yaml"]
    plan = plan_of(text)
    vision = plan.component("vision")
    # one lr for all: the geometric midpoint of 2e-6 and 1e-4 (3 digits), so no component is
    # off by more than ~7x (issue 12)
    assert cfg["learning_rate"] == 1.41e-5
    assert "# approximate: component 'vision' (spec.yaml:4:3) has learning rate 2e-06 in the Plan; here it is 1.41e-05 (7.05x)" in yaml_text
    assert "# approximate: component 'aligner' (spec.yaml:5:3) has learning rate 1e-05 in the Plan; here it is 1.41e-05 (1.41x)" in yaml_text
    assert "# approximate: component 'language' (spec.yaml:6:3) has learning rate 0.0001 in the Plan; here it is 1.41e-05 (0.141x)" in yaml_text
    # the full parts become modules_to_save copies; ModuleLists are split into their blocks
    targets = lf_split(cfg["additional_target"])
    assert "model.visual.blocks" not in targets
    assert [t for t in targets if t.startswith("model.visual.blocks.")] == [f"model.visual.blocks.{i}" for i in range(32)]
    assert targets[-2:] == ["model.visual.patch_embed", "model.visual.merger"]
    assert f"({vision.base_params:,} parameters held twice" in yaml_text
    assert yaml_text.count("# approximate:") == 5
    assert "APPROXIMATION (--approximate): 5 part(s)" in yaml_text
    assert "trainable params:" not in yaml_text  # no count promise for an approximation


def test_approximate_still_refuses_what_has_no_approximation():
    assert refusal(REFUSED["no-data"][0], approximate=True) == REFUSED["no-data"][1]


def test_approximate_full_mismatch_names_what_changes():
    cfg, files = compile_yaml(REFUSED["llm-middle-layers"][0], approximate=True)
    assert flags(cfg) == (True, True, True)  # the closest: the 10 layers frozen rather than 18 more trained
    assert ("# approximate: freezes model.language_model.layers.10, model.language_model.layers.11, "
            "model.language_model.layers.12, model.language_model.layers.13 and 6 more, which the Plan trains"
            in files["train.yaml"])


# -- dataset_info.json, paths, DeepSpeed, quoting -------------------------------------------------

def test_dataset_info_multimodal_jsonl_relative_to_the_output_dir():
    _, files = compile_yaml(EXACT["qwen-aligner-only"][0], extra={"out_dir": "out/lf"})
    cfg = yaml.safe_load(files["train.yaml"])
    info = json.loads(files["dataset_info.json"])
    assert cfg["dataset"] == "mixspec_train" and cfg["dataset_dir"] == "out/lf" and cfg["media_dir"] == "."
    assert info == {"mixspec_train": {
        "file_name": "../../data/train.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"}}}
    # LLaMA-Factory joins file_name to dataset_dir: that is the spec's path again
    assert os.path.normpath(os.path.join(cfg["dataset_dir"], info["mixspec_train"]["file_name"])) == "data/train.jsonl"
    assert cfg["template"] == "qwen2_vl"


def test_dataset_info_text_model_hub_id_and_eval():
    text = spec(QWEN_TEXT, "language: {train: full, lr: 1.0e-5}", "embeddings: {train: full, lr: 1.0e-5}",
                "lm_head: {train: full, lr: 1.0e-5}", tail="data: {train: my-org/sft, eval: /abs/eval.jsonl}\n")
    cfg, files = compile_yaml(text, extra={"out_dir": "/srv/out"})
    info = json.loads(files["dataset_info.json"])
    assert info["mixspec_train"]["hf_hub_url"] == "my-org/sft" and "file_name" not in info["mixspec_train"]
    assert info["mixspec_eval"]["file_name"] == "/abs/eval.jsonl"
    assert info["mixspec_train"]["columns"] == {"messages": "messages"}  # no images column on a text model
    assert (cfg["eval_dataset"], cfg["eval_strategy"], cfg["eval_steps"]) == ("mixspec_eval", "steps", 500)
    assert cfg["template"] == "qwen" and cfg["dataset_dir"] == os.path.relpath("/srv/out")


def test_relative_data_with_an_absolute_output_dir_stays_relative():
    # train.yaml runs from where mixspec compile ran: every path relative to it (issue 12)
    cfg, files = compile_yaml(EXACT["qwen-aligner-only"][0], extra={"out_dir": "/srv/out"})
    file_name = json.loads(files["dataset_info.json"])["mixspec_train"]["file_name"]
    assert not file_name.startswith("/") and not cfg["dataset_dir"].startswith("/")
    assert os.path.abspath(os.path.join(cfg["dataset_dir"], file_name)) == os.path.abspath("data/train.jsonl")


@pytest.mark.parametrize("stage,offload,keys", [
    (2, "none", {"allgather_partitions"}),
    (2, "optimizer", {"offload_optimizer"}),
    (3, "all", {"offload_optimizer", "offload_param", "stage3_gather_16bit_weights_on_model_save"}),
])
def test_deepspeed_config(stage, offload, keys):
    text = spec(QWEN_VL, "aligner: {train: full, lr: 1.0e-5}",
                tail=DATA + f"distributed: {{gpus_per_node: 2, zero_stage: {stage}, offload: {offload}}}\n")
    cfg, files = compile_yaml(text, extra={"out_dir": "out/x"})
    name = f"ds_z{stage}_config.json"
    assert cfg["deepspeed"] == f"out/x/{name}"
    ds = json.loads(files[name])
    assert ds["zero_optimization"]["stage"] == stage
    assert keys <= set(ds["zero_optimization"])
    assert ("offload_param" in ds["zero_optimization"]) == (offload == "all")
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in ds


def test_training_values_round_trip():
    # (LLaVA's projector: two Linear layers, whose weights decay and biases do not by both
    # the Plan's rule and transformers', which LLaMA-Factory's Trainer applies)
    text = spec(LLAVA, "aligner: {train: full, lr: 3.0e-7, weight_decay: 0.05}",
                tail="training: {epochs: 2.5, max_steps: 7, micro_batch_size: 3, gradient_accumulation: 5, "
                     "precision: fp16, gradient_checkpointing: false, max_length: 1234, warmup_ratio: 0.25, "
                     "lr_scheduler: linear, max_grad_norm: 0.5, seed: 7, logging_steps: 3, save_steps: 9}\n"
                     + DATA + "output_dir: runs/x\n")
    cfg, files = compile_yaml(text, model_override="/models/qwen")
    assert "learning_rate: 3.0e-07" in files["train.yaml"]  # a float to YAML 1.1 loaders too
    expected = {"model_name_or_path": "/models/qwen", "learning_rate": 3.0e-7, "weight_decay": 0.05,
                "num_train_epochs": 2.5, "max_steps": 7, "per_device_train_batch_size": 3,
                "gradient_accumulation_steps": 5, "bf16": False, "fp16": True,
                "disable_gradient_checkpointing": True, "cutoff_len": 1234, "warmup_ratio": 0.25,
                "lr_scheduler_type": "linear", "max_grad_norm": 0.5, "seed": 7, "logging_steps": 3,
                "save_steps": 9, "output_dir": "runs/x", "optim": "adamw_torch", "report_to": "none"}
    assert {k: cfg[k] for k in expected} == expected


def test_hostile_strings_stay_values():
    nasty = 'runs/x"\n#: y\nfinetuning_type: lora ${oc.env:HOME} é😀'
    text = spec(QWEN_VL, "aligner: {train: full, lr: 1.0e-5}",
                tail=DATA + f"output_dir: {json.dumps(nasty)}\n")
    plan = plan_spec(load_spec_text(text, "weird\nfinetuning_type: lora.yaml"))
    files = render(plan, "llamafactory", TargetOptions(model_override="a\nb: c", extra={"out_dir": "o\nu"}))
    cfg = yaml.safe_load(files["train.yaml"])
    assert cfg["output_dir"] == nasty and cfg["model_name_or_path"] == "a\nb: c" and cfg["dataset_dir"] == "o\nu"
    assert cfg["finetuning_type"] == "full"
    assert all(line.isascii() for line in files["train.yaml"].splitlines())
    keys = [line.split(":")[0] for line in files["train.yaml"].splitlines() if line and line[0].isalpha()]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("text", ["true", "no", "1e5", "0x1F", "-x", "a: b", "#x", "", " x", "~", "null", "2024-01-01"])
def test_yaml_str_reads_back(text):
    assert yaml.safe_load(f"k: {_yaml_str(text)}")["k"] == text


# -- the rules against counts measured with a real LLaMA-Factory 0.9.5 ----------------------------

def _tiny_qwen25vl(path: Path) -> Path:
    """The tiny Qwen2.5-VL of research/llamafactory-axolotl-cpu.md (19,763,008 parameters)."""
    cfg = copy.deepcopy(json.loads((ROOT / "compiler/models/catalog/Qwen/Qwen2.5-VL-7B-Instruct/config.json").read_text()))
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_window_layers=2, tie_word_embeddings=False, vocab_size=151936)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    cfg["vision_config"].update(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                                out_hidden_size=64, fullatt_block_indexes=[1])
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_counts_measured_with_llamafactory(tmp_path):
    """research/llamafactory-axolotl-cpu.md, measured with llamafactory 0.9.5 on this model:
    full + freeze_vision_tower false, freeze_language_model true, projector trained -> 240,896;
    the same with the projector frozen -> 158,592; LoRA r4 'all' on the LLM -> 8,192; with
    freeze_vision_tower false (LoRA on the ViT blocks too) -> 15,872."""
    model = _tiny_qwen25vl(tmp_path / "tiny")
    lora = "lora: {rank: 4, alpha: 8}"
    measured = [
        (["vision: {train: full, lr: 1.0e-5}", "aligner: {train: full, lr: 1.0e-5}"], 240_896, (False, False, True)),
        (["vision: {train: full, lr: 1.0e-5}"], 158_592, (False, True, True)),
        ([f"language: {{train: lora, lr: 1.0e-4, {lora}}}"], 8_192, (True, True, False)),
        ([f"vision: {{train: lora, lr: 1.0e-4, {lora}}}", f"language: {{train: lora, lr: 1.0e-4, {lora}}}"],
         15_872, (False, True, False)),
    ]
    for components, count, expect_flags in measured:
        plan = plan_spec(load_spec_text(spec(str(model), *components), "tiny.yaml"))
        assert plan.totals.base_params == 19_763_008
        assert plan.totals.trainable_params == count
        cfg = yaml.safe_load(render(plan, "llamafactory", TargetOptions())["train.yaml"])
        assert flags(cfg) == expect_flags
        assert f"trainable params: {count:,} || all params: {19_763_008 + plan.totals.added_params:,}" in \
            render(plan, "llamafactory", TargetOptions())["train.yaml"]


# -- golden files and determinism ----------------------------------------------------------------

def _golden_specs() -> list[Path]:
    return sorted((ROOT / "examples").glob("*.yaml")) + sorted(OWN_SPECS.glob("*.yaml"))


def _golden_files(spec_path: Path, approximate: bool = False) -> dict[str, str]:
    rel = spec_path.relative_to(ROOT)
    plan = plan_spec(load_spec(rel))
    out_dir = f"out/{spec_path.stem}"
    try:
        return render(plan, "llamafactory", TargetOptions(approximate=approximate, extra={"out_dir": out_dir}))
    except UnsupportedError as exc:
        return {"refusal.txt": str(exc) + "\n"}


@pytest.mark.parametrize("spec_path", _golden_specs(), ids=lambda p: p.stem)
def test_golden(spec_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    files = _golden_files(spec_path)
    cases = [(GOLDEN / spec_path.stem, files)]
    if "refusal.txt" in files and "no-data" not in files["refusal.txt"]:
        cases.append((GOLDEN / spec_path.stem / "approximate", _golden_files(spec_path, approximate=True)))
    for folder, generated in cases:
        if UPDATE:
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.*"):
                old.unlink()
            for name, text in generated.items():
                (folder / name).write_text(text)
        expected = {p.name: p.read_text() for p in folder.glob("*.*")} if folder.is_dir() else {}
        assert expected, f"no golden files in {folder}; run: MIXSPEC_UPDATE_GOLDEN=1 pytest {__file__}"
        assert generated == expected, f"{folder} differs; review, then MIXSPEC_UPDATE_GOLDEN=1"
    assert _golden_files(spec_path) == files  # deterministic


def test_registered_as_a_target():
    assert available_targets()["llamafactory"] is TARGET


def test_cli_compile_writes_files_and_refuses_with_locations(run_cli, tmp_path):
    out = tmp_path / "lf"
    ok = run_cli("compile", "examples/llava15-projector-only.yaml", "--target", "llamafactory", "-o", str(out))
    assert ok.exit_code == 0, ok.stderr
    assert sorted(p.name for p in out.iterdir()) == ["dataset_info.json", "ds_z2_config.json", "train.yaml"]
    cfg = yaml.safe_load((out / "train.yaml").read_text())
    rel = os.path.relpath(out)  # run_cli runs from the repository root: paths relative to it
    assert cfg["dataset_dir"] == rel and cfg["deepspeed"] == f"{rel}/ds_z2_config.json"
    bad = run_cli("compile", "examples/qwen25vl-7b-mixed.yaml", "--target", "llamafactory", "-o", str(tmp_path / "no"))
    assert bad.exit_code == 1
    assert bad.stderr.startswith("examples/qwen25vl-7b-mixed.yaml:14:3: error: target llamafactory cannot express "
                                 "3 parts, for one reason: LLaMA-Factory trains every parameter with one learning_rate")
    assert "\n  - examples/qwen25vl-7b-mixed.yaml:14:3: component 'vision' at learning rate 2e-06\n" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "no").exists()


# -- opt-in: a real LLaMA-Factory 0.9.5 ---------------------------------------------------------

_PROBE = textwrap.dedent("""
    import json, os, sys
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from omegaconf import OmegaConf
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer, load_model
    cfg = OmegaConf.to_container(OmegaConf.load(sys.argv[1]))  # what llamafactory-cli train reads
    cfg.update(output_dir=sys.argv[2], use_cpu=True, bf16=False, fp16=False)
    cfg.pop("deepspeed", None)
    model_args, _, training_args, finetuning_args, _ = get_train_args(cfg)
    model = load_model(load_tokenizer(model_args)["tokenizer"], model_args, finetuning_args, is_trainable=True)
    strip = lambda n: n[len("base_model.model."):] if n.startswith("base_model.model.") else n
    print(json.dumps({"trainable": sorted(strip(n) for n, p in model.named_parameters() if p.requires_grad),
                      "lr": training_args.learning_rate}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LLAMAFACTORY_PYTHON"),
                    reason="set LLAMAFACTORY_PYTHON to a python with llamafactory==0.9.5 installed")
def test_real_llamafactory_trains_exactly_the_plan(tmp_path, monkeypatch):
    """Load each generated train.yaml with LLaMA-Factory's own argument parser and model
    loader; the trainable parameter names and the learning rate must equal the Plan's."""
    builder = ROOT / "tests" / "fixtures" / "make_tiny_vlm.py"
    if not builder.is_file():
        pytest.skip("needs tests/fixtures/make_tiny_vlm.py (tiny models with tokenizers)")
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("make_tiny_vlm", builder)
    make = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(make)
    monkeypatch.chdir(tmp_path)
    models = {"qwen": make.make_tiny_qwen25vl(tmp_path / "qwen"), "llava": make.make_tiny_llava(tmp_path / "llava")}
    (tmp_path / "probe.py").write_text(_PROBE)
    cases = [("qwen", EXACT["qwen-vision-and-aligner"][0]), ("qwen", EXACT["qwen-aligner-only"][0]),
             ("qwen", EXACT["qwen-whole-llm"][0]), ("qwen", EXACT["qwen-two-lora-components"][0]),
             ("qwen", EXACT["qwen-vision-lora-dora"][0]), ("llava", EXACT["llava-projector-only"][0]),
             ("llava", EXACT["llava-qv-one-layer"][0])]
    for i, (model, text) in enumerate(cases):
        text = text.replace(f"model: {QWEN_VL}", f"model: {models['qwen']}").replace(
            f"model: {LLAVA}", f"model: {models['llava']}")
        plan = plan_spec(load_spec_text(text, f"case{i}.yaml"))
        out = tmp_path / f"out{i}"
        out.mkdir()
        for name, body in render(plan, "llamafactory", TargetOptions(extra={"out_dir": str(out)})).items():
            (out / name).write_text(body)
        run = subprocess.run([os.environ["LLAMAFACTORY_PYTHON"], "probe.py", str(out / "train.yaml"),
                              str(tmp_path / f"run{i}")], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        got = json.loads(run.stdout.strip().splitlines()[-1])
        assert got["trainable"] == sorted(plan.trainable_lrs()), text
        assert {got["lr"]} == set(plan.trainable_lrs().values())


def test_any_string_reads_back_from_yaml_and_comments_stay_one_line():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mixspec.targets._common import comment_line

    @settings(max_examples=300, deadline=None)
    @given(st.text())
    def check(text):
        assert yaml.safe_load(f"k: {_yaml_str(text)}")["k"] == text
        line = comment_line(text)
        assert line.isascii() and "\n" not in line and "\r" not in line

    check()


# -- freeze tuning: the first or last layers, their modules, extra modules by name ------------------
FREEZE = {
    # (spec, the freeze_* keys written)
    "text-llm-only": (spec(QWEN_TEXT, "language: {train: full, lr: 1.0e-5}"),
                      {"freeze_trainable_layers": 28, "freeze_trainable_modules": "all",
                       "freeze_extra_modules": "norm"}),
    "text-llm-and-embeddings": (
        spec(QWEN_TEXT, "language: {train: full, lr: 1.0e-5}", "embeddings: {train: full, lr: 1.0e-5}",
             "lm_head: {train: freeze}"),
        {"freeze_trainable_layers": 28, "freeze_trainable_modules": "all",
         "freeze_extra_modules": "embed_tokens,norm"}),
    "text-last-four-layers": (
        spec(QWEN_TEXT, "late: {modules: ['model\\.layers\\.(2[4-7])'], train: full, lr: 1.0e-5}"),
        {"freeze_trainable_layers": 4, "freeze_trainable_modules": "all"}),
    # the vision blocks numbered like the LLM's are kept out by freeze_vision_tower
    "vl-llm-without-embeddings": (spec(QWEN_VL, "language: {train: full, lr: 1.0e-5}"),
                                  {"freeze_trainable_layers": 28, "freeze_trainable_modules": "all",
                                   "freeze_extra_modules": "norm", "freeze_vision_tower": True}),
}


@pytest.mark.parametrize("case", sorted(FREEZE))
def test_freeze_tuning_trains_exactly_the_plan(case):
    """The freeze_* keys written, and LLaMA-Factory's freeze-tuning rule (as mixspec import
    --from llamafactory applies it, checked against measured counts) trains exactly the Plan."""
    text, keys = FREEZE[case]
    cfg, files = compile_yaml(text)
    assert cfg["finetuning_type"] == "freeze"
    assert {k: cfg.get(k) for k in keys} == keys
    assert "freeze_extra_modules" in cfg or "freeze_extra_modules" not in keys
    imported = read("llamafactory", files["train.yaml"], "train.yaml")
    assert imported.ok, [p.render() for p in imported.problems]
    assert plan_dict(imported.spec).trainable_lrs() == plan_of(text).trainable_lrs()


def test_data_lists_and_pixel_limits_reach_llamafactory():
    """Several files: one dataset_info entry each, mixed by a comma list; data.max_pixels and
    data.min_pixels as image_max_pixels / image_min_pixels (else LLaMA-Factory resizes to 768 x 768)."""
    tail = "data: {train: [a.jsonl, b.jsonl], eval: c.jsonl, max_pixels: 200704, min_pixels: 3136}\n"
    cfg, files = compile_yaml(spec(QWEN_VL, "language: {train: lora, lr: 1.0e-4}", tail=tail))
    info = json.loads(files["dataset_info.json"])
    assert cfg["dataset"] == "mixspec_train_1,mixspec_train_2" and cfg["eval_dataset"] == "mixspec_eval"
    assert {n: e["file_name"] for n, e in info.items()} == {
        "mixspec_train_1": "a.jsonl", "mixspec_train_2": "b.jsonl", "mixspec_eval": "c.jsonl"}
    assert (cfg["image_max_pixels"], cfg["image_min_pixels"]) == (200704, 3136)
    text_only, _ = compile_yaml(spec(QWEN_TEXT, "language: {train: lora, lr: 1.0e-4}"))
    assert "image_max_pixels" not in text_only
