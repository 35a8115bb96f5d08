"""A modules_to_save copy of one half of a tied embedding/lm_head pair, in every importer.

PEFT's ModulesToSaveWrapper deep-copies the module alone, so the copy gets a tensor of its own:
the pair is untied, the copy trains, the partner stays frozen. A mixspec spec trains a tied pair
as one tensor and cannot say that, so each importer refuses it at the user's line instead of
writing a spec that trains something else (before this, swift's and axolotl's imports planned
the copy as 0 trained parameters and LLaMA-Factory's trained the shared tensor in place).
The oracle for "untied" is PEFT itself on a tiny tied Qwen2-VL.
"""

from __future__ import annotations

import json

import pytest

from conftest import codes
from mixspec.importers import read
from tests.tinymodels import build_model, tiny_config, write_config_dir


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    cfg = tiny_config("qwen2_vl")
    cfg["tie_word_embeddings"] = True
    cfg.setdefault("text_config", {})["tie_word_embeddings"] = True
    return write_config_dir(cfg, tmp_path_factory.mktemp("tied") / "model"), cfg


def test_peft_copy_unties_the_pair(tied_model_dir):
    from peft import LoraConfig, get_peft_model

    _, cfg = tied_model_dir
    model = build_model(cfg)
    head, emb = model.lm_head.weight, model.get_input_embeddings().weight
    assert head is emb  # tied before
    peft = get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    copy = [p for n, p in trainable.items() if "lm_head.modules_to_save" in n]
    assert len(copy) == 1 and copy[0] is not emb and copy[0].data_ptr() != emb.data_ptr()
    assert not emb.requires_grad  # the partner stays frozen: the pair trains apart


def _problems(imported):
    return [p for p in imported.problems if p.severity == "error"]


def test_swift_refuses_a_tied_copy(tied_model_dir):
    path, _ = tied_model_dir
    text = (f"swift sft --model {path} --tuner_type lora --target_modules q_proj \\\n"
            "    --modules_to_save lm_head\n")
    got = read("swift", text, "train.sh")
    (problem,) = _problems(got)
    assert (problem.location.line, problem.location.col) == (2, 23)
    assert "tied to model.language_model.embed_tokens.weight" in problem.message and "unties" in problem.message
    # an untied module copy is still an effect, not an error
    fine = read("swift", text.replace("lm_head", "model.visual.merger"), "train.sh")
    assert fine.ok and "modules-to-save-copy" in codes(fine)


def test_llamafactory_refuses_a_tied_copy(tied_model_dir):
    path, _ = tied_model_dir
    text = (f"model_name_or_path: {json.dumps(str(path))}\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
            "lora_target: q_proj\nadditional_target: lm_head\nlearning_rate: 1.0e-4\nbf16: true\n")
    got = read("llamafactory", text, "train.yaml")
    (problem,) = _problems(got)
    assert problem.location.line == 6 and "unties" in problem.message


def test_axolotl_refuses_a_tied_copy(tied_model_dir):
    path, _ = tied_model_dir
    text = (f"base_model: {json.dumps(str(path))}\nadapter: lora\nlora_r: 8\nlora_alpha: 16\n"
            "lora_target_modules: [q_proj]\nlora_modules_to_save: [lm_head]\nlearning_rate: 1.0e-4\n")
    got = read("axolotl", text, "config.yml")
    (problem,) = _problems(got)
    assert problem.location.line == 6 and "unties" in problem.message
