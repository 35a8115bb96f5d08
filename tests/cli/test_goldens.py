"""The golden files hold no installed library version, the test installs are pinned, and a
golden failure names the packages that moved away from their pins.

A generated train.py / swift plugin records the transformers and torch versions that planned
it (the run compares them with its own); the golden data parts hold a placeholder there, so a
new release changes a golden only where it changes behaviour.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, goldens
from mixspec.language.loader import load_spec
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, render

FAKE = {"transformers": "5.26.0", "torch": "2.99.1+cu130"}


def _plan(monkeypatch, rel: str, versions: dict | None = None):
    monkeypatch.chdir(ROOT)
    plan = plan_spec(load_spec(Path(rel)))
    return dataclasses.replace(plan, versions=versions) if versions is not None else plan


def _golden(target: str, case: str) -> dict[str, str]:
    folder = ROOT / "tests" / "targets" / target / case
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("target,case", [("hf", "qwen25vl-7b-mixed"), ("swift", "qwen25vl-7b-mixed"),
                                         ("hf", "qwen25-7b-text-lora-lmhead")])
def test_a_different_installed_version_changes_the_file_but_not_its_golden(monkeypatch, target, case):
    rel = "examples/" + case + ".yaml"
    real = render(_plan(monkeypatch, rel), target, TargetOptions())
    faked = render(_plan(monkeypatch, rel, FAKE), target, TargetOptions())
    program = "train.py" if target == "hf" else "mixspec_plugin.py"
    # the generated program records the versions that planned it (train.py: transformers; the
    # swift plugin: transformers and torch) ...
    assert "'5.26.0'" in faked[program]
    assert ("'2.99.1+cu130'" in faked[program]) == (target == "swift")
    assert faked[program] != real[program]
    # ... and nothing else differs, and the golden form is the one on disk either way
    assert goldens.normalise_versions(faked[program]) == goldens.normalise_versions(real[program])
    assert goldens.golden_form(faked) == goldens.golden_form(real) == _golden(target, case)


def test_normalise_versions_keeps_everything_but_the_recorded_versions():
    text = ("PLAN = {\n    'transformers_version': '5.25.0',\n    'mixspec_version': '0.1.0',\n"
            "    'model': 'torch-2.13.0-finetune',\n}\nPLAN_VERSIONS = {'torch': '2.13.0+cpu', "
            "'transformers': '5.25.0'}\n")
    assert goldens.normalise_versions(text) == (
        "PLAN = {\n    'transformers_version': '<installed>',\n    'mixspec_version': '0.1.0',\n"
        "    'model': 'torch-2.13.0-finetune',\n}\nPLAN_VERSIONS = {'torch': '<installed>', "
        "'transformers': '<installed>'}\n")


def test_no_golden_file_holds_an_installed_library_version():
    installed = {name: goldens._installed(name) for name in ("transformers", "torch", "peft")}
    for path in (ROOT / "tests" / "targets").rglob("*.data"):
        text = path.read_text(encoding="utf-8")
        for name, version in installed.items():
            assert version is None or f"'{version}'" not in text, f"{path}: {name} {version}"


def test_a_golden_failure_names_the_drifted_packages(monkeypatch):
    pins = goldens._pins()
    monkeypatch.setattr(goldens, "_installed", lambda name: pins[name])
    assert goldens.version_drift() == []
    assert goldens.drift_hint() == "run python scripts/update_goldens.py and review the diff"

    real = goldens._installed
    monkeypatch.setattr(goldens, "_installed", lambda name: "5.26.0" if name == "transformers" else
                        (pins[name] + "+cpu" if name == "torch" else pins[name]))
    assert goldens.version_drift() == [f"transformers installed 5.26.0, pinned {pins['transformers']}"]
    hint = goldens.drift_hint()
    assert f"transformers installed 5.26.0, pinned {pins['transformers']}" in hint
    assert "behaviour change" in hint and "update_goldens" not in hint
    monkeypatch.setattr(goldens, "_installed", real)


def test_the_pins_cover_every_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = list(project["dependencies"])
    for extra in ("model", "test"):
        declared += project["optional-dependencies"][extra]
    pins = goldens._pins()
    for requirement in declared:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in pins, f"{requirement}: no pin in tests/constraints.txt (python scripts/pin_test_deps.py)"
    assert pins["torch"] == "2.13.0"  # the CPU build the README's first install takes


def test_the_test_installs_go_through_the_pins():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = next(line for line in readme.splitlines() if "python -m pytest" in line and "pip install" in line)
    assert "-c tests/constraints.txt" in test_command
    assert re.search(r"pip install -e '\.\[model,test\]' -c tests/constraints\.txt", ci)
