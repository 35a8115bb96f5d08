"""`mixspec diff`: every kind of training change is reported (and its numbers agree with
each side's own `plan --json`), specs written differently that train the same give no
change and exit 0, a difference exits 3, errors exit 1, and `--git REV SPEC` reads the
spec's version at a revision of a real git repository."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest
from conftest import seed_spec

SEED = seed_spec(more="""\
training: {precision: bf16, max_length: 4096}
distributed: {nodes: 1, gpus_per_node: 8, zero_stage: 2}
""")

# the seed case, written differently: block style, other key order, defaults spelled out,
# the aligner by pattern instead of role, the ViT split in two components at the same LR,
# all-linear as the explicit list of the LLM's Linear leaves, layers naming every block,
# and a frozen component that claims what would be unassigned anyway
SEED_REWRITTEN = r"""
distributed:
  zero_stage: 2
  gpus_per_node: 8
  nodes: 1
  offload: none
version: 1
model: Qwen/Qwen2.5-VL-7B-Instruct
components:
  language:
    lr: 0.0001
    train: lora
    lora:
      alpha: 32.0
      rank: 16
      dropout: 0.05
      rslora: false
      targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
      layers: "0-27"
  projector:
    modules: ['model\.visual\.merger']
    train: full
    lr: 1.0e-5
  vision: {train: full, lr: 2.0e-6}
  late_vit:
    modules: ['model\.visual\.blocks\.(2[4-9]|3[01])']
    train: full
    lr: 2.0e-6
  lm_head: {train: freeze}
training:
  max_length: 4096
  precision: bf16
  epochs: 1
  gradient_checkpointing: true
  weight_decay: 0.0
"""


@pytest.fixture
def specs(tmp_path):
    def write(name, text):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return str(path)

    return write


def diff_json(run_cli, old, new):
    result = run_cli("diff", old, new, "--format", "json")
    assert result.exit_code in (0, 3), result.stderr + result.stdout
    data = json.loads(result.stdout)
    assert data["equal"] == (result.exit_code == 0)
    return data


def plan_json(run_cli, path):
    result = run_cli("plan", path, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def kinds(data) -> dict:
    out: dict = {}
    for c in data["changes"]:
        out.setdefault(c["kind"], []).append(c)
    return out


def test_same_spec_and_rewritten_spec_train_the_same(run_cli, specs):
    old = specs("old.yaml", SEED)
    new = specs("new.yaml", SEED_REWRITTEN)
    a, b = plan_json(run_cli, old), plan_json(run_cli, new)
    assert a["fingerprint"] == b["fingerprint"]  # the premise: the rewrite trains the same
    assert [c["name"] for c in a["components"]] != [c["name"] for c in b["components"]]
    for fmt in ("text", "markdown", "json"):
        result = run_cli("diff", old, new, "--format", fmt)
        assert result.exit_code == 0, result.stdout + result.stderr
    data = diff_json(run_cli, old, new)
    assert data["changes"] == []
    assert data["notes"] and "different components" in data["notes"][0]
    text = run_cli("diff", old, new).stdout
    assert "same training" in text and "change" not in text.split("note:")[0]
    assert run_cli("diff", old, old).exit_code == 0
    assert diff_json(run_cli, old, old)["notes"] == []


def test_lr_mode_lora_and_count_changes(run_cli, specs):
    old = specs("old.yaml", SEED)
    new = specs("new.yaml", SEED.replace("aligner: {train: full, lr: 1.0e-5}", "aligner: {train: full, lr: 3.0e-5}")
                .replace("vision: {train: full, lr: 2.0e-6}", "vision: {train: freeze}")
                .replace("rank: 16, alpha: 32, dropout: 0.05", "rank: 8, alpha: 32, dropout: 0.1"))
    data = diff_json(run_cli, old, new)
    k = kinds(data)
    assert {(c["subject"], c["old"], c["new"]) for c in k["lr"]} == {("aligner", 1e-5, 3e-5), ("vision", 2e-6, None)}
    assert [(c["subject"], c["old"], c["new"]) for c in k["mode"]] == [("vision", "full", "freeze")]
    assert {(c["subject"], c["old"], c["new"]) for c in k["lora"]} == {("language.rank", 16, 8),
                                                                       ("language.dropout", 0.05, 0.1)}
    a, b = plan_json(run_cli, old), plan_json(run_cli, new)
    per_a = {c["name"]: c["trainable_params"] for c in a["components"]}
    per_b = {c["name"]: c["trainable_params"] for c in b["components"]}
    assert {(c["subject"], c["old"], c["new"]) for c in k["trainable"]} == {
        (n, per_a[n], per_b[n]) for n in per_a if per_a[n] != per_b[n]}
    assert per_b["vision"] == 0 and per_b["language"] * 2 == per_a["language"]  # rank 16 -> 8 halves LoRA
    totals = {c["subject"]: (c["old"], c["new"]) for c in k["total"]}
    assert totals["trainable_params"] == (a["totals"]["trainable_params"], b["totals"]["trainable_params"])
    memory = {c["subject"]: (c["old"], c["new"]) for c in k["memory"]}
    for term in ("weights", "gradients", "optimizer_states", "total"):
        ea, eb = a["estimate"]["per_gpu_bytes"][term], b["estimate"]["per_gpu_bytes"][term]
        assert memory.get(term) == ((ea, eb) if ea != eb else None)
    assert "memory" in k and "moved" not in k and "component_added" not in k
    text = run_cli("diff", old, new).stdout
    assert "lr aligner: 1e-05 -> 3e-05" in text and "mode vision: full -> freeze" in text
    assert "LoRA language.rank: 16 -> 8 (-8)" in text and "memory per GPU, model states (weights + gradients + optimizer):" in text


def test_components_added_removed_and_modules_moved(run_cli, specs):
    old = specs("old.yaml", SEED)
    new = specs("new.yaml", SEED.replace("training:", r"""  late_vit:
    modules: ['model\.visual\.blocks\.(2[4-9]|3[01])']
    train: full
    lr: 5.0e-6
  lm_head: {train: full, lr: 1.0e-5}
training:""").replace("  aligner: {train: full, lr: 1.0e-5}\n", ""))
    data = diff_json(run_cli, old, new)
    k = kinds(data)
    assert sorted(c["subject"] for c in k["component_added"]) == ["late_vit", "lm_head"]
    added = {c["subject"]: c["new"] for c in k["component_added"]}
    assert added["late_vit"]["mode"] == "full" and added["late_vit"]["lr"] == 5e-6
    assert [c["subject"] for c in k["component_removed"]] == ["aligner"]
    moved = {c["subject"]: c["modules"] for c in k["moved"]}
    assert moved == {
        "aligner -> unassigned": ["model.visual.merger"],
        "unassigned -> lm_head": ["lm_head"],
        "vision -> late_vit": ["model.visual.blocks.{} [24-31]"],
    }
    b = plan_json(run_cli, new)
    vision_b = next(c for c in b["components"] if c["name"] == "vision")
    base = {c["subject"]: (c["old"], c["new"]) for c in k["base_params"]}
    assert base["vision"][1] == vision_b["base_params"]
    md = run_cli("diff", old, new, "--format", "markdown")
    assert md.exit_code == 3
    assert "#### Modules that moved" in md.stdout and "#### Components" in md.stdout
    assert "| component `late_vit` | - | added: full at lr 5e-06, trains " in md.stdout
    assert "| model.visual.blocks.{} [24-31] | `vision` | `late_vit` |" in md.stdout


def test_lora_targets_weight_decay_and_settings(run_cli, specs):
    old = specs("old.yaml", SEED)
    new = specs("new.yaml", SEED.replace("targets: all-linear", "targets: [q_proj, v_proj]")
                .replace("aligner: {train: full, lr: 1.0e-5}", "aligner: {train: full, lr: 1.0e-5, weight_decay: 0.1}")
                .replace("max_length: 4096", "max_length: 8192")
                .replace("gpus_per_node: 8", "gpus_per_node: 4"))
    k = kinds(diff_json(run_cli, old, new))
    targets = {c["subject"]: c for c in k["lora_targets"]}
    assert set(targets) == {"language -"}
    lost = targets["language -"]["modules"]
    assert lost == [f"model.language_model.layers.{{}}.{leaf} [0-27]"
                    for leaf in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj")]
    assert (targets["language -"]["old"], targets["language -"]["new"]) == (196, 56)  # 7 and 2 per block, 28 blocks
    assert [(c["subject"], c["old"], c["new"]) for c in k["weight_decay"]] == [("aligner", 0.0, 0.1)]
    settings = {c["subject"]: (c["old"], c["new"]) for c in k["setting"]}
    assert settings == {"training.max_length": (4096, 8192), "distributed.gpus_per_node": (8, 4)}
    layout = [c for c in k["memory"] if c["subject"] == "layout"]
    assert layout and "8 GPU(s)" in layout[0]["old"] and "4 GPU(s)" in layout[0]["new"]
    lora_keys = {c["subject"] for c in k["lora"]}
    assert lora_keys == {"language.targets_spec"}


def test_model_change(run_cli, specs):
    old = specs("old.yaml", SEED)
    new = specs("new.yaml", SEED.replace("Qwen2.5-VL-7B-Instruct", "Qwen2.5-VL-3B-Instruct"))
    k = kinds(diff_json(run_cli, old, new))
    subjects = {c["subject"]: (c["old"], c["new"]) for c in k["model"]}
    assert subjects["model"] == ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct")
    assert subjects["base_params"][0] == 8_292_166_656  # published count of Qwen2.5-VL-7B
    assert "moved" not in k


def test_errors_and_usage(run_cli, specs, tmp_path):
    old = specs("old.yaml", SEED)
    bad = specs("bad.yaml", SEED.replace("rank: 16", "rank: 0"))
    result = run_cli("diff", old, bad)
    assert result.exit_code == 1 and "bad.yaml:" in result.stderr and "rank" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert run_cli("diff", old, str(tmp_path / "missing.yaml")).exit_code == 1
    assert run_cli("diff", old).exit_code == 2
    assert run_cli("diff", old, old, "--git", "HEAD").exit_code == 2


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_revision(run_cli, tmp_path):
    repo = tmp_path / "repo"
    (repo / "specs").mkdir(parents=True)
    spec = repo / "specs" / "train.yaml"
    spec.write_text(textwrap.dedent(SEED).lstrip(), encoding="utf-8")

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                       env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "seed")
    assert run_cli("diff", "--git", "HEAD", str(spec)).exit_code == 0
    spec.write_text(textwrap.dedent(SEED).lstrip().replace("lr: 1.0e-5", "lr: 2.0e-5"), encoding="utf-8")
    result = run_cli("diff", "--git", "HEAD", str(spec), "--format", "json")
    assert result.exit_code == 3, result.stderr
    data = json.loads(result.stdout)
    assert data["old"]["spec"] == "HEAD:specs/train.yaml"
    assert [(c["kind"], c["subject"], c["old"], c["new"]) for c in data["changes"] if c["kind"] == "lr"] == [
        ("lr", "aligner", 1e-5, 2e-5)]
    missing = run_cli("diff", "--git", "HEAD~5", str(spec))
    assert missing.exit_code == 1 and "HEAD~5" in missing.stderr
    outside = tmp_path / "outside.yaml"
    outside.write_text(textwrap.dedent(SEED).lstrip(), encoding="utf-8")
    result = run_cli("diff", "--git", "HEAD", str(outside))
    assert result.exit_code == 1 and "git" in result.stderr
    # a broken spec at the revision is located at REV:path
    spec.write_text("version: 1\nmodel: Qwen/Qwen2.5-VL-7B-Instruct\ncomponents: {vision: {train: full, lr: 0}}\n",
                    encoding="utf-8")
    git("add", ".")
    git("commit", "-q", "-m", "broken")
    spec.write_text(textwrap.dedent(SEED).lstrip(), encoding="utf-8")
    result = run_cli("diff", "--git", "HEAD", str(spec))
    assert result.exit_code == 1 and "HEAD:specs/train.yaml:3:" in result.stderr, result.stderr


def test_only_order_or_an_overridden_default_differs(run_cli, specs):
    wd = SEED.replace("{train: full, lr: 2.0e-6}", "{train: full, lr: 2.0e-6, weight_decay: 0.1}") \
        .replace("{train: full, lr: 1.0e-5}", "{train: full, lr: 1.0e-5, weight_decay: 0.1}") \
        .replace("    lr: 1.0e-4\n", "    lr: 1.0e-4\n    weight_decay: 0.1\n")
    old = specs("old.yaml", wd.replace("training: {", "training: {weight_decay: 0.0, "))
    # every trained component sets its own weight decay: the default is never used
    new = specs("new.yaml", wd.replace("training: {", "training: {weight_decay: 0.5, "))
    data = diff_json(run_cli, old, new)
    assert data["changes"] == [] and data["notes"] == []
    # the same components in another order: no change, and nothing to note
    lines = SEED.splitlines()
    i = lines.index("  vision: {train: full, lr: 2.0e-6}")
    swapped = "\n".join(lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:])
    data = diff_json(run_cli, specs("a.yaml", SEED), specs("b.yaml", swapped))
    assert data["changes"] == [] and data["notes"] == []
    # but the default does count when a trained component uses it
    data = diff_json(run_cli, specs("c.yaml", SEED), specs("d.yaml", SEED.replace("training: {", "training: {weight_decay: 0.1, ")))
    assert {(c["kind"], c["subject"]) for c in data["changes"]} == {
        ("weight_decay", "vision"), ("weight_decay", "aligner"), ("weight_decay", "language")}


@pytest.mark.parametrize("edit, key, old_value, new_value", [
    ("alpha: 64", "alpha", 32.0, 64.0),
    ("rslora: true", "rslora", False, True),
    ("dora: true", "dora", False, True),
    ("layers: '0-13'", "layers", None, list(range(14))),
])
def test_each_lora_setting(run_cli, specs, edit, key, old_value, new_value):
    new_lora = "rank: 16, dropout: 0.05, targets: all-linear, " + (edit if key != "alpha" else "alpha: 64")
    if key != "alpha":
        new_lora += ", alpha: 32"
    old = specs("old.yaml", SEED)
    new = specs("new.yaml", SEED.replace("rank: 16, alpha: 32, dropout: 0.05, targets: all-linear", new_lora))
    k = kinds(diff_json(run_cli, old, new))
    assert [(c["subject"], c["old"], c["new"]) for c in k["lora"]] == [(f"language.{key}", old_value, new_value)]
    assert "moved" not in k and "component_added" not in k and "mode" not in k
    if key in ("dora", "layers"):  # these change what trains; alpha and rslora only the scaling
        assert [c["subject"] for c in k["trainable"]] == ["language"]
    else:
        assert "trainable" not in k and "memory" not in k
