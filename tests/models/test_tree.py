"""Module trees: exact parameter counts of the catalog, meta-device trees equal real ones,
and the on-disk cache (hit without torch, corrupt entries rebuilt, keys that change)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tinymodels import build_model, tiny_config, write_config_dir

# Published reference data (/work/shared/models/README.md): exact totals of each catalog
# model, cross-checked there against model cards and an analytic formula.
PUBLISHED_TOTALS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": 3_754_622_976,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8_292_166_656,
    "Qwen/Qwen2.5-VL-72B-Instruct": 73_410_777_344,
    "Qwen/Qwen2-VL-2B-Instruct": 2_208_985_600,
    "Qwen/Qwen2-VL-7B-Instruct": 8_291_375_616,
    "Qwen/Qwen3-VL-8B-Instruct": 8_767_123_696,
    "llava-hf/llava-1.5-7b-hf": 7_063_427_072,
    "google/gemma-3-4b-it": 4_300_079_472,
    "google/paligemma2-3b-pt-224": 3_032_242_416,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
}
# Catalog models whose input and output embeddings are one tensor (counted once).
TIED = {"Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "google/gemma-3-4b-it",
        "google/paligemma2-3b-pt-224"}


def catalog_tree(model_id):
    from mixspec.models.sources import find_model
    from mixspec.models.tree import get_tree

    return get_tree(find_model(model_id))


def test_catalog_is_the_published_list():
    from mixspec.models.sources import catalog_ids

    assert sorted(catalog_ids()) == sorted(PUBLISHED_TOTALS)


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_TOTALS))
def test_catalog_total_equals_published(model_id):
    tree = catalog_tree(model_id)
    assert tree.total_params == PUBLISHED_TOTALS[model_id]
    assert bool(tree.tied) == (model_id in TIED)
    # every alias points at a parameter that is itself counted
    for alias, canon in tree.tied.items():
        assert canon in tree.param_shapes and canon not in tree.tied
        assert tree.param_shapes[alias] == tree.param_shapes[canon]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llava_next", "mllama"])
def test_meta_tree_equals_tree_of_the_real_model(tmp_path, family):
    """build_tree (meta device, from config.json) records what the CPU model really has."""
    from mixspec.models.sources import find_model
    from mixspec.models.tree import build_tree, tree_from_model

    cfg = tiny_config(family)
    meta = build_tree(find_model(str(write_config_dir(cfg, tmp_path / family))))
    real = tree_from_model(build_model(cfg))
    assert meta.architecture == real.architecture
    assert meta.param_shapes == real.param_shapes
    assert meta.tied == real.tied
    assert [m.to_json() for m in meta.modules] == [m.to_json() for m in real.modules]
    assert (meta.input_embedding, meta.output_embedding) == (real.input_embedding, real.output_embedding)


def test_sizes_held_as_tensors_are_recorded_as_ints():
    """Modelling code may build a Linear with tensor sizes (transformers 5.24's Inkling vision
    tower did): the tree records the weight's shape as plain ints and stays JSON."""
    import torch
    from torch import nn

    from mixspec.models.tree import tree_from_model

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 5)
            self.proj.in_features, self.proj.out_features = torch.tensor(3), torch.tensor(5)
            self.conv = nn.Conv2d(2, 4, 3, groups=2)
            self.conv.groups = torch.tensor(2)

    tree = tree_from_model(Odd())
    proj, conv = tree.by_name["proj"], tree.by_name["conv"]
    assert (proj.in_features, proj.out_features) == (3, 5)
    assert conv.groups == 2 and conv.kernel == (3, 3)
    assert all(type(v) is int for v in (proj.in_features, proj.out_features, conv.groups, *conv.kernel))
    json.dumps(tree.to_json())


def test_tree_json_round_trip():
    from mixspec.models.tree import ModuleTree

    tree = catalog_tree("google/gemma-3-4b-it")
    again = ModuleTree.from_json(json.loads(json.dumps(tree.to_json())))
    assert again == tree
    assert again.total_params == tree.total_params


# -- cache -------------------------------------------------------------------------------

@pytest.fixture
def tiny_source(tmp_path, monkeypatch):
    """A local tiny Qwen2.5-VL model dir and an empty cache dir of its own. The config keeps
    the catalog's flat layout with a legacy rope_scaling block, which transformers rewrites
    in place while it builds the model (the cache key must not see that)."""
    from mixspec.models.sources import find_model

    monkeypatch.setenv("MIXSPEC_CACHE_DIR", str(tmp_path / "cache"))
    base = find_model("Qwen/Qwen2.5-VL-3B-Instruct").config
    path = write_config_dir(tiny_config("qwen2_5_vl", base), tmp_path / "qwen")
    return find_model(str(path))


def test_second_get_tree_is_a_cache_hit(tiny_source, monkeypatch):
    from mixspec.models import tree as tree_mod

    first = tree_mod.get_tree(tiny_source)
    assert list((tree_mod.cache_dir() / "trees").glob("*.json"))

    def no_build(*args, **kwargs):
        raise AssertionError("the tree was built again instead of read from the cache")

    monkeypatch.setattr(tree_mod, "build_tree", no_build)
    from mixspec.models.sources import find_model

    again = tree_mod.get_tree(find_model(tiny_source.path))  # the config read anew
    assert again == first


def test_warm_plan_imports_neither_torch_nor_transformers(tiny_source, tmp_path):
    from mixspec.models.tree import get_tree

    get_tree(tiny_source)  # warm the cache
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        model: {tiny_source.path}
        components:
          vision: {{train: full, lr: 1.0e-5}}
          language: {{train: lora, lr: 1.0e-4}}
        """), encoding="utf-8")
    code = textwrap.dedent(f"""\
        import sys
        from mixspec.language.loader import load_spec
        from mixspec.planning.resolve import plan_spec
        plan = plan_spec(load_spec({str(spec)!r}))
        print(plan.totals.base_params)
        print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ}, timeout=120)
    assert out.returncode == 0, out.stderr
    total, imported = out.stdout.splitlines()
    assert int(total) == get_tree(tiny_source).total_params
    assert imported == "[]"


def test_corrupt_cache_entry_is_rebuilt(tiny_source, monkeypatch):
    from mixspec.models import tree as tree_mod

    good = tree_mod.get_tree(tiny_source)
    [path] = (tree_mod.cache_dir() / "trees").glob("*.json")
    real_build = tree_mod.build_tree
    for garbage in ('{"key": "x", "tree": ', "[]", "null", json.dumps({"key": path.stem, "tree": {"format": 1}}),
                    path.read_text(encoding="utf-8")[:-40], "\x00\xff"):
        path.write_text(garbage, encoding="utf-8", errors="surrogateescape")
        assert tree_mod.get_tree(tiny_source) == good
        # the entry was rewritten whole: the next call reads it without building
        monkeypatch.setattr(tree_mod, "build_tree", lambda *a, **k: pytest.fail("cache entry not rewritten"))
        assert tree_mod.get_tree(tiny_source) == good
        monkeypatch.setattr(tree_mod, "build_tree", real_build)


def test_cache_key_changes_with_config_and_versions(tiny_source, monkeypatch):
    from mixspec.models import tree as tree_mod

    config = tiny_source.config
    key = tree_mod.cache_key(config)
    assert key == tree_mod.cache_key(json.loads(json.dumps(config)))  # content, not identity
    changed = json.loads(json.dumps(config))
    changed["vision_config"]["depth"] = 3
    assert tree_mod.cache_key(changed) != key
    assert tree_mod.cache_key(config, trust_remote_code=True) != key
    monkeypatch.setattr(tree_mod, "library_versions",
                        lambda: {"transformers": "9.99.0", "torch": "2.13.0", "tree_format": "1"})
    assert tree_mod.cache_key(config) != key


def test_changed_config_gets_its_own_tree(tiny_source, tmp_path):
    from mixspec.models.sources import find_model
    from mixspec.models.tree import get_tree

    small = get_tree(tiny_source)
    cfg = json.loads(json.dumps(tiny_source.config))
    cfg["vision_config"]["depth"] = 3
    bigger = get_tree(find_model(str(write_config_dir(cfg, tmp_path / "qwen3blocks"))))
    block = sum(n for p, n in small.param_numel.items() if p.startswith("model.visual.blocks.0."))
    assert bigger.total_params == small.total_params + block


def test_cache_key_covers_the_tree_building_source(tmp_path, monkeypatch):
    """Any edit to mixspec's tree-building code gives new keys: a tree built by the old code
    is not served (the format number was never bumped across eight edits of tree.py)."""
    from mixspec.models import tree as tree_mod

    monkeypatch.setenv("MIXSPEC_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tree.py"
    source.write_bytes(Path(tree_mod.__file__).read_bytes())
    monkeypatch.setattr(tree_mod, "_BUILDER_FILES", (source,))
    config = {"model_type": "toy", "hidden_size": 8}
    key = tree_mod.cache_key(config)
    tree_mod.store_tree(config, tree_mod.ModuleTree("toy", "Toy", (tree_mod.ModuleInfo("", "Toy"),), {},
                                                    "", "", "", False, {}))
    assert tree_mod.load_cached_tree(config) is not None
    source.write_bytes(source.read_bytes().replace(b"kind = CONV1D_GPT2", b"kind = CONV"))
    assert tree_mod.cache_key(config) != key
    assert tree_mod.load_cached_tree(config) is None
    # the module's real source is what the key covers by default
    monkeypatch.undo()
    assert tree_mod._BUILDER_FILES == (Path(tree_mod.__file__),)


_REMOTE_CONFIG = """\
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "toyremote"

    def __init__(self, hidden_size=8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
"""

_REMOTE_MODEL = """\
from torch import nn
from transformers import PreTrainedModel

from .configuration_toy import ToyConfig


class ToyForCausalLM(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()
"""


def test_remote_code_edit_gives_a_new_tree(tmp_path):
    """trust_remote_code: the model repo's Python files are part of the cache key, so an
    edited modelling file is built again, not served from the cache."""
    model = tmp_path / "toy"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "toyremote", "architectures": ["ToyForCausalLM"], "hidden_size": 8,
        "auto_map": {"AutoConfig": "configuration_toy.ToyConfig",
                     "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"}}), encoding="utf-8")
    (model / "configuration_toy.py").write_text(_REMOTE_CONFIG, encoding="utf-8")
    (model / "modeling_toy.py").write_text(_REMOTE_MODEL, encoding="utf-8")
    env = {**os.environ, "MIXSPEC_CACHE_DIR": str(tmp_path / "cache"), "HF_MODULES_CACHE": str(tmp_path / "mods"),
           "HF_HUB_OFFLINE": "1"}

    def tree_text():
        result = subprocess.run([sys.executable, "-m", "mixspec", "tree", "--trust-remote-code", str(model)],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    first = tree_text()
    assert "72 params" in first and "head" not in first
    assert tree_text() == first  # cached
    (model / "modeling_toy.py").write_text(_REMOTE_MODEL.replace(
        "        self.post_init()", "        self.head = nn.Linear(config.hidden_size, 2)\n        self.post_init()"),
        encoding="utf-8")
    second = tree_text()
    assert "head Linear 18" in second and "90 params" in second
