"""diff(old, new) -> PlanDiff: what a spec change does to the training.

Two Plans train the same when every trained parameter has the same learning rate and
weight decay, every LoRA adapter sits on the same module with the same settings, and the
model, training, data and distributed settings are equal. How the specs are written (key
order, flow or block style, defaults spelled out, a role or the equivalent pattern, one
component or two at the same LR) does not count. When the training differs, the changes
are described per component: added or removed components, modes, LRs, weight decay, LoRA
settings and targets, modules that moved between components, trainable counts, totals and
the memory per GPU.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import MixspecError
from ..planning.estimate import GIB, Estimate
from ..models.names import natural_key
from ..planning.plan import ComponentPlan, Plan

UNASSIGNED = "unassigned"
LORA_KEYS = ("rank", "alpha", "dropout", "rslora", "dora", "targets_spec", "layers")


class DiffError(MixspecError):
    """A diff that cannot be made (a git revision or path that does not exist)."""


@dataclass(frozen=True)
class Change:
    kind: str  # model | setting | component_added | component_removed | mode | lr | weight_decay
    #            | lora | lora_targets | moved | base_params | trainable | total | memory
    subject: str  # the component, setting key, memory term or "a -> b" for moved modules
    old: object
    new: object
    detail: tuple[str, ...] = ()  # module names, compacted

    def to_json(self) -> dict:
        out = {"kind": self.kind, "subject": self.subject, "old": self.old, "new": self.new}
        if self.detail:
            out["modules"] = list(self.detail)
        return out


@dataclass(frozen=True)
class PlanDiff:
    old_name: str
    new_name: str
    old_fingerprint: str
    new_fingerprint: str
    changes: tuple[Change, ...]
    notes: tuple[str, ...]

    @property
    def equal(self) -> bool:
        return not self.changes

    def to_json(self) -> dict:
        return {
            "equal": self.equal,
            "old": {"spec": self.old_name, "fingerprint": self.old_fingerprint},
            "new": {"spec": self.new_name, "fingerprint": self.new_fingerprint},
            "changes": [c.to_json() for c in self.changes],
            "notes": list(self.notes),
        }


def training_view(plan: Plan) -> dict:
    """What the training does, independent of how the spec names and groups it (the Plan's
    training view: its fingerprint is the hash of it)."""
    return plan.training_view()


def _owner(plan: Plan) -> dict[str, str]:
    """Every canonical base parameter -> the component that claimed it (or unassigned)."""
    out = {p: UNASSIGNED for p in plan.unassigned_params}
    for comp in plan.components:
        for p in comp.params:
            out[p] = comp.name
    return out


def _compact(names) -> tuple[str, ...]:
    from ..models.names import compact_names

    return tuple(f"{t} [{i}]" if i else t for t, i in compact_names(names).items())


def _lora_settings(comp: ComponentPlan) -> dict:
    if not comp.lora:
        return {}
    data = comp.lora.to_json()
    return {k: data[k] for k in LORA_KEYS}


def diff_plans(old: Plan, old_est: Estimate, new: Plan, new_est: Estimate) -> PlanDiff:
    """The training changes from ``old`` to ``new`` (none when both train the same)."""
    changes: list[Change] = []
    notes: list[str] = []
    same = training_view(old) == training_view(new)
    old_comps = {c.name: c for c in old.components}
    new_comps = {c.name: c for c in new.components}
    if not same:
        changes += _model_changes(old, new)
        changes += _component_changes(old_comps, new_comps)
        changes += _moves(old, new)
        changes += _total_changes(old, new)
        changes += _memory_changes(old_est, new_est)
        changes += _setting_changes(old, new)
        if not changes:  # the view differs in a way no section names: say so, never hide it
            changes.append(Change("trained", "parameters", old.optimizer_fingerprint(), new.optimizer_fingerprint()))
    elif set(old_comps) != set(new_comps):
        notes.append("the specs group the model into different components "
                     f"({', '.join(old_comps) or 'none'} vs {', '.join(new_comps) or 'none'}) "
                     "but train the same parameters with the same settings")
    else:
        written = sorted(n for n in old_comps
                         if _written(old_comps[n]) != _written(new_comps[n]))
        if written:
            notes.append(f"component(s) {', '.join(written)} are selected or configured in other words "
                         "(a role or a pattern, LoRA targets or layers spelled differently) "
                         "but train the same parameters with the same settings")
    return PlanDiff(old.spec_path, new.spec_path, old.fingerprint(), new.fingerprint(),
                    tuple(changes), tuple(notes))


def _written(comp: ComponentPlan) -> dict:
    """A component as the spec words it (selection, LoRA targets and layers as written)."""
    data = comp.to_json()
    data.pop("origin", None)
    return data


def _model_changes(old: Plan, new: Plan) -> list[Change]:
    out = []
    if old.model != new.model:
        out.append(Change("model", "model", old.model, new.model))
    if old.architecture != new.architecture:
        out.append(Change("model", "architecture", old.architecture, new.architecture))
    if old.totals.base_params != new.totals.base_params:
        out.append(Change("model", "base_params", old.totals.base_params, new.totals.base_params))
    return out


def _component_changes(old_comps: dict, new_comps: dict) -> list[Change]:
    out = []
    for name, comp in old_comps.items():
        if name not in new_comps:
            out.append(Change("component_removed", name, _summary(comp), None))
    for name, comp in new_comps.items():
        if name not in old_comps:
            out.append(Change("component_added", name, None, _summary(comp)))
    for name, a in old_comps.items():
        b = new_comps.get(name)
        if b is None:
            continue
        if a.mode != b.mode:
            out.append(Change("mode", name, a.mode, b.mode))
        if a.lr != b.lr:
            out.append(Change("lr", name, a.lr, b.lr))
        if a.weight_decay != b.weight_decay and (a.trainable_params or b.trainable_params):
            out.append(Change("weight_decay", name, a.weight_decay, b.weight_decay))
        la, lb = _lora_settings(a), _lora_settings(b)
        if la and lb:
            for key in LORA_KEYS:
                if la[key] != lb[key]:
                    out.append(Change("lora", f"{name}.{key}", la[key], lb[key]))
            ta, tb = set(a.lora.targets), set(b.lora.targets)
            if ta != tb:
                if tb - ta:
                    out.append(Change("lora_targets", f"{name} +", len(ta), len(tb),
                                      _compact(sorted(tb - ta, key=natural_key))))
                if ta - tb:
                    out.append(Change("lora_targets", f"{name} -", len(ta), len(tb),
                                      _compact(sorted(ta - tb, key=natural_key))))
        if _quant_text(a) != _quant_text(b):
            out.append(Change("quantize", name, _quant_text(a), _quant_text(b)))
        if a.base_params != b.base_params:
            out.append(Change("base_params", name, a.base_params, b.base_params))
        if a.trainable_params != b.trainable_params:
            out.append(Change("trainable", name, a.trainable_params, b.trainable_params))
    return out


def _quant_text(comp: ComponentPlan) -> str:
    """How a component's base weights are held: "16-bit", or the method and module count."""
    q = comp.quantize
    if q is None:
        return "not quantized"
    options = "" if q.method == "int8" else f", double_quant {str(q.double_quant).lower()}, compute {q.compute_dtype}"
    return f"{q.method} ({len(q.modules)} Linear{options})"


def _summary(comp: ComponentPlan) -> dict:
    out = {"mode": comp.mode, "lr": comp.lr, "base_params": comp.base_params,
           "trainable_params": comp.trainable_params}
    if comp.lora:
        out["lora"] = _lora_settings(comp)
    return out


def _moves(old: Plan, new: Plan) -> list[Change]:
    """Modules whose parameters changed component, grouped by (from, to), as the fewest
    module names that cover them (on the old model's parameter list)."""
    try:
        from ..planning.resolve import covering
    except ImportError:  # the name before issue 11 made it public
        from ..planning.resolve import _covering as covering

    a, b = _owner(old), _owner(new)
    if set(a) != set(b):
        return []  # another model: the model change says it
    groups: dict[tuple[str, str], set[str]] = {}
    for p, comp in a.items():
        if b[p] != comp:
            groups.setdefault((comp, b[p]), set()).add(p)
    names = list(a)
    out = []
    for (frm, to), params in sorted(groups.items()):
        modules = covering(params, names)
        out.append(Change("moved", f"{frm} -> {to}", frm, to, _compact(modules)))
    return out


def _total_changes(old: Plan, new: Plan) -> list[Change]:
    out = []
    for key in ("trainable_params", "added_params"):
        a, b = getattr(old.totals, key), getattr(new.totals, key)
        if a != b:
            out.append(Change("total", key, a, b))
    a, b = old.unassigned_base_params, new.unassigned_base_params
    if a != b:
        out.append(Change("base_params", UNASSIGNED, a, b))
    return out


# the estimate's JSON term names as a reader says them ("total" is the model states alone:
# weights + gradients + optimizer states; the peak adds activations and the rest)
_MEMORY_WORDS = {"total": "model states (weights + gradients + optimizer)", "optimizer_states": "optimizer states",
                 "cpu_offload_per_node": "CPU offload per node"}


def memory_terms(est: Estimate) -> dict[str, object]:
    """The estimate's per-GPU terms as its JSON names them (numbers in bytes; a term the
    estimate leaves out is a string, e.g. ``"excluded"``), plus CPU offload per node."""
    data = est.to_json()
    terms = dict(data.get("per_gpu_bytes", {}))
    terms["cpu_offload_per_node"] = data.get("cpu_offload_bytes_per_node", 0)
    return terms


def _memory_changes(old_est: Estimate, new_est: Estimate) -> list[Change]:
    out = []
    if (old_est.world_size, old_est.engine, old_est.offload) != (new_est.world_size, new_est.engine, new_est.offload):
        out.append(Change("memory", "layout", _layout(old_est), _layout(new_est)))
    a, b = memory_terms(old_est), memory_terms(new_est)
    for key in list(a) + [k for k in b if k not in a]:
        if a.get(key) != b.get(key):
            out.append(Change("memory", key, a.get(key), b.get(key)))
    return out


def _layout(est: Estimate) -> str:
    stage = "no DeepSpeed" if est.zero_stage is None and not est.fsdp else est.engine
    return f"{est.world_size} GPU(s), {stage}, offload {est.offload}"


def _setting_changes(old: Plan, new: Plan) -> list[Change]:
    a, b = old.training_view()["settings"], new.training_view()["settings"]
    return [Change("setting", k, a.get(k), b.get(k))
            for k in list(a) + [k for k in b if k not in a] if a.get(k) != b.get(k)]


# -- loading the two sides -------------------------------------------------------------------

def plan_of_git_revision(rev: str, spec: Path):
    """The spec as it was at git revision ``rev`` (read with ``git show``), loaded and planned.
    Error locations name ``REV:path``; a local model directory is read from the working tree."""
    from ..language.loader import load_spec_text
    from ..planning.resolve import plan_spec

    spec = Path(spec)
    if rev.startswith("-"):
        raise DiffError(f"error: git revision {rev!r} may not start with '-'")
    where = spec.parent if str(spec.parent) else Path(".")
    try:
        top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-prefix"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiffError(f"error: cannot run git: {exc}") from None
    if top.returncode != 0:
        raise DiffError(f"error: {spec}: not inside a git repository ({top.stderr.strip()})\n"
                        "  hint: --git REV SPEC compares SPEC with its version at a git revision")
    relpath = top.stdout.strip() + spec.name
    shown = subprocess.run(["git", "-C", str(where), "show", f"{rev}:{relpath}"],
                           capture_output=True, timeout=60)
    if shown.returncode != 0:
        raise DiffError(f"error: {rev}:{relpath}: {shown.stderr.decode(errors='replace').strip()}\n"
                        f"  hint: check the revision, and that the spec existed there (git log -- {spec})")
    try:
        text = shown.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise DiffError(f"error: {rev}:{relpath}: not UTF-8 text") from None
    loaded = load_spec_text(text, f"{rev}:{relpath}")
    # locations name the revision; the model (a local dir) is looked up next to the spec
    loaded = replace(loaded, path=str(spec))
    return replace(plan_spec(loaded), spec_path=f"{rev}:{relpath}")


# -- rendering ---------------------------------------------------------------------------------

def _num(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _delta(a, b) -> str:
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool):
        return f" ({b - a:+,})"
    return ""


def _gib(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value / GIB:.2f} GiB"
    return _num(value)


def _describe(c: Change) -> str:
    """One line for a change, shared by the text and markdown renderings."""
    k = c.kind
    if k == "component_added":
        s = c.new
        return f"component {c.subject} added: {_mode_text(s)}, trains {_num(s['trainable_params'])} params"
    if k == "component_removed":
        s = c.old
        return f"component {c.subject} removed (was {_mode_text(s)}, trained {_num(s['trainable_params'])} params)"
    if k == "moved":
        return f"modules moved from {c.old} to {c.new}: " + _list(c.detail)
    if k == "lora_targets":
        name, sign = c.subject.rsplit(" ", 1)
        verb = "gains" if sign == "+" else "loses"
        return f"{name}: LoRA {verb} targets ({c.old} -> {c.new} modules): " + _list(c.detail)
    if k == "quantize":
        return f"base weights {c.subject}: {c.old} -> {c.new}"
    if k == "memory":
        if c.subject == "layout":
            return f"memory layout: {c.old} -> {c.new}"
        delta = ""
        if isinstance(c.old, (int, float)) and isinstance(c.new, (int, float)):
            delta = f" ({(c.new - c.old) / GIB:+.2f} GiB)"
        return f"memory per GPU, {_MEMORY_WORDS.get(c.subject, c.subject)}: {_gib(c.old)} -> {_gib(c.new)}{delta}"
    label = {"mode": "mode", "lr": "lr", "weight_decay": "weight decay", "lora": "LoRA",
             "trainable": "trainable params", "base_params": "base params", "total": "total",
             "setting": "setting", "model": "model", "trained": "trained parameters", "quantize": "base weights"}[k]
    return f"{label} {c.subject}: {_num(c.old)} -> {_num(c.new)}{_delta(c.old, c.new)}"


def _mode_text(s: dict) -> str:
    text = s["mode"] + (f" at lr {s['lr']:g}" if s.get("lr") is not None else "")
    lo = s.get("lora")
    if lo:
        text += f" (r{lo['rank']} a{lo['alpha']:g} d{lo['dropout']:g}" + (" rslora" if lo["rslora"] else "") \
            + (" dora" if lo["dora"] else "") + ")"
    return text


def _list(names, limit: int = 6) -> str:
    shown = list(names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more


def render_text(d: PlanDiff) -> str:
    head = f"{d.old_name} -> {d.new_name}"
    if d.equal:
        lines = [f"{head}: same training (plan fingerprint {d.new_fingerprint})"]
        lines += [f"note: {n}" for n in d.notes]
        return "\n".join(lines) + "\n"
    lines = [f"{head}: {len(d.changes)} change(s) in the training "
             f"(fingerprint {d.old_fingerprint} -> {d.new_fingerprint})"]
    lines += [f"  {_describe(c)}" for c in d.changes]
    return "\n".join(lines) + "\n"


def _cells(c: Change) -> tuple[str, str, str]:
    """(what, before, after) for a markdown table row."""
    k = c.kind
    if k == "component_added":
        return (f"component `{c.subject}`", "-", f"added: {_mode_text(c.new)}, trains {_num(c.new['trainable_params'])}")
    if k == "component_removed":
        return (f"component `{c.subject}`", f"{_mode_text(c.old)}, trains {_num(c.old['trainable_params'])}", "removed")
    if k == "moved":
        return (_list(c.detail), f"`{c.old}`", f"`{c.new}`")
    if k == "lora_targets":
        name, sign = c.subject.rsplit(" ", 1)
        verb = "gains" if sign == "+" else "loses"
        return (f"`{name}` LoRA targets ({verb} {_list(c.detail)})", f"{c.old} modules", f"{c.new} modules")
    if k == "quantize":
        return (f"base weights `{c.subject}`", c.old, c.new)
    if k == "memory":
        if c.subject == "layout":
            return ("layout", str(c.old), str(c.new))
        delta = ""
        if isinstance(c.old, (int, float)) and isinstance(c.new, (int, float)):
            delta = f" ({(c.new - c.old) / GIB:+.2f} GiB)"
        return (_MEMORY_WORDS.get(c.subject, c.subject.replace("_", " ")), _gib(c.old), _gib(c.new) + delta)
    label = {"mode": "mode", "lr": "lr", "weight_decay": "weight decay", "lora": "LoRA",
             "trainable": "trainable params", "base_params": "base params", "total": "total",
             "setting": "", "model": "", "trained": "trained parameters", "quantize": "base weights"}[k]
    subject = c.subject.replace("_params", "") if k == "total" else c.subject
    what = f"{label} `{subject}`" if label else f"`{subject}`"
    return (what, _num(c.old), _num(c.new) + _delta(c.old, c.new))


_SECTIONS = (
    ("Components", ("component_added", "component_removed", "mode", "lr", "weight_decay", "lora",
                    "lora_targets", "quantize", "model", "trained")),
    ("Modules that moved between components", ("moved",)),
    ("Parameters", ("base_params", "trainable", "total")),
    ("Memory per GPU", ("memory",)),
    ("Settings", ("setting",)),
)


def _md(text: str) -> str:
    """Text inside a markdown table cell: pipes escaped, no raw HTML."""
    return (text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", " "))


def render_markdown(d: PlanDiff) -> str:
    """A PR comment: a heading with the verdict, then one table per kind of change."""
    title = f"### mixspec: `{_md(d.new_name)}`"
    if d.equal:
        lines = [title, "", f"Same training as `{_md(d.old_name)}` (plan fingerprint `{d.new_fingerprint}`)."]
        lines += ["", *(f"> {_md(n)}" for n in d.notes)] if d.notes else []
        return "\n".join(lines) + "\n"
    lines = [title, "",
             f"**{len(d.changes)} change(s) in the training** from `{_md(d.old_name)}` "
             f"(plan fingerprint `{d.old_fingerprint}` \u2192 `{d.new_fingerprint}`)."]
    for heading, kinds in _SECTIONS:
        rows = [c for c in d.changes if c.kind in kinds]
        if not rows:
            continue
        lines += ["", f"#### {heading}", "", "| what | before | after |", "|---|---|---|"]
        lines += ["| " + " | ".join(_md(cell) for cell in _cells(c)) + " |" for c in rows]
    return "\n".join(lines) + "\n"


def render(d: PlanDiff, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(d.to_json(), indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(d)
    return render_text(d)
