"""`mixspec data check` and train.py's data preflight: every row run through train.py's own row
code, each bad row refused with its file:line, token lengths equal to the family's processor.

The oracle is the family's own processor (``processor.apply_chat_template(tokenize=True)`` on
the whole conversation, tests/fixtures/data_oracle.py), never the check's code. Models are tiny
(a LLaVA-1.5 and a LLaVA-NeXT, whose image token count depends on the image size).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
import data_oracle  # noqa: E402
import make_tiny_vlm  # noqa: E402
import tiny_families  # noqa: E402

pytest.importorskip("PIL")

FAMILIES = ("llava", "llava_next")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb(path: Path) -> None:
    """A 200-byte PNG whose header claims 40,000 x 40,000 pixels (4.8 GB as RGB)."""
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))


def row(question, answer, images=None):
    out = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return dict(out, images=images) if images else out


def oracle_length(processor, data_row, base):
    want, _, _ = data_oracle.oracle_inputs(processor, [data_row], str(base), False)
    return int(want["input_ids"].shape[1])


def planted(root: Path, processor):
    """(data file, max_length, good {line: row}, bad {line: reason regex}): good rows of 0, 1 and
    2 images of different sizes, one over max_length with its answer cut, and one bad row of
    each kind among them."""
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 0, 0)).save(root / "a.png")
    Image.new("RGB", (96, 64), (0, 0, 200)).save(root / "b.png")
    (root / "corrupt.png").write_bytes((root / "a.png").read_bytes()[:70])
    write_bomb(root / "bomb.png")
    good = [row("<image>What is it?", "A red square.", ["a.png"]), row("Hi", "Hello there."),
            row("<image>And this one?<image>", "Two pictures.", ["a.png", "b.png"]),
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
                          {"role": "assistant", "content": "Because."}]}]
    max_length = max(oracle_length(processor, r, root) for r in good) + 8
    per_image = oracle_length(processor, good[0], root) - oracle_length(processor, row("What is it?", "A red square."), root)
    many = max_length // max(per_image, 1) + 2
    long_answer = row("Tell me.", " ".join(["word"] * (2 * max_length)))
    latin1 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    bad = {
        "not json {": r"not valid JSON",
        json.dumps({"msgs": []}): r"needs a non-empty \"messages\" list",
        json.dumps(row("q", "a") | {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}):
            r"message 1 has role 'bot'",
        json.dumps(row("Say nothing", "  ")): r"message 2 is an empty assistant answer",
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}): r"no assistant message",
        json.dumps(row("<image>x", "y", ["missing.png"])): r"image not found: .*missing\.png",
        json.dumps(row("<image>x", "y", ["corrupt.png"])): r"cannot read image .*corrupt\.png",
        json.dumps(row("<image><image>x", "y", ["a.png"])): r"2 image markers but 1 images",
        json.dumps(row("<image>x", "y", ["bomb.png"])): r"cannot read image .*bomb\.png: DecompressionBomb",
        json.dumps(row("<image>" * many + "x", "y", ["a.png"] * many)):
            rf"tokens; cutting at max_length {max_length} would cut an image \(it needs max_length >= \d+",
        json.dumps(row(" ".join(["long"] * (2 * max_length)), "y")):
            r"would leave no answer token \(it needs max_length >= \d+",
        latin1: rf"not UTF-8 text \(byte 0xe9 at column {latin1.index(0xE9) + 1}\)",
        b'{"messages": ' + b"[" * 100_000: r"nested deeper than a JSON reader follows",
        b'{"messages": [], "n": ' + b"9" * 5000 + b"}": r"not readable JSON: Exceeds the limit \(4300 digits\)",
        json.dumps(row("half \ud800 a character", "y")): r"has a lone surrogate \\ud800",
        json.dumps(row("<image>x", "y", ["https://example.com/a.png"])): r"image https://example.com/a.png is a URL",
        b'{"pad": "' + b"x" * (17 * 1024 * 1024) + b'"}': r"line of 17,825,\d+ bytes, over the limit",
    }
    lines, good_at, bad_at = [], {}, {}
    for i, text in enumerate(bad):
        data_row = good[i % len(good)]
        lines.append(json.dumps(data_row).encode())
        good_at[len(lines)] = data_row
        lines.append(text if isinstance(text, bytes) else text.encode())
        bad_at[len(lines)] = bad[text]
        if i == 3:
            lines.append(b"")  # a blank line: skipped, and the line numbers stay the file's
    lines.append(json.dumps(long_answer).encode())
    good_at[len(lines)] = long_answer
    path = root / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, max_length, good_at, bad_at


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, model dir, the family's processor, planted data, max_length, good rows, bad rows)."""
    import transformers

    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        model = make_tiny_vlm.make_tiny_llava(root / "model")
    else:
        model = tiny_families.make_tiny(request.param, root / "model")
    processor = transformers.AutoProcessor.from_pretrained(model)
    data, max_length, good, bad = planted(root, processor)
    return request.param, model, processor, data, max_length, good, bad


def write_spec(path: Path, model: Path, data, max_length: int, eval_data=None) -> Path:
    data_yaml = json.dumps([str(d) for d in data]) if isinstance(data, list) else str(data)
    path.write_text(f"""version: 1
model: {model}
components:
  language: {{train: lora, lr: 2.0e-4, lora: {{rank: 4, alpha: 8, targets: all-linear}}}}
training: {{max_length: {max_length}, precision: fp32, gradient_checkpointing: false, max_steps: 1}}
data: {{train: {data_yaml}{f', eval: {eval_data}' if eval_data else ''}}}
""", encoding="utf-8")
    return path


def run_cli(*args, cache_dir=None):
    from typer.testing import CliRunner

    from mixspec.cli import app

    env = {"MIXSPEC_CACHE_DIR": str(cache_dir)} if cache_dir else {}
    result = CliRunner().invoke(app, list(map(str, args)), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_data_check_refuses_exactly_the_planted_rows_and_counts_tokens_as_the_processor(family, tmp_path):
    name, model, processor, data, max_length, good, bad = family
    spec = write_spec(tmp_path / "spec.yaml", model, data, max_length)
    code, out, err = run_cli("data", "check", spec, "--json", "--workers", "1", cache_dir=tmp_path / "cache")
    assert code == 1, err
    report = json.loads(out)
    assert {"rows", "accepted", "refused", "tokens", "over_max_length", "files"} <= set(report)
    # exactly the planted lines, each located and saying why
    assert {r["line"] for r in report["refused"]} == set(bad), report["refused"]
    for r in report["refused"]:
        assert r["file"] == str(data)
        assert re.search(bad[r["line"]], r["reason"]), (r["line"], r["reason"])
    assert report["rows"] == len(good) + len(bad) and report["accepted"] == len(good)
    assert sum(g["count"] for g in report["reasons"]) == len(bad)
    # every accepted row's length is the family's processor's, image tokens expanded
    want = {line: oracle_length(processor, r, data.parent) for line, r in good.items()}
    (entry,) = report["files"]
    assert dict(map(tuple, entry["lengths"])) == want
    assert (report["tokens"]["min"], report["tokens"]["max"]) == (min(want.values()), max(want.values()))
    over = [line for line, n in want.items() if n > max_length]
    assert report["over_max_length"] == entry["over_max_length"] == len(over) == 1
    assert report["truncation"]["tokens_lost"] == sum(want[line] - max_length for line in over)
    assert report["truncation"]["answers_cut"] == 1
    assert sum(h["rows"] for h in report["histogram"]) == len(good)
    per_row = {}
    for r in good.values():
        per_row[str(len(r.get("images", [])))] = per_row.get(str(len(r.get("images", []))), 0) + 1
    assert report["images"]["images_per_row"] == per_row
    assert report["images"]["largest"] == [96, 64] and report["images"]["smallest"] == [56, 56]

    # the text report: the same counts, the first refusals located, exit 1
    code, out, _ = run_cli("data", "check", spec, "--workers", "1", cache_dir=tmp_path / "cache")
    assert code == 1
    assert f"refused: {len(bad)}" in out and f"{data}:{min(bad)}: " in out
    assert "tokens per row (image tokens expanded)" in out and "over max_length" in out


def test_parallel_workers_and_the_cache_give_the_same_report(family, tmp_path, monkeypatch):
    name, model, processor, data, max_length, good, bad = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough for the worker processes")
    from mixspec.programs import hf_train

    # a worker started whatever the file's size (else this small file is checked here alone)
    monkeypatch.setattr(hf_train, "WORKER_START_S", {"fork": 0.0, "spawn": 0.0})
    monkeypatch.setattr(hf_train, "PROBE_S", 0.0)
    method = hf_train.worker_start_method

    setup = {"model": str(model), "model_type": "llava", "multimodal": True, "max_length": max_length,
             "mixspec_version": "test"}
    os.environ["MIXSPEC_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        one, _ = hf_train.check_data([("train", str(data))], setup, workers=1, progress=False)
        two, _ = hf_train.check_data([("train", str(data))], setup, workers=2, progress=False, cache=False)
        # the other way to start a worker too: a spawned one loads the processor itself
        monkeypatch.setattr(hf_train, "worker_start_method", lambda: "spawn" if method() == "fork" else "fork")
        other, _ = hf_train.check_data([("train", str(data))], setup, workers=2, progress=False, cache=False)
        monkeypatch.setattr(hf_train, "worker_start_method", method)
        again, _ = hf_train.check_data([("train", str(data))], setup, workers=1, progress=False)
        longer, _ = hf_train.check_data([("train", str(data))], dict(setup, max_length=max_length + 1), workers=1,
                                        progress=False)
    finally:
        del os.environ["MIXSPEC_CACHE_DIR"]
    assert (one["cached"], two["workers"], other["workers"], again["cached"], longer["cached"]) == (False, 2, 2, True, False)
    for key in ("rows", "accepted", "refused", "tokens", "over_max_length", "files", "truncation", "images"):
        assert one[key] == two[key] == other[key] == again[key], key


def test_a_forked_worker_has_this_process_encoder_and_says_nothing(family, capfd, monkeypatch):
    """Where this process can fork, a worker is forked with the encoder already loaded (it loads
    nothing itself), gives the rows' results as this process does, and writes nothing to stderr;
    TOKENIZERS_PARALLELISM (set while forking) is as it was here afterwards."""
    name, model, processor, data, max_length, good, bad = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough for the worker processes")
    from mixspec.programs import hf_train

    if hf_train.worker_start_method() != "fork":
        pytest.skip("this process cannot fork workers")
    setup = {"model": str(model), "model_type": "llava", "multimodal": True, "max_length": max_length,
             "mixspec_version": "test"}
    rows, _ = hf_train.scan_rows(str(data))
    encoder = hf_train.make_encoder(str(model), setup, quiet=True)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    encoder.tokenizer._tokenizer.encode_batch(["a b c"] * 64)  # tokenizers' threads used here first
    alone = hf_train.check_rows(rows, setup, workers=1, encoder=encoder, progress=False)
    capfd.readouterr()

    def no_load(*a, **k):
        raise AssertionError("a forked worker loaded the processor again")

    monkeypatch.setattr(hf_train, "make_encoder", no_load)  # the fork inherits this
    with hf_train.check_worker_pool(1, setup, encoder) as pool:
        theirs = pool.submit(hf_train._check_chunk, rows).result()
    assert theirs == alone
    assert "TOKENIZERS_PARALLELISM" not in os.environ
    err = capfd.readouterr().err
    assert "tokenizers" not in err and "fork" not in err, err


def test_several_files_are_checked_and_reported_each(family, tmp_path):
    name, model, processor, data, max_length, good, bad = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough")
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(row("Hi", "Hello.")) + "\n" + json.dumps(row("<image>Q", "A.", [str(data.parent / "a.png")]))
                     + "\n", encoding="utf-8")
    spec = write_spec(tmp_path / "spec.yaml", model, [clean, clean], max_length, eval_data=clean)
    code, out, err = run_cli("data", "check", spec, "--json", "--workers", "1", cache_dir=tmp_path / "cache")
    assert code == 0, err
    report = json.loads(out)
    assert [(f["split"], f["file"], f["rows"], f["accepted"]) for f in report["files"]] == [
        ("train", str(clean), 2, 2), ("train", str(clean), 2, 2), ("eval", str(clean), 2, 2)]
    assert report["refused"] == [] and report["rows"] == 6


def test_data_check_usage_and_setup_errors(family, tmp_path):
    name, model, processor, data, max_length, good, bad = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough")
    code, _, err = run_cli("data", "check", write_spec(tmp_path / "s.yaml", model, tmp_path / "nope.jsonl", 64))
    assert code == 1 and "nope.jsonl: no such file" in err and "Traceback" not in err
    (tmp_path / "folder.jsonl").mkdir()
    code, _, err = run_cli("data", "check", write_spec(tmp_path / "d.yaml", model, tmp_path / "folder.jsonl", 64))
    assert code == 1 and "folder.jsonl is a directory" in err and "Traceback" not in err
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("version: 1\nmodel: llava-hf/llava-1.5-7b-hf\ncomponents:\n  language: {train: full, lr: 1.0e-5}\n"
                       f"data: {{train: {data}}}\n", encoding="utf-8")
    code, _, err = run_cli("data", "check", catalog, cache_dir=tmp_path / "cache")
    assert code == 1 and re.search(r"catalog\.yaml:2:\d+: error: model: .*no processor/tokenizer files", err)
    assert "hf download llava-hf/llava-1.5-7b-hf --exclude" in err
    code, _, _ = run_cli("data", "check", catalog, "--workers", "0")
    assert code == 2


def _compile(spec: Path, out: Path) -> Path:
    code, _, err = run_cli("compile", spec, "--target", "hf", "-o", out)
    assert code == 0, err
    return out / "train.py"


def _train_py(train_py: Path, *args, cache_dir):
    env = dict(os.environ, MIXSPEC_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(train_py), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.slow  # four train.py processes (torch imports): ~50 s
def test_train_py_checks_every_row_before_the_model_loads(family, tmp_path):
    """train.py names every bad row and stops before loading weights; a missing --data file
    stops it too; --max-bad-rows N skips them (printing each) and goes on to the model."""
    name, model, processor, data, max_length, good, bad = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough")
    weightless = tmp_path / "processor_only"
    weightless.mkdir()
    for f in model.iterdir():
        if not f.name.endswith(".safetensors"):
            (weightless / f.name).write_bytes(f.read_bytes())
    train_py = _compile(write_spec(tmp_path / "spec.yaml", model, data, max_length), tmp_path / "out")
    cache = tmp_path / "cache"
    res = _train_py(train_py, "--model", weightless, "--data", tmp_path / "missing.jsonl", cache_dir=cache)
    assert res.returncode == 1 and re.search(r"error: data file .*missing\.jsonl: no such file", res.stderr)
    assert "hint:" in res.stderr and "cannot load" not in res.stderr and "Traceback" not in res.stderr
    res = _train_py(train_py, "--model", weightless, "--data-workers", "1", cache_dir=cache)
    assert res.returncode == 1, res.stderr
    named = {int(m) for m in re.findall(rf"^{re.escape(str(data))}:(\d+): ", res.stderr, re.M)}
    assert named == set(bad) and "stopped before loading the model" in res.stderr
    assert "cannot load" not in res.stderr and "Traceback" not in res.stderr
    res = _train_py(train_py, "--model", weightless, "--max-bad-rows", len(bad), cache_dir=cache)
    assert "(cached result" in res.stdout, res.stdout + res.stderr
    assert {int(m) for m in re.findall(rf"^skipped {re.escape(str(data))}:(\d+): ", res.stdout, re.M)} == set(bad)
    assert f"skipped {len(bad)} of {len(bad) + len(good)} rows" in res.stdout
    assert "cannot load" in res.stderr  # it went on to the model: this directory has no weights
    res = _train_py(train_py, "--model", weightless, "--max-bad-rows", len(bad) - 1, cache_dir=cache)
    assert res.returncode == 1 and "stopped before loading the model" in res.stderr


def test_pixel_limits_reach_an_image_processor_that_has_them(tmp_path):
    """data.max_pixels / min_pixels: an image processor whose class takes them (Qwen2-VL's) is
    reloaded with them, and then sizes images as that class built with them does (the oracle);
    one that has no such limit (CLIP's fixed size) is left as it is."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Qwen

    from mixspec.programs import hf_train

    shape = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    Qwen(min_pixels=56 * 56, max_pixels=112 * 112, **shape).save_pretrained(tmp_path / "qwen")
    processor = SimpleNamespace(image_processor=Qwen.from_pretrained(tmp_path / "qwen"))
    image = Image.new("RGB", (640, 480), (10, 200, 30))
    before = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    limits = {"max_pixels": 224 * 224, "min_pixels": 28 * 28}
    assert hf_train.apply_pixel_limits(processor, str(tmp_path / "qwen"), limits) == ["max_pixels", "min_pixels"]
    got = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    want = Qwen(**limits, **shape)(images=[image], return_tensors="pt")["image_grid_thw"]
    assert got.tolist() == want.tolist() != before.tolist()
    CLIPImageProcessorPil().save_pretrained(tmp_path / "clip")
    clip = SimpleNamespace(image_processor=CLIPImageProcessorPil.from_pretrained(tmp_path / "clip"))
    assert hf_train.apply_pixel_limits(clip, str(tmp_path / "clip"), limits) == []


def test_compiled_train_py_carries_the_data_settings(tmp_path):
    from mixspec.api import load_spec, plan_spec, render

    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nmodel: Qwen/Qwen2.5-VL-7B-Instruct\ncomponents:\n  aligner: {train: full, lr: 1.0e-5}\n"
                    "data: {train: [a.jsonl, b.jsonl], max_pixels: 200704, min_pixels: 3136}\n", encoding="utf-8")
    text = render(plan_spec(load_spec(spec)), "hf")["train.py"]
    namespace = {}
    exec(compile(text.split("# --- mixspec: plan (generated) ---")[1].split("# --- end mixspec: plan ---")[0],
                 "plan", "exec"), namespace)
    assert namespace["DATA"]["train"] == ["a.jsonl", "b.jsonl"]
    assert (namespace["DATA"]["max_pixels"], namespace["DATA"]["min_pixels"]) == (200704, 3136)


def test_reading_files_locates_what_is_no_row(tmp_path):
    """Without a model: a hub id is no missing file; a .json list's bad item is refused by index;
    blank lines keep the file's own line numbers."""
    from mixspec.programs import hf_train

    assert hf_train.missing_data_file("HuggingFaceM4/ChartQA") is None
    assert "no such file" in str(hf_train.missing_data_file(str(tmp_path / "gone.jsonl")))
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([row("a", "b"), 3, row("c", "d")]), encoding="utf-8")
    rows, refused = hf_train.scan_rows(str(array))
    assert [r["_index"] for r in rows] == [0, 2]
    assert [(r["index"], hf_train.refusal_where(r)) for r in refused] == [(1, f"{array}[1]")]
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n\n" + json.dumps(row("a", "b")) + "\n[1]\n", encoding="utf-8")
    rows, refused = hf_train.scan_rows(str(lines))
    assert [r["_line"] for r in rows] == [3] and [(r["line"], r["reason"][:14]) for r in refused] == [(4, "a row must be ")]


def test_plan_and_fit_give_the_peak_at_the_datas_longest_micro_batch(family, tmp_path):
    """After `data check`, plan and fit estimate at the longest row the family's processor makes
    (image tokens expanded), naming it; a changed data file makes the check stale (not used)."""
    name, model, processor, data, max_length, good, bad = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough")
    from mixspec.api import load_spec, plan_spec
    from mixspec.planning.estimate import estimate

    clean = tmp_path / "clean.jsonl"
    rows = [row("Hi", "Hello."), row("<image>What is it?", "A square.", [str(data.parent / "a.png")])]
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    longest = max(oracle_length(processor, r, clean.parent) for r in rows)
    limit = longest + 500  # the worst case max_length is well above the data's longest row
    spec = write_spec(tmp_path / "spec.yaml", model, clean, limit)
    cache = tmp_path / "cache"
    code, out, _ = run_cli("plan", spec, "--json", cache_dir=cache)
    assert code == 0 and "estimate_at_data" not in json.loads(out)  # no check yet
    assert run_cli("data", "check", spec, "--workers", "1", cache_dir=cache)[0] == 0
    code, out, _ = run_cli("plan", spec, "--json", cache_dir=cache)
    at = json.loads(out)["estimate_at_data"]
    assert at["longest"] == longest and at["overrides"]["max_length"] == longest
    assert at["rows"] == [f"{clean}:2"] and at["rows_checked"] == 2
    plan = plan_spec(load_spec(spec))
    want = estimate(plan, {"max_length": longest, "images_per_sample": 1, "max_pixels": 56 * 56})  # a.png
    assert at["estimate"]["per_gpu_bytes"]["peak"] == round(want.peak_bytes) < round(estimate(plan).peak_bytes)
    code, out, _ = run_cli("plan", spec, cache_dir=cache)
    assert f"longest {longest:,} tokens: {clean}:2" in out
    code, out, _ = run_cli("fit", spec, "--gpu-memory", "80GiB", cache_dir=cache)
    assert code == 0 and "at the data's longest micro-batch" in out
    # the data changed since the check: plan says nothing of it
    clean.write_text(clean.read_text() + json.dumps(row("Bye", "Bye.")) + "\n", encoding="utf-8")
    code, out, _ = run_cli("plan", spec, "--json", cache_dir=cache)
    assert "estimate_at_data" not in json.loads(out)


def test_the_spec_index_lives_in_train_pys_cache_dir(tmp_path, monkeypatch):
    """datacheck finds the cache without importing the program; both say the same folder."""
    from mixspec.data.datacheck import _index_path
    from mixspec.programs.hf_train import data_check_cache_dir

    for env in ({"MIXSPEC_CACHE_DIR": str(tmp_path / "a")}, {"XDG_CACHE_HOME": str(tmp_path / "b")}, {}):
        for key in ("MIXSPEC_CACHE_DIR", "XDG_CACHE_HOME"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert _index_path(tmp_path / "s.yaml").parent.parent == Path(data_check_cache_dir())


def test_assistant_tokens_located_without_reprocessing_match_reprocessing(family):
    """The shortcut (the tokenizer on the processor's expanded text cut where a turn starts) gives
    every row's labels exactly as processing the conversation up to the turn again does, and
    the same refusals; and it is really taken."""
    name, model, processor, data, max_length, good, bad = family
    import torch
    import transformers

    from mixspec.programs import hf_train

    setup = {"model": str(model), "model_type": transformers.AutoConfig.from_pretrained(model).model_type,
             "multimodal": True, "max_length": max_length, "mixspec_version": "test"}
    rows, _ = hf_train.scan_rows(str(data))
    rows = rows * 2  # the second time round every row's shape has been checked once
    fast = hf_train.make_encoder(str(model), setup, quiet=True)
    slow = hf_train.make_encoder(str(model), setup, quiet=True)
    slow.fast_prefix = False

    def labels(encoder, r):
        try:
            return encoder.encode_row(r)["labels"]
        except hf_train.DataError as exc:
            return str(exc)

    for r in rows:
        a, b = labels(fast, r), labels(slow, r)
        assert type(a) is type(b) and (a == b if isinstance(a, str) else torch.equal(a, b)), r.get("_where")
    assert fast.fast_prefix and fast.fast_checked

    # two turns, an image in the second question: the first turn's cut has an image after it,
    # so there the shortcut must not be taken (the processor runs on the prefix); the rest may
    taken = []
    shortcut = fast.fast_prefix_length
    fast.fast_prefix_length = lambda text, ids: taken.append((text, shortcut(text, ids))) or taken[-1][1]
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A red square."}]
    multi = {"messages": turns, "images": ["a.png"], "_base": str(data.parent), "_where": "multi"}
    a, b = labels(fast, multi), labels(slow, multi)
    assert torch.is_tensor(a) and torch.equal(a, b) and int((a != -100).sum()) > 0
    marker = fast.image_markers()[0]
    full = fast.render(hf_train.conversation(multi, True)[0])
    assert [got is None for text, got in taken] == [marker in full[len(text):] for text, _ in taken]
    assert any(got is None for _, got in taken) and any(got is not None for _, got in taken)


def _conversations():
    """Conversations in train.py's form (conversation()): a system turn, two turns, images."""
    from mixspec.programs import hf_train

    rows = [row("<image>What is it?", "A red square.", ["a.png"]), row("Hi", "Hello there."),
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>Why?"},
                          {"role": "assistant", "content": "Because."}, {"role": "user", "content": "And?"},
                          {"role": "assistant", "content": "That is all."}], "images": ["a.png"]}]
    return [hf_train.conversation(r, True)[0] for r in rows]


def test_render_through_the_recorded_call_equals_the_template_owners_render(family):
    """After its first call, render() calls transformers' render_jinja_template directly with the
    arguments the processor's apply_chat_template gave it: every later render equals the
    processor's own apply_chat_template(tokenize=False), with and without the generation prompt."""
    name, model, processor, *_ = family
    import transformers

    from mixspec.programs import hf_train

    setup = {"model": str(model), "model_type": transformers.AutoConfig.from_pretrained(model).model_type,
             "multimodal": True, "max_length": 4096, "mixspec_version": "test"}
    encoder = hf_train.make_encoder(str(model), setup, quiet=True)
    for messages in _conversations():
        for cut in range(1, len(messages) + 1):
            for prompt in (False, True):
                want = processor.apply_chat_template(messages[:cut], tokenize=False, add_generation_prompt=prompt)
                assert encoder.render(messages[:cut], add_generation_prompt=prompt) == want
    assert callable(encoder.renderers[False]) and callable(encoder.renderers[True])


def test_render_falls_back_to_the_owner_when_its_call_cannot_be_recorded(family):
    """An owner whose module calls no render_jinja_template, or a conversation the owner changes
    on the way (a key set to None is dropped): no recorded call, the owner renders every time."""
    name, model, processor, *_ = family
    from mixspec.programs import hf_train

    class Owner:  # this test module has no render_jinja_template
        chat_template = processor.chat_template

        def apply_chat_template(self, messages, **kwargs):
            return processor.apply_chat_template(messages, **kwargs)

    messages = _conversations()[2]
    text, renderer = hf_train._recorded_render(Owner(), messages, False)
    assert renderer is False and text == processor.apply_chat_template(messages, tokenize=False)
    with_none = [dict(messages[0], name=None)] + messages[1:]
    text, renderer = hf_train._recorded_render(processor, with_none, False)
    assert renderer is False and text == processor.apply_chat_template(messages, tokenize=False)
    text, renderer = hf_train._recorded_render(processor, messages, False)
    assert callable(renderer) and renderer(messages[:2]) == processor.apply_chat_template(messages[:2], tokenize=False)


def test_prefix_ids_from_the_tokenizers_library_equal_the_tokenizer_call(family):
    """The fast prefix path's ids straight from the `tokenizers` library equal the tokenizer's own
    call with the processor's arguments, on every prefix of an expanded conversation; anything
    but that plain call (truncation asked or left set, a class that encodes its own way) is not
    taken that way."""
    name, model, processor, *_ = family
    from mixspec.programs import hf_train

    tokenizer = processor.tokenizer
    text = processor.apply_chat_template(_conversations()[2], tokenize=False)
    text = text.replace(processor.image_token, processor.image_token * 5)
    tokenizer(text)  # as the recorded call: no padding or truncation left set by an earlier padded call
    for add in (True, False):
        plain = hf_train._plain_backend(tokenizer, ([text],), {"padding_side": "right", "add_special_tokens": add})
        assert plain is not None
        for end in range(0, len(text) + 1, 7):
            assert plain(text[:end]) == tokenizer(text[:end], add_special_tokens=add)["input_ids"]
    assert hf_train._plain_backend(tokenizer, ([text],), {"truncation": True, "max_length": 8}) is None
    tokenizer._tokenizer.enable_truncation(8)
    tokenizer._tokenizer.enable_padding(length=64)
    try:
        assert hf_train._plain_backend(tokenizer, ([text],), {}) is None
        tokenizer._tokenizer.no_truncation()
        assert hf_train._plain_backend(tokenizer, ([text],), {}) is None  # padding left set
    finally:
        tokenizer._tokenizer.no_truncation()
        tokenizer._tokenizer.no_padding()
    assert hf_train._plain_backend(tokenizer, ([text],), {}) is not None

    class OwnEncoding(type(tokenizer)):
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    assert hf_train._plain_class(type(tokenizer)) and not hf_train._plain_class(OwnEncoding)


def test_train_pys_module_imports_no_trainer_until_a_run_trains():
    """A data-check worker imports train.py's module: transformers' Trainer stays unimported
    (seconds a worker) until plan_trainer_class(), which makes a Trainer with a TrainerCallback."""
    code = ("import sys; import mixspec.programs.hf_train as h; "
            "assert 'transformers.trainer' not in sys.modules, 'Trainer imported'; "
            "from transformers import Trainer, TrainerCallback; c = h.plan_trainer_class(); "
            "assert issubclass(c, Trainer) and issubclass(c.callback_class, TrainerCallback); "
            "assert c is h.plan_trainer_class() and c.__name__ == 'PlanTrainer'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_this_process_and_the_workers_share_the_rows(family, monkeypatch):
    """workers=2: this process checks the first rows alone (PROBE_S), then, the rest taking it
    longer than a worker's start, one spawned worker takes chunks from the front while this
    process takes them from the back; together every row once, in order, each result equal to
    the one-process check's. This process is slowed so the worker surely gets rows; unslowed,
    a small file is checked here alone, no worker started or waited for."""
    name, model, processor, data, max_length, good, bad = family
    if name != FAMILIES[0]:
        pytest.skip("one family is enough for the worker processes")
    import time

    from mixspec.programs import hf_train

    setup = {"model": str(model), "model_type": "llava", "multimodal": True, "max_length": max_length,
             "mixspec_version": "test"}
    rows, _ = hf_train.scan_rows(str(data))
    encoder = hf_train.make_encoder(str(model), setup, quiet=True)
    alone = hf_train.check_rows(rows, setup, workers=1, encoder=encoder, progress=False)
    here, check_row = [], hf_train.check_row

    def slow_check_row(enc, row):  # this process only: the spawned worker imports the module afresh
        here.append(row["_line"])
        time.sleep(0.25)
        return check_row(enc, row)

    class Bar:  # the progress bar's counts
        counts = []

        def __init__(self, total):
            self.total = total

        def advance(self, n, final=False):
            self.counts.append(n)

    monkeypatch.setattr(hf_train, "check_row", slow_check_row)
    monkeypatch.setattr(hf_train, "Progress", Bar)
    shared = hf_train.check_rows(rows, setup, workers=2, encoder=encoder, progress=True)
    assert shared == alone
    assert sum(Bar.counts) == len(rows) and min(Bar.counts) >= 0  # every row counted once on the bar
    lines = [r["_line"] for r in rows]
    theirs = [line for line in lines if line not in here]
    assert theirs and len(here) > 2, here
    middle = lines.index(theirs[0])  # this process: the first rows, then from the back
    assert theirs == lines[middle:middle + len(theirs)] and sorted(here) == lines[:middle] + lines[middle + len(theirs):]

    monkeypatch.setattr(hf_train, "check_row", check_row)
    started = []
    monkeypatch.setattr(hf_train, "_share_with_workers", lambda *a: started.append(a))
    assert hf_train.check_rows(rows, setup, workers=2, encoder=encoder, progress=False) == alone and not started


def test_a_conversation_the_chat_template_refuses_is_a_located_refusal(family, tmp_path):
    """A template's own raise_exception (as Llama 2's and Mistral's for a system turn or roles that
    do not alternate) refuses that row with its file:line and the template's words; the other
    rows are checked as before."""
    name, model, processor, data, max_length, good, bad = family
    import jinja2
    import transformers

    from mixspec.programs import hf_train

    setup = {"model": str(model), "model_type": transformers.AutoConfig.from_pretrained(model).model_type,
             "multimodal": True, "max_length": 4096, "mixspec_version": "test"}
    encoder = hf_train.make_encoder(str(model), setup, quiet=True)
    refusing = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
                + encoder.template_owner.chat_template)
    encoder.template_owner.chat_template = refusing
    lines = [row("Hi", "Hello."), {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
                                               {"role": "assistant", "content": "Because."}]}, row("Bye", "Bye.")]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    rows, _ = hf_train.scan_rows(str(path))
    results = hf_train.check_rows(rows, setup, workers=1, encoder=encoder, progress=False)
    assert [why is None for _, why in results] == [True, False, True]
    assert results[1][1] == "the chat template refuses this conversation: TemplateError: System role not supported"
    with pytest.raises(jinja2.TemplateError):  # the oracle: the processor's own template refuses it
        processor.apply_chat_template(hf_train.conversation(rows[1], True)[0], tokenize=False, chat_template=refusing)
    report = hf_train.data_report([("train", str(path), rows, [], results)], 4096)
    assert [(r["line"], r["reason"]) for r in report["refused"]] == [(2, results[1][1])]


def test_a_byte_order_mark_is_a_located_refusal(tmp_path):
    """A file saved with a UTF-8 BOM: its first line (a .jsonl) or the file (a .json array) is
    refused once, saying how to drop the mark; Python's own JSON reader refuses it too."""
    from mixspec.programs import hf_train

    good = json.dumps(row("Hi", "Hello."))
    (tmp_path / "rows.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + good.encode() + b"\n")
    (tmp_path / "rows.json").write_bytes(b"\xef\xbb\xbf[\n " + good.encode() + b",\n " + good.encode() + b"\n]\n")
    with pytest.raises(json.JSONDecodeError, match="BOM"):
        json.loads((tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()[0])
    rows, refused = hf_train.scan_rows(str(tmp_path / "rows.jsonl"))
    assert len(rows) == 1 and [(r["line"], r["reason"]) for r in refused] == [(1, hf_train._BOM)]
    assert "byte order mark" in hf_train._BOM and "sed -i" in hf_train._BOM
    rows, refused = hf_train.scan_rows(str(tmp_path / "rows.json"))
    assert rows == [] and [(r["line"], r["reason"]) for r in refused] == [(1, hf_train._BOM)]


def test_turns_past_max_length_are_not_located_and_the_cut_labels_are_unchanged(family):
    """A conversation of many turns: turns that start past max_length keep no label, so they are
    not located (rendering the conversation up to each of thousands of turns would take minutes
    a row); the labels training keeps equal those of locating every turn, and the turns left
    out are exactly the assistant turns that start past the cut."""
    name, model, processor, *_ = family
    import time

    import torch
    import transformers

    from mixspec.programs import hf_train

    setup = {"model": str(model), "model_type": transformers.AutoConfig.from_pretrained(model).model_type,
             "multimodal": True, "max_length": 10**9, "mixspec_version": "test"}
    turns = []
    for i in range(60):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    many = {"messages": turns, "_base": ".", "_where": "many"}
    everything = hf_train.make_encoder(str(model), setup, quiet=True).encode_row(many)
    assert everything["answer_turns_past"] == 0
    labels = everything["labels"]
    starts = [j for j in range(labels.shape[0]) if labels[j] != -100 and (j == 0 or labels[j - 1] == -100)]
    assert len(starts) == 60
    max_length = starts[10] + 3  # inside the eleventh answer
    cut = hf_train.make_encoder(str(model), dict(setup, max_length=max_length), quiet=True).encode_row(many)
    assert torch.equal(cut["labels"], labels[:max_length])
    assert cut["answer_turns_past"] == sum(s >= max_length for s in starts) == 49
    assert cut["kept_answer_tokens"] == int((labels[:max_length] != -100).sum())
    stats, why = hf_train.check_row(hf_train.make_encoder(str(model), dict(setup, max_length=max_length), quiet=True), many)
    report = hf_train.data_report([("train", "f.jsonl", [dict(many, _line=1)], [], [(stats, why)])], max_length)
    assert report["truncation"]["answers_cut"] == 1 and report["truncation"]["answer_turns_past"] == 49
    assert report["truncation"]["answer_tokens_lost"] == int((labels != -100).sum()) - cut["kept_answer_tokens"] - sum(
        int((labels[a:b] != -100).sum()) for a, b in zip(starts[11:], starts[12:] + [labels.shape[0]], strict=True))

    # thousands of turns: bounded by max_length, not by the turns
    huge = {"messages": turns * 50, "_base": ".", "_where": "huge"}
    start = time.perf_counter()
    item = hf_train.make_encoder(str(model), dict(setup, max_length=max_length), quiet=True).encode_row(huge)
    assert time.perf_counter() - start < 30 and item["answer_turns_past"] > 2900


@pytest.mark.slow
def test_the_speed_benchmark_runs_and_checks_every_row():
    """benchmarks/data_check_speed.py end to end on a few rows: every row accepted by each worker
    count, a worker's start measured, each ratio a measured positive number."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_check_speed.py"), "--rows", "90",
                           "--workers", "1", "2", "--cpu-rows", "30", "--repeat", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()  # libraries may log to stdout first (DeepSpeed's accelerator line)
    out = json.loads("\n".join(lines[lines.index("{"):]))
    assert [c["workers"] for c in out["check"]] == [1, 2] and all(c["accepted"] == 90 for c in out["check"])
    assert out["worker_start_cpu_s"] > 0 and out["cpu_time"]["ratio_to_floor"] > 0
    assert all(c["ratio_to_floor_per_worker"] > 0 and c["cpu_ratio_to_floor"] > 0 for c in out["check"])
