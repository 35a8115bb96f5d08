"""End to end with the real axolotl 0.19.0: compile specs with --target axolotl and run
axolotl's own config loading on each config.yml (``axolotl.cli.config.load_cfg``, what
``axolotl train`` runs first: validate_config, normalize_config, the datasets), in the venv
that scripts/axolotl_env.sh builds (.venv-axolotl, or $MIXSPEC_AXOLOTL_VENV); skipped without it.

Oracles, none computed by mixspec: axolotl accepts the config; the values it resolves
(adapter, lora_*, learning_rate, optimizer, bf16/fp16, ...) are the Plan's; on the model built
from the real config.json (the package catalog's copy) on the meta device, the modules PEFT's own matcher selects for
lora_target_modules are the Plan's LoRA targets, and the parameters axolotl's
freeze_layers_except leaves trainable for unfrozen_parameters are the Plan's trainable set.

Then what `axolotl train` builds before its trainer (axolotl.train.setup_model_and_tokenizer:
ModelLoader, PEFT, unfrozen_parameters) on a tiny random Qwen2 text model
on CPU: the parameters it leaves trainable are the Plan's (LoRA A/B of exactly the Plan's
targets; for full training with unfrozen_parameters, exactly plan.trainable_lrs()).
Not run: a VLM through the loader (no torchvision that loads against the CPU torch here), and
a training step: `axolotl train` on the tiny model (with a chat template) gets through data
preparation, the model and PEFT, then stops at the first forward in axolotl's Triton SwiGLU
LoRA kernel (axolotl/kernels/swiglu.py, a tensor made on device="cuda"), which it turns on for
LoRA by itself; CPU cannot run it. With lora_mlp_kernel/lora_qkv_kernel/lora_o_kernel: false
added by hand the step runs on CPU (1 step, checkpoint saved); not yet a test.
Run: pytest -m slow tests/e2e/test_axolotl_e2e.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mixspec.language.loader import load_spec
from mixspec.output import write_files
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, render

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MIXSPEC_AXOLOTL_VENV") or ROOT / ".venv-axolotl")
PROBE = ROOT / "tests" / "e2e" / "axolotl_probe.py"
MODELS = ROOT / "compiler" / "models" / "catalog"  # the real config.json files the package ships

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (VENV / "bin" / "python").exists(),
                       reason=f"no axolotl venv at {VENV} (bash scripts/axolotl_env.sh)"),
]

DATA = "data: {train: data/train.jsonl}\n"
OWN = {
    "text-lora-all-linear": ("Qwen/Qwen2.5-7B-Instruct",
                             "language: {train: lora, lr: 2.0e-4, lora: {rank: 16, alpha: 32, dropout: 0.05}}", ""),
    "text-late-layers-full-zero2": ("Qwen/Qwen2.5-7B-Instruct",
                                    "late: {modules: ['model\\.layers\\.(2[4-7])'], train: full, lr: 1.0e-5}",
                                    "distributed: {zero_stage: 2}\n"),
    "vl-lora-vision-language": ("Qwen/Qwen2.5-VL-7B-Instruct",
                                "vision: {train: lora, lr: 1.0e-4, lora: {rank: 8, alpha: 16}}\n"
                                "  language: {train: lora, lr: 1.0e-4, lora: {rank: 8, alpha: 16}}", ""),
}
EXAMPLES = ["gemma3-4b-lora-language", "llava15-projector-only"]


def _spec_file(tmp: Path, case: str) -> Path:
    if case in EXAMPLES:
        return ROOT / "examples" / f"{case}.yaml"
    model, components, tail = OWN[case]
    path = tmp / f"{case}.yaml"
    path.write_text(f"version: 1\nmodel: {model}\ncomponents:\n  {components}\n{DATA}{tail}", encoding="utf-8")
    return path


def _probe(config: Path, cwd: Path, *flags: str) -> dict:
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore",
           # as `axolotl preprocess` runs it: a DeepSpeed config is still read and checked
           # (HfTrainerDeepSpeedConfig), but no NCCL process group is started (none on CPU)
           "AXOLOTL_IS_PREPROCESS": "1"}
    run = subprocess.run([str(VENV / "bin" / "python"), str(PROBE), str(config), *flags], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    line = [x for x in run.stdout.splitlines() if x.startswith("PROBE ")]
    assert run.returncode == 0 and line, f"axolotl rejected {config}:\n{run.stderr[-3000:]}"
    return json.loads(line[-1][len("PROBE "):])


@pytest.mark.parametrize("case", EXAMPLES + sorted(OWN))
def test_axolotl_accepts_the_config_and_resolves_the_plan(case, tmp_path):
    plan = plan_spec(load_spec(_spec_file(tmp_path, case)))
    model_dir = MODELS / plan.model
    if not (model_dir / "config.json").exists():
        pytest.skip(f"no real config.json for {plan.model} under {MODELS}")
    files = render(plan, "axolotl", TargetOptions(model_override=str(model_dir), extra={"out_dir": "out"}))
    write_files(tmp_path / "out", files)
    got = _probe(tmp_path / "out" / "config.yml", tmp_path)
    r = got["resolved"]
    trainable = [c for c in plan.components if c.trainable_names]
    t = plan.training
    assert r["learning_rate"] == pytest.approx(float(trainable[0].lr))
    assert r["optimizer"] == "adamw_torch_fused"
    assert (r["bf16"], r["fp16"]) == (t.precision == "bf16", t.precision == "fp16")
    lora = [c for c in trainable if c.mode == "lora"]
    if lora:
        lo = lora[0].lora
        assert r["adapter"] == "lora"
        assert (r["lora_r"], r["lora_alpha"], r["lora_dropout"]) == (lo.rank, lo.alpha, lo.dropout)
        assert (bool(r["peft_use_rslora"]), bool(r["peft_use_dora"])) == (bool(lo.rslora), bool(lo.dora))
        assert got["lora_modules"] == sorted({m for c in lora for m in c.lora.targets})
    else:
        assert r["adapter"] is None
        assert got["trainable"] == sorted(plan.trainable_lrs())


TINY_CASES = {
    "lora": "language: {train: lora, lr: 1.0e-4, lora: {rank: 8, alpha: 16, dropout: 0.05}}",
    "full-part": "late: {modules: ['model\\.layers\\.1'], train: full, lr: 1.0e-5}",
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_axolotls_loader_trains_the_plans_parameters(case, tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import make_tiny_vlm
    from tinymodels import build_model, tiny_config, write_config_dir

    cfg = tiny_config("qwen2")
    model_dir = write_config_dir(cfg, tmp_path / "qwen2")
    build_model(cfg).save_pretrained(model_dir)
    make_tiny_vlm._qwen_tokenizer().save_pretrained(model_dir)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nmodel: {model_dir}\ncomponents:\n  {TINY_CASES[case]}\n{DATA}"
                    "training: {precision: fp32}\n", encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    write_files(tmp_path / "out", render(plan, "axolotl", TargetOptions(extra={"out_dir": "out"})))
    got = _probe(tmp_path / "out" / "config.yml", tmp_path, "--load")["loaded_trainable"]
    if case == "lora":
        prefix, ab = "base_model.model.", (".lora_A.default.weight", ".lora_B.default.weight")
        assert all(n.startswith(prefix) and n.endswith(ab) for n in got), got
        modules = {n[len(prefix):].rsplit(".lora_", 1)[0] for n in got}
        assert modules == {t for c in plan.components if c.lora for t in c.lora.targets}
        assert len(got) == 2 * len(modules)
    else:
        assert got == sorted(plan.trainable_lrs())
