"""`mixspec tiny`: a random tiny model of a family, with the real model's module names and roles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixspec.cli import app
from mixspec.models.sources import catalog_ids, catalog_root

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def real_names(model_dir: Path) -> set[str]:
    """The real model's parameter names, by transformers itself on the meta device."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])._from_config(config)
    return {n for n, _ in model.named_parameters(remove_duplicate=False)}  # tied aliases too


@pytest.mark.parametrize("model_id", [m for m in catalog_ids() if "72B" not in m])
def test_tiny_has_the_real_models_names_and_roles(model_id, tmp_path):
    from mixspec.api import module_tree

    code, out, err = run("tiny", model_id, tmp_path / "tiny")
    assert code == 0, err
    tiny = module_tree(str(tmp_path / "tiny"))
    real = module_tree(model_id)
    assert set(tiny.param_shapes) <= real_names(catalog_root() / model_id)  # same names, fewer blocks
    from mixspec.models.registry import find_roles

    assert find_roles(tiny).prefixes == find_roles(real).prefixes
    assert tiny.total_params < real.total_params / 20
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["architectures"] == real.architecture.split()


def test_tiny_keeps_the_processor_and_runs_an_image_row(tmp_path):
    """A model dir with processor files: they are copied, and the tiny model runs a row the
    family's own processor makes (text and image)."""
    import make_tiny_vlm
    import torch
    import transformers
    from PIL import Image

    source = make_tiny_vlm.make_tiny_llava(tmp_path / "src")
    code, out, err = run("tiny", source, tmp_path / "tiny")
    assert code == 0, err
    assert "processor_config.json" in out and "tokenizer.json" in out
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "tiny")
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "tiny")
    batch = processor(text=["<image>What is it?"], images=[Image.new("RGB", (64, 48), (200, 0, 0))],
                      return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_tiny_refuses_an_existing_dir_and_a_model_it_cannot_find(tmp_path):
    (tmp_path / "taken").mkdir()
    code, _, err = run("tiny", "llava-hf/llava-1.5-7b-hf", tmp_path / "taken")
    assert code == 2 and "exists" in err
    code, _, err = run("tiny", "no/such-model", tmp_path / "new")
    assert code != 0 and err.startswith("error:") and "Traceback" not in err and not (tmp_path / "new").exists()
