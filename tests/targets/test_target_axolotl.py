"""Target axolotl: the config.yml trains exactly the Plan, or the refusal names why.

Oracle: axolotl 0.19's own selection rules as `mixspec import --from axolotl` applies them
(derived from axolotl's source and checked against axolotl's functions with AXOLOTL_PYTHON,
tests/importers/test_import_axolotl.py): the compiled config, imported back, plans the same trainable
parameters, LRs and LoRA modules. Real axolotl's config validation is not run here (no
axolotl install in CI).
"""

from __future__ import annotations

import pytest
import yaml

from mixspec.api import plan_spec, render
from mixspec.errors import UnsupportedError
from mixspec.importers import read
from mixspec.importers.axolotl import LayerNamePattern
from mixspec.language.loader import load_spec_text
from mixspec.targets.axolotl import unfrozen_patterns

QWEN_TEXT = "Qwen/Qwen2.5-7B-Instruct"
QWEN_VL = "Qwen/Qwen2.5-VL-7B-Instruct"
DATA = "data: {train: data/train.jsonl}\n"


def spec(model: str, *components: str, tail: str = DATA) -> str:
    return f"version: 1\nmodel: {model}\ncomponents:\n" + "".join(f"  {c}\n" for c in components) + tail


def plan_of(text: str):
    return plan_spec(load_spec_text(text, "spec.yaml"))


EXACT = {
    "text-lora-all-linear": spec(QWEN_TEXT, "language: {train: lora, lr: 2.0e-4, lora: {rank: 16, alpha: 32}}"),
    "vl-lora-llm-q-v": spec(QWEN_VL, "language: {train: lora, lr: 1.0e-4, lora: {targets: [q_proj, v_proj], "
                                     "dropout: 0.05, rslora: true}}"),
    "text-late-layers-full-zero2": spec(
        QWEN_TEXT, "late: {modules: ['model\\.layers\\.(2[4-7])'], train: full, lr: 1.0e-5}",
        tail=DATA + "distributed: {zero_stage: 2}\n"),
    "vl-vision-full-fp32": spec(QWEN_VL, "vision: {train: full, lr: 1.0e-5}", "aligner: {train: full, lr: 1.0e-5}",
                                tail=DATA + "training: {precision: fp32}\n"),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_the_config_trains_exactly_the_plan(case):
    plan = plan_of(EXACT[case])
    files = render(plan, "axolotl")
    cfg = yaml.safe_load(files["config.yml"])
    assert cfg["base_model"] == plan.model and cfg["datasets"][0]["path"] == "data/train.jsonl"
    got = read("axolotl", files["config.yml"], "config.yml")
    assert got.ok, [p.render() for p in got.problems]
    again = plan_spec(got.spec)
    assert again.trainable_lrs() == plan.trainable_lrs()
    assert {t for c in again.components if c.lora for t in c.lora.targets} == \
        {t for c in plan.components if c.lora for t in c.lora.targets}
    for c in plan.components:
        if c.lora:
            lo = next(x.lora for x in again.components if x.lora)
            assert (lo.rank, lo.alpha, lo.dropout, lo.rslora, lo.dora) == \
                (c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.rslora, c.lora.dora)


@pytest.mark.parametrize("text,codes", [
    (spec(QWEN_VL, "vision: {train: full, lr: 2.0e-6}", "language: {train: full, lr: 1.0e-5}",
          tail=DATA + "distributed: {zero_stage: 2}\n"), {"per-component-lr"}),
    (spec(QWEN_TEXT, "language: {train: lora, lr: 1.0e-4}", "lm_head: {train: full, lr: 1.0e-4}",
          tail=DATA + "distributed: {zero_stage: 2}\n"), {"full-with-lora"}),
    (spec(QWEN_TEXT, "language: {train: full, lr: 1.0e-5}"), {"full-params-dtype"}),
    (spec(QWEN_TEXT, "language: {train: full, lr: 1.0e-5}", "embeddings: {train: full, lr: 1.0e-5}",
          tail=DATA + "distributed: {zero_stage: 2}\ntraining: {weight_decay: 0.1}\n"), {"weight-decay-rule"}),
])
def test_what_axolotl_cannot_say_is_refused_with_the_reason(text, codes):
    with pytest.raises(UnsupportedError) as info:
        render(plan_of(text), "axolotl")
    assert {i.code for i in info.value.items} == codes
    assert all(i.why and i.hint for i in info.value.items)


def test_unfrozen_patterns_match_exactly_their_names():
    """axolotl's LayerNamePattern ('.' literal unless before '+', matched from the start) over
    every parameter of the model: the patterns hit the names given and nothing else."""
    plan = plan_of(EXACT["text-late-layers-full-zero2"])
    everything = sorted({p for c in plan.components for p in c.params} | set(plan.unassigned_params))
    trained = set(plan.trainable_lrs())
    patterns = [LayerNamePattern(p) for p in unfrozen_patterns(trained)]
    assert {n for n in everything if any(p.match(n) for p in patterns)} == trained
    # layer 2 must not take layers 20-27 with it
    few = {"model.layers.2.mlp.up_proj.weight"}
    assert {n for n in everything if any(LayerNamePattern(p).match(n) for p in unfrozen_patterns(few))} == few
