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


def test_the_plan_fingerprint_changes_whenever_the_training_does(run_cli, tmp_path):
    from conftest import seed_spec

    from mixspec.language.loader import load_spec
    from mixspec.planning.resolve import plan_spec

    base = seed_spec("Qwen/Qwen2-VL-2B-Instruct", "training: {micro_batch_size: 1}\n")
    changed = (base.replace("rank: 16", "rank: 32").replace("dropout: 0.05", "dropout: 0.1")
               .replace("micro_batch_size: 1", "micro_batch_size: 2"))
    old, new = _write(tmp_path / "old.yaml", base), _write(tmp_path / "new.yaml", changed)
    a, b = plan_spec(load_spec(old)), plan_spec(load_spec(new))
    # the same parameters at the same LRs (the narrower optimizer fingerprint, which train.py
    # recomputes from its optimizer, keeps its meaning) ...
    assert a.optimizer_fingerprint() == b.optimizer_fingerprint()
    # ... but another training: the plan fingerprint differs, and diff shows both
    assert a.fingerprint() != b.fingerprint()
    result = run_cli("diff", old, new)
    assert result.exit_code == 3  # different training
    assert f"3 change(s) in the training (fingerprint {a.fingerprint()} -> {b.fingerprint()})" in result.stdout
    same = run_cli("diff", old, _write(tmp_path / "same.yaml", base + "# a comment\n"))
    assert same.exit_code == 0 and f"same training (plan fingerprint {a.fingerprint()})" in same.stdout


def test_fit_when_nothing_fits_lists_the_nearest_misses_and_counts_the_rest(run_cli):
    from mixspec.planning.estimate import GIB

    result = run_cli("fit", "examples/qwen25vl-7b-mixed.yaml", "--gpu-memory", "8", "--json")
    options = json.loads(result.stdout)["options"]
    assert result.exit_code == 1 and not any(o["fits"] for o in options)
    text = run_cli("fit", "examples/qwen25vl-7b-mixed.yaml", "--gpu-memory", "8").stdout.splitlines()
    head = next(i for i, line in enumerate(text) if line.startswith(f"0 of {len(options)} options fit"))
    shown = [line for line in text[head + 1:] if line.startswith("  --")]
    assert len(shown) == 12
    smallest = sorted(o["peak_bytes"] for o in options)[:12]
    assert [float(line.split()[1]) for line in shown] == [round(b / GIB, 2) for b in smallest]
    assert text[-1] == f"  ... and {len(options) - 12} more (--all lists every option)"


def test_fit_lists_twelve_that_fit_and_says_how_many_more(run_cli):
    options = json.loads(run_cli("fit", "examples/qwen25vl-7b-mixed.yaml", "--gpu-memory", "80", "--json").stdout)
    fitting = sum(o["fits"] for o in options["options"])
    assert 12 < fitting < len(options["options"])
    text = run_cli("fit", "examples/qwen25vl-7b-mixed.yaml", "--gpu-memory", "80").stdout.splitlines()
    assert text[-1] == f"  ... and {fitting - 12} more that fit (--all lists every option)"


@pytest.mark.parametrize("given,gb", [("80", 80.0), ("80GB", 80.0), ("80 gib", 80 * 2**30 / 1e9), ("79.5GiB", 79.5 * 2**30 / 1e9)])
def test_gpu_memory_takes_both_units_and_shows_both(run_cli, given, gb):
    result = run_cli("fit", "examples/qwen25vl-7b-mixed.yaml", "--gpu-memory", given, "--json")
    assert json.loads(result.stdout)["gpu_memory_gb"] == pytest.approx(gb)
    first = run_cli("fit", "examples/qwen25vl-7b-mixed.yaml", "--gpu-memory", given).stdout.splitlines()[0]
    assert first.startswith(f"GPU memory {gb:.4g} GB = {gb * 1e9 / 2**30:.2f} GiB; ")


@pytest.mark.parametrize("given", ["80x", "-8", "0", "GiB"])
def test_gpu_memory_that_is_not_a_size_is_a_usage_error(run_cli, given):
    result = run_cli("fit", "examples/qwen25vl-7b-mixed.yaml", "--gpu-memory", given)
    assert result.exit_code == 2
    assert "e.g. 80GiB, 80GB or 80 (GB)" in result.stderr


def test_diff_names_model_states_as_such_beside_the_peak(run_cli, tmp_path):
    from conftest import seed_spec

    old = _write(tmp_path / "old.yaml", seed_spec())
    new = _write(tmp_path / "new.yaml", seed_spec().replace("rank: 16", "rank: 32"))
    for fmt in ("text", "markdown"):
        out = run_cli("diff", old, new, "--format", fmt).stdout
        assert "model states (weights + gradients + optimizer)" in out and "peak" in out
        assert "memory per GPU, total" not in out and "| total |" not in out


def test_every_target_refusal_names_the_spec_file(run_cli, tmp_path):
    # a refusal of the spec as a whole (no key of its own) reads FILE: error: like the others
    spec = _write(tmp_path / "spec.yaml", """\
        version: 1
        model: Qwen/Qwen2-VL-2B-Instruct
        components:
          language: {train: lora, lr: 1.0e-4}
        """)
    for target in ("deepspeed", "swift", "llamafactory"):
        result = run_cli("compile", spec, "-t", target, "-o", str(tmp_path / target))
        assert result.exit_code == 1
        assert result.stderr.startswith(f"{spec}: error: target {target} cannot express"), result.stderr


def test_help_lists_each_command_without_cutting_its_description(run_cli):
    from mixspec.cli import app
    from typer.main import get_command

    result = run_cli("--help")
    commands = result.stdout.split("\nCommands:\n", 1)[1]
    assert result.exit_code == 0 and "..." not in commands
    for name, command in get_command(app).commands.items():
        first = " ".join(command.help.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
        import re

        entry = re.search(rf"\n  {name} +(.*?)(?=\n  \S|\n*$)", "\n" + commands + "\n", re.S).group(1)
        listed = " ".join(entry.split())
        assert listed.startswith(first[:30]) and len(listed) >= len(first) - 1, (name, listed)


def test_validate_takes_a_directory_of_specs(run_cli, tmp_path):
    result = run_cli("validate", "examples", "--no-model")
    specs = sorted(p.name for p in Path("examples").iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert result.exit_code == 0
    assert [line.split(": ")[0] for line in result.output.splitlines()] == [f"examples/{s}" for s in specs]
    (tmp_path / "bad.yaml").write_text("version: 2\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a spec\n", encoding="utf-8")
    bad = run_cli("validate", str(tmp_path), "--no-model")
    assert bad.exit_code == 1 and f"{tmp_path / 'bad.yaml'}:1:10: error: version" in bad.stderr
    assert "notes.txt" not in bad.stderr + bad.stdout


def test_import_refusing_to_overwrite_a_spec_file_speaks_of_the_file(run_cli, tmp_path):
    config = _write(tmp_path / "train.yaml", """\
        model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct
        stage: sft
        finetuning_type: lora
        """)
    out = tmp_path / "spec.yaml"
    out.write_text("# mine\n", encoding="utf-8")
    result = run_cli("import", "--from", "llamafactory", config, "-o", str(out))
    assert result.exit_code == 1
    assert "hint: pass --force to overwrite, or give another file with -o" in result.stderr
    assert "--out directory" not in result.stderr and out.read_text() == "# mine\n"
