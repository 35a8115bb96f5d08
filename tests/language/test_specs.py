"""Every spec under tests/specs/ is a test case, found automatically.

valid/NAME.{yaml,yml,json}: `mixspec validate --no-model` exits 0.
invalid/NAME.{yaml,yml,json}: exits 1 and prints exactly invalid/NAME.expected on stderr.

After an intended change to error messages, rewrite the expected files with
    MIXSPEC_UPDATE_EXPECTED=1 pytest tests/language/test_specs.py
and review the diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SPECS = ROOT / "tests" / "specs"
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
UPDATE = os.environ.get("MIXSPEC_UPDATE_EXPECTED") == "1"


def _specs(folder: str) -> list[Path]:
    return sorted(p for p in (SPECS / folder).iterdir() if p.suffix in SPEC_SUFFIXES)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


VALID = _specs("valid")
INVALID = _specs("invalid")


@pytest.mark.parametrize("spec", VALID, ids=lambda p: p.name)
def test_valid_spec_passes(run_cli, spec):
    result = run_cli("validate", "--no-model", _rel(spec))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"{_rel(spec)}: ok\n"


@pytest.mark.parametrize("spec", INVALID, ids=lambda p: p.name)
def test_invalid_spec_fails_with_expected_message(run_cli, spec):
    result = run_cli("validate", "--no-model", _rel(spec))
    expected_file = spec.with_suffix(".expected")
    if UPDATE:
        expected_file.write_text(result.stderr, encoding="utf-8")
    assert result.exit_code == 1, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert expected_file.exists(), f"missing {_rel(expected_file)}; run with MIXSPEC_UPDATE_EXPECTED=1"
    assert result.stderr == expected_file.read_text(encoding="utf-8")
    assert result.stdout == ""


@pytest.mark.parametrize("spec", INVALID, ids=lambda p: p.name)
def test_invalid_spec_json_report_matches_text(run_cli, spec):
    result = run_cli("validate", "--no-model", "--format", "json", _rel(spec))
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False
    [entry] = report["files"]
    assert entry == {"file": _rel(spec), "valid": False, "problems": entry["problems"]}
    located = [f"{p['file']}:{p['line']}:{p['col']}: {p['severity']}:" for p in entry["problems"]]
    text_lines = [line for line in spec.with_suffix(".expected").read_text(encoding="utf-8").splitlines()
                  if not line.startswith("  hint: ")]
    assert [line.split(" ", 2)[:2] for line in text_lines] == [loc.split(" ") for loc in located]


def test_spec_folders_are_consistent():
    """Each invalid spec has its .expected file, and no .expected file is orphaned."""
    assert len(VALID) >= 5 and len(INVALID) >= 20
    stems = [p.stem for p in INVALID]
    assert len(stems) == len(set(stems)), "two invalid specs share a name; .expected files would clash"
    expected = {p.stem for p in (SPECS / "invalid").glob("*.expected")}
    assert expected == set(stems)
    strays = [p.name for folder in ("valid", "invalid") for p in (SPECS / folder).iterdir()
              if p.suffix not in SPEC_SUFFIXES + (".expected",)]
    assert not strays, f"files the tests would ignore: {strays}"


def test_several_errors_are_all_reported(run_cli):
    spec = "tests/specs/invalid/several-errors.yaml"
    result = run_cli("validate", "--no-model", spec)
    assert result.stderr.count(": error: ") == 8
