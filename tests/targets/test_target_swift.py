"""The ms-swift target: which flags each Plan gets (and why the plugin where they cannot be
exact), quoting, launcher environment, DeepSpeed configs, swift 3.x output, refusals,
golden files and determinism. The generated plugin is run here against real PEFT and
transformers on a tiny model; runs with the real ms-swift are in tests/e2e/test_swift_e2e.py.

Golden files: tests/targets/swift/<case>/; rewrite them with MIXSPEC_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, goldens
from mixspec import programs
from mixspec.errors import APPROXIMATE_HINT, UnsupportedError
from mixspec.language.loader import load_spec
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, available_targets, render
from mixspec.targets import swift as swift_target

GOLDEN = ROOT / "tests" / "targets" / "swift"
SPECS = ROOT / "tests" / "targets" / "specs" / "swift"
UPDATE = os.environ.get("MIXSPEC_UPDATE_GOLDEN") == "1"

SEED = """\
version: 1
model: Qwen/Qwen2.5-VL-7B-Instruct
components:
  vision: {train: full, lr: 2.0e-6}
  aligner: {train: full, lr: 1.0e-5}
  language:
    train: lora
    lr: 1.0e-4
    lora: {rank: 16, alpha: 32, dropout: 0, targets: all-linear}
data: {train: data/train.jsonl}
output_dir: runs/x
training: {precision: fp32}
"""


def plan_of(path):
    return plan_spec(load_spec(Path(path)))


def compile_text(tmp_path, text: str, name: str = "spec.yaml", **options) -> dict[str, str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return render(plan_of(path), "swift", TargetOptions(**options))


def decide_text(tmp_path, text: str, **options) -> swift_target.Decision:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return swift_target.decide(plan_of(path), TargetOptions(**options))


def flags_of(train_sh: str) -> dict[str, str]:
    """--flag value pairs of the swift sft command, as the shell splits it (the last one wins,
    as in argparse); the command ends where a comment (the block's end marker) begins."""
    command = train_sh[train_sh.index("swift sft \\\n"):].replace("\\\n", " ")
    words = shlex.split(command, comments=True)[2:]
    out = {}
    for flag, value in zip(words[::2], words[1::2]):
        assert flag.startswith("--"), (flag, value)
        out[flag[2:]] = value
    return out


# -- the target is registered ---------------------------------------------------------------------
def test_swift_is_an_available_target():
    assert available_targets()["swift"] is swift_target.SwiftTarget


# -- lora_llm only when the Plan is exactly what it does -------------------------------------------
def test_seed_case_with_dropout_0_is_lora_llm(tmp_path):
    files = compile_text(tmp_path, SEED)
    assert sorted(files) == ["train.sh"]
    flags = flags_of(files["train.sh"])
    assert flags["tuner_type"] == "lora_llm"
    assert (flags["lora_rank"], flags["lora_alpha"]) == ("16", "32")
    assert (flags["learning_rate"], flags["vit_lr"], flags["aligner_lr"]) == ("0.0001", "2e-06", "1e-05")
    # an explicit --optimizer would switch vit_lr/aligner_lr off
    assert "optimizer" not in flags and "external_plugins" not in files["train.sh"]
    assert "train_type" not in flags


# each variant breaks exactly one thing lora_llm needs; the reason code names it
LORA_LLM_BREAKERS = [
    ("dropout", SEED.replace("dropout: 0,", "dropout: 0.05,"), "lora_llm-dropout"),
    ("rslora", SEED.replace("targets: all-linear}", "targets: all-linear, rslora: true}"), "lora_llm-rslora"),
    ("dora", SEED.replace("targets: all-linear}", "targets: all-linear, dora: true}"), "lora_llm-dora"),
    ("target-list", SEED.replace("targets: all-linear", "targets: [q_proj, v_proj]"), "lora_llm-targets"),
    ("layers", SEED.replace("targets: all-linear}", 'targets: all-linear, layers: "0-13"}'), "lora_llm-layers"),
    ("lm_head-full", SEED.replace("data:", "  lm_head: {train: full, lr: 1.0e-5}\ndata:"),
     "lora_llm-full-outside-vit"),
    ("embeddings-full", SEED.replace("data:", "  embeddings: {train: full, lr: 1.0e-5}\ndata:"),
     "lora_llm-full-outside-vit"),
    ("vision-frozen", SEED.replace("vision: {train: full, lr: 2.0e-6}", "vision: {train: freeze}"),
     "lora_llm-vit-not-full"),
    ("early-vit-frozen", SEED.replace(
        "data:", "  early_vit:\n    modules: ['model\\.visual\\.blocks\\.[0-3]']\n    train: freeze\ndata:"),
     "lora_llm-vit-not-full"),
    ("early-llm-frozen", SEED.replace(
        "data:", "  early_llm:\n    modules: ['model\\.language_model\\.layers\\.[0-3]']\n    train: freeze\ndata:"),
     "lora_llm-llm-not-lora"),
    ("vit-two-lrs", SEED.replace(
        "data:", "  late_vit:\n    modules: ['model\\.visual\\.blocks\\.3[01]']\n    train: full\n    lr: 5.0e-6\ndata:"),
     "lr-within-group"),
    ("weight-decay", SEED.replace("aligner: {train: full, lr: 1.0e-5}",
                                  "aligner: {train: full, lr: 1.0e-5, weight_decay: 0.1}"), "weight-decay"),
]


@pytest.mark.parametrize("text,code", [(t, c) for _, t, c in LORA_LLM_BREAKERS],
                         ids=[i for i, _, _ in LORA_LLM_BREAKERS])
def test_anything_lora_llm_does_not_do_goes_to_the_plugin(tmp_path, text, code):
    d = decide_text(tmp_path, text)
    assert d.tuner == "plugin"
    assert code in [r.code for r in d.plugin_reasons]
    files = compile_text(tmp_path, text)
    assert sorted(files) == ["mixspec_plugin.py", "train.sh"]
    flags = flags_of(files["train.sh"])
    assert flags["tuner_type"] == "mixspec" and flags["optimizer"] == "mixspec"
    assert '--external_plugins "$HERE/mixspec_plugin.py"' in files["train.sh"]
    assert "vit_lr" not in flags and "aligner_lr" not in flags


def test_each_reason_is_located_at_its_component(tmp_path):
    d = decide_text(tmp_path, LORA_LLM_BREAKERS[0][1])
    (reason,) = d.plugin_reasons
    assert (reason.origin.line, reason.origin.col) == (6, 3)  # components.language
    assert reason.what == "components.language.lora.dropout 0.05"


def test_swift3_has_no_lora_llm(tmp_path):
    d = decide_text(tmp_path, SEED, swift_version=3)
    assert [r.code for r in d.plugin_reasons] == ["swift3-no-lora_llm"]
    files = compile_text(tmp_path, SEED, swift_version=3)
    sh, plugin = files["train.sh"], files["mixspec_plugin.py"]
    assert flags_of(sh)["train_type"] == "mixspec" and "--tuner_type" not in sh
    # the plugin registers through swift.plugin (3.x), not swift.tuner_plugin (4.x): the
    # registration tests below load it against stubs of each
    assert "\nSWIFT_VERSION = 3\n" in plugin and "\nSWIFT_VERSION = 4\n" not in plugin


def test_swift3_flags_use_train_type(tmp_path):
    sh = compile_text(tmp_path, SEED.replace("vision: {train: full, lr: 2.0e-6}", "vision: {train: freeze}")
                      .replace("aligner: {train: full, lr: 1.0e-5}", "aligner: {train: freeze}"),
                      swift_version=3)["train.sh"]
    flags = flags_of(sh)
    assert flags["train_type"] == "lora" and "tuner_type" not in flags
    assert "ms-swift 3.x" in sh


# -- --vit_lr/--aligner_lr and what the multimodal optimizer cannot do --------------------------------
FULL3 = """\
version: 1
model: Qwen/Qwen2.5-VL-7B-Instruct
components:
  vision: {train: full, lr: 1.0e-6}
  aligner: {train: full, lr: 1.0e-5}
  language: {train: full, lr: 5.0e-6}
  lm_head: {train: full, lr: LMHEAD_LR}
data: {train: data/train.jsonl}
training: {precision: fp32}
"""


def test_one_lr_per_swift_group_uses_vit_lr_and_aligner_lr(tmp_path):
    files = compile_text(tmp_path, FULL3.replace("LMHEAD_LR", "5.0e-6"))
    flags = flags_of(files["train.sh"])
    assert (flags["learning_rate"], flags["vit_lr"], flags["aligner_lr"]) == ("5e-06", "1e-06", "1e-05")
    assert flags["tuner_type"] == "full" and "optimizer" not in flags


def test_two_lrs_inside_the_llm_group_need_the_plugin(tmp_path):
    # swift's qwen2_vl arch puts lm_head in the LLM group: one --learning_rate for both
    d = decide_text(tmp_path, FULL3.replace("LMHEAD_LR", "1.0e-5"))
    assert d.tuner == "full" and d.lr_mode == "plugin"
    (reason,) = d.plugin_reasons
    assert reason.code == "lr-within-group" and reason.what == "components.lm_head.lr 1e-05"
    flags = flags_of(compile_text(tmp_path, FULL3.replace("LMHEAD_LR", "1.0e-5"))["train.sh"])
    # swift's own full tuner stays (its flags are exact); only the optimizer is the plugin's
    assert flags["tuner_type"] == "full" and flags["optimizer"] == "mixspec"


def test_a_parameter_outside_swifts_groups_needs_the_plugin(tmp_path, monkeypatch):
    # idefics3-like arch: the LLM prefix does not cover lm_head, so the multimodal optimizer of
    # ms-swift < 4.6 leaves it out; with a single LR the default optimizer covers everything
    narrow = swift_target.SwiftModel("qwen2_5_vl", "qwen2_5_vl", ("model.language_model",),
                                     ("model.visual",), ("model.visual.merger",),
                                     proven=swift_target.SWIFT_MODELS["qwen2_5_vl"].proven)
    monkeypatch.setitem(swift_target.SWIFT_MODELS, "qwen2_5_vl", narrow)
    d = decide_text(tmp_path, FULL3.replace("LMHEAD_LR", "5.0e-6"))
    assert [r.code for r in d.plugin_reasons] == ["lr-outside-groups"]
    assert "lm_head.weight" in d.plugin_reasons[0].what
    one_lr = FULL3.replace("1.0e-6", "5.0e-6").replace("1.0e-5", "5.0e-6").replace("LMHEAD_LR", "5.0e-6")
    flags = flags_of(compile_text(tmp_path, one_lr)["train.sh"])
    assert flags["learning_rate"] == "5e-06" and "vit_lr" not in flags and "optimizer" not in flags


def test_text_model_with_two_lrs_needs_the_plugin(tmp_path):
    text = textwrap.dedent("""\
        version: 1
        model: Qwen/Qwen2.5-7B-Instruct
        components:
          language: {train: full, lr: 1.0e-5}
          lm_head: {train: full, lr: 2.0e-5}
        data: {train: data/train.jsonl}
        training: {precision: fp32}
        """)
    d = decide_text(tmp_path, text)
    assert [r.code for r in d.plugin_reasons] == ["lr-text-model"]


# -- full training: the freeze flags, simulated as swift applies them --------------------------------------
def _swift_full_trainable(flags: dict[str, str], names: list[str], sw: swift_target.SwiftModel) -> set[str]:
    """swift 4.x full tuner: TunerArguments._init_multimodal_full, then freeze_parameters(ratio,
    prefixes, regex) and activate_parameters(prefixes, regex) (plain startswith, re.search)."""
    freeze, trainable = [], []
    if flags.get("freeze_llm", "false") == "true":
        freeze += sw.language_model
    if flags.get("freeze_vit", "true") == "true":
        freeze += sw.vision_tower
    if flags.get("freeze_aligner", "true") == "true":
        freeze += sw.aligner
    else:
        trainable += sw.aligner
    grad = {n: True for n in names}
    if float(flags.get("freeze_parameters_ratio", "0")) >= 1:
        grad = {n: False for n in names}
    for n in names:
        if any(n.startswith(p) for p in freeze):
            grad[n] = False
    rx = flags.get("trainable_parameters_regex")
    for n in names:
        if any(n.startswith(p) for p in trainable) or (rx and re.search(rx, n)):
            grad[n] = True
    return {n for n, g in grad.items() if g}


@pytest.mark.parametrize("spec", ["examples/llava15-projector-only.yaml", "tests/targets/specs/swift/full-three-lrs.yaml",
                                  "tests/targets/specs/swift/late-vit-blocks.yaml"])
def test_full_training_flags_train_exactly_the_plan(spec, monkeypatch):
    # swift's freeze rules simulated on any family's names, proven end to end there or not
    plan = plan_of(ROOT / spec)
    # in fp32: in bf16 the full tuner would train in bf16 and the Plan goes to the plugin
    plan = dataclasses.replace(plan, training=dataclasses.replace(plan.training, precision="fp32"))
    sw = swift_target.SWIFT_MODELS[plan.model_type]
    monkeypatch.setitem(swift_target.SWIFT_MODELS, plan.model_type,
                        dataclasses.replace(sw, proven=frozenset(swift_target.FLAG_PATHS)))
    flags = flags_of(render(plan, "swift")["train.sh"])
    names = sorted({p for c in plan.components for p in c.params} | set(plan.unassigned_params))
    got = _swift_full_trainable(flags, names, swift_target.SWIFT_MODELS[plan.model_type])
    assert got == set(plan.trainable_lrs())


def test_lora_target_regex_matches_exactly_the_planned_modules():
    plan = plan_of(SPECS / "lora-vision-language.yaml")
    flags = flags_of(render(plan, "swift")["train.sh"])
    names = {p for c in plan.components for p in c.params} | set(plan.unassigned_params)
    modules = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    rx = re.compile(flags["target_regex"])
    planned = {t for c in plan.components if c.lora for t in c.lora.targets}
    assert {m for m in modules if rx.fullmatch(m)} == planned  # PEFT full-matches a str target
    assert (flags["vit_lr"], flags["learning_rate"]) == ("2e-05", "0.0002")


def test_anchored_regex_is_exact_over_the_universe():
    names = ["a.0.x", "a.1.x", "a.1.y"]
    universe = names + ["a.0.y", "a.2.x", "a.0.x.z"]
    rx = swift_target.anchored_regex(names, universe)
    assert {n for n in universe if re.fullmatch(rx, n)} == set(names)
    rx = swift_target.anchored_regex(["a.0"], universe, suffix=r"(?:\..+)?")
    assert {n for n in universe if re.fullmatch(rx, n)} == {"a.0.x", "a.0.y", "a.0.x.z"}


def test_plugin_expand_names_inverts_compact_names(tmp_path, monkeypatch):
    from mixspec.targets._common import compact_names

    plan = plan_of(ROOT / "examples/design-example.yaml")
    path = tmp_path / "mixspec_plugin.py"
    path.write_text(render(plan, "swift")["mixspec_plugin.py"], encoding="utf-8")
    _stub_swift(monkeypatch, 4)
    plugin = _load_plugin(path)
    assert plugin.plan_lrs() == plan.trainable_lrs()
    odd = ["x.0.y.3", "x.0.y.4", "x.1.y.3", "a{b}.1", "plain", "m.10", "m.2"]
    assert sorted(plugin.expand_names(compact_names(odd))) == sorted(odd)


# -- quoting and the launcher environment -------------------------------------------------------------
FAKE_SWIFT = """\
#!{python}
import json, os, sys
keys = ["NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MAX_PIXELS", "MIN_PIXELS"]
with open(os.environ["FAKE_SWIFT_OUT"], "w") as fh:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}, fh)
"""


def run_train_sh(tmp_path, files, *args, env=None):
    """Write the files, run train.sh with a fake `swift` that records argv and env."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "swift"
    fake.write_text(FAKE_SWIFT.format(python=sys.executable), encoding="utf-8")
    fake.chmod(0o755)
    record = tmp_path / "record.json"
    full_env = {"PATH": f"{bindir}:/usr/bin:/bin", "FAKE_SWIFT_OUT": str(record), **(env or {})}
    proc = subprocess.run(["bash", str(out / "train.sh"), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=60)
    data = json.loads(record.read_text()) if proc.returncode == 0 else None
    return proc, data


def test_every_value_reaches_swift_as_one_literal_word(tmp_path):
    nasty_data = "data/it's $(touch pwned) `touch pwned2` \"q\" ;rm -rf x; ${HOME}.jsonl"
    nasty_out = "runs/a b'c\\d"
    text = SEED.replace("data/train.jsonl", json.dumps(nasty_data)).replace("runs/x", json.dumps(nasty_out))
    files = compile_text(tmp_path, text)
    proc, data = run_train_sh(tmp_path, files, "--max_steps", "3")
    assert proc.returncode == 0, proc.stderr
    argv = data["argv"]
    assert argv[0] == "sft"
    assert argv[argv.index("--dataset") + 1] == nasty_data
    assert argv[argv.index("--output_dir") + 1] == nasty_out
    assert argv[-2:] == ["--max_steps", "3"]  # extra arguments come last
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    # every generated value is one shell word
    for line in files["train.sh"].splitlines():
        if line.startswith("    --"):
            assert len(shlex.split(line.rstrip(" \\"))) == 2, line


_PATH_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_PATH_TEXT, out=_PATH_TEXT)
def test_any_path_reaches_swift_as_itself(tmp_path, data, out):
    """Whatever a spec's paths hold, the shell hands swift exactly that text, one word each,
    and comments never end early (every non-comment line is the command)."""
    text = SEED.replace("data/train.jsonl", json.dumps(data)).replace("runs/x", json.dumps(out))
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        plan = plan_of(path)
    except Exception as exc:  # a located spec error (e.g. a value the loader refuses) is fine
        from mixspec.errors import MixspecError

        assert isinstance(exc, MixspecError)
        return
    sh = render(plan, "swift")["train.sh"]
    flags = flags_of(sh)
    assert flags["dataset"] == data and flags["output_dir"] == out
    body = [line for line in sh.splitlines() if line and not line.startswith("#")]
    # the image cap the memory plan assumes (a vision model with data): one export, an integer
    assert f"export MAX_PIXELS={plan.data.max_pixels}" in body
    start = body.index("swift sft \\")
    assert body[0] == "set -euo pipefail"
    # the model-code check as the package program has it (its MODEL line the compiled model), nothing else
    check = programs.block_text(programs.program_text("swift_train"), "model_code_check")
    exports = [line for line in body[1:start] if line.startswith("export ")]
    assert exports == ([f"export MAX_PIXELS={plan.data.max_pixels}"] if "vision" in plan.roles else [])
    assert body[1 + len(exports):start] == [f"MODEL={shlex.quote(plan.model)}" if line.startswith("MODEL=") else line
                                            for line in check.splitlines() if line and not line.startswith("#")]
    assert all(line.startswith("    --") or line == '    "$@"' for line in body[start + 1:])


def test_plugin_path_is_passed_relative_to_the_script(tmp_path):
    files = compile_text(tmp_path, SEED.replace("dropout: 0,", "dropout: 0.05,"))
    proc, data = run_train_sh(tmp_path, files)
    assert proc.returncode == 0, proc.stderr
    argv = data["argv"]
    assert argv[argv.index("--external_plugins") + 1] == str(tmp_path / "out" / "mixspec_plugin.py")


MULTINODE = SEED.replace("output_dir: runs/x", "output_dir: runs/x\ndistributed: {nodes: 3, gpus_per_node: 8}")


def test_multi_node_env_lines(tmp_path):
    files = compile_text(tmp_path, MULTINODE)
    assert "export NNODES=3" in files["train.sh"]
    proc, data = run_train_sh(tmp_path, files, env={"NODE_RANK": "2", "MASTER_ADDR": "node0.example"})
    assert proc.returncode == 0, proc.stderr
    launcher = {k: v for k, v in data["env"].items() if not k.endswith("_PIXELS")}  # the image cap: its own test
    assert launcher == {"NPROC_PER_NODE": "8", "NNODES": "3", "NODE_RANK": "2",
                        "MASTER_ADDR": "node0.example", "MASTER_PORT": "29500"}


def test_multi_node_needs_node_rank_and_master_addr(tmp_path):
    files = compile_text(tmp_path, MULTINODE)
    proc, _ = run_train_sh(tmp_path, files, env={"MASTER_ADDR": "node0"})
    assert proc.returncode != 0 and "set NODE_RANK to the rank of this node, 0 to 2" in proc.stderr
    proc, _ = run_train_sh(tmp_path, files, env={"NODE_RANK": "0"})
    assert proc.returncode != 0 and "set MASTER_ADDR" in proc.stderr


def test_single_gpu_sets_no_launcher_env(tmp_path):
    proc, data = run_train_sh(tmp_path, compile_text(tmp_path, SEED))
    assert proc.returncode == 0, proc.stderr
    launcher = {k: v for k, v in data["env"].items() if not k.endswith("_PIXELS")}  # the image cap: its own test
    assert launcher == {k: None for k in launcher}


def test_one_node_many_gpus(tmp_path):
    text = SEED.replace("output_dir: runs/x", "output_dir: runs/x\ndistributed: {nodes: 1, gpus_per_node: 4}")
    sh = compile_text(tmp_path, text)["train.sh"]
    assert "export NPROC_PER_NODE=4" in sh and "NNODES" not in sh


# -- DeepSpeed ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,offload,expected", [
    (None, "none", None), (0, "none", "zero0"), (1, "none", "zero1"), (2, "none", "zero2"),
    (3, "none", "zero3"), (2, "optimizer", "zero2_offload"), (3, "all", "zero3_offload"),
    (1, "optimizer", "deepspeed.json"), (3, "optimizer", "deepspeed.json"),
])
def test_deepspeed_builtin_names_or_a_generated_json(tmp_path, stage, offload, expected):
    dist = "{nodes: 1, gpus_per_node: 2" + ("" if stage is None else f", zero_stage: {stage}") + f", offload: {offload}}}"
    if stage is None:
        dist = "{nodes: 1, gpus_per_node: 2}"
    files = compile_text(tmp_path, SEED + f"distributed: {dist}\n")
    sh = files["train.sh"]
    if expected is None:
        assert "--deepspeed" not in sh and "deepspeed.json" not in files
    elif expected == "deepspeed.json":
        assert '--deepspeed "$HERE/deepspeed.json"' in sh
        cfg = json.loads(files["deepspeed.json"])
        zero = cfg["zero_optimization"]
        assert zero["stage"] == stage and zero["offload_optimizer"]["device"] == "cpu"
        assert "offload_param" not in zero
        # an optimizer block would replace the optimizer and its per-component groups
        assert "optimizer" not in cfg and "scheduler" not in cfg
    else:
        assert flags_of(sh)["deepspeed"] == expected and "deepspeed.json" not in files


# -- training settings set explicitly (swift's defaults differ from the spec's) ----------------------------
def test_training_flags_are_explicit(tmp_path):
    flags = flags_of(compile_text(tmp_path, SEED.replace("precision: fp32", "precision: bf16"))["train.sh"])
    # swift: weight_decay 0.1, adam_beta2 0.95, fp16 on for float32, split_dataset_ratio 0.01 on 3.x
    assert flags["weight_decay"] == "0" and flags["adam_beta2"] == "0.999"
    assert (flags["torch_dtype"], flags["bf16"], flags["fp16"]) == ("bfloat16", "true", "false")
    assert flags["split_dataset_ratio"] == "0" and flags["add_version"] == "false"
    # ViT gradient checkpointing: its default differs between swift versions
    assert flags["vit_gradient_checkpointing"] == "true"
    assert (flags["model"], flags["use_hf"], flags["model_type"], flags["template"]) == (
        "Qwen/Qwen2.5-VL-7B-Instruct", "true", "qwen2_5_vl", "qwen2_5_vl")
    fp32 = flags_of(compile_text(tmp_path, SEED.replace("{precision: fp32}", "{precision: fp32, gradient_checkpointing: false}"))["train.sh"])
    assert (fp32["torch_dtype"], fp32["bf16"], fp32["fp16"]) == ("float32", "false", "false")
    assert fp32["vit_gradient_checkpointing"] == "false"


def test_local_model_dir_gets_model_type_and_template(tmp_path):
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config("qwen2_5_vl"), tmp_path / "tiny")
    flags = flags_of(compile_text(tmp_path, SEED.replace("Qwen/Qwen2.5-VL-7B-Instruct", str(model)))["train.sh"])
    assert (flags["model"], flags["model_type"], flags["template"]) == (str(model), "qwen2_5_vl", "qwen2_5_vl")
    assert "use_hf" not in flags


def test_hf_native_internvl_local_dir_gets_swifts_internvl_type(tmp_path):
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config("internvl"), tmp_path / "tinyinternvl")
    text = SEED.replace("Qwen/Qwen2.5-VL-7B-Instruct", str(model))
    flags = flags_of(compile_text(tmp_path, text)["train.sh"])
    assert (flags["model"], flags["model_type"], flags["template"]) == (str(model), "internvl", "internvl_hf")


# -- families x paths: swift's flags only where a test has run them on the family -----------------------
def _families_with(path: str, proven: bool) -> list[str]:
    return sorted(k for k, v in swift_target.SWIFT_MODELS.items() if (path in v.proven) == proven)


def test_the_families_table_is_in_the_docs():
    page = (ROOT / "docs" / "targets.md").read_text(encoding="utf-8")
    assert swift_target.families_table() in page, "docs/targets.md's swift families table differs from SWIFT_MODELS"
    for sw in swift_target.SWIFT_MODELS.values():
        assert sw.proven <= set(swift_target.FLAG_PATHS), sw


@pytest.mark.parametrize("model_type", _families_with("lora_llm", proven=False))
def test_lora_llm_unproven_on_a_family_goes_to_the_plugin(tmp_path, model_type):
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config(model_type), tmp_path / model_type)
    text = SEED.replace("Qwen/Qwen2.5-VL-7B-Instruct", str(model))
    d = decide_text(tmp_path, text)
    assert d.plugin_reasons, model_type
    assert d.tuner == "plugin" and d.lr_mode == "plugin"
    files = compile_text(tmp_path, text)
    assert flags_of(files["train.sh"])["tuner_type"] == "mixspec" and "mixspec_plugin.py" in files
    with pytest.raises(UnsupportedError):
        compile_text(tmp_path, text, plugin=False)


def test_each_unproven_path_is_a_located_plugin_reason(tmp_path, monkeypatch):
    """With the path taken out of Qwen2.5-VL's proven set, the same Plans go to the plugin,
    each with a reason that names the path and the family; with --no-plugin they are refused."""
    cases = {
        "lora_llm": SEED,
        "full": FULL3.replace("LMHEAD_LR", "5.0e-6").replace("1.0e-6", "5.0e-6").replace("1.0e-5", "5.0e-6"),
        "lora": SEED.replace("vision: {train: full, lr: 2.0e-6}", "vision: {train: freeze}")
                    .replace("aligner: {train: full, lr: 1.0e-5}", "aligner: {train: freeze}"),
        "multimodal_lr": FULL3.replace("LMHEAD_LR", "5.0e-6"),
    }
    sw = swift_target.SWIFT_MODELS["qwen2_5_vl"]
    for path, text in cases.items():
        assert not decide_text(tmp_path, text).plugin, path  # proven: swift's flags
        monkeypatch.setitem(swift_target.SWIFT_MODELS, "qwen2_5_vl",
                            dataclasses.replace(sw, proven=sw.proven - {path}))
        d = decide_text(tmp_path, text)
        (reason,) = d.plugin_reasons
        assert reason.code == f"unproven-{path}", path
        assert reason.what == f"{swift_target.FLAG_PATHS[path]} on model_type 'qwen2_5_vl'"
        assert reason.origin.file == str(tmp_path / "spec.yaml")
        assert d.lr_mode == "plugin"
        assert d.tuner == ("full" if path == "multimodal_lr" else "plugin"), path
        with pytest.raises(UnsupportedError, match=f"unproven|{re.escape(swift_target.FLAG_PATHS[path])}"):
            compile_text(tmp_path, text, plugin=False)
        with pytest.raises(UnsupportedError):  # not an approximation: swift may not run it at all
            compile_text(tmp_path, text, plugin=False, approximate=True)
        monkeypatch.setitem(swift_target.SWIFT_MODELS, "qwen2_5_vl", sw)


# -- trust model: swift runs a model dir's code unasked, so train.sh looks for code first -------------
def _run_train_sh(tmp_path, files, *args):
    """train.sh with a fake `swift` that records that it ran."""
    out = tmp_path / "compiled"
    out.mkdir(exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "swift").write_text('#!/usr/bin/env bash\necho "fake swift ran" > "$SWIFT_RAN"\n', encoding="utf-8")
    (fake / "swift").chmod(0o755)
    ran = tmp_path / "swift-ran"
    ran.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SWIFT_RAN": str(ran)}
    proc = subprocess.run(["bash", str(out / "train.sh"), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)
    return proc, ran.exists()


def test_train_sh_refuses_a_model_dir_with_code(tmp_path):
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config("qwen2_5_vl"), tmp_path / "tiny")
    files = compile_text(tmp_path, SEED.replace("Qwen/Qwen2.5-VL-7B-Instruct", str(model)))
    proc, ran = _run_train_sh(tmp_path, files)
    assert proc.returncode == 0 and ran, proc.stderr  # no code: swift starts

    (model / "modeling_evil.py").write_text("import os\n", encoding="utf-8")
    proc, ran = _run_train_sh(tmp_path, files)
    assert proc.returncode == 1 and not ran
    assert f"mixspec: the model directory {model} holds code that ms-swift would run" in proc.stderr
    assert str(model / "modeling_evil.py") in proc.stderr
    (model / "modeling_evil.py").unlink()

    # auto_map in any JSON config (tokenizer, processor) points transformers at code, maybe in another repo
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["org/repo--tok.T", None]}}),
                                                 encoding="utf-8")
    proc, ran = _run_train_sh(tmp_path, files)
    assert proc.returncode == 1 and not ran and str(model / "tokenizer_config.json") in proc.stderr
    (model / "tokenizer_config.json").unlink()

    # a --model given to train.sh is the one swift loads (the last wins): that one is checked
    other = write_config_dir(tiny_config("qwen2_5_vl"), tmp_path / "other")
    (other / "sub").mkdir()
    (other / "sub" / "helper.py").write_text("\n", encoding="utf-8")
    for args in (["--model", str(other)], [f"--model={other}"], ["--model", str(model), "--model", str(other)]):
        proc, ran = _run_train_sh(tmp_path, files, *args)
        assert proc.returncode == 1 and not ran and str(other / "sub" / "helper.py") in proc.stderr, args
    proc, ran = _run_train_sh(tmp_path, files, "--model", str(other), "--model", str(model))
    assert proc.returncode == 0 and ran, proc.stderr


def test_train_sh_skips_the_code_check_when_the_spec_allows_remote_code(tmp_path):
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config("qwen2_5_vl"), tmp_path / "tiny")
    (model / "modeling_x.py").write_text("\n", encoding="utf-8")
    files = compile_text(tmp_path, SEED.replace("Qwen/Qwen2.5-VL-7B-Instruct", str(model))
                         + "trust_remote_code: true\n")
    assert "trust_remote_code: true), and ms-swift" in files["train.sh"]
    proc, ran = _run_train_sh(tmp_path, files)
    assert proc.returncode == 0 and ran, proc.stderr


def test_local_text_model_without_a_known_swift_type_is_refused(tmp_path):
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config("qwen2"), tmp_path / "tinytext")
    text = f"version: 1\nmodel: {model}\ncomponents:\n  language: {{train: full, lr: 1.0e-5}}\n"
    with pytest.raises(UnsupportedError) as err:
        compile_text(tmp_path, text)
    assert "needs --model_type and --template for a local directory" in str(err.value)
    assert f"{tmp_path / 'spec.yaml'}: error: target swift cannot express" in str(err.value)


# -- --no-plugin ----------------------------------------------------------------------------------------
def test_no_plugin_refuses_naming_each_part(tmp_path):
    text = SEED.replace("dropout: 0,", "dropout: 0.05,").replace(
        "data:", "  lm_head: {train: full, lr: 1.0e-4}\ndata:")
    with pytest.raises(UnsupportedError) as err:
        compile_text(tmp_path, text, plugin=False)
    spec = tmp_path / "spec.yaml"
    assert [i.code for i in err.value.items] == ["lora_llm-dropout", "lora_llm-full-outside-vit"]
    assert str(err.value) == (
        f"{spec}:6:3: error: target swift cannot express components.language.lora.dropout 0.05: "
        "lora_llm ignores --lora_dropout (PEFT's default 0 is used)\n"
        f"  hint: {swift_target._PLUGIN_HINT}; or set dropout: 0 to use --tuner_type lora_llm; "
        f"{APPROXIMATE_HINT}\n"  # that part is approximable (lora_llm runs without the dropout)
        f"{spec}:10:3: error: target swift cannot express components.lm_head (full) on lm_head.weight: "
        "next to LoRA, swift's flags train full parts only with lora_llm, which trains fully only the ViT "
        "and the aligner\n"
        f"  hint: {swift_target._PLUGIN_HINT}")


def test_a_spec_without_data_is_refused(tmp_path):
    with pytest.raises(UnsupportedError) as err:
        compile_text(tmp_path, SEED.replace("data: {train: data/train.jsonl}\n", ""))
    assert [i.code for i in err.value.items] == ["no-data"]
    assert "swift sft needs a training dataset (--dataset)" in str(err.value)


def test_no_plugin_cli_exits_1_and_writes_nothing(run_cli, tmp_path):
    result = run_cli("compile", "examples/qwen25vl-7b-mixed.yaml", "--target", "swift", "--no-plugin",
                     "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "examples/qwen25vl-7b-mixed.yaml:20:3: error: target swift cannot express" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_no_plugin_flags_plan_compiles(run_cli, tmp_path):
    result = run_cli("compile", "tests/targets/specs/swift/lora-llm.yaml", "--target", "swift", "--no-plugin",
                     "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.sh"]
    assert os.access(tmp_path / "out" / "train.sh", os.X_OK)


def test_approximate_no_plugin_writes_each_deviation(tmp_path):
    text = SEED.replace("dropout: 0,", "dropout: 0.05,")
    sh = compile_text(tmp_path, text, plugin=False, approximate=True)["train.sh"]
    assert flags_of(sh)["tuner_type"] == "lora_llm"
    assert "# APPROXIMATION (--approximate --no-plugin)" in sh
    assert "components.language.lora.dropout 0.05: lora_llm ignores --lora_dropout" in sh
    # what cannot be approximated is still refused
    with pytest.raises(UnsupportedError):
        compile_text(tmp_path, text.replace("data:", "  lm_head: {train: full, lr: 1.0e-5}\ndata:"),
                     plugin=False, approximate=True)


# -- golden files and determinism ----------------------------------------------------------------------
def _cases():
    cases = []
    for spec in sorted((ROOT / "examples").glob("*.yaml")) + sorted(SPECS.glob("*.yaml")):
        rel = spec.relative_to(ROOT).as_posix()
        cases.append((spec.stem, rel, {}))
        cases.append((spec.stem + "--no-plugin", rel, {"plugin": False}))
    cases.append(("lora-llm--swift3", "tests/targets/specs/swift/lora-llm.yaml", {"swift_version": 3}))
    cases.append(("qwen25vl-7b-mixed--swift3", "examples/qwen25vl-7b-mixed.yaml", {"swift_version": 3}))
    return cases


def _render_case(rel: str, options: dict) -> dict[str, str]:
    plan = plan_of(Path(rel))
    try:
        return render(plan, "swift", TargetOptions(**options))
    except UnsupportedError as exc:
        return {"refusal.txt": str(exc) + "\n"}


@pytest.mark.parametrize("case,rel,options", _cases(), ids=[c[0] for c in _cases()])
def test_golden(monkeypatch, case, rel, options):
    monkeypatch.chdir(ROOT)
    files = goldens.golden_form(_render_case(rel, options))  # a plugin: its generated blocks
    folder = GOLDEN / case
    if options.get("plugin") is False and "refusal.txt" not in files:
        # a Plan the flags say exactly: --no-plugin gives the same files, nothing to keep twice
        assert files == goldens.golden_form(_render_case(rel, {k: v for k, v in options.items() if k != "plugin"}))
        assert not folder.exists()
        return
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
    expected = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())} if folder.exists() else {}
    assert files == expected, (f"golden files of {case} differ: {goldens.drift_hint()} "
                               "(MIXSPEC_UPDATE_GOLDEN=1 rewrites the swift goldens)")


def test_golden_folders_all_belong_to_a_case():
    known = {c[0] for c in _cases()}
    assert {p.name for p in GOLDEN.iterdir() if p.is_dir()} <= known


def test_output_is_deterministic(monkeypatch):
    monkeypatch.chdir(ROOT)
    first = _render_case("examples/design-example.yaml", {})
    second = _render_case("examples/design-example.yaml", {})
    assert first == second
    # set order inside the Plan does not leak: a fresh process gives the same bytes
    code = ("import sys; sys.path[:0] = ['tests', 'tests/targets']; from test_target_swift import _render_case; "
            "import json; print(json.dumps(_render_case('examples/design-example.yaml', {})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == first


def test_generated_files_parse():
    for case, rel, options in _cases():
        files = _render_case(rel, options)
        if "train.sh" in files:
            proc = subprocess.run(["bash", "-n"], input=files["train.sh"], capture_output=True, text=True)
            assert proc.returncode == 0, (case, proc.stderr)
        if "mixspec_plugin.py" in files:
            compile(files["mixspec_plugin.py"], f"{case}/mixspec_plugin.py", "exec")


# -- the generated plugin, run against real PEFT and transformers (swift stubbed) ------------------------
def _stub_swift(monkeypatch, version: int):
    """Just the registries the plugin imports from ms-swift."""
    if version >= 4:
        optimizers = types.ModuleType("swift.optimizers")

        class OptimizerCallback:
            def __init__(self, args, trainer):
                self.args, self.trainer = args, trainer

        optimizers.OptimizerCallback = OptimizerCallback
        optimizers.optimizers_map = {}
        tuner_plugin = types.ModuleType("swift.tuner_plugin")
        tuner_plugin.Tuner = type("Tuner", (), {})
        tuner_plugin.tuners_map = {}
        mods = {"swift": types.ModuleType("swift"), "swift.optimizers": optimizers,
                "swift.tuner_plugin": tuner_plugin}
    else:
        plugin = types.ModuleType("swift.plugin")
        plugin.Tuner = type("Tuner", (), {})
        plugin.extra_tuners = {}
        plugin.optimizers_map = {}
        mods = {"swift": types.ModuleType("swift"), "swift.plugin": plugin}
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return mods


def _load_plugin(path: Path):
    spec = importlib.util.spec_from_file_location(f"mixspec_plugin_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_PLUGIN_SPEC = """\
version: 1
model: MODEL
components:
  vision: {train: full, lr: 2.0e-5}
  aligner: {train: full, lr: 1.0e-4, weight_decay: 0.01}
  language:
    train: lora
    lr: 1.0e-3
    lora: {rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}
  lm_head: {train: full, lr: 3.0e-5}
data: {train: data/train.jsonl}
output_dir: OUT
"""


def plan_owner(plan, name: str) -> str:
    return next(c.name for c in plan.components if name in c.trainable_names)


@pytest.fixture
def tiny_plugin(tmp_path):
    from tinymodels import tiny_config, write_config_dir

    cfg = tiny_config("qwen2_5_vl")
    model_dir = write_config_dir(cfg, tmp_path / "tiny")
    text = TINY_PLUGIN_SPEC.replace("MODEL", str(model_dir)).replace("OUT", str(tmp_path / "run"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(text, encoding="utf-8")
    plan = plan_of(spec)
    return cfg, plan, tmp_path


@pytest.mark.parametrize("version", [4, 3])
def test_plugin_trains_exactly_the_plan_with_real_peft(tiny_plugin, monkeypatch, version):
    import torch
    from transformers import TrainingArguments

    from tinymodels import build_model

    cfg, plan, tmp_path = tiny_plugin
    files = render(plan, "swift", TargetOptions(swift_version=version))
    (tmp_path / "mixspec_plugin.py").write_text(files["mixspec_plugin.py"], encoding="utf-8")
    mods = _stub_swift(monkeypatch, version)
    plugin = _load_plugin(tmp_path / "mixspec_plugin.py")
    if version >= 4:
        assert mods["swift.tuner_plugin"].tuners_map["mixspec"] is plugin.MixspecTuner
        assert mods["swift.optimizers"].optimizers_map["mixspec"] is plugin.MixspecOptimizer
    else:
        assert mods["swift.plugin"].extra_tuners["mixspec"] is plugin.MixspecTuner
        assert mods["swift.plugin"].optimizers_map["mixspec"] is plugin.create_mixspec_optimizer

    model = plugin.MixspecTuner.prepare_model(None, build_model(cfg))
    trainable = {plugin.plain_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(plan.trainable_lrs())
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 8.0, 0.05)

    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=1e-3, optim="adamw_torch",
                             report_to=[], weight_decay=0.0)
    if version >= 4:
        from transformers.trainer_callback import CallbackHandler

        handler = CallbackHandler([], model, None, None, None)
        trainer = types.SimpleNamespace(model=model, callback_handler=handler, add_callback=handler.add_callback)
        optimizer = plugin.MixspecOptimizer(args, trainer).create_optimizer()
        plugin.MixspecOptimizer(args, trainer).create_optimizer()
        # the check after (FSDP2) preparation: registered once; on a model FSDP did not shard, nothing to do
        assert [type(c).__name__ for c in handler.callbacks] == ["_CheckAfterPreparation"]
        assert plugin.fsdp_report(model) is None
        plugin.check_after_preparation(model, optimizer)  # no --fsdp, no shards: nothing to check
        with pytest.raises(plugin.PlanMismatch, match="given --fsdp but accelerate did not shard"):
            plugin.check_after_preparation(model, optimizer, fsdp=True)  # never DDP in FSDP2's place
    else:
        optimizer, scheduler = plugin.create_mixspec_optimizer(args, model, None)
        assert scheduler is None
    names = {id(p): plugin.plain_name(n) for n, p in model.named_parameters()}
    got = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert {n: lr for n, (lr, _) in got.items()} == plan.trainable_lrs()
    # weight decay: the component's, except for biases, norm modules and other 1-D parameters
    # (the Plan's rule), judged here from the real modules of the wrapped model
    wd = {c.name: c.weight_decay for c in plan.components}
    for full_name, param in model.named_parameters():
        name = plugin.plain_name(full_name)
        if name not in got:
            continue
        owner = model.get_submodule(full_name.rsplit(".", 1)[0])
        exempt = isinstance(owner, torch.nn.LayerNorm) or type(owner).__name__.endswith("Norm") or param.ndim < 2
        assert got[name][1] == (0.0 if exempt else wd[plan_owner(plan, name)]), name
    assert got["model.visual.merger.mlp.0.weight"][1] == 0.01
    assert got["model.visual.merger.mlp.0.bias"][1] == 0.0
    assert got["model.visual.merger.ln_q.weight"][1] == 0.0  # an RMSNorm transformers' rule decays
    report = json.loads((tmp_path / "run" / "mixspec_check.json").read_text())
    assert report["fingerprint"] == report["optimizer_fingerprint"] == plan.optimizer_fingerprint()
    assert report["plan_fingerprint"] == plan.fingerprint()
    assert report["weight_decay_by_param"] == plan.trainable_weight_decays()

    # a checkpoint: the adapter plus the fully trained parameters, under their model names
    from safetensors.torch import load_file

    plugin.MixspecTuner.save_pretrained(model, str(tmp_path / "ckpt"))
    full = load_file(str(tmp_path / "ckpt" / "full_params.safetensors"))
    assert set(full) == {n for c in plan.components if c.mode == "full" for n in c.params}
    adapter = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert len(adapter) == len(plan.component("language").lora.param_names)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    reloaded = plugin.MixspecTuner.from_pretrained(build_model(cfg), str(tmp_path / "ckpt"), is_trainable=True)
    params = dict(reloaded.named_parameters())
    key = "base_model.model.model.visual.merger.mlp.0.weight"
    assert torch.equal(params[key], full["model.visual.merger.mlp.0.weight"])


def test_plugin_stops_with_a_diff_when_the_model_differs(tiny_plugin, monkeypatch):
    from tinymodels import build_model

    cfg, plan, tmp_path = tiny_plugin
    (tmp_path / "mixspec_plugin.py").write_text(render(plan, "swift")["mixspec_plugin.py"], encoding="utf-8")
    _stub_swift(monkeypatch, 4)
    plugin = _load_plugin(tmp_path / "mixspec_plugin.py")
    # a model whose code names the merger differently from the tree the Plan was made on
    plugin.COMPONENTS[1]["params"] = {"model.visual.merger_v2.mlp.{}.weight": "0,2"}
    with pytest.raises(plugin.PlanMismatch) as err:
        plugin.MixspecTuner.prepare_model(None, build_model(cfg))
    text = str(err.value)
    assert "planned but not trainable (2):" in text and "model.visual.merger_v2.mlp.0.weight" in text
    assert "fingerprint" in text and "recompile" in text


def test_plugin_optimizer_checks_lrs(tiny_plugin, monkeypatch):
    from transformers import TrainingArguments

    from tinymodels import build_model

    cfg, plan, tmp_path = tiny_plugin
    (tmp_path / "mixspec_plugin.py").write_text(render(plan, "swift")["mixspec_plugin.py"], encoding="utf-8")
    _stub_swift(monkeypatch, 4)
    plugin = _load_plugin(tmp_path / "mixspec_plugin.py")
    model = plugin.MixspecTuner.prepare_model(None, build_model(cfg))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), optim="adamw_torch", report_to=[])
    optimizer = plugin.build_optimizer(args, model)
    optimizer.param_groups[0]["lr"] = 0.5  # as if something (e.g. a DeepSpeed optimizer block) replaced it
    with pytest.raises(plugin.PlanMismatch) as err:
        plugin.check_optimizer(optimizer, model)
    assert "lm_head.weight: lr 0.5, planned 3e-05" in str(err.value)




# -- precision: the Plan holds trained parameters in fp32 (master weights), frozen ones in the
# training dtype; swift's flags load everything in --torch_dtype (measured: tests/e2e/test_parity.py)
def _in(text: str, precision: str) -> str:
    assert "precision: fp32" in text
    return text.replace("precision: fp32", f"precision: {precision}")


FULL_ONE_LR_PER_GROUP = FULL3.replace("LMHEAD_LR", "5.0e-6")
LORA_ONLY = SEED.replace("vision: {train: full, lr: 2.0e-6}", "vision: {train: freeze}").replace(
    "aligner: {train: full, lr: 1.0e-5}", "aligner: {train: freeze}")


@pytest.mark.parametrize("precision,tuner", [("fp32", "lora_llm"), ("fp16", "lora_llm"), ("bf16", "plugin")])
def test_lora_llm_only_where_swift_trains_the_full_parts_in_fp32(tmp_path, precision, tuner):
    # lora_llm is an adapter tuner: swift casts its fp16 trainable parameters to fp32, bf16 ones not
    d = decide_text(tmp_path, _in(SEED, precision))
    assert d.tuner == tuner
    files = compile_text(tmp_path, _in(SEED, precision))
    if tuner == "plugin":
        assert [(r.code, r.what, r.approximable) for r in d.plugin_reasons] == [
            ("full-params-dtype", "components.vision trained fully in fp32", True),
            ("full-params-dtype", "components.aligner trained fully in fp32", True)]
        assert flags_of(files["train.sh"])["tuner_type"] == "mixspec"
        assert "TRAINED_DTYPE = 'float32'" in files["mixspec_plugin.py"]
    else:
        assert d.plugin_reasons == [] and sorted(files) == ["train.sh"]
        assert flags_of(files["train.sh"])["tuner_type"] == "lora_llm"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_full_tuner_in_half_precision_goes_to_the_plugin(tmp_path, precision):
    assert decide_text(tmp_path, FULL_ONE_LR_PER_GROUP).tuner == "full"  # fp32: swift's own flags
    d = decide_text(tmp_path, _in(FULL_ONE_LR_PER_GROUP, precision))
    assert (d.tuner, d.lr_mode) == ("plugin", "plugin")
    assert [r.what for r in d.plugin_reasons] == [f"components.{c} trained fully in fp32"
                                                  for c in ("vision", "aligner", "language", "lm_head")]
    why = d.plugin_reasons[0].why
    dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert why.startswith(f"--tuner_type full loads the model with --torch_dtype {dtype} and trains full "
                          f"parameters in {precision} (the full tuner casts nothing), where the Plan holds them "
                          f"in fp32 (master weights; frozen ones in {precision})")
    flags = flags_of(compile_text(tmp_path, _in(FULL_ONE_LR_PER_GROUP, precision))["train.sh"])
    assert (flags["tuner_type"], flags["optimizer"], flags["torch_dtype"]) == ("mixspec", "mixspec", dtype)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_lora_only_stays_on_swifts_flags_in_any_precision(tmp_path, precision):
    # no full parameter; PEFT keeps the adapters in fp32 (autocast_adapter_dtype)
    d = decide_text(tmp_path, _in(LORA_ONLY, precision))
    assert (d.tuner, d.plugin_reasons) == ("lora", [])


def test_no_plugin_refuses_half_precision_full_parts_once_naming_the_dtypes(tmp_path):
    text = _in(SEED, "bf16")
    with pytest.raises(UnsupportedError) as err:
        compile_text(tmp_path, text, plugin=False)
    spec = tmp_path / "spec.yaml"
    message = str(err.value)
    assert [i.code for i in err.value.items] == ["full-params-dtype", "full-params-dtype"]
    assert message.count("error: target swift cannot express") == 1  # one cause, its two parts listed
    assert f"{spec}:4:3" in message and f"{spec}:5:3" in message  # components.vision, components.aligner
    assert ("--tuner_type lora_llm loads the model with --torch_dtype bfloat16 and trains full parameters in "
            "bf16 (swift casts only fp16 trainable parameters up), where the Plan holds them in fp32") in message
    assert "or set training.precision: fp32 or fp16" in message and APPROXIMATE_HINT in message
    # --approximate lifts it: lora_llm's flags, the deviation written as a comment
    sh = compile_text(tmp_path, text, plugin=False, approximate=True)["train.sh"]
    assert flags_of(sh)["tuner_type"] == "lora_llm" and flags_of(sh)["torch_dtype"] == "bfloat16"
    assert "# APPROXIMATION (--approximate --no-plugin)" in sh
    assert "components.vision trained fully in fp32: --tuner_type lora_llm loads the model" in sh


def test_approximate_full_path_keeps_its_lr_flags_and_other_reasons(tmp_path, monkeypatch):
    sh = compile_text(tmp_path, _in(FULL_ONE_LR_PER_GROUP, "bf16"), plugin=False, approximate=True)["train.sh"]
    flags = flags_of(sh)
    assert (flags["tuner_type"], flags["vit_lr"], flags["aligner_lr"]) == ("full", "1e-06", "1e-05")
    # next to an approximable LR reason: both written, the approximated LR flags kept
    two_lrs = _in(FULL3.replace("LMHEAD_LR", "1.0e-5"), "bf16")
    d = decide_text(tmp_path, two_lrs)
    assert [r.code for r in d.plugin_reasons] == ["lr-within-group"] + ["full-params-dtype"] * 4
    sh = compile_text(tmp_path, two_lrs, plugin=False, approximate=True)["train.sh"]
    assert flags_of(sh)["tuner_type"] == "full" and "components.lm_head.lr 1e-05" in sh
    # next to a reason no flags approximate (a path not run on the family): still refused
    sw = swift_target.SWIFT_MODELS["qwen2_5_vl"]
    monkeypatch.setitem(swift_target.SWIFT_MODELS, "qwen2_5_vl",
                        dataclasses.replace(sw, proven=sw.proven - {"multimodal_lr"}))
    with pytest.raises(UnsupportedError):
        compile_text(tmp_path, _in(FULL_ONE_LR_PER_GROUP, "bf16"), plugin=False, approximate=True)


def test_data_lists_and_pixel_limits_reach_swift(tmp_path):
    """swift gets every file of data.train (--dataset a b: it mixes them) and data.max_pixels /
    min_pixels in its environment (MAX_PIXELS / MIN_PIXELS), or it uses its own 12,845,056."""
    text = SEED.replace("data: {train: data/train.jsonl}",
                        "data: {train: [data/a b.jsonl, data/b.jsonl], max_pixels: 200704, min_pixels: 3136}")
    assert text != SEED
    proc, data = run_train_sh(tmp_path, compile_text(tmp_path, text))
    assert proc.returncode == 0, proc.stderr
    argv = data["argv"]
    at = argv.index("--dataset")
    assert argv[at + 1:at + 3] == ["data/a b.jsonl", "data/b.jsonl"] and argv[at + 3].startswith("--")
    assert (data["env"]["MAX_PIXELS"], data["env"]["MIN_PIXELS"]) == ("200704", "3136")
