"""FSDP2 for real, on CPU: the generated train.py in 2 processes (torchrun, gloo) with
MIXSPEC_FSDP_ON_CPU=1, on tiny LLaVA and Gemma 3 with the vision tower full, the aligner full
and LoRA on the LLM, each at its own learning rate.

Against oracles outside mixspec:
- during the first step every parameter is a torch DTensor holding its rank's shard (half the
  rows of a 2-row-divisible tensor);
- after one step, the weights gathered by torch's own get_model_state_dict: frozen ones
  bit-identical to the model on disk, and each component's largest change equal to its
  learning rate (AdamW's first step moves every element with a gradient by about lr);
- the same spec without fsdp, one process, micro-batch 2 (the same global batch of the same 2
  rows): the same trained weights within fp32 tolerance;
- the checkpoint (adapter_model.safetensors + trained_params.safetensors) merges with
  ``train.py --merge`` into a model whose weights are base + the LoRA product (computed here
  from the gathered adapter) and the trained parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from mixspec.language.loader import load_spec  # noqa: E402
from mixspec.output import write_files  # noqa: E402
from mixspec.planning.resolve import plan_spec  # noqa: E402
from mixspec.targets import TargetOptions, render  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_tiny_vlm  # noqa: E402
import tiny_families  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")

SPEC = """\
version: 1
model: {model}
components:
  vision: {{train: full, lr: 2.0e-5}}
  aligner: {{train: full, lr: 1.0e-4}}
  language: {{train: lora, lr: 5.0e-4, lora: {{rank: 4, alpha: 8, dropout: 0.0, targets: all-linear}}}}
training: {{epochs: 1, max_steps: 1, micro_batch_size: {micro}, gradient_accumulation: 1, precision: fp32,
           gradient_checkpointing: {gc}, max_length: 512, logging_steps: 1, lr_scheduler: constant,
           save_steps: 100}}
data: {{train: data.jsonl}}
{distributed}
output_dir: run
"""

# runs the generated train.py's own functions (build_trainer, train, save_model), then records
# what torch says about the parameters during the step and gathers the weights with torch's API
DRIVER = textwrap.dedent('''\
    import importlib.util, json, os, sys
    from transformers import TrainerCallback
    spec = importlib.util.spec_from_file_location("train_under_test", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = sys.argv[3]
    trainer = mod.build_trainer(mod.parse_args(["--data", sys.argv[2], "--output-dir", out, "--max-steps", "1"]))
    probe = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            from torch.distributed.tensor import DTensor
            params = dict(trainer.model.named_parameters())
            probe["params"] = len(params)
            probe["dtensors"] = sum(isinstance(p, DTensor) for p in params.values())
            probe["shapes"] = {mod.plan_name(n): [list(p.to_local().shape), list(p.shape)]
                               for n, p in params.items() if isinstance(p, DTensor)}
            probe["groups"] = sorted({(g["name"].split("/")[0], g["lr"]) for g in trainer.optimizer.param_groups})

        # bytes this rank holds, as torch reports them: parameters, gradients before the step,
        # AdamW's moments after it
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            probe["grad_bytes"] = sum(mod.local_shard(p.grad).nbytes for p in params if p.grad is not None)
            # trained but unused by the forward (LLaVA's last vision layer): no gradient to hold
            probe["no_grad_numel"] = sum(p.numel() for p in params if p.grad is None)

        def on_step_end(self, args, state, control, **kwargs):
            import torch
            probe["param_bytes"] = sum(mod.local_shard(p).nbytes for p in trainer.model.parameters())
            probe["optimizer_bytes"] = sum(mod.local_shard(v).nbytes for st in trainer.optimizer.state.values()
                                           for v in st.values() if torch.is_tensor(v) and v.dim() > 0)

    trainer.add_callback(Probe())
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = trainer.model.state_dict()
    if int(os.environ.get("RANK", "0")) == 0:
        from safetensors.torch import save_file
        save_file({mod.plan_name(k): v.detach().clone().contiguous() for k, v in state.items()},
                  os.path.join(out, "after.safetensors"))
        print("RESULT " + json.dumps({"engine": type(trainer.accelerator.state.distributed_type).__name__ + "."
                                      + str(trainer.accelerator.state.distributed_type.value), **probe}))
''')


def _run(args, cwd, timeout=240):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=dict(ENV, MIXSPEC_FSDP_ON_CPU="1"),
                          capture_output=True, text=True, timeout=timeout)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _compile(workdir: Path, model: Path, fsdp: bool):
    name = "fsdp" if fsdp else "single"
    spec = workdir / f"{name}.yaml"
    spec.write_text(SPEC.format(
        model=model, micro=1 if fsdp else 2, gc="true" if fsdp else "false",
        distributed="distributed: {gpus_per_node: 2, fsdp: full_shard}" if fsdp else ""), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    out = workdir / f"out-{name}"
    write_files(out, render(plan, "hf", TargetOptions()), force=True)
    return plan, out


def _rows(workdir: Path) -> Path:
    from PIL import Image

    rows = []
    for name, colour, word in (("red.png", (200, 30, 30), "Red."), ("blue.png", (30, 30, 200), "Blue, quite dark.")):
        Image.new("RGB", (48, 40), colour).save(workdir / name)
        rows.append({"messages": [{"role": "user", "content": "<image>What colour is this?"},
                                  {"role": "assistant", "content": word}], "images": [name]})
    path = workdir / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path):
    """A safetensors file; PEFT's base_layer names as the base model's (q_proj.base_layer.weight -> q_proj.weight)."""
    from safetensors.torch import load_file

    return {n.replace(".base_layer.", "."): v for n, v in load_file(str(path)).items()}


def _base_weights(model_dir: Path) -> dict:
    """The model directory's weights as transformers loads them (its names, fp32)."""
    import transformers

    arch = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


_RUNS: dict = {}


def _two_process_run(family: str, tmp_path_factory) -> dict:
    """Compile for FSDP2 and train one step in 2 processes (once per family and session)."""
    if family in _RUNS:
        return _RUNS[family]
    workdir = tmp_path_factory.mktemp(f"fsdp-{family}")
    if family == "llava":
        model = make_tiny_vlm.make_tiny_llava(workdir / "model")
    else:
        model = tiny_families.make_tiny(family, workdir / "model")
    data = _rows(workdir)
    driver = workdir / "drive.py"
    driver.write_text(DRIVER, encoding="utf-8")
    plan, out = _compile(workdir, model, fsdp=True)
    two = _result(_run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        driver, out / "train.py", data, workdir / "run2"], cwd=workdir))
    _RUNS[family] = {"family": family, "workdir": workdir, "model": model, "data": data, "plan": plan,
                     "out": out, "driver": driver, "two": two}
    return _RUNS[family]


@pytest.fixture(scope="module", params=["llava", "gemma3"])
def fsdp_run(request, tmp_path_factory):
    return _two_process_run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory):
    """The comparisons that cost a second run (one process, the merge) on one family."""
    return _two_process_run("llava", tmp_path_factory)


def test_two_processes_shard_every_parameter_and_keep_the_planned_groups(fsdp_run):
    two, plan = fsdp_run["two"], fsdp_run["plan"]
    assert two["engine"].endswith("FSDP")
    assert two["params"] == two["dtensors"] > 0
    # a tensor with an even first dimension holds half of its rows on each rank
    halves = [(local, full) for local, full in two["shapes"].values() if full and full[0] % 2 == 0]
    assert halves and all(local[0] * 2 == full[0] and local[1:] == full[1:] for local, full in halves)
    assert two["groups"] == sorted([c.name, c.lr] for c in plan.components if c.trainable_params)


def test_each_rank_holds_the_model_states_mixspec_estimates(fsdp_run):
    """Rank 0's parameter, gradient and AdamW bytes (torch's local shards) against the
    estimate's per-GPU weights, gradients and optimizer states (fp32, 2 ranks: the whole
    model's / 2; shards of odd-sized tensors differ by a row, hence 3%)."""
    from mixspec.planning.estimate import estimate

    two, est = fsdp_run["two"], estimate(fsdp_run["plan"])
    assert est.fsdp == "full_shard" and est.world_size == 2
    # the estimate holds a gradient and AdamW's moments for every trained parameter; torch
    # none for one the forward never uses
    unused = two["no_grad_numel"] / 2
    for measured, planned in ((two["param_bytes"], est.weights_bytes),
                              (two["grad_bytes"], est.gradients_bytes - 4 * unused),
                              (two["optimizer_bytes"], est.optimizer_bytes - 8 * unused)):
        assert abs(measured - planned) <= 0.03 * planned, (measured, planned)


def test_frozen_bit_identical_each_component_moves_by_its_lr(fsdp_run):
    plan, base = fsdp_run["plan"], _base_weights(fsdp_run["model"])
    after = _load(fsdp_run["workdir"] / "run2" / "after.safetensors")
    trained = plan.trainable_lrs()
    frozen = [n for n in base if n in after and n not in trained]
    assert len(frozen) > 10
    for name in frozen:
        assert torch.equal(after[name], base[name]), f"frozen parameter changed: {name}"
    for comp in plan.components:
        if comp.mode == "full":
            moved = max(float((after[n] - base[n]).abs().max()) for n in comp.trainable_names)
        else:  # lora_B starts at zero (lora_A gets no gradient on the first step)
            moved = max(float(after[n].abs().max()) for n in comp.trainable_names if ".lora_B." in n)
        # fp32 rounding of weight - lr: within 1% of lr at these weight sizes
        assert 0.9 * comp.lr < moved <= 1.01 * comp.lr, (comp.name, moved, comp.lr)


def test_one_process_same_global_batch_gives_the_same_weights(llava_run):
    fsdp_run = llava_run
    workdir = fsdp_run["workdir"]
    _, out = _compile(workdir, fsdp_run["model"], fsdp=False)
    one = _result(_run([fsdp_run["driver"], out / "train.py", fsdp_run["data"], workdir / "run1"], cwd=workdir))
    assert one["dtensors"] == 0
    one_w = _load(workdir / "run1" / "after.safetensors")
    two_w = _load(workdir / "run2" / "after.safetensors")
    assert set(one_w) == set(two_w)
    for name in sorted(fsdp_run["plan"].trainable_lrs()):
        torch.testing.assert_close(two_w[name], one_w[name], rtol=1e-5, atol=1e-7, msg=name)


def test_one_process_on_cpu_refuses_rather_than_run_ddp(llava_run):
    """Where accelerate does not set up FSDP (here: one process, no GPU), train.py stops."""
    proc = subprocess.run([sys.executable, llava_run["out"] / "train.py", "--data", llava_run["data"],
                           "--output-dir", llava_run["workdir"] / "run-refused", "--max-steps", "1"],
                          cwd=llava_run["workdir"], env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the plan shards with FSDP2 but accelerate set up DistributedType.NO" in proc.stderr
    assert "Traceback" not in proc.stderr and not (llava_run["workdir"] / "run-refused" / "final").exists()


def test_gathered_checkpoint_merges(llava_run):
    import importlib.util

    workdir, plan = llava_run["workdir"], llava_run["plan"]
    final = workdir / "run2" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "trained_params.safetensors").is_file()
    spec = importlib.util.spec_from_file_location("train_merge", llava_run["out"] / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    merged = workdir / "merged"
    assert module.merge(module.parse_args(["--merge", str(final), "--out", str(merged),
                                           "--model", str(llava_run["model"])])) == 0
    after, base = _load(workdir / "run2" / "after.safetensors"), _base_weights(llava_run["model"])
    got = _base_weights(merged)
    full = {n for c in plan.components if c.mode == "full" for n in c.trainable_names}
    for name in full:
        assert torch.equal(got[name], after[name]), name
    lora = next(c for c in plan.components if c.mode == "lora")
    scale = lora.lora.alpha / lora.lora.rank
    for target in lora.lora.targets:
        a, b = after[f"{target}.lora_A.default.weight"], after[f"{target}.lora_B.default.weight"]
        # the merged weight is the base plus the adapter's product (fp32 rounding of the sum aside)
        torch.testing.assert_close(got[f"{target}.weight"] - base[f"{target}.weight"], scale * (b @ a),
                                   rtol=1e-3, atol=1e-8, msg=target)
