"""ms-swift's published "LoRA LLM + full ViT" example (about 22 GiB per GPU) against `mixspec plan`,
at max_length and at the data's own lengths.

    python benchmarks/swift_example_lengths.py [--rows 500]

ms-swift's examples/train/multimodal/lora_llm_full_vit/sft.sh trains Qwen2.5-VL-7B on
'AI-ModelScope/coco#20000' (one COCO photo and a one-sentence caption per row) with the ViT and
merger fully at 1e-5, LoRA r16 on the LLM at 1e-4, max_length 8192, MAX_PIXELS 1003520, 4 GPUs,
ZeRO-2, batch 1; its header says "4 * 22GiB". No hub here, so the data is of the same shape, not
the same rows: COCO's image sizes (the long side 640, the short one 360-480: COCO's common
sizes) and captions of 8-20 words. The model directory holds Qwen2.5-VL-7B's published
config.json with a tiny Qwen2.5-VL tokenizer and the real Qwen2-VL image processor (patch 14,
merge 2: the image tokens are exactly the real model's; the caption's text tokens come from the
tiny tokenizer, a few dozen more or less than the real one's per row).

Runs the data check (train.py's check_data, under --python: Qwen2.5-VL's processor needs
torchvision, which the ms-swift venv of scripts/swift_env.sh has) then `mixspec plan --target
swift --json` on that spec and prints one
JSON object: the peak at max_length, the peak at the data's longest micro-batch, their ratio
to the published 22 GiB, and the longest row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_GIB = 22.0
WORDS = ("a man woman dog cat bus train street table plate pizza kitchen sitting standing next to "
         "with on of the in front two people riding bicycle near water red blue large small").split()

SPEC = """version: 1
model: {model}
components:
  vision: {{train: full, lr: 1.0e-5}}
  aligner: {{train: full, lr: 1.0e-5}}
  language: {{train: lora, lr: 1.0e-4, lora: {{rank: 16, alpha: 32}}}}
training: {{max_length: 8192, micro_batch_size: 1, gradient_accumulation: 4, gradient_checkpointing: true}}
data: {{train: {data}, max_pixels: 1003520}}
distributed: {{gpus_per_node: 4, zero_stage: 2}}
"""


def build(root: Path, rows: int) -> Path:
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import tiny_families
    from PIL import Image

    model = tiny_families.make_tiny("qwen2_5_vl", root / "model", real_ids=True)
    shutil.copy(ROOT.parent / "shared" / "models" / "Qwen" / "Qwen2.5-VL-7B-Instruct" / "config.json",
                model / "config.json")
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    rng = random.Random(0)
    sizes = [(640, 480), (640, 427), (640, 360), (480, 640), (427, 640)]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (rng.randrange(256), 0, 0)).save(root / f"img{i}.jpg")
    with open(root / "coco.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(rows):
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
            fh.write(json.dumps({"messages": [{"role": "user", "content": "<image>Describe the image."},
                                              {"role": "assistant", "content": caption}],
                                 "images": [f"img{rng.randrange(len(sizes))}.jpg"]}) + "\n")
    spec = root / "spec.yaml"
    spec.write_text(SPEC.format(model=model, data=root / "coco.jsonl"), encoding="utf-8")
    return spec


def check(spec: Path, python: str) -> dict:
    """`mixspec data check` of the spec, its rows read by train.py's own check_data under
    ``python`` (Qwen2.5-VL's processor needs torchvision, which the project's venv lacks: the
    ms-swift venv has it), then recorded for the spec as `data check` records it."""
    from mixspec import __version__
    from mixspec.api import load_spec, plan_spec
    from mixspec.data.datacheck import data_paths, processor_dir, record_check

    loaded = load_spec(spec)
    plan = plan_spec(loaded)
    files = data_paths(loaded, plan)
    setup = {"model": processor_dir(loaded, plan), "model_type": plan.model_type, "multimodal": plan.multimodal,
             "max_length": plan.training.max_length, "pixel_limits": {"max_pixels": plan.data.max_pixels},
             "mixspec_version": __version__}
    # the generated train.py (standalone: the package program imports mixspec's helpers)
    from mixspec.targets import TargetOptions, render

    program = spec.parent / "train.py"
    program.write_text(render(plan, "hf", TargetOptions())["train.py"], encoding="utf-8")
    code = ("import importlib.util, json, sys; spec = importlib.util.spec_from_file_location('t', sys.argv[1]); "
            "t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t); "
            "r, _ = t.check_data([tuple(f) for f in json.loads(sys.argv[2])], json.loads(sys.argv[3]), workers=1, "
            "progress=False); print(json.dumps(r))")
    out = subprocess.run([python, "-c", code, str(program), json.dumps(files), json.dumps(setup)],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    record_check(loaded.path, files, report)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=500)
    ap.add_argument("--python", default=str(ROOT / ".venv-swift" / "bin" / "python"),
                    help="a python with torchvision, for Qwen2.5-VL's processor (default: the ms-swift venv)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = build(root, args.rows)
        os.environ["MIXSPEC_CACHE_DIR"] = str(root / "cache")
        report = check(spec, args.python)
        if report["refused"]:
            print(json.dumps(report["refused"][:3], indent=2), file=sys.stderr)
            return 1
        plan = subprocess.run([sys.executable, "-m", "mixspec", "plan", str(spec), "--target", "swift", "--json"],
                              capture_output=True, text=True, check=True)
        data = json.loads(plan.stdout)
    gib = 1024 ** 3
    worst = data["estimate"]["per_gpu_bytes"]["peak"] / gib
    at = data["estimate_at_data"]
    real = at["estimate"]["per_gpu_bytes"]["peak"] / gib
    print(json.dumps({
        "rows": report["rows"], "tokens": report["tokens"], "longest_row": at["rows"][0],
        "peak_gib_at_max_length": round(worst, 2), "peak_gib_at_data": round(real, 2),
        "model_states_gib": round(at["estimate"]["per_gpu_bytes"]["total"] / gib, 2),
        "published_gib": PUBLISHED_GIB, "ratio_at_max_length": round(worst / PUBLISHED_GIB, 3),
        "ratio_at_data": round(real / PUBLISHED_GIB, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
