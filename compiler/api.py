"""The pipeline as a library: what the CLI does, for notebooks and other tools.

    import mixspec
    plan = mixspec.plan_spec("spec.yaml")          # or a dict, or a LoadedSpec
    plan.totals.trainable_params
    mixspec.estimate_memory(plan).total_bytes
    files = mixspec.render(plan, "swift")          # {filename: text}
    mixspec.compile_spec("spec.yaml", "hf", out_dir="out/")
    got = mixspec.import_config("train.sh", "swift")   # what a backend config really trains

Errors are the CLI's, as exceptions: ``SpecError`` (``.problems``: each located
``file:line:col`` with the dotted key, message and hint), ``UnsupportedError`` (``.items``:
what a target cannot express), ``ModelSourceError``; all derive from ``MixspecError``.
Heavy modules (torch, transformers) are imported only when a module tree must be built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Union

from .errors import Location, Problem, SpecError

if TYPE_CHECKING:  # pragma: no cover
    from .planning.estimate import Estimate
    from .language.loader import LoadedSpec
    from .planning.plan import Plan
    from .models.tree import ModuleTree

SpecSource = Union[str, Path, dict, "LoadedSpec"]


def load_spec(spec: SpecSource, name: str | None = None) -> "LoadedSpec":
    """Validate a spec given as a file path, a dict (as `yaml.safe_load` would give) or an
    already loaded spec. Raises SpecError with every problem. A dict's problems are located
    by their dotted key under ``name`` (default ``<dict>``), having no lines; a dict's
    relative model path is taken from the working directory."""
    from .language import loader

    if isinstance(spec, loader.LoadedSpec):
        return spec
    if isinstance(spec, dict):
        return _load_dict(spec, name or "<dict>")
    if isinstance(spec, (str, Path)):
        return loader.load_spec(spec)
    raise TypeError(f"a spec is a path, a dict or a LoadedSpec, not {type(spec).__name__}")


def _load_dict(data: dict, name: str) -> "LoadedSpec":
    from .language import loader
    from .language.yamlloc import Located

    try:  # tuples become lists, as they would in YAML; what JSON cannot hold is no spec
        plain = json.loads(json.dumps(data, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise SpecError([Problem(Location(name), "", f"a spec dict must hold plain data: {exc}",
                                 "use str, int, float, bool, None, list and dict values")]) from None
    where = Location(name)
    key_locs: dict = {}

    def walk(node, path: tuple) -> None:
        key_locs[path] = where
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + (key,))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, path + (i,))

    walk(plain, ())
    return loader._validate(Located(name, plain, {}, key_locs), name)


def plan_spec(spec: SpecSource, use_cache: bool = True) -> "Plan":
    """The Plan of a spec: every component's parameters, modes, LRs and exact counts,
    resolved against the model's real module tree (built on the meta device, cached).
    ``plan.warnings_problems`` holds the warnings `mixspec plan` prints."""
    from .planning.resolve import plan_spec as resolve_plan

    return resolve_plan(load_spec(spec), use_cache=use_cache)


def estimate_memory(plan: "Plan", target: str | None = None) -> "Estimate":
    """Memory per GPU of a Plan (model states, activations, peak) as ``target`` runs it
    (hf, deepspeed, swift, llamafactory; default hf: mixspec.planning.policy)."""
    from .planning.estimate import estimate

    return estimate(plan, target=target)


def target_names() -> list[str]:
    """The names of the targets render() accepts."""
    from .targets import available_targets

    return sorted(available_targets())


def render(plan: "Plan", target: str, *, approximate: bool = False, plugin: bool = True,
           swift_version: int = 4, model: str | None = None,
           out_dir: str | Path | None = None, launcher: str = "auto", slurm_partition: str | None = None,
           slurm_time: str | None = None, slurm_account: str | None = None) -> dict[str, str]:
    """A target's files for a Plan, ``{filename: text}``, or UnsupportedError naming what
    the target cannot express. ``model`` overrides the model the files load; ``out_dir``
    is where the files will be written (some name each other by path); ``launcher`` and
    ``slurm_*`` shape the hf/swift sbatch.sh (README: Running on a cluster)."""
    import difflib

    from .targets import TargetOptions
    from .targets import render as render_target

    names = target_names()
    if target not in names:
        close = difflib.get_close_matches(target, names, n=1, cutoff=0.5)
        raise ValueError(f"unknown target {target!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" (targets: {', '.join(names)})")
    if swift_version not in (3, 4):
        raise ValueError("swift_version must be 3 or 4")
    return render_target(plan, target, TargetOptions(
        swift_version=swift_version, plugin=plugin, approximate=approximate, model_override=model,
        launcher=launcher, slurm_partition=slurm_partition, slurm_time=slurm_time, slurm_account=slurm_account,
        extra={"out_dir": str(out_dir)} if out_dir is not None else {}))


def write(files: dict[str, str], out_dir: str | Path, force: bool = False) -> list[str]:
    """Write rendered files into ``out_dir``, all or none (existing files need ``force``)."""
    from .output import write_files

    return write_files(Path(out_dir), files, force=force)


def compile_spec(spec: SpecSource, target: str, out_dir: str | Path | None = None, *,
                 force: bool = False, **options) -> dict[str, str]:
    """Plan a spec and render it for a target (options as for render()); with ``out_dir``,
    also write the files there. Returns the files."""
    plan = plan_spec(spec)
    files = render(plan, target, out_dir=out_dir, **options)
    if out_dir is not None:
        write(files, out_dir, force=force)
    return files


def module_tree(model: str, trust_remote_code: bool = False) -> "ModuleTree":
    """A model's module tree (catalog id, cache id or local dir): names, types, shapes."""
    from .models.sources import find_model
    from .models.tree import get_tree

    return get_tree(find_model(model), trust_remote_code=trust_remote_code)


def import_config(source: str | Path, backend: str, text: str | None = None):
    """What a backend's config really trains (``mixspec import``): ``backend`` is one of
    ``swift``, ``llamafactory``, ``axolotl``; ``source`` the file (read unless ``text`` is
    given, then only its name). Returns the ``mixspec.importers.Imported``: ``.spec`` (plain
    data), ``.plan`` (the Plan it trains; None when ``.problems`` holds errors), ``.effects``,
    ``.unmodelled``, ``.origins``; ``mixspec.importers.spec_yaml(imported, name)`` writes the
    commented spec. Problems in the user's file are returned, never raised; a model that
    cannot be found raises ModelSourceError; an unknown backend is a ValueError."""
    from .importers import read

    name = str(source)
    if text is None:
        text = Path(source).read_text(encoding="utf-8")
    imported = read(backend, text, name)
    if imported.ok and imported.plan is None:  # an importer that leaves the resolving to us
        from .planning.resolve import plan_spec as resolve_plan

        try:
            imported.plan = resolve_plan(_load_dict(imported.spec, name))
        except SpecError as exc:
            imported.problems.extend(exc.problems)
    return imported
