"""Every family of tests/fixtures/tiny_families.py builds offline, loads with the Auto classes
and trains one step on a mixed batch (rows with 1 and 2 images, and a text-only row where the
processor allows it) with a finite loss and a gradient in the vision tower.

Each python environment checks all its families in one subprocess (imports dominate the
time): ``.venv`` (no torchvision) the families whose processors need none, ``.venv-swift``
(torchvision) every family. ``real_ids=True`` is built and checked too for the families
whose published ids backends hard-code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))

import tiny_families  # noqa: E402

# "venv": the python running the tests (no torchvision: CI's fresh venv, or .venv); "venv-swift": the
# ms-swift venv (torch + torchvision that load on CPU)
PYTHONS = {"venv": Path(sys.executable),
           "venv-swift": Path(os.environ.get("MIXSPEC_SWIFT_VENV") or ROOT / ".venv-swift") / "bin" / "python"}
REAL_IDS = ("qwen2_5_vl", "gemma3", "mllama", "paligemma", "idefics3", "qwen3_vl", "llava_onevision")

_SCRIPT = r"""
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import tiny_families as t
root, plan = sys.argv[2], json.loads(sys.argv[3])
for family, real_ids in plan:
    try:
        if family == "smolvlm":
            import num2words  # noqa: F401  SmolVLMProcessor refuses to start without it
        res = t.check(family, f"{root}/{family}-{int(real_ids)}", real_ids=real_ids)
    except ImportError as exc:
        res = {"family": family, "real_ids": real_ids, "skip": repr(exc)}
    except Exception:
        res = {"family": family, "real_ids": real_ids, "error": traceback.format_exc()}
    print("RESULT " + json.dumps(res), flush=True)
"""


def _plan(env: str) -> list:
    families = [f for f in tiny_families.FAMILIES
                if env == "venv-swift" or not tiny_families.family_info(f)["needs_torchvision"]]
    return [(f, False) for f in families] + [(f, True) for f in REAL_IDS if f in families]


_RESULTS: dict = {}


def _results(env: str, tmp_root: Path) -> dict:
    if env not in _RESULTS:
        python = PYTHONS[env]
        if not python.exists():
            pytest.skip(f"{python} is missing")
        envvars = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run([str(python), "-c", _SCRIPT, str(FIXTURES), str(tmp_root / env), json.dumps(_plan(env))],
                              capture_output=True, text=True, timeout=600, env=envvars, cwd=ROOT)
        found = {}
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[len("RESULT "):])
                found[(res["family"], res["real_ids"])] = res
        if not found:
            pytest.fail(f"{env}: no results (rc {proc.returncode})\n{proc.stderr[-4000:]}")
        _RESULTS[env] = found
    return _RESULTS[env]


CASES = [pytest.param(env, f, r, id=f"{env}-{f}{'-real_ids' if r else ''}")
         for env in PYTHONS for f, r in _plan(env)]


@pytest.mark.slow
@pytest.mark.parametrize(("env", "family", "real_ids"), CASES)
def test_family_trains_one_step(env, family, real_ids, tmp_path_factory):
    res = _results(env, tmp_path_factory.getbasetemp() / "tiny_families").get((family, real_ids))
    assert res is not None, f"{family} was not checked under {env}"
    if "skip" in res:
        pytest.skip(res["skip"])
    assert "error" not in res, res["error"]
    info = tiny_families.family_info(family)
    assert res["loss_finite"]
    assert res["vision_params_with_grad"] > 0
    assert res["rows_images"][:2] == [1, 2 if (info["max_images_per_row"] or 2) >= 2 else 1]
    assert (0 in res["rows_images"]) == info["text_only_rows"]
    per_row = res["image_tokens_per_row"]
    assert per_row[0] > 0 and per_row[1] > per_row[0], per_row  # the two-image row has more
    if len(per_row) > 2:
        assert per_row[2] == 0
    if not real_ids:
        assert res["dir_bytes"] < 3_000_000, res["dir_bytes"]


def test_family_info_is_complete():
    assert tiny_families.FAMILIES[:3] == ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
    for family in tiny_families.FAMILIES:
        info = tiny_families.family_info(family)
        for key in ("model_type", "architecture", "image_token", "needs_torchvision", "max_images_per_row",
                    "processor_class", "chat_template"):
            assert key in info, (family, key)
        assert info["model_type"] == family
    assert tiny_families.family_info("gemma3")["published_image_token_id"] == 262144
    assert tiny_families.family_info("qwen2_5_vl")["published_image_token_id"] == 151655
    assert tiny_families.family_info("mllama")["published_image_token_id"] == 128256
    assert tiny_families.family_info("llava")["published_image_token_id"] == 32000
    with pytest.raises(ValueError):
        tiny_families.family_info("nope")
