"""Weight decay is decided once, in the Plan, and refereed on real module instances.

- The Plan's no-decay set equals one computed here from the real modules of tiny models of
  every registered family (isinstance checks on torch's norm classes, the class names in the
  MRO, ``param.ndim``), not from mixspec's tree.
- ``mixspec.planning.decay.transformers_decays`` (what swift and LLaMA-Factory do by themselves)
  equals transformers' own ``Trainer.get_decay_parameter_names`` on the same models, bare
  and wrapped by PEFT.
- Targets follow: swift uses its flags only when its rule gives the Plan's sets.
"""

from __future__ import annotations

import copy
import textwrap

import pytest

from tinymodels import build_model, families, tiny_config

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from torch import nn  # noqa: E402

from mixspec.planning.decay import transformers_decays  # noqa: E402
from mixspec.language.loader import load_spec_text  # noqa: E402
from mixspec.planning.resolve import resolve  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from mixspec.models.tree import tree_from_model

    cache = {}

    def get(family):
        if family not in cache:
            model = build_model(tiny_config(family))
            cache[family] = (model, tree_from_model(model))
        return cache[family]

    return get


def plan_of(tree, family, components):
    body = textwrap.indent(textwrap.dedent(components).strip("\n"), "  ")
    return resolve(load_spec_text(f"version: 1\nmodel: tiny/{family}\ncomponents:\n{body}\n", "decay.yaml"), tree)


EVERYTHING = """
    everything:
      modules: ['.*']
      train: full
      lr: 1.0e-5
      weight_decay: 0.1
"""


def _referee_no_decay(model) -> set[str]:
    """Biases, parameters of normalisation modules and other 1-D parameters, from the modules."""
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    if hasattr(nn, "RMSNorm"):
        norm_types += (nn.RMSNorm,)
    out = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, norm_types) or any(
            c.__name__.endswith("Norm") for c in type(module).__mro__)
        for local, param in module.named_parameters(recurse=False):
            name = f"{mod_name}.{local}" if mod_name else local
            if is_norm or param.ndim < 2 or local == "bias" or local.endswith("_bias"):
                out.add(name)
    return out


@pytest.mark.parametrize("family", families())
def test_plan_no_decay_equals_referee(tiny, family):
    model, tree = tiny(family)
    plan = plan_of(tree, family, EVERYTHING)
    comp = plan.component("everything")
    canonical = {n for n, _ in model.named_parameters()}  # tied aliases once
    assert set(comp.trainable_names) == canonical
    assert set(comp.no_decay) == _referee_no_decay(model) & canonical
    assert comp.no_decay_params == sum(p.numel() for n, p in model.named_parameters() if n in set(comp.no_decay))
    wds = plan.trainable_weight_decays()
    assert {n for n, wd in wds.items() if wd == 0.0} == set(comp.no_decay)
    assert {wd for n, wd in wds.items() if n not in comp.no_decay} == {0.1}


@pytest.mark.parametrize("family", families())
def test_transformers_rule_mirror_equals_transformers(tiny, family):
    from transformers import Trainer

    model, tree = tiny(family)
    plan = plan_of(tree, family, EVERYTHING)
    layernorm = frozenset(plan.layernorm_modules)
    real = set(Trainer.get_decay_parameter_names(None, model))
    names = [n for n, _ in model.named_parameters()]
    assert {n for n in names if transformers_decays(n, layernorm)} == real & set(names)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "mllama"])
def test_lora_adapters_decay_dora_magnitudes_do_not(tiny, family):
    """LoRA A/B decay; DoRA's magnitude vectors are 1-D and do not. Checked against the
    parameters PEFT creates, and transformers' rule mirrored on the PEFT-wrapped model."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    model, tree = tiny(family)
    plan = plan_of(tree, family, """
        language: {train: lora, lr: 1.0e-4, weight_decay: 0.01, lora: {rank: 4, alpha: 8, dora: true}}
    """)
    comp = plan.component("language")
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=list(comp.lora.targets), r=4,
                                                              lora_alpha=8, use_dora=True))
    params = {n.removeprefix("base_model.model."): p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert set(params) == set(comp.trainable_names)
    assert set(comp.no_decay) == {n for n, p in params.items() if p.ndim < 2}
    assert comp.no_decay and all(".lora_magnitude_vector." in n for n in comp.no_decay)
    assert comp.no_decay_params == sum(params[n].numel() for n in comp.no_decay)
    real = {n.removeprefix("base_model.model.") for n in Trainer.get_decay_parameter_names(None, wrapped)}
    layernorm = frozenset(plan.layernorm_modules)
    assert {n for n in params if transformers_decays(n, layernorm)} == real & set(params)


def test_qwen25vl_vision_norms_differ_from_transformers_rule(tiny):
    """The case the issue found: Qwen2.5-VL's vision norm1/norm2 and the merger's ln_q are
    RMSNorm modules whose names transformers' patterns miss."""
    from transformers import Trainer

    model, tree = tiny("qwen2_5_vl")
    plan = plan_of(tree, "qwen2_5_vl", """
        vision: {train: full, lr: 2.0e-6, weight_decay: 0.1}
        aligner: {train: full, lr: 1.0e-5, weight_decay: 0.1}
    """)
    norms = {f"model.visual.blocks.{i}.norm{j}.weight" for i in (0, 1) for j in (1, 2)}
    norms.add("model.visual.merger.ln_q.weight")
    no_decay = set(plan.component("vision").no_decay) | set(plan.component("aligner").no_decay)
    assert norms <= no_decay
    assert norms <= set(Trainer.get_decay_parameter_names(None, model))  # transformers decays them


SWIFT_BASE = """\
version: 1
model: Qwen/Qwen2.5-VL-3B-Instruct
components:
{components}
training: {{weight_decay: {wd}}}
data: {{train: data/train.jsonl}}
"""


def _swift_decision(components: str, wd: float):
    from mixspec.planning.resolve import plan_spec
    from mixspec.targets import TargetOptions
    from mixspec.targets.swift import decide

    text = SWIFT_BASE.format(components=textwrap.indent(textwrap.dedent(components).strip("\n"), "  "), wd=wd)
    # in fp32: in bf16 swift's full tuner would train in bf16, and that alone sends it to the plugin
    text = text.replace("training: {weight_decay", "training: {precision: fp32, weight_decay")
    plan = plan_spec(load_spec_text(text, "swift.yaml"))
    return plan, decide(plan, TargetOptions())


def test_swift_flags_only_when_its_rule_gives_the_plans_decay_sets():
    # the ViT's RMSNorm weights: transformers' rule decays them, the Plan does not -> plugin
    components = """
        vision: {train: full, lr: 2.0e-6}
        aligner: {train: full, lr: 1.0e-5}
        language: {train: full, lr: 1.0e-5}
    """
    _, d = _swift_decision(components, 0.1)
    assert d.lr_mode == "plugin"
    assert [r.code for r in d.plugin_reasons] == ["weight-decay-rule", "weight-decay-rule"]
    assert "model.visual.blocks.0.norm1.weight" in d.plugin_reasons[0].what
    # no weight decay anywhere: the rules cannot differ in effect -> swift's own flags
    _, d = _swift_decision(components, 0.0)
    assert d.lr_mode == "multimodal" and not d.plugin_reasons
    # the LLM alone: its norms are named *norm, transformers' patterns agree -> flags
    _, d = _swift_decision("language: {train: full, lr: 1.0e-5}", 0.1)
    assert not d.plugin_reasons, d.plugin_reasons


def test_llamafactory_refuses_a_decay_set_it_cannot_give():
    from mixspec.errors import UnsupportedError
    from mixspec.planning.resolve import plan_spec
    from mixspec.targets import TargetOptions, render

    text = SWIFT_BASE.format(components="  vision: {train: full, lr: 2.0e-6}", wd=0.1)
    plan = plan_spec(load_spec_text(text, "lf.yaml"))
    with pytest.raises(UnsupportedError) as exc:
        render(plan, "llamafactory", TargetOptions())
    assert "weight-decay-rule" in {p.code for p in exc.value.items}
    files = render(plan, "llamafactory", TargetOptions(approximate=True))
    assert "transformers' rule decides which parameters" in files["train.yaml"]
    # weight decay 0: nothing to differ
    text = SWIFT_BASE.format(components="  vision: {train: full, lr: 2.0e-6}", wd=0.0)
    render(plan_spec(load_spec_text(text, "lf.yaml")), "llamafactory", TargetOptions())
