"""Activation estimate against the bytes autograd really saves (the oracle: storages counted by
``torch.autograd.graph.saved_tensors_hooks`` while real blocks run forward on the CPU).

The same check as benchmarks/activation_check.py (which runs the real widths of the catalog
models and is recorded in docs/memory-check.md), on the same architectures shrunk so that it
takes seconds: each block kind of the LLM and of the vision tower, prepared by the generated
train.py (and DeepSpeed's own cast) for each policy, fully trained, LoRA with and without
dropout, frozen with a gradient passing through; checkpointing off and on. Then a whole model: a planned LoRA on late layers only, where the layers
below must keep nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import activation_check  # noqa: E402


from mixspec.models.registry import find_roles  # noqa: E402
from mixspec.models.tree import tree_from_model  # noqa: E402

activation_check.QUIET = True


def _layers(text, n):
    text.num_hidden_layers = n
    if getattr(text, "layer_types", None):
        text.layer_types = (list(text.layer_types) * n)[:n]
    if hasattr(text, "max_window_layers"):
        text.max_window_layers = n


def _shrink(config: dict) -> dict:
    """A family's config dict with tiny widths (2 LLM layers, 2 vision blocks, vocab 512)."""
    import copy

    cfg = copy.deepcopy(config)
    text = cfg.get("text_config", cfg)
    vision = cfg["vision_config"]
    text.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512)
    text.pop("layer_types", None)
    text.pop("max_window_layers", None)
    if "head_dim" in text:
        text["head_dim"] = 64
    if (text.get("pad_token_id") or 0) >= 512:
        text["pad_token_id"] = 0
    for key in ("rope_scaling", "rope_parameters"):
        rope = text.get(key) or cfg.get(key)
        if isinstance(rope, dict) and "mrope_section" in rope:
            rope["mrope_section"] = [8, 12, 12]
    if "cross_attention_layers" in text:  # Mllama
        text["cross_attention_layers"] = [1]
    if "num_global_layers" in vision:  # Mllama's ViT: 2 layers and 2 gated global layers
        vision.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_global_layers=2,
                      attention_heads=4, intermediate_layers_indices=[0], vision_output_dim=256)
    elif "depth" in vision:  # Qwen2.5-VL's ViT
        vision.update(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                      fullatt_block_indexes=[1])
        cfg.update(hidden_size=256)
    else:
        vision.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    for key in ("image_token_index", "image_token_id"):
        if key in cfg:
            cfg[key] = 511
    return cfg


def _shrunk(model_id):
    """The tiny config as an object, and the model on the meta device."""
    data = _shrink(activation_check.base_config(model_id))
    config = transformers.AutoConfig.for_model(data["model_type"], **{k: v for k, v in data.items() if k != "model_type"})
    for sub in (config, config.get_text_config(), config.vision_config):
        sub._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])._from_config(config)
    return model, config


@pytest.mark.parametrize("model_id", ["Qwen/Qwen2.5-VL-7B-Instruct", "llava-hf/llava-1.5-7b-hf",
                                      "google/gemma-3-4b-it", "mllama"])
def test_each_block_kind_saves_what_the_estimate_says(model_id, tmp_path):
    """Each block kind prepared by the generated train.py (and DeepSpeed's cast), under each
    policy, trained fully, with LoRA (dropout 0 and 0.05), frozen with a gradient through;
    checkpointing off, non-reentrant and reentrant: within 5% of the saved bytes."""
    config = _shrink(activation_check.base_config(model_id))
    results = []
    for policy in activation_check.POLICIES:
        for mode in activation_check.MODES:
            activation_check.check(model_id, policy, mode, 128, tmp_path, results, config=config)
    assert {(r["policy"], r["mode"], r["checkpointing"]) for r in results} >= {
        (p, m, c) for p in activation_check.POLICIES for m in ("full", "lora-d0") for c in ("off", "reentrant")}
    assert any(r["block"].startswith("vision") for r in results) and any(r["block"].startswith("language")
                                                                          for r in results)
    for r in results:
        assert r["ratio"] is not None and 0.95 <= r["ratio"] <= 1.05, r


def test_a_whole_model_keeps_nothing_below_the_first_trained_layer(tmp_path):
    """A tiny Qwen2.5-VL LLM (4 layers) with LoRA on layers 2-3 only: the whole forward with
    labels, counted, against the Plan's estimate (checkpointing off, text rows)."""
    from mixspec.planning.estimate import activation_terms
    from mixspec.language.loader import load_spec
    from mixspec.planning.policy import execution_policy
    from mixspec.planning.resolve import plan_spec

    model, config = _shrunk("Qwen/Qwen2.5-VL-7B-Instruct")
    _layers(config.get_text_config(), 4)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(config.to_json_string(), encoding="utf-8")
    seq = 128
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nmodel: {model_dir}\ncomponents:\n"
                    "  late: {modules: ['model\\.language_model\\.layers\\.[23]'], train: lora, lr: 1.0e-4,\n"
                    "         lora: {rank: 8, alpha: 16, dropout: 0.1, targets: all-linear}}\n"
                    f"training: {{max_length: {seq}, micro_batch_size: 1, gradient_checkpointing: false,"
                    " precision: bf16}\n", encoding="utf-8")
    plan = plan_spec(load_spec(spec), use_cache=False)
    # LoRA weights in bf16 and no autocast below: the DeepSpeed policy
    acts, _, _ = activation_terms(plan, None, execution_policy(plan, deepspeed=True))

    from peft import LoraConfig, get_peft_model

    real = getattr(transformers, config.architectures[0])._from_config(config).to(torch.bfloat16)
    comp = plan.component("late")
    peft_model = get_peft_model(real, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=list(comp.lora.targets)))
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, 500, (1, seq))
    params = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    measured, loss = activation_check.saved_bytes(
        lambda: peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss, params)
    estimated = sum(acts.values())
    # layers 0-1 keep nothing: the estimate holds only layers 2-3, the final norm and the loss
    per_layer = acts["llm_blocks"] / 2
    print("whole model: estimated", acts, "measured", measured)
    assert 0.9 <= estimated / measured <= 1.1, (acts, measured)
    assert measured < estimated + 0.5 * per_layer  # had layers 0-1 kept anything, far more
    assert torch.isfinite(loss)


def test_model_structure_is_computed_once_per_tree_and_roles(monkeypatch):
    """A validate of many specs reads each tree once; its structure is then computed once per
    roles (the oracle: the uncached computation), and each Plan gets its own copy."""
    from mixspec.planning import activations

    model, _ = _shrunk("Qwen/Qwen2.5-VL-7B-Instruct")
    tree = tree_from_model(model)
    roles = find_roles(tree).prefixes
    calls = []
    real = activations._model_structure
    monkeypatch.setattr(activations, "_model_structure", lambda t, r: calls.append(1) or real(t, r))
    first = activations.model_structure(tree, roles)
    second = activations.model_structure(tree, dict(roles))
    assert first == second == real(tree, roles) and len(calls) == 1
    first["language"].clear()  # a copy: the next Plan's structure is whole
    assert activations.model_structure(tree, roles) == second and len(calls) == 1
    no_vision = {k: v for k, v in roles.items() if k != "vision"}
    assert activations.model_structure(tree, no_vision) == real(tree, no_vision) and len(calls) == 2
    assert activations.model_structure(tree, no_vision)["vision"] == []


@pytest.mark.parametrize("policy_name", activation_check.POLICIES)
def test_a_whole_checkpointed_model_keeps_each_blocks_input(tmp_path, policy_name):
    """A tiny Qwen2.5-VL (4 LLM layers) prepared by the generated train.py, LoRA on layers 2-3,
    checkpointing as the Trainer turns it on for train.py (non-reentrant; transformers then
    makes the embeddings' output require a gradient): the whole text forward with labels,
    counted, against the Plan's activation terms."""
    import dataclasses

    from mixspec.planning.estimate import activation_terms

    config = _shrink(activation_check.base_config("Qwen/Qwen2.5-VL-7B-Instruct"))
    config.get("text_config", config)["num_hidden_layers"] = 4
    config["num_hidden_layers"] = 4
    late = ("{modules: ['model\\.language_model\\.layers\\.[23]'], train: lora, lr: 1.0e-4, "
            "lora: {rank: 8, alpha: 16, targets: all-linear}}")
    model, plan, policy = activation_check.prepare(config, {"late": late}, policy_name.endswith("deepspeed"), tmp_path)
    seq = plan.training.max_length
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 500, (1, seq))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=policy.autocast):
        measured, loss = activation_check.saved_bytes(
            lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss, params)
    acts, _, _ = activation_terms(plan, {"gradient_checkpointing": True}, dataclasses.replace(policy, device="cpu"))
    estimated = sum(acts.values())
    assert 0.95 <= estimated / measured <= 1.05, (acts, measured)
    assert torch.isfinite(loss)


def test_eager_attention_keeps_the_fp32_probabilities():
    """A Qwen2 decoder layer (GQA, head_dim 128) with eager attention, frozen with a gradient
    through: saved bytes against the estimate's eager terms (the sequence-squared one)."""
    from mixspec.planning.activations import Training, block_bytes_per_token, block_kinds

    config = transformers.Qwen2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    config._attn_implementation = "eager"
    model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).train().requires_grad_(False)
    seq = 256
    x = torch.randn(1, seq, 512, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    exclude = {t.untyped_storage().data_ptr() for t in (cos, sin)}
    exclude |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured, _ = activation_check.saved_bytes(
        lambda: model.model.layers[0](x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin)),
        exclude)
    tree = tree_from_model(model, "qwen2")
    kind = block_kinds(tree, find_roles(tree).prefixes["language"])[0]
    estimated = sum(block_bytes_per_token(kind, Training(frozenset(), {}), 2, True, "eager", seq).values()) * seq
    assert 0.95 <= estimated / measured <= 1.05, (estimated, measured)
