"""Human-readable output of plans, explanations and trees (rich tables on stdout)."""

from __future__ import annotations

from ..planning.estimate import GIB, Estimate
from ..planning.plan import Plan
from ..models.tree import ModuleTree


def _console():
    import os
    import shutil

    from rich.console import Console

    import sys

    # COLUMNS, else the terminal's own width; output to a pipe or file: 140 (log lines stay whole)
    width = int(os.environ.get("COLUMNS", 0)) or (shutil.get_terminal_size((140, 24)).columns
                                                  if sys.stdout.isatty() else 140)
    return Console(highlight=False, soft_wrap=False, width=max(width, 40))


NARROW = 110  # below this width the plan table leaves out "covers" and lists it under the table


def _n(value: int) -> str:
    return f"{value:,}"


def _widest(plan: Plan, col: str) -> int:
    """The widest cell of a numeric plan-table column (its header included)."""
    total = plan.totals.base_params
    cells = {"lr": [_lr(c.lr) for c in plan.components] + ["-"],
             "params": [_n(c.base_params) for c in plan.components] + [_n(plan.unassigned_base_params)],
             "trainable": [_n(c.trainable_params) for c in plan.components] + ["0"],
             "share": [_pct(c.base_params, total) for c in plan.components]
             + [_pct(plan.unassigned_base_params, total)]}[col]
    return max(len(col), *(len(x) for x in cells))


def _lr(value) -> str:
    return "-" if value is None else f"{value:g}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def print_plan(plan: Plan, est: Estimate, show_modules: bool = False, groups: dict | None = None,
               at_data: dict | None = None) -> None:
    """The plan table, totals and memory. ``groups``: component -> a backend's name for it
    (mixspec import), shown under the component's name; ``at_data``: the peak at the data's
    longest micro-batch (mixspec.data.datacheck.data_estimate)."""
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{plan.spec_path}[/bold]: {plan.model} ({plan.architecture}, "
                  f"{plan.model_source}; transformers {plan.versions.get('transformers')})")
    table = Table(show_lines=False)
    narrow = console.width < NARROW
    for col, just in (("component", "left"), ("mode", "left"), ("lr", "right"), ("params", "right"),
                      ("trainable", "right"), ("share", "right")) + ((("covers", "left"),) if not narrow else ()):
        # numbers are never cut nor wrapped: their columns keep their widest cell
        table.add_column(col, justify=just, no_wrap=just == "right", overflow="fold",
                         min_width=_widest(plan, col) if just == "right" else None)
    covers_lines = []
    total = plan.totals.base_params
    for comp in plan.components:
        mode = comp.mode
        if comp.lora:
            lo = comp.lora
            mode = (f"lora r{lo.rank} a{lo.alpha:g}" + (f" d{lo.dropout:g}" if lo.dropout else "")
                    + (" rslora" if lo.rslora else "") + (" dora" if lo.dora else "")
                    + f" ({len(lo.targets)} modules)")
        if comp.quantize:  # the base weights bitsandbytes holds, under the training mode
            mode += f"\n{comp.quantize.method} base ({len(comp.quantize.modules)} Linear)"
        covers = ", ".join(comp.modules) if show_modules or len(comp.modules) <= 3 else (
            ", ".join(comp.modules[:2]) + f", ... ({len(comp.modules)} modules)")
        if not comp.modules:
            covers = "(nothing)"
        elif comp.role and not show_modules and len(comp.modules) > 3:
            covers = f"role {comp.role} ({', '.join(plan.roles.get(comp.role, ()))}), {len(comp.modules)} modules"
        through = _trained_through_partner(plan, comp)
        if through:
            covers += f" ({through})"
        name = f"{comp.name}\n({groups[comp.name]})" if groups and comp.name in groups else comp.name
        row = [name, mode, _lr(comp.lr), _n(comp.base_params), _n(comp.trainable_params),
               _pct(comp.base_params, total)]
        table.add_row(*row, *([] if narrow else [covers]))
        covers_lines.append((comp.name, covers))
    unassigned = plan.unassigned_modules
    covers = (", ".join(unassigned) if len(unassigned) <= 4 or show_modules
              else ", ".join(unassigned[:3]) + f", ... ({len(unassigned)})")
    table.add_row("unassigned", "frozen", "-", _n(plan.unassigned_base_params), "0",
                  _pct(plan.unassigned_base_params, total), *([] if narrow else [covers]))
    covers_lines.append(("unassigned", covers))
    console.print(table)
    if narrow:  # the column a narrow terminal has no room for, one line (or more) each
        console.print("covers:")
        for name, covers in covers_lines:
            console.print(f"  {name}: {covers}", markup=False)
    t = plan.totals
    console.print(f"base params {_n(t.base_params)}  |  added (LoRA) {_n(t.added_params)}  |  "
                  f"trainable {_n(t.trainable_params)} ({_pct(t.trainable_params, t.base_params + t.added_params)} of all)")
    _print_weight_decay(console, plan, show_modules)
    print_memory(console, plan, est)
    if at_data is not None and est.activations:
        from ..data.datacheck import data_estimate_text

        console.print("  " + data_estimate_text(at_data, est), markup=False, soft_wrap=True)


_TERM_LABELS = {
    "vision_blocks": "vision blocks", "aligner": "aligner", "llm_blocks": "LLM blocks", "final_norm": "final norm",
    "loss": "loss (fp32 log-softmax)", "logits_gradient": "logits gradient", "llm_block_recompute":
    "one LLM block recomputed", "vision_block_recompute": "one vision block recomputed",
}


def print_memory(console, plan: Plan, est: Estimate) -> None:
    """Model states, activations, transient, ZeRO-3 live parameters, overhead: the peak per GPU."""
    stage = est.engine
    precision = plan.training.precision
    console.print(
        f"memory per GPU ({est.world_size} GPU{'s' if est.world_size > 1 else ''}, {stage}, offload {est.offload}, "
        f"{precision}): weights {est.weights_bytes / GIB:.2f} GiB + gradients "
        f"{est.gradients_bytes / GIB:.2f} GiB + optimizer {est.optimizer_bytes / GIB:.2f} GiB = "
        f"model states {est.total_bytes / GIB:.2f} GiB"
    )
    if est.policy is not None:
        console.print(f"  {est.policy.describe()}", markup=False)
    a = est.assumptions
    if a.get("model_states"):  # quantized base or a bitsandbytes optimizer: what was assumed
        console.print("  model states: " + "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in a["model_states"].items()))
    if est.activations or est.transient:
        acts = " + ".join(f"{_TERM_LABELS.get(k, k)} {v / GIB:.2f}" for k, v in est.activations.items())
        largest = max(est.transient, key=est.transient.get) if est.transient else None
        console.print(f"  activations {est.activation_bytes / GIB:.2f} GiB ({acts or 'none'})")
        if largest:
            console.print(f"  transient {est.transient_bytes / GIB:.2f} GiB (the largest: {_TERM_LABELS.get(largest, largest)})")
        if est.zero3_live_bytes:
            what = "FSDP2" if est.fsdp else "ZeRO-3"
            console.print(f"  {what} gathered parameters {est.zero3_live_bytes / GIB:.2f} GiB")
        console.print(f"  overhead {est.overhead_bytes / GIB:.2f} GiB (CUDA context, NCCL, allocator: a stated constant)")
        console.print(f"  [bold]peak {est.peak_bytes / GIB:.2f} GiB[/bold] per GPU")
        vision = (f", {a['vision_tokens_per_image']} vision tokens per image ({a['vision_tokens_how']}) x "
                  f"{a['images_per_sample']} per sample" if "vision_tokens_per_image" in a else "")
        console.print(f"  assuming {a['micro_batch_size']} x {a['max_length']} tokens per GPU{vision}, attention "
                      f"{a['attention']}, gradient checkpointing {'on' if a['gradient_checkpointing'] else 'off'}")
    elif a.get("activations"):
        console.print(f"  activations {a['activations']}")
    if est.cpu_bytes_per_node:
        console.print(f"CPU memory per node for offload: {est.cpu_bytes_per_node / GIB:.2f} GiB")
    if est.gpu_memory_gb and est.peak_bytes > est.gpu_memory_gb * 1e9:
        from ..planning.fit import fit

        best = fit(plan, est.gpu_memory_gb, est.policy.target if est.policy is not None else None).best
        advice = (f"it fits with {best.describe()} (peak {best.estimate.peak_bytes / GIB:.2f} GiB; "
                  f"mixspec fit SPEC shows the spec lines)" if best else "no setting mixspec fit searches makes it fit")
        console.print(f"[yellow]warning[/yellow]: the estimated peak ({est.peak_bytes / GIB:.2f} GiB) exceeds "
                      f"gpu_memory_gb ({est.gpu_memory_gb:g} GB): {advice}")


def _trained_through_partner(plan: Plan, comp) -> str:
    """For a component whose parameters are tied aliases (lm_head tied to the input
    embedding): where the one shared tensor is counted, so `0` does not read as untrained."""
    aliases = [a for a in plan.tied for m in comp.modules if a == m or a.startswith(m + ".")]
    if not aliases or comp.mode == "freeze":
        return ""
    notes = []
    for alias in sorted(set(aliases)):
        canon = plan.tied[alias]
        owner = next((c.name for c in plan.components if canon in c.params), None)
        notes.append(f"tied to {canon}" + (f", trained and counted in {owner!r}" if owner else ""))
    return "; ".join(notes)


def _component_setting(plan: Plan | None, spec, component: str, params: list[str]) -> str:
    """A component's mode, LR and LoRA settings (rank, alpha, targets as written), and
    which of the given parameters' modules get LoRA (from the Plan, when it resolves)."""
    comp = spec.components.get(component) if spec is not None else None
    if comp is None:
        return ""
    text = f"mode {comp.train}"
    if getattr(comp, "lr", None) is not None:
        text += f", lr {comp.lr:g}"
    lora = getattr(comp, "lora", None)
    if comp.train == "lora" and lora is not None:
        targets = lora.targets if isinstance(lora.targets, str) else "[" + ", ".join(lora.targets) + "]"
        text += f", LoRA rank {lora.rank} alpha {lora.alpha:g} targets {targets}"
        if lora.layers is not None:
            text += f" layers {lora.layers}"
        planned = next((c for c in plan.components if c.name == component), None) if plan else None
        if planned is not None and planned.lora is not None:
            hit = [t for t in planned.lora.targets if any(p.startswith(t + ".") for p in params)]
            text += f"; LoRA on {len(hit)} module(s) here" + (f": {', '.join(hit[:4])}" if hit else "")
            if len(hit) > 4:
                text += f" and {len(hit) - 4} more"
    return text


def print_explain(name: str, rows, tree: ModuleTree, plan: Plan | None = None, spec=None,
                  partner_claims: dict | None = None) -> None:
    """Each group of parameters under ``name``: the component that claimed it, the rule,
    and how that component trains (mode, LR, LoRA); a tied tensor names its partner."""
    console = _console()
    claim_of = {param: claim for param, claim in rows}
    claim_of.update(partner_claims or {})
    groups: dict[tuple, list[str]] = {}
    for param, claim in rows:
        key = (claim.component, f"by {claim.why}") if claim else ("unassigned", "no pattern or role claims it (frozen)")
        groups.setdefault(key, []).append(param)
    for (component, why), params in groups.items():
        numel = sum(tree.param_numel[p] for p in params if p not in tree.tied)
        console.print(f"{name}: {len(params)} parameter tensor(s), {_n(numel)} params -> "
                      f"[bold]{component}[/bold]: {why}", markup=True)
        setting = _component_setting(plan, spec, component, params)
        if setting:
            console.print(f"  {setting}", markup=False)
        for p in params[:8]:
            console.print(f"  {p}", markup=False)
        if len(params) > 8:
            console.print(f"  ... and {len(params) - 8} more")
        for p in params:
            partner = tree.tied.get(p) or next((a for a, c in sorted(tree.tied.items()) if c == p), None)
            if partner is not None:
                claim = claim_of.get(partner)
                console.print(f"  note: {p} is tied to {partner} (one tensor), which "
                              + (f"component {claim.component!r} claims" if claim else "no component claims"),
                              markup=False)


def _subtree_sizes(tree: ModuleTree) -> dict[str, int]:
    """Parameters under each module name (a tied alias counted once, at its first name)."""
    sizes: dict[str, int] = {}
    for p, n in tree.param_numel.items():
        if p in tree.tied:
            continue
        parts = p.split(".")
        for i in range(0, len(parts)):
            prefix = ".".join(parts[:i])
            sizes[prefix] = sizes.get(prefix, 0) + n
    return sizes


def tree_json(tree: ModuleTree) -> dict:
    """`mixspec tree --json`: the model and every module with its type, parameters and role."""
    from ..models.registry import find_roles

    roles = find_roles(tree)
    role_at = {pre: role for role, pres in roles.prefixes.items() for pre in pres}
    sizes = _subtree_sizes(tree)
    return {"architecture": tree.architecture, "model_type": tree.model_type, "params": tree.total_params,
            "roles": {role: list(pres) for role, pres in roles.prefixes.items()}, "roles_guessed": roles.guessed,
            "tied": dict(tree.tied),
            "modules": [{"name": m.name, "type": m.type, "params": sizes.get(m.name, 0), "role": role_at.get(m.name)}
                        for m in tree.modules if m.name]}


def print_tree(tree: ModuleTree, depth: int) -> None:
    from ..models.registry import find_roles

    console = _console()
    roles = find_roles(tree)
    sizes = _subtree_sizes(tree)
    console.print(f"{tree.architecture} ({tree.model_type}): {_n(tree.total_params)} params"
                  + ("  [yellow](roles guessed)[/yellow]" if roles.guessed else ""))
    role_at = {pre: role for role, pres in roles.prefixes.items() for pre in pres}
    hidden: str | None = None  # the collapsed block whose children are skipped too
    for m in tree.modules:
        if not m.name:
            continue
        if hidden is not None and m.name.startswith(hidden + "."):
            continue
        level = m.name.count(".") + 1
        if level > depth:
            continue
        # collapse long runs of numbered blocks: show the first and the last only
        last = m.name.rsplit(".", 1)[-1]
        if last.isdigit():
            parent = m.name.rsplit(".", 1)[0]
            siblings = [x for x in tree.by_name if x.startswith(parent + ".") and x.count(".") == m.name.count(".")]
            if len(siblings) > 2 and m.name not in (siblings[0], siblings[-1]):
                if m.name == siblings[1]:
                    console.print("  " * level + f"... ({len(siblings) - 2} more)")
                hidden = m.name
                continue
        role = f"  [cyan]<{role_at[m.name]}>[/cyan]" if m.name in role_at else ""
        tied = [a for a in tree.tied if a.startswith(m.name + ".")]
        note = f"  (tied: {', '.join(tree.tied[a] for a in tied)})" if tied else ""
        console.print("  " * level + f"{m.name.rsplit('.', 1)[-1]} [dim]{m.type}[/dim] {_n(sizes.get(m.name, 0))}{role}{note}")


def _print_weight_decay(console, plan: Plan, show_modules: bool) -> None:
    """Per trained component: how many parameters decay and how many are exempt (biases,
    norms, 1-D); with --modules, the exempt names. Silent when no weight decay is set."""
    trained = [c for c in plan.components if c.trainable_names]
    if not show_modules and not any(c.weight_decay for c in trained):
        return
    for comp in trained:
        decay = comp.trainable_params - comp.no_decay_params
        console.print(f"weight decay {comp.name}: {comp.weight_decay:g} on {_n(decay)} params "
                      f"({len(comp.decay_names)} tensors); none on {_n(comp.no_decay_params)} params "
                      f"({len(comp.no_decay)} tensors: biases, norms, 1-D)", highlight=False)
        if show_modules and comp.no_decay:
            from ..models.names import compact_names

            for template, indices in compact_names(comp.no_decay).items():
                console.print(f"  no decay: {template}" + (f"  [{indices}]" if indices else ""),
                              highlight=False, markup=False)
