"""The hf target's image rows, family by family, against each family's own processor.

For every family of tests/fixtures/tiny_families.py: a tiny random model with its real
processor class, published chat template and tokenizer specials; rows with 1, 2 and 0 images
of different sizes (families that need an image on every row get one). Then, with the python
where that family's processor loads (families whose processors need torchvision run in the
ms-swift venv, whose torch/torchvision pair loads on CPU; the others in this one):

- ``train.py --preview-data`` writes each row as one micro-batch; tests/fixtures/data_oracle.py
  compares every key with ``processor.apply_chat_template(..., tokenize=True)`` on the whole
  conversation (prefix-LM families: ``processor(text, images, suffix=answer)``), the decoded
  labels with the chat template's own text of each assistant turn, and the micro-batch of all
  rows with the processor's own batch of the same conversations;
- causality: changing the last labelled token leaves every earlier logit unchanged;
- two training steps with micro-batches of 2 mixed rows: frozen parameters bit-identical, the
  trained ones that received a gradient moved, the vision tower and the aligner among them,
  every trainable parameter at its planned LR.

This is the families table in docs/targets.md (the hf target) and targets/hf.py IMAGE_ROWS_PROVEN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixspec.language.loader import load_spec
from mixspec.output import write_files
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, render
from mixspec.targets.hf import IMAGE_ROWS_PROVEN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
import tiny_families  # noqa: E402
from swift_venv import PYTHON as MM_PYTHON  # noqa: E402  (torch + torchvision that load on CPU)
from swift_venv import VENV as SWIFT_VENV  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")

SEED_FAMILIES = ("qwen2_5_vl", "qwen3_vl")

SPEC = """\
version: 1
model: {model}
components:
  vision: {{train: full, lr: 1.0e-5}}
  aligner: {{train: full, lr: 1.0e-4}}
  language: {{train: lora, lr: 2.0e-4, lora: {{rank: 4, alpha: 8, targets: all-linear}}}}
training: {{epochs: 1, max_steps: 2, micro_batch_size: 2, gradient_accumulation: 1, precision: fp32,
           gradient_checkpointing: false, max_length: 2048, logging_steps: 1, lr_scheduler: constant,
           save_steps: 100, seed: 3}}
data: {{train: data.jsonl}}
output_dir: run
"""


def python_for(family: str) -> Path:
    if tiny_families.family_info(family)["needs_torchvision"]:
        if not MM_PYTHON.exists():
            pytest.skip(f"{family}'s processor needs torchvision: no venv at {SWIFT_VENV} (bash scripts/swift_env.sh)")
        return MM_PYTHON
    return Path(sys.executable)


def run(python, *args, cwd, timeout=420):
    result = subprocess.run([str(python), *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    return result


def result_of(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def rows_for(family: str, workdir: Path):
    """Rows with 1, 2 and 0 images of different sizes (an image on every row where the family
    needs one; one image per row where it takes no more)."""
    from PIL import Image

    info = tiny_families.family_info(family)
    sizes = {"red.png": ((40, 56), (200, 30, 30)), "blue.png": ((64, 48), (30, 30, 200)),
             "green.png": ((56, 56), (30, 180, 30))}
    for name, (size, colour) in sizes.items():
        Image.new("RGB", size, colour).save(workdir / name)
    prefix_lm = info["model_type"] == "paligemma"
    two = 2 if (info["max_images_per_row"] or 2) >= 2 else 1
    rows = [
        {"messages": [{"role": "user", "content": "<image>What colour is this?"},
                      {"role": "assistant", "content": "Red."}], "images": ["red.png"]},
        {"messages": [{"role": "user", "content": "<image>" * two + "Compare them."},
                      {"role": "assistant", "content": "Blue and green."}]
         + ([] if prefix_lm else [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]),
         "images": ["blue.png", "green.png"][:two]},
        {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello, how are you today?"}]},
    ]
    if not info["text_only_rows"]:
        rows[2]["images"] = ["green.png"]
        rows[2]["messages"][0]["content"] = "<image>Hello"
    (workdir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.fixture(scope="module", params=tiny_families.FAMILIES)
def family_run(request, tmp_path_factory):
    family = request.param
    python = python_for(family)
    workdir = tmp_path_factory.mktemp(family)
    built = run(python, FIXTURES / "tiny_families.py", family, workdir / "model", cwd=workdir)
    assert built.returncode == 0, built.stderr[-3000:]
    rows = rows_for(family, workdir)
    spec = workdir / "spec.yaml"
    spec.write_text(SPEC.format(model=workdir / "model"), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    write_files(workdir / "out", render(plan, "hf", TargetOptions()), force=True)
    return {"family": family, "python": python, "dir": workdir, "plan": plan, "rows": rows}


def test_preview_equals_the_processor_labels_are_the_assistant_turns_and_answers_are_causal(family_run):
    d, python = family_run["dir"], family_run["python"]
    preview = run(python, d / "out" / "train.py", "--preview-data", "3", "--preview-out", d / "preview", cwd=d)
    assert preview.returncode == 0, preview.stdout[-2000:] + preview.stderr[-3000:]
    assert sorted(p.name for p in (d / "preview").iterdir()) == ["preview.txt", "row0.safetensors",
                                                                "row1.safetensors", "row2.safetensors"]
    text = (d / "preview" / "preview.txt").read_text(encoding="utf-8")
    assert "row 0 (data.jsonl:1): 1 image(s)" in text and "labelled text:" in text
    report = result_of(run(python, FIXTURES / "data_oracle.py", "preview", d / "model", d / "data.jsonl",
                           d / "preview", d / "out" / "train.py", cwd=d))
    rows = report["rows"]
    assert [r["images"] for r in rows] == [len(r.get("images", [])) for r in family_run["rows"]]
    for entry in rows:
        assert entry["mismatch"] == [], (family_run["family"], entry)
        assert entry["labelled"] == entry["assistant"], (family_run["family"], entry)
        assert entry["causal_max_change"] < 1e-5, (family_run["family"], entry["row"], entry["causal_max_change"])
    assert report["batch_mismatch"] == [], report["batch_mismatch"]


def test_two_steps_with_mixed_micro_batches_train_exactly_the_plan(family_run):
    d, python, plan = family_run["dir"], family_run["python"], family_run["plan"]
    report = result_of(run(python, FIXTURES / "data_oracle.py", "train", d / "out" / "train.py", d / "data.jsonl",
                           cwd=d))
    assert report["steps"] == 2
    assert max(b["input_ids"][0] for b in report["batches"]) == 2  # a micro-batch of two rows
    planned = plan.trainable_lrs()
    assert report["lrs"] == planned
    moved = {n for n, trainable in report["moved"]}
    frozen_moved = [n for n, trainable in report["moved"] if not trainable]
    assert frozen_moved == []
    assert moved == set(report["got_grad"]) & set(planned)  # everything that got a gradient moved
    for comp in ("vision", "aligner", "language"):
        names = set(plan.component(comp).trainable_names)
        assert names & moved, f"{family_run['family']}: nothing of {comp} moved"
    if family_run["family"] in SEED_FAMILIES:  # the seed case: the whole ViT and aligner train on image rows
        for comp in ("vision", "aligner"):
            still = set(plan.component(comp).trainable_names) - moved
            assert not still, f"{family_run['family']}: {comp} parameters did not move: {sorted(still)[:5]}"


def test_the_proven_table_is_what_these_tests_run():
    assert set(IMAGE_ROWS_PROVEN) == {tiny_families.family_info(f)["model_type"] for f in tiny_families.FAMILIES}


DDP_FAMILIES = ("mllama", "qwen2_5_vl")


@pytest.mark.parametrize("family", DDP_FAMILIES)
def test_ddp_two_ranks_with_image_and_text_rows(family, tmp_path):
    """2 ranks (gloo, CPU), micro-batch 1: one rank gets an image row while the other gets a
    text-only row, so the vision tower, the projector (and Mllama's cross-attention layers) are
    used on one rank only. Must finish, in step, with identical trained weights."""
    python = python_for(family)
    built = run(python, FIXTURES / "tiny_families.py", family, tmp_path / "model", cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    rows = rows_for(family, tmp_path)
    rows = [rows[0], rows[2], rows[1], rows[2]] if tiny_families.family_info(family)["text_only_rows"] else rows
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(model=tmp_path / "model").replace("micro_batch_size: 2", "micro_batch_size: 1"),
                    encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    write_files(tmp_path / "out", render(plan, "hf", TargetOptions()), force=True)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env_run = dict(ENV, MIXSPEC_ORACLE_OUT=str(tmp_path / "result"))
    proc = subprocess.run([str(python), "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(FIXTURES / "data_oracle.py"),
                           "train", str(tmp_path / "out" / "train.py"), str(tmp_path / "data.jsonl")],
                          cwd=tmp_path, env=env_run, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"result.rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {r["world_size"] for r in results} == {2} and {r["wrapped"] for r in results} == {"DistributedDataParallel"}
    assert {r["steps"] for r in results} == {2}
    assert len({r["trained_sha256"] for r in results}) == 1  # the ranks stayed in step
    if tiny_families.family_info(family)["text_only_rows"]:  # a step where only one rank had images
        by_rank = sorted(results, key=lambda r: r["rank"])
        assert any(("pixel_values" in a) != ("pixel_values" in b)
                   for a, b in zip(by_rank[0]["batches"], by_rank[1]["batches"])), [r["batches"] for r in by_rank]
    for r in results:
        assert r["lrs"] == plan.trainable_lrs()
        assert [n for n, trainable in r["moved"] if not trainable] == []
