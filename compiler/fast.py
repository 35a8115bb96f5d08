"""The console script's entry point, and `plan` / `validate` without typer.

Importing typer and letting it parse costs about as much as a warm plan itself (~0.1 s of
imports, more for its lazily imported argument adapters), so the two commands CI and
editors run most are parsed here when their command line is plain: the command, spec
paths, and only the options they document. Anything else (--help, a typo, a root option,
another command) goes to the typer app in mixspec.cli, which owns usage, help and usage
errors. Both paths run the same functions below and print the same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import MixspecError, SpecError

_FLAGS = {
    "plan": {"--json": ("as_json", True), "--modules": ("show_modules", True)},
    "validate": {"--json": ("as_json", True), "--model": ("model_check", True),
                 "--no-model": ("model_check", False)},
}
_DEFAULTS = {"plan": {"as_json": False, "show_modules": False},
             "validate": {"as_json": False, "model_check": True}}


def parse_plain(argv: list[str]):
    """(command, specs, options) for a plain `plan` or `validate` command line, else None."""
    if not argv or argv[0] not in _FLAGS:
        return None
    command, rest = argv[0], argv[1:]
    options = dict(_DEFAULTS[command])
    specs: list[Path] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in _FLAGS[command]:
            key, value = _FLAGS[command][arg]
            options[key] = value
        elif arg == "--format" or arg.startswith("--format="):
            if arg == "--format":
                i += 1
                if i == len(rest):
                    return None
                value = rest[i]
            else:
                value = arg.split("=", 1)[1]
            if value not in ("text", "json"):
                return None
            options["as_json"] = options["as_json"] or value == "json"
        elif arg.startswith("-") and arg != "-":
            return None  # --help, --, an unknown option: typer says what is wrong
        else:
            specs.append(Path(arg))
        i += 1
    if not specs:
        return None
    return command, specs, options


def _stderr(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def _stdout(text: str) -> None:
    sys.stdout.write(text + "\n")


def run_plan(specs: list[Path], as_json: bool = False, show_modules: bool = False, target: str | None = None) -> int:
    """`mixspec plan`: each spec's table (or one JSON Plan, a list for several), memory as
    ``target`` runs it (default hf); exit code."""
    from .api import estimate_memory, plan_spec
    from .language.loader import load_spec

    failed = False
    plans = []
    for spec in specs:
        try:
            loaded = load_spec(spec, light=True)
            the_plan = plan_spec(loaded)
        except MixspecError as exc:
            _stderr(str(exc))
            failed = True
            continue
        est = estimate_memory(the_plan, target)
        at_data = _data_estimate(loaded, the_plan, target)
        if as_json:
            data = the_plan.to_json()
            data["estimate"] = est.to_json()
            if at_data is not None:  # a `mixspec data check` of these files: the real lengths
                data["estimate_at_data"] = dict(at_data, estimate=at_data["estimate"].to_json())
            plans.append(data)
        else:
            from .presenting.present import print_plan

            print_plan(the_plan, est, show_modules=show_modules, at_data=at_data)
        for problem in the_plan.warnings_problems:
            _stderr(problem.render())
    if as_json and plans:
        # one spec prints its Plan object; several print a list of them
        _stdout(json.dumps(plans[0] if len(specs) == 1 else plans, indent=2))
    return 1 if failed else 0


def _data_estimate(loaded, plan, target):
    """The peak at the data's longest micro-batch when `mixspec data check` ran on these files."""
    if plan.data is None:
        return None
    from .data.datacheck import data_estimate

    return data_estimate(loaded, plan, target)


SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def expand_spec_dirs(paths: list[Path]) -> list[Path]:
    """Each directory replaced by the spec files directly inside it (``*.yaml``, ``*.yml``,
    ``*.json``, sorted; not its subfolders, which may hold other YAML: CI workflows, ...). A
    directory with none stays as it is, so the loader says what is wrong with it."""
    out: list[Path] = []
    for path in paths:
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SPEC_SUFFIXES) \
            if path.is_dir() else []
        out += found or [path]
    return out


def run_validate(specs: list[Path], as_json: bool = False, model_check: bool = True) -> int:
    """`mixspec validate`: every spec checked, problems on stderr (or one JSON report); exit code.
    A directory stands for the spec files in it."""
    from .errors import Location, Problem
    from .language.loader import load_spec

    specs = expand_spec_dirs(specs)
    results = []
    ok = True
    for path in specs:
        problems = []
        try:
            loaded = load_spec(path, light=True)
            problems.extend(loaded.warnings)
            if model_check:
                from .planning.resolve import plan_spec

                plan = plan_spec(loaded)
                problems.extend(p for p in plan.warnings_problems)
        except SpecError as exc:
            ok = False
            problems.extend(exc.problems)
        except MixspecError as exc:
            ok = False
            problems.append(Problem(Location(str(path)), "", str(exc)))
        valid = not any(p.severity == "error" for p in problems)
        results.append({"file": str(path), "valid": valid,
                        "problems": [p.to_json() for p in problems]})
        if not as_json:
            for p in problems:
                _stderr(p.render())
            if valid:
                _stderr(f"{path}: ok")
    if as_json:
        _stdout(json.dumps({"valid": ok, "files": results}, indent=2))
    return 0 if ok else 1


def main() -> None:
    """Console-script entry point: the fast path for plain plan/validate, else the typer app."""
    parsed = parse_plain(sys.argv[1:])
    if parsed is None:
        from .cli import main as typer_main

        typer_main()
        return
    import gc

    command, specs, options = parsed
    gc.disable()  # one short process (see mixspec.cli.main)
    code = (run_plan if command == "plan" else run_validate)(specs, **options)
    gc.freeze()
    if "torch" in sys.modules:  # a tree was built: skip torch's teardown (see mixspec.cli)
        from .cli import _exit_without_teardown

        _exit_without_teardown(code)
    sys.exit(code)
