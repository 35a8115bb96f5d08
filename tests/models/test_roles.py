"""Architecture roles: the prefixes found on real trees, disjointness, and robustness to the
module names of other transformers versions."""

from __future__ import annotations

import pytest

from tinymodels import build_model, families, tiny_config, write_config_dir

LLAVA_LIKE = {"vision": ("model.vision_tower",), "aligner": ("model.multi_modal_projector",),
              "language": ("model.language_model",),
              "embeddings": ("model.language_model.embed_tokens",), "lm_head": ("lm_head",)}
QWEN_VL = {"vision": ("model.visual",), "aligner": ("model.visual.merger",),
           "language": ("model.language_model",),
           "embeddings": ("model.language_model.embed_tokens",), "lm_head": ("lm_head",)}
IDEFICS_LIKE = {"vision": ("model.vision_model",), "aligner": ("model.connector",),
                "language": ("model.text_model",), "embeddings": ("model.text_model.embed_tokens",),
                "lm_head": ("lm_head",)}
TEXT_ONLY = {"language": ("model",), "embeddings": ("model.embed_tokens",), "lm_head": ("lm_head",)}

# The role map of every family, on transformers 5.x module names (the table in docs/spec.md).
EXPECTED_ROLES = {
    "qwen2_vl": QWEN_VL,
    "qwen2_5_vl": QWEN_VL,
    "qwen3_vl": {**QWEN_VL, "aligner": ("model.visual.deepstack_merger_list", "model.visual.merger")},
    "llava": LLAVA_LIKE,
    "llava_next": {**LLAVA_LIKE, "aligner": ("model.image_newline", "model.multi_modal_projector")},
    "llava_onevision": {**LLAVA_LIKE, "aligner": ("model.image_newline", "model.multi_modal_projector")},
    "gemma3": LLAVA_LIKE,
    "paligemma": LLAVA_LIKE,
    "internvl": LLAVA_LIKE,
    "mistral3": LLAVA_LIKE,
    "mllama": {**LLAVA_LIKE, "vision": ("model.vision_model",)},
    "idefics3": IDEFICS_LIKE,
    "smolvlm": IDEFICS_LIKE,
    "llama": TEXT_ONLY,
    "qwen2": TEXT_ONLY,
}

CATALOG_ROLES = {
    "Qwen/Qwen2-VL-2B-Instruct": EXPECTED_ROLES["qwen2_vl"],
    "Qwen/Qwen2-VL-7B-Instruct": EXPECTED_ROLES["qwen2_vl"],
    "Qwen/Qwen2.5-VL-3B-Instruct": EXPECTED_ROLES["qwen2_5_vl"],
    "Qwen/Qwen2.5-VL-7B-Instruct": EXPECTED_ROLES["qwen2_5_vl"],
    "Qwen/Qwen2.5-VL-72B-Instruct": EXPECTED_ROLES["qwen2_5_vl"],
    "Qwen/Qwen3-VL-8B-Instruct": EXPECTED_ROLES["qwen3_vl"],
    "llava-hf/llava-1.5-7b-hf": EXPECTED_ROLES["llava"],
    "google/gemma-3-4b-it": EXPECTED_ROLES["gemma3"],
    "google/paligemma2-3b-pt-224": EXPECTED_ROLES["paligemma"],
    "Qwen/Qwen2.5-7B-Instruct": TEXT_ONLY,
    "meta-llama/Llama-3.1-8B": TEXT_ONLY,
}


@pytest.fixture(scope="module")
def family_trees():
    from mixspec.models.tree import tree_from_model

    return {f: tree_from_model(build_model(tiny_config(f))) for f in families()}


def params_by_role(tree, roles):
    out: dict = {}
    for p in tree.param_shapes:
        out.setdefault(roles.role_of(p), set()).add(p)
    return out


@pytest.mark.parametrize("family", sorted(EXPECTED_ROLES))
def test_roles_of_each_family(family_trees, family):
    from mixspec.models.registry import find_roles

    tree = family_trees[family]
    roles = find_roles(tree)
    assert roles.prefixes == EXPECTED_ROLES[family]
    assert not roles.guessed
    by_role = params_by_role(tree, roles)
    # every parameter has exactly one role here (role_of returns one), and no role is empty
    assert None not in by_role
    assert set(by_role) == set(EXPECTED_ROLES[family])
    # the input embedding is its own role, not part of language
    assert all(not p.startswith(tree.input_embedding + ".") for p in by_role["language"])


@pytest.mark.parametrize("model_id", sorted(CATALOG_ROLES))
def test_roles_of_catalog_models(model_id):
    from mixspec.models.registry import find_roles
    from mixspec.models.sources import find_model
    from mixspec.models.tree import get_tree

    roles = find_roles(get_tree(find_model(model_id)))
    assert roles.prefixes == CATALOG_ROLES[model_id]
    assert not roles.guessed


def test_qwen_vision_is_the_visual_tower_minus_its_merger(family_trees):
    from mixspec.models.registry import find_roles

    tree = family_trees["qwen3_vl"]
    roles = find_roles(tree)
    assert roles.role_of("model.visual.blocks.0.attn.qkv.weight") == "vision"
    assert roles.role_of("model.visual.patch_embed.proj.weight") == "vision"
    assert roles.role_of("model.visual.merger.linear_fc1.weight") == "aligner"
    assert roles.role_of("model.visual.deepstack_merger_list.1.linear_fc2.bias") == "aligner"
    assert roles.role_of("model.language_model.embed_tokens.weight") == "embeddings"
    assert roles.role_of("model.language_model.layers.0.mlp.up_proj.weight") == "language"


def _renamed_tree(tree, rename, drop=()):
    """The same tree with module names rewritten (what another transformers version builds)."""
    from mixspec.models.tree import ModuleTree

    data = tree.to_json()
    data["modules"] = [[rename(row[0]), *row[1:]] for row in data["modules"] if row[0] not in drop]
    data["tied"] = {rename(a): rename(c) for a, c in data["tied"].items()}
    data["input_embedding"] = rename(data["input_embedding"])
    data["output_embedding"] = rename(data["output_embedding"])
    return ModuleTree.from_json(data)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2_vl_layout_before_transformers_4_52(family_trees, family):
    """transformers < 4.52 built Qwen2-VL as visual.*, model.embed_tokens, model.layers.*,
    model.norm, lm_head (the LLM itself at ``model``). The same rules must find the roles."""
    from mixspec.models.registry import find_roles

    def old(name):
        if name == "model.language_model" or name.startswith("model.language_model."):
            return "model" + name[len("model.language_model"):]
        if name.startswith("model.visual"):
            return name[len("model."):]
        return name

    # the 5.x container ``model`` (no parameters of its own) did not exist: the LLM was ``model``
    tree = _renamed_tree(family_trees[family], old, drop=("model",))
    names = [m.name for m in tree.modules]
    assert len(names) == len(set(names))
    assert "model.layers.0.self_attn.q_proj" in tree.by_name and "visual.blocks.0" in tree.by_name

    roles = find_roles(tree)
    assert roles.prefixes == {"vision": ("visual",), "aligner": ("visual.merger",),
                              "language": ("model",), "embeddings": ("model.embed_tokens",),
                              "lm_head": ("lm_head",)}
    by_role = params_by_role(tree, roles)
    assert None not in by_role
    assert all(p.startswith("visual.") and not p.startswith("visual.merger.") for p in by_role["vision"])
    assert all(p.startswith("visual.merger.") for p in by_role["aligner"])
    assert all(p.startswith("model.") and not p.startswith("model.embed_tokens.")
               for p in by_role["language"])
    # and the role sizes are those of the 5.x layout
    new_roles = find_roles(family_trees[family])
    new_by_role = params_by_role(family_trees[family], new_roles)
    numel_old, numel_new = tree.param_numel, family_trees[family].param_numel
    for role in by_role:
        assert sum(numel_old[p] for p in by_role[role]) == sum(numel_new[p] for p in new_by_role[role])


def test_old_layout_resolves_a_role_spec(family_trees):
    """A role spec planned against the old names gives the same counts as against the new."""
    from mixspec.language.loader import load_spec_text
    from mixspec.planning.resolve import resolve

    def old(name):
        if name == "model.language_model" or name.startswith("model.language_model."):
            return "model" + name[len("model.language_model"):]
        return name[len("model."):] if name.startswith("model.visual") else name

    new_tree = family_trees["qwen2_5_vl"]
    old_tree = _renamed_tree(new_tree, old, drop=("model",))
    spec = load_spec_text(
        "version: 1\nmodel: x/y\ncomponents:\n"
        "  vision: {train: full, lr: 1.0e-5}\n  aligner: {train: full, lr: 2.0e-5}\n"
        "  language: {train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 8}}\n", "s.yaml")
    a, b = resolve(spec, new_tree), resolve(spec, old_tree)
    assert [(c.name, c.base_params, c.trainable_params) for c in a.components] == \
        [(c.name, c.base_params, c.trainable_params) for c in b.components]
    assert sorted(map(old, a.trainable_lrs())) == sorted(b.trainable_lrs())


def test_unknown_multimodal_family_is_guessed_and_warned(family_trees):
    """A model_type mixspec has not verified gets roles from names, marked as guessed."""
    import dataclasses

    from mixspec.language.loader import load_spec_text
    from mixspec.models.registry import find_roles
    from mixspec.planning.resolve import resolve

    tree = dataclasses.replace(family_trees["llava"], model_type="my_new_vlm")
    roles = find_roles(tree)
    assert roles.guessed
    assert roles.prefixes == EXPECTED_ROLES["llava"]
    plan = resolve(load_spec_text(
        "version: 1\nmodel: x/y\ncomponents:\n  vision: {train: full, lr: 1.0e-5}\n", "s.yaml"), tree)
    [warning] = [w for w in plan.warnings_problems if w.path == "model"]
    assert "my_new_vlm" in warning.message and "vision=model.vision_tower" in warning.message
    assert warning.location.line == 2


# Families mixspec has not verified (roles guessed, with a warning), as transformers builds them
# from its own default config: what their modelling code names the vision tower, the bridge to
# the LLM, and the LLM (read from each family's modeling_*.py).
GUESSED_ROLES = {
    # BLIP-2: the Q-Former, its learned queries and the projection bridge ViT and OPT
    "blip-2": {"vision": ("vision_model",), "aligner": ("language_projection", "qformer", "query_tokens"),
               "language": ("language_model",)},
    # BLIP: no LLM attribute; the text decoder is the LLM (not its embeddings module, as the
    # embedding owner's rule once found)
    "blip": {"vision": ("vision_model",), "language": ("text_decoder",)},
    "kosmos-2": {"vision": ("vision_model",), "aligner": ("image_to_text_projection",),
                 "language": ("text_model",)},
    "video_llava": {"vision": ("model.image_tower", "model.video_tower"),
                    "aligner": ("model.multi_modal_projector",), "language": ("model.language_model",)},
    "paddleocr_vl": {"vision": ("model.visual",), "aligner": ("model.projector",),
                     "language": ("model.language_model",)},
}


@pytest.mark.parametrize("model_type", sorted(GUESSED_ROLES))
def test_roles_guessed_for_unverified_families(model_type, tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from mixspec.models.registry import find_roles
    from mixspec.models.sources import find_model
    from mixspec.models.tree import build_tree

    config = AutoConfig.for_model(model_type).to_dict()
    config["architectures"] = [MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type]]
    tree = build_tree(find_model(str(write_config_dir(config, tmp_path / model_type))))
    roles = find_roles(tree)
    assert roles.guessed
    for role, prefixes in GUESSED_ROLES[model_type].items():
        assert roles.prefixes.get(role) == prefixes, (role, roles.prefixes)
    if "aligner" not in GUESSED_ROLES[model_type]:
        assert "aligner" not in roles.prefixes, roles.prefixes
