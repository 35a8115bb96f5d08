"""What the LLaMA-Factory and axolotl importers share: reading a YAML config with every
key's location, typed reads that record problems instead of raising, and turning "these
parameters train fully, these modules get LoRA, at these learning rates" into spec
components that the resolver plans back to exactly that (checked, never assumed).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..errors import Location, Problem, SpecError
from ..models.names import natural_key
from ..models.registry import Roles, find_roles
from ..planning.resolve import covering
from ..language.spec import COMPONENT_NAME_PATTERN, ROLES
from ..targets.llamafactory import _show as show  # noqa: F401 (one name lister)
from ..models.tree import CONV1D_GPT2, LINEAR, ModuleTree

from . import Effect, Imported, Unmodelled

_MISSING = object()
_ROLE_ORDER = ("vision", "aligner", "language", "embeddings", "lm_head", "audio")


# -- reading the user's file ----------------------------------------------------------------

class Config:
    """A backend config as plain data, every key located; typed reads record problems."""

    def __init__(self, imported: Imported, path: str, text: str, located=None):
        from ..language.yamlloc import load_located_text

        self.out = imported
        self.path = path
        self.data: dict = {}
        self.located = None
        self.used: set[str] = set()
        if located is not None:  # already read (a command line's --key value pairs)
            self.located, self.data = located, located.data
            return
        try:
            located = load_located_text(text, path)
        except SpecError as exc:
            imported.problems.extend(exc.problems)
            return
        if located.data is None:
            imported.problems.append(Problem(Location(path, 1, 1), "", "the file is empty",
                                             "give the training config (a YAML mapping of keys)"))
            return
        if not isinstance(located.data, dict):
            imported.problems.append(Problem(located.value_loc(()), "",
                                             f"expected a YAML mapping of keys, got a {type(located.data).__name__}",
                                             "a training config is a mapping: `key: value` lines"))
            return
        self.located = located
        self.data = located.data

    @property
    def ok(self) -> bool:
        return self.located is not None

    def has(self, key: str) -> bool:
        return key in self.data

    def loc(self, key: str, *more) -> Location:
        if self.located is None:
            return Location(self.path)
        return self.located.loc((key, *more))

    def value_loc(self, key: str, *more) -> Location:
        if self.located is None:
            return Location(self.path)
        return self.located.value_loc((key, *more))

    def error(self, key: str, message: str, hint: str = "", value: bool = True) -> None:
        where = self.value_loc(key) if value and key in self.data else self.loc(key)
        self.out.problems.append(Problem(where, key, message, hint))

    def effect(self, key: str, code: str, message: str, fix: str) -> None:
        self.out.effects.append(Effect(code, self.loc(key) if key else Location(self.path), message, fix))

    def raw(self, key: str, default=_MISSING):
        self.used.add(key)
        return self.data.get(key, default)

    def get(self, key: str, kind: str, default=None, *, allow_none: bool = False):
        """The value of ``key`` as ``kind`` (bool, int, float, str, list_str), or ``default``
        when absent. A wrong type is a located problem and gives ``default``."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if value is None and allow_none:
            return None
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "list_str": isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        }[kind]
        if kind == "float" and isinstance(value, str):
            # the backends' argument parsers read "1e-4" as a float too
            try:
                return float(value)
            except ValueError:
                pass
        if not ok:
            words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                     "list_str": "a name or a list of names"}[kind]
            self.error(key, f"expected {words}, got {value!r}", f"write {key}: <{words}>")
            return default
        return float(value) if kind == "float" else value

    def unmodelled(self, key: str, note: str = "") -> None:
        self.used.add(key)
        self.out.unmodelled.append(Unmodelled(self.loc(key), key, note))

    def unknown_key(self, key: str, known: Iterable[str], backend: str) -> None:
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
        self.error(key, f"{backend} does not know this key and refuses the whole config",
                   f"did you mean {close[0]!r}?" if close else "remove it, or check the spelling against "
                   f"{backend}'s documentation", value=False)


def split_names(value) -> list[str]:
    """A comma-separated string or a list of names, as the backends split them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [item.strip() for item in value.split(",")]
    return [str(v).strip() for v in value]


def human(n: int) -> str:
    return f"{n:,}"


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f} GiB"


# -- the model --------------------------------------------------------------------------

def load_tree(cfg: Config, key: str, model: str):
    """The module tree and config.json of ``model`` (found as `plan` finds it); a missing
    model is a located problem and gives (None, None)."""
    from ..errors import ModelSourceError
    from ..models.sources import find_model
    from ..models.tree import get_tree

    try:
        source = find_model(model)
        return get_tree(source), source.config
    except ModelSourceError as exc:
        cfg.error(key, exc.message, exc.hint or "mixspec import reads the model's config.json the way "
                                 "`mixspec plan` does (catalog, local directory, Hugging Face or ModelScope cache)")
        return None, None


@dataclass
class Model:
    """A module tree with the lookups the importers need."""

    tree: ModuleTree
    roles: Roles = field(init=False)
    params: list[str] = field(init=False)  # every parameter name, tied aliases included
    modules: list[str] = field(init=False)

    def __post_init__(self):
        self.roles = find_roles(self.tree)
        self.params = sorted(self.tree.param_shapes, key=natural_key)
        self.modules = [m.name for m in self.tree.modules if m.name]
        role_at: dict[str, str] = {}
        for role, prefixes in self.roles.prefixes.items():
            for prefix in prefixes:
                role_at.setdefault(prefix, role)
        self._role_at = role_at

    def role_of(self, name: str) -> Optional[str]:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            role = self._role_at.get(".".join(parts[:i]))
            if role is not None:
                return role
        return None

    def params_under(self, module: str) -> list[str]:
        return [p for p in self.params if p.startswith(module + ".")]

    def numel(self, params: Iterable[str]) -> int:
        """Unique parameters (a tied pair once)."""
        canon = {self.tree.canonical(p) for p in params}
        return sum(self.tree.param_numel[p] for p in canon)

    def with_tied(self, params: set[str]) -> set[str]:
        """A set of trained parameters with the other names of tied tensors added: the
        backends see a tied pair once, under its first name."""
        out = set(params)
        for alias, canon in self.tree.tied.items():
            if canon in out or alias in out:
                out.update((alias, canon))
        return out


# -- from "what trains" to spec components ----------------------------------------------------

@dataclass
class Part:
    """One group of what a backend trains: fully trained parameters or LoRA modules at one LR."""

    label: str            # the backend's name for it (component name stem, groups entry)
    group: str            # how the backend names it in its own words (Imported.groups)
    mode: str             # "full" or "lora"
    lr: float
    names: set[str]       # parameter names (full) or module names (lora)
    lora: Optional[dict] = None  # rank, alpha, dropout, rslora, dora
    weight_decay: Optional[float] = None


def _escape(name: str) -> str:
    return re.escape(name)


def compact_regexes(names: Iterable[str]) -> list[str]:
    """Exact full-match regexes for a set of dotted names: names that differ in one numeric
    segment share one regex (``layers\\.(?:26|27)\\.mlp``)."""
    groups: dict[tuple, list[str]] = {}
    singles: list[str] = []
    for name in sorted(set(names), key=natural_key):
        parts = name.split(".")
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        if not idx:
            singles.append(_escape(name))
            continue
        last = idx[-1]
        key = (tuple(parts[:last]), tuple(parts[last + 1:]))
        groups.setdefault(key, []).append(parts[last])
    out = list(singles)
    for (head, tail), values in groups.items():
        values = sorted(set(values), key=int)
        middle = values[0] if len(values) == 1 else "(?:" + "|".join(values) + ")"
        out.append("\\.".join([*(_escape(h) for h in head), middle, *(_escape(t) for t in tail)]))
    return sorted(out, key=natural_key)


def _component_name(label: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", label).strip("_-") or "part"
    if not re.match(r"[A-Za-z_]", base):
        base = "p_" + base
    base = base[:56]
    if base in ROLES:
        base += "_part"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    assert re.match(COMPONENT_NAME_PATTERN, name)
    return name


def _leaf(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _members(model: Model, claim: set[str]) -> list:
    out = []
    for m in model.tree.modules:
        if not m.name or not m.params:
            continue
        if all(f"{m.name}.{local}" in claim for local in m.params):
            out.append(m)
    return out


_INT = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def lora_targets(model: Model, claim: set[str], wanted: set[str]):
    """Spec ``lora.targets`` (and ``layers``) that choose exactly ``wanted`` among the modules a
    component claims, as the resolver chooses: all-linear, a leaf-name list (with layers), or
    an exact regex."""
    members = _members(model, claim)
    linear = {m.name for m in members if m.kind in (LINEAR, CONV1D_GPT2) and m.name != model.tree.output_embedding}
    if linear == wanted:
        return "all-linear", None
    leaves = sorted({_leaf(m) for m in wanted}, key=natural_key)
    hit = {m.name for m in members if any(m.name == lf or m.name.endswith("." + lf) for lf in leaves)}
    if hit == wanted:
        return leaves, None
    layers = sorted({int(x.group(1)) for m in wanted if (x := _INT.search(m))})
    if layers and all(_INT.search(m) for m in wanted):
        narrowed = {m for m in hit if (x := _INT.search(m)) and int(x.group(1)) in layers}
        if narrowed == wanted:
            return leaves, layers
    regexes = compact_regexes(wanted)
    return ("|".join(f"(?:{r})" for r in regexes) if len(regexes) > 1 else regexes[0]), None


def build_components(model: Model, parts: list[Part], origin_of) -> tuple[dict, dict, dict]:
    """Spec components for ``parts`` (full ones first claim whole roles, the rest by exact
    module patterns), the groups map and the origins of each component's keys.
    ``origin_of(part, key)`` gives the origin of a component key ("lr", "train", "lora.rank", ...)."""
    components: dict[str, dict] = {}
    groups: dict[str, str] = {}
    origins: dict[str, object] = {}
    role_params: dict[str, set[str]] = {}
    for p in model.params:
        role = model.role_of(p)
        if role is not None:
            role_params.setdefault(role, set()).add(p)
    used_roles: set[str] = set()
    pattern_claimed: set[str] = set()

    def add(name: str, part: Part, body: dict) -> None:
        _add_component(components, groups, origins, origin_of, name, part, body)

    # full parts: whole roles where a role lies entirely inside one part, patterns for the rest
    for part in [p for p in parts if p.mode == "full"]:
        rest = set(part.names)
        for role in _ROLE_ORDER:
            members = role_params.get(role)
            if members and role not in used_roles and members <= part.names:
                add(role, part, _base_body(part))
                used_roles.add(role)
                rest -= members
        if rest:
            name = _component_name(part.label, set(components))
            body = {"modules": compact_regexes(covering(rest, model.params)), **_base_body(part)}
            add(name, part, body)
            pattern_claimed |= rest
    # LoRA parts: the first part with modules in a role takes the role; others get patterns.
    # Patterns beat roles, so every pattern's claim is known before a role's targets are chosen.
    role_jobs: list[tuple[Part, str, set[str]]] = []
    for part in [p for p in parts if p.mode == "lora"]:
        by_role: dict[Optional[str], set[str]] = {}
        for m in part.names:
            by_role.setdefault(model.role_of(m), set()).add(m)
        pattern_modules: set[str] = set()
        for role in sorted(by_role, key=lambda r: (r is None, _ROLE_ORDER.index(r) if r in _ROLE_ORDER else 99)):
            mods = by_role[role]
            if role is None or role in used_roles:
                pattern_modules |= mods
            else:
                role_jobs.append((part, role, mods))
                used_roles.add(role)
        if pattern_modules:
            name = _component_name(part.label, set(components) | {r for _, r, _ in role_jobs})
            claim = {p for m in pattern_modules for p in model.params if p.startswith(m + ".")}
            add(name, part, {"modules": compact_regexes(pattern_modules), **_base_body(part),
                             "lora": _lora_body(part, *lora_targets(model, claim, pattern_modules))})
            pattern_claimed |= claim
    for part, role, mods in role_jobs:
        claim = role_params[role] - pattern_claimed
        add(role, part, {**_base_body(part), "lora": _lora_body(part, *lora_targets(model, claim, mods))})
    return components, groups, origins


def _add_component(components: dict, groups: dict, origins: dict, origin_of, name: str, part: Part,
                   body: dict) -> None:
    """One component `name` with `body`, from `part` -> components, groups, and the origin of each of
    its keys (lora.* key by key, modules last)."""
    components[name] = body
    groups[name] = part.group
    for key in body:
        if key in ("modules",):
            continue
        if key == "lora":
            for sub in body["lora"]:
                origins[f"components.{name}.lora.{sub}"] = origin_of(part, f"lora.{sub}")
        else:
            origins[f"components.{name}.{key}"] = origin_of(part, key)
    if "modules" in body:
        origins[f"components.{name}.modules"] = origin_of(part, "modules")


def _base_body(part: Part) -> dict:
    """A part -> the keys every component of it has: train, lr, and weight_decay when set."""
    body = {"train": part.mode, "lr": part.lr}
    if part.weight_decay is not None:
        body["weight_decay"] = part.weight_decay
    return body


def _lora_body(part: Part, targets, layers) -> dict:
    lora = dict(part.lora or {})
    lora["targets"] = targets
    if layers is not None:
        lora["layers"] = layers
    return lora


def check_plan(plan, model: Model, parts: list[Part]) -> list[str]:
    """Differences between what the backend trains (``parts``) and the Plan of the spec built
    from them; empty when the spec trains exactly that."""
    want_full = {model.tree.canonical(p): part.lr for part in parts if part.mode == "full" for p in part.names}
    want_lora = {m: (part.lr, tuple(sorted((part.lora or {}).items())))
                 for part in parts if part.mode == "lora" for m in part.names}
    got_full = {p: c.lr for c in plan.components if c.mode == "full" for p in c.params}
    got_lora = {}
    for c in plan.components:
        if c.mode == "lora" and c.lora:
            opts = {"rank": c.lora.rank, "alpha": c.lora.alpha, "dropout": c.lora.dropout,
                    "rslora": c.lora.rslora, "dora": c.lora.dora}
            for m in c.lora.targets:
                got_lora[m] = (c.lr, opts)
    out = []
    if got_full != want_full:
        diff = sorted(set(got_full.items()) ^ set(want_full.items()))
        out.append(f"full parameters differ: {show([d[0] for d in diff])}")
    want_mods = {m: v[0] for m, v in want_lora.items()}
    got_mods = {m: v[0] for m, v in got_lora.items()}
    if got_mods != want_mods:
        diff = sorted(set(got_mods.items()) ^ set(want_mods.items()))
        out.append(f"LoRA modules differ: {show([d[0] for d in diff])}")
    for part in parts:
        if part.mode != "lora":
            continue
        for m in part.names:
            got = got_lora.get(m)
            if got is None:
                continue
            want = {k: (float(v) if k in ("alpha", "dropout") else v) for k, v in (part.lora or {}).items()}
            if {k: got[1][k] for k in want} != want:
                out.append(f"LoRA settings of {m} differ")
                break
    return out


def plan_imported(imported: Imported, model: Model, parts: list[Part], where: Location):
    """Plan the imported spec and check it trains exactly ``parts``; a problem otherwise.
    Returns the Plan (or None)."""
    from ..api import _load_dict
    from ..planning.resolve import plan_spec

    try:
        # named after the user's file: the Plan's header says what was imported
        plan = plan_spec(_load_dict(imported.spec, where.file))
    except SpecError as exc:
        for p in exc.problems:
            # point at the user's key the spec value came from, where there is one
            origin = imported.origins.get(p.path)
            at = origin if isinstance(origin, Location) else where
            imported.problems.append(Problem(at, p.path, f"the imported spec does not plan: {p.message}", p.hint))
        return None
    imported.plan = plan
    diffs = check_plan(plan, model, parts)
    if diffs:
        imported.plan = None
    for d in diffs:
        imported.problems.append(Problem(
            where, "", f"the spec language cannot say exactly what this config trains: {d}",
            "report this config to mixspec; meanwhile check `mixspec plan` of the imported spec by hand"))
    return plan


# -- what both YAML readers do the same way ----------------------------------------------------

def file_candidates(cfg: Config, value: str) -> list[str]:
    """Where a relative path in a config may point: from the working directory (where the
    backend is launched), then from the config's own directory."""
    bases = [os.getcwd()]
    if not cfg.path.startswith("<"):
        bases.append(os.path.dirname(os.path.abspath(cfg.path)))
    return [os.path.join(base, os.path.expanduser(value)) for base in bases]


DEEPSPEED_NOT_HERE = ("the DeepSpeed JSON is not here (looked from the working directory and the config's "
                      "directory): the spec leaves zero_stage out, so its memory plan is without ZeRO sharding; "
                      "import where the backend runs, or set distributed.zero_stage by hand")


def find_file(candidates) -> Optional[str]:
    return next((c for c in candidates if os.path.isfile(c)), None)


def read_json(path: str):
    """The JSON object in ``path`` (the first MiB), or the reason it cannot be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.loads(fh.read(1 << 20))
    except (OSError, ValueError) as exc:
        return str(exc)


def zero_settings(ds) -> "dict | str":
    """zero_stage and offload of a DeepSpeed config (a mapping), or what is wrong with it."""
    if not isinstance(ds, dict):
        return "expected the path of a DeepSpeed JSON file (a JSON object)"
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        return f"the DeepSpeed config has zero_optimization.stage {stage!r}"

    def offloaded(key):
        node = zero.get(key)
        return isinstance(node, dict) and node.get("device") in ("cpu", "nvme")
    return {"zero_stage": stage,
            "offload": "all" if offloaded("offload_param") else "optimizer" if offloaded("offload_optimizer")
            else "none"}


class BaseReader:
    """A backend reader's shared steps; subclasses read their own keys."""

    launcher = "the backend"

    def __init__(self, cfg: Config, out: Imported):
        self.cfg = cfg
        self.out = out
        self.parts: list[Part] = []

    def src(self, key: str, default_text: str):
        """Where a value came from: the key in the user's file, or the default that decided."""
        return self.cfg.loc(key) if self.cfg.has(key) else default_text

    def put(self, training: dict, key: str, value, origin) -> None:
        training[key] = value
        self.out.origins[f"training.{key}"] = origin

    def read(self, training: dict, key: str, cfg_key: str, kind: str, default, default_text: str) -> None:
        """training[key] = the config's ``cfg_key`` (of ``kind``), or ``default``; its origin the
        key's line, or ``default_text`` (the default that decided)."""
        self.put(training, key, self.cfg.get(cfg_key, kind, default), self.src(cfg_key, default_text))

    def adam_settings(self, training: dict) -> None:
        """AdamW betas and epsilon the config sets (the spec's defaults, torch's 0.9 / 0.999 /
        1e-8, are these backends' defaults too)."""
        for key in ("adam_beta1", "adam_beta2", "adam_epsilon"):
            value = self.cfg.get(key, "float", None, allow_none=True)
            if value is not None:
                self.put(training, key, value, self.cfg.loc(key))

    def deepspeed(self, by_name) -> dict:
        """zero_stage and offload from the config's ``deepspeed`` (a JSON file or an inline
        mapping). ``by_name(path)`` reads a file that is not here by the backend's own file
        names (its bundled configs), or returns None. A file that is not here changes only the
        memory: listed as not modelled, the spec planned without ZeRO."""
        cfg, o = self.cfg, self.out.origins
        o["distributed.gpus_per_node"] = (f"not in the config ({self.launcher} decides); the spec plans "
                                          "1 node x 1 GPU: set distributed in it")
        if not cfg.has("deepspeed") or cfg.raw("deepspeed") is None:  # `deepspeed:` left empty: none
            return {}
        value = cfg.raw("deepspeed")
        where = cfg.loc("deepspeed")
        ds = value if isinstance(value, dict) else None
        if isinstance(value, str):
            found = find_file(file_candidates(cfg, value))
            if found is None:
                known = by_name(value)
                if known is not None:
                    for k in known:
                        o[f"distributed.{k}"] = f"{where}: {value} is not here; read by its name"
                    return known
                cfg.unmodelled("deepspeed", DEEPSPEED_NOT_HERE)
                return {}
            ds = read_json(found)
            if isinstance(ds, str):
                cfg.error("deepspeed", f"cannot read the DeepSpeed config {value}: {ds}", "give a readable JSON file")
                return {}
        got = zero_settings(ds)
        if isinstance(got, str):
            cfg.error("deepspeed", got, "deepspeed: path/to/ds_config.json with zero_optimization.stage 0-3")
            return {}
        o["distributed.zero_stage"] = o["distributed.offload"] = where
        return got

    def assemble(self, model_key: str, model: str, sections: dict, where_key: str, nothing_hint: str):
        """The spec from ``self.parts`` and the other ``sections`` (training, distributed, data,
        output_dir; empty ones left out), planned and checked; a located problem when the config
        trains nothing or the spec does not plan it exactly. Returns the Plan or None."""
        cfg = self.cfg
        where = cfg.loc(where_key) if cfg.has(where_key) else Location(cfg.path)
        if any(p.severity == "error" for p in self.out.problems):
            return None
        if not self.parts:
            self.out.problems.append(Problem(where, where_key, "this config trains no parameter of the model",
                                             nothing_hint))
            return None
        components, groups, origins = build_components(self.model, self.parts, self.origin_of)
        spec = {"version": 1, "model": model, "components": components}
        spec.update((k, v) for k, v in sections.items() if v)
        self.out.spec = spec
        self.out.groups.update(groups)
        self.out.origins["model"] = cfg.loc(model_key)
        self.out.origins.update(origins)
        plan = plan_imported(self.out, self.model, self.parts, where)
        quant = getattr(self, "quantization", None)
        if plan is not None and quant is not None:
            plan = quantize_imported(self.out, self.model.tree, plan, quant,
                                     lambda: plan_imported(self.out, self.model, self.parts, quant.where))
        return plan

    def decay_effects(self, plan, who: str) -> None:
        """The backend decides which parameters decay by transformers' rule (torch LayerNorm
        modules, bias/norm names); say where that differs from the Plan's rule."""
        from ..planning.decay import transformers_rule_differs

        layernorm = frozenset(plan.layernorm_modules)
        for c in plan.components:
            if c.mode == "freeze" or not c.weight_decay:
                continue
            differ = transformers_rule_differs(c, layernorm)
            if differ:
                self.cfg.effect("weight_decay", "weight-decay-rule",
                                f"{who} decays by transformers' rule (torch LayerNorm modules and bias/norm names "
                                f"exempt), which also decays {len(differ)} parameters of component {c.name!r} that "
                                f"mixspec's rule exempts: {show(differ, 3)}",
                                "the spec's plan exempts them (norms, 1-D parameters); set weight_decay: 0 for "
                                "no difference")

    def finish_unmodelled(self, note_for=lambda key: "") -> None:
        """List every key nothing read (never silently ignored)."""
        for key in self.cfg.data:
            if key not in self.cfg.used:
                self.cfg.unmodelled(key, note_for(key))


def read_config(backend: str, rules: str, reader, text: str, path: str, located=None) -> Imported:
    """Parse ``text`` (or take ``located``, its keys already read) and run
    ``reader(cfg, imported).run()`` when it is a mapping."""
    out = Imported(backend=backend, rules=rules, spec={})
    cfg = Config(out, path, text, located)
    if cfg.ok:
        reader(cfg, out).run()
    return out


# transformers' TrainingArguments.optim names (axolotl's optimizer, LLaMA-Factory's optim,
# ms-swift's --optim) -> the spec's training.optimizer, where the optimizer is the same one:
# transformers builds bitsandbytes' AdamW with optim_bits 8 for "8bit" names and is_paged for
# "paged" ones (trainer_optimizer.py _get_bitsandbytes_optimizer), as train.py does
HF_OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw_apex_fused": "adamw",
    "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw",
    # transformers builds torchao.optim.AdamW8bit / AdamW4bit for these, as train.py does
    "adamw_torch_8bit": "adamw_torch_8bit", "adamw_torch_4bit": "adamw_torch_4bit",
}


def spec_optimizer(name: str) -> tuple[Optional[str], str]:
    """(the spec's training.optimizer for a transformers optim name, or None; why not)."""
    if name in HF_OPTIMIZERS:
        return HF_OPTIMIZERS[name], ""
    return None, "mixspec plans AdamW: torch's, bitsandbytes' 8-bit / paged, or torchao's 8-bit / 4-bit"


OPTIMIZER_HINT = ("use adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit, adamw_torch_8bit or "
                  "adamw_torch_4bit")



@dataclass(frozen=True)
class BackendQuantization:
    """How a backend loads its base with bitsandbytes: the method and options, where the
    config says so, and the module names its BitsAndBytesConfig skips (None: transformers'
    default, i.e. the output embedding, tied weights and the module of the last parameter)."""

    method: str  # nf4 | fp4 | int8
    double_quant: bool
    where: Location
    skip: Optional[tuple[str, ...]] = None


def quantize_imported(imported: Imported, tree, plan, quant: BackendQuantization, replan):
    """Give the imported spec's components the backend's quantization: each frozen or LoRA
    component holds its share of the modules the backend quantizes, a frozen component claims
    the unassigned ones; a fully trained module the backend quantizes, or a Plan that does not
    quantize exactly the backend's modules, is a located problem. ``replan()`` plans the spec
    again (or records its problems and returns None). Returns the Plan or None."""
    from ..planning.quantize import bnb_replaced

    wanted = bnb_replaced(tree, quant.skip)
    if not wanted:
        return plan
    options = {} if quant.method == "int8" else {"quantize_options": {"double_quant": quant.double_quant}}
    full = sorted(m for c in plan.components if c.mode == "full" for m in wanted
                  if any(p.startswith(m + ".") for p in c.params))
    if full:
        imported.problems.append(Problem(
            quant.where, "", f"the backend quantizes {len(full)} module(s) this config trains fully "
            f"({show(full, 3)}): bitsandbytes weights cannot be trained",
            "freeze them or train them with LoRA, or skip them from quantization"))
        imported.plan = None
        return None
    spec = imported.spec
    for c in plan.components:
        if any(p.rsplit(".", 1)[0] in wanted for p in c.params):
            spec["components"][c.name].update(quantize=quant.method, **options)
            imported.origins[f"components.{c.name}.quantize"] = quant.where
    held = [m for m in plan.unassigned_modules
            if any(w == m or w.startswith(m + ".") or m.startswith(w + ".") for w in wanted)]
    if held:
        spec["components"]["quantized_base"] = {"train": "freeze", "modules": [re.escape(m) for m in held],
                                                "quantize": quant.method, **options}
        imported.origins["components.quantized_base"] = quant.where
    imported.plan = None
    plan = replan()
    if plan is None:
        return None
    planned = {m for c in plan.components if c.quantize for m in c.quantize.modules}
    if planned != wanted:
        more, fewer = sorted(wanted - planned), sorted(planned - wanted)
        imported.problems.append(Problem(
            quant.where, "", "the spec language cannot quantize exactly the backend's modules: "
            + "; ".join(x for x in (f"the backend also quantizes {show(more, 3)}" if more else "",
                                    f"the spec would also quantize {show(fewer, 3)}" if fewer else "") if x),
            "report this config to mixspec"))
        imported.plan = None
        return None
    return plan
