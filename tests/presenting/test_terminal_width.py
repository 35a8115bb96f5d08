"""`plan` in an 80-column terminal: no line wider than the terminal, no number cut."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "qwen25vl-7b-mixed.yaml"


def plan_text(columns: int) -> str:
    env = dict(os.environ, COLUMNS=str(columns))
    out = subprocess.run([sys.executable, "-m", "mixspec", "plan", str(SPEC)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    return out.stdout


@pytest.mark.parametrize("columns", [80, 100, 140])
def test_plan_fits_the_terminal_and_keeps_every_number_whole(columns):
    from mixspec.api import load_spec, plan_spec

    text = plan_text(columns)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= columns
    assert "…" not in text
    plan = plan_spec(load_spec(SPEC))
    for comp in plan.components:
        assert f"{comp.base_params:,}" in text and f"{comp.trainable_params:,}" in text, comp.name
    assert f"{plan.unassigned_base_params:,}" in text
    # the modules each component covers: in the table when there is room, listed under it when not
    assert ("covers:" in text) == (columns < 110)
    assert "model.visual.merger" in text
