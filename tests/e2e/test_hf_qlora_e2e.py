"""End to end on CPU: QLoRA (nf4 LLM + LoRA) with a fully trained ViT and aligner and
bitsandbytes AdamW8bit, through the generated train.py, on tiny Gemma 3 and LLaVA (image rows:
both processors load without torchvision; Gemma 3 is where short skip names failed).

Oracles: the modules bitsandbytes holds in the trained model (bnb.nn.Linear4bit, found by
class), the weights before and after two steps, the storage bytes of every weight, quantization
state, gradient and optimizer state tensor, against the Plan and mixspec's estimate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from mixspec.planning.estimate import estimate  # noqa: E402
from mixspec.planning.quantize import optimizer_state_bytes  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
import make_tiny_vlm  # noqa: E402
import tiny_families  # noqa: E402
from test_hf_e2e import compile_spec, import_train, run_script, snapshot, write_jsonl  # noqa: E402

SPEC = """\
version: 1
model: {model}
components:
  vision: {{train: full, lr: 1.0e-4}}
  aligner: {{train: full, lr: 3.0e-4}}
  language:
    train: lora
    lr: 1.0e-3
    quantize: nf4
    lora: {{rank: 4, alpha: 8, targets: all-linear}}
training: {{max_steps: 2, micro_batch_size: 2, precision: bf16, gradient_checkpointing: false,
           max_length: 256, logging_steps: 1, lr_scheduler: constant, save_steps: 100, optimizer: adamw_8bit}}
data: {{train: data.jsonl}}
output_dir: {out}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qmodels")
    return {"gemma3": tiny_families.make_tiny("gemma3", root / "gemma3"),
            "llava": make_tiny_vlm.make_tiny_llava(root / "llava")}


def image_rows(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    make_tiny_vlm.make_image(images / "red.png", (56, 56), (200, 30, 30))
    make_tiny_vlm.make_image(images / "blue.png", (80, 64), (30, 30, 200))
    return [{"messages": [{"role": "user", "content": "<image>What colour is this?"},
                          {"role": "assistant", "content": "Red."}], "images": ["img/red.png"]},
            {"messages": [{"role": "user", "content": "<image>And this?"},
                          {"role": "assistant", "content": "Blue."}], "images": ["img/blue.png"]}]


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def weight_tensors(model):
    out = []
    for p in model.parameters():
        out.append(p.data)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested else [])
        out.append(getattr(p, "SCB", None))  # int8: one fp32 scale a row
    for m in model.modules():  # after a forward, Linear8bitLt keeps the row scales in its state
        if isinstance(m, bnb.nn.Linear8bitLt):
            out.append(m.state.SCB)
    return out


def quantized_modules(model, module, method):
    """Base-model names of the modules bitsandbytes holds (inside PEFT's LoRA wrappers too)."""
    kind = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    return {module.plan_name(n).removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, kind)}


def optimizer_tensors(optimizer):
    """Every tensor of the optimizer's moments; torchao's low-bit states are tensor subclasses
    (codes, scales, lookup table), taken apart."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def inner(t):
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            return [x for n in names for x in inner(getattr(t, n))]
        return [t]

    return [x for s in optimizer.state.values() for k, t in s.items() if k != "step" and torch.is_tensor(t)
            for x in inner(t)]


@pytest.mark.parametrize("family,method,optimizer", [
    ("gemma3", "nf4", "adamw_8bit"), ("llava", "nf4", "adamw_8bit"), ("llava", "int8", "adamw_8bit"),
    ("llava", "nf4", "adamw_torch_8bit"),  # torchao's 8-bit AdamW (transformers' adamw_torch_8bit)
])
def test_qlora_two_steps_as_planned(models, tmp_path, family, method, optimizer):
    if optimizer.startswith("adamw_torch"):
        pytest.importorskip("torchao.optim")
    plan, out = compile_spec(tmp_path, SPEC.format(model=models[family], out=tmp_path / "run").replace(
        "quantize: nf4", f"quantize: {method}").replace("optimizer: adamw_8bit", f"optimizer: {optimizer}"))
    write_jsonl(tmp_path / "data.jsonl", image_rows(tmp_path))
    module = import_train(out / "train.py", f"train_qlora_{family}")
    trainer = module.build_trainer(module.parse_args(["--data", str(tmp_path / "data.jsonl")]))
    model = trainer.model
    planned = set(plan.component("language").quantize.modules)
    assert quantized_modules(model, module, method) == planned and planned

    before = snapshot(model)
    trainer.train()
    assert trainer.state.global_step == 2
    built = type(getattr(trainer.optimizer, "optimizer", trainer.optimizer))
    assert built.__name__ == "AdamW8bit"
    assert built.__module__.split(".")[0] == ("torchao" if optimizer.startswith("adamw_torch") else "bitsandbytes")
    lrs = plan.trainable_lrs()
    moved = {}
    for name, p in model.named_parameters():
        base = module.plan_name(name)
        if p.requires_grad:
            delta = (p.detach().float() - before[name].float()).abs().max().item()
            comp = next(c.name for c in plan.components if base in c.trainable_names)
            moved[comp] = max(moved.get(comp, 0.0), delta / lrs[base])
        else:
            assert torch.equal(p.detach(), before[name]), f"frozen parameter changed: {name}"
    # each Adam step moves an element by about the LR (|m/sqrt(v)| about 1 on the first steps): 2 steps, ~2 LR
    assert set(moved) == {"vision", "aligner", "language"}
    for comp, ratio in moved.items():
        assert 1.5 <= ratio <= 2.2, (comp, ratio)

    # --merge: dequantized base + trained parts + adapter, a plain model with no bnb module
    final = tmp_path / "final"
    trainer.save_model(str(final))
    merged = module.load_trained(str(final), str(models[family])).merge_and_unload()
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    state = {module.plan_name(n).replace(".base_layer", ""): p for n, p in model.named_parameters()}
    for name, p in merged.named_parameters():  # the fully trained parts are the run's
        if name in state and state[name].requires_grad:
            assert torch.equal(p.detach().float(), state[name].detach().float()), name

    # model states: every weight (quantized data and state), gradient and optimizer tensor
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    model.train()
    model(**batch).loss.backward()
    weights = storage_bytes(weight_tensors(model))
    grads = storage_bytes([p.grad for p in model.parameters() if p.grad is not None])
    optim = storage_bytes(optimizer_tensors(trainer.optimizer))
    # LLaVA never runs its last vision layer nor the post-layernorm (vision_feature_layer -2):
    # no gradient, no optimizer state there
    unused = {module.plan_name(n): p.numel() for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    allowed = ("model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm.")
    assert all(n.startswith(allowed) for n in unused) and (family == "llava") == bool(unused), sorted(unused)
    est = estimate(plan)
    est_grads = est.gradients_bytes - 4 * sum(unused.values())
    est_optim = est.optimizer_bytes - sum(optimizer_state_bytes(optimizer, n) for n in unused.values())
    for what, want, got in (("weights", est.weights_bytes, weights), ("gradients", est_grads, grads),
                            ("optimizer", est_optim, optim)):
        assert abs(want - got) <= 0.02 * got, (family, what, want, got)
    print(f"{family} {method}: max |update| / LR after 2 steps: " + ", ".join(f"{c} {r:.4f}" for c, r in sorted(moved.items())))
    print(f"{family} {method}: weights {weights} (est {est.weights_bytes:.0f}), gradients {grads} "
          f"(est {est_grads:.0f}), optimizer {optim} (est {est_optim:.0f})")


def test_check_prints_quantized_modules_and_catches_a_difference(models, tmp_path):
    plan, out = compile_spec(tmp_path, SPEC.format(model=models["gemma3"], out=tmp_path / "run"))
    ok = run_script(out / "train.py", "--check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    n = len(plan.component("language").quantize.modules)
    assert f"language             nf4        {n:>15,} {n:>15,}" in ok.stdout
    assert "self-check passed" in ok.stdout and "quantized modules" in ok.stdout
    # a skip list that leaves the vision tower to bitsandbytes is caught before any step
    module = import_train(out / "train.py", "train_qlora_check")
    module.PLAN["quantization"]["skip_modules"] = ["lm_head"]
    with pytest.raises(module.PlanMismatch) as err:
        module.setup_model(str(models["gemma3"]), meta=True)
    assert "quantized modules outside the planned ones" in str(err.value)
    assert "model.vision_tower" in str(err.value)
