"""The execution policy (mixspec.planning.policy) against what the target's own code does, and the
estimate it drives against numbers measured outside mixspec.

- dtypes: a tiny Qwen2.5-VL prepared by the generated train.py's own setup_model (and, under
  DeepSpeed, the engine's own module cast) holds frozen, LoRA and fully trained parameters in
  exactly the dtypes the policy names;
- the issue's measurement (outside this repository, saved-tensor hooks on a Qwen2.5-7B-width
  layer, LoRA r16 on every Linear, s=1024): 7,233 MiB for 28 layers + loss as train.py runs it
  without DeepSpeed, 6,372 MiB under DeepSpeed bf16; the estimate must be within 5%;
- `plan --target` / `fit --target` name the policy and refuse an unknown target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

TEXT_SPEC = """\
version: 1
model: Qwen/Qwen2.5-7B-Instruct
components:
  language:
    train: lora
    lr: 1.0e-4
    lora: {rank: 16, alpha: 32, dropout: 0.0, targets: all-linear}
training: {micro_batch_size: 1, gradient_checkpointing: false, max_length: 1024}
"""

_DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}


@pytest.mark.parametrize("deepspeed", [False, True])
def test_train_py_holds_parameters_in_the_policys_dtypes(tmp_path, deepspeed):
    pytest.importorskip("peft")
    if deepspeed:
        pytest.importorskip("deepspeed")
    import activation_check
    import make_tiny_vlm

    config = make_tiny_vlm.tiny_qwen25vl_config(num_layers=2)
    components = {"vision": "{train: full, lr: 1.0e-5}",
                  "language": "{train: lora, lr: 1.0e-4, lora: {rank: 4, alpha: 8, targets: all-linear}}"}
    model, plan, policy = activation_check.prepare(config, components, deepspeed, tmp_path)
    full = {n for c in plan.components if c.mode == "full" for n in c.params}
    seen = {"frozen": set(), "lora": set(), "full": set()}
    for name, param in model.named_parameters():
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        kind = "lora" if "lora_" in name else "full" if plain in full else "frozen"
        seen[kind].add(str(param.dtype))
    assert seen["frozen"] == {_DTYPES[policy.frozen_dtype]}
    assert seen["lora"] == {_DTYPES[policy.adapter_dtype]}
    assert seen["full"] == {_DTYPES[policy.trained_dtype]}
    assert policy.autocast is not deepspeed
    if deepspeed:  # the engine cast everything to bf16
        assert (policy.frozen_dtype, policy.adapter_dtype, policy.trained_dtype) == ("bf16",) * 3
    else:  # PEFT's autocast_adapter_dtype and train.py's upcast
        assert (policy.frozen_dtype, policy.adapter_dtype, policy.trained_dtype) == ("bf16", "fp32", "fp32")


@pytest.mark.parametrize("zero_stage, measured_mib", [(None, 7233), (2, 6372)])
def test_text_lora_activations_match_the_issue_measurement(tmp_path, zero_stage, measured_mib):
    from mixspec.api import estimate_memory, load_spec, plan_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(TEXT_SPEC + (f"distributed: {{zero_stage: {zero_stage}}}\n" if zero_stage else ""))
    est = estimate_memory(plan_spec(load_spec(spec)))
    acts = est.activation_bytes / 2**20
    assert abs(acts / measured_mib - 1) <= 0.05, (acts, measured_mib)
    # the two runs differ by the adapters' input copies under autocast (8 bytes x hidden per token)
    assert est.policy.autocast is (zero_stage is None)


def test_plan_and_fit_name_the_targets_policy(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TEXT_SPEC)
    run = lambda *args: subprocess.run([sys.executable, "-m", "mixspec", *args], capture_output=True,  # noqa: E731
                                       text=True, cwd=tmp_path)
    text = run("plan", str(spec)).stdout
    assert "as train.py runs it: bf16 autocast, LoRA weights fp32" in text
    data = json.loads(run("plan", str(spec), "--json", "--target", "llamafactory").stdout)
    assert data["estimate"]["policy"]["target"] == "llamafactory"
    assert data["estimate"]["policy"]["checkpoint_reentrant"] is True
    fit = json.loads(run("fit", str(spec), "--gpu-memory", "80", "--json", "--target", "swift").stdout)
    assert fit["policy"]["target"] == "swift"
    bad = run("plan", str(spec), "--target", "nope")
    assert bad.returncode == 2 and "unknown target 'nope'" in bad.stderr


def test_the_aligner_term_matches_the_merger_as_train_py_runs_it():
    """Qwen2.5-VL's merger (RMSNorm, Linear, GELU, Linear), fully trained in fp32 under CPU bf16
    autocast as train.py holds it: saved bytes against the estimate's aligner term."""
    import dataclasses

    torch = pytest.importorskip("torch")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    import activation_check
    from mixspec.planning.estimate import _aligner_bytes
    from mixspec.planning.policy import ExecutionPolicy

    hidden, out, merge, tokens = 64, 96, 4, 256
    merger = Qwen2_5_VLPatchMerger(dim=out, context_dim=hidden, spatial_merge_size=2).float()
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    exclude = {p.untyped_storage().data_ptr() for p in merger.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured, _ = activation_check.saved_bytes(lambda: merger(x), exclude | {x.untyped_storage().data_ptr()})
    names = {n: f"m.{n}" for n, _ in merger.named_parameters()}
    st = {"aligner_norms": [["m.ln_q", "norm", hidden, "Qwen2_5_VLRMSNorm"]],
          "aligner_linears": [["m.mlp.0", hidden * merge, hidden * merge], ["m.mlp.2", hidden * merge, out]]}
    policy = dataclasses.replace(ExecutionPolicy("hf", "ddp", "bf16", True, "bf16", "fp32", "fp32"), device="cpu")
    estimated = _aligner_bytes(st, set(names.values()), {}, 2, tokens / merge, merge, policy, True)
    assert abs(estimated / measured - 1) <= 0.05, (estimated, measured)
