"""`--json` of tree, models and explain: the same facts as the text, for scripts; checked
against transformers' own model (counts) and the Plan."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mixspec.cli import app

ROOT = Path(__file__).resolve().parents[2]
QWEN = "Qwen/Qwen2.5-VL-3B-Instruct"


def run(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_tree_json_counts_are_transformers_own():
    import torch
    import transformers

    data = json.loads(run("tree", QWEN, "--json"))
    config = transformers.AutoConfig.from_pretrained(ROOT / "compiler" / "models" / "catalog" / QWEN)
    with torch.device("meta"):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    modules = {m["name"]: m for m in data["modules"]}
    assert set(modules) == {n for n, _ in model.named_modules() if n}
    for name in ("model.visual", "model.visual.merger", "model.language_model.layers.3"):
        want = sum(p.numel() for p in model.get_submodule(name).parameters())
        assert modules[name]["params"] == want, name
    assert data["params"] == sum(p.numel() for p in model.parameters())
    assert modules["model.visual"]["role"] == "vision" and data["roles"]["aligner"] == ["model.visual.merger"]


def test_models_json_lists_the_catalog_with_sizes():
    entries = json.loads(run("models", "--json"))
    by_id = {e["id"]: e for e in entries}
    assert by_id[QWEN]["model_type"] == "qwen2_5_vl" and by_id[QWEN]["architecture"].startswith("Qwen2_5_VL")
    tree = json.loads(run("tree", QWEN, "--json"))
    assert by_id[QWEN]["params"] == tree["params"]
    text = run("models")
    assert any(line.startswith(QWEN) and "qwen2_5_vl" in line and "3.8 B" in line for line in text.splitlines())


def test_explain_json_names_component_and_rule():
    spec = ROOT / "examples" / "qwen25vl-7b-mixed.yaml"
    data = json.loads(run("explain", str(spec), "model.visual.merger", "--json"))
    params = data["parameters"]
    assert params and all(p["component"] == "aligner" and p["rule"] for p in params)
    assert all(p["tied_to"] is None for p in params)
    from mixspec.api import load_spec, plan_spec

    plan = plan_spec(load_spec(spec))
    aligner = plan.component("aligner")
    assert {p["name"] for p in params} == {n for n in aligner.params if n.startswith("model.visual.merger.")}


def test_shell_completion_completes_commands_and_options():
    """`mixspec --show-completion` prints a script; the installed console script answers the
    shell's completion requests (bash protocol) with commands and options."""
    import os
    import shutil
    import subprocess

    import pytest

    exe = shutil.which("mixspec")
    if exe is None:
        pytest.skip("the mixspec console script is not on PATH")
    script = subprocess.run([exe, "--show-completion", "bash"], capture_output=True, text=True, check=True).stdout
    assert "_mixspec_completion" in script

    def complete(words: str, cword: int) -> list[str]:
        env = dict(os.environ, _MIXSPEC_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(cword))
        return subprocess.run([exe], env=env, capture_output=True, text=True, check=True).stdout.split()

    assert complete("mixspec pl", 1) == ["plan"]
    assert "--target" in complete("mixspec compile spec.yaml --tar", 3)
