"""Bugs a newcomer hit on a fresh clone (issue 28), each reproduced first: errors that say
"error:", where and how to fix, whichever command or path they come from."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest


def _write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def test_tree_of_a_dir_without_config_json_is_an_error_with_a_hint(run_cli, tmp_path):
    result = run_cli("tree", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: model {str(tmp_path)!r}: no config.json in {tmp_path}\n  hint: ")
    assert "mixspec models" in result.stderr


@pytest.mark.parametrize("auto_map,said", [
    ({"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"},
     "the repo's code for auto_map 'configuration_my.MyConfig' could not be loaded"),
    ({"AutoModelForCausalLM": "modeling_my.MyModel"}, "config.json's auto_map names no AutoConfig"),
])
def test_remote_code_that_cannot_load_is_a_located_error_not_a_traceback(run_cli, tmp_path, auto_map, said):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "my", "auto_map": auto_map}), encoding="utf-8")
    spec = _write(tmp_path / "spec.yaml", f"""\
        version: 1
        model: {model}
        trust_remote_code: true
        components:
          language: {{train: lora, lr: 1.0e-4}}
        """)
    result = run_cli("--trust-remote-code", "plan", spec)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr and isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"{spec}:2:8: error: model: model {str(model)!r}: {said}"), result.stderr
    assert "\n  hint: " in result.stderr
    tree = run_cli("tree", str(model), "--trust-remote-code")
    assert tree.exit_code == 1
    assert tree.stderr.startswith(f"error: model {str(model)!r}: {said}") and "\n  hint: " in tree.stderr


@pytest.mark.parametrize("name,role", [("visual", "vision"), ("vit", "vision"), ("llm", "language"),
                                       ("mm_projector", "aligner"), ("projector", "aligner"),
                                       ("visoin", "vision")])
def test_a_component_named_as_other_frameworks_name_a_role_gets_did_you_mean(run_cli, tmp_path, name, role):
    spec = _write(tmp_path / "spec.yaml", f"""\
        version: 1
        model: Qwen/Qwen2-VL-2B-Instruct
        components:
          {name}: {{train: full, lr: 1.0e-5}}
        """)
    result = run_cli("validate", spec)
    assert result.exit_code == 1
    assert f"{spec}:4:3: error: components.{name}: '{name}' is not a role name" in result.stderr
    assert f"hint: did you mean the role '{role}'?" in result.stderr


def test_out_of_range_values_say_what_the_value_is(run_cli, tmp_path):
    spec = _write(tmp_path / "spec.yaml", """\
        version: 1
        model: Qwen/Qwen2-VL-2B-Instruct
        components:
          language: {train: lora, lr: 1.0e-4, lora: {rank: 0}}
        """)
    result = run_cli("validate", spec)
    assert result.exit_code == 1
    assert "components.language.lora.rank: must be >= 1 (got 0)\n  hint: the LoRA rank is" in result.stderr
