"""Shared test helpers: the repository root, scripts/update_goldens.py as a module and an
in-process mixspec CLI runner, and the effect lookups of the import tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent

# the design's seed case: the ViT and the aligner trained fully at their own LRs, the LLM with
# LoRA on every linear layer
SEED_COMPONENTS = """\
components:
  vision: {train: full, lr: 2.0e-6}
  aligner: {train: full, lr: 1.0e-5}
  language:
    train: lora
    lr: 1.0e-4
    lora: {rank: 16, alpha: 32, dropout: 0.05, targets: all-linear}
"""


def seed_spec(model: str = "Qwen/Qwen2.5-VL-7B-Instruct", more: str = "") -> str:
    """The seed case as a spec on ``model``, followed by ``more`` (further components, or the
    training/distributed/data sections)."""
    return f"version: 1\nmodel: {model}\n{SEED_COMPONENTS}{more}"


def _load_goldens():
    spec = importlib.util.spec_from_file_location("update_goldens", ROOT / "scripts" / "update_goldens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: scripts/update_goldens.py: the golden cases of the hf and deepspeed targets, and the golden
#: form of a target's files (a generated program as its data part) for every target
goldens = _load_goldens()


def codes(imported) -> list[str]:
    """The codes of an import's silent effects, in order (mixspec import's tests)."""
    return [e.code for e in imported.effects]


def effect(imported, code: str):
    """An import's first silent effect with ``code``; fails naming the codes found."""
    found = [e for e in imported.effects if e.code == code]
    assert found, f"no {code} effect in {codes(imported)}"
    return found[0]


@pytest.fixture
def run_cli(monkeypatch):
    """Invoke the mixspec CLI in-process from the repository root, so reported paths are
    relative to it; returns click's Result (exit_code, stdout, stderr, exception)."""
    from mixspec.cli import app

    monkeypatch.chdir(ROOT)
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, list(args))

    return invoke


@pytest.fixture(scope="session", autouse=True)
def tree_cache_dir(tmp_path_factory):
    """One module-tree cache per test session (MIXSPEC_CACHE_DIR), never the user's: each
    model's tree is built once per session, and no test reads a stale tree from ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("mixspec-cache")
    old = os.environ.get("MIXSPEC_CACHE_DIR")
    os.environ["MIXSPEC_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MIXSPEC_CACHE_DIR", None)
    else:
        os.environ["MIXSPEC_CACHE_DIR"] = old


# -- the pinned test dependencies ----------------------------------------------------------------
# The suite is proven with the versions in tests/constraints.txt. Where the installed ones
# differ (a new release), the session header says so and every failing test's report names
# them: a failure may then be a behaviour change of that release, not of mixspec.

def pytest_report_header(config):
    drifted = goldens.version_drift()
    if not drifted:
        return "dependencies: as pinned in tests/constraints.txt"
    return "dependencies differ from tests/constraints.txt: " + "; ".join(drifted)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        drifted = goldens.version_drift()
        if drifted:
            report.sections.append(("dependency drift", goldens.drift_hint()))
