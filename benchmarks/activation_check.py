#!/usr/bin/env python3
"""Activation memory: mixspec's estimate against the bytes autograd really saves, on CPU, with
each block prepared the way the target prepares it.

For each model, a copy of its real config with two LLM layers, two vision blocks and a
small vocabulary (the blocks keep their real widths) is planned by mixspec with a spec per
training mode; the hf target renders its train.py, and that program's own ``setup_model``
(load in ``weights_dtype``, ``apply_plan``: PEFT's get_peft_model, then the fp32 upcast of
what trains) prepares the model, from random weights instead of a checkpoint (its
``load_model`` is the one function replaced). Under DeepSpeed the engine's own cast follows
(``DeepSpeedEngine._cast_module_mixed_precision``, bf16). Each block then runs forward on a
random grad-carrying input, under CPU bf16 autocast when the policy autocasts (as the Trainer
does without DeepSpeed), inside ``torch.autograd.graph.saved_tensors_hooks``, which sees every
storage autograd keeps for backward (each once; parameters and rotary tables excluded). With
checkpointing, transformers' own (``gradient_checkpointing_enable`` with the policy's
use_reentrant) wraps the block.

    python benchmarks/activation_check.py [--json FILE] [--seq 256] [--models ...]

One row per (model, policy, mode, block, checkpointing): measured, estimated, ratio. Exit 1
when a ratio leaves [0.95, 1.05]. Two ops differ on the CPU (CPU autocast keeps LayerNorm in
bf16 where CUDA's runs it in fp32; CPU dropout keeps its mask in the input's dtype, CUDA a
bool): the estimate is asked for ``device="cpu"`` here, which changes only those two terms.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("Qwen/Qwen2.5-VL-7B-Instruct", "llava-hf/llava-1.5-7b-hf", "google/gemma-3-4b-it", "mllama")
# how each role trains in a mode (LoRA rank 16 on every Linear the role's all-linear covers)
_LORA = "{{train: lora, lr: 1.0e-4, lora: {{rank: 16, alpha: 32, dropout: {d}, targets: all-linear}}}}"
MODES = {
    "full": {"vision": "{train: full, lr: 1.0e-5}", "aligner": "{train: full, lr: 1.0e-5}",
             "language": "{train: full, lr: 1.0e-5}"},
    "lora-d0": {"vision": _LORA.format(d=0.0), "aligner": "{train: full, lr: 1.0e-5}",
                "language": _LORA.format(d=0.0)},
    "lora-d0.05": {"vision": _LORA.format(d=0.05), "aligner": "{train: full, lr: 1.0e-5}",
                   "language": _LORA.format(d=0.05)},
    "aligner-only": {"aligner": "{train: full, lr: 1.0e-5}"},  # LLM frozen, a gradient passes through
}
POLICIES = ("hf", "hf+deepspeed")
QUIET = False  # tests set it


def saved_bytes(run, exclude):
    """Bytes of the distinct storages autograd saves while `run()` executes (minus `exclude`)."""
    import torch

    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in exclude and key not in seen:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def base_config(model_id) -> dict:
    import transformers

    if model_id == "mllama":  # MllamaConfig's defaults are Llama-3.2-11B-Vision's dimensions
        config = transformers.MllamaConfig()
        config.architectures = ["MllamaForConditionalGeneration"]
        return config.to_dict()
    return json.loads((ROOT / "compiler" / "models" / "catalog" / model_id / "config.json").read_text())


def config_object(model_id):
    """The model's real config as a transformers object."""
    import transformers

    data = base_config(model_id)
    return transformers.AutoConfig.for_model(data["model_type"], **{k: v for k, v in data.items() if k != "model_type"})


def reduced_config(config: dict) -> dict:
    """The config with two LLM layers and two vision blocks (a stack needs two to be found as
    one), a 512-token vocabulary; widths unchanged."""
    cfg = copy.deepcopy(config)
    text = cfg.get("text_config", cfg)
    text.update(num_hidden_layers=2, vocab_size=512)
    if (text.get("pad_token_id") or 0) >= 512:
        text["pad_token_id"] = 0
    text.pop("layer_types", None)
    if "cross_attention_layers" in text:
        text["cross_attention_layers"] = []
    text.pop("max_window_layers", None)
    vision = cfg.get("vision_config") or {}
    if "depth" in vision:
        vision.update(depth=2, fullatt_block_indexes=[1])
    if "num_hidden_layers" in vision:
        vision["num_hidden_layers"] = 2
    if "num_global_layers" in vision:
        vision["num_global_layers"] = 2
        vision["intermediate_layers_indices"] = [0]
    for key in ("image_token_index", "image_token_id"):
        if key in cfg:
            cfg[key] = 511
    return cfg


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(config: dict, components: dict, deepspeed: bool, workdir: Path, name: str = "m"):
    """(model prepared as train.py prepares it, Plan, the estimate's policy for this CPU run)."""
    import torch

    from mixspec.api import load_spec, plan_spec, render
    from mixspec.planning.policy import execution_policy

    model_dir = workdir / name
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    lines = ["version: 1", f"model: {model_dir}", "components:"]
    lines += [f"  {role}: {how}" for role, how in components.items()]
    lines += ["training: {precision: bf16, gradient_checkpointing: false}"]
    if deepspeed:
        lines += ["distributed: {zero_stage: 2}"]
    spec = workdir / f"{name}.yaml"
    spec.write_text("\n".join(lines) + "\n")
    plan = plan_spec(load_spec(spec))
    program = workdir / f"{name}_train.py"
    program.write_text(render(plan, "hf")["train.py"])
    train = _import(program, f"train_{name}")
    train.load_model = _random_loader(train)
    dtype = train.weights_dtype("bf16", "ds_config.json" if deepspeed else None)
    model, _ = train.setup_model(str(model_dir), dtype=dtype)
    if deepspeed:
        deepspeed_cast(model, torch.bfloat16)
    policy = dataclasses.replace(execution_policy(plan, "hf"), device="cpu")
    return model, plan, policy


def _random_loader(train):
    """train.py's load_model, building the planned class from the config with random weights
    (no checkpoint on disk) in the dtype it is asked for."""
    import torch
    import transformers

    def load_model(model_ref, meta=False, dtype=torch.float32):
        config = transformers.AutoConfig.from_pretrained(model_ref)
        torch.manual_seed(0)
        return train.model_class()._from_config(config, dtype=dtype)

    return load_model


def deepspeed_cast(model, dtype):
    """DeepSpeed's own module cast (the engine's, without building an engine)."""
    from deepspeed.runtime.engine import DeepSpeedEngine, keep_in_fp32_pattern

    engine = object.__new__(DeepSpeedEngine)
    engine.__dict__["module"] = model
    DeepSpeedEngine._cast_module_mixed_precision(engine, dtype, None, False, keep_in_fp32_pattern(model, None, dtype))


def _block(model, name):
    for prefix in ("base_model.model.", ""):
        try:
            return model.get_submodule(prefix + name)
        except AttributeError:
            continue
    raise KeyError(name)


def block_inputs(model_id, role, block, hidden, seq):
    """(input, rotary tables, kwargs) for one block of `role` (a grad-carrying bf16 input)."""
    import torch

    head_dim = next(m.head_dim for m in block.modules() if isinstance(getattr(m, "head_dim", None), int))
    x_shape = (seq, hidden) if (role == "vision" and "qwen" in model_id.lower()) else (1, seq, hidden)
    x = torch.randn(*x_shape, dtype=torch.bfloat16, requires_grad=True)
    if role == "vision" and "qwen" in model_id.lower():
        rot = (torch.randn(seq, head_dim), torch.randn(seq, head_dim))
        return x, rot, {"cu_seqlens": torch.tensor([0, seq], dtype=torch.int32), "position_embeddings": rot}
    if role == "vision":
        return x, (), {"attention_mask": None}
    rot = (torch.randn(1, seq, head_dim, dtype=torch.bfloat16), torch.randn(1, seq, head_dim, dtype=torch.bfloat16))
    return x, rot, {"attention_mask": None, "position_ids": torch.arange(seq)[None], "position_embeddings": rot}


def measure_block(model, model_id, config, role, kind, seq, checkpointing, reentrant):
    """Saved bytes of block `kind.indices[0]` of `role` for `seq` tokens (its input grad-carrying)."""
    import torch

    block = _block(model, f"{kind.prefix}.{kind.indices[0]}")
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_disable()
    x, rot, kwargs = block_inputs(model_id, role, block, kind.hidden, seq)
    exclude = {t.untyped_storage().data_ptr() for t in rot}
    exclude |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=_AUTOCAST[0])
    with autocast:
        measured, _ = saved_bytes(lambda: block(x, **kwargs), exclude)
    return measured


_AUTOCAST = [False]


def estimate_block(plan, policy, kind, seq, checkpointing, grad_in=True) -> float:
    from mixspec.planning.activations import block_bytes_per_token, block_fixed_bytes, block_index_training
    from mixspec.planning.estimate import _trained_sets

    full, lora = _trained_sets(plan)
    training = block_index_training(kind, kind.indices[0], full, lora)
    per_token = sum(block_bytes_per_token(kind, training, policy.activation_bytes, grad_in, policy=policy).values())
    if not per_token:
        return 0.0
    if checkpointing and kind.checkpointed and (policy.checkpoint_frozen_blocks or training.full or training.lora):
        return float(policy.activation_bytes * kind.hidden * seq)
    return per_token * seq + block_fixed_bytes(kind, training, policy)


CHECKPOINTING = ((False, False), (True, False), (True, True))  # (on, use_reentrant)


def check(model_id, policy_name, mode, seq, workdir, results, config=None, ckpt=CHECKPOINTING):
    """Rows for every block kind of the LLM and the vision tower of one prepared model
    (``config``: a config dict to use instead of the model's reduced one)."""
    from mixspec.planning.activations import BlockKind

    config = config or reduced_config(base_config(model_id))
    model, plan, policy = prepare(config, MODES[mode], policy_name.endswith("deepspeed"), workdir,
                                  name=f"{model_id.replace('/', '_')}_{policy_name}_{mode}".replace("+", "_"))
    _AUTOCAST[0] = policy.autocast
    for role in ("language", "vision"):
        for data in plan.structure.get(role, ()):
            kind = BlockKind.from_json(data)
            if any("cross_attn" in l.name for l in kind.linears):
                continue  # Mllama's cross-attention layers: not measured (keys/values from the vision tokens)
            for checkpointing, reentrant in ckpt:
                measured = measure_block(model, model_id, config, role, kind, seq, checkpointing, reentrant)
                pol = dataclasses.replace(policy, checkpoint_reentrant=reentrant)
                estimated = estimate_block(plan, pol, kind, seq, checkpointing)
                results.append({"model": model_id, "policy": policy_name, "mode": mode,
                                "block": f"{role}: {kind.prefix}.{kind.indices[0]}",
                                "checkpointing": ("reentrant" if reentrant else "non-reentrant") if checkpointing
                                else "off", "tokens": seq, "measured": measured, "estimated": estimated,
                                "ratio": estimated / measured if measured else (1.0 if not estimated else None)})
                print_row(results[-1])
    del model


def print_row(r):
    if QUIET:
        return
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
    print(f"{r['model']:<28} {r['policy']:<13} {r['mode']:<12} {r['block']:<46} {r['checkpointing']:<13} "
          f"{r['tokens']:>5} {r['measured'] / 2**20:>9.2f} {r['estimated'] / 2**20:>9.2f}  {ratio}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--seq", type=int, default=256, help="tokens (patches for vision blocks)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--policies", default=",".join(POLICIES))
    args = parser.parse_args(argv)
    results: list = []
    print(f"{'model':<28} {'policy':<13} {'mode':<12} {'block':<46} {'checkpointing':<13} {'tokens':>5} "
          f"{'meas MiB':>9} {'est MiB':>9}  ratio")
    with tempfile.TemporaryDirectory() as tmp:
        for model_id in args.models.split(","):
            for policy_name in args.policies.split(","):
                for mode in args.modes.split(","):
                    check(model_id, policy_name, mode, args.seq, Path(tmp), results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    bad = [r for r in results if r["ratio"] is None or not 0.95 <= r["ratio"] <= 1.05]
    print(f"{len(results) - len(bad)} of {len(results)} rows within ±5%")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
