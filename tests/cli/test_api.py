"""`import mixspec`: the pipeline as a library, with the CLI's errors as exceptions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import mixspec
from conftest import goldens

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "qwen25vl-7b-mixed.yaml"


def test_plan_from_a_path_and_from_a_dict_agree_with_the_published_counts():
    from_path = mixspec.plan_spec(SEED)
    from_dict = mixspec.plan_spec(yaml.safe_load(SEED.read_text()))
    # README's seed case, refereed by PEFT on the real config
    for plan in (from_path, from_dict):
        assert plan.totals.base_params == 8_292_166_656
        assert plan.totals.trainable_params == 716_920_320
        assert {c.name: c.trainable_params for c in plan.components}["aligner"] == 44_574_464
    assert from_path.fingerprint() == from_dict.fingerprint()
    est = mixspec.estimate_memory(from_path)
    assert est.total_bytes == est.weights_bytes + est.gradients_bytes + est.optimizer_bytes


def test_plan_json_is_what_the_cli_prints(run_cli):
    cli = run_cli("plan", "examples/qwen25vl-7b-mixed.yaml", "--json")  # run_cli works from ROOT
    plan = mixspec.plan_spec("examples/qwen25vl-7b-mixed.yaml")
    data = plan.to_json()
    data["estimate"] = mixspec.estimate_memory(plan).to_json()
    assert json.loads(cli.stdout) == data


def test_render_gives_the_golden_files():
    files = goldens.golden_form(mixspec.render(mixspec.plan_spec("examples/qwen25vl-7b-mixed.yaml"), "hf"))
    golden = ROOT / "tests" / "targets" / "hf" / "qwen25vl-7b-mixed"
    assert sorted(files) == sorted(p.name for p in golden.iterdir())
    assert files["launch.sh.data"] == (golden / "launch.sh.data").read_text()
    assert files["train.py.data"] == (golden / "train.py.data").read_text()


def test_compile_spec_writes_all_files(tmp_path):
    files = mixspec.compile_spec(SEED, "deepspeed", out_dir=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(files) == ["ds_config.json"]
    with pytest.raises(mixspec.MixspecError):  # existing files need force, as in the CLI
        mixspec.compile_spec(SEED, "deepspeed", out_dir=tmp_path / "out")
    mixspec.compile_spec(SEED, "deepspeed", out_dir=tmp_path / "out", force=True)


def test_spec_errors_are_exceptions_with_located_problems(tmp_path):
    text = "version: 1\nmodel: Qwen/Qwen2-VL-2B-Instruct\ncomponents:\n  language: {train: full, lr: 0}\n"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(mixspec.SpecError) as from_file:
        mixspec.load_spec(path)
    [p] = from_file.value.problems
    assert (p.location.line, p.location.col, p.path) == (4, text.splitlines()[3].index("0}") + 1, "components.language.lr")
    assert p.message == "must be > 0 (got 0)"
    with pytest.raises(mixspec.SpecError) as from_dict:
        mixspec.load_spec(yaml.safe_load(text), name="notebook-cell")
    [q] = from_dict.value.problems
    assert (q.path, q.message, q.hint) == (p.path, p.message, p.hint)
    assert str(from_dict.value) == ("notebook-cell: error: components.language.lr: must be > 0 (got 0)\n"
                                    f"  hint: {p.hint}")
    assert p.hint.startswith("a learning rate is a positive number")


def test_dict_that_is_not_plain_data():
    with pytest.raises(mixspec.SpecError) as info:
        mixspec.load_spec({"version": 1, "model": object()})
    assert "must hold plain data" in str(info.value)
    with pytest.raises(TypeError):
        mixspec.load_spec(42)


def test_model_errors_are_spec_errors_at_the_model_key():
    spec = {"version": 1, "model": "no-such-org/no-such-model",
            "components": {"language": {"train": "lora", "lr": 1e-4}}}
    with pytest.raises(mixspec.SpecError) as info:
        mixspec.plan_spec(spec)
    assert info.value.problems[0].path == "model"
    assert "not found (mixspec never downloads)" in info.value.problems[0].message


def test_refusal_is_an_unsupported_error_naming_each_part():
    with pytest.raises(mixspec.UnsupportedError) as info:
        mixspec.render(mixspec.plan_spec(ROOT / "examples" / "design-example.yaml"), "llamafactory")
    assert info.value.target == "llamafactory" and info.value.items
    assert all(item.origin is None or item.origin.line for item in info.value.items)


def test_unknown_target():
    plan = mixspec.plan_spec(SEED)
    with pytest.raises(ValueError, match="unknown target 'swfit'; did you mean 'swift'"):
        mixspec.render(plan, "swfit")
    assert mixspec.target_names() == ["axolotl", "deepspeed", "hf", "llamafactory", "swift"]


def test_module_tree():
    tree = mixspec.module_tree("Qwen/Qwen2-VL-2B-Instruct")
    assert tree.total_params == 2_208_985_600  # Qwen2-VL-2B's published count


def test_import_is_light_and_a_cached_plan_needs_no_torch():
    # `import mixspec` for a notebook costs no torch, transformers or pydantic; a plan
    # whose tree is cached (this session built it above) imports no torch either
    code = ("import sys, mixspec; light = not any(m in sys.modules for m in ('torch', 'transformers', 'pydantic'));"
            f"p = mixspec.plan_spec({str(SEED)!r}); print(light, 'torch' in sys.modules)")
    mixspec.plan_spec(SEED)  # the tree is in this session's cache
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_import_config_is_the_cli_import(tmp_path, run_cli):
    """mixspec.import_config gives what `mixspec import` prints: the same Plan (counts), the
    same effects; problems come back on the result, not raised."""
    import mixspec
    from mixspec.importers import spec_yaml

    script = ROOT / "examples" / "import" / "swift_sft_full.sh"
    got = mixspec.import_config(script, "swift")
    assert got.ok and got.plan.totals.trainable_params == 7_660_190_976
    cli = run_cli("import", "--from", "swift", str(script), "--json")
    data = json.loads(cli.stdout)
    assert [e["code"] for e in data["effects"]] == [e.code for e in got.effects]
    assert data["spec"] == got.spec
    assert mixspec.plan_spec(got.spec).totals.trainable_params == got.plan.totals.trainable_params
    assert "swift_sft_full.sh:14:37 --learning_rate" in spec_yaml(got, str(script))
    bad = mixspec.import_config("train.sh", "swift", text="swift sft --model Qwen/Qwen2.5-VL-7B-Instruct "
                                                          "--tuner_type adalora\n")
    assert not bad.ok and bad.plan is None and "adalora" in bad.problems[0].message
    with pytest.raises(ValueError):
        mixspec.import_config("x", "swfit", text="")
