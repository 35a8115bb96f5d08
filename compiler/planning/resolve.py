"""resolve(spec, tree) -> Plan: every parameter to exactly one component, or unassigned.

Precedence, deterministic and explainable:
1. a component with ``modules:`` patterns claims what its patterns match (a module with
   everything under it, or a single parameter); two pattern components claiming the same
   parameter is an error naming the modules;
2. a role component claims its role's parameters that no pattern component claimed;
3. the rest is "unassigned": frozen, and listed.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..language import patterns
from .activations import model_structure
from .units import wrap_units
from .decay import adapter_no_decay, no_decay_reason, torch_layernorm_modules
from ..errors import Diagnostics, Location, ModelSourceError, Problem, SpecError, quoted
from ..language.loader import LoadedSpec
from ..models.names import natural_key, ranges, shallowest
from .plan import ComponentPlan, LoraPlan, Plan, QuantPlan, Totals
from .quantize import bnb_replaced, quantizable_modules, skip_modules
from ..models.registry import Roles, find_roles
from ..language.settings import settings_from_spec
from ..models.tree import CONV, CONV1D_GPT2, EMBEDDING, LINEAR, LORA_KINDS, ModuleTree

if TYPE_CHECKING:
    from ..language.spec import LoraComponent

_INT_SEGMENT = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Claim:
    component: str
    why: str


def load_tree_for(loaded: LoadedSpec, use_cache: bool = True):
    """The module tree of the spec's model; a missing or unsafe model is a located error."""
    tree, _ = _tree_and_source(loaded, use_cache)
    return tree


def _tree_and_source(loaded: LoadedSpec, use_cache: bool):
    from ..models.sources import find_model
    from ..models.tree import get_tree

    spec = loaded.spec
    base_dir = Path(loaded.path).parent if loaded.path and not loaded.path.startswith("<") else None
    try:
        source = find_model(spec.model, base_dir=base_dir)
        if spec.trust_remote_code and "auto_map" in source.config and not remote_code_allowed():
            # a spec (perhaps from a pull request) may ask; only the operator may allow it
            raise SpecError([Problem(
                loaded.loc("trust_remote_code"), "trust_remote_code",
                f"the spec asks to run Python code from the model repo of {spec.model!r} (auto_map), "
                "and mixspec runs such code only with the operator's consent",
                "pass --trust-remote-code to mixspec (e.g. mixspec --trust-remote-code plan SPEC) "
                "or set MIXSPEC_TRUST_REMOTE_CODE=1, if you trust that code",
            )])
        tree = get_tree(source, trust_remote_code=spec.trust_remote_code, use_cache=use_cache)
    except ModelSourceError as exc:
        raise SpecError([Problem(loaded.value_loc("model"), "model", exc.message, exc.hint)]) from None
    return tree, source


def remote_code_allowed() -> bool:
    """Whoever runs mixspec consented to running model-repo code (--trust-remote-code)."""
    import os

    return os.environ.get("MIXSPEC_TRUST_REMOTE_CODE") == "1"


def plan_spec(loaded: LoadedSpec, use_cache: bool = True) -> Plan:
    """Load the spec's model tree (cached) and resolve the spec against it."""
    tree, source = _tree_and_source(loaded, use_cache)
    return resolve(loaded, tree, model_source=source.kind, model_path=source.path)


def resolve(loaded: LoadedSpec, tree: ModuleTree, model_source: str = "tree",
            model_path: str = "") -> Plan:
    """Resolve a validated spec against a module tree. Raises SpecError with every problem."""
    return _Resolver(loaded, tree).run(model_source, model_path)


def explain(loaded: LoadedSpec, tree: ModuleTree, name: str) -> list[tuple[str, Claim | None]]:
    """For a module or parameter name: each parameter under it and the rule that claimed it."""
    resolver = _Resolver(loaded, tree)
    claims = resolver.claim_params()
    names = [p for p in tree.param_shapes if p == name or p.startswith(name + ".")]
    return [(p, claims.get(p)) for p in sorted(names)]


def claims(loaded: LoadedSpec, tree: ModuleTree) -> dict[str, Claim]:
    """Every claimed parameter -> the component and rule that claimed it (what explain says)."""
    return _Resolver(loaded, tree).claim_params()


class _Resolver:
    def __init__(self, loaded: LoadedSpec, tree: ModuleTree):
        self.loaded = loaded
        self.spec = loaded.spec
        self.tree = tree
        self.roles: Roles = find_roles(tree)
        self.diags = Diagnostics()
        self.param_names = list(tree.param_shapes)  # aliases of tied weights included
        self.module_names = [m.name for m in tree.modules if m.name]

    def loc(self, *path) -> Location:
        return self.loaded.loc(*path)

    # -- claiming ---------------------------------------------------------------------
    def claim_params(self) -> dict[str, Claim]:
        claims: dict[str, Claim] = {}
        conflicts: dict[tuple[str, str], list[str]] = defaultdict(list)
        for cname, comp in self.spec.components.items():
            if comp.modules is None:
                continue
            for i, pattern in enumerate(comp.modules):
                try:
                    regex = patterns.compile_pattern(pattern)
                except patterns.PatternError:
                    continue  # reported by the loader
                matched_modules = [m for m in self.module_names if regex.fullmatch(m)]
                matched_params = [p for p in self.param_names if regex.fullmatch(p)]
                if not matched_modules and not matched_params:
                    self.diags.error(
                        self.loaded.value_loc("components", cname, "modules", i),
                        f"components.{cname}.modules[{i}]",
                        f"pattern {quoted(pattern)} matches no module or parameter of {self.tree.architecture}",
                        self._pattern_hint(pattern),
                    )
                    continue
                prefixes = shallowest(matched_modules)
                hit = set(matched_params)
                for prefix in prefixes:
                    hit.update(_under(self.param_names, prefix))
                for p in hit:
                    prev = claims.get(p)
                    why = f"pattern {quoted(pattern)} (components.{cname}.modules[{i}])"
                    if prev is not None and prev.component != cname:
                        conflicts[(prev.component, cname)].append(p)
                    elif prev is None:
                        claims[p] = Claim(cname, why)
        for (a, b), params in sorted(conflicts.items()):
            mods = covering(set(params), self.param_names)  # whole blocks, not their leaves
            shown = ", ".join(mods[:5]) + (f" and {len(mods) - 5} more" if len(mods) > 5 else "")
            self.diags.error(
                self.loc("components", b, "modules"), f"components.{b}.modules",
                f"claims {len(params)} parameters that component {a!r} also claims, in: {shown}",
                "pattern components must be disjoint; narrow one of the patterns",
            )
        for cname, comp in self.spec.components.items():
            if comp.modules is not None:
                continue
            role = cname
            prefixes = self.roles.prefixes.get(role)
            if not prefixes:
                found = ", ".join(f"{r} ({', '.join(p)})" for r, p in sorted(self.roles.prefixes.items()))
                self.diags.error(
                    self.loc("components", cname), f"components.{cname}",
                    f"{self.tree.architecture} ({self.tree.model_type}) has no {role!r} role",
                    f"roles found in this model: {found or 'none'}; select modules with a pattern component instead",
                )
                continue
            role_of = self._role_of_params()
            for p in self.param_names:
                if p in claims:
                    continue
                if role_of[p] == role:
                    owner = next(pre for pre in prefixes if p == pre or p.startswith(pre + "."))
                    claims[p] = Claim(cname, f"role {role!r} (module {owner})")
        return claims

    def _role_of_params(self) -> dict[str, str | None]:
        """Every parameter's role, computed once per resolve (not once per role component)."""
        if not hasattr(self, "_param_roles"):
            # Roles.role_of (the longest matching prefix) looked up by walking each name's
            # own prefixes, longest first; the first role listing a prefix keeps it
            role_at: dict[str, str] = {}
            for role, prefixes in self.roles.prefixes.items():
                for prefix in prefixes:
                    role_at.setdefault(prefix, role)
            _, prefixes_of, _ = _prefix_table(tuple(self.param_names))
            roles = {}
            for p in self.param_names:
                role = role_at.get(p)
                if role is None:
                    for prefix in reversed(prefixes_of[p]):
                        role = role_at.get(prefix)
                        if role is not None:
                            break
                roles[p] = role
            self._param_roles = roles
        return self._param_roles

    def _pattern_hint(self, pattern: str) -> str:
        import difflib

        # difflib over every module name costs ~0.1 s; a few suggestions are enough
        self._close_hints = getattr(self, "_close_hints", 0) + 1
        if self._close_hints > 3:
            return "patterns are full-matched against module names; list them with: mixspec tree MODEL"
        close = difflib.get_close_matches(pattern.replace("\\", ""), self.module_names, n=2, cutoff=0.5)
        if close:
            return "module names look like: " + ", ".join(close) + " (mixspec tree MODEL lists them)"
        return "patterns are full-matched against module names; list them with: mixspec tree MODEL"

    # -- LoRA targets ------------------------------------------------------------------
    def lora_plan(self, cname: str, comp: LoraComponent, claimed: set[str]) -> LoraPlan | None:
        """A LoRA component and the params it claims -> its LoraPlan (None when no target is left;
        each problem is reported to self.diags)."""
        opts = comp.lora
        members = self._lora_members(claimed)
        targets_spec = opts.targets
        found = self._lora_targets(cname, targets_spec, members)
        if found is None:
            return None
        chosen, chosen_by = found
        chosen = self._drop_unwrappable(cname, chosen, chosen_by, members)
        chosen, layers = self._lora_layers(cname, opts, chosen)
        self._check_lora_kinds(cname, opts, chosen)
        if not chosen:
            return None
        chosen = sorted({m.name: m for m in chosen}.values(), key=lambda m: m.name)
        sizes = _lora_sizes(chosen, opts.rank, opts.dora)
        names = sorted(sizes)
        added = sum(sizes.values())
        return LoraPlan(
            rank=opts.rank, alpha=float(opts.alpha), dropout=float(opts.dropout), rslora=opts.rslora,
            dora=opts.dora, targets=tuple(m.name for m in chosen),
            target_kinds=tuple(m.kind for m in chosen), param_names=tuple(names),
            added_params=added, param_sizes=tuple(sizes[n] for n in names),
            targets_spec=list(targets_spec) if isinstance(targets_spec, list) else targets_spec,
            layers=layers,
        )

    def _lora_members(self, claimed: set[str]) -> list:
        """The claimed params -> the modules all of whose own params are claimed (LoRA's candidates)."""
        members = []
        for m in self.tree.modules:
            if not m.name or not m.params:
                continue
            names = [f"{m.name}.{local}" for local in m.params]
            if all(n in claimed for n in names):
                members.append(m)
        return members

    def _lora_targets(self, cname: str, targets_spec, members: list):
        """lora.targets (all-linear, a list of leaf names, or a regex) -> (chosen modules, module ->
        index of the list item that chose it), or None when nothing can be planned."""
        path = ("components", cname, "lora")
        chosen = []
        chosen_by: dict[str, int] = {}  # module -> index of the targets item that chose it
        if targets_spec == "all-linear":
            chosen = [m for m in members if m.kind in (LINEAR, CONV1D_GPT2)
                      and m.name != self.tree.output_embedding]
            if not chosen:
                out_emb = self.tree.output_embedding
                if any(m.name == out_emb for m in members):
                    self.diags.error(self.loc(*path, "targets"), f"components.{cname}.lora.targets",
                                     f"all-linear never includes the output embedding ({out_emb}), "
                                     "and this component has no other Linear module",
                                     f"to put LoRA on it, name it: targets: [{out_emb.rsplit('.', 1)[-1]}]")
                else:
                    self.diags.error(self.loc(*path, "targets"), f"components.{cname}.lora.targets",
                                     "all-linear finds no Linear module in this component",
                                     "train it with full, or name its modules in targets; LoRA-capable "
                                     "leaf names here: " + _lora_leaves(members))
                return None
        elif isinstance(targets_spec, list):
            for i, leaf in enumerate(targets_spec):
                hits = [m for m in members if m.name == leaf or m.name.endswith("." + leaf)]
                if not hits:
                    self.diags.error(
                        self.loaded.value_loc(*path, "targets", i), f"components.{cname}.lora.targets[{i}]",
                        f"no module named {leaf!r} in component {cname!r}",
                        "LoRA-capable leaf names here: " + _lora_leaves(members),
                    )
                for m in hits:
                    chosen_by.setdefault(m.name, i)
                chosen.extend(hits)
        else:
            try:
                regex = patterns.compile_pattern(targets_spec)
            except patterns.PatternError:
                return None
            chosen = [m for m in members if regex.fullmatch(m.name)]
            if not chosen:
                self.diags.error(self.loaded.value_loc(*path, "targets"), f"components.{cname}.lora.targets",
                                 f"regex {quoted(targets_spec)} matches no module of component {cname!r}",
                                 "the regex is full-matched against module names (mixspec tree MODEL)")
        return chosen, chosen_by

    def _drop_unwrappable(self, cname: str, chosen: list, chosen_by: dict, members: list) -> list:
        """The chosen modules -> those PEFT can wrap; the others reported, by targets item and type."""
        path = ("components", cname, "lora")
        bad: dict[tuple, list[str]] = defaultdict(list)
        for m in chosen:
            if m.kind not in LORA_KINDS:
                bad[(chosen_by.get(m.name), m.type)].append(m.name)
        for (item, type_), names in sorted(bad.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
            key = ("targets",) if item is None else ("targets", item)
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            self.diags.error(
                self.loaded.value_loc(*path, *key),
                f"components.{cname}.lora.targets" + ("" if item is None else f"[{item}]"),
                f"LoRA cannot wrap {type_} modules: {names[0]}{more}",
                "PEFT wraps Linear, Embedding and Conv layers only; LoRA-capable leaf names here: "
                + _lora_leaves(members),
            )
        return [m for m in chosen if m.kind in LORA_KINDS]

    def _lora_layers(self, cname: str, opts, chosen: list) -> tuple[list, tuple | None]:
        """lora.layers -> (the chosen modules in those blocks, the block indices or None); blocks
        that do not exist, or that hold no target, are reported."""
        path = ("components", cname, "lora")
        layers = None
        if opts.layers is not None and chosen:  # no targets at all is already reported
            layers = tuple(sorted(set(opts.layers))) if isinstance(opts.layers, list) else patterns.parse_layers(opts.layers)
            available = sorted({int(x.group(1)) for m in chosen if (x := _INT_SEGMENT.search(m.name))})
            chosen = [m for m in chosen if (x := _INT_SEGMENT.search(m.name)) and int(x.group(1)) in layers]
            missing = [i for i in layers if i not in available]
            if available and missing:
                self.diags.error(self.loaded.value_loc(*path, "layers"), f"components.{cname}.lora.layers",
                                 f"block(s) {ranges(missing, ', ')} do not exist among the LoRA targets of "
                                 f"component {cname!r}",
                                 f"its targets lie in blocks {ranges(available, ', ')}")
            elif not chosen:
                shown = f"{available[0]}-{available[-1]}" if available else "none"
                self.diags.error(self.loc(*path, "layers"), f"components.{cname}.lora.layers",
                                 f"no LoRA target lies in blocks {opts.layers!r}",
                                 f"block indices of this component's targets: {shown}")
        return chosen, layers

    def _check_lora_kinds(self, cname: str, opts, chosen: list) -> None:
        """Reports DoRA on a non-Linear target and LoRA on a grouped convolution."""
        path = ("components", cname, "lora")
        if opts.dora:
            for m in chosen:
                if m.kind != LINEAR:
                    self.diags.error(self.loc(*path, "dora"), f"components.{cname}.lora.dora",
                                     f"DoRA on {m.name} ({m.type}): mixspec plans DoRA on Linear layers only",
                                     "drop dora or narrow targets to Linear modules")
                    break
        for m in chosen:
            if m.kind == CONV and m.groups != 1:
                self.diags.error(self.loc(*path, "targets"), f"components.{cname}.lora.targets",
                                 f"LoRA on grouped convolution {m.name} is not supported")

    def quant_plan(self, cname: str, comp, claimed: set[str]) -> QuantPlan | None:
        """The Linear modules bitsandbytes holds quantized for a component with ``quantize``."""
        if getattr(comp, "quantize", None) is None or not claimed:
            return None
        modules = quantizable_modules(self.tree, claimed)
        if not modules:
            self.diags.error(
                self.loaded.value_loc("components", cname, "quantize"), f"components.{cname}.quantize",
                f"component {cname!r} has no Linear module bitsandbytes can quantize (the output "
                "embedding and tied weights stay 16-bit, and only plain nn.Linear is replaced)",
                "remove quantize from this component")
            return None
        opts = comp.quantize_options
        return QuantPlan(
            method=comp.quantize, double_quant=opts.double_quant if opts else True,
            compute_dtype=(opts.compute_dtype if opts and opts.compute_dtype else self.spec.training.precision),
            modules=tuple(m.name for m in modules),
            shapes=tuple((m.out_features, m.in_features) for m in modules))

    def _check_one_quant_config(self, components) -> None:
        """transformers loads a model with one BitsAndBytesConfig: one method and options for all."""
        quantized = [c for c in components if c.quantize]
        first = quantized[0] if quantized else None
        for c in quantized[1:]:
            a, b = first.quantize, c.quantize
            if (a.method, a.double_quant, a.compute_dtype) != (b.method, b.double_quant, b.compute_dtype):
                self.diags.error(
                    self.loc("components", c.name, "quantize"), f"components.{c.name}.quantize",
                    f"{c.name!r} is quantized {_quant_words(b)} and {first.name!r} {_quant_words(a)}: "
                    "bitsandbytes loads a model with one quantization config",
                    f"give {c.name!r} the same quantize and quantize_options as {first.name!r}")

    def _no_decay(self, mode: str, params: list[str], lora: LoraPlan | None) -> tuple[tuple[str, ...], int]:
        """The trained parameters exempt from weight decay (mixspec.planning.decay), and their count."""
        if mode == "full":
            names = [p for p in params if no_decay_reason(self.tree, p) is not None]
            return tuple(names), sum(self.tree.param_numel[p] for p in names)
        if mode == "lora" and lora is not None:
            names = [n for n in lora.param_names if adapter_no_decay(n)]
            # a DoRA magnitude vector has one value per output feature of its module
            count = sum(self.tree.by_name[n.split(".lora_magnitude_vector.")[0]].out_features for n in names)
            return tuple(names), count
        return (), 0

    def _tied_hint(self, unclaimed_param: str, where: str, ca: str, cc: str) -> str:
        """How to train a tied pair one way. 'unassigned' is no component anyone can
        configure: name the role that holds the other half and show the line to add."""
        if "unassigned" not in (ca, cc):
            return f"give {ca!r} and {cc!r} the same train mode and lr, or leave both frozen"
        comp = self.spec.components[where]
        role = _role_of(self.roles, unclaimed_param)
        if comp.train == "full" and role is not None and role not in self.spec.components:
            return (f"{unclaimed_param} is the {role!r} role: add `{role}: {{train: full, lr: {_yaml_number(comp.lr)}}}` "
                    f"under components (the same train mode and lr as {where!r}), or freeze {where!r}")
        return (f"{unclaimed_param} is claimed by no component: claim it with the same train mode and lr "
                f"as {where!r} (a component with modules: ['{re.escape(unclaimed_param)}']), or freeze {where!r}")

    def _warn_lora_on_tied(self, cname: str, lora: LoraPlan) -> None:
        """A LoRA adapter sits on one module: on a tied weight, the other side never sees it."""
        for target in lora.targets:
            for local in self.tree.by_name[target].params:
                partner = _tied_partner(self.tree, f"{target}.{local}")
                if partner is None:
                    continue
                self.diags.warn(
                    self.loc("components", cname, "lora"), f"components.{cname}.lora.targets",
                    f"LoRA on {target}, whose {local} is tied to {partner}: the adapter changes "
                    f"{target} only, {partner.rsplit('.', 1)[0]} keeps the frozen shared weight",
                    "to train both sides as one tensor, train embeddings and lm_head full with the same lr",
                )

    # -- the whole pass ----------------------------------------------------------------
    def run(self, model_source: str, model_path: str) -> Plan:
        """The spec and the model tree -> the Plan (every error raised at once, warnings kept)."""
        self._warn_guessed_roles()
        claims = self.claim_params()
        by_comp: dict[str, set[str]] = defaultdict(set)
        for p, claim in claims.items():
            by_comp[claim.component].add(p)
        self._check_tied(claims)
        components = []
        for cname, comp in self.spec.components.items():
            components.append(self._component_plan(cname, comp, by_comp.get(cname, set())))
            if components[-1].lora:
                self._warn_lora_on_tied(cname, components[-1].lora)
        self._check_one_quant_config(components)
        self.diags.raise_if_errors()
        if not any(c.trainable_params for c in components):
            # compile refuses such a plan; say so before anyone gets that far
            self.diags.warn(self.loc("components"), "components",
                            "the spec trains nothing: every component is frozen or claims no parameter",
                            "set train: full or lora (with an lr) on at least one component")
        return self._plan(components, claims, model_source, model_path)

    def _warn_guessed_roles(self) -> None:
        """Warns when role components rest on roles guessed from module names (no verified role map)."""
        if self.roles.guessed and any(c.modules is None for c in self.spec.components.values()):
            self.diags.warn(
                self.loaded.value_loc("model"), "model",
                f"mixspec has no verified role map for model_type {self.tree.model_type!r}; roles were "
                f"guessed from module names: " + "; ".join(f"{r}={','.join(p)}" for r, p in sorted(self.roles.prefixes.items())),
                "check them with: mixspec tree MODEL, or select modules with patterns",
            )

    def _check_tied(self, claims: dict[str, Claim]) -> None:
        """Reports a tied weight whose names are trained differently (a tied weight is one tensor:
        every name of it must be trained the same way)."""
        def treatment(param: str):
            claim = claims.get(param)
            if claim is None:
                return ("frozen", None)
            comp = self.spec.components[claim.component]
            return ("full", comp.lr) if comp.train == "full" else ("frozen", None)

        for alias, canon in sorted(self.tree.tied.items()):
            ta, tc = treatment(alias), treatment(canon)
            if ta != tc:
                ca = claims.get(alias).component if alias in claims else "unassigned"
                cc = claims.get(canon).component if canon in claims else "unassigned"
                where = ca if ca != "unassigned" else cc
                self.diags.error(
                    self.loc("components", where), f"components.{where}",
                    f"{alias} and {canon} are one tied tensor, but {ca!r} and {cc!r} train it differently "
                    f"({_treat(ta)} vs {_treat(tc)})",
                    self._tied_hint(alias if ca == "unassigned" else canon, where, ca, cc),
                )

    def _component_plan(self, cname: str, comp, claimed: set[str]) -> ComponentPlan:
        """One spec component and the params it claims -> its ComponentPlan (LoRA and quantization
        planned; a role component left with nothing is warned about)."""
        tree = self.tree
        canon_claimed = sorted(p for p in claimed if p not in tree.tied)
        base = sum(tree.param_numel[p] for p in canon_claimed)
        if not claimed and comp.modules is None and cname in self.roles.prefixes:
            self.diags.warn(self.loc("components", cname), f"components.{cname}",
                            "claims no parameter: pattern components took all of its role",
                            "remove it or narrow the patterns")
        lora = None
        trainable = 0
        if comp.train == "full":
            trainable = base
        elif comp.train == "lora" and claimed:
            lora = self.lora_plan(cname, comp, claimed)
            trainable = lora.added_params if lora else 0
        wd = getattr(comp, "weight_decay", None)
        quant = self.quant_plan(cname, comp, claimed)
        no_decay, no_decay_params = self._no_decay(comp.train, canon_claimed, lora)
        return ComponentPlan(
            name=cname, mode=comp.train, lr=getattr(comp, "lr", None),
            weight_decay=float(wd if wd is not None else self.spec.training.weight_decay),
            selector="modules" if comp.modules is not None else "role",
            role=None if comp.modules is not None else cname,
            patterns=tuple(comp.modules or ()),
            origin=self.loc("components", cname),
            modules=covering(claimed, self.param_names),
            params=tuple(canon_claimed), base_params=base, trainable_params=trainable, lora=lora,
            no_decay=no_decay, no_decay_params=no_decay_params, quantize=quant,
        )

    def _plan(self, components: list[ComponentPlan], claims: dict[str, Claim], model_source: str,
              model_path: str) -> Plan:
        """The component plans and the claims -> the Plan, with totals, settings and the model's facts."""
        tree = self.tree
        numel = tree.param_numel
        unassigned = sorted(p for p in self.param_names if p not in claims and p not in tree.tied)
        total = tree.total_params
        added = sum(c.lora.added_params for c in components if c.lora)
        trainable = sum(c.trainable_params for c in components)
        trained_base = {p for c in components if c.mode == "full" for p in c.params}
        spec = self.spec
        training, distributed, data = settings_from_spec(spec)
        return Plan(
            spec_path=self.loaded.path, model=spec.model, model_source=model_source,
            model_path=model_path, model_type=tree.model_type, architecture=tree.architecture,
            versions=dict(tree.versions),
            roles={r: tuple(p) for r, p in self.roles.prefixes.items()},
            components=tuple(components),
            unassigned_params=tuple(unassigned),
            unassigned_base_params=sum(numel[p] for p in unassigned),
            unassigned_modules=covering(set(unassigned), self.param_names),
            tied=dict(tree.tied),
            totals=Totals(base_params=total, added_params=added, trainable_params=trainable),
            training=training, distributed=distributed, data=data,
            output_dir=spec.output_dir,
            param_shapes={p: tuple(tree.param_shapes[p]) for p in sorted(trained_base)},
            layernorm_modules=torch_layernorm_modules(tree),
            warnings_problems=tuple(self.diags.warnings) + tuple(self.loaded.warnings),
            trust_remote_code=bool(spec.trust_remote_code),
            structure=model_structure(tree, self.roles.prefixes),
            units=wrap_units(tree, self.roles.prefixes),
            quant_skip_modules=_quant_skip(tree, components),
            quant_is_default=_quantized(components) == bnb_replaced(tree) if _quantized(components) else False,
        )


def _quantized(components) -> set[str]:
    return {m for c in components if c.quantize for m in c.quantize.modules}


def _quant_skip(tree: ModuleTree, components) -> tuple[str, ...]:
    quantized = _quantized(components)
    return skip_modules(tree, quantized) if quantized else ()


def _quant_words(q: QuantPlan) -> str:
    if q.method == "int8":
        return "int8"
    return f"{q.method} (double_quant {str(q.double_quant).lower()}, compute_dtype {q.compute_dtype})"


def _yaml_number(value: float) -> str:
    """A number as a spec writes it (1.0e-5: YAML reads 1e-05 as a string under 1.1 rules)."""
    text = f"{value:.6g}"
    if "e" in text:
        mantissa, exp = text.split("e")
        text = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{int(exp)}"
    return text


def _role_of(roles, param: str) -> str | None:
    """The role whose (longest) prefix holds a parameter, if any."""
    best = None
    for role, prefixes in roles.prefixes.items():
        for prefix in prefixes:
            if param == prefix or param.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (role, prefix)
    return best[0] if best else None


def _tied_partner(tree: ModuleTree, param: str) -> str | None:
    if param in tree.tied:
        return tree.tied[param]
    return next((alias for alias, canon in sorted(tree.tied.items()) if canon == param), None)


def _lora_sizes(chosen: list, r: int, dora: bool) -> dict[str, int]:
    """The LoRA target modules, rank r -> each adapter tensor PEFT adds (its state-dict name) -> numel."""
    sizes: dict[str, int] = {}
    for m in chosen:
        if m.kind in (LINEAR, CONV1D_GPT2):
            sizes[f"{m.name}.lora_A.default.weight"] = r * m.in_features
            sizes[f"{m.name}.lora_B.default.weight"] = r * m.out_features
            if dora:
                sizes[f"{m.name}.lora_magnitude_vector.default.weight"] = m.out_features
        elif m.kind == EMBEDDING:
            sizes[f"{m.name}.lora_embedding_A.default"] = r * m.in_features
            sizes[f"{m.name}.lora_embedding_B.default"] = r * m.out_features
        elif m.kind == CONV:
            k = 1
            for d in m.kernel:
                k *= d
            sizes[f"{m.name}.lora_A.default.weight"] = r * m.in_features * k
            sizes[f"{m.name}.lora_B.default.weight"] = m.out_features * r
    return sizes


def _lora_leaves(members) -> str:
    """LoRA-capable leaf names of a component, as a targets list accepts them ('mlp.0', not '0')."""
    leaves = set()
    for m in members:
        if m.kind in LORA_KINDS:
            parts = m.name.split(".")
            leaves.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    shown = sorted(leaves, key=natural_key)
    return ", ".join(shown[:20]) + (f" and {len(shown) - 20} more" if len(shown) > 20 else "") if shown else "none"


def _treat(t) -> str:
    return f"full at lr {t[1]}" if t[0] == "full" else "frozen"


def _under(names: list[str], prefix: str) -> list[str]:
    dotted = prefix + "."
    return [n for n in names if n.startswith(dotted)]


def covering(claimed: set[str], all_params: list[str]) -> tuple[str, ...]:
    """The fewest module names (or single parameters) that cover exactly ``claimed``, given every
    parameter name (the Plan's ``modules`` and the LLaMA-Factory target's messages use it)."""
    if not claimed:
        return ()
    table, prefixes_of, known = _prefix_table(tuple(all_params))
    # a module covers only claimed parameters unless an unclaimed one lies under it
    dirty: set[str] = set()
    for p, prefixes in table:
        if p not in claimed:
            dirty.update(prefixes)
    out = set()
    for p in claimed:
        top = p
        prefixes = prefixes_of.get(p)
        if prefixes is None:  # not a parameter of the tree: only known modules may cover it
            prefixes = tuple(pre for pre in _dotted_prefixes(p) if pre in known)
        for prefix in prefixes:
            if prefix not in dirty:
                top = prefix
                break
        out.add(top)
    return tuple(sorted(out, key=natural_key))


def _dotted_prefixes(name: str) -> tuple[str, ...]:
    """'a.b.c' -> ('a', 'a.b'), shortest first."""
    out = []
    i = name.find(".")
    while i != -1:
        out.append(name[:i])
        i = name.find(".", i + 1)
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _prefix_table(all_params: tuple[str, ...]):
    """Each parameter's dotted prefixes, once per tree (`validate` resolves many specs
    against one tree, each asking for the covering of several components)."""
    table = [(p, _dotted_prefixes(p)) for p in all_params]
    known: set[str] = set()
    for _, prefixes in table:
        known.update(prefixes)
    return table, dict(table), frozenset(known)
