"""Target hf: golden files, determinism, the embedded Plan, PEFT's view of the LoRA
settings, the self-check on a model built from its config, refusals, and that spec strings
reach train.py only as literals and launch.sh only inside comments.

The end-to-end runs (training, saving, merging, DeepSpeed) are in tests/e2e/test_hf_e2e.py.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import goldens
from mixspec.errors import UnsupportedError
from mixspec.language.loader import load_spec
from mixspec.planning.resolve import load_tree_for, plan_spec
from mixspec.targets import TargetOptions, available_targets, render
from mixspec.targets import _common

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import make_tiny_vlm  # noqa: E402


CASES = goldens.cases()
UPDATE = os.environ.get("MIXSPEC_UPDATE_GOLDEN") == "1"


# -- helpers ---------------------------------------------------------------------------------

def plan_from_text(tmp_path: Path, text: str, name: str = "spec.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    loaded = load_spec(path)
    return loaded, plan_spec(loaded)


def import_module_from_text(text: str, path: Path, name: str):
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def literal_assignments(source: str) -> dict:
    """Top-level NAME = <literal> assignments of a module, evaluated with ast.literal_eval."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Config-only model dirs (no weights): a tiny Qwen2.5-VL with 2 and with 3 LLM layers."""
    root = tmp_path_factory.mktemp("tiny-configs")
    out = {}
    for layers in (2, 3):
        d = root / f"qwen25vl-{layers}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(make_tiny_vlm.tiny_qwen25vl_config(num_layers=layers)),
                                       encoding="utf-8")
        out[layers] = d
    return out


THREE_LORA = """\
version: 1
model: {model}
components:
  vision:
    train: lora
    lr: 3.0e-5
    lora: {{rank: 2, alpha: 4, targets: [qkv]}}
  aligner: {{train: full, lr: 1.0e-5, weight_decay: 0.05}}
  language:
    train: lora
    lr: 1.0e-4
    lora: {{rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}}
  last_layer:
    modules: ['model\\.language_model\\.layers\\.1']
    train: lora
    lr: 2.0e-4
    lora: {{rank: 8, alpha: 4, dropout: 0.2, targets: all-linear}}
  lm_head: {{train: full, lr: 5.0e-6}}
data: {{train: data.jsonl}}
"""


# -- golden files ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", goldens.TARGETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case, target):
    want = goldens.render_case(CASES[case], target)
    if UPDATE:
        goldens.update()
    have = goldens.read_golden(target, case)
    assert sorted(have) == sorted(want), f"{target}/{case}: {goldens.drift_hint()}"
    for name in want:
        assert have[name] == want[name], f"{target}/{case}/{name} drifted from the golden file: {goldens.drift_hint()}"


def test_no_stale_golden_folders_and_output_is_byte_identical_across_hash_seeds():
    # a fresh process with another hash seed regenerates every case and compares
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_goldens.py"), "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONHASHSEED": "987"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_examples_are_golden_cases():
    examples = {p.stem for p in (ROOT / "examples").iterdir() if p.suffix in goldens.SUFFIXES}
    assert examples and examples <= set(CASES)
    assert {"hf", "deepspeed"} <= set(available_targets())


# -- the embedded Plan -------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(c for c in CASES if (ROOT / "tests/targets/hf" / c / "train.py.data").is_file()))
def test_train_py_embeds_the_plan_exactly(monkeypatch, case):
    monkeypatch.chdir(ROOT)
    loaded = load_spec(Path(CASES[case]))
    plan = plan_spec(loaded)
    # the golden data part: train.py's header and Plan blocks (tests/targets/test_programs.py: the rest
    # of train.py is mixspec/programs/hf_train.py, byte for byte)
    text = (ROOT / "tests/targets/hf" / case / "train.py.data").read_text(encoding="utf-8")
    compile(text, "train.py", "exec")
    assert text.isascii()
    values = literal_assignments(text)
    data = values["PLAN"]
    assert data["plan_fingerprint"] == plan.fingerprint()
    assert data["optimizer_fingerprint"] == plan.optimizer_fingerprint()
    assert data["trainable_params"] == plan.totals.trainable_params
    assert data["base_params"] == plan.totals.base_params
    canonical = {p for c in plan.components for p in c.params} | set(plan.unassigned_params)
    assert _common.expand_names(data["base_names"]) == canonical
    assert data["base_names_sha256"] == __import__("hashlib").sha256("\n".join(sorted(canonical)).encode()).hexdigest()
    lrs = {}
    for entry, comp in zip(data["components"], plan.components, strict=True):
        assert entry["name"] == comp.name and entry["lr"] == comp.lr
        assert _common.expand_names(entry["trainable"]) == set(comp.trainable_names)
        for n in comp.trainable_names:
            lrs[n] = comp.lr
    assert lrs == plan.trainable_lrs()
    assert values["TRAINING"] == plan.training.to_json()
    assert values["DISTRIBUTED"] == plan.distributed.to_json()
    # the LoRA regex PEFT full-matches hits exactly the planned modules of the real tree
    lora = data["lora"]
    targets = {t for c in plan.components if c.lora for t in c.lora.targets}
    if lora is None:
        assert not targets
        return
    modules = [m.name for m in load_tree_for(loaded).modules if m.name]
    assert {m for m in modules if re.fullmatch(lora["target_modules"], m)} == targets


@functools.lru_cache(maxsize=None)
def _script_functions(names: tuple[str, ...]) -> dict:
    """Functions of the helpers block of a generated train.py, executed on their own."""
    import hashlib

    from mixspec.programs import block_text

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        text = render(plan_spec(load_spec(Path("examples/qwen25vl-7b-mixed.yaml"))), "hf", TargetOptions())["train.py"]
    finally:
        os.chdir(cwd)
    namespace = {"re": re, "hashlib": hashlib}
    exec(compile(block_text(text, "helpers"), "train.py", "exec"), namespace)
    return {name: namespace[name] for name in names}


_NAME_PART = st.one_of(st.sampled_from(["model", "layers", "blocks", "mlp", "q_proj", "weight", "lora_A",
                                        "default", "x{y", "0x", "01"]),
                       st.integers(0, 40).map(str))


@settings(max_examples=100, deadline=None)
@given(st.sets(st.lists(_NAME_PART, min_size=1, max_size=5).map(".".join), max_size=30))
def test_name_compaction_round_trips_and_script_agrees(names):
    fns = _script_functions(("expand_names", "compact_names", "ranges", "natural_key"))
    compact = _common.compact_names(names)
    assert _common.expand_names(compact) == names
    assert fns["compact_names"](names) == compact
    assert fns["expand_names"](compact) == names
    regex = _common.exact_regex(names) if names else None
    if regex:
        for name in names:
            assert re.fullmatch(regex, name)
        for probe in ("model.99.x", "zz." + next(iter(names)), next(iter(names)) + ".weight"):
            if probe not in names:
                assert not re.fullmatch(regex, probe)


def test_peft_pattern_keys_are_anchored_to_each_components_modules(tiny_dirs, tmp_path):
    from peft.utils.other import get_pattern_key

    from mixspec.targets.hf import lora_settings

    _, plan = plan_from_text(tmp_path, THREE_LORA.format(model=tiny_dirs[2]))
    lora = lora_settings(plan)
    assert (lora["r"], lora["alpha"]) == (2, 4.0)  # the first LoRA component is the default
    for comp in plan.components:
        if not comp.lora:
            continue
        for target in comp.lora.targets:
            r_key = get_pattern_key(lora["rank_pattern"].keys(), target)
            a_key = get_pattern_key(lora["alpha_pattern"].keys(), target)
            assert lora["rank_pattern"].get(r_key, lora["r"]) == comp.lora.rank, target
            assert lora["alpha_pattern"].get(a_key, lora["alpha"]) == comp.lora.alpha, target
            # the same module nested under another prefix does not match (keys start with ^)
            assert get_pattern_key(lora["rank_pattern"].keys(), "outer." + target) == "outer." + target


# -- the self-check (meta device: config only) ---------------------------------------------------

def test_self_check_on_meta_model_applies_each_components_lora(tiny_dirs, tmp_path):
    import torch
    from peft.tuners.lora import LoraLayer

    _, plan = plan_from_text(tmp_path, THREE_LORA.format(model=tiny_dirs[2]))
    files = render(plan, "hf", TargetOptions())
    module = import_module_from_text(files["train.py"], tmp_path / "train.py", "train_meta_three_lora")
    model, rows = module.setup_model(str(tiny_dirs[2]), meta=True)
    assert [(r[0], r[3], r[4]) for r in rows] == [(c.name, c.trainable_params, c.trainable_params)
                                                  for c in plan.components]
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    for comp in plan.components:
        if not comp.lora:
            continue
        for target in comp.lora.targets:
            layer = layers.pop(target)
            assert layer.r["default"] == comp.lora.rank
            assert layer.scaling["default"] == comp.lora.alpha / comp.lora.rank
            drop = layer.lora_dropout["default"]
            assert (drop.p if isinstance(drop, torch.nn.Dropout) else 0.0) == comp.lora.dropout
    assert not layers  # no module outside the plan got an adapter
    trainable = {module.plan_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(plan.trainable_lrs())
    groups = module.param_groups(model)
    # LoRA matrices are 2-D (decay); the aligner's biases and norm get no decay; no empty group
    assert [g["name"] for g in groups] == ["vision/decay", "aligner/decay", "aligner/no_decay",
                                           "language/decay", "last_layer/decay", "lm_head/decay"]
    assert {g["name"]: g["weight_decay"] for g in groups}["aligner/decay"] == 0.05
    assert all(g["params"] for g in groups)
    assert module.lr_problems(groups, model) == []
    # a wrong LR in one group is named, parameter by parameter
    groups[0]["lr"] = 1.0
    problems = module.lr_problems(groups, model)
    assert problems and "learning rate 1.0, the plan says 3e-05" in problems[0]


def test_self_check_names_the_layer_difference(tiny_dirs, tmp_path):
    _, plan = plan_from_text(tmp_path, THREE_LORA.format(model=tiny_dirs[2]))
    module = import_module_from_text(render(plan, "hf", TargetOptions())["train.py"], tmp_path / "train.py",
                                     "train_meta_three_layers")
    with pytest.raises(module.PlanMismatch) as info:
        module.setup_model(str(tiny_dirs[3]), meta=True)
    text = str(info.value)
    assert "model.language_model.layers (language): the model has 3 (0-2), the plan was made for 2 (0-1)" in text
    assert "parameters, the plan was made for" in text
    assert module.run_check(module.parse_args(["--model", str(tiny_dirs[3])])) == 1
    assert module.run_check(module.parse_args(["--model", str(tiny_dirs[2])])) == 0


@pytest.mark.parametrize("vision,language,extra", [
    ("{rank: 2, alpha: 4, targets: 'model\\.visual\\.(patch_embed\\.proj|blocks\\.\\d+\\.attn\\.qkv)', rslora: true}",
     "{rank: 4, alpha: 8, targets: [q_proj, v_proj], rslora: true}",
     "  embeddings: {train: lora, lr: 1.0e-5, lora: {rank: 4, alpha: 4, targets: [embed_tokens], rslora: true}}\n"),
    ("{rank: 2, alpha: 4, targets: [qkv], dora: true}", "{rank: 4, alpha: 8, targets: [q_proj, v_proj], dora: true}", ""),
], ids=["conv3d-embedding-rslora", "dora"])
def test_self_check_counts_equal_peft_for_conv_embedding_rslora_dora(tiny_dirs, tmp_path, vision, language, extra):
    text = (f"version: 1\nmodel: {tiny_dirs[2]}\ncomponents:\n"
            f"  vision: {{train: lora, lr: 3.0e-5, lora: {vision}}}\n"
            f"  language: {{train: lora, lr: 1.0e-4, lora: {language}}}\n" + extra)
    _, plan = plan_from_text(tmp_path, text)
    module = import_module_from_text(render(plan, "hf", TargetOptions())["train.py"], tmp_path / "train.py",
                                     "train_meta_" + tmp_path.name.replace("-", "_"))
    model, rows = module.setup_model(str(tiny_dirs[2]), meta=True)  # raises PlanMismatch on any difference
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.totals.trainable_params
    assert all(planned == got for _, _, _, planned, got in rows)


def test_ddp_unused_search_on_multimodal_models_and_unloadable_model(tiny_dirs, tmp_path):
    """A multimodal model skips parts on some batches (towers on text-only batches, Mllama's
    cross-attention layers without images): DDP must search for unused parameters there."""
    _, plan = plan_from_text(tmp_path, f"version: 1\nmodel: {tiny_dirs[2]}\ncomponents:\n"
                                       "  language: {train: lora, lr: 1.0e-4}\n  vision: {train: freeze}\n")
    module = import_module_from_text(render(plan, "hf", TargetOptions())["train.py"], tmp_path / "train.py",
                                     "train_meta_language_only")
    args = module.parse_args(["--output-dir", str(tmp_path / "o")])
    assert module.training_arguments(args).ddp_find_unused_parameters is True
    text_only = module.PLAN.copy()
    module.PLAN = dict(text_only, multimodal=False)
    assert module.training_arguments(args).ddp_find_unused_parameters is False
    module.PLAN = text_only
    with pytest.raises(SystemExit) as info:
        module.load_model(str(tmp_path / "no-such-model"), meta=True)
    assert info.value.code == 1


# -- refusals ------------------------------------------------------------------------------------

def _codes(plan, target="hf", **options):
    with pytest.raises(UnsupportedError) as info:
        render(plan, target, TargetOptions(**options))
    return sorted(i.code for i in info.value.items), str(info.value)


def test_refusals_are_located_and_not_bypassed_by_approximate(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = plan_spec(load_spec(Path("tests/targets/specs/hf/qwen25vl-3b-refused.yaml")))
    codes, text = _codes(plan, approximate=True)
    assert codes == ["lora-mixed-dora", "lora-on-tied-weight", "warmup-ratio-one"]
    assert "tests/targets/specs/hf/qwen25vl-3b-refused.yaml:7:3: error: target hf cannot express LoRA on lm_head" in text


def test_mixed_rslora_and_nothing_trainable_are_refused(tiny_dirs, tmp_path):
    text = THREE_LORA.format(model=tiny_dirs[2]).replace("targets: [qkv]}", "targets: [qkv], rslora: true}")
    _, plan = plan_from_text(tmp_path, text)
    assert _codes(plan)[0] == ["lora-mixed-rslora"]
    _, frozen = plan_from_text(tmp_path, f"version: 1\nmodel: {tiny_dirs[2]}\ncomponents:\n  vision: {{train: freeze}}\n",
                               name="frozen.yaml")
    assert _codes(frozen)[0] == ["nothing-trainable"]


def test_untied_lm_head_lora_is_expressed(tiny_dirs, tmp_path):
    _, plan = plan_from_text(tmp_path, f"""\
version: 1
model: {tiny_dirs[2]}
components:
  lm_head: {{train: lora, lr: 1.0e-4, lora: {{rank: 2, targets: 'lm_head'}}}}
""")
    files = render(plan, "hf", TargetOptions())
    assert literal_assignments(files["train.py"])["PLAN"]["lora"]["target_modules"] == "(?:lm_head)"


# -- the command line ----------------------------------------------------------------------------

def test_cli_compile_writes_train_launch_and_deepspeed(run_cli, tmp_path):
    out = tmp_path / "o"
    result = run_cli("compile", "examples/qwen25vl-7b-mixed.yaml", "--target", "hf", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ds_config.json", "launch.sh", "model_config.json", "train.py"]
    assert os.access(out / "launch.sh", os.X_OK)
    assert (goldens.golden_form({"train.py": (out / "train.py").read_text()})["train.py.data"]
            == (ROOT / "tests/targets/hf/qwen25vl-7b-mixed/train.py.data").read_text())
    result = run_cli("compile", "examples/qwen25vl-7b-mixed.yaml", "--target", "hf", "-o", str(out),
                     "--model", "/models/qwen 7b")
    assert result.exit_code == 1 and "would overwrite" in result.stderr
    result = run_cli("compile", "examples/qwen25vl-7b-mixed.yaml", "--target", "hf", "-o", str(out),
                     "--model", "/models/qwen 7b", "--force")
    assert result.exit_code == 0
    assert literal_assignments((out / "train.py").read_text())["PLAN"]["model"] == "/models/qwen 7b"


def test_cli_refusal_exits_1_without_traceback(run_cli, tmp_path):
    result = run_cli("compile", "tests/targets/specs/hf/qwen25vl-3b-refused.yaml", "--target", "hf",
                     "-o", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert result.stderr == (ROOT / "tests/targets/hf/qwen25vl-3b-refused/refusal.txt").read_text()
    assert not (tmp_path / "o").exists()


def test_launch_sh_parses_and_picks_the_planned_command(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    scripts = {}
    for case in ("qwen25vl-7b-mixed", "qwen2vl-2b-vision-multinode"):
        path = tmp_path / case / "launch.sh"
        path.parent.mkdir()
        path.write_text(render(plan_spec(load_spec(Path(CASES[case]))), "hf", TargetOptions())["launch.sh"])
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
        scripts[case] = path
    # run the multi-node script with fake launchers that print their argv
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("torchrun", "deepspeed", "accelerate"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\"\n")
        (bin_dir / tool).chmod(0o755)
    script = scripts["qwen2vl-2b-vision-multinode"]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    here = str(script.parent)
    out = subprocess.run(["bash", str(script), "--max-steps", "5"], capture_output=True, text=True, env=env)
    assert out.stdout == (f"torchrun --nnodes 2 --node_rank 1 --nproc_per_node 4 --master_addr 10.0.0.1 "
                          f"--master_port 29500 {here}/train.py --max-steps 5\n")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                         env={**env, "LAUNCHER": "accelerate"})
    assert out.stdout == (f"accelerate launch --multi_gpu --num_machines 2 --machine_rank 1 --num_processes 8 "
                          f"--main_process_ip 10.0.0.1 --main_process_port 29500 {here}/train.py\n")
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "NODE_RANK"})
    assert missing.returncode != 0 and "NODE_RANK" in missing.stderr
    single = scripts["qwen25vl-7b-mixed"]
    out = subprocess.run(["bash", str(single)], capture_output=True, text=True, env={**env, "LAUNCHER": "deepspeed"})
    assert out.stdout == f"deepspeed --num_gpus 8 --master_port 29500 {single.parent}/train.py\n"


# -- spec strings reach generated files only as literals ------------------------------------------

def _code_tokens(text: str) -> list[tuple[int, str]]:
    """Tokens of Python source other than strings and comments: its structure (a long literal
    wrapped over several lines gains trailing commas; those are layout, not structure)."""
    tokens = [(t.type, t.string) for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type not in (tokenize.STRING, tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                tokenize.INDENT, tokenize.DEDENT)]
    return [tok for i, tok in enumerate(tokens)
            if not (tok[1] == "," and i + 1 < len(tokens) and tokens[i + 1][1] in ")]}")]


@pytest.fixture(scope="module")
def base_plan():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return plan_spec(load_spec(Path("examples/qwen25vl-7b-mixed.yaml")))
    finally:
        os.chdir(cwd)


_NASTY = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40) | st.sampled_from([
    "x'''\nimport os; os.system('id')\n'''", 'a"""b', "\\", "$(rm -rf ~)", "`id`", "'; id; '", "a\rb\x0cc\x00d",
    "\u2028\u2029\x85", "#!/bin/sh", "-o\n-", "{}", "%s %(x)s",
])


@pytest.fixture(scope="module")
def benign_render(base_plan):
    benign = dataclasses.replace(base_plan, spec_path="s", model="m", output_dir="o",
                                 data=dataclasses.replace(base_plan.data, train="d", eval=None))
    files = render(benign, "hf", TargetOptions())
    return files, _code_tokens(files["train.py"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec_path=_NASTY, model=_NASTY, out_dir=_NASTY, data=_NASTY)
def test_spec_strings_only_as_literals(base_plan, benign_render, spec_path, model, out_dir, data):
    nasty = dataclasses.replace(base_plan, spec_path=spec_path, model=model, output_dir=out_dir,
                                data=dataclasses.replace(base_plan.data, train=data, eval=None))
    got = render(nasty, "hf", TargetOptions())
    ref, ref_tokens = benign_render
    text = got["train.py"]
    assert text.isascii()
    assert _code_tokens(text) == ref_tokens
    values = literal_assignments(text)
    assert values["PLAN"]["spec"] == spec_path and values["PLAN"]["model"] == model
    assert values["OUTPUT_DIR"] == out_dir and values["DATA"]["train"] == data
    # launch.sh: spec strings appear only in its comment header, one line each
    lines, ref_lines = got["launch.sh"].split("\n"), ref["launch.sh"].split("\n")
    assert len(lines) == len(ref_lines)
    for line, ref_line in zip(lines, ref_lines):
        assert line == ref_line or (line.startswith("# ") and ref_line.startswith("# "))
    config = json.loads(got["ds_config.json"])
    assert spec_path in config["_comment"]


def test_overridden_model_reaches_train_py_as_a_literal(base_plan):
    model = "/data/it's a \"model\"\n$(id)"
    text = render(base_plan, "hf", TargetOptions(model_override=model))["train.py"]
    assert literal_assignments(text)["PLAN"]["model"] == model
    assert _code_tokens(text) == _code_tokens(render(base_plan, "hf", TargetOptions())["train.py"])


def test_sh_word_and_comment_text():
    assert _common.sh_word("a b'c") == "'a b'\"'\"'c'"
    with pytest.raises(ValueError):
        _common.sh_word("a\x00b")
    assert "\n" not in _common.comment_text("a\nb\u2028") and _common.comment_text("x").isascii()
    value = {"k": ["a'b\n", 1.5, None, True, (2,)], "f": float("inf")}
    text = _common.py_literal(value)
    assert eval(text, {"__builtins__": {"float": float}}) == value  # noqa: S307 - our own literal


# -- data: rows -> tokens, labels and image tensors ---------------------------------------------

@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny LLaVA-1.5 with its real processor (CLIP image processor, no torchvision needed)."""
    pytest.importorskip("PIL")
    return make_tiny_vlm.make_tiny_llava(tmp_path_factory.mktemp("llava") / "llava")


def _data_module(tmp_path, model_type="llava"):
    """train.py's data path: mixspec's own copy of the program, with a Plan of just what the
    data path reads."""
    from mixspec.programs import program_text

    module = import_module_from_text(program_text("hf_train"), tmp_path / "train_data.py",
                                     "train_data_" + tmp_path.name.replace("-", "_"))
    module.PLAN = {"model_type": model_type, "multimodal": True}
    return module


def test_rows_are_the_processors_whole_conversation_plus_assistant_labels(llava_dir, tmp_path):
    """Against the oracle of the family's own processor: apply_chat_template(tokenize=True) on
    the whole conversation, and its processor on the list of conversations for a batch."""
    import torch
    import transformers
    from PIL import Image

    module = _data_module(tmp_path)
    processor = transformers.AutoProcessor.from_pretrained(llava_dir)
    tokenizer, proc, why = module.load_processing(str(llava_dir))
    encoder = module.ConversationEncoder(tokenizer, proc, 512, True, why)
    Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (80, 64), (0, 0, 200)).save(tmp_path / "b.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A dot."},
                      {"role": "user", "content": "<image>And this?"}, {"role": "assistant", "content": "Blue."}],
         "images": ["a.png", "b.png"]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {"messages": [{"role": "user", "content": "Which colour?"}, {"role": "assistant", "content": "Red."}],
         "images": ["a.png"]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = module.ConversationDataset(module.read_rows(str(path)), encoder)
    items = [ds[i] for i in range(3)]

    def pil(name):
        with Image.open(tmp_path / name) as img:
            return img.convert("RGB")

    oracle_messages = [
        [{"role": "user", "content": [{"type": "image", "image": pil("a.png")}, {"type": "text", "text": "What is it?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A dot."}]},
         {"role": "user", "content": [{"type": "image", "image": pil("b.png")}, {"type": "text", "text": "And this?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Hello there."}]}],
        [{"role": "user", "content": [{"type": "image", "image": pil("a.png")}, {"type": "text", "text": "Which colour?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
    ]
    for item, messages in zip(items, oracle_messages):
        want = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        got = module.Collator(encoder)([item])
        assert set(got) == set(want) | {"labels"}
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # labels: exactly the assistant turns as the template writes them (LLaVA: text + ' ')
    runs = [[], []]
    labels = items[0]["labels"]
    k = 0
    for i, tok in enumerate(labels.tolist()):
        if tok != -100:
            runs[k].append(tok)
        elif runs[k] and k == 0:
            k = 1
    assert [tokenizer.decode(r) for r in runs] == [" A dot. ", " Blue. "]
    assert tokenizer.decode(items[1]["labels"][items[1]["labels"] != -100]) == " Hello there. "

    # a micro-batch of rows with 2, 0 and 1 images = the processor's own batch of the three
    batch = module.Collator(encoder)(items)
    want = processor.apply_chat_template(oracle_messages, tokenize=True, return_dict=True, return_tensors="pt",
                                         padding=True, padding_side="right")
    assert set(batch) == set(want) | {"labels"}
    for key in want:
        assert torch.equal(batch[key], want[key]), key
    assert batch["pixel_values"].shape[0] == 3
    for i, item in enumerate(items):
        n = item["labels"].shape[0]
        assert torch.equal(batch["labels"][i, :n], item["labels"]) and batch["labels"][i, n:].eq(-100).all()

    # a cut through an image is an error naming the row; a cut after it is fine
    short = module.ConversationEncoder(tokenizer, proc, 20, True, why)
    with pytest.raises(module.DataError, match=r"d\.jsonl:1: .*would cut an image"):
        module.ConversationDataset(module.read_rows(str(path)), short)[0]
    cut = module.ConversationEncoder(tokenizer, proc, items[2]["labels"].shape[0] - 2, True, why)
    row = module.ConversationDataset(module.read_rows(str(path)), cut)[2]
    assert row["inputs"]["input_ids"].shape[1] == items[2]["labels"].shape[0] - 2
    assert torch.equal(row["inputs"]["input_ids"][0], items[2]["inputs"]["input_ids"][0, :-2])


def test_bad_rows_are_named_before_training(llava_dir, tmp_path):
    module = _data_module(tmp_path)
    tokenizer, proc, why = module.load_processing(str(llava_dir))
    encoder = module.ConversationEncoder(tokenizer, proc, 512, True, why)
    from PIL import Image

    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],'
                   ' "images": ["a.png"]}\n{"messages": [{"role": "user", "content": "only a question"}]}\nnot json\n')
    with pytest.raises(module.DataError, match=r"bad\.jsonl:3: not valid JSON"):
        module.read_rows(str(bad))
    bad.write_text("\n".join(bad.read_text().splitlines()[:2]) + "\n")
    with pytest.raises(module.DataError, match=r"bad\.jsonl:2: no assistant message"):
        module.ConversationDataset(module.read_rows(str(bad)), encoder)
    bad.write_text('{"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],'
                   ' "images": ["a.png"]}\n')
    with pytest.raises(module.DataError, match=r"bad\.jsonl:1: 2 image markers but 1 images"):
        module.ConversationDataset(module.read_rows(str(bad)), encoder)
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],'
                   ' "images": ["missing.png"]}\n')
    with pytest.raises(module.DataError, match=r"bad\.jsonl:1: image not found: .*missing\.png"):
        module.ConversationDataset(module.read_rows(str(bad)), encoder)
    # prefix-LM families take one user and one assistant message
    (tmp_path / "p").mkdir()
    prefix = _data_module(tmp_path / "p", model_type="paligemma")
    pe = prefix.ConversationEncoder(tokenizer, proc, 512, True, why)
    bad.write_text('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"},'
                   ' {"role": "assistant", "content": "y"}]}\n')
    with pytest.raises(prefix.DataError, match=r"bad\.jsonl:1: paligemma is a prefix-LM .*got system, user, assistant"):
        prefix.ConversationDataset(prefix.read_rows(str(bad)), pe)[0]


# -- what train.py can feed ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2_audio_dir(tmp_path_factory):
    """A config-only Qwen2-Audio (audio tower + projector + LLM), small dimensions."""
    d = tmp_path_factory.mktemp("qwen2audio")
    config = {
        "architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio",
        "audio_config": {"model_type": "qwen2_audio_encoder", "d_model": 32, "encoder_layers": 2,
                         "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 16,
                         "max_source_positions": 64},
        "text_config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256},
        "audio_token_index": 255,
    }
    (d / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return d


def test_training_the_audio_tower_is_refused_naming_the_component(qwen2_audio_dir, tmp_path):
    """train.py has no audio path: an audio component would never get a gradient."""
    _, plan = plan_from_text(tmp_path, f"version: 1\nmodel: {qwen2_audio_dir}\ncomponents:\n"
                                       "  audio: {train: full, lr: 1.0e-5}\n  aligner: {train: full, lr: 1.0e-5}\n"
                                       "  language: {train: lora, lr: 1.0e-4}\n")
    assert "audio" in plan.roles and "vision" not in plan.roles
    codes, text = _codes(plan)
    assert codes == ["no-audio-input", "no-audio-input"]
    assert "spec.yaml:4:3: error: target hf cannot express 2 parts, for one reason: " in text
    assert "\n  - " + str(tmp_path / "spec.yaml") + ":4:3: training component 'audio'" in text
    assert "training component 'aligner'" in text and "never get a gradient" in text
    # the language model alone is fed by text rows
    _, plan = plan_from_text(tmp_path, f"version: 1\nmodel: {qwen2_audio_dir}\ncomponents:\n"
                                       "  language: {train: lora, lr: 1.0e-4}\n", name="text.yaml")
    assert "train.py" in render(plan, "hf", TargetOptions())


def test_unproven_family_warns_at_compile(tmp_path, tiny_dirs):
    from mixspec.targets import hf, target_warnings

    _, plan = plan_from_text(tmp_path, f"version: 1\nmodel: {tiny_dirs[2]}\ncomponents:\n"
                                       "  language: {train: lora, lr: 1.0e-4}\n")
    assert target_warnings(plan, "hf") == []
    unproven = dataclasses.replace(plan, model_type="some_new_vlm")
    (line,) = target_warnings(unproven, "hf")
    assert "model_type 'some_new_vlm' are not proven" in line and "--preview-data" in line
    assert "qwen2_5_vl" in hf.IMAGE_ROWS_PROVEN
