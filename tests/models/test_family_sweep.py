"""Families mixspec has never seen: every image-text-to-text model type the installed
transformers registers, built from transformers' own default config, goes through plan,
the memory estimate and every target. Each one either plans (and each target renders or
refuses) or stops with mixspec's own located error: never an exception of another kind,
which the CLI would show as a traceback. (Found this way: a Linear whose in/out_features
were tensors made the tree cache raise; BLIP's LLM was taken to be its embeddings module.)

Slow: ~100 default-size models built on the meta device, one process.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

from mixspec.errors import MixspecError  # noqa: E402
from conftest import seed_spec  # noqa: E402

SPECS = {
    # the design's mixed case where the family has the roles; else LoRA on the LLM alone
    "mixed": seed_spec("{model}", more="""\
training: {precision: bf16, micro_batch_size: 1, gradient_accumulation: 4}
distributed: {gpus_per_node: 2, zero_stage: 2}
data: {train: data/train.jsonl}
"""),
    "lora": """\
version: 1
model: {model}
components:
  language:
    train: lora
    lr: 1.0e-4
    lora: {rank: 8, alpha: 16, targets: all-linear}
training: {precision: bf16}
distributed: {zero_stage: 3}
data: {train: data/train.jsonl}
""",
}


def test_every_image_text_family_plans_or_refuses_with_a_located_error(tmp_path, monkeypatch):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from mixspec.api import estimate_memory, plan_spec, render, target_names

    monkeypatch.setenv("MIXSPEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    planned, refused, no_config, crashed = {}, {}, [], []
    for model_type, architecture in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items()):
        try:
            config = AutoConfig.for_model(model_type).to_dict()
        except Exception:  # not mixspec's: transformers cannot make this family's default config
            no_config.append(model_type)
            continue
        config["architectures"] = [architecture]
        model_dir = tmp_path / "models" / model_type
        model_dir.mkdir(parents=True)
        (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
        for name, text in SPECS.items():
            spec = tmp_path / f"{model_type}-{name}.yaml"
            spec.write_text(text.replace("{model}", str(model_dir)), encoding="utf-8")
            try:
                plan = plan_spec(spec)
                estimate_memory(plan)
            except MixspecError as exc:
                refused[(model_type, name)] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the point of the test
                crashed.append(f"{model_type} {name} plan: {type(exc).__name__}: {exc}")
                continue
            planned[(model_type, name)] = []
            for target in target_names():
                try:
                    files = render(plan, target)
                except MixspecError:
                    continue
                except Exception as exc:  # noqa: BLE001
                    crashed.append(f"{model_type} {name} {target}: {type(exc).__name__}: {exc}")
                    continue
                assert files, (model_type, name, target)
                planned[(model_type, name)].append(target)
    print(f"planned {len(planned)} (family, spec) pairs, refused {len(refused)}, no default config {len(no_config)}")
    assert not crashed, "\n".join(crashed)
    # every refusal is located: it names the spec file
    for key, message in refused.items():
        assert f"{key[0]}-{key[1]}.yaml" in message or "model '" in message, (key, message)
    # not vacuous: most families plan, and the targets render for them
    families = {model_type for model_type, _ in planned}
    assert len(families) >= 0.6 * len(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES), sorted(families)
    assert sum(1 for targets in planned.values() if "hf" in targets) >= 0.5 * len(planned)
