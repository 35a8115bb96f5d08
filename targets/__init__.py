"""Backends: each module renders a Plan into files a real backend runs as is.

A target is a small class: capability checks that collect what it cannot express
(``Unsupported`` items, refused together), and render methods returning
``{filename: text}``. Targets read only the Plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import Location, Unsupported, UnsupportedError
from ..planning.plan import Plan


@dataclass(frozen=True)
class TargetOptions:
    """Options from the command line that shape a target's output."""

    swift_version: int = 4
    plugin: bool = True  # swift: may emit an --external_plugins file when flags are not exact
    approximate: bool = False  # emit an approximation, each deviation as a comment
    model_override: str | None = None
    extra: dict = field(default_factory=dict)
    # hf and swift: "auto" writes sbatch.sh when the plan has several nodes, "slurm" always,
    # "none" never; the slurm_* values become #SBATCH lines (checked by mixspec.targets._slurm)
    launcher: str = "auto"
    slurm_partition: str | None = None
    slurm_time: str | None = None
    slurm_account: str | None = None


class Target:
    """Base class: subclasses set ``name`` and implement ``unsupported`` and ``files``."""

    name = ""
    description = ""

    def unsupported(self, plan: Plan, options: TargetOptions) -> list[Unsupported]:
        return []

    def files(self, plan: Plan, options: TargetOptions) -> dict[str, str]:
        raise NotImplementedError

    def warnings(self, plan: Plan, options: TargetOptions) -> list[str]:
        """What the output does exactly but without proof for this model (printed, not refused)."""
        return []

    def render(self, plan: Plan, options: TargetOptions) -> dict[str, str]:
        """Refuse or approximate, decided here for every target: without --approximate any
        Unsupported item refuses; with it, only items that are not ``approximable`` do (the
        target's ``files`` then writes each approximated deviation as a comment)."""
        problems = self.unsupported(plan, options)
        refused = [p for p in problems if not (options.approximate and p.approximable)]
        if refused:
            raise UnsupportedError(self.name, [_located(p, plan) for p in refused])
        return self.files(plan, options)


def _located(item: Unsupported, plan: Plan) -> Unsupported:
    """A refusal of the spec as a whole (no key of its own) names the spec file, so every
    refusal reads ``FILE[:LINE:COL]: error: ...`` whichever target made it."""
    if item.origin is not None or not plan.spec_path:
        return item
    return dataclasses.replace(item, origin=Location(plan.spec_path))


def available_targets() -> dict[str, type[Target]]:
    """Targets that are implemented, by name (imported lazily)."""
    import importlib

    out: dict[str, type[Target]] = {}
    for name, module in (("hf", "hf"), ("deepspeed", "deepspeed"), ("swift", "swift"),
                         ("llamafactory", "llamafactory"), ("axolotl", "axolotl")):
        try:
            mod = importlib.import_module(f"mixspec.targets.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mixspec.targets.{module}":
                continue
            raise
        out[name] = mod.TARGET
    return out


def target_warnings(plan: Plan, target: str, options: TargetOptions | None = None) -> list[str]:
    """The target's warnings for a Plan it renders (empty for an unknown target)."""
    targets = available_targets()
    if target not in targets:
        return []
    warn = getattr(targets[target](), "warnings", None)  # third-party targets may not have it
    return warn(plan, options or TargetOptions()) if warn else []


def render(plan: Plan, target: str, options: TargetOptions | None = None) -> dict[str, str]:
    """Render a Plan for a target; raises UnsupportedError naming what it cannot express."""
    targets = available_targets()
    if target not in targets:
        raise UnsupportedError(target, [Unsupported(
            "unknown-target", None, "anything", f"no target named {target!r}",
            "available: " + ", ".join(sorted(targets)))])
    return targets[target]().render(plan, options or TargetOptions())
