"""The mixspec command line: the one boundary where errors become exit codes.

stdout carries artifacts (plans, schemas, JSON); stderr carries diagnostics.
Exit codes: 0 ok, 1 a spec/model/target problem the user can fix, 2 CLI usage error.
Heavy modules (torch, transformers) are imported only when a module tree must be built.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from mixspec import __version__
from mixspec.errors import MixspecError, SpecError, UnsupportedError

app = typer.Typer(
    name="mixspec",
    help="One spec for mixed-strategy fine-tuning: validate it, plan exact counts and memory, compile it to a backend.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


def _stderr(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def _fail(exc: MixspecError) -> typer.Exit:
    _stderr(str(exc))
    return typer.Exit(exc.exit_code)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mixspec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """mixspec: validate, plan and compile mixed-strategy fine-tuning specs."""


@app.command()
def validate(
    specs: List[Path] = typer.Argument(..., help="Spec files (.yaml, .yml, .json)."),
    format: OutputFormat = typer.Option(OutputFormat.text, "--format", help="text or json."),
    model_check: bool = typer.Option(
        True, "--model/--no-model",
        help="Also resolve each spec against its model's module tree (catalog, local dir or cache).",
    ),
) -> None:
    """Check specs: schema, values, and (by default) the real module tree. Exit 0 when all are valid."""
    from mixspec.loader import load_spec

    results = []
    ok = True
    for path in specs:
        problems = []
        try:
            loaded = load_spec(path)
            problems.extend(loaded.warnings)
            if model_check:
                from mixspec.resolve import plan_spec

                plan = plan_spec(loaded)
                problems.extend(p for p in plan.warnings_problems)
        except SpecError as exc:
            ok = False
            problems.extend(exc.problems)
        except MixspecError as exc:
            ok = False
            from mixspec.errors import Location, Problem

            problems.append(Problem(Location(str(path)), "", str(exc)))
        valid = not any(p.severity == "error" for p in problems)
        results.append({"file": str(path), "valid": valid,
                        "problems": [p.to_json() for p in problems]})
        if format == OutputFormat.text:
            for p in problems:
                _stderr(p.render())
            if valid:
                _stderr(f"{path}: ok")
    if format == OutputFormat.json:
        typer.echo(json.dumps({"valid": ok, "files": results}, indent=2))
    raise typer.Exit(0 if ok else 1)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the spec language."""
    from mixspec.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


def main() -> None:
    """Console-script entry point."""
    try:
        app(standalone_mode=True)
    except MixspecError as exc:  # pragma: no cover - commands handle their own
        _stderr(str(exc))
        sys.exit(exc.exit_code)
