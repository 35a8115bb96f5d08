"""PEFT as referee: on tiny random models of every registered architecture, the Plan's
trainable parameters (names and count) and total count equal what PEFT reports when it
is set up as the Plan says.

For each (family, spec): the real model class is built on CPU from a tiny config, mixspec
resolves the spec against ``tree_from_model(model)``, then PEFT wraps a copy of the model
with a ``LoraConfig`` made from the spec's own words: ``target_modules`` is ``"all-linear"``,
the leaf-name list or the regex as the spec says it, ``layers`` becomes
``layers_to_transform``, and ``exclude_modules`` keeps PEFT inside the component's claim.
Every parameter of the Plan's full components gets ``requires_grad_(True)``. PEFT chooses
the modules, names the parameters, counts them and builds the adapters; mixspec only
predicted them.
"""

from __future__ import annotations

import copy
import math
import re
import textwrap

import pytest

from tinymodels import build_model, families, tiny_config

peft = pytest.importorskip("peft")

TEXT_ONLY = ("llama", "qwen2")
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# The second block of each vision encoder (pattern components select it by name).
VISION_BLOCK_1 = {
    "qwen2_vl": r"model\.visual\.blocks\.1",
    "qwen2_5_vl": r"model\.visual\.blocks\.1",
    "qwen3_vl": r"model\.visual\.blocks\.1",
    "llava": r"model\.vision_tower\.encoder\.layers\.1",
    "llava_next": r"model\.vision_tower\.encoder\.layers\.1",
    "llava_onevision": r"model\.vision_tower\.encoder\.layers\.1",
    "gemma3": r"model\.vision_tower\.encoder\.layers\.1",
    "paligemma": r"model\.vision_tower\.encoder\.layers\.1",
    "mllama": r"model\.vision_model\.transformer\.layers\.1",
    "idefics3": r"model\.vision_model\.encoder\.layers\.1",
    "smolvlm": r"model\.vision_model\.encoder\.layers\.1",
    "internvl": r"model\.vision_tower\.encoder\.layer\.1",
    "mistral3": r"model\.vision_tower\.transformer\.layers\.1",
}

LORA = "{rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}"


def _mixed(family, tied):
    if family in TEXT_ONLY:
        return f"language: {{train: lora, lr: 1.0e-4, lora: {LORA}}}"
    return f"""
        vision: {{train: full, lr: 2.0e-6}}
        aligner: {{train: full, lr: 1.0e-5}}
        language: {{train: lora, lr: 1.0e-4, lora: {LORA}}}"""


def _leaf_list(family, tied):
    return "language: {train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 8, targets: [q_proj, v_proj]}}"


def _regex(family, tied):
    # (the MLP's projections, not its activation: PEFT refuses a regex that hits a module
    # without weights, where mixspec passes over it)
    return r"""language: {train: lora, lr: 1.0e-4, lora: {rank: 2, alpha: 4, targets: '.*\.layers\.1\.mlp\.[a-z_]+_proj'}}"""


def _layers(family, tied):
    # a leaf list: PEFT's layers_to_transform filters target_modules given as names (with
    # "all-linear", which PEFT expands to full names, it skips the layer filter)
    return ("language: {train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 8, targets: [q_proj, down_proj], "
            "layers: '0-0'}}")


def _rslora(family, tied):
    return "language: {train: lora, lr: 1.0e-4, lora: {rank: 8, alpha: 16, rslora: true}}"


def _dora(family, tied):
    extra = "" if family in TEXT_ONLY else "\n        aligner: {train: full, lr: 1.0e-5}"
    return "\n        language: {train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 8, dora: true}}" + extra


def _lm_head_full(family, tied):
    spec = f"""
        language: {{train: lora, lr: 1.0e-4, lora: {LORA}}}
        lm_head: {{train: full, lr: 5.0e-5}}"""
    if tied:  # one tensor: the embeddings must be trained the same way
        spec += "\n        embeddings: {train: full, lr: 5.0e-5}"
    return spec


def _embeddings_lora(family, tied):
    spec = "\n        embeddings: {train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 8, targets: [embed_tokens]}}"
    if family not in TEXT_ONLY:
        spec += "\n        vision: {train: full, lr: 2.0e-6}"
    return spec


def _pattern_override(family, tied):
    if family in TEXT_ONLY:
        # the LLM fully trained, its second block through LoRA instead
        return r"""
        language: {train: full, lr: 1.0e-5}
        block_1:
          modules: ['model\.layers\.1']
          train: lora
          lr: 1.0e-4
          lora: {rank: 4, alpha: 8}"""
    return f"""
        vision: {{train: full, lr: 2.0e-6}}
        aligner: {{train: full, lr: 1.0e-5}}
        late_vision:
          modules: ['{VISION_BLOCK_1[family]}']
          train: full
          lr: 5.0e-6
        language: {{train: lora, lr: 1.0e-4, lora: {{rank: 4, alpha: 8, targets: [q_proj, o_proj]}}}}"""


def _conv3d_patch_embed(family, tied):
    if family not in QWEN_VL:
        return None
    return r"""
        vision: {train: full, lr: 2.0e-6}
        patch_embed:
          modules: ['model\.visual\.patch_embed']
          train: lora
          lr: 1.0e-4
          lora: {rank: 4, alpha: 8, targets: [proj]}"""


# The patch embedding convolution of each vision encoder, as a targets leaf path.
PATCH_CONV = {
    "qwen2_vl": "patch_embed.proj", "qwen2_5_vl": "patch_embed.proj", "qwen3_vl": "patch_embed.proj",
    "llava": "patch_embedding", "llava_next": "patch_embedding", "llava_onevision": "patch_embedding",
    "gemma3": "patch_embedding", "paligemma": "patch_embedding", "mllama": "patch_embedding",
    "idefics3": "patch_embedding", "smolvlm": "patch_embedding",
    "internvl": "patch_embeddings.projection", "mistral3": "patch_conv",
}


def _vision_conv_lora(family, tied):
    # LoRA on the Conv2d (Conv3d for Qwen) patch embedding, inside the vision role
    if family in TEXT_ONLY:
        return None
    return f"""
        vision: {{train: lora, lr: 1.0e-4, lora: {{rank: 4, alpha: 8, targets: ['{PATCH_CONV[family]}']}}}}
        aligner: {{train: full, lr: 1.0e-5}}"""


def _everything_all_linear(family, tied):
    # all-linear over the whole model: every Linear, never the output embedding
    return """
        everything:
          modules: ['.*']
          train: lora
          lr: 1.0e-4
          lora: {rank: 2, alpha: 2}"""


CASES = {
    "mixed": _mixed, "leaf_list": _leaf_list, "regex": _regex, "layers": _layers,
    "rslora": _rslora, "dora": _dora, "lm_head_full": _lm_head_full,
    "embeddings_lora": _embeddings_lora, "pattern_override": _pattern_override,
    "conv3d_patch_embed": _conv3d_patch_embed, "vision_conv_lora": _vision_conv_lora,
    "everything_all_linear": _everything_all_linear,
}

# Tiny models: every family from the transformers defaults, plus tiny versions of catalog
# configs whose layout differs (flat Qwen configs with tied embeddings, PaliGemma 2 on Gemma 2).
MODELS = {family: (family, None) for family in families()}
MODELS.update({
    "qwen2_vl@Qwen2-VL-2B": ("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct"),
    "qwen2_5_vl@Qwen2.5-VL-3B": ("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
    "gemma3@gemma-3-4b": ("gemma3", "google/gemma-3-4b-it"),
    "paligemma@paligemma2-3b": ("paligemma", "google/paligemma2-3b-pt-224"),
})
PAIRS = [(m, c) for m in MODELS for c in CASES if CASES[c](MODELS[m][0], tied=False) is not None]


@pytest.fixture(scope="session")
def tiny_models():
    """model name -> (model, tree), each built once per session."""
    from mixspec.models.sources import find_model
    from mixspec.models.tree import tree_from_model

    cache = {}

    def get(name):
        if name not in cache:
            family, catalog_id = MODELS[name]
            base = find_model(catalog_id).config if catalog_id else None
            model = build_model(tiny_config(family, base))
            cache[name] = (model, tree_from_model(model))
        return cache[name]

    return get


def spec_text(family: str, components: str) -> str:
    body = textwrap.indent(textwrap.dedent(components).strip("\n"), "  ")
    return f"version: 1\nmodel: tiny/{family}\ncomponents:\n{body}\n"


def plan_for(name, case, tree):
    from mixspec.language.loader import load_spec_text
    from mixspec.planning.resolve import resolve

    family = MODELS[name][0]
    components = CASES[case](family, bool(tree.tied))
    loaded = load_spec_text(spec_text(family, components), f"{name}-{case}.yaml")
    return resolve(loaded, tree)


def component_scope(comp) -> str:
    """PEFT ``exclude_modules`` (a regex PEFT full-matches against module names) that leaves
    exactly the modules under the component's claim: LoRA is chosen inside the component."""
    covered = "|".join(re.escape(m) for m in comp.modules)
    return rf"(?!(?:{covered})(?:\.|$)).*"


def lora_config_from_spec(comp):
    """A LoraConfig from the spec's own words, so that PEFT, not mixspec, chooses the
    modules: ``all-linear``, the leaf-name list or the regex exactly as the user wrote them,
    ``layers`` as PEFT's ``layers_to_transform``, scoped to the component by ``exclude_modules``."""
    from peft import LoraConfig

    lo = comp.lora
    words = lo.targets_spec
    layers = list(lo.layers) if lo.layers is not None else None  # PEFT: the first numbered segment
    return LoraConfig(target_modules=list(words) if isinstance(words, list) else words,
                      exclude_modules=component_scope(comp), layers_to_transform=layers, r=lo.rank,
                      lora_alpha=lo.alpha, lora_dropout=lo.dropout, use_rslora=lo.rslora, use_dora=lo.dora)


def apply_with_peft(model, plan):
    """Set the model up the way the spec says, with PEFT choosing the LoRA targets itself;
    returns the PEFT model."""
    from peft import get_peft_model

    model = copy.deepcopy(model)
    loras = [c for c in plan.components if c.lora]
    assert len(loras) == 1, "these cases use exactly one LoRA component"
    peft_model = get_peft_model(model, lora_config_from_spec(loras[0]))
    base = peft_model.base_model.model
    for comp in plan.components:
        if comp.mode == "full":
            for name in comp.params:
                base.get_parameter(name).requires_grad_(True)
    return peft_model


@pytest.mark.parametrize("name,case", PAIRS, ids=[f"{m}-{c}" for m, c in PAIRS])
def test_plan_equals_peft(tiny_models, name, case):
    model, tree = tiny_models(name)
    plan = plan_for(name, case, tree)
    peft_model = apply_with_peft(model, plan)

    trainable = {n.removeprefix("base_model.model."): p.numel()
                 for n, p in peft_model.named_parameters() if p.requires_grad}
    planned = plan.trainable_lrs()
    assert sorted(trainable) == sorted(planned), (
        f"only PEFT: {sorted(set(trainable) - set(planned))[:10]}; "
        f"only plan: {sorted(set(planned) - set(trainable))[:10]}")
    assert sum(trainable.values()) == plan.totals.trainable_params
    assert sum(p.numel() for p in peft_model.parameters()) == plan.totals.all_params
    assert plan.totals.base_params == sum(p.numel() for p in model.parameters())

    # LoRA settings land where the Plan says, with the Plan's scaling
    from peft.tuners.lora import LoraLayer

    lo = next(c.lora for c in plan.components if c.lora)
    wrapped = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
               if isinstance(m, LoraLayer)}
    assert sorted(wrapped) == sorted(lo.targets)
    for layer in wrapped.values():
        assert layer.r["default"] == lo.rank
        assert math.isclose(layer.scaling["default"], lo.scaling)


def test_every_family_builds_and_has_all_cases(tiny_models):
    """The referee covers every registered family and the special cases the brief names."""
    assert set(families()) >= {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next",
                               "llava_onevision", "gemma3", "paligemma", "mllama", "idefics3",
                               "smolvlm", "internvl", "mistral3", "llama", "qwen2"}
    # LLaVA-NeXT's image_newline is a bare parameter of the aligner, not a module
    plan = plan_for("llava_next", "mixed", tiny_models("llava_next")[1])
    assert "model.image_newline" in plan.component("aligner").params
    # gemma-3 ties lm_head to the input embedding: the pair counts once
    _, tree = tiny_models("gemma3@gemma-3-4b")
    assert tree.tied == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    plan = plan_for("gemma3@gemma-3-4b", "lm_head_full", tree)
    assert plan.component("lm_head").base_params == 0
    assert plan.component("embeddings").trainable_params == 256 * 32
    # the Conv3d patch embedding gets a Conv3d LoRA
    plan = plan_for("qwen2_5_vl", "conv3d_patch_embed", tiny_models("qwen2_5_vl")[1])
    assert plan.component("patch_embed").lora.target_kinds == ("conv",)


def test_referee_chooses_the_modules_itself(tiny_models):
    """A Plan whose all-linear skipped every gate_proj (the mutation a referee handed the Plan's
    own list could not see): PEFT, given the spec's words, still wraps them, so the case fails."""
    import dataclasses

    from peft.tuners.lora import LoraLayer

    model, tree = tiny_models("qwen2")
    plan = plan_for("qwen2", "mixed", tree)
    comp = plan.component("language")
    skipped = tuple(t for t in comp.lora.targets if not t.endswith("gate_proj"))
    assert len(skipped) < len(comp.lora.targets)
    wrong = dataclasses.replace(plan, components=(
        dataclasses.replace(comp, lora=dataclasses.replace(comp.lora, targets=skipped)),))
    peft_model = apply_with_peft(model, wrong)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == set(comp.lora.targets) != set(skipped)
