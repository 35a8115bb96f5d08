"""Shared test helpers: the repository root and an in-process mixspec CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


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
