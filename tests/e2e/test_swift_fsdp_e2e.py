"""ms-swift's FSDP2 for real, on CPU: the generated train.sh (``swift sft --fsdp fsdp_config.json``)
in 2 processes (swift's torchrun, gloo) on a tiny random Qwen2.5-VL with the ViT full, the
aligner full and LoRA on the LLM, each at its own learning rate, for 1 step.

accelerate never picks FSDP on a machine without GPUs: tests/e2e/swift_fsdp_cpu/sitecustomize.py
(on PYTHONPATH, MIXSPEC_FSDP_ON_CPU=1) switches the Trainer's accelerator state to FSDP with the
plugin the Trainer built from swift's JSON, so accelerate's own fsdp2_prepare_model shards. It
also records what each rank holds at the first step and gathers every parameter after training
(DTensor.full_tensor()). Against oracles outside mixspec:
- at the first step every parameter on both ranks is a torch DTensor holding half of a
  2-divisible first dimension, and the optimizer group it sits in (accelerate's, after its
  parameter swap) has the Plan's learning rate for it;
- after the step, the gathered weights: frozen ones bit-identical to the model on disk, each
  component's largest change equal to its learning rate (AdamW's first step moves every element
  with a gradient by about lr), never more;
- the checkpoint swift saved (adapter_model.safetensors + the plugin's full_params.safetensors,
  or swift's vit.safetensors) holds full shapes, equal to the gathered weights.

Two compiles of the same components: LoRA dropout 0.05 in bf16 (mixspec's plugin: its tuner and
optimizer, and its check after preparation; FSDP2's one dtype per unit holds because the plugin
keeps every trained parameter in fp32 and frozen ones in bf16, which the record checks) and
dropout 0 in fp32 (swift's own lora_llm tuner and --vit_lr/--aligner_lr optimizer, no plugin).
Needs the ms-swift venv ($MIXSPEC_SWIFT_VENV or .venv-swift). Run:
pytest -m slow tests/e2e/test_swift_fsdp_e2e.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_tiny_vlm  # noqa: E402
from swift_venv import MARKS, RUN_ARGS, swift_env  # noqa: E402

pytestmark = MARKS

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from mixspec.language.loader import load_spec  # noqa: E402
from mixspec.output import write_files  # noqa: E402
from mixspec.planning.resolve import plan_spec  # noqa: E402
from mixspec.targets import TargetOptions, render  # noqa: E402
from mixspec.targets import swift as swift_target  # noqa: E402

SHIM = ROOT / "tests" / "e2e" / "swift_fsdp_cpu"

SPEC = """\
version: 1
model: {model}
components:
  vision: {{train: full, lr: 1.0e-5}}
  aligner: {{train: full, lr: 3.0e-4}}
  language:
    train: lora
    lr: 4.0e-3
    lora: {{rank: 8, alpha: 16, dropout: {dropout}, targets: all-linear}}
training: {{max_steps: 1, micro_batch_size: 1, gradient_accumulation: 1, precision: {precision},
           gradient_checkpointing: true, max_length: 1024, lr_scheduler: constant,
           weight_decay: 0.0, logging_steps: 1, save_steps: 1, seed: 1}}
data: {{train: {data}}}
distributed: {{gpus_per_node: 2, fsdp: full_shard}}
output_dir: {out}
"""

# dropout -> (tuner, file swift saves the fully trained parameters in, precision)
CASES = {"0.05": ("plugin", swift_target.FULL_PARAMS_FILE, "bf16"), "0": ("lora_llm", "vit.safetensors", "fp32")}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("swift-fsdp")
    model = make_tiny_vlm.make_tiny_qwen25vl(root / "qwen25vl")
    data = make_tiny_vlm.colour_rows(root, sizes=((56, 56), (84, 56)))
    from transformers import Qwen2_5_VLForConditionalGeneration

    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model), dtype=torch.float32)
    initial = {n: p.detach().clone() for n, p in loaded.named_parameters()}
    return {"root": root, "model": model, "data": data, "initial": initial}


def _plain(name: str) -> str:
    """A name as in the bare model (the Plan's): PEFT's prefix and base_layer dropped, its adapter named."""
    name = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
    name = name.replace(".base_layer.", ".")
    return re.sub(r"\.(lora_A|lora_B)\.(default\.)?weight$", r".\1.default.weight", name)


def _run(tiny, dropout: str, precision: str):
    folder = tiny["root"] / f"dropout{dropout}"
    folder.mkdir()
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(model=tiny["model"], data=tiny["data"], dropout=dropout, precision=precision,
                                out=folder / "run"), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    files = render(plan, "swift", TargetOptions())
    write_files(folder / "compiled", files)
    env = swift_env(MAX_PIXELS=str(112 * 112), OMP_NUM_THREADS="1", PYTHONPATH=str(SHIM),
                    MIXSPEC_FSDP_ON_CPU="1", MIXSPEC_FSDP_RECORD=str(folder / "record"))
    start = time.monotonic()
    # --use_cpu: accelerate's MULTI_CPU (gloo) under torchrun; the shim makes it FSDP
    proc = subprocess.run(["bash", str(folder / "compiled" / "train.sh"), *RUN_ARGS, "--use_cpu", "true"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    (folder / "swift.log").write_text(log, encoding="utf-8")
    assert proc.returncode == 0, log[-6000:]
    return plan, files, folder, log, time.monotonic() - start


@pytest.mark.parametrize("dropout", list(CASES))
def test_swift_fsdp2_trains_the_plan_sharded(tiny, dropout):
    tuner, full_file, precision = CASES[dropout]
    plan, files, folder, log, took = _run(tiny, dropout, precision)
    assert ("mixspec_plugin.py" in files) == (tuner == "plugin")
    assert f"--tuner_type {tuner}" in files["train.sh"] or tuner == "plugin"
    config = json.loads(files["fsdp_config.json"])["fsdp_config"]
    assert "Using FSDP2: fsdp=full_shard auto_wrap" in log  # swift read the JSON
    planned = plan.trainable_lrs()

    # 1. at the first step: every parameter a DTensor shard on both ranks, each trained one in
    #    an optimizer group at its planned LR
    for rank in (0, 1):
        record = json.loads((folder / "record" / f"rank{rank}.json").read_text())
        assert record["distributed_type"] == "DistributedType.FSDP"
        params = record["params"]
        assert all(p["dtensor"] for p in params.values()), [n for n, p in params.items() if not p["dtensor"]][:5]
        for p in params.values():
            if p["global"] and p["global"][0] % 2 == 0:
                assert p["local"] == [p["global"][0] // 2, *p["global"][1:]], p
        lrs = {_plain(n): p["lr"] for n, p in params.items() if p["requires_grad"]}
        assert lrs == planned
        # FSDP2's dtype rule as the Plan has it: trained parameters fp32, frozen ones in the precision
        dtypes = {(p["requires_grad"], p["dtype"]) for p in params.values()}
        assert dtypes == {(True, "torch.float32"), (False, str(DTYPES[precision]))}, dtypes
    if tuner == "plugin":
        assert "[mixspec] FSDP2 check passed" in log
        report = json.loads((folder / "run" / "mixspec_check.json").read_text())
        assert report["fsdp"]["plain_params"] == report["fsdp"]["blocks_not_units"] == []
        assert report["fsdp"]["units"] >= 4  # 2 vision blocks, 2 decoder layers, and accelerate's own

    # 2. the gathered weights after the step
    final = {_plain(n): t for n, t in safetensors_torch.load_file(str(folder / "record" / "final.safetensors")).items()}
    # swift loads the model in the precision; the plugin holds what it trains in fp32 from there
    initial = {n: t.to(DTYPES[precision]) for n, t in tiny["initial"].items()}
    frozen = [n for n in initial if n not in planned]
    assert frozen and all(torch.equal(final[n], initial[n]) for n in frozen)
    moves = {}
    for comp in plan.components:
        names = [n for n in comp.trainable_names if ".lora_A." not in n]  # A: zero first gradient
        move = max((final[n] - (torch.zeros_like(final[n]) if ".lora_B." in n else initial[n].float())).abs().max().item()
                   for n in names)
        moves[comp.name] = move
        assert 0.99 * comp.lr <= move <= comp.lr * 1.0001 + 1e-7, (comp.name, comp.lr, move)

    # 3. the checkpoint: full shapes, the gathered weights
    ckpt = folder / "run" / "checkpoint-1"
    saved = {_plain(k): t for k, t in safetensors_torch.load_file(str(ckpt / "adapter_model.safetensors")).items()}
    saved.update({_plain(k): t for k, t in safetensors_torch.load_file(str(ckpt / full_file)).items()})
    assert set(saved) == set(planned)
    for name, tensor in saved.items():
        assert tensor.shape == final[name].shape and torch.equal(tensor, final[name]), name
    print(json.dumps({"case": f"dropout {dropout}, {precision}", "tuner": tuner, "seconds": round(took, 1),
                      "units": config["transformer_layer_cls_to_wrap"], "frozen_tensors": len(frozen),
                      "trained_tensors": len(planned),
                      "plan_lrs": {c.name: c.lr for c in plan.components if c.trainable_names},
                      "max_step1_move": {k: float(f"{v:.4g}") for k, v in moves.items()}}))
