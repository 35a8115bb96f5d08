"""The committed JSON Schema is current, and accepts every example and valid spec."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest

from mixspec.language.yamlloc import load_located

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "schemas" / "mixspec.schema.json"
SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def _gen_schema_module():
    spec = importlib.util.spec_from_file_location("gen_schema", ROOT / "scripts" / "gen_schema.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in SPEC_SUFFIXES)


EXAMPLES = _files(ROOT / "examples")
VALID = _files(ROOT / "tests" / "specs" / "valid")

# Invalid specs whose mistake the schema alone can see (the rest need mixspec's own checks:
# regexes, layer ranges, role names, empty target lists, YAML-level problems).
SCHEMA_REJECTS = [
    "unknown-top-level-key", "unknown-nested-key", "lr-zero", "lr-negative", "lr-quoted-string",
    "lora-rank-zero", "lora-alpha-bool", "lora-dropout-one", "gradient-accumulation-zero",
    "zero-stage-4", "missing-model", "full-missing-lr", "freeze-with-lr", "lora-options-on-full",
    "bad-train-mode", "missing-train", "version-2", "components-empty",
    "micro-batch-float", "yes-is-not-a-boolean", "json-lr-string",
    "component-name-invalid",
]


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_is_current():
    expected = _gen_schema_module().render_schema()
    committed = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.exists() else ""
    assert committed == expected, (
        "schemas/mixspec.schema.json is stale (the spec models changed); "
        "regenerate it with: python scripts/gen_schema.py"
    )


def test_the_schema_does_not_depend_on_what_was_imported_first():
    """typing caches Optional[X] under an X that compares equal in any order: a library that made
    Optional[Union[list[str], str]] before the spec's models were built reordered the spec's
    unions, and the schema with them (seen when the test files were collected in another order)."""
    import subprocess
    import sys

    code = ("from typing import Optional, Union\n"
            "first = Optional[Union[list[str], str]], Optional[Union[list[int], str]], Union[list[str], str]\n"
            "import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location('gen_schema', sys.argv[1])\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "sys.stdout.write(module.render_schema())\n")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "scripts" / "gen_schema.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == SCHEMA_FILE.read_text(encoding="utf-8")


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES + VALID, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_schema_accepts(validator, path):
    data = load_located(path).data
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
    assert not errors, errors


@pytest.mark.parametrize("name", SCHEMA_REJECTS)
def test_schema_rejects(validator, name):
    [path] = [p for p in _files(ROOT / "tests" / "specs" / "invalid") if p.stem == name]
    assert not validator.is_valid(load_located(path).data)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_points_editors_at_the_schema(path):
    assert "# yaml-language-server: $schema=../schemas/mixspec.schema.json\n" in path.read_text(encoding="utf-8")
