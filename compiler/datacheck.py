"""`mixspec data check SPEC`: every row of data.train and data.eval through the code train.py runs.

The check is train.py's own (mixspec/programs/hf_train.py: ``check_data``, which reads each
file, runs every row through ``ConversationEncoder.encode_row`` in worker processes and
summarises); this module only finds the processor's files for the spec's model, calls it
and presents the report. So a row this command accepts is a row training takes, and the
cached result is the one train.py finds before its step 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import Location, MixspecError, Problem, SpecError

#: files that make a directory a processor/tokenizer source (any one of them)
PROCESSOR_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "processor_config.json",
                   "preprocessor_config.json")
TEXT_LIMIT = 20  # refusals listed in the text report (--json has all)


class DataCheckError(MixspecError):
    """The check cannot start (no processor files, no data section): exit 1."""


def _has_processor_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def processor_dir(loaded, plan, override: str | None = None) -> str:
    """The directory holding the model's processor/tokenizer files: --model DIR, the spec's
    local model directory or cache snapshot, or, for a catalog id, its Hugging Face cache
    snapshot. Never weights, never the network."""
    if override is not None:
        folder = Path(override).expanduser()
        if not folder.is_dir() or not _has_processor_files(folder):
            raise DataCheckError(f"error: --model {override}: not a directory with processor/tokenizer files "
                                 f"({', '.join(PROCESSOR_FILES[:2])}, ...)")
        return str(folder.resolve())
    where = loaded.value_loc("model")
    if plan.model_source != "catalog":
        if _has_processor_files(Path(plan.model_path)):
            return plan.model_path
        raise _no_processor(where, plan.model, f"{plan.model_path} holds no processor/tokenizer files")
    from .sources import _hf_cache_dirs, _hf_snapshot

    for cache in _hf_cache_dirs():
        snap = _hf_snapshot(cache, plan.model)
        if snap is not None and _has_processor_files(snap):
            return str(snap)
    raise _no_processor(where, plan.model, "mixspec's catalog has its config only, and the Hugging Face cache "
                                           "has no processor/tokenizer files for it")


def _no_processor(where: Location, model: str, why: str) -> SpecError:
    return SpecError([Problem(
        where, "model", f"{model!r}: no processor/tokenizer files to read the data with ({why})",
        hint=f"fetch them without weights: hf download {model} --exclude '*.safetensors' '*.bin' "
             "(they land in the Hugging Face cache), or pass --model DIR with a local copy")])


def data_paths(loaded, plan) -> list[tuple[str, str]]:
    """[(split, path)] of data.train and data.eval. A relative path is taken from the current
    directory, as train.py takes it, else from the spec's directory."""
    if plan.data is None:
        raise SpecError([Problem(Location(loaded.path), "data", "the spec has no data section to check",
                                 hint="add data: {train: FILE.jsonl}")])
    from .programs.hf_train import data_files

    spec_dir = Path(loaded.path).resolve().parent
    out = []
    for split in ("train", "eval"):
        for path in data_files(getattr(plan.data, split)):
            if not os.path.isabs(path) and not os.path.exists(path) and (spec_dir / path).exists():
                path = str(spec_dir / path)
            out.append((split, path))
    return out


def run_check(spec_path: Path, workers: int | None = None, model: str | None = None, cache: bool = True) -> dict:
    """The report of ``check_data`` for a spec (the JSON of ``data check --json``)."""
    from mixspec.targets.hf import is_multimodal

    from . import __version__
    from .api import load_spec, plan_spec
    from .programs import hf_train

    loaded = load_spec(spec_path)
    plan = plan_spec(loaded)
    files = data_paths(loaded, plan)
    setup = {"model": processor_dir(loaded, plan, model), "model_type": plan.model_type,
             "multimodal": is_multimodal(plan), "max_length": plan.training.max_length,
             "pixel_limits": {k: getattr(plan.data, k) for k in ("max_pixels", "min_pixels") if getattr(plan.data, k)}}
    setup["mixspec_version"] = __version__
    for _, path in files:
        missing = hf_train.missing_data_file(path)
        if missing is not None:
            raise DataCheckError(str(missing))
    try:
        report, _ = hf_train.check_data(files, setup, workers=workers, cache=cache)
    except hf_train.DataError as exc:
        raise DataCheckError(str(exc) if str(exc).startswith("error") else f"error: {exc}") from None
    return report


def render_text(report: dict, limit: int = TEXT_LIMIT) -> list[str]:
    """The report for a reader: totals, refusals (the first ``limit``, grouped by reason),
    lengths with a histogram, truncation, images."""
    lines = [f"rows: {report['rows']:,}   accepted: {report['accepted']:,}   refused: {len(report['refused']):,}"
             + ("   (cached)" if report.get("cached") else "")]
    for f in report["files"]:
        lines.append(f"  {f['split']:<5} {f['file']}: {f['rows']:,} rows, {f['accepted']:,} accepted, "
                     f"{f['refused']:,} refused, {f['over_max_length']:,} over max_length")
    if report["refused"]:
        from .programs.hf_train import refusal_where

        lines.append("refused:")
        lines += [f"  {refusal_where(r)}: {r['reason']}" for r in report["refused"][:limit]]
        if len(report["refused"]) > limit:
            lines.append(f"  ... and {len(report['refused']) - limit:,} more (--json lists every one)")
        lines.append("refused, by reason:")
        lines += [f"  {g['count']:>7,}  {g['reason']}" for g in report["reasons"]]
    lines += _length_lines(report)
    lines += _image_lines(report["images"])
    return lines


def _length_lines(report: dict) -> list[str]:
    t = report["tokens"]
    if t["max"] is None:
        return ["tokens: no accepted row"]
    lines = [f"tokens per row (image tokens expanded): min {t['min']:,}  p50 {t['p50']:,}  p95 {t['p95']:,}  "
             f"p99 {t['p99']:,}  max {t['max']:,}"]
    top = max(b["rows"] for b in report["histogram"])
    for b in report["histogram"]:
        bar = "#" * (round(40 * b["rows"] / top) if b["rows"] else 0)
        lines.append(f"  {b['from']:>7,}-{b['to']:<7,} {b['rows']:>7,} {bar}")
    cut = report["truncation"]
    lines.append(f"over max_length {report['max_length']:,}: {report['over_max_length']:,} rows, cut at the end: "
                 f"{cut['tokens_lost']:,} tokens lost, {cut['answers_cut']:,} answers cut "
                 f"({cut['answer_tokens_lost']:,} answer tokens lost)")
    return lines


def _image_lines(images: dict) -> list[str]:
    if not images["images"]:
        return ["images: none"]
    per_row = ", ".join(f"{n} image(s): {count:,}" for n, count in sorted(images["images_per_row"].items(),
                                                                           key=lambda kv: int(kv[0])))
    tok = images["tokens_per_image"]
    px = images["pixels"]
    return [f"images: {images['images']:,} in {images['rows_with_images']:,} rows ({per_row})",
            f"  sizes: smallest {images['smallest'][0]}x{images['smallest'][1]}, largest "
            f"{images['largest'][0]}x{images['largest'][1]}; pixels p50 {px['p50']:,}, max {px['max']:,}",
            f"  tokens per image: min {tok['min']:,}  p50 {tok['p50']:,}  max {tok['max']:,}"]
