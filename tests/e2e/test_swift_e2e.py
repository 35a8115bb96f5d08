"""End to end with the real ms-swift: compile a spec for a tiny random Qwen2.5-VL, run the
generated train.sh (``swift sft``) for 3 steps on CPU, and compare what swift trained with
the Plan.

- Trainable parameter names and count: from the checkpoint swift writes (the LoRA adapter,
  plus vit.safetensors for lora_llm or the plugin's full_params.safetensors; for full
  training, every tensor of the saved model that moved), and swift's own
  ``model_parameter_info`` line.
- Learning rates: swift's ``vit_lr: ..., aligner_lr: ..., llm_lr: ...`` line (lora_llm and
  the multimodal flags) or the plugin's self-check report; and, independent of both, the
  weights: after the first AdamW step every trained tensor has moved by at most its LR,
  and the largest move in each component is within 1% of it (Adam's first update is
  lr * g / (|g| + eps)).

Needs the ms-swift venv that scripts/swift_env.sh builds (default .venv-swift, or
$MIXSPEC_SWIFT_VENV); skipped without it. Run: pytest -m slow tests/e2e/test_swift_e2e.py
The same cases run with ``--swift-version 3`` output against ms-swift 3.x where a 3.x venv
exists (.venv-swift3 or $MIXSPEC_SWIFT3_VENV; skipped otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_tiny_vlm  # noqa: E402
from swift_venv import DUMP_PLUGIN, MARKS, RUN_ARGS, VENV, swift_env  # noqa: E402

# optional: ms-swift 3.x for --swift-version 3 output
# (MIXSPEC_SWIFT_VENV=.venv-swift3 MIXSPEC_SWIFT_VERSION=3.12.6 bash scripts/swift_env.sh)
VENV3 = Path(os.environ.get("MIXSPEC_SWIFT3_VENV") or ROOT / ".venv-swift3")
VENVS = {4: VENV, 3: VENV3}

pytestmark = MARKS

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from mixspec.language.loader import load_spec  # noqa: E402
from mixspec.output import write_files  # noqa: E402
from mixspec.planning.resolve import plan_spec  # noqa: E402
from mixspec.targets import TargetOptions, render  # noqa: E402
from mixspec.targets import swift as swift_target  # noqa: E402

RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("swift-e2e")
    model = make_tiny_vlm.make_tiny_qwen25vl(root / "qwen25vl")
    data = make_tiny_vlm.colour_rows(root, sizes=((56, 56), (84, 56), (56, 56), (84, 56)))
    # transformers < 5 (ms-swift 3.x) reads rope_scaling, not 5.x's rope_parameters
    model4 = root / "qwen25vl-for-transformers4"
    shutil.copytree(model, model4)
    cfg = json.loads((model4 / "config.json").read_text())
    rope = cfg["text_config"]["rope_parameters"]
    for part in (cfg, cfg["text_config"]):
        part["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        part["rope_theta"] = rope["rope_theta"]
    (model4 / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return {"root": root, "model": model, "model4": model4, "data": data, "initial": _model_params(model)}


def _model_params(model_dir: Path) -> dict[str, torch.Tensor]:
    """Parameters under the names the model uses (save_pretrained writes the checkpoint
    layout: `model.layers.*`, `visual.*`); loading through transformers maps them back."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


BASE = """\
version: 1
model: {model}
components:
{components}
training: {{max_steps: 3, micro_batch_size: 1, gradient_accumulation: 1, precision: fp32,
           gradient_checkpointing: true, max_length: 1024, lr_scheduler: constant,
           weight_decay: 0.0, logging_steps: 1, save_steps: 1, seed: 1}}
data: {{train: {data}}}
output_dir: {out}
"""

# name -> (components, what the target must choose: tuner, lr_mode)
CASES = {
    # 1. the seed case with dropout 0 -> --tuner_type lora_llm --vit_lr --aligner_lr
    "seed-dropout0": ("""\
  vision: {train: full, lr: 1.0e-5}
  aligner: {train: full, lr: 3.0e-4}
  language:
    train: lora
    lr: 4.0e-3
    lora: {rank: 8, alpha: 16, dropout: 0, targets: all-linear}
""", "lora_llm", "multimodal"),
    # 2. the seed case with dropout 0.05 -> the plugin (lora_llm would drop the dropout); weight
    #    decay on the ViT, whose RMSNorm weights the Plan exempts and transformers' rule does not
    "seed-dropout0.05": ("""\
  vision: {train: full, lr: 1.0e-5, weight_decay: 0.1}
  aligner: {train: full, lr: 3.0e-4}
  language:
    train: lora
    lr: 4.0e-3
    lora: {rank: 8, alpha: 16, dropout: 0.05, targets: all-linear}
""", "plugin", "plugin"),
    # 3. language LoRA + lm_head full at its own LR + vision frozen + aligner full -> the plugin
    "lmhead-aligner": ("""\
  vision: {train: freeze}
  aligner: {train: full, lr: 3.0e-4}
  language:
    train: lora
    lr: 4.0e-3
    lora: {rank: 4, alpha: 8, dropout: 0.1, targets: all-linear}
  lm_head: {train: full, lr: 2.0e-5}
""", "plugin", "plugin"),
    # 4. full training of ViT, aligner and LLM at one LR each (embeddings, lm_head frozen):
    #    swift's full tuner with an exact trainable regex, and --vit_lr/--aligner_lr
    "full-three-lrs": ("""\
  vision: {train: full, lr: 1.0e-5}
  aligner: {train: full, lr: 3.0e-4}
  language: {train: full, lr: 1.0e-3}
""", "full", "multimodal"),
    # 5. LoRA on the ViT and the LLM at different LRs: swift's LoRA tuner with an exact
    #    --target_regex, and --vit_lr for the ViT adapters
    "lora-vit-llm": ("""\
  vision:
    train: lora
    lr: 1.0e-4
    lora: {rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}
  language:
    train: lora
    lr: 4.0e-3
    lora: {rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}
""", "lora", "multimodal"),
}


def _compile(tiny, case: str, version: int):
    components, _, _ = CASES[case]
    folder = tiny["root"] / f"{case}-v{version}"
    folder.mkdir()
    spec = folder / "spec.yaml"
    spec.write_text(BASE.format(model=tiny["model"], components=components, data=tiny["data"],
                                out=folder / "run"), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    options = TargetOptions(swift_version=version, model_override=str(tiny["model4"]) if version == 3 else None)
    files = render(plan, "swift", options)
    write_files(folder / "compiled", files)
    return plan, folder, files, options


def _env(version: int) -> dict:
    return swift_env(VENVS[version], MAX_PIXELS=str(112 * 112))


def _run(folder: Path, version: int = 4) -> tuple[str, float]:
    start = time.monotonic()
    proc = subprocess.run(["bash", str(folder / "compiled" / "train.sh"), *RUN_ARGS], cwd=folder,
                          env=_env(version), capture_output=True, text=True, timeout=900)
    took = time.monotonic() - start
    log = proc.stdout + proc.stderr
    (folder / "swift.log").write_text(log, encoding="utf-8")
    assert proc.returncode == 0, log[-6000:]
    return log, took


def _plain(name: str) -> str:
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _adapter_names(ckpt: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors under Plan names (PEFT drops the adapter name when saving)."""
    out = {}
    for key, tensor in safetensors_torch.load_file(str(ckpt / "adapter_model.safetensors")).items():
        name = re.sub(r"\.(lora_A|lora_B|lora_magnitude_vector)\.weight$", r".\1.default.weight", _plain(key))
        name = re.sub(r"\.(lora_embedding_A|lora_embedding_B)$", r".\1.default", name)
        out[name] = tensor
    return out


def _trained_tensors(ckpt: Path, tuner: str, initial) -> dict[str, torch.Tensor]:
    """What swift trained, as it saved it (a full run saves every tensor: those that moved)."""
    saved = _saved_tensors(ckpt, tuner)
    if tuner == "full":
        assert set(saved) == set(initial)
        return {n: t for n, t in saved.items() if not torch.equal(t, initial[n])}
    return saved


def _saved_tensors(ckpt: Path, tuner: str) -> dict[str, torch.Tensor]:
    if tuner == "full":
        return _model_params(ckpt)
    out = _adapter_names(ckpt)
    extra = {"lora_llm": "vit.safetensors", "plugin": swift_target.FULL_PARAMS_FILE}.get(tuner)
    if extra:
        for key, tensor in safetensors_torch.load_file(str(ckpt / extra)).items():
            out[_plain(key)] = tensor
    return out


def _logged_trainable(log: str) -> float:
    m = re.search(r"model_parameter_info: \w+: [\d.]+M Params \(([\d.]+)M Trainable", log)
    assert m, "swift did not log model_parameter_info"
    return float(m.group(1))


@pytest.mark.parametrize("version", [4, 3], ids=["swift4", "swift3"])
@pytest.mark.parametrize("case", list(CASES))
def test_swift_trains_exactly_the_plan(tiny, case, version):
    if not (VENVS[version] / "bin" / "swift").exists():
        pytest.skip(f"no ms-swift {version}.x venv at {VENVS[version]}")
    _, want_tuner, want_lr_mode = CASES[case]
    if version == 3 and want_tuner == "lora_llm":  # 3.x has no lora_llm: the plugin does it
        want_tuner, want_lr_mode = "plugin", "plugin"
    plan, folder, files, options = _compile(tiny, case, version)
    decision = swift_target.decide(plan, options)
    assert (decision.tuner, decision.lr_mode) == (want_tuner, want_lr_mode), decision.plugin_reasons
    assert ("mixspec_plugin.py" in files) == (want_tuner == "plugin" or want_lr_mode == "plugin")
    log, took = _run(folder, version)
    run = folder / "run"
    planned = plan.trainable_lrs()
    initial = tiny["initial"]

    # 1. names and count, from the last checkpoint
    trained = _trained_tensors(run / "checkpoint-3", want_tuner, initial)
    assert set(trained) == set(planned), _name_diff(planned, trained)
    count = sum(t.numel() for t in trained.values())
    assert count == plan.totals.trainable_params
    logged = _logged_trainable(log)
    assert abs(logged - plan.totals.trainable_params / 1e6) <= 0.00005 + 1e-9, (logged, plan.totals.trainable_params)

    # 2. learning rates, as swift or the plugin report them
    reported = {}
    if want_lr_mode == "multimodal" and version == 3:
        pass  # ms-swift 3.x does not log its multimodal LRs: the weights below show them
    elif want_lr_mode == "multimodal":
        m = re.search(r"vit_lr: ([\d.e-]+), aligner_lr: ([\d.e-]+), llm_lr: ([\d.e-]+)", log)
        assert m, "swift did not log its multimodal LRs"
        reported = {"vit": float(m.group(1)), "aligner": float(m.group(2)), "llm": float(m.group(3))}
        sw = swift_target.SWIFT_MODELS[plan.model_type]
        for name, lr in planned.items():
            group = ("aligner" if name.startswith(sw.aligner) else "vit" if name.startswith(sw.vision_tower)
                     else "llm")
            assert reported[group] == lr, (name, group, reported[group], lr)
    else:
        report = json.loads((run / "mixspec_check.json").read_text())
        assert report["lr_by_param"] == planned
        assert report["weight_decay_by_param"] == plan.trainable_weight_decays()
        assert report["fingerprint"] == report["optimizer_fingerprint"] == plan.optimizer_fingerprint()
        assert report["plan_fingerprint"] == plan.fingerprint()
        assert f"[mixspec] optimizer matches the Plan (optimizer fingerprint {plan.optimizer_fingerprint()})" in log
        assert "[mixspec] trainable parameters match the Plan" in log or want_tuner != "plugin"

    # 3. learning rates, from the weights: the first AdamW step moves each element by at most
    #    its LR, and the largest move in each component is within 1% of it
    step1 = _saved_tensors(run / "checkpoint-1", want_tuner)
    #    (up to float32 rounding of the weights: 2 ulp of the largest weight)
    by_comp: dict[str, float] = {}
    ulp = torch.finfo(torch.float32).eps
    for comp in plan.components:
        largest, largest_tol = None, 0.0
        for name in comp.trainable_names:
            if ".lora_A." in name:  # random start, and a zero first gradient (B starts at zero)
                continue
            before = torch.zeros_like(step1[name]) if ".lora_B." in name else initial[name]
            move = (step1[name].double() - before.double()).abs().max().item()
            tol = 2 * ulp * max(before.abs().max().item(), step1[name].abs().max().item())
            # AdamW's decoupled decay adds lr * wd * |w| to the move
            decay = comp.weight_decay * before.abs().max().item()
            assert move <= comp.lr * (1.0001 + decay) + tol, (name, comp.lr, move)
            if largest is None or move > largest:
                largest, largest_tol = move, tol
        if largest is not None:
            by_comp[comp.name] = largest
            assert largest >= 0.99 * comp.lr - largest_tol, (comp.name, comp.lr, largest)

    # frozen tensors of a full run stayed bit-identical (checked by the moved set above)
    RESULTS.append({
        "case": case, "swift": version, "tuner": want_tuner, "lr_mode": want_lr_mode, "seconds": round(took, 1),
        "plan_trainable": plan.totals.trainable_params, "checkpoint_trainable": count,
        "checkpoint_tensors": len(trained), "swift_logged_M": logged,
        "swift_lrs": reported or None,
        "plan_lrs": {c.name: c.lr for c in plan.components if c.trainable_names},
        "max_step1_move": {k: float(f"{v:.4g}") for k, v in by_comp.items()},
    })
    print(json.dumps(RESULTS[-1]))


def _name_diff(planned, trained) -> str:
    missing = sorted(set(planned) - set(trained))
    extra = sorted(set(trained) - set(planned))
    return f"planned, not trained: {missing[:10]} ({len(missing)}); trained, not planned: {extra[:10]} ({len(extra)})"


def test_plugin_stops_when_the_installed_model_differs(tiny):
    """A Plan made for another model (one more LLM layer) makes the plugin stop before the
    first step, with a diff naming the parameters."""
    root = tiny["root"] / "mismatch"
    bigger = make_tiny_vlm.make_tiny_qwen25vl(root / "qwen25vl-3layers", num_layers=3)
    components, _, _ = CASES["seed-dropout0.05"]
    spec = root / "spec.yaml"
    spec.write_text(BASE.format(model=bigger, components=components, data=tiny["data"], out=root / "run"),
                    encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    files = render(plan, "swift", TargetOptions(model_override=str(tiny["model"])))
    write_files(root / "compiled", files)
    proc = subprocess.run(["bash", str(root / "compiled" / "train.sh"), *RUN_ARGS], cwd=root, env=_env(4),
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "PlanMismatch: mixspec: the trainable parameters differ from the Plan" in log
    assert "planned but not trainable" in log and "model.language_model.layers.2." in log
    assert "train_runtime" not in log and not list((root / "run").glob("checkpoint-*"))


def test_swift_model_table_matches_installed_swift():
    """SWIFT_MODELS (model_type, template, ViT/aligner/LLM prefixes) against ms-swift's registry."""
    table = {k: [v.model_type, v.template, list(v.language_model), list(v.vision_tower), list(v.aligner)]
             for k, v in swift_target.SWIFT_MODELS.items()}
    code = r"""
import json, sys
from importlib.metadata import version
from swift.model import MODEL_MAPPING
from swift.template import TEMPLATE_MAPPING
table = json.loads(sys.argv[1])
out = {"version": version("ms-swift"), "rows": {}}
for hf_type, (mt, template, llm, vit, aligner) in table.items():
    meta = MODEL_MAPPING[mt]
    arch = meta.model_arch
    templates = {meta.template} | {g.template for g in meta.model_groups}
    out["rows"][hf_type] = {
        "template_known": template in TEMPLATE_MAPPING, "template_used": template in templates,
        "keys": [list(arch.language_model), list(arch.vision_tower), list(arch.aligner)],
        "multimodal": meta.is_multimodal}
print(json.dumps(out))
"""
    proc = subprocess.run([str(VENV / "bin" / "python"), "-c", code, json.dumps(table)], env=_env(4),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["version"].startswith("4.")
    for hf_type, (_, _, llm, vit, aligner) in table.items():
        row = got["rows"][hf_type]
        assert row["multimodal"] and row["template_known"] and row["template_used"], (hf_type, row)
        assert row["keys"] == [llm, vit, aligner], hf_type


# -- every family swift knows: the plugin, and each swift flag path the table trusts ---------------------
# tiny random models from tests/fixtures/tiny_families.py with the published special-token ids
# (swift's templates hard-code them: Qwen <|image_pad|> 151655, Gemma 3 <start_of_image> 255999)
import tiny_families  # noqa: E402


FAMILY_BASE = BASE.replace("max_steps: 3", "max_steps: 2")
FAMILY_CASES = {
    # LoRA dropout: lora_llm cannot say it, so the plugin on every family
    "plugin": ("""\
  vision: {train: full, lr: 1.0e-5}
  aligner: {train: full, lr: 3.0e-4}
  language:
    train: lora
    lr: 4.0e-3
    lora: {rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}
"""),
    # what lora_llm does exactly: lora_llm where the table trusts it, else the plugin
    "lora_llm": ("""\
  vision: {train: full, lr: 1.0e-5}
  aligner: {train: full, lr: 3.0e-4}
  language:
    train: lora
    lr: 4.0e-3
    lora: {rank: 4, alpha: 8, dropout: 0, targets: all-linear}
"""),
}


def _family_cases():
    out = []
    for family, sw in sorted(swift_target.SWIFT_MODELS.items()):
        out.append((family, "plugin"))
        if "lora_llm" in sw.proven:
            out.append((family, "lora_llm"))
    return out


@pytest.fixture(scope="module")
def family_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("swift-family-data")
    return make_tiny_vlm.colour_rows(root, sizes=((56, 56),) * 4)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """One tiny model dir per family for the module, built on first use."""
    root = tmp_path_factory.mktemp("swift-families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            if tiny_families.family_info(family)["needs_torchvision"]:
                # its processor needs torchvision: build it with swift's python, which has it
                proc = subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tests" / "fixtures" / "tiny_families.py"),
                                       family, str(root / family), "--real-ids"], env=_env(4), capture_output=True,
                                      text=True, timeout=300)
                assert proc.returncode == 0, proc.stderr[-3000:]
                built[family] = root / family
            else:
                built[family] = tiny_families.make_tiny(family, root / family, real_ids=True)
        return built[family]

    return get


def _safetensors_params(model_dir: Path, plan) -> dict[str, torch.Tensor]:
    """The model dir's weights under the model's parameter names, read by transformers."""
    import transformers

    cls = getattr(transformers, plan.architecture)
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,case", _family_cases(), ids=[f"{f}-{c}" for f, c in _family_cases()])
def test_swift_trains_exactly_the_plan_on_each_family(family_models, family_data, tmp_path, family, case):
    model = family_models(family)
    sw = swift_target.SWIFT_MODELS[family]
    spec = tmp_path / "spec.yaml"
    spec.write_text(FAMILY_BASE.format(model=model, components=FAMILY_CASES[case], data=family_data,
                                       out=tmp_path / "run"), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    assert plan.model_type == family
    options = TargetOptions()
    decision = swift_target.decide(plan, options)
    want = case if case == "lora_llm" and "lora_llm" in sw.proven else "plugin"
    assert decision.tuner == want, [r.code for r in decision.plugin_reasons]
    files = render(plan, "swift", options)
    write_files(tmp_path / "compiled", files)

    plugins = ([str(tmp_path / "compiled" / swift_target.PLUGIN_FILE)] if want == "plugin" else []) + [str(DUMP_PLUGIN)]
    start = time.monotonic()
    proc = subprocess.run(["bash", str(tmp_path / "compiled" / "train.sh"), *RUN_ARGS,
                           "--external_plugins", *plugins, "--callbacks", "mixspec_test_dump"],
                          cwd=tmp_path, env=_env(4), capture_output=True, text=True, timeout=900)
    took = time.monotonic() - start
    log = proc.stdout + proc.stderr
    (tmp_path / "swift.log").write_text(log, encoding="utf-8")
    assert proc.returncode == 0, log[-6000:]
    run = tmp_path / "run"
    planned = plan.trainable_lrs()

    # 1. names and count: swift's checkpoint files and its own log line
    trained = _saved_tensors(run / "checkpoint-2", want)
    assert set(trained) == set(planned), _name_diff(planned, trained)
    count = sum(t.numel() for t in trained.values())
    assert count == plan.totals.trainable_params
    logged = _logged_trainable(log)
    assert abs(logged - plan.totals.trainable_params / 1e6) <= 0.00005 + 1e-9, (logged, plan.totals.trainable_params)

    # 2. learning rates: swift's multimodal log line, or the plugin's check of the optimizer
    if want == "lora_llm":
        m = re.search(r"vit_lr: ([\d.e-]+), aligner_lr: ([\d.e-]+), llm_lr: ([\d.e-]+)", log)
        assert m, "swift did not log its multimodal LRs"
        reported = {"vit": float(m.group(1)), "aligner": float(m.group(2)), "llm": float(m.group(3))}
        for name, lr in planned.items():
            group = ("aligner" if name.startswith(sw.aligner) else "vit" if name.startswith(sw.vision_tower)
                     else "llm")
            assert reported[group] == lr, (name, group, reported[group], lr)
    else:
        report = json.loads((run / "mixspec_check.json").read_text())
        assert report["lr_by_param"] == planned
        assert report["fingerprint"] == plan.optimizer_fingerprint()

    # 3. every parameter, before and after: swift loaded the model dir's weights as they are,
    #    frozen ones come out bit-identical, trained ones moved by at most their LR at step 1
    begin = safetensors_torch.load_file(str(run / "params_begin.safetensors"))
    end = safetensors_torch.load_file(str(run / "params_end.safetensors"))
    initial = _safetensors_params(model, plan)
    base = {n for n in begin if ".lora_" not in n}
    assert base == set(initial), _name_diff(initial, base)
    for name in sorted(base):
        assert torch.equal(begin[name], initial[name]), f"{name}: swift's start differs from the model dir"
    assert set(end) == set(begin)
    changed = {n for n in end if not torch.equal(end[n], begin[n])}
    assert changed <= set(planned), f"frozen parameters changed: {sorted(changed - set(planned))[:10]}"
    moves: dict[str, dict] = {}
    #    (AdamW, betas 0.9/0.999: the first update is lr * g / (|g| + eps); a component whose
    #    gradient was zero at step 1 -- Gemma 3's projector starts at zero, so its ViT gets none --
    #    moves first at step 2, by lr * (0.1 / 0.19) / sqrt(0.001 / 0.001999) = 0.7441 lr)
    steps = [_saved_tensors(run / "checkpoint-1", want), trained]
    second_step = (0.1 / (1 - 0.9 ** 2)) / (0.001 / (1 - 0.999 ** 2)) ** 0.5
    ulp = torch.finfo(torch.float32).eps
    for comp in plan.components:
        names = [n for n in comp.trainable_names if ".lora_A." not in n]
        if not names:
            continue
        starts = {n: torch.zeros_like(steps[0][n]) if ".lora_B." in n else begin[n] for n in names}
        step, scale = 0, 1.0
        if all(torch.equal(steps[0][n], starts[n]) for n in names):
            step, scale = 1, second_step
            starts = {n: steps[0][n] for n in names}
            if all(torch.equal(steps[1][n], starts[n]) for n in names):
                # no gradient reaches it in this tiny model (Mllama: the frozen cross-attention
                # gates start at zero); what it trains is still checked by name, count and LR above
                moves[comp.name] = {"step": None, "max_move": 0.0}
                continue
        largest = 0.0
        for name in names:
            after = steps[step][name]
            move = (after.double() - starts[name].double()).abs().max().item()
            tol = 2 * ulp * max(starts[name].abs().max().item(), after.abs().max().item())
            assert move <= comp.lr * scale * 1.0001 + tol, (name, comp.lr, scale, move)
            largest = max(largest, move)
        assert largest >= 0.99 * comp.lr * scale - 1e-12, (comp.name, comp.lr, scale, largest)
        moves[comp.name] = {"step": step + 1, "max_move": float(f"{largest:.4g}")}

    RESULTS.append({"family": family, "case": case, "path": want, "seconds": round(took, 1),
                    "plan_trainable": plan.totals.trainable_params, "checkpoint_trainable": count,
                    "checkpoint_tensors": len(trained), "swift_logged_M": logged,
                    "frozen_checked": len(base - set(planned)), "moves": moves})
    print(json.dumps(RESULTS[-1]))
