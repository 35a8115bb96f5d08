"""`mixspec data check SPEC`: every row of data.train and data.eval through the code train.py runs.

The check is train.py's own (mixspec/programs/hf_train.py: ``check_data``, which reads each
file, runs every row through ``ConversationEncoder.encode_row`` in worker processes and
summarises); this module only finds the processor's files for the spec's model, calls it
and presents the report. So a row this command accepts is a row training takes, and the
cached result is the one train.py finds before its step 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import Location, MixspecError, Problem, SpecError

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
    from ..models.sources import _hf_cache_dirs, _hf_snapshot

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
    from ..programs.hf_train import data_files

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
    from .. import __version__
    from ..language.loader import load_spec
    from ..planning.resolve import plan_spec
    from ..programs import hf_train

    loaded = load_spec(spec_path)
    plan = plan_spec(loaded)
    files = data_paths(loaded, plan)
    setup = {"model": processor_dir(loaded, plan, model), "model_type": plan.model_type,
             "multimodal": plan.multimodal, "max_length": plan.training.max_length,
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
    record_check(loaded.path, files, report)
    return report


# -- the data's real lengths for plan and fit ---------------------------------------------------
def _index_path(spec_path) -> Path:
    """Where `data check` records which cached report belongs to a spec (by its absolute path)."""
    import hashlib

    # hf_train.data_check_cache_dir's rule, here without importing the program (and torch):
    # `plan` stays fast when no check ran (tests/data/test_data_check.py holds the two equal)
    base = os.environ.get("MIXSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mixspec")
    digest = hashlib.sha256(str(Path(spec_path).resolve()).encode()).hexdigest()[:32]
    return Path(base) / "data-check" / "by-spec" / f"{digest}.json"


def _file_stats(files: list[tuple[str, str]]) -> list | None:
    try:
        return [[split, str(Path(path).resolve()), os.stat(path).st_size, os.stat(path).st_mtime_ns]
                for split, path in files]
    except OSError:
        return None


def record_check(spec_path, files: list[tuple[str, str]], report: dict) -> None:
    """After a check: note its report (by key) for the spec and the data files as they are now,
    so `plan` and `fit` find it with a stat of each file. Written whole or not at all."""
    stats = _file_stats(files)
    if stats is None or not report.get("key"):
        return
    index = _index_path(spec_path)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": stats, "key": report["key"], "max_length": report["max_length"]}))
        os.replace(tmp, index)
    except OSError:  # a read-only cache: plan falls back to max_length, as without a check
        pass


def cached_report(loaded, plan) -> dict | None:
    """The report of the last `mixspec data check` of this spec, if the data files are
    unchanged since (size and mtime) and max_length is the same; else None. Never raises."""
    if plan.data is None:
        return None
    try:
        index = json.loads(_index_path(loaded.path).read_text())
        files = data_paths(loaded, plan)
    except (OSError, ValueError, MixspecError):
        return None
    if index.get("files") != _file_stats(files) or index.get("max_length") != plan.training.max_length:
        return None
    from ..programs.hf_train import load_cached_check

    return load_cached_check(index.get("key"))


def data_peak(report: dict, plan) -> dict | None:
    """The longest micro-batch the data can form, as estimate() overrides: train.py's collator
    pads a micro-batch to its longest row (truncated to max_length), so at worst every row of
    a micro-batch is as long as the longest accepted row; images per row at their most, each
    at the largest image's pixels (the processor keeps them within min/max_pixels). With the
    rows that set it."""
    longest = []
    for entry in report.get("files", []):
        longest += [(tokens, entry["file"], where) for where, tokens in entry.get("lengths", [])]
    if not longest:
        return None
    longest.sort(key=lambda t: -t[0])
    tokens = min(longest[0][0], plan.training.max_length)
    out = {"max_length": tokens}
    images = report.get("images") or {}
    per_row = [int(k) for k in images.get("images_per_row", {})]
    if per_row and plan.data is not None and "vision" in plan.roles:
        out["images_per_sample"] = max(per_row)
        largest = images.get("largest")
        if largest:
            pixels = min(largest[0] * largest[1], plan.data.max_pixels)
            out["max_pixels"] = max(pixels, plan.data.min_pixels or 0)
    rows = [f"{file}:{where}" for length, file, where in longest if length >= longest[0][0]][:3]
    return {"overrides": out, "rows": rows, "longest": longest[0][0], "rows_checked": len(longest)}


def data_estimate(loaded, plan, target: str | None = None, overrides: dict | None = None) -> dict | None:
    """The peak at the data's longest micro-batch (a cached `data check` of this spec), for
    the spec's settings or ``overrides`` (fit's option): {"estimate", "longest", "rows",
    "rows_checked", "overrides"}; None without a matching check."""
    report = cached_report(loaded, plan)
    peak = data_peak(report, plan) if report else None
    if peak is None:
        return None
    from ..planning.estimate import estimate

    return dict(peak, estimate=estimate(plan, {**(overrides or {}), **peak["overrides"]}, target))


def data_estimate_text(info: dict, worst) -> str:
    """One line: the peak at the data's longest micro-batch beside the max_length worst case."""
    from ..planning.estimate import GIB

    est = info["estimate"]
    rows = ", ".join(info["rows"])
    return (f"at the data's longest micro-batch (mixspec data check, {info['rows_checked']:,} rows; longest "
            f"{info['longest']:,} tokens: {rows}): peak {est.peak_bytes / GIB:.2f} GiB "
            f"({(worst.peak_bytes - est.peak_bytes) / GIB:.2f} GiB below the max_length worst case)")


def render_text(report: dict, limit: int = TEXT_LIMIT) -> list[str]:
    """The report for a reader: totals, refusals (the first ``limit``, grouped by reason),
    lengths with a histogram, truncation, images."""
    lines = [f"rows: {report['rows']:,}   accepted: {report['accepted']:,}   refused: {len(report['refused']):,}"
             + ("   (cached)" if report.get("cached") else "")]
    for f in report["files"]:
        lines.append(f"  {f['split']:<5} {f['file']}: {f['rows']:,} rows, {f['accepted']:,} accepted, "
                     f"{f['refused']:,} refused, {f['over_max_length']:,} over max_length")
    if report["refused"]:
        from ..programs.hf_train import refusal_where

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
                 f"({cut['answer_tokens_lost']:,} answer tokens lost"
                 + (f"; {cut['answer_turns_past']:,} more answer turns wholly past it)" if cut.get("answer_turns_past")
                    else ")"))
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
