#!/usr/bin/env python3
"""Activation memory: mixspec's estimate against the bytes autograd really saves, on CPU.

For each model (the catalog's real configs), one real-width block of each kind (the LLM's
decoder layer, the vision tower's block) is built on the meta device from the real config,
materialised on the CPU in bf16 and run forward on a random input under
``torch.autograd.graph.saved_tensors_hooks``, which counts every storage autograd keeps for
the backward pass (each storage once; parameters excluded, and the rotary tables: the
estimate counts those once per model). Training modes: the block fully
trained; frozen with LoRA on every Linear (dropout 0 and 0.05, rank 16, PEFT); frozen with a
gradient passing through (something below it trains); frozen with nothing trainable below
(nothing may be saved). Sequence lengths 256 and 1024 (vision: patches). The loss term: a
hidden state through the real-size lm_head and transformers' causal-LM loss.

    python benchmarks/activation_check.py [--json FILE] [--seq 256,1024]

Prints one row per (model, block, mode, length): measured bytes, estimated bytes, ratio.
Saved bytes do not depend on the device: what a GPU keeps for the same ops is the same.
Exit status 1 when a ratio leaves [0.9, 1.1].
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "mllama": transformers' MllamaConfig defaults, which are Llama-3.2-11B-Vision's dimensions
# (its published config is not in the catalog)
MODELS = ("Qwen/Qwen2.5-VL-7B-Instruct", "llava-hf/llava-1.5-7b-hf", "google/gemma-3-4b-it", "mllama")
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


def _config(model_id):
    import transformers

    if model_id == "mllama":
        config = transformers.MllamaConfig()
        config.architectures = ["MllamaForConditionalGeneration"]
        return config
    return transformers.AutoConfig.from_pretrained(ROOT / "compiler" / "catalog" / model_id)


def plan_tree(model_id):
    from mixspec.loader import load_spec
    from mixspec.registry import find_roles
    from mixspec.resolve import load_tree_for

    with tempfile.TemporaryDirectory() as tmp:
        ref = model_id
        if model_id == "mllama":
            (Path(tmp) / "m").mkdir()
            (Path(tmp) / "m" / "config.json").write_text(_config(model_id).to_json_string())
            ref = str(Path(tmp) / "m")
        spec = Path(tmp) / "s.yaml"
        spec.write_text(f"version: 1\nmodel: {ref}\ncomponents:\n  language: {{train: full, lr: 1.0e-5}}\n")
        tree = load_tree_for(load_spec(spec))
    tree = tree[0] if isinstance(tree, tuple) else tree
    return tree, find_roles(tree)


def meta_model(model_id):
    import torch
    import transformers

    config = _config(model_id)
    config._attn_implementation = "sdpa"
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = "sdpa"
    cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = cls._from_config(config)
    return model, config


def materialise(module):
    import torch

    module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
        for name, b in module.named_buffers():
            b.zero_()
    return module.to(torch.bfloat16)


def block_call(model_id, role, block, seq, hidden, head_dim):
    """A function running the block on a random (grad-carrying, if asked) input, and the
    storages to exclude (the input, the rotary tables)."""
    import torch

    def make(requires_grad):
        if role == "vision" and "Qwen" in model_id:
            x = torch.randn(seq, hidden, dtype=torch.bfloat16, requires_grad=requires_grad)
            cos = torch.randn(seq, head_dim, dtype=torch.float32)
            sin = torch.randn(seq, head_dim, dtype=torch.float32)
            cu = torch.tensor([0, seq], dtype=torch.int32)
            return x, (cos, sin), lambda: block(x, cu_seqlens=cu, position_embeddings=(cos, sin))
        x = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=requires_grad)
        if role == "vision":  # CLIP / SigLIP encoder layers: no rotary tables
            return x, (), lambda: block(x, attention_mask=None)
        shape = (1, seq, head_dim)
        cos = torch.randn(*shape, dtype=torch.bfloat16)
        sin = torch.randn(*shape, dtype=torch.bfloat16)
        pos = torch.arange(seq)[None]
        return x, (cos, sin), lambda: block(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))

    return make


def check_model(model_id, model, config, tree, roles, seqs, results):
    """Every block kind of the LLM and the vision tower, and the loss head: rows appended to results."""
    from mixspec.activations import block_kinds

    for role in ("language", "vision"):
        exclude = roles.prefixes.get("aligner", ()) if role == "vision" else ()
        for kind in block_kinds(tree, roles.prefixes.get(role, ()), exclude=exclude):
            if any("cross_attn" in l.name for l in kind.linears):
                print(f"{model_id:<30} {role}: {kind.prefix} {list(kind.indices)}: cross-attention layers, "
                      "not measured (their keys/values come from the vision tokens)")
                continue
            run_block(model_id, role, kind, model, config, seqs, results)
    run_loss(model_id, tree, config, seqs, results)


def run_block(model_id, role, kind, model, config, seqs, results):
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from mixspec.activations import Training, block_bytes_per_token

    name = f"{kind.prefix}.{kind.indices[0]}"
    text = config.get_text_config() if role == "language" else config.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if role == "vision" and "Qwen" in model_id:
        head_dim = (text.hidden_size // text.num_heads) // 2 * 2
    linears = [l.name for l in kind.linears]
    modes = {
        "full": dict(train="full"),
        "lora-d0": dict(train="lora", dropout=0.0),
        "lora-d0.05": dict(train="lora", dropout=0.05),
        "frozen-grad-through": dict(train="none", grad=True),
        "frozen-nothing-below": dict(train="none", grad=False),
    }
    for mode, how in modes.items():
        block = materialise(copy.deepcopy(model.get_submodule(name)))  # LoRA injection edits in place
        block.requires_grad_(how["train"] == "full")
        lora = {}
        if how["train"] == "lora":
            cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=how["dropout"], target_modules=linears)
            block = inject_adapter_in_model(cfg, block)
            for n, p in block.named_parameters():
                p.requires_grad_("lora_" in n)
                if "lora_" in n:
                    p.data = p.data.to(torch.bfloat16)
            lora = {l: (16, how["dropout"]) for l in linears}
        full = frozenset(f"{l.name}.weight" for l in kind.linears) | frozenset(
            f"{n[0]}.weight" for n in kind.norms) | frozenset(kind.gates) if how["train"] == "full" else frozenset()
        grad_in = how.get("grad", how["train"] != "none")
        for seq in seqs:
            make = block_call(model_id, role, block, seq, kind.hidden, head_dim)
            x, rot, run = make(grad_in)
            # the block's input counts (a LayerNorm keeps it), the rotary tables do not (once per model)
            exclude = {t.untyped_storage().data_ptr() for t in rot}
            exclude |= {p.untyped_storage().data_ptr() for p in block.parameters()}
            t0 = time.perf_counter()
            measured, _ = saved_bytes(run, exclude)
            seconds = time.perf_counter() - t0
            per_token = block_bytes_per_token(kind, Training(full, lora), 2, grad_in)
            estimated = sum(per_token.values()) * seq
            results.append({"model": model_id, "block": f"{role}: {name}", "mode": mode, "tokens": seq,
                            "measured": measured, "estimated": estimated,
                            "ratio": (estimated / measured) if measured else (1.0 if not estimated else None),
                            "seconds": round(seconds, 2)})
            print_row(results[-1])


def run_loss(model_id, tree, config, seqs, results):
    """lm_head (frozen, real vocab) + transformers' causal-LM loss on a hidden state that needs a gradient."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from mixspec.activations import loss_bytes_per_token

    head = tree.by_name[tree.output_embedding]
    vocab, hidden = head.out_features, head.in_features
    lm_head = torch.nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    for seq in seqs:
        x = torch.randn(1, seq, hidden, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (1, seq))

        def run():
            logits = lm_head(x)
            return ForCausalLMLoss(logits, labels, vocab_size=vocab)

        exclude = {x.untyped_storage().data_ptr(), lm_head.weight.untyped_storage().data_ptr()}
        measured, _ = saved_bytes(run, exclude)
        estimated = loss_bytes_per_token(vocab, hidden, 2, lm_head_trains=False)["saved"] * seq
        results.append({"model": model_id, "block": "loss: lm_head + cross-entropy", "mode": "lm_head frozen",
                        "tokens": seq, "measured": measured, "estimated": estimated,
                        "ratio": estimated / measured, "seconds": None})
        print_row(results[-1])


def print_row(r):
    if QUIET:
        return
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
    print(f"{r['model']:<30} {r['block']:<48} {r['mode']:<22} {r['tokens']:>6} "
          f"{r['measured'] / 2**20:>10.1f} MiB {r['estimated'] / 2**20:>10.1f} MiB  {ratio}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--seq", default="256,1024", help="sequence lengths (tokens, or patches for vision)")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    seqs = [int(s) for s in args.seq.split(",")]
    results = []
    print(f"{'model':<30} {'block':<48} {'mode':<22} {'tokens':>6} {'measured':>14} {'estimated':>14}  ratio")
    for model_id in args.models.split(","):
        tree, roles = plan_tree(model_id)
        model, config = meta_model(model_id)
        check_model(model_id, model, config, tree, roles, seqs, results)
        del model
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    bad = [r for r in results if r["ratio"] is not None and not 0.9 <= r["ratio"] <= 1.1]
    bad += [r for r in results if r["ratio"] is None]
    print(f"{len(results) - len(bad)} of {len(results)} rows within ±10%")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
