"""Resolver semantics (precedence, counts, tied weights, determinism) and its errors, each a
located SpecError with the right line, column, key path and hint.

Expected counts are derived by hand from the published configs (shapes in the comments),
never by calling the resolver a second way.
"""

from __future__ import annotations

import textwrap

import pytest

from mixspec.errors import SpecError
from mixspec.language.loader import load_spec_text
from mixspec.planning.resolve import resolve

# Qwen2.5-VL-7B: ViT width 1280, MLP 3420, 32 blocks, Conv3d patch embed 3x2x14x14 -> 1280.
# One ViT block: qkv 1280*3840+3840, proj 1280*1280+1280, gate/up 2*(1280*3420+3420),
# down 3420*1280+1280, two RMSNorms 2*1280.
VIT_BLOCK = (1280 * 3840 + 3840) + (1280 * 1280 + 1280) + 2 * (1280 * 3420 + 3420) \
    + (3420 * 1280 + 1280) + 2 * 1280
PATCH_EMBED = 3 * 2 * 14 * 14 * 1280
assert VIT_BLOCK == 19_702_200 and PATCH_EMBED + 32 * VIT_BLOCK == 631_975_680
# LLM: width 3584, 28 layers, KV width 4*128 = 512, MLP 18944; LoRA adds r*(in+out) per Linear.
LLM_LAYER_IN_OUT = (3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584)
EMBED_7B = 152064 * 3584
# Qwen2.5-VL-3B ties lm_head to its 151936 x 2048 input embedding.
EMBED_3B = 151936 * 2048
# Llama-3.1-8B: width 4096, 32 layers, KV width 1024, MLP 14336, vocab 128256.
LLAMA_LAYER_IN_OUT = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096)


@pytest.fixture(scope="module")
def trees():
    from mixspec.models.sources import find_model
    from mixspec.models.tree import get_tree

    ids = {"qwen7b": "Qwen/Qwen2.5-VL-7B-Instruct", "qwen3b": "Qwen/Qwen2.5-VL-3B-Instruct",
           "llama": "meta-llama/Llama-3.1-8B", "gemma": "google/gemma-3-4b-it"}
    return {k: get_tree(find_model(v)) for k, v in ids.items()}


def spec(components: str, model: str = "Qwen/Qwen2.5-VL-7B-Instruct") -> str:
    body = textwrap.indent(textwrap.dedent(components).strip("\n"), "  ")
    return f"version: 1\nmodel: {model}\ncomponents:\n{body}\n"


def plan(text, tree):
    return resolve(load_spec_text(text, "spec.yaml"), tree)


def problems(text, tree):
    with pytest.raises(SpecError) as info:
        plan(text, tree)
    return [p for p in info.value.problems if p.severity == "error"]


def where(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """1-based line and column of the nth occurrence of needle in text."""
    pos = -1
    for _ in range(nth + 1):
        pos = text.index(needle, pos + 1)
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def at(problem) -> tuple[int, int]:
    return problem.location.line, problem.location.col


# -- the seed case and precedence ----------------------------------------------------------

SEED = """
    vision: {train: full, lr: 2.0e-6}
    aligner: {train: full, lr: 1.0e-5}
    language:
      train: lora
      lr: 1.0e-4
      lora: {rank: 16, alpha: 32, dropout: 0.05, targets: all-linear}
    """


def test_seed_case_counts(trees):
    p = plan(spec(SEED), trees["qwen7b"])
    vision, aligner, language = p.components
    assert vision.base_params == vision.trainable_params == PATCH_EMBED + 32 * VIT_BLOCK
    assert aligner.base_params == aligner.trainable_params == 44_574_464
    assert language.lora.added_params == language.trainable_params == 16 * 28 * LLM_LAYER_IN_OUT
    assert language.trainable_params == 40_370_176
    assert len(language.lora.targets) == 7 * 28
    assert p.totals.trainable_params == 716_920_320
    # unassigned: the untied input embedding and lm_head, listed and frozen
    assert p.unassigned_modules == ("lm_head", "model.language_model.embed_tokens")
    assert p.unassigned_base_params == 2 * EMBED_7B
    assert (vision.base_params + aligner.base_params + language.base_params
            + p.unassigned_base_params) == p.totals.base_params == 8_292_166_656


def test_pattern_component_beats_the_role(trees):
    from mixspec.planning.resolve import explain

    text = spec(SEED + r"""
    late_vit_blocks:
      modules: ['model\.visual\.blocks\.(2[4-9]|3[01])']
      train: full
      lr: 5.0e-6
    """)
    p = plan(text, trees["qwen7b"])
    late = p.component("late_vit_blocks")
    assert late.base_params == 8 * VIT_BLOCK
    assert late.modules == tuple(f"model.visual.blocks.{i}" for i in range(24, 32))
    assert p.component("vision").base_params == PATCH_EMBED + 24 * VIT_BLOCK
    lrs = p.trainable_lrs()
    assert lrs["model.visual.blocks.24.attn.qkv.weight"] == 5.0e-6
    assert lrs["model.visual.blocks.23.attn.qkv.weight"] == 2.0e-6
    rows = dict(explain(load_spec_text(text, "spec.yaml"), trees["qwen7b"], "model.visual.blocks.30"))
    assert {c.component for c in rows.values()} == {"late_vit_blocks"}
    assert all("late_vit_blocks.modules[0]" in c.why for c in rows.values())
    rows = dict(explain(load_spec_text(text, "spec.yaml"), trees["qwen7b"], "model.visual.blocks.3.mlp"))
    assert {c.why for c in rows.values()} == {"role 'vision' (module model.visual)"}


def test_freeze_component_claims_but_trains_nothing(trees):
    p = plan(spec("""
        vision: {train: freeze}
        language: {train: full, lr: 1.0e-5}
        """), trees["qwen7b"])
    assert p.component("vision").base_params == PATCH_EMBED + 32 * VIT_BLOCK
    assert p.component("vision").trainable_params == 0
    assert not any(n.startswith("model.visual.blocks.") for n in p.trainable_lrs())
    # the aligner is in no component: unassigned, and listed
    assert "model.visual.merger" in p.unassigned_modules


def test_plan_is_deterministic(trees):
    text = spec(SEED + r"""
    late:
      modules: ['model\.visual\.blocks\.3[01]']
      train: full
      lr: 5.0e-6
    """)
    first = plan(text, trees["qwen7b"]).to_json_text()
    assert plan(text, trees["qwen7b"]).to_json_text() == first


# -- errors ----------------------------------------------------------------------------------

def test_two_pattern_components_claiming_one_module(trees):
    text = spec(r"""
        early:
          modules: ['model\.visual\.blocks\.[0-2]']
          train: full
          lr: 1.0e-5
        block2:
          modules: ['model\.visual\.blocks\.2', 'model\.visual\.blocks\.5\.mlp']
          train: full
          lr: 2.0e-5
        """)
    [p] = problems(text, trees["qwen7b"])
    assert p.path == "components.block2.modules"
    assert at(p) == where(text, "modules", 1)
    assert "component 'early' also claims" in p.message
    assert p.message.endswith("in: model.visual.blocks.2")
    assert "disjoint" in p.hint


def test_pattern_matching_nothing(trees):
    text = spec(r"""
        block5:
          modules: ['model\.visual\.block\.5']
          train: freeze
        """)
    [p] = problems(text, trees["qwen7b"])
    assert p.path == "components.block5.modules[0]"
    assert at(p) == where(text, "'model")
    assert "matches no module or parameter" in p.message
    assert "model.visual.blocks.5" in p.hint


def test_lora_targets_matching_nothing(trees):
    text = spec(r"""
        language:
          train: lora
          lr: 1.0e-4
          lora: {targets: [q_proj, qproj]}
        aligner:
          train: lora
          lr: 1.0e-4
          lora: {targets: 'mlp\.9'}
        """)
    leaf, regex = problems(text, trees["qwen7b"])  # sorted by line
    assert leaf.path == "components.language.lora.targets[1]" and at(leaf) == where(text, "qproj")
    assert "no module named 'qproj'" in leaf.message
    assert "q_proj" in leaf.hint and "down_proj" in leaf.hint
    assert regex.path == "components.aligner.lora.targets" and at(regex) == where(text, "'mlp")
    assert "matches no module of component 'aligner'" in regex.message


def test_lora_on_a_layernorm(trees):
    text = spec("""
        language:
          train: lora
          lr: 1.0e-4
          lora: {targets: [q_proj, input_layernorm]}
        """)
    [p] = problems(text, trees["qwen7b"])
    assert p.path == "components.language.lora.targets[1]"
    assert at(p) == where(text, "input_layernorm")
    assert p.message.startswith("LoRA cannot wrap Qwen2_5_VLRMSNorm modules: "
                                "model.language_model.layers.0.input_layernorm")
    assert "and 27 more" in p.message
    assert "Linear, Embedding and Conv" in p.hint


def test_all_linear_never_includes_lm_head(trees):
    llama = trees["llama"]
    everything = spec(r"""
        all:
          modules: ['.*']
          train: lora
          lr: 1.0e-4
          lora: {rank: 8}
        """, model="meta-llama/Llama-3.1-8B")
    lora = plan(everything, llama).component("all").lora
    assert "lm_head" not in lora.targets
    assert len(lora.targets) == 7 * 32
    assert lora.added_params == 8 * 32 * LLAMA_LAYER_IN_OUT

    head_all_linear = spec("lm_head: {train: lora, lr: 1.0e-4}", model="meta-llama/Llama-3.1-8B")
    [p] = problems(head_all_linear, llama)
    assert p.path == "components.lm_head.lora.targets"
    assert "never includes the output embedding (lm_head)" in p.message
    assert "targets: [lm_head]" in p.hint

    named = spec("lm_head: {train: lora, lr: 1.0e-4, lora: {rank: 8, targets: [lm_head]}}",
                 model="meta-llama/Llama-3.1-8B")
    assert plan(named, llama).totals.added_params == 8 * (4096 + 128256)


def test_lora_layers(trees):
    one = plan(spec("language: {train: lora, lr: 1.0e-4, lora: {rank: 16, layers: '0-0'}}"), trees["qwen7b"])
    assert one.component("language").lora.added_params == 16 * LLM_LAYER_IN_OUT
    assert all(".layers.0." in t for t in one.component("language").lora.targets)

    text = spec("language: {train: lora, lr: 1.0e-4, lora: {layers: '20-35'}}")
    [p] = problems(text, trees["qwen7b"])
    assert p.path == "components.language.lora.layers" and at(p) == where(text, "'20-35'")
    assert "block(s) 28-35 do not exist" in p.message
    assert p.hint == "its targets lie in blocks 0-27"

    text = spec("language: {train: lora, lr: 1.0e-4, lora: {layers: [40, 41]}}")
    [p] = problems(text, trees["qwen7b"])
    assert "40-41 do not exist" in p.message


def test_tied_embeddings_trained_differently(trees):
    qwen3b = trees["qwen3b"]
    assert qwen3b.tied == {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    text = spec("lm_head: {train: full, lr: 1.0e-5}", model="Qwen/Qwen2.5-VL-3B-Instruct")
    [p] = problems(text, qwen3b)
    assert p.path == "components.lm_head" and at(p) == where(text, "lm_head:")
    assert "lm_head.weight and model.language_model.embed_tokens.weight are one tied tensor" in p.message
    assert "'lm_head' and 'unassigned'" in p.message
    assert "same train mode and lr" in p.hint

    text = spec("""
        lm_head: {train: full, lr: 1.0e-5}
        embeddings: {train: full, lr: 2.0e-5}
        """, model="Qwen/Qwen2.5-VL-3B-Instruct")
    [p] = problems(text, qwen3b)
    assert "full at lr 1e-05 vs full at lr 2e-05" in p.message

    # gemma-3: embeddings trained, lm_head (the same tensor) left out: also refused
    text = spec("embeddings: {train: full, lr: 1.0e-5}", model="google/gemma-3-4b-it")
    [p] = problems(text, trees["gemma"])
    assert p.path == "components.embeddings"


def test_tied_embeddings_trained_the_same_count_once(trees):
    qwen3b = trees["qwen3b"]
    p = plan(spec("""
        lm_head: {train: full, lr: 1.0e-5}
        embeddings: {train: full, lr: 1.0e-5}
        """, model="Qwen/Qwen2.5-VL-3B-Instruct"), qwen3b)
    assert p.totals.trainable_params == EMBED_3B
    assert p.component("embeddings").base_params == EMBED_3B
    assert p.component("lm_head").base_params == 0
    assert list(p.trainable_lrs()) == ["model.language_model.embed_tokens.weight"]
    assert p.totals.base_params == 3_754_622_976  # the shared tensor counted once


def test_role_missing_in_the_model(trees):
    text = spec("""
        language: {train: lora, lr: 1.0e-4}
        aligner: {train: full, lr: 1.0e-5}
        """, model="meta-llama/Llama-3.1-8B")
    [p] = problems(text, trees["llama"])
    assert p.path == "components.aligner" and at(p) == where(text, "aligner:")
    assert "LlamaForCausalLM (llama) has no 'aligner' role" in p.message
    assert "embeddings (model.embed_tokens), language (model), lm_head (lm_head)" in p.hint


def test_every_problem_reported_at_once(trees):
    text = spec(r"""
        vision: {train: full, lr: 1.0e-5}
        ghost:
          modules: ['model\.nothing']
          train: full
          lr: 1.0e-5
        language: {train: lora, lr: 1.0e-4, lora: {targets: [nope], layers: '0-99'}}
        """)
    found = problems(text, trees["qwen7b"])
    assert [p.path for p in found] == ["components.ghost.modules[0]", "components.language.lora.targets[0]"]
    assert [at(p)[0] for p in found] == [where(text, "'model\\.nothing'")[0], where(text, "nope")[0]]


def test_explain_unassigned_and_unknown(trees):
    from mixspec.planning.resolve import explain

    loaded = load_spec_text(spec(SEED), "spec.yaml")
    [(param, claim)] = explain(loaded, trees["qwen7b"], "lm_head")
    assert (param, claim) == ("lm_head.weight", None)
    assert explain(loaded, trees["qwen7b"], "model.no_such_module") == []


def test_lora_on_one_side_of_a_tied_weight_warns(trees):
    text = spec("embeddings: {train: lora, lr: 1.0e-4, lora: {rank: 8, targets: [embed_tokens]}}",
                model="google/gemma-3-4b-it")
    p = plan(text, trees["gemma"])
    assert p.totals.added_params == 8 * (262208 + 2560)
    [w] = [w for w in p.warnings_problems if w.path == "components.embeddings.lora.targets"]
    assert w.severity == "warning" and at(w) == where(text, "lora:")
    assert "tied to lm_head.weight" in w.message and "lm_head keeps the frozen shared weight" in w.message
    # untied: no such warning
    untied = plan(spec("embeddings: {train: lora, lr: 1.0e-4, lora: {targets: [embed_tokens]}}"), trees["qwen7b"])
    assert not [w for w in untied.warnings_problems if "tied" in w.message]
