"""Speed of the data check (train.py's check_data, what `mixspec data check` runs) against its floor.

    python benchmarks/data_check_speed.py [--rows 10000] [--family llava] [--workers 1 2]

Builds a tiny model of the family offline (tests/fixtures' families, or with a catalog id such as
llava-hf/llava-1.5-7b-hf the `mixspec tiny` model: the family's published image size and image
tokens, a synthesized tokenizer), writes a mixed .jsonl of ROWS rows
(a third text-only, a third with one small image, a third with two images of other sizes, some
with a system turn), then measures rows/s of:

- floor: the family's processor alone in a loop on one core, once per row, on the whole
  conversation with its images opened from disk (``processor.apply_chat_template(messages,
  tokenize=True, return_dict=True)``): the least any check that reads every row through the
  processor must do (the collector frozen over the loop, as the check runs its rows);
- the check (``check_data``, no cache) with each worker count (this process and N-1 worker
  processes), by wall clock and by CPU time of all its processes (rows per CPU second, against
  the floor's): per-worker throughput whether or not a free core was there, so linearity can
  be read on a shared machine; and by CPU time less the workers' starts, measured apart (a
  worker started as the check starts it: forked from a process with the processor loaded,
  or where it cannot fork, spawned to import train.py's module and load the processor).

It prints one JSON object: rows/s of each, and per worker the ratio to the floor (the goal is
at least 0.8, the same for every worker count: linear in workers).

With ``--cpu-rows N`` it also times both on the first N rows by CPU time in this one process
(``time.process_time``, alternating floor and check, best of ``--repeat``), reading the file
included in both: per-worker throughput that other jobs on a shared machine move far less
than wall clock.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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
    if "/" in family:  # a catalog id: `mixspec tiny`, with the family's published processor sizes
        from mixspec.models.sources import find_model
        from mixspec.models.tiny import make_tiny

        make_tiny(Path(find_model(family).path), folder / "model")
        return folder / "model"
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


def cpu_seconds() -> float:
    """CPU time of this process and of its ended children (the check's worker processes)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def floor_rate(model: Path, data: Path) -> tuple[float, float]:
    """Rows/s of the processor alone, one row at a time, on one core: by wall clock, by CPU time."""
    import data_oracle
    import torch
    import transformers

    torch.set_num_threads(1)
    processor = transformers.AutoProcessor.from_pretrained(model)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    with frozen_gc():
        start, cpu = time.perf_counter(), time.process_time()
        for row in rows:
            messages, _ = data_oracle.hf_messages(row, str(data.parent))
            processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        return len(rows) / (time.perf_counter() - start), len(rows) / (time.process_time() - cpu)


@contextlib.contextmanager
def frozen_gc():
    """The collector as the check runs its rows (gc.freeze over the loop): the floor gets it too."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def floor_seconds(processor, data: Path) -> float:
    """CPU seconds of the floor over the file: parse each line, open its images, process it."""
    import data_oracle

    with frozen_gc():
        start = time.process_time()
        for line in data.read_text(encoding="utf-8").splitlines():
            messages, _ = data_oracle.hf_messages(json.loads(line), str(data.parent))
            processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
        return time.process_time() - start


def check_seconds(encoder, setup: dict, data: Path) -> float:
    """CPU seconds of the check over the file in this process: scan_rows, then check_rows."""
    from mixspec.programs import hf_train

    start = time.process_time()
    rows, _ = hf_train.scan_rows(str(data))
    hf_train.check_rows(rows, setup, workers=1, encoder=encoder, progress=False)
    return time.process_time() - start


def cpu_rates(model: Path, data: Path, rows: int, repeat: int, max_length: int) -> dict:
    """Rows/s by CPU time in one process on the first ROWS rows, best of REPEAT, alternating."""
    import torch
    import transformers

    from mixspec.programs import hf_train

    torch.set_num_threads(1)
    part = data.with_name("cpu_part.jsonl")
    part.write_text("\n".join(data.read_text(encoding="utf-8").splitlines()[:rows]) + "\n", encoding="utf-8")
    setup = {"model": str(model), "model_type": transformers.AutoConfig.from_pretrained(model).model_type,
             "multimodal": True, "max_length": max_length, "mixspec_version": "bench"}
    processor = transformers.AutoProcessor.from_pretrained(model)
    encoder = hf_train.make_encoder(str(model), setup, quiet=True)
    floor_s, check_s = [], []
    for _ in range(repeat):
        floor_s.append(floor_seconds(processor, part))
        check_s.append(check_seconds(encoder, setup, part))
    floor, check = rows / min(floor_s), rows / min(check_s)
    return {"rows": rows, "repeat": repeat, "floor_rows_per_s": round(floor, 1),
            "check_rows_per_s": round(check, 1), "ratio_to_floor": round(check / floor, 3)}


def check_rate(model: Path, data: Path, family: str, workers: int, max_length: int) -> tuple[float, float, dict]:
    """(rows/s, CPU seconds of this process and its workers, the report)."""
    import transformers

    from mixspec.programs import hf_train

    model_type = transformers.AutoConfig.from_pretrained(model).model_type
    setup = {"model": str(model), "model_type": model_type, "multimodal": True, "max_length": max_length,
             "mixspec_version": "bench"}
    start, cpu = time.perf_counter(), cpu_seconds()
    report, _ = hf_train.check_data([("train", str(data))], setup, workers=workers, progress=False, cache=False)
    return report["rows"] / (time.perf_counter() - start), cpu_seconds() - cpu, report


def worker_start(model: Path, family: str, max_length: int) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, start method) of one check worker's start as the check starts
    it (train.py's check_worker_pool): forked from this process with its processor loaded, or
    spawned (train.py's module imported, the processor loaded); one empty task, exit."""
    import transformers

    from mixspec.programs import hf_train

    setup = {"model": str(model), "model_type": transformers.AutoConfig.from_pretrained(model).model_type,
             "multimodal": True, "max_length": max_length, "mixspec_version": "bench"}
    encoder = hf_train.make_encoder(str(model), setup, quiet=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    with hf_train.check_worker_pool(1, setup, encoder) as pool:
        pool.submit(os.getpid).result()
    return time.perf_counter() - start, cpu_seconds() - cpu, hf_train.worker_start_method()


def check_entry(model: Path, data: Path, args, workers: int, floor: float, floor_cpu: float, start_cpu: float) -> dict:
    """Rows/s of the check with WORKERS processes, and rows per CPU second of all of them
    against the floor's (per worker, whatever else runs), also less the workers' starts."""
    rate, cpu, report = check_rate(model, data, args.family, workers, args.max_length)
    out = {"workers": workers, "processes_used": report["workers"], "rows_per_s": round(rate, 1),
           "accepted": report["accepted"], "ratio_to_floor_per_worker": round(rate / (floor * workers), 3),
           "rows_per_cpu_s": round(args.rows / cpu, 1), "cpu_ratio_to_floor": round(args.rows / cpu / floor_cpu, 3)}
    if report["workers"] > 1:
        rows_cpu = cpu - (report["workers"] - 1) * start_cpu
        out.update(cpu_ratio_to_floor_without_starts=round(args.rows / rows_cpu / floor_cpu, 3))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--family", default="llava",
                        help="a tiny fixture family (llava, gemma3, ...) or a catalog id (built by `mixspec tiny`)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--cpu-rows", type=int, default=0, help="also time by CPU time on this many rows (0: not)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_model(args.family, folder)
        data = make_rows(folder, args.rows)
        floor, floor_cpu = floor_rate(model, data)
        out = {"family": args.family, "rows": args.rows, "cpus": os.cpu_count(), "floor_rows_per_s": round(floor, 1),
               "floor_rows_per_cpu_s": round(floor_cpu, 1), "load_average": list(os.getloadavg()), "check": []}
        if args.cpu_rows:
            out["cpu_time"] = cpu_rates(model, data, min(args.cpu_rows, args.rows), args.repeat, args.max_length)
        start_s, start_cpu, method = worker_start(model, args.family, args.max_length)
        out.update(worker_start=method, worker_start_s=round(start_s, 3), worker_start_cpu_s=round(start_cpu, 3))
        for workers in args.workers:
            out["check"].append(check_entry(model, data, args, workers, floor, floor_cpu, start_cpu))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
