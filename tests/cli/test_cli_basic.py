"""The CLI's contract: version, schema, validate output formats, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixspec import __version__

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in (".yaml", ".yml", ".json"))
INVALID = sorted(p for p in (ROOT / "tests" / "specs" / "invalid").iterdir()
                 if p.suffix in (".yaml", ".yml", ".json"))
VALID_SPEC = "tests/specs/valid/minimal.yaml"
INVALID_SPEC = "tests/specs/invalid/lr-zero.yaml"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _console_script() -> str:
    # the venv's entry point next to this interpreter, not whatever `mixspec` PATH finds first
    script = Path(sys.executable).with_name("mixspec")
    return str(script) if script.exists() else "mixspec"


def test_console_script_version():
    result = _run(_console_script(), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mixspec {__version__}\n"


def test_python_m_version():
    result = _run(sys.executable, "-m", "mixspec", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mixspec {__version__}\n"


def test_schema_command_prints_the_committed_schema(run_cli):
    result = run_cli("schema")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["$schema"].startswith("https://json-schema.org/")
    assert result.stdout == (ROOT / "schemas" / "mixspec.schema.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(run_cli, example):
    rel = example.relative_to(ROOT).as_posix()
    result = run_cli("validate", "--no-model", rel)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"{rel}: ok\n"
    assert result.stdout == ""


def test_validate_json_format(run_cli):
    result = run_cli("validate", "--no-model", "--format", "json", VALID_SPEC, INVALID_SPEC)
    assert result.exit_code == 1
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report == {
        "valid": False,
        "files": [
            {"file": VALID_SPEC, "valid": True, "problems": []},
            {"file": INVALID_SPEC, "valid": False, "problems": [{
                "file": INVALID_SPEC, "line": 7, "col": 9, "severity": "error",
                "path": "components.vision.lr", "message": "must be > 0 (got 0)", "hint": "a learning rate is a positive number, e.g. 1.0e-5 for a full ViT, 1.0e-4 for LoRA",
            }]},
        ],
    }


def test_validate_json_format_all_valid(run_cli):
    result = run_cli("validate", "--no-model", "--format", "json", VALID_SPEC)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "valid": True, "files": [{"file": VALID_SPEC, "valid": True, "problems": []}],
    }


@pytest.mark.parametrize(
    "args, code",
    [
        (["validate", "--no-model", VALID_SPEC], 0),
        (["validate", "--no-model", *(p.relative_to(ROOT).as_posix() for p in EXAMPLES)], 0),
        (["validate", "--no-model", INVALID_SPEC], 1),
        (["validate", "--no-model", VALID_SPEC, INVALID_SPEC], 1),
        (["validate", "--no-model", "tests/specs/no-such-file.yaml"], 1),
        (["validate", "--no-model", "tests/specs"], 1),
        ([], 2),
        (["validate"], 2),
        (["--no-such-option"], 2),
        (["validate", "--no-such-option", VALID_SPEC], 2),
        (["validate", "--format", "xml", VALID_SPEC], 2),
        (["no-such-command"], 2),
    ],
    ids=["valid", "examples", "invalid", "mixed", "missing-file", "directory", "no-args",
         "no-files", "unknown-option", "unknown-validate-option", "bad-format", "unknown-command"],
)
def test_exit_codes(run_cli, args, code):
    result = run_cli(*args)
    assert result.exit_code == code, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def test_missing_file_is_reported_not_raised(run_cli):
    result = run_cli("validate", "--no-model", "tests/specs/no-such-file.yaml")
    assert result.stderr == "tests/specs/no-such-file.yaml: error: no such file\n"


def test_invalid_specs_never_print_a_traceback():
    """One real process over every invalid spec: exit 1, each file reported, no traceback."""
    rels = [p.relative_to(ROOT).as_posix() for p in INVALID]
    result = _run(_console_script(), "validate", "--no-model", *rels)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for rel in rels:
        assert f"{rel}:" in result.stderr
    assert ": ok\n" not in result.stderr


def test_pre_commit_hook_matches_documented_file_names():
    import re

    import yaml

    [hook] = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert hook["id"] == "mixspec-validate"
    assert hook["entry"] == "mixspec validate" and hook["language"] == "python"
    pattern = re.compile(hook["files"])
    for name in ["mixspec.yaml", "mixspec.yml", "mixspec.json", "cfg/mixspec.yaml",
                 "train/qwen-vl.mixspec.yaml", "a.mixspec.json"]:
        assert pattern.search(name), name
    for name in ["examples/qwen25vl-7b-mixed.yaml", "notmixspec.yaml", "mixspec.yaml.bak",
                 "mixspec.toml", ".pre-commit-config.yaml"]:
        assert not pattern.search(name), name
