"""The plan/explain/tree commands as a user runs them: the seed case's exact numbers, text
output, explanations, role marks, byte-identical JSON, families outside the catalog given
as local config.json dirs, and models mixspec must refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import seed_spec
from tinymodels import build_model, default_config, tiny_config, write_config_dir

SEED_SPEC = seed_spec(more="""\
training: {precision: bf16}
distributed: {nodes: 1, gpus_per_node: 8, zero_stage: 2}
""")

PATTERN_SPEC = SEED_SPEC.replace("training:", r"""  late_vit_blocks:
    modules: ['model\.visual\.blocks\.(2[4-9]|3[01])']
    train: full
    lr: 5.0e-6
training:""")


@pytest.fixture
def write_spec(tmp_path):
    def write(text, name="spec.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return str(path)

    return write


@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "220")


def plan_json(run_cli, spec_path):
    result = run_cli("plan", spec_path, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_seed_case_plan_json(run_cli, write_spec):
    data = plan_json(run_cli, write_spec(SEED_SPEC))
    assert data["totals"]["base_params"] == 8_292_166_656
    assert data["totals"]["added_params"] == 40_370_176
    assert data["totals"]["trainable_params"] == 716_920_320
    comps = {c["name"]: c for c in data["components"]}
    assert [c["name"] for c in data["components"]] == ["vision", "aligner", "language"]
    assert (comps["vision"]["mode"], comps["vision"]["lr"]) == ("full", 2.0e-6)
    assert comps["vision"]["base_params"] == comps["vision"]["trainable_params"] == 631_975_680
    assert (comps["aligner"]["mode"], comps["aligner"]["lr"]) == ("full", 1.0e-5)
    assert comps["aligner"]["base_params"] == comps["aligner"]["trainable_params"] == 44_574_464
    lang = comps["language"]
    assert (lang["mode"], lang["lr"]) == ("lora", 1.0e-4)
    assert lang["trainable_params"] == lang["lora"]["added_params"] == 40_370_176
    targets = lang["lora"]["target_modules"]
    assert len(targets) == 7 * 28
    assert "model.language_model.layers.27.mlp.down_proj" in targets
    assert all(t.startswith("model.language_model.layers.") for t in targets)
    assert data["unassigned"]["base_params"] == 2 * 152064 * 3584
    assert data["unassigned"]["modules"] == ["lm_head", "model.language_model.embed_tokens"]
    assert data["estimate"]["per_gpu_bytes"]["activations"] > 0


def test_plan_text(run_cli, write_spec, wide):
    result = run_cli("plan", write_spec(PATTERN_SPEC))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for row in ("vision", "aligner", "language", "late_vit_blocks", "unassigned"):
        assert f"│ {row} " in out
    assert "lora r16 a32 d0.05 (196 modules)" in out
    assert "157,617,600" in out  # the eight late blocks (8 x 19,702,200)
    assert "474,358,080" in out  # the vision role without them
    assert "base params 8,292,166,656" in out and "added (LoRA) 40,370,176" in out
    assert "trainable 716,920,320" in out
    assert "model states 16.69 GiB" in out and "peak" in out
    assert "8 GPUs, ZeRO-2" in out


def test_plan_json_is_byte_identical_across_processes(write_spec):
    """Same spec and tree: the same bytes, whatever the hash seed of the process."""
    path = write_spec(PATTERN_SPEC)
    outs = []
    for seed in ("0", "4242"):
        proc = subprocess.run([sys.executable, "-m", "mixspec", "plan", path, "--json"],
                              capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed},
                              timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()
        outs.append(proc.stdout)
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["totals"]["trainable_params"] == 716_920_320


def test_explain(run_cli, write_spec, wide):
    path = write_spec(PATTERN_SPEC)
    pattern = run_cli("explain", path, "model.visual.blocks.30")
    assert pattern.exit_code == 0, pattern.stderr
    assert "19,702,200 params -> late_vit_blocks: by pattern" in pattern.stdout
    assert "components.late_vit_blocks.modules[0]" in pattern.stdout

    role = run_cli("explain", path, "model.visual.blocks.3.mlp")
    assert role.exit_code == 0
    assert "-> vision: by role 'vision' (module model.visual)" in role.stdout
    assert "model.visual.blocks.3.mlp.up_proj.weight" in role.stdout

    unassigned = run_cli("explain", path, "lm_head")
    assert unassigned.exit_code == 0
    assert "544,997,376 params -> unassigned: no pattern or role claims it (frozen)" in unassigned.stdout

    # a module split between several rules: one line per rule
    split = run_cli("explain", path, "model.visual")
    assert "-> vision: by role" in split.stdout and "-> late_vit_blocks: by pattern" in split.stdout
    assert "-> aligner: by role 'aligner' (module model.visual.merger)" in split.stdout

    unknown = run_cli("explain", path, "model.visual.blocks.3.mlpp")
    assert unknown.exit_code == 1
    assert "'model.visual.blocks.3.mlpp' is neither a module nor a parameter" in unknown.stderr
    assert "hint: did you mean model.visual.blocks.3.mlp" in unknown.stderr
    assert "Traceback" not in unknown.stderr + unknown.stdout


def test_tree_marks_roles(run_cli, wide):
    result = run_cli("tree", "Qwen/Qwen2.5-VL-7B-Instruct", "--depth", "2")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Qwen2_5_VLForConditionalGeneration (qwen2_5_vl): 8,292,166,656 params"
    marked = {line.split()[0]: line.split()[-1] for line in lines[1:] if line.rstrip().endswith(">")}
    assert marked == {"visual": "<vision>", "language_model": "<language>", "lm_head": "<lm_head>"}
    assert not any(line.startswith("      ") for line in lines)  # nothing deeper than 2

    deeper = run_cli("tree", "Qwen/Qwen2.5-VL-7B-Instruct", "--depth", "3")
    assert "merger Qwen2_5_VLPatchMerger 44,574,464  <aligner>" in deeper.stdout
    assert "embed_tokens Embedding 544,997,376  <embeddings>" in deeper.stdout


# -- families outside the catalog, as a new user brings them -------------------------------

NEW_FAMILIES = ["idefics3", "mllama", "internvl", "llava_onevision", "smolvlm", "mistral3", "llava_next"]

ALL_ROLES_SPEC = """
version: 1
model: {model}
components:
  vision: {{train: full, lr: 2.0e-6}}
  aligner: {{train: full, lr: 1.0e-5}}
  language: {{train: lora, lr: 1.0e-4, lora: {{rank: 8, alpha: 16}}}}
  embeddings: {{train: freeze}}
  lm_head: {{train: freeze}}
"""


def check_partition(data):
    comps = {c["name"]: c for c in data["components"]}
    assert set(comps) == {"vision", "aligner", "language", "embeddings", "lm_head"}
    seen: set = set()
    for c in comps.values():
        names = set(c["param_names"])
        assert not names & seen, f"{c['name']} overlaps another component"
        seen |= names
    assert sum(c["base_params"] for c in comps.values()) + data["unassigned"]["base_params"] \
        == data["totals"]["base_params"]
    for role in ("vision", "aligner", "language"):
        assert comps[role]["base_params"] > 0, role
    assert not [w for w in data["warnings"] if w["path"] == "model"], data["warnings"]
    return comps


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_real_size_defaults(run_cli, write_spec, tmp_path, family):
    """transformers' default config of the family (real size), built on the meta device."""
    from mixspec.models.sources import catalog_ids, find_model

    assert all(find_model(m).model_type != family for m in catalog_ids())
    model_dir = write_config_dir(default_config(family), tmp_path / family)
    data = plan_json(run_cli, write_spec(ALL_ROLES_SPEC.format(model=model_dir)))
    assert data["model"]["source"] == "local" and data["model"]["model_type"] == family
    check_partition(data)
    assert data["unassigned"]["base_params"] == 0  # the five roles cover the whole model


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_tiny_counts_equal_the_model(run_cli, write_spec, tmp_path, family):
    cfg = tiny_config(family)
    model_dir = write_config_dir(cfg, tmp_path / family)
    data = plan_json(run_cli, write_spec(ALL_ROLES_SPEC.format(model=model_dir)))
    check_partition(data)
    model = build_model(cfg)
    assert data["totals"]["base_params"] == sum(p.numel() for p in model.parameters())
    numel = dict(model.named_parameters())
    for c in data["components"]:
        assert c["base_params"] == sum(numel[n].numel() for n in c["param_names"])


def test_unknown_model_type(run_cli, write_spec, tmp_path):
    model_dir = write_config_dir({"model_type": "frobnicator", "hidden_size": 8}, tmp_path / "frob")
    text = ALL_ROLES_SPEC.format(model=model_dir)
    result = run_cli("plan", write_spec(text))
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr + result.stdout
    err = result.stderr
    assert err.startswith(f"{tmp_path / 'spec.yaml'}:2:8: error: model: ")
    assert "does not know model_type 'frobnicator'" in err
    assert "hint: upgrade transformers" in err


def test_auto_map_is_refused_without_running_repo_code(run_cli, write_spec, tmp_path):
    marker = tmp_path / "imported.txt"
    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    for module in ("configuration_evil", "modeling_evil"):
        (model_dir / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'a').write({module!r})\n", encoding="utf-8")
    for model_type in ("evil", "llama"):  # unknown to transformers, and one it knows
        write_config_dir({"model_type": model_type, "auto_map": {
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}, model_dir)
        result = run_cli("plan", write_spec(f"version: 1\nmodel: {model_dir}\ncomponents:\n"
                                            "  language: {train: full, lr: 1.0e-5}\n"))
        assert result.exit_code == 1
        assert "Traceback" not in result.stderr + result.stdout
        assert "auto_map" in result.stderr and "trust_remote_code" in result.stderr
        assert ":2:8: error: model:" in result.stderr
        tree = run_cli("tree", str(model_dir))
        assert tree.exit_code == 1
        assert "auto_map" in tree.stderr and "--trust-remote-code" in tree.stderr
    assert not marker.exists()
    assert not any(m.startswith(("configuration_evil", "modeling_evil")) for m in sys.modules)
