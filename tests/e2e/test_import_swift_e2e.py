"""mixspec import --from swift against the real ms-swift: real-looking `swift sft` scripts are
imported, then run for 1 step on a tiny random Qwen2.5-VL on CPU; the parameters swift's
optimizer holds and their learning rates (a test-only callback, swift_dump_plugin.py) must
equal the import's Plan, and swift's own trainable count (model_parameter_info) its count.

Cases (issue 14): the seed case with lora_llm; a --freeze_parameters typo like ms-swift
#7226; --tuner_type full --freeze_vit true --vit_lr ...; LoRA with --target_modules
all-linear --modules_to_save ...

And the all-linear rules the import re-implements (get_multimodal_target_regex,
find_all_linears) against swift's own functions on the real model class of every catalog
family, for six freeze combinations.

Needs the ms-swift venv (MIXSPEC_SWIFT_VENV or .venv-swift; scripts/swift_env.sh); skipped
without it. Run: pytest -m slow tests/e2e/test_import_swift_e2e.py (one swift process per
case, 12-25 s each on 2 cores, and one process for the rules, about 30 s: about 2.2 min).
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
from swift_venv import DUMP_PLUGIN, MARKS, RUN_ARGS, VENV, swift_env  # noqa: E402

pytestmark = MARKS

from mixspec.importers import read  # noqa: E402

ENV = swift_env()
# the recording callback
EXTRA = [*RUN_ARGS, "--external_plugins", str(DUMP_PLUGIN), "--callbacks", "mixspec_test_optimizer"]

SCRIPT = """\
#!/usr/bin/env bash
# {title}
MAX_PIXELS=12544 \\
swift sft \\
    --model {model} \\
    --model_type qwen2_5_vl \\
    --template qwen2_5_vl \\
    --dataset {data} \\
    --torch_dtype float32 \\
    --max_steps 1 \\
    --per_device_train_batch_size 1 \\
    --gradient_accumulation_steps 1 \\
    --max_length 1024 \\
    --save_strategy no \\
    --output_dir {out} --add_version false \\
{flags}    "$@"
"""

# name -> (flags, the silent effects the import must report)
CASES = {
    "seed-lora_llm": ("""\
    --tuner_type lora_llm \\
    --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 \\
    --learning_rate 1e-4 --vit_lr 1e-5 --aligner_lr 2e-5 \\
""", {"lora_llm-ignores-lora_dropout"}),
    "freeze-typo-7226": ("""\
    --tuner_type full \\
    --freeze_parameters model.layers.1 \\
    --learning_rate 1e-5 \\
""", {"pattern-matches-nothing", "lm-head-in-llm"}),
    "full-freeze-vit-vit_lr": ("""\
    --tuner_type full \\
    --freeze_vit true --freeze_aligner false --freeze_llm false \\
    --vit_lr 1e-6 --aligner_lr 3e-5 --learning_rate 1e-5 \\
""", {"lr-reaches-nothing", "lm-head-in-llm"}),
    "lora-all-linear-modules_to_save": ("""\
    --tuner_type lora \\
    --target_modules all-linear \\
    --modules_to_save model.visual.merger \\
    --lora_rank 4 --lora_alpha 8 --lora_dropout 0.1 \\
    --learning_rate 2e-4 \\
""", {"modules-to-save-copy"}),
}
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("import-swift-e2e")
    model = make_tiny_vlm.make_tiny_qwen25vl(root / "qwen25vl")
    data = make_tiny_vlm.colour_rows(root)
    return {"root": root, "model": model, "data": data}


def _plan_name(name: str) -> str:
    """A name from swift's optimizer as the Plan names it: a modules_to_save copy trains the
    module's own parameters (the frozen original stays outside the optimizer)."""
    return name.replace(".modules_to_save.default.", ".")


@pytest.mark.parametrize("case", list(CASES))
def test_import_agrees_with_real_swift(tiny, case):
    flags, effects = CASES[case]
    folder = tiny["root"] / case
    folder.mkdir()
    script = folder / "sft.sh"
    script.write_text(SCRIPT.format(title=case, model=tiny["model"], data=tiny["data"], out=folder / "run",
                                    flags=flags), encoding="utf-8")
    imported = read("swift", script.read_text(encoding="utf-8"), str(script))
    assert imported.ok, [p.render() for p in imported.problems]
    assert effects <= {e.code for e in imported.effects}, [e.render() for e in imported.effects]
    plan = imported.plan
    planned = plan.trainable_lrs()

    start = time.monotonic()
    proc = subprocess.run(["bash", str(script), *EXTRA], cwd=folder, env=ENV, capture_output=True, text=True,
                          timeout=600)
    took = time.monotonic() - start
    log = proc.stdout + proc.stderr
    (folder / "swift.log").write_text(log, encoding="utf-8")
    assert proc.returncode == 0, log[-6000:]

    record = json.loads((folder / "run" / "optimizer_record.json").read_text())
    held = {_plan_name(n): v["lr"] for n, v in record.items()}
    assert len(held) == len(record)
    missing, extra = sorted(set(planned) - set(held)), sorted(set(held) - set(planned))
    assert not missing and not extra, f"planned, not in swift's optimizer: {missing[:8]}; in it, not planned: {extra[:8]}"
    wrong = {n: (held[n], lr) for n, lr in planned.items() if held[n] != lr}
    assert not wrong, list(wrong.items())[:8]
    m = re.search(r"model_parameter_info: \w+: ([\d.]+)M Params \(([\d.]+)M Trainable", log)
    assert m, "swift did not log model_parameter_info"
    assert abs(float(m.group(2)) - plan.totals.trainable_params / 1e6) <= 0.00005 + 1e-9
    RESULTS.append({"case": case, "seconds": round(took, 1), "trainable": plan.totals.trainable_params,
                    "swift_trainable_M": float(m.group(2)), "tensors": len(planned),
                    "lrs": sorted({lr for lr in planned.values()}),
                    "effects": sorted({e.code for e in imported.effects})})
    print(json.dumps(RESULTS[-1]))


# -- the LoRA target rules, against ms-swift's own functions, on every catalog family ---------------
RULES_PROBE = r"""
import json, re, sys
import torch, transformers
from swift.model import MODEL_MAPPING
from swift.utils import find_all_linears, get_multimodal_target_regex
out = {}
for path, swift_type, combos in json.loads(sys.argv[1]):
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])._from_config(config)
    model.model_meta = MODEL_MAPPING[swift_type]
    names = [n for n, _ in model.named_modules() if n]
    row = {}
    for fl, fv, fa, emb in combos:
        if swift_type in ("qwen2", "llama"):
            targets = find_all_linears(model, model.model_meta.model_arch)
            row["text"] = sorted(n for n in names if any(n == t or n.endswith("." + t) for t in targets))
            continue
        try:
            rx = get_multimodal_target_regex(model, freeze_llm=fl, freeze_vit=fv, freeze_aligner=fa,
                                             include_embedding=emb)
        except AssertionError:
            row[f"{fl}{fv}{fa}{emb}"] = None
            continue
        row[f"{fl}{fv}{fa}{emb}"] = sorted(n for n in names if re.fullmatch(rx, n))
    out[path] = row
print(json.dumps(out))
"""
COMBOS = [(False, True, True, False), (False, False, True, False), (True, False, False, False),
          (False, False, False, True), (True, True, False, False), (True, True, True, False)]


def test_lora_target_rules_equal_swifts_own_functions():
    """multimodal_target_regex / find_all_linears (mixspec's copy of swift's all-linear rules)
    give the same LoRA modules as swift's get_multimodal_target_regex / find_all_linears, run
    on the real model classes (meta device) of every catalog family, for each freeze combination."""
    from mixspec.importers.swift import find_all_linears, multimodal_target_regex
    from mixspec.models.sources import catalog_ids, catalog_root, find_model
    from mixspec.targets.swift import SWIFT_MODELS
    from mixspec.models.tree import get_tree

    jobs, trees = [], {}
    text_types = {"qwen2": "qwen2", "llama": "llama"}
    for model_id in catalog_ids():
        tree = get_tree(find_model(model_id))
        sw = SWIFT_MODELS.get(tree.model_type)
        swift_type = sw.model_type if sw else text_types.get(tree.model_type)
        if swift_type is None:
            continue
        path = str(catalog_root() / model_id)
        trees[path] = (tree, sw)
        jobs.append((path, swift_type, COMBOS if sw else COMBOS[:1]))
    assert len(jobs) >= 9
    proc = subprocess.run([str(VENV / "bin" / "python"), "-c", RULES_PROBE, json.dumps(jobs)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    swift = json.loads(proc.stdout.strip().splitlines()[-1])
    checked = 0
    for path, (tree, sw) in trees.items():
        names = [m.name for m in tree.modules if m.name]
        if sw is None:
            targets = find_all_linears(tree, "")
            mine = sorted(n for n in names if any(n == t or n.endswith("." + t) for t in targets))
            assert mine == swift[path]["text"], path
            checked += 1
            continue
        for fl, fv, fa, emb in COMBOS:
            want = swift[path][f"{fl}{fv}{fa}{emb}"]
            try:
                rx = re.compile(multimodal_target_regex(tree, sw, fl, fv, fa, emb))
            except ValueError:
                assert want is None, (path, fl, fv, fa)
                continue
            mine = sorted(n for n in names if rx.fullmatch(n))
            assert mine == want, (path, (fl, fv, fa, emb), sorted(set(mine) ^ set(want))[:6])
            checked += 1
    assert checked >= 40


# -- flag names: ms-swift's own argument parser is the oracle -------------------------------------------
_PARSE = r"""
import json, sys
from transformers import HfArgumentParser
from swift.arguments import RLHFArguments, SftArguments
from swift.utils.utils import _patch_get_type_hints
out = []
for command, argv in json.loads(sys.stdin.read()):
    with _patch_get_type_hints():
        parser = HfArgumentParser([RLHFArguments if command == "rlhf" else SftArguments])
    try:
        ns, rest = parser.parse_known_args(argv)
        out.append({"rest": rest, "freeze_vit": ns.freeze_vit, "lora_rank": ns.lora_rank})
    except SystemExit:  # argparse's own error (an ambiguous abbreviation)
        out.append({"exit": True})
print(json.dumps({"runs": out, "sft": sorted({o[2:].replace("-", "_") for a in HfArgumentParser(
    [SftArguments])._actions for o in a.option_strings if o.startswith("--")})}))
"""

FLAG_CASES = [
    ("sft", "--tuner_type full --freeze_vitt false --lora_ranks 64"),
    ("sft", "--sft_type full --model_id_or_path x"),
    ("sft", "--tuner_type full --train_type full"),
    ("sft", "--lora_r 16 --no_freeze_vit"),
    ("sft", "--lora_ 4"),
    ("sft", "--rpo_alpha 0.1"),
    ("rlhf", "--rpo_alpha 0.1 --beta 0.2 --lora-rank 4"),
    ("rlhf", "--num_generation 4"),
    ("sft", "--freeze-vit false --vit_lr 1e-5 --use_rslora true"),
]


def test_flag_names_as_swifts_parser_reads_them():
    """What swift's HfArgumentParser leaves over (and then stops on) is exactly what the import
    refuses; an abbreviation and --no_freeze_vit read as swift reads them; the stored option
    list is the installed parser's."""
    from mixspec.importers._swift_keys import SFT_4

    model = "Qwen/Qwen2.5-VL-7B-Instruct"
    argvs = [[c, ["--model", model, "--dataset", "d"] + body.split()] for c, body in FLAG_CASES]
    proc = subprocess.run([str(VENV / "bin" / "python"), "-c", _PARSE], input=json.dumps(argvs), text=True,
                          capture_output=True, env=swift_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    swift = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(swift["sft"]) == SFT_4
    for (command, body), real in zip(FLAG_CASES, swift["runs"]):
        got = read("swift", f"swift {command} --model {model} --dataset d {body}\n", "t.sh")
        refused = {p.path for p in got.problems}
        if real.get("exit"):
            assert refused and all("ambiguous" in p.message for p in got.problems), body
            continue
        assert refused == {w for w in real["rest"] if w.startswith("--")}, body
        if not refused:
            assert got.ok
            assert {c.lora.rank for c in got.plan.components if c.lora} == {real["lora_rank"]}
            vision = [c for c in got.plan.components if c.name.startswith("vision") and c.trainable_params]
            assert bool(vision) == (not real["freeze_vit"]), body
