"""A model directory from a pull request is data: nothing in it is imported or run.

Every Python file in the hostile directories below writes a marker file when imported, so
"no code ran" is checked by the marker's absence (in-process and in a fresh process). Paths
resolve without surprises, and every error says what was expected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixspec.errors import ModelSourceError, SpecError
from mixspec.language.loader import load_spec
from mixspec.planning.resolve import plan_spec
from mixspec.models.sources import MAX_CONFIG_BYTES, find_model
from mixspec.models.tree import build_tree, get_tree

ROOT = Path(__file__).resolve().parents[2]

TINY_QWEN2 = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 128,
    "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}

AUTO_MAP = {
    "AutoConfig": "configuration_evil.EvilConfig",
    "AutoModel": "modeling_evil.EvilModel",
    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
}

CODE_FILES = ("__init__.py", "configuration_evil.py", "modeling_evil.py", "tokenization_evil.py",
              "processing_evil.py", "configuration_qwen2.py", "modeling_qwen2.py")


def _model_dir(root: Path, config: dict | str | bytes, name: str = "model") -> tuple[Path, Path]:
    """A model dir whose every Python file leaves a mark when imported; returns (dir, marker)."""
    model = root / name
    model.mkdir(parents=True)
    marker = root / f"{name}.IMPORTED"
    for filename in CODE_FILES:
        (model / filename).write_text(
            "import pathlib\n"
            f"pathlib.Path({str(marker)!r}).open('a').write({filename!r} + '\\n')\n"
            "class EvilConfig: pass\nclass EvilModel: pass\nclass EvilForCausalLM: pass\n",
            encoding="utf-8",
        )
    if isinstance(config, dict):
        (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    elif isinstance(config, str):
        (model / "config.json").write_text(config, encoding="utf-8")
    else:
        (model / "config.json").write_bytes(config)
    return model, marker


def _assert_nothing_ran(model: Path, marker: Path) -> None:
    assert not marker.exists(), f"code from the model dir ran: {marker.read_text()}"
    loaded = [name for name, mod in list(sys.modules.items())
              if str(getattr(mod, "__file__", "") or "").startswith(str(model))]
    assert loaded == [], loaded


def _spec(root: Path, model: str, extra: str = "") -> Path:
    spec = root / "spec.yaml"
    spec.write_text(f"version: 1\nmodel: {json.dumps(model)}\ncomponents:\n"
                    f"  language: {{train: lora, lr: 1.0e-4}}\n{extra}", encoding="utf-8")
    return spec


# -- remote code is never run -------------------------------------------------------------

@pytest.mark.parametrize("config, expected", [
    ({**TINY_QWEN2, "model_type": "evil", "auto_map": AUTO_MAP}, "declares auto_map"),
    ({**TINY_QWEN2, "auto_map": AUTO_MAP}, "declares auto_map"),  # a known type does not excuse it
    ({**TINY_QWEN2, "model_type": "evil", "architectures": ["EvilForCausalLM"]}, "does not know model_type 'evil'"),
    ({"architectures": ["EvilForCausalLM"], "auto_map": AUTO_MAP}, "declares auto_map"),
    ({"architectures": ["EvilForCausalLM"]}, "has no model_type"),
    ({**TINY_QWEN2, "model_type": ["qwen2"]}, "does not know model_type"),
    ({"model_type": "llava", "text_config": {**TINY_QWEN2, "model_type": "evil", "auto_map": AUTO_MAP},
      "vision_config": {"model_type": "clip_vision_model"}}, "evil"),
])
def test_model_code_is_never_imported(tmp_path, config, expected):
    model, marker = _model_dir(tmp_path, config)
    with pytest.raises(ModelSourceError) as info:
        get_tree(find_model(str(model)), use_cache=False)
    assert expected in str(info.value)
    _assert_nothing_ran(model, marker)


def test_auto_map_refusal_through_the_spec_is_located(tmp_path):
    model, marker = _model_dir(tmp_path, {**TINY_QWEN2, "model_type": "evil", "auto_map": AUTO_MAP})
    spec = _spec(tmp_path, str(model))
    with pytest.raises(SpecError) as info:
        plan_spec(load_spec(spec), use_cache=False)
    problem = info.value.problems[0]
    assert (problem.location.line, problem.location.col, problem.path) == (2, 8, "model")
    assert "runs Python code from the model repo" in problem.message or "run Python code" in problem.message
    assert "trust_remote_code: true" in problem.hint  # says how to opt in
    _assert_nothing_ran(model, marker)


def test_spec_alone_cannot_switch_on_remote_code(tmp_path, monkeypatch):
    """trust_remote_code: true in a (pull-request) spec needs the operator's consent too."""
    monkeypatch.delenv("MIXSPEC_TRUST_REMOTE_CODE", raising=False)
    model, marker = _model_dir(tmp_path, {**TINY_QWEN2, "model_type": "evil", "auto_map": AUTO_MAP})
    spec = _spec(tmp_path, str(model), extra="trust_remote_code: true\n")
    with pytest.raises(SpecError) as info:
        plan_spec(load_spec(spec), use_cache=False)
    problem = info.value.problems[0]
    assert (problem.location.line, problem.path) == (5, "trust_remote_code")
    assert "--trust-remote-code" in problem.hint
    _assert_nothing_ran(model, marker)
    result = subprocess.run([sys.executable, "-m", "mixspec", "plan", str(spec)],
                            capture_output=True, text=True, env={**os.environ, "MIXSPEC_CACHE_DIR": str(tmp_path / "c")})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "operator's consent" in result.stderr
    assert not marker.exists()


def test_native_model_beside_python_files_builds_without_importing_them(tmp_path):
    model, marker = _model_dir(tmp_path, TINY_QWEN2)
    tree = build_tree(find_model(str(model)))
    assert tree.architecture == "Qwen2ForCausalLM"
    assert "model.layers.1.mlp.down_proj" in tree.by_name
    _assert_nothing_ran(model, marker)


def test_hub_attention_kernel_in_config_is_not_fetched(tmp_path):
    # transformers would download and run a kernel named by attn_implementation; the tree
    # is built with eager attention instead (and does not depend on it)
    config = {**TINY_QWEN2, "attn_implementation": "kernels-community/evil-kernel"}
    model, marker = _model_dir(tmp_path, config)
    tree = build_tree(find_model(str(model)))
    assert tree.architecture == "Qwen2ForCausalLM"
    assert "kernels" not in sys.modules or not getattr(sys.modules["kernels"], "__evil__", False)
    _assert_nothing_ran(model, marker)


def test_fresh_process_imports_nothing_from_the_dir(tmp_path):
    """The CLI in a new interpreter, with transformers' dynamic-module cache redirected: the
    marker stays absent and transformers copies no module out of the dir."""
    automap, marker_a = _model_dir(tmp_path, {**TINY_QWEN2, "model_type": "evil", "auto_map": AUTO_MAP}, "automap")
    unknown, marker_u = _model_dir(tmp_path, {**TINY_QWEN2, "model_type": "evil"}, "unknown")
    hf_home = tmp_path / "hf_home"
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_MODULES_CACHE": str(hf_home / "modules"),
           "HF_HUB_OFFLINE": "1", "MIXSPEC_CACHE_DIR": str(tmp_path / "cache")}
    script = (
        "import sys\n"
        "from mixspec.cli import app\n"
        "for args in (['tree', sys.argv[1]], ['validate', sys.argv[2]]):\n"
        "    try:\n"
        "        app(args, standalone_mode=False)\n"
        "    except SystemExit as exc:\n"
        "        print('exit', exc.code)\n"
        "    else:\n"
        "        print('exit', 0)\n"
        "import json\n"
        "print(json.dumps(sorted(n for n, m in sys.modules.items()\n"
        "      if str(getattr(m, '__file__', '') or '').startswith(sys.argv[3]))))\n"
    )
    spec = _spec(tmp_path, str(unknown))
    result = subprocess.run([sys.executable, "-c", script, str(automap), str(spec), str(tmp_path)],
                            capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "[]"
    assert "declares auto_map" in result.stderr
    assert "does not know model_type 'evil'" in result.stderr
    assert not marker_a.exists() and not marker_u.exists()
    modules = hf_home / "modules"
    assert not modules.exists() or not any(p.suffix == ".py" for p in modules.rglob("*"))


# -- paths without surprises; errors say what was expected --------------------------------

def test_relative_model_path_is_taken_from_the_spec_dir_first(tmp_path, monkeypatch):
    project = tmp_path / "project"
    model, _ = _model_dir(project, TINY_QWEN2, "tiny")
    spec_dir = project / "specs"
    spec_dir.mkdir()
    spec = _spec(spec_dir, "../tiny")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = plan_spec(load_spec(spec))
    assert plan.model_source == "local"
    assert plan.model_path == str(model.resolve())


def test_symlinked_model_dir_resolves_to_its_target(tmp_path):
    model, marker = _model_dir(tmp_path, TINY_QWEN2, "real")
    link = tmp_path / "link"
    link.symlink_to(model, target_is_directory=True)
    source = find_model(str(link))
    assert source.path == str(model.resolve())
    assert source.config["model_type"] == "qwen2"
    _assert_nothing_ran(model, marker)


def _config_error(tmp_path, setup) -> str:
    model = tmp_path / "m"
    model.mkdir()
    setup(model)
    with pytest.raises(ModelSourceError) as info:
        find_model(str(model))
    return str(info.value)


@pytest.mark.parametrize("name, setup, expected", [
    ("missing", lambda m: None, "no config.json in"),
    ("config-is-dir", lambda m: (m / "config.json").mkdir(), "is a directory, expected a config.json file"),
    ("not-json", lambda m: (m / "config.json").write_text("model_type: qwen2\n"), "is not valid JSON"),
    ("not-utf8", lambda m: (m / "config.json").write_bytes(b'{"model_type": "caf\xe9"}'), "is not valid JSON"),
    ("json-list", lambda m: (m / "config.json").write_text('["qwen2"]'), "must hold a JSON object"),
    ("deep-json", lambda m: (m / "config.json").write_text("[" * 200_000 + "]" * 200_000), "nests too deeply"),
    ("huge", lambda m: _sparse(m / "config.json", MAX_CONFIG_BYTES + 1), f"larger than {MAX_CONFIG_BYTES} bytes"),
    ("dangling-link", lambda m: (m / "config.json").symlink_to(m / "nowhere.json"), "symlink to nothing"),
    ("self-link", lambda m: (m / "config.json").symlink_to(m / "config.json"), "symlink to nothing"),
    ("dev-zero", lambda m: (m / "config.json").symlink_to("/dev/zero"), "not a regular file"),
])
def test_bad_config_json(tmp_path, name, setup, expected):
    message = _config_error(tmp_path, setup)
    assert expected in message
    assert "Traceback" not in message


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)


@pytest.mark.parametrize("ref, expected", [
    ("/definitely/not/here", "no such directory"),
    ("./not-here", "no such directory"),
    ("../../not-here", "no such directory"),
    ("Qwen/..", "not a model id"),
    ("Qwen/.", "not a model id"),
    ("org/", "not a model id"),
    ("x" * 5000, "cannot look it up"),
    ("org/" + "x" * 5000, "cannot look it up"),
    ("no-such-org/no-such-model", "not found (mixspec never downloads)"),
])
def test_model_refs_that_resolve_to_nothing(tmp_path, monkeypatch, ref, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    with pytest.raises(ModelSourceError) as info:
        find_model(ref)
    assert expected in str(info.value)
    assert len(str(info.value)) < 2000


def test_model_path_that_is_a_file(tmp_path):
    model, _ = _model_dir(tmp_path, TINY_QWEN2)
    with pytest.raises(ModelSourceError) as info:
        find_model(str(model / "config.json"))
    assert "is a file; give the directory that holds config.json" in str(info.value)


def test_dotdot_id_does_not_escape_the_caches(tmp_path, monkeypatch):
    # "org/.." must not become the cache root: a config.json left there is not a model
    hub = tmp_path / "ms"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps(TINY_QWEN2))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError):
        find_model("evil/..")


@pytest.mark.parametrize("config, expected", [
    ({**TINY_QWEN2, "hidden_size": "wide"}, "is not a valid qwen2 config"),
    ({**TINY_QWEN2, "num_hidden_layers": -3}, ""),
])
def test_malformed_native_config_is_an_error_not_a_traceback(tmp_path, config, expected):
    model, marker = _model_dir(tmp_path, config)
    try:
        tree = build_tree(find_model(str(model)))
    except ModelSourceError as exc:
        assert expected in str(exc)
    else:
        assert tree.architecture == "Qwen2ForCausalLM"
    _assert_nothing_ran(model, marker)


def test_cli_says_what_was_expected(run_cli, tmp_path):
    model = tmp_path / "m"
    (model / "config.json").mkdir(parents=True)
    spec = _spec(tmp_path, str(model))
    result = run_cli("validate", str(spec))
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert f"{spec}:2:8: error: model: model " in result.stderr
    assert "is a directory, expected a config.json file" in result.stderr


@pytest.mark.parametrize("where, quant, shown", [
    ("top", {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}, "'awq', 4 bits"),
    ("top", {"quant_method": "gptq", "bits": 8, "desc_act": False}, "'gptq', 8 bits"),
    ("top", {"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ("text_config", {"quant_method": "fp8", "weight_block_size": [128, 128]}, "'fp8'"),
])
def test_pre_quantized_checkpoint_is_refused_not_planned_as_bf16(tmp_path, run_cli, where, quant, shown):
    """A pre-quantized checkpoint holds packed weights and scales, not the tensors of the class
    its config builds: plan, compile and import refuse it at the model line."""
    plain = find_model("Qwen/Qwen2-VL-2B-Instruct").config
    config = json.loads(json.dumps(plain))
    if where == "top":
        config["quantization_config"] = quant
    else:  # a nested text config (transformers 5 layout) holding it
        config["text_config"] = {**config.get("text_config", {}), "quantization_config": quant}
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nmodel: {model}\ncomponents:\n"
                    "  language: {train: lora, lr: 1.0e-4, lora: {rank: 8, alpha: 16, targets: all-linear}}\n",
                    encoding="utf-8")
    for args in (["plan", str(spec)], ["compile", str(spec), "--target", "hf"]):
        result = run_cli(*args)
        assert result.exit_code == 1, result.stdout
        assert result.stderr.startswith(f"{spec}:2:8: error: model:"), result.stderr
        assert f"quantization_config (quant_method {shown}" in result.stderr
        assert "unquantized" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("tree", str(model))
    assert result.exit_code == 1 and "quantization_config" in result.stderr and "Traceback" not in result.stderr
    script = tmp_path / "train.sh"
    script.write_text(f"swift sft --model {model} --tuner_type lora --dataset d.jsonl\n", encoding="utf-8")
    result = run_cli("import", "--from", "swift", str(script))
    assert result.exit_code == 1 and f"{script}:1:19: error: --model:" in result.stderr, result.stderr
    # the same config without quantization_config plans
    (model / "config.json").write_text(json.dumps(plain), encoding="utf-8")
    assert run_cli("plan", str(spec)).exit_code == 0
