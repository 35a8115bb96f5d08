"""mixspec import --from swift: ms-swift's rules over the module tree, each silent effect,
the CLI's contract, and the round trip through the swift target.

What swift really trains for these command lines is checked against the real ms-swift in
tests/e2e/test_import_swift_e2e.py; here, the rules as mixspec applies them, and the
numbers ms-swift's own issues report (#6079: 589.5718M trainable).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import codes, effect
from mixspec.api import plan_spec, render
from mixspec.importers import read, spec_yaml
from mixspec.language.loader import load_spec_text
from mixspec.targets import TargetOptions
from mixspec.targets import swift as swift_target

ROOT = Path(__file__).resolve().parents[2]
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"


def imp(body: str, head: str = "", model: str = QWEN, path: str = "train.sh"):
    text = head + f"swift sft \\\n    --model {model} \\\n    --dataset data.jsonl \\\n" + body
    return read("swift", text, path)


def comp(plan, name):
    return plan.component(name)


# -- the rules -----------------------------------------------------------------------------------
def test_seed_lora_llm_trains_vit_and_aligner_fully_and_lora_on_the_llm():
    got = imp("    --tuner_type lora_llm --lora_rank 16 --lora_alpha 32 --learning_rate 1e-4 "
              "--vit_lr 2e-6 --aligner_lr 1e-5 --lora_dropout 0.05 --use_rslora true --use_dora true "
              "--target_modules q_proj\n")
    assert got.ok, [p.render() for p in got.problems]
    plan = got.plan
    assert {c.name: (c.mode, c.lr) for c in plan.components} == {
        "vision": ("full", 2e-6), "aligner": ("full", 1e-5), "language": ("lora", 1e-4)}
    lora = comp(plan, "language").lora
    # lora_llm's LoraConfig: rank and alpha only; PEFT's defaults for the rest
    assert (lora.rank, lora.alpha, lora.dropout, lora.rslora, lora.dora) == (16, 32.0, 0.0, False, False)
    assert lora.targets_spec == "all-linear" and len(lora.targets) == 196
    # the published seed-case counts (README): ViT 631,975,680, aligner 44,574,464, LoRA 40,370,176
    assert (comp(plan, "vision").trainable_params, comp(plan, "aligner").trainable_params,
            comp(plan, "language").trainable_params) == (631_975_680, 44_574_464, 40_370_176)
    for flag in ("lora_dropout", "use_rslora", "use_dora", "target_modules"):
        e = effect(got, f"lora_llm-ignores-{flag}")
        assert f"ignores --{flag}" in e.message
    assert got.groups["vision"] == "swift vit: --vit_lr"


def test_lora_llm_without_vit_lr_trains_the_vit_at_the_lora_lr():
    got = imp("    --tuner_type lora_llm\n")
    plan = got.plan
    assert {c.lr for c in plan.components if c.trainable_params} == {1e-4}  # swift's default for non-full
    e = effect(got, "base-lr")
    assert "share one LR, --learning_rate 0.0001" in e.message and "--vit_lr" in e.fix


def test_freeze_parameters_typo_matches_nothing_7226():
    """#7226: Qwen2.5-VL's LLM layers are model.language_model.layers.N, not model.layers.N."""
    got = imp("    --tuner_type full --freeze_parameters model.layers.1\n")
    e = effect(got, "pattern-matches-nothing")
    assert e.where.line == 4 and "no parameter name starts with it" in e.message
    assert e.fix == "use --freeze_parameters model.language_model.layers.1."
    # nothing frozen: the whole LLM (with embeddings and lm_head) trains
    trained = set(got.plan.trainable_lrs())
    assert "model.language_model.layers.1.mlp.up_proj.weight" in trained
    assert "lm_head.weight" in trained and not any(n.startswith("model.visual") for n in trained)


def test_prefix_without_a_dot_matches_ten_more_layers():
    got = imp("    --tuner_type full --freeze_parameters model.language_model.layers.1\n")
    e = effect(got, "prefix-matches-more")
    assert "model.language_model.layers.10" in e.message and e.fix.endswith("layers.1.")
    trained = set(got.plan.trainable_lrs())
    frozen_layers = {int(n.split(".")[3]) for n in got.plan.unassigned_params if ".layers." in n}
    assert frozen_layers == {1, *range(10, 20)}
    assert not any(".layers.12." in n for n in trained)


def test_lm_head_counts_as_llm_6079():
    """#6079: a "projector only" run (--freeze_llm/vit true, --freeze_aligner false) reported
    589.5718M trainable on Qwen2.5-VL-7B because lm_head was not frozen with the LLM (ms-swift
    3.9). With 4.6's rules (lm_head inside the LLM) only the merger trains; the two differ by
    exactly lm_head."""
    got = imp("    --tuner_type full --freeze_llm true --freeze_vit true --freeze_aligner false\n")
    plan = got.plan
    assert plan.totals.trainable_params == 44_574_464
    lm_head = 3584 * 152064
    assert round((plan.totals.trainable_params + lm_head) / 1e6, 4) == 589.5718
    # and training the LLM fully trains embeddings and lm_head too, said as an effect
    full = imp("    --tuner_type full --freeze_llm false\n")
    e = effect(full, "lm-head-in-llm")
    assert "lm_head.weight" in e.message and f"{2 * lm_head:,}" in e.message
    assert {c.name for c in full.plan.components} == {"language", "embeddings", "lm_head"}
    v3 = imp("    --train_type full --freeze_llm true --freeze_aligner false\n")
    assert "PR #6651" in effect(v3, "lm-head-version").message


def test_full_with_frozen_vit_and_vit_lr():
    got = imp("    --tuner_type full --freeze_vit true --freeze_aligner false --vit_lr 1e-6 --aligner_lr 2e-5 "
              "--learning_rate 1e-5\n")
    e = effect(got, "lr-reaches-nothing")
    assert "--vit_lr has no effect" in e.message and "--freeze_vit" in e.message
    lrs = {c.name: c.lr for c in got.plan.components if c.trainable_params}
    assert lrs == {"aligner": 2e-5, "language": 1e-5, "embeddings": 1e-5, "lm_head": 1e-5}
    assert got.groups["aligner"] == "swift aligner: --aligner_lr"


def test_full_with_vit_trained_and_no_vit_lr_is_left_at_the_base_lr():
    got = imp("    --tuner_type full --freeze_vit false --freeze_llm true --aligner_lr 2e-5\n")
    e = effect(got, "base-lr")
    assert "the ViT (631,975,680 parameters) trains at --learning_rate 1e-05" in e.message


def test_lora_all_linear_modules_to_save_copy():
    got = imp("    --tuner_type lora --target_modules all-linear --modules_to_save model.visual.merger "
              "--lora_rank 8 --lora_alpha 16 --lora_dropout 0.1\n")
    plan = got.plan
    e = effect(got, "modules-to-save-copy")
    assert "44,574,464" in e.message and "0.08 GiB" in e.message
    assert comp(plan, "aligner").mode == "full" and comp(plan, "language").lora.dropout == 0.1
    # all-linear on a multimodal model: the LLM's linears only (freeze_vit defaults to true)
    assert all(t.startswith("model.language_model.") for t in comp(plan, "language").lora.targets)


def test_lora_flags_under_full_and_full_flags_under_lora():
    got = imp("    --tuner_type full --lora_rank 64 --target_modules all-linear\n")
    assert [e.where.col for e in got.effects if e.code == "flag-for-other-tuner"] == [23, 38]
    got = imp("    --tuner_type lora --trainable_parameters model.visual.merger\n")
    e = effect(got, "flag-for-other-tuner")
    assert "--trainable_parameters has no effect with --tuner_type lora" in e.message
    assert "model.visual.merger.mlp.0.weight" not in got.plan.trainable_lrs()


def test_freeze_vit_false_under_lora_means_lora_on_the_vit():
    got = imp("    --tuner_type lora --freeze_vit false\n")
    assert "does not train the ViT fully" in effect(got, "freeze-vit-means-lora").message
    vision = comp(got.plan, "vision")
    assert vision.mode == "lora" and vision.lora.targets
    # the merger is excluded from the ViT's regex (get_multimodal_target_regex's lookahead)
    assert not any(t.startswith("model.visual.merger") for t in vision.lora.targets)


def test_target_modules_beside_all_linear_are_dropped_on_a_multimodal_model():
    got = imp("    --target_modules all-linear embed_tokens\n")
    e = effect(got, "target-modules-ignored")
    assert "embed_tokens" in e.message
    assert not any("embed_tokens" in t for c in got.plan.components if c.lora for t in c.lora.targets)


def test_text_model_all_linear_and_suffix_list():
    got = imp("    --target_modules all-linear\n", model="Qwen/Qwen2.5-7B-Instruct")
    assert len(got.plan.components[0].lora.targets) == 28 * 7
    got = imp("    --target_modules q_proj v_proj not_there\n", model="Qwen/Qwen2.5-7B-Instruct")
    assert len(got.plan.components[0].lora.targets) == 56
    assert "not_there" in effect(got, "pattern-matches-nothing").message


def test_swift3_multimodal_optimizer_leaves_params_outside_the_prefixes_without_an_optimizer(monkeypatch):
    """3.x: create_multimodal_optimizer groups only the ViT, aligner and language_model
    prefixes; 4.6 puts every other trainable parameter in the LLM group."""
    sw = swift_target.SWIFT_MODELS["qwen2_5_vl"]
    monkeypatch.setitem(swift_target.SWIFT_MODELS, "qwen2_5_vl",
                        swift_target.SwiftModel(sw.model_type, sw.template, ("model.language_model",),
                                                sw.vision_tower, sw.aligner))
    body = "--freeze_llm false --vit_lr 1e-6 --freeze_vit false\n"
    v3 = imp("    --train_type full " + body)
    assert "lm_head.weight" not in v3.plan.trainable_lrs()
    assert "never change" in effect(v3, "no-optimizer").message
    v4 = imp("    --tuner_type full " + body)
    assert v4.plan.trainable_lrs()["lm_head.weight"] == 1e-5


def test_environment_nproc_nodes_and_pitfalls():
    got = imp("    --tuner_type lora\n", head="export NNODES=2\nNPROC_PER_NODE=8\nexport FOO=1\n")
    assert got.spec["distributed"] == {"nodes": 2, "gpus_per_node": 1}
    assert effect(got, "env-not-exported").where.line == 2
    assert any(u.key == "FOO=1" for u in got.unmodelled)
    got = imp("    --tuner_type lora\n", head="CUDA_VISIBLE_DEVICES=0,1,2,3 \\\n")
    assert "device_map" in effect(got, "device-map").message
    got = imp("    --tuner_type lora\n", head="NPROC_PER_NODE=8 NNODES=2 \\\n")
    assert got.spec["distributed"] == {"nodes": 2, "gpus_per_node": 8}
    # swift's default accumulation: ceil(16 / batch / world size)
    assert got.spec["training"]["gradient_accumulation"] == 1
    assert imp("    --tuner_type lora\n").spec["training"]["gradient_accumulation"] == 16


def test_unmodelled_flags_are_listed_never_dropped():
    got = imp("    --tuner_type lora --neftune_noise_alpha 5 --eval_steps 50 \"$@\"\n")
    keys = {u.key: u.note for u in got.unmodelled}
    assert keys["--neftune_noise_alpha 5"] == ""
    assert "does not change" in keys["--eval_steps 50"]
    assert '"$@"' in keys
    # a QLoRA base is read now (tests/importers/test_import_quantized.py), not listed
    got = imp("    --tuner_type lora --quant_bits 4 --quant_method bnb\n")
    assert not any("quant" in u.key for u in got.unmodelled)
    assert got.plan.quant_config().method == "nf4"


def test_values_from_shell_variables():
    got = imp("    --tuner_type lora --learning_rate ${LR} --lora_rank \"$RANK\"\n", head="LR=3e-4\nRANK=4\n")
    assert got.plan.components[0].lr == 3e-4 and got.plan.components[0].lora.rank == 4
    bad = imp("    --tuner_type lora --learning_rate $UNSET\n")
    assert [p.render() for p in bad.problems] == [
        "train.sh:4:39: error: --learning_rate: its value '$UNSET' depends on $UNSET, which this file does not set"
        " (mixspec needs it: it can change what trains, an LR or the memory)"
        "\n  hint: set the variable in the file, or write the value itself"]


@pytest.mark.parametrize("text,message", [
    ("echo hello\n", "train.sh:1:1: error: no `swift sft` command found"),
    ("swift sft --model Qwen/Qwen2.5-VL-7B-Instruct --tuner_type adalora --dataset d\n",
     "train.sh:1:47: error: --tuner_type: tuner 'adalora': mixspec expresses full, lora and lora_llm training only"),
    ("swift sft --model Qwen/Qwen2.5-VL-7B-Instruct --train_type lora_llm --dataset d\n",
     "train.sh:1:47: error: --train_type: ms-swift 3.x has no lora_llm tuner"),
    ("swift sft --model no/such-model --dataset d\n", "train.sh:1:19: error: --model: "),
    ("swift sft --model Qwen/Qwen2.5-VL-7B-Instruct --freeze_vit maybe --tuner_type full --dataset d\n",
     "train.sh:1:60: error: --freeze_vit: must be true or false (got 'maybe')"),
    ("swift sft --model Qwen/Qwen2.5-VL-7B-Instruct --tuner_type lora --freeze_llm true --dataset d\n",
     "train.sh:1:65: error: --freeze_llm: with the LLM, ViT and aligner all frozen"),
    ("swift sft --model a\nswift sft --model b\n", "train.sh:2:1: error: 2 `swift sft` commands (lines 1, 2)"),
    ("swift sft --model 'Qwen/x \\\n  --dataset d\n", "train.sh:1:19: error: this ' quote is never closed"),
])
def test_problems_are_located(text, message):
    got = read("swift", text, "train.sh")
    assert not got.ok
    assert got.problems[0].render().startswith(message)


# -- the written spec -----------------------------------------------------------------------------
def test_written_spec_loads_back_with_origins():
    got = imp("    --tuner_type lora_llm --vit_lr 2e-6 --aligner_lr 1e-5 --lora_rank 16\n", head="NPROC_PER_NODE=8 \\\n")
    text = spec_yaml(got, "train.sh")
    loaded = load_spec_text(text, "spec.yaml")
    assert loaded.spec.model_dump() == load_spec_text(json.dumps(got.spec), "x").spec.model_dump()
    lines = text.splitlines()
    assert "  vision:  # train.sh:5:5 --tuner_type; swift vit: --vit_lr" in lines
    assert "    lr: 2.0e-6  # train.sh:5:27 --vit_lr" in lines
    assert "  gpus_per_node: 8  # train.sh:1:1 NPROC_PER_NODE" in lines
    assert "  weight_decay: 0.1  # ms-swift 4.x default (--weight_decay)" in lines


# -- round trip: spec -> swift flags -> import -> the same Plan -------------------------------------
SPECS = sorted((ROOT / "tests" / "targets" / "specs" / "swift").glob("*.yaml")) + sorted(
    (ROOT / "examples").glob("*.yaml"))
# the seed example with LoRA dropout 0: what lora_llm says exactly (the example's 0.05 needs the plugin)
SEED_DROPOUT0 = (ROOT / "examples" / "qwen25vl-7b-mixed.yaml").read_text().replace("dropout: 0.05", "dropout: 0")


def _round_trip(plan, version: int):
    files = render(plan, "swift", plugin=False, swift_version=version)
    got = read("swift", files["train.sh"], "train.sh")
    assert got.ok, [p.render() for p in got.problems]
    again = got.plan
    assert again.trainable_lrs() == plan.trainable_lrs()
    assert again.totals == plan.totals
    for c in plan.components:
        if not c.lora:
            continue
        mine = [x for x in again.components if x.lora and set(x.lora.targets) & set(c.lora.targets)]
        assert mine and all((x.lora.rank, x.lora.alpha, x.lora.dropout, x.lora.rslora, x.lora.dora)
                            == (c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora, c.lora.dora) for x in mine)
    # the re-import compiles to the same flags
    def flags(text):  # a generated deepspeed.json is a file swift reads: listed as not modelled
        return [line for line in text[text.index("swift sft \\\n"):].splitlines() if "deepspeed.json" not in line]

    assert flags(render(again, "swift", plugin=False, swift_version=version)["train.sh"]) == flags(files["train.sh"])
    return got


@pytest.mark.parametrize("version", [4, 3])
@pytest.mark.parametrize("path", SPECS + ["seed-dropout0"], ids=lambda p: getattr(p, "name", p))
def test_round_trip_through_the_swift_target(path, version, tmp_path):
    if path == "seed-dropout0":
        path = tmp_path / "seed.yaml"
        path.write_text(SEED_DROPOUT0)
    plan = plan_spec(path)
    decision = swift_target.decide(plan, TargetOptions(swift_version=version))
    if decision.plugin or decision.hard:
        pytest.skip("the swift target needs its plugin for this Plan: "
                    + ", ".join(r.code for r in decision.plugin_reasons + decision.hard))
    _round_trip(plan, version)


def test_round_trip_covers_each_flag_path(tmp_path):
    """Not all skipped: every flag path of the swift target is among the round-trip cases."""
    seen = set()
    for path in SPECS:
        d = swift_target.decide(plan_spec(path), TargetOptions())
        if not d.plugin and not d.hard:
            seen.add((d.tuner, d.lr_mode))
    assert {("full", "multimodal"), ("lora", "multimodal"), ("lora_llm", "multimodal"), ("lora", "single")} <= seen


# -- the CLI ----------------------------------------------------------------------------------------
SEED_SH = """\
# the ms-swift example lora_llm_full_vit/sft.sh
NPROC_PER_NODE=4 \\
MAX_PIXELS=1003520 \\
swift sft \\
    --model Qwen/Qwen2.5-VL-7B-Instruct \\
    --dataset 'AI-ModelScope/coco#20000' \\
    --tuner_type lora_llm \\
    --torch_dtype bfloat16 \\
    --learning_rate 1e-4 --vit_lr 1e-5 --aligner_lr 1e-5 \\
    --lora_rank 16 --lora_alpha 32 --lora_dropout 0.05 \\
    --max_length 8192 --deepspeed zero2 --save_only_model true
"""


def test_cli_import_prints_plan_effects_and_writes_the_spec(run_cli, tmp_path):
    script = tmp_path / "sft.sh"
    script.write_text(SEED_SH)
    out = tmp_path / "spec.yaml"
    result = run_cli("import", "--from", "swift", str(script), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "read with the rules of ms-swift 4.x (rules of 4.6.0)" in text
    assert "(swift vit: --vit_lr)" in text and "631,975,680" in text and "40,370,176" in text
    i, j = text.index("silent effects (2):"), text.index("not modelled (1;")
    assert i < j and "lora_llm-ignores-lora_dropout" in text[i:j] and "--save_only_model true" in text[j:]
    assert result.stderr.strip().endswith(f"wrote {out}")
    validated = run_cli("validate", str(out))
    assert validated.exit_code == 0, validated.stderr
    assert plan_spec(out).totals.trainable_params == 716_920_320
    # an existing file is not overwritten without --force
    again = run_cli("import", "--from", "swift", str(script), "-o", str(out))
    assert again.exit_code == 1 and "would overwrite" in again.stderr


def test_cli_import_json_and_stdin(run_cli, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mixspec.cli import app

    result = CliRunner().invoke(app, ["import", "--from", "swift", "-", "--json"], input=SEED_SH)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == "<stdin>" and data["rules"].startswith("ms-swift 4.x")
    assert data["plan"]["totals"]["trainable_params"] == 716_920_320
    assert data["groups"]["aligner"] == "swift aligner: --aligner_lr"
    assert [e["code"] for e in data["effects"]][0] == "lora_llm-ignores-lora_dropout"
    assert data["origins"]["components.vision.lr"] == "<stdin>:9:26 --vit_lr"


def test_cli_import_errors(run_cli, tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("swift sft --model Qwen/Qwen2.5-VL-7B-Instruct --tuner_type vera --dataset d\n")
    out = tmp_path / "spec.yaml"
    result = run_cli("import", "--from", "swift", str(bad), "-o", str(out))
    assert result.exit_code == 1 and not out.exists()
    assert f"{bad}:1:47: error: --tuner_type: tuner 'vera'" in result.stderr
    assert "nothing written" in result.stderr
    missing = run_cli("import", "--from", "swift", str(tmp_path / "nope.sh"))
    assert missing.exit_code == 1 and "cannot read it" in missing.stderr
    binary = tmp_path / "bin.sh"
    binary.write_bytes(b"swift sft\n\xff\xfe")
    result = run_cli("import", "--from", "swift", str(binary))
    assert result.exit_code == 1 and f"{binary}:2:1: error: not UTF-8 text" in result.stderr
    usage = run_cli("import", "--from", "swiftt", str(bad))
    assert usage.exit_code == 2 and "did you mean 'swift'" in usage.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    good = tmp_path / "good.sh"
    good.write_text("swift sft --model Qwen/Qwen2.5-VL-7B-Instruct --tuner_type lora --dataset d\n")
    (tmp_path / "outdir").mkdir()
    to_dir = run_cli("import", "--from", "swift", str(good), "-o", str(tmp_path / "outdir"))
    assert to_dir.exit_code == 1 and "is a directory; give the spec file's path" in to_dir.stderr
    assert list((tmp_path / "outdir").iterdir()) == []


def test_everything_frozen_is_said():
    got = imp("    --tuner_type full --freeze_parameters_ratio 1\n")
    assert "no parameter is trainable" in effect(got, "nothing-trained").message
    assert got.plan.totals.trainable_params == 0


def test_modules_to_save_all_norm_is_one_effect_per_entry():
    got = imp("    --modules_to_save all-norm\n", model="Qwen/Qwen2.5-7B-Instruct")
    assert codes(got).count("modules-to-save-copy") == 1
    # every RMSNorm (2 per layer and the final norm) becomes a trained copy
    assert len([n for n in got.plan.trainable_lrs() if "norm" in n]) == 28 * 2 + 1


def test_docs_audit_example():
    """The example docs/import.md shows: its findings and counts, as printed there."""
    path = ROOT / "examples" / "import" / "swift_sft_full.sh"
    got = read("swift", path.read_text(), "examples/import/swift_sft_full.sh")
    assert codes(got) == ["pattern-matches-nothing", "pattern-matches-nothing", "lr-reaches-nothing",
                          "lm-head-in-llm", "weight-decay-rule"]
    assert got.plan.totals.trainable_params == 7_660_190_976
    page = (ROOT / "docs" / "import.md").read_text()
    for e in got.effects:
        assert e.render().splitlines()[0] in page
    assert "trainable 7,660,190,976 (92.38% of all)" in page


def test_freeze_flags_beside_explicit_lora_targets_do_nothing():
    got = imp("    --tuner_type lora --target_modules q_proj --freeze_vit false\n")
    e = effect(got, "flag-for-other-tuner")
    assert "--freeze_vit has no effect here" in e.message
    # PEFT's suffix match: the ViT has no q_proj (its attention is qkv), so LoRA stays in the LLM
    assert all(t.startswith("model.language_model.") for c in got.plan.components if c.lora for t in c.lora.targets)


def test_modules_to_save_suffix_matches_more_than_the_module():
    """PEFT's modules_to_save test is str.endswith: 'norm' also copies every *_layernorm."""
    got = imp("    --tuner_type lora --modules_to_save norm\n", model="Qwen/Qwen2.5-7B-Instruct")
    e = effect(got, "suffix-matches-more")
    assert "model.layers.0.input_layernorm" in e.message and "56 modules" in e.message
    assert e.fix == "name the module with its full dotted name, e.g. --modules_to_save model.norm"


# -- any command line: an import or located problems, never a traceback --------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FLAG_NAMES = ["tuner_type", "train_type", "freeze_llm", "freeze_vit", "freeze_aligner", "freeze_parameters",
               "freeze_parameters_regex", "freeze_parameters_ratio", "trainable_parameters",
               "trainable_parameters_regex", "target_modules", "target_regex", "modules_to_save", "lora_rank",
               "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "learning_rate", "vit_lr", "aligner_lr",
               "optimizer", "torch_dtype", "max_length", "deepspeed", "weight_decay", "warmup_ratio",
               "num_train_epochs", "gradient_accumulation_steps", "lr_scheduler_type", "unknown_flag"]
_VALUES = ["full", "lora", "lora_llm", "true", "false", "0", "1", "-1", "1e-5", "0.5", "nan", "all-linear",
           "model.visual", "model.layers.1", "model.visual.merger", "q_proj", "norm", "all-embedding", "all-norm",
           "(", ".*", "lm_head", "zero2", "zero3_offload", "bfloat16", "int8", "cosine", "multimodal", "galore",
           "$X", "'quoted value'", "\"a b\"", ""]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_FLAG_NAMES), st.lists(st.sampled_from(_VALUES), max_size=3)),
                max_size=8),
       st.sampled_from([QWEN, "Qwen/Qwen2.5-7B-Instruct", "llava-hf/llava-1.5-7b-hf"]))
def test_any_command_line_gives_an_import_or_located_problems(flags, model):
    body = "".join(f" --{name} {' '.join(values)}" for name, values in flags)
    got = read("swift", f"swift sft --model {model} --dataset d{body}\n", "fuzz.sh")
    if got.ok:
        assert got.plan is not None
        loaded = load_spec_text(spec_yaml(got, "fuzz.sh"), "spec.yaml")
        assert loaded.spec == load_spec_text(json.dumps(got.spec), "x").spec
    else:
        assert all(p.location.file == "fuzz.sh" for p in got.problems)
    for e in got.effects:
        assert e.where.line >= 1 and e.fix


def test_adamw_settings_are_swifts_own_defaults_in_the_spec():
    """ms-swift's TrainArguments default adam_beta2 is 0.95 (torch's 0.999): the spec states
    what swift runs, with its origin, and the swift target emits it back."""
    got = imp("    --tuner_type lora\n")
    t = got.spec["training"]
    assert (t["adam_beta1"], t["adam_beta2"], t["adam_epsilon"]) == (0.9, 0.95, 1e-8)
    assert got.origins["training.adam_beta2"] == "ms-swift 4.x default (--adam_beta2)"
    assert got.plan.training.adam_beta2 == 0.95 and "adam-betas" not in codes(got)
    flags = render(got.plan, "swift")["train.sh"]
    assert "--adam_beta2 0.95 " in flags.replace("\\\n", " ")
    given = imp("    --tuner_type lora --adam_beta2 0.999 --adam_epsilon 1e-6\n")
    assert (given.spec["training"]["adam_beta2"], given.spec["training"]["adam_epsilon"]) == (0.999, 1e-6)
    assert str(given.origins["training.adam_beta2"]).startswith("train.sh:4:")


@pytest.mark.parametrize("body, reported", [
    ("--tuner_type full --torch_dtype bfloat16", True),          # the full tuner casts nothing
    ("--tuner_type full --torch_dtype float16", True),
    ("--tuner_type full --torch_dtype float32", False),
    ("--tuner_type full --torch_dtype bfloat16 --deepspeed zero2", False),  # ZeRO keeps fp32 masters
    ("--tuner_type lora_llm --torch_dtype bfloat16", True),      # the ViT and aligner stay bf16
    ("--tuner_type lora_llm --torch_dtype float16", False),      # swift casts fp16 trainables up
    ("--tuner_type lora --torch_dtype bfloat16", False),         # LoRA weights are fp32 (PEFT)
    ("--tuner_type lora --torch_dtype bfloat16 --modules_to_save model.visual.merger", True),
])
def test_fully_trained_parameters_in_half_precision_are_said(body, reported):
    """swift's tuners (TunerMixin.prepare_model) against the Plan's fp32 master weights: the
    same rule that sends such Plans to the swift target's plugin."""
    got = imp(f"    {body}\n")
    assert got.ok, [p.render() for p in got.problems]
    assert ("full-params-dtype" in codes(got)) == reported, codes(got)
    if reported:
        e = effect(got, "full-params-dtype")
        assert e.where.line == 4 and "fp32" in e.message and "plugin" in e.fix
        # the swift target, given the imported spec, does not reuse swift's flags for it
        files = render(got.plan, "swift")
        assert "swift_plugin.py" in files or "plugin" in files["train.sh"]


# -- flag names: ms-swift stops on an option its parser does not define ------------------------------
@pytest.mark.parametrize("body,where,message,hint", [
    ("--tuner_type full --freeze_vitt false", "1:77", "--freeze_vitt: ms-swift 4.x has no such option and stops "
     "on it (ValueError: remaining_argv)", "did you mean --freeze_vit?"),
    ("--lora_ranks 64", "1:59", "--lora_ranks: ms-swift 4.x has no such option", "did you mean --lora_rank?"),
    ("--sft_type full", "1:59", "--sft_type: this is the ms-swift 2.x name of --tuner_type (--train_type in 3.x)",
     "write --tuner_type (ms-swift 4.x) or --train_type (3.x)"),
    ("--model_id_or_path Qwen/Qwen2.5-7B", "1:59", "--model_id_or_path: this is the ms-swift 2.x name of --model",
     "write --model"),
    ("--tuner_type full --train_type full", "1:77", "--train_type: this is the ms-swift 3.x name of --tuner_type",
     "keep --tuner_type (ms-swift 4.x), or only --train_type (3.x)"),
    ("--train_type full --freeze-vitt false", "1:77", "--freeze-vitt: ms-swift 3.x has no such option",
     "did you mean --freeze_vit?"),
    ("--lora_ 4", "1:59", "--lora_: an ambiguous abbreviation of --lora_alpha, --lora_bias", "write the option"),
    ("--no_freeze_vit false", "1:75", "--no_freeze_vit: takes no value", "or --freeze_vit false"),
])
def test_an_option_swift_does_not_define_is_a_located_error(body, where, message, hint):
    got = read("swift", f"swift sft --model {QWEN} --dataset d {body}\n", "t.sh")
    assert not got.ok and got.plan is None
    text = got.problems[0].render()
    assert text.startswith(f"t.sh:{where}: error: {message}"), text
    assert hint in text


def test_every_unknown_flag_is_reported_at_once():
    got = read("swift", f"swift sft --model {QWEN} --sft_type full\\\n  --freeze_vitt false --lora_ranks 8\n", "t.sh")
    assert [(p.location.line, p.location.col, p.path) for p in got.problems] == [
        (1, 47, "--sft_type"), (2, 3, "--freeze_vitt"), (2, 23, "--lora_ranks")]


def test_what_argparse_reads_for_prefixes_no_flags_and_ignore_args_error():
    # a unique prefix is the option it begins (allow_abbrev), said as an effect
    got = read("swift", "swift sft --model Qwen/Qwen2.5-7B-Instruct --lora_r 16 --dataset d\n", "t.sh")
    assert got.plan.components[0].lora.rank == 16
    assert "argparse reads it as the only one it begins: --lora_rank" in effect(got, "flag-abbreviated").message
    # --no_freeze_vit is store_false of --freeze_vit (default true): the ViT trains
    got = read("swift", f"swift sft --model {QWEN} --tuner_type full --no_freeze_vit --dataset d\n", "t.sh")
    assert comp(got.plan, "vision").mode == "full"
    # --ignore_args_error true: swift warns and goes on without the option
    got = read("swift", f"swift sft --model {QWEN} --tuner_type full --freeze_vitt false --ignore_args_error true "
               "--dataset d\n", "t.sh")
    assert got.ok and "vision" not in {c.name for c in got.plan.components}
    assert "goes on without it" in effect(got, "flag-ignored").message


@pytest.mark.parametrize("text,message", [
    ("megatron sft --model Qwen/Qwen2.5-7B-Instruct --tuner_type full\n",
     "t.sh:1:1: error: this is `megatron sft`: Megatron-SWIFT trains with Megatron-Core"),
    ("export X=1\nswift export --model Qwen/Qwen2.5-7B-Instruct --adapters out\n",
     "t.sh:2:1: error: this is `swift export`, which trains nothing"),
    ("swift rlhf --rlhf_type rm --model Qwen/Qwen2.5-7B-Instruct --dataset d\n",
     "t.sh:1:12: error: --rlhf_type: --rlhf_type rm trains a new value head"),
    ("swift sft --model Qwen/Qwen2.5-7B-Instruct --rpo_alpha 0.1 --dataset d\n",  # a `swift rlhf` option
     "t.sh:1:44: error: --rpo_alpha: ms-swift 4.x has no such option and stops on it (ValueError: "
     "remaining_argv)\n  hint: --rpo_alpha is a `swift rlhf` option"),
    ("swift rlhf --model Qwen/Qwen2.5-7B-Instruct --num_generation 4 --dataset d\n",
     "t.sh:1:45: error: --num_generation: an ambiguous abbreviation of --num_generations, --num_generations_eval"),
])
def test_other_swift_commands_say_what_was_seen(text, message):
    got = read("swift", text, "t.sh")
    assert not got.ok and got.problems[0].render().startswith(message), got.problems[0].render()


def test_swift_rlhf_imports_the_trainable_set():
    """RLHFArguments extends SftArguments: same tuner/freeze/LR flags, so the same Plan as swift sft;
    the rlhf-only options (--beta, --rpo_alpha) are accepted; grpo's own default accumulation 1."""
    flags = f"--model {QWEN} --tuner_type full --freeze_vit false --vit_lr 2e-6 --learning_rate 1e-5 --dataset d"
    sft = read("swift", f"swift sft {flags}\n", "t.sh")
    for kind, ref in (("dpo", True), ("grpo", True), ("orpo", False)):
        got = read("swift", f"swift rlhf --rlhf_type {kind} --beta 0.1 {flags}\n", "t.sh")
        assert got.ok, [p.render() for p in got.problems]
        assert got.plan.trainable_lrs() == sft.plan.trainable_lrs()
        e = effect(got, "rlhf")
        assert f"the {kind} loss" in e.message and ("frozen reference copy" in e.message) == ref
        assert got.spec["training"]["gradient_accumulation"] == (1 if kind == "grpo" else 16)


# -- values the shell computes ---------------------------------------------------------------------------
EXPR_SH = """\
nproc_per_node=2
CUDA_VISIBLE_DEVICES=0,1 \\
NPROC_PER_NODE=$nproc_per_node \\
swift sft --model Qwen/Qwen2.5-7B-Instruct --dataset d --per_device_train_batch_size 2 \\
    --gradient_accumulation_steps $(expr 16 / $nproc_per_node) \\
    --save_steps "$(( (100 + 4) * nproc_per_node ))" \\
    --learning_rate 1e-4
"""


def test_integer_arithmetic_the_script_fixes_is_evaluated():
    """ms-swift's examples compute accumulation with $(expr 16 / $nproc_per_node): integer
    arithmetic over the script's own variables is exact (checked against bash itself)."""
    import shutil
    import subprocess

    got = read("swift", EXPR_SH, "t.sh")
    assert got.ok, [p.render() for p in got.problems]
    assert (got.spec["training"]["gradient_accumulation"], got.spec["training"]["save_steps"]) == (8, 208)
    assert str(got.origins["training.gradient_accumulation"]) == "t.sh:5:5 --gradient_accumulation_steps"
    if shutil.which("bash"):
        echo = EXPR_SH.replace("swift sft", "echo").replace("CUDA_VISIBLE_DEVICES=0,1 \\\n", "")
        words = subprocess.run(["bash", "-c", echo], capture_output=True, text=True).stdout.split()
        assert words[words.index("--gradient_accumulation_steps") + 1] == "8"
        assert words[words.index("--save_steps") + 1] == "208"


def test_a_value_mixspec_cannot_compute_is_unknown_where_it_changes_no_training():
    text = EXPR_SH.replace("$(expr 16 / $nproc_per_node)", "$(expr 16 / $(nproc))")
    got = read("swift", text, "t.sh")
    assert got.ok, [p.render() for p in got.problems]
    # swift's own default stands in, said as unknown
    assert got.spec["training"]["gradient_accumulation"] == 4
    assert str(got.origins["training.gradient_accumulation"]).startswith(
        "t.sh:5:35 --gradient_accumulation_steps: unknown ($(expr 16 / $(nproc))), default used")
    u = {u.key: u.note for u in got.unmodelled}["--gradient_accumulation_steps $(expr 16 / $(nproc))"]
    assert u.startswith("unknown:") and "not what trains, the LRs or the memory per GPU" in u
    # an LR computed by the shell changes the training: a located error
    bad = read("swift", text.replace("--learning_rate 1e-4", "--learning_rate $(cat lr.txt)"), "t.sh")
    assert bad.problems[0].render().startswith(
        "t.sh:7:21: error: --learning_rate: its value '$(cat lr.txt)' depends on $(cat lr.txt), a command "
        "mixspec does not run")


# -- a DeepSpeed JSON: read where swift finds it; not here: listed, planned without ZeRO --------------
def test_deepspeed_json_is_read_or_listed_the_same_way_as_llamafactory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    script = tmp_path / "train.sh"
    for name, want in (("ds.json", {"zero_stage": 3, "offload": "optimizer"}), ("missing.json", {})):
        text = f"swift sft --model Qwen/Qwen2.5-7B-Instruct --dataset d --deepspeed {name}\n"
        got = read("swift", text, str(script))
        assert got.ok, [p.render() for p in got.problems]
        assert {k: v for k, v in got.spec["distributed"].items() if k in ("zero_stage", "offload")} == want
        lf_got = read("llamafactory", f"model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nstage: sft\ndo_train: true\n"
                      f"dataset: d\nbf16: true\ndeepspeed: {name}\n", str(tmp_path / "train.yaml"))
        assert lf_got.ok, [p.render() for p in lf_got.problems]
        assert {k: v for k, v in lf_got.spec.get("distributed", {}).items() if k in ("zero_stage", "offload")} == want
        if not want:
            notes = [u.note for u in got.unmodelled if "missing.json" in u.key]
            lf_notes = [u.note for u in lf_got.unmodelled if u.key == "deepspeed"]
            assert notes == lf_notes and "memory plan is without ZeRO sharding" in notes[0]


@pytest.mark.parametrize("head,flag,want", [
    ("MAX_PIXELS=602112 \\\n", "", 602112),
    ("", "--max_pixels 401408", 401408),  # every multimodal template rescales to it
    ("MAX_PIXELS=602112 \\\n", "--max_pixels 1003520", 602112),  # the smaller cap holds
    ("MAX_PIXELS=1003520 \\\n", "--max_pixels 602112", 602112),
])
def test_image_cap_from_the_env_and_the_flag(head, flag, want):
    got = imp(f"    --tuner_type lora {flag}\n", head=head)
    assert got.ok and got.spec["data"]["max_pixels"] == want


def test_every_dataset_and_the_pixel_limits_are_imported_and_compile_back():
    """--dataset a b (swift mixes them) becomes data.train [a, b]; MAX_PIXELS / MIN_PIXELS become
    data.max_pixels / min_pixels, and the compiled train.sh passes all of them to swift again."""
    text = ("MAX_PIXELS=200704 MIN_PIXELS=3136 swift sft \\\n    --model Qwen/Qwen2.5-VL-7B-Instruct \\\n"
            "    --dataset a.jsonl b.jsonl \\\n    --tuner_type lora --learning_rate 1e-4\n")
    got = read("swift", text, "train.sh")
    assert got.ok, [p.render() for p in got.problems]
    assert got.spec["data"]["train"] == ["a.jsonl", "b.jsonl"]
    assert (got.spec["data"]["max_pixels"], got.spec["data"]["min_pixels"]) == (200704, 3136)
    from mixspec.targets import render

    sh = render(got.plan, "swift", TargetOptions())["train.sh"]
    assert "--dataset a.jsonl b.jsonl" in sh
    assert "export MAX_PIXELS=200704" in sh and "export MIN_PIXELS=3136" in sh
