"""The console script's fast path (issue 12): plain `plan` and `validate` run without typer,
print what the typer app prints, and hand everything else to the typer app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixspec.fast import parse_plain

ROOT = Path(__file__).resolve().parents[2]
SEED = "examples/qwen25vl-7b-mixed.yaml"
BAD = "tests/specs/invalid/lr-zero.yaml"
TYPER = "import sys; sys.argv[0] = 'mixspec'; from mixspec.cli import main; main()"


def _run(args: list[str], via_typer: bool, importtime: bool = False) -> subprocess.CompletedProcess:
    head = [sys.executable] + (["-X", "importtime"] if importtime else [])
    cmd = head + (["-c", TYPER] if via_typer else ["-m", "mixspec"]) + args
    env = {**os.environ, "COLUMNS": "140"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [
    ["plan", SEED],
    ["plan", SEED, "--json"],
    ["plan", "--format=json", SEED, SEED],
    ["plan", SEED, "--modules"],
    ["plan", BAD, SEED],
    ["validate", SEED, BAD],
    ["validate", "--format", "json", SEED, BAD],
    ["validate", "--no-model", "--json", SEED],
])
def test_fast_path_prints_what_the_typer_app_prints(args):
    assert parse_plain(args) is not None
    fast, typer_app = _run(args, via_typer=False), _run(args, via_typer=True)
    assert (fast.returncode, fast.stdout, fast.stderr) == (typer_app.returncode, typer_app.stdout, typer_app.stderr)


@pytest.mark.parametrize("args", [
    ["plan"], ["plan", "--help"], ["plan", SEED, "--jsn"], ["plan", "--format", "yaml", SEED],
    ["validate", "--", SEED], ["--trust-remote-code", "plan", SEED], ["compile", SEED, "-t", "hf"],
    ["explain", SEED, "lm_head"], [],
])
def test_everything_else_goes_to_the_typer_app(args):
    assert parse_plain(args) is None


def test_typer_still_owns_usage_errors():
    result = _run(["plan", SEED, "--jsn"], via_typer=False)
    assert result.returncode == 2 and "No such option: --jsn" in result.stderr


def test_a_warm_plan_and_validate_do_not_import_typer():
    _run(["plan", SEED], via_typer=False)  # the tree is cached now
    for args in (["plan", SEED], ["validate", SEED]):
        result = _run(args, via_typer=False, importtime=True)
        assert result.returncode == 0, result.stderr
        imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                    if line.startswith("import time:") and "|" in line}
        assert not {m for m in imported if m.split(".")[0] in ("typer", "click", "torch", "transformers")}


def test_fast_path_skips_pydantic_plugin_scan_and_restores_the_loader():
    # importlib.metadata is what pydantic's plugin scan costs; the tree cache avoids it too
    _run(["validate", SEED], via_typer=False)
    result = _run(["validate", SEED], via_typer=False, importtime=True)
    assert result.returncode == 0, result.stderr
    assert "importlib.metadata" not in {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                                        if line.startswith("import time:") and "|" in line}
    # after the spec's models are built, a model built later gets pydantic's real loader
    code = ("import sys; from mixspec.language.loader import build_spec_models_without_plugin_scan as build; build(); "
            "assert 'pydantic.plugin._loader' not in sys.modules; import mixspec.language.spec; "
            "from pydantic import BaseModel\nclass Later(BaseModel):\n    a: int\n"
            "loader = sys.modules['pydantic.plugin._loader']; assert hasattr(loader, 'PYDANTIC_ENTRY_POINT_GROUP'); "
            "assert Later(a=1).a == 1; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
