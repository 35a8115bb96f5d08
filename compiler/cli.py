"""The mixspec command line: the one boundary where errors become exit codes.

stdout carries artifacts (plans, schemas, JSON); stderr carries diagnostics.
Exit codes: 0 ok, 1 a spec/model/target/imported-config problem the user can fix, 2 CLI usage error,
3 `diff`: the two Plans train differently.
Heavy modules (torch, transformers) are imported only when a module tree must be built.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from . import __version__
from .errors import MixspecError

app = typer.Typer(
    name="mixspec",
    help="One spec for mixed-strategy fine-tuning: validate it, plan exact counts and memory, compile it to a backend.",
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _Command(TyperCommand):
    """Usage lines and argument help as a user types them: `SPEC...`, not typer's `{spec}`
    and `<list[Path]>`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_argument_label(param) if param.required else f"[{_argument_label(param)}]")
        return pieces

    def get_short_help_str(self, limit: int = 45) -> str:
        """The help's first sentence whole (click cuts it at ~45 characters with "..."): the
        command list wraps it instead."""
        text = " ".join((self.short_help or self.help or "").split("\n\n")[0].split())
        return text.split(". ")[0].rstrip(".")

    def format_options(self, ctx, formatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((_argument_label(param), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_label(param) -> str:
    label = param.metavar or param.name.upper()
    return label + ("..." if param.nargs != 1 and not label.endswith("...") else "")


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


def _stderr(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")


def _fail(exc: MixspecError) -> typer.Exit:
    render = getattr(exc, "render", None)  # an error with no spec line: "error: ..." and its hint
    _stderr(render() if callable(render) else str(exc))
    return typer.Exit(exc.exit_code)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"mixspec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code",
        help="Allow specs that set trust_remote_code: true to run the model repo's code (auto_map).",
    ),
) -> None:
    """mixspec: validate, plan and compile mixed-strategy fine-tuning specs."""
    if trust_remote_code:
        import os

        os.environ["MIXSPEC_TRUST_REMOTE_CODE"] = "1"


@app.command(cls=_Command)
def validate(
    specs: List[Path] = typer.Argument(..., metavar="SPEC", help="Spec files (.yaml, .yml, .json), or "
                                       "directories: the spec files directly inside each."),
    format: OutputFormat = typer.Option(OutputFormat.text, "--format", help="text or json."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json."),
    model_check: bool = typer.Option(
        True, "--model/--no-model",
        help="Also resolve each spec against its model's module tree (catalog, local dir or cache).",
    ),
) -> None:
    """Check specs: schema, values, and (by default) the real module tree. Exit 0 when all are valid."""
    from .fast import run_validate

    raise typer.Exit(run_validate(specs, as_json=as_json or format == OutputFormat.json, model_check=model_check))


_TARGET_HELP = "Estimate memory as this target runs the spec (hf, deepspeed, swift, llamafactory; default hf)."


def _check_memory_target(target: Optional[str]) -> None:
    from .planning.policy import TARGETS

    if target is not None and target not in TARGETS:
        _stderr(f"error: unknown target {target!r} for the memory estimate\n  targets: {', '.join(TARGETS)}")
        raise typer.Exit(2)


def _load_and_plan(spec: Path):
    from .api import load_spec, plan_spec

    loaded = load_spec(spec)
    return loaded, plan_spec(loaded)


def _print_warnings(plan) -> None:
    for problem in plan.warnings_problems:
        _stderr(problem.render())


@app.command(cls=_Command)
def plan(
    specs: List[Path] = typer.Argument(..., metavar="SPEC", help="Spec files."),
    as_json: bool = typer.Option(False, "--json", help="Print the Plan (and estimate) as JSON (same as --format json)."),
    format: OutputFormat = typer.Option(OutputFormat.text, "--format", help="text or json."),
    show_modules: bool = typer.Option(False, "--modules", help="List the modules each component covers."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML report to this file."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help=_TARGET_HELP),
) -> None:
    """Show which modules each part covers, exact trainable parameters, LRs and memory per GPU."""
    _check_memory_target(target)
    if html is not None:
        if len(specs) != 1:
            _stderr("error: --html writes the report of one spec; give exactly one")
            raise typer.Exit(2)
        try:
            from .presenting.report import write_spec_report

            write_spec_report(specs[0], html)
        except MixspecError as exc:
            raise _fail(exc) from None
        _stderr(f"wrote {html}")
    from .fast import run_plan

    code = run_plan(specs, as_json=as_json or format == OutputFormat.json, show_modules=show_modules, target=target)
    if code:
        raise typer.Exit(code)


@app.command(cls=_Command)
def fit(
    spec: Path = typer.Argument(..., metavar="SPEC", help="Spec file."),
    gpu_memory: str = typer.Option(
        None, "--gpu-memory", metavar="SIZE",
        help="Memory of one GPU: 80GiB, 80GB or 80 (GB = 10^9 bytes); default distributed.gpu_memory_gb. "
             "Vendors' '80 GB' cards hold about 80 GiB (nvidia-smi: 81,559 MiB on an H100): write 80GiB."),
    write: Path = typer.Option(None, "--write", help="Write a copy of the spec with the best settings here."),
    show_all: bool = typer.Option(False, "--all", help="List every option tried."),
    as_json: bool = typer.Option(False, "--json", help="Print the options as JSON."),
    no_fsdp: bool = typer.Option(False, "--no-fsdp", help="Search DeepSpeed/DDP only (FSDP2 is searched for the hf and swift targets)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help=_TARGET_HELP),
) -> None:
    """Find ZeRO stage or FSDP2, offload, checkpointing and micro-batch x accumulation that fit the GPUs.

    Exit 0 when some option fits (the spec as written or another), 1 when none does."""
    _check_memory_target(target)
    try:
        loaded, the_plan = _load_and_plan(spec)
    except MixspecError as exc:
        raise _fail(exc) from None
    from .data.datacheck import data_estimate, data_estimate_text
    from .planning.fit import fit as fit_plan, parse_gpu_memory, render_fit, write_fitted_spec

    try:
        gb = parse_gpu_memory(gpu_memory) if gpu_memory is not None else the_plan.distributed.gpu_memory_gb
    except ValueError as exc:
        _stderr(f"error: {exc}")
        raise typer.Exit(2) from None
    if not gb or gb <= 0:
        _stderr("error: give --gpu-memory GB (or distributed.gpu_memory_gb in the spec)")
        raise typer.Exit(2)
    result = fit_plan(the_plan, gb, target, fsdp=not no_fsdp)
    # the best option (else the spec as written) at the data's longest micro-batch, when checked
    chosen = result.best or result.current
    at_data = data_estimate(loaded, the_plan, target, _option_overrides(chosen))
    if as_json:
        policy = result.current.estimate.policy
        typer.echo(json.dumps({"gpu_memory_gb": gb, "policy": policy.to_json(), "best": None if result.best is None else {
            "settings": _option_json(result.best), "peak_bytes": round(result.best.estimate.peak_bytes)},
            "options": [dict(_option_json(o), peak_bytes=round(o.estimate.peak_bytes), fits=o.fits)
                        for o in result.options],
            **({"at_data": {"settings": _option_json(chosen), "peak_bytes": round(at_data["estimate"].peak_bytes),
                            "fits": at_data["estimate"].peak_bytes <= gb * 1e9, "longest": at_data["longest"],
                            "rows": at_data["rows"]}} if at_data else {})}, indent=2))
    else:
        for line in render_fit(result, show=len(result.options) if show_all else 12):
            typer.echo(line)
        if at_data is not None:
            fits = "fits" if at_data["estimate"].peak_bytes <= gb * 1e9 else "does not fit"
            typer.echo(f"{chosen.describe()} {data_estimate_text(at_data, chosen.estimate)}: {fits}")
    if write is not None and result.best is not None:
        try:
            write_fitted_spec(spec, result.best, write)
        except MixspecError as exc:
            raise _fail(exc) from None
        _stderr(f"wrote {write}")
    if result.best is None:
        raise typer.Exit(1)


def _option_overrides(option) -> dict:
    """estimate() overrides for one of fit's options."""
    return {"zero_stage": option.zero_stage, "fsdp": option.fsdp, "offload": option.offload,
            "gradient_checkpointing": option.gradient_checkpointing, "micro_batch_size": option.micro_batch_size}


def _option_json(option) -> dict:
    return {"zero_stage": option.zero_stage, "fsdp": option.fsdp, "offload": option.offload,
            "gradient_checkpointing": option.gradient_checkpointing,
            "micro_batch_size": option.micro_batch_size, "gradient_accumulation": option.gradient_accumulation}


@app.command(cls=_Command)
def explain(
    spec: Path = typer.Argument(..., metavar="SPEC", help="Spec file."),
    name: str = typer.Argument(..., help="A module or parameter name (mixspec tree MODEL lists them)."),
    as_json: bool = typer.Option(False, "--json", help="Print each parameter with its component and rule as JSON."),
) -> None:
    """Say which component claimed a module or parameter, and by which rule."""
    from .language.loader import load_spec
    from .planning.resolve import explain as explain_name, load_tree_for

    try:
        loaded = load_spec(spec)
        tree = load_tree_for(loaded)
        rows = explain_name(loaded, tree, name)
    except MixspecError as exc:
        raise _fail(exc) from None
    if not rows:
        import difflib

        close = difflib.get_close_matches(name, [m.name for m in tree.modules] + list(tree.param_shapes), n=3)
        _stderr(f"error: {name!r} is neither a module nor a parameter of {tree.architecture}"
                + (f"\n  hint: did you mean {', '.join(close)}?" if close else ""))
        raise typer.Exit(1)
    from .presenting.present import print_explain
    from .planning.resolve import resolve

    try:  # the Plan says which modules get LoRA; explain still answers for a spec that does not resolve
        the_plan = resolve(loaded, tree)
    except MixspecError:
        the_plan = None
    # a tied tensor's other name usually lies outside NAME: who claims it
    partners = {p: tree.tied.get(p) or next((a for a, c in sorted(tree.tied.items()) if c == p), None)
                for p, _ in rows}
    partner_claims = {partner: dict(explain_name(loaded, tree, partner)).get(partner)
                      for partner in partners.values() if partner}
    if as_json:
        typer.echo(json.dumps({"name": name, "parameters": [
            {"name": p, "params": tree.param_numel[p], "component": claim.component if claim else None,
             "rule": claim.why if claim else None, "tied_to": partners.get(p)} for p, claim in rows]}, indent=2))
        return
    print_explain(name, rows, tree, plan=the_plan, spec=loaded.spec, partner_claims=partner_claims)


@app.command(cls=_Command)
def tree(
    model: str = typer.Argument(..., metavar="MODEL", help="Catalog id, cache id or local dir."),
    depth: int = typer.Option(3, "--depth", min=0, help="Show modules up to this depth."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow configs with auto_map (runs the repo's code)."),
    as_json: bool = typer.Option(False, "--json", help="Print every module (type, parameters, role) as JSON; --depth is ignored."),
) -> None:
    """Print a model's module tree with parameter counts and roles."""
    from .api import module_tree
    from .errors import ModelSourceError

    try:
        the_tree = module_tree(model, trust_remote_code=trust_remote_code)
    except ModelSourceError as exc:
        raise _fail(exc) from None
    from .presenting.present import print_tree, tree_json

    if as_json:
        typer.echo(json.dumps(tree_json(the_tree), indent=2))
        return
    print_tree(the_tree, depth)


@app.command(cls=_Command)
def tiny(
    model: str = typer.Argument(..., metavar="MODEL", help="Catalog id, cache id or local dir to copy the family of."),
    out: Path = typer.Argument(..., metavar="OUT_DIR", help="Where to write the tiny model (must not exist)."),
    layers: int = typer.Option(2, "--layers", min=1, help="Blocks per tower."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow configs with auto_map (runs the repo's code)."),
) -> None:
    """Write a random tiny model of MODEL's family (same module names and roles, fewer and
    narrower blocks, the tokenizer/processor files where MODEL's directory has them), to run a
    compiled train.py end to end on a CPU."""
    from .errors import ModelSourceError
    from .models.sources import find_model

    if out.exists():
        _stderr(f"error: {out} exists\n  hint: give a new directory (mixspec tiny never overwrites)")
        raise typer.Exit(2)
    try:
        source = find_model(model)
        if "auto_map" in source.config and not trust_remote_code:
            raise ModelSourceError(f"model {model!r}: its config names the repository's own code (auto_map)",
                                   "pass --trust-remote-code to build it with that code")
        from .models.tiny import make_tiny

        made = make_tiny(Path(source.path), out, layers=layers, trust_remote_code=trust_remote_code)
    except MixspecError as exc:
        raise _fail(exc) from None
    typer.echo(f"wrote {out}: {made['architecture']}, {made['params']:,} parameters (random weights, float32; "
               "for smoke tests only)")
    if made["copied"]:
        typer.echo(f"  copied from {source.path}: {', '.join(made['copied'])}")
    if made["synthesized"]:
        from .models.tiny_processor import NOTE

        typer.echo(f"  synthesized ({source.path} has no tokenizer/processor files): {', '.join(made['synthesized'])}")
        typer.echo(f"  the tokenizer is {NOTE}")
    if made["missing"] and not made["synthesized"]:
        _stderr(f"warning: {out} has no tokenizer/processor files; {made['missing'].removeprefix('error: ')}")
    elif made["missing"]:
        _stderr(f"warning: {made['missing']}")


@app.command(cls=_Command)
def models(
    as_json: bool = typer.Option(False, "--json", help="Print the catalog as JSON."),
) -> None:
    """List the built-in catalog of model configs (usable offline by id): family, architecture, size."""
    from .models.sources import catalog_entries

    entries = catalog_entries()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    width = max(len(e["id"]) for e in entries)
    for e in entries:
        size = f"{e['params'] / 1e9:.1f} B" if e["params"] else "?"
        typer.echo(f"{e['id']:<{width}}  {e['model_type']:<16} {size:>8}  {e['architecture']}")


@app.command(cls=_Command)
def compile(
    spec: Path = typer.Argument(..., metavar="SPEC", help="Spec file."),
    target: str = typer.Option(..., "--target", "-t", help="swift, hf, deepspeed, llamafactory or axolotl."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: print to stdout)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files in the output directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be written; write nothing."),
    approximate: bool = typer.Option(False, "--approximate",
                                     help="Emit an approximation where the target cannot be exact; each deviation is a comment."),
    plugin: bool = typer.Option(True, "--plugin/--no-plugin",
                                help="swift: allow a generated --external_plugins file when flags cannot be exact."),
    swift_version: int = typer.Option(4, "--swift-version", help="ms-swift major version: 3 or 4."),
    model_override: Optional[str] = typer.Option(None, "--model", help="Model path or id the generated files load (default: the spec's)."),
    launcher: str = typer.Option("auto", "--launcher",
                                 help="hf, swift: auto (sbatch.sh when distributed.nodes > 1), slurm (always) or none."),
    slurm_partition: Optional[str] = typer.Option(None, "--slurm-partition", help="sbatch.sh: #SBATCH --partition."),
    slurm_time: Optional[str] = typer.Option(None, "--slurm-time", help="sbatch.sh: #SBATCH --time (e.g. 2-00:00:00)."),
    slurm_account: Optional[str] = typer.Option(None, "--slurm-account", help="sbatch.sh: #SBATCH --account."),
) -> None:
    """Write configs the real backend runs as is, or refuse, naming what it cannot express."""
    from .api import render
    from .targets import TargetOptions

    slurm = {"partition": slurm_partition, "time": slurm_time, "account": slurm_account}
    _check_compile_options(target, swift_version, launcher, slurm)
    try:
        _, the_plan = _load_and_plan(spec)
        # generated files that name each other (e.g. LLaMA-Factory's dataset_dir) need out_dir
        files = render(the_plan, target, swift_version=swift_version, plugin=plugin,
                       approximate=approximate, model=model_override, out_dir=out, launcher=launcher,
                       slurm_partition=slurm_partition, slurm_time=slurm_time, slurm_account=slurm_account)
    except MixspecError as exc:
        raise _fail(exc) from None
    _print_warnings(the_plan)
    from .targets import target_warnings

    for line in target_warnings(the_plan, target, TargetOptions(swift_version=swift_version, plugin=plugin,
                                                                 approximate=approximate,
                                                                 model_override=model_override)):
        _stderr(f"warning: target {target}: {line}")
    _emit_files(files, out, force, dry_run)


def _check_compile_options(target: str, swift_version: int, launcher: str, slurm: dict) -> None:
    """compile's options -> nothing, or every problem with them on stderr and exit 2."""
    if swift_version not in (3, 4):
        _stderr("error: --swift-version must be 3 or 4")
        raise typer.Exit(2)
    from .api import target_names
    from .targets._slurm import LAUNCHERS, slurm_value_problem

    names = target_names()
    if target not in names:
        import difflib

        close = difflib.get_close_matches(target, names, n=1, cutoff=0.5)
        _stderr(f"error: unknown target {target!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                + f"\n  targets: {', '.join(names)}")
        raise typer.Exit(2)
    if launcher not in LAUNCHERS:
        _stderr(f"error: --launcher must be one of {', '.join(LAUNCHERS)} (got {launcher!r})")
        raise typer.Exit(2)
    problems = [p for kind, value in slurm.items() if value is not None for p in [slurm_value_problem(kind, value)] if p]
    if target not in ("hf", "swift") and (launcher == "slurm" or any(v is not None for v in slurm.values())):
        problems.append(f"--launcher slurm and --slurm-* are for the hf and swift targets (got --target {target})")
    elif launcher == "none" and any(v is not None for v in slurm.values()):
        problems.append("--slurm-* options need sbatch.sh, which --launcher none does not write")
    if problems:
        for problem in problems:
            _stderr(f"error: {problem}")
        raise typer.Exit(2)


def _emit_files(files: dict[str, str], out: Optional[Path], force: bool, dry_run: bool) -> None:
    """The rendered files -> stdout (no --out), or written under --out (or listed, --dry-run)."""
    from .output import write_files

    if out is None and not dry_run:
        for name, text in files.items():
            if len(files) > 1:
                typer.echo(f"# ==> {name} <==")
            typer.echo(text, nl=False)
        return
    try:
        written = write_files(out or Path("."), files, force=force, dry_run=dry_run)
    except MixspecError as exc:
        raise _fail(exc) from None
    for line in written:
        _stderr(line)


MAX_IMPORT_BYTES = 1_000_000


@app.command("import", cls=_Command)
def import_config(
    file: str = typer.Argument(..., metavar="FILE", help="The backend's config: a file, or - for stdin."),
    backend: str = typer.Option(..., "--from", help="swift (a swift sft command line), llamafactory or axolotl."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the mixspec spec that trains the same here."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing -o file."),
    as_json: bool = typer.Option(False, "--json", help="Print the import (spec, Plan, effects, unmodelled) as JSON."),
) -> None:
    """Read a config you already have: show what it really trains (the Plan), its silent effects,
    what is not modelled, and (-o) write the spec that trains exactly that. Exit 1 when it
    cannot be expressed."""
    from .importers import BACKENDS

    if backend not in BACKENDS:
        import difflib

        close = difflib.get_close_matches(backend, BACKENDS, n=1, cutoff=0.5)
        _stderr(f"error: unknown --from {backend!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                + f"\n  one of: {', '.join(BACKENDS)}")
        raise typer.Exit(2)
    source = "<stdin>" if file == "-" else file
    text = _read_config(file, source)
    from .api import import_config
    from .importers import spec_yaml

    try:
        imported = import_config(source, backend, text=text)
    except ModuleNotFoundError as exc:
        if exc.name != f"mixspec.importers.{backend}":
            raise
        _stderr(f"error: this build of mixspec has no {backend} importer")
        raise typer.Exit(1) from None
    except MixspecError as exc:
        raise _fail(exc) from None
    plan = imported.plan
    if not imported.ok:
        _import_failed(imported, source, backend, as_json)
    yaml_text = spec_yaml(imported, source)
    from .language.loader import load_spec_text

    if load_spec_text(yaml_text, "<imported>").spec != load_spec_text(json.dumps(imported.spec), "<json>").spec:
        raise RuntimeError("internal error: the written spec does not load back as the imported one")
    from .api import estimate_memory

    if as_json:
        typer.echo(json.dumps(_import_json(imported, source, plan), indent=2))
    else:
        from .presenting.present import print_plan

        typer.echo(f"{source}: read with the rules of {imported.rules}")
        print_plan(plan, estimate_memory(plan), groups=imported.groups)
        _print_import_findings(imported)
    for problem in plan.warnings_problems:
        _stderr(problem.render())
    if out is not None:
        _write_imported_spec(out, yaml_text, force)

def _import_failed(imported, source: str, backend: str, as_json: bool) -> None:
    """An import that cannot be expressed -> its problems on stderr (and --json on stdout); exit 1."""
    if as_json:
        typer.echo(json.dumps(_import_json(imported, source, None), indent=2))
    for problem in imported.problems:
        _stderr(problem.render())
    # the rules' short name (their long form is on the import's first line and in --json)
    rules = (imported.rules or backend).split(":")[0]
    _stderr(f"{source}: cannot be expressed as a mixspec spec ({rules}); nothing written")
    raise typer.Exit(1)


def _write_imported_spec(out: Path, yaml_text: str, force: bool) -> None:
    """The imported spec's YAML -> the -o file (refusing a directory or, without --force, a file)."""
    from .output import write_files

    if out.is_dir():
        _stderr(f"error: -o {out} is a directory; give the spec file's path, e.g. -o {out / 'spec.yaml'}")
        raise typer.Exit(1)
    try:
        written = write_files(out.parent if str(out.parent) else Path("."), {out.name: yaml_text}, force=force,
                              elsewhere="give another file with -o")
    except MixspecError as exc:
        raise _fail(exc) from None
    for line in written:
        _stderr(line)


def _read_config(file: str, source: str) -> str:
    try:
        if file == "-":
            data = sys.stdin.buffer.read(MAX_IMPORT_BYTES + 1)
        else:
            with open(file, "rb") as fh:
                data = fh.read(MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        _stderr(f"{source}: error: cannot read it: {exc.strerror or exc}")
        raise typer.Exit(1) from None
    if len(data) > MAX_IMPORT_BYTES:
        _stderr(f"{source}: error: larger than {MAX_IMPORT_BYTES:,} bytes; a training config is far smaller")
        raise typer.Exit(1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        _stderr(f"{source}:{line}:{col}: error: not UTF-8 text (byte 0x{data[exc.start]:02x})")
        raise typer.Exit(1) from None
    if "\x00" in text:
        _stderr(f"{source}: error: holds NUL bytes: not a text config")
        raise typer.Exit(1)
    return text


def _print_import_findings(imported) -> None:
    typer.echo("")
    if imported.effects:
        typer.echo(f"silent effects ({len(imported.effects)}):")
        for effect in imported.effects:
            typer.echo("  " + effect.render().replace("\n", "\n  "))
    else:
        typer.echo("silent effects: none found")
    if imported.unmodelled:
        typer.echo(f"not modelled ({len(imported.unmodelled)}; mixspec import did not read them):")
        for item in imported.unmodelled:
            typer.echo("  " + item.render())


def _import_json(imported, source: str, plan) -> dict:
    from .api import estimate_memory

    data = {"backend": imported.backend, "rules": imported.rules, "source": source, "ok": imported.ok,
            "spec": imported.spec,
            "origins": {k: (v.to_json() if hasattr(v, "to_json") else str(v)) for k, v in imported.origins.items()},
            "groups": imported.groups,
            "effects": [e.to_json() for e in imported.effects],
            "unmodelled": [u.to_json() for u in imported.unmodelled],
            "problems": [p.to_json() for p in imported.problems]}
    if plan is not None:
        data["plan"] = plan.to_json()
        data["plan"]["estimate"] = estimate_memory(plan).to_json()
    return data


class DiffFormat(str, Enum):
    text = "text"
    markdown = "markdown"
    json = "json"


@app.command(cls=_Command)
def diff(
    old: Path = typer.Argument(..., help="The old spec, or with --git the spec to compare."),
    new: Optional[Path] = typer.Argument(None, help="The new spec (not with --git)."),
    git: Optional[str] = typer.Option(None, "--git", metavar="REV",
                                      help="Compare the spec with its version at this git revision."),
    format: DiffFormat = typer.Option(DiffFormat.text, "--format", help="text, markdown (a PR comment) or json."),
) -> None:
    """What changes in the training from OLD to NEW. Exit 0 when they train the same, 3 when not."""
    from .presenting import diff as plan_diff
    from .planning.estimate import estimate

    if (git is None) == (new is None):
        _stderr("error: give two specs (mixspec diff OLD NEW) or one with a revision (mixspec diff --git REV SPEC)")
        raise typer.Exit(2)
    try:
        if git is not None:
            old_plan = plan_diff.plan_of_git_revision(git, old)
            _, new_plan = _load_and_plan(old)
        else:
            _, old_plan = _load_and_plan(old)
            _, new_plan = _load_and_plan(new)
    except MixspecError as exc:
        raise _fail(exc) from None
    result = plan_diff.diff_plans(old_plan, estimate(old_plan), new_plan, estimate(new_plan))
    typer.echo(plan_diff.render(result, format.value), nl=False)
    raise typer.Exit(0 if result.equal else 3)


data_app = typer.Typer(help="Check training data the way train.py reads it.", no_args_is_help=True,
                       add_completion=False, rich_markup_mode=None)
app.add_typer(data_app, name="data")


@data_app.command("check", cls=_Command)
def data_check(
    spec: Path = typer.Argument(..., metavar="SPEC", help="Spec file (its data.train, data.eval, model, max_length)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON (every refused row)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Processes checking rows: this one and N-1 workers (default: one per core, at most 8, one per 200 rows)."),
    model: Optional[str] = typer.Option(None, "--model", help="A local directory with the model's processor/tokenizer files."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Check every row even when a cached result matches."),
) -> None:
    """Run every row of data.train and data.eval through train.py's own row code (the model's
    processor and chat template, max_length): refused rows with file:line and why, token lengths,
    truncation, images. Exit 0 when every row is accepted, 1 when any is refused."""
    from .data.datacheck import render_text, run_check

    try:
        report = run_check(spec, workers=workers, model=model, cache=not no_cache)
    except MixspecError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for line in render_text(report):
            typer.echo(line)
    if not report.get("cached") and report.get("seconds"):
        _stderr(f"checked {report['rows']:,} rows in {report['seconds']:.1f} s "
                f"({report['rows'] / report['seconds']:,.0f} rows/s, {report['workers']} process(es))")
    if report["refused"]:
        raise typer.Exit(1)


@app.command(cls=_Command)
def schema() -> None:
    """Print the JSON Schema of the spec language."""
    from .language.spec import json_schema

    typer.echo(json.dumps(json_schema(), indent=2, sort_keys=True))


def main() -> None:
    """Console-script entry point."""
    import gc

    # One short process: the cyclic GC only re-scans what the imports build (torch and
    # transformers on a cold tree build: ~1 s of collections while importing, ~1.5 s more
    # at interpreter exit). Building all catalog trees in one process without it adds
    # ~10 MB. Frozen objects are skipped by the collections of interpreter shutdown.
    gc.disable()
    try:
        app(standalone_mode=True)
    except SystemExit as exc:
        if "torch" in sys.modules and (exc.code is None or isinstance(exc.code, int)):
            _exit_without_teardown(exc.code or 0)
        raise
    except MixspecError as exc:  # pragma: no cover - commands handle their own
        _stderr(str(exc))
        sys.exit(exc.exit_code)
    finally:
        gc.freeze()


def _exit_without_teardown(code: int) -> None:
    """Exit after a tree build: tearing down torch's and transformers' modules costs ~0.3 s
    of CPU and does nothing for a finished command (files are written and renamed, the
    cache entry included). Only a normal exit gets here; a traceback exits normally."""
    import logging
    import os

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
