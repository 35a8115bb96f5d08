"""Speed of the data check (train.py's check_data, what `mixspec data check` runs) against its floor.

    python benchmarks/data_check_speed.py [--rows 10000] [--family llava] [--workers 1 2]

Builds a tiny model of the family offline (tests/fixtures), writes a mixed .jsonl of ROWS rows
(a third text-only, a third with one small image, a third with two images of other sizes, some
with a system turn), then measures rows/s of:

- floor: the family's processor alone in a loop on one core, once per row, on the whole
  conversation with its images opened from disk (``processor.apply_chat_template(messages,
  tokenize=True, return_dict=True)``): the least any check that reads every row through the
  processor must do;
- the check (``check_data``, no cache) with each worker count.

It prints one JSON object: rows/s of each, and per worker the ratio to the floor (the goal is
at least 0.8, the same for every worker count: linear in workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


def make_model(family: str, folder: Path) -> Path:
    if family == "llava":
        import make_tiny_vlm

        return make_tiny_vlm.make_tiny_llava(folder / "model")
    import tiny_families

    return tiny_families.make_tiny(family, folder / "model")


def make_rows(folder: Path, rows: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    sizes = [(56, 56), (64, 48), (80, 64), (40, 72)]
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i, 200 - 40 * i, 90)).save(folder / f"img{i}.png")
    words = "the quick brown fox jumps over a lazy dog red blue square circle picture answer".split()
    lines = []
    for i in range(rows):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
        kind = i % 3
        images = [f"img{rng.randrange(4)}.png" for _ in range(kind)]
        messages = [{"role": "user", "content": "<image>" * kind + question},
                    {"role": "assistant", "content": answer}]
        if i % 5 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        lines.append(json.dumps({"messages": messages, **({"images": images} if images else {})}))
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def floor_rate(model: Path, data: Path) -> float:
    """Rows/s of the processor alone, one row at a time, on one core."""
    import data_oracle
    import torch
    import transformers

    torch.set_num_threads(1)
    processor = transformers.AutoProcessor.from_pretrained(model)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    start = time.perf_counter()
    for row in rows:
        messages, _ = data_oracle.hf_messages(row, str(data.parent))
        processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    return len(rows) / (time.perf_counter() - start)


def check_rate(model: Path, data: Path, family: str, workers: int, max_length: int) -> tuple[float, dict]:
    import transformers

    from mixspec.programs import hf_train

    model_type = transformers.AutoConfig.from_pretrained(model).model_type
    setup = {"model": str(model), "model_type": model_type, "multimodal": True, "max_length": max_length,
             "mixspec_version": "bench"}
    start = time.perf_counter()
    report, _ = hf_train.check_data([("train", str(data))], setup, workers=workers, progress=False, cache=False)
    return report["rows"] / (time.perf_counter() - start), report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--family", default="llava")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-length", type=int, default=4096)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_model(args.family, folder)
        data = make_rows(folder, args.rows)
        floor = floor_rate(model, data)
        out = {"family": args.family, "rows": args.rows, "cpus": os.cpu_count(), "floor_rows_per_s": round(floor, 1),
               "check": []}
        for workers in args.workers:
            rate, report = check_rate(model, data, args.family, workers, args.max_length)
            out["check"].append({"workers": workers, "rows_per_s": round(rate, 1), "accepted": report["accepted"],
                                 "ratio_to_floor_per_worker": round(rate / (floor * workers), 3)})
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
