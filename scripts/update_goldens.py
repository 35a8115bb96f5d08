#!/usr/bin/env python3
"""Regenerate (or check) the golden files of the hf and deepspeed targets.

Cases: every spec in examples/ and in tests/targets/specs/hf/, compiled for each target
into tests/targets/<target>/<spec stem>/ (the files the target writes, or refusal.txt
holding the refusal). A generated program (train.py, launch.sh, sbatch.sh; swift's train.sh
and mixspec_plugin.py through tests/targets/test_target_swift.py) is kept as NAME.data: the blocks the
target generated (header, Plan, ...), not the program, which is mixspec/programs/ itself
(tests/targets/test_programs.py proves program + blocks == the generated file, byte for byte).
Golden files are reviewed like code: run this after a change that alters output, read the
diff, commit it with the change. A golden file holds a placeholder where a generated file
records the installed transformers/torch/PEFT versions (the generated file keeps the real
ones): a new release of a library changes no golden file by its version alone. Whatever else
a release changes is shown as drift, with the packages whose installed version differs from
tests/constraints.txt named (``version_drift``): read the diff before moving a pin or
updating a golden.

    python scripts/update_goldens.py            rewrite the golden files
    python scripts/update_goldens.py --check    exit 1 and list the drift, write nothing

tests/targets/test_target_hf.py fails on drift with the same comparison.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("hf", "deepspeed")
SPEC_DIRS = (ROOT / "examples", ROOT / "tests" / "targets" / "specs" / "hf")
SUFFIXES = (".yaml", ".yml", ".json")
REFUSAL = "refusal.txt"
DATA_SUFFIX = ".data"  # a generated program's golden form: its generated blocks
CONSTRAINTS = ROOT / "tests" / "constraints.txt"

#: where a generated file records a library's version: train.py's PLAN
#: ('transformers_version': '5.25.0'), the swift plugin's PLAN_VERSIONS ('torch': '2.13.0+cpu')
_RECORDED_VERSION = re.compile(r"""(['"](?:transformers|torch|peft)(?:_version)?['"]\s*:\s*)(['"])[^'"\n]*\2""")
VERSION_PLACEHOLDER = "<installed>"


def normalise_versions(text: str) -> str:
    """``text`` with every recorded library version replaced by a placeholder (mixspec's own
    version is kept: it changes only with a commit of this repository)."""
    return _RECORDED_VERSION.sub(lambda m: m.group(1) + m.group(2) + VERSION_PLACEHOLDER + m.group(2), text)


def _pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_drift(path: Path = CONSTRAINTS) -> list[str]:
    """``name installed X, pinned Y`` for every pinned package whose installed release
    differs from its pin in tests/constraints.txt (a local label such as +cpu is ignored)."""
    out = []
    for name, pinned in sorted(_pins(path).items()):
        have = _installed(name)
        if have is None:
            out.append(f"{name} not installed, pinned {pinned}")
        elif have.split("+", 1)[0] != pinned.split("+", 1)[0]:
            out.append(f"{name} installed {have}, pinned {pinned}")
    return out


def drift_hint() -> str:
    """What to do about a golden drift: name the drifted dependencies where there are any
    (a new release may have changed behaviour; a golden update would hide that), else the
    update command."""
    drifted = version_drift()
    if not drifted:
        return "run python scripts/update_goldens.py and review the diff"
    return ("the installed packages differ from the pinned ones (tests/constraints.txt): "
            + "; ".join(drifted) + ". This drift may be a behaviour change of the new release: read "
            "the diff before updating a golden or moving a pin (docs/testing.md, \"Moving the test pins\")")


def golden_form(files: dict[str, str]) -> dict[str, str]:
    """The files as golden files hold them: a generated program (a .py or .sh file with
    mixspec's block markers) as NAME.data, its data part with the recorded library versions as
    a placeholder (``normalise_versions``); every other file as it is."""
    from mixspec import programs

    out = {}
    for name, text in files.items():
        if name.endswith((".py", ".sh")) and programs.blocks(text, name):
            out[name + DATA_SUFFIX] = normalise_versions(programs.data_part(text, name))
        else:
            out[name] = text  # a copied model config keeps the version that wrote it
    return out


def cases() -> dict[str, str]:
    """Case name (spec stem) -> spec path relative to the repository root."""
    out: dict[str, str] = {}
    for folder in SPEC_DIRS:
        if not folder.is_dir():
            continue
        for spec in sorted(folder.iterdir()):
            if spec.suffix not in SUFFIXES:
                continue
            rel = spec.relative_to(ROOT).as_posix()
            if spec.stem in out:
                raise SystemExit(f"two golden cases named {spec.stem!r}: {out[spec.stem]} and {rel}")
            out[spec.stem] = rel
    return out


def render_case(spec_rel: str, target: str) -> dict[str, str]:
    """The files a target writes for a spec (paths as given, from the repository root), in
    their golden form."""
    from mixspec.errors import UnsupportedError
    from mixspec.language.loader import load_spec
    from mixspec.planning.resolve import plan_spec
    from mixspec.targets import TargetOptions, render

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        plan = plan_spec(load_spec(Path(spec_rel)))
        try:
            return golden_form(render(plan, target, TargetOptions()))
        except UnsupportedError as exc:
            return {REFUSAL: str(exc) + "\n"}
    finally:
        os.chdir(cwd)


def golden_dir(target: str, case: str) -> Path:
    return ROOT / "tests" / "targets" / target / case


def read_golden(target: str, case: str) -> dict[str, str]:
    folder = golden_dir(target, case)
    if not folder.is_dir():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*")) if p.is_file()}


def drift() -> list[str]:
    """Every difference between the golden files and what the targets write now."""
    problems = []
    known = cases()
    for target in TARGETS:
        for case, spec in known.items():
            want, have = render_case(spec, target), read_golden(target, case)
            for name in sorted(set(want) | set(have)):
                if name not in have:
                    problems.append(f"{target}/{case}/{name}: missing (from {spec})")
                elif name not in want:
                    problems.append(f"{target}/{case}/{name}: stale (the target no longer writes it)")
                elif want[name] != have[name]:
                    problems.append(f"{target}/{case}/{name}: differs (from {spec})")
        root = ROOT / "tests" / "targets" / target
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if folder.is_dir() and folder.name not in known:
                    problems.append(f"{target}/{folder.name}: stale (no spec named {folder.name})")
    return problems


def update() -> list[str]:
    written = []
    known = cases()
    for target in TARGETS:
        root = ROOT / "tests" / "targets" / target
        for case, spec in known.items():
            folder = golden_dir(target, case)
            want = render_case(spec, target)
            for name, _ in read_golden(target, case).items():
                if name not in want:
                    (folder / name).unlink()
                    written.append(f"removed {target}/{case}/{name}")
            for name, text in want.items():
                path = folder / name
                if not path.is_file() or path.read_text(encoding="utf-8") != text:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text, encoding="utf-8", newline="\n")
                    written.append(f"wrote {target}/{case}/{name}")
        if root.is_dir():
            for folder in sorted(root.iterdir()):
                if folder.is_dir() and folder.name not in known:
                    for path in sorted(folder.rglob("*"), reverse=True):
                        path.unlink() if path.is_file() else path.rmdir()
                    folder.rmdir()
                    written.append(f"removed {target}/{folder.name}")
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, write nothing; exit 1 on drift")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for line in problems:
            print(line)
        if problems and version_drift():
            print(drift_hint())
        return 1 if problems else 0
    for line in update():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
