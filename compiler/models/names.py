"""Helpers over dotted module/parameter names, shared by the passes and the targets.

``natural_key``, ``ranges``, ``compact_names``, ``expand_names`` (with ``INDEX``),
``names_sha256`` and ``fingerprint`` are also the helpers of the programs mixspec generates:
train.py and the swift plugin get their source inlined (``mixspec.programs.helpers_source``),
so they are written once. They use nothing but ``re`` and ``hashlib``.
"""

from __future__ import annotations

import hashlib
import re

INDEX = re.compile(r"^(?:0|[1-9][0-9]*)$")


def natural_key(name: str) -> tuple:
    """Sort 'blocks.2' before 'blocks.10' (numeric segments compare as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def ranges(values, sep: str = ",") -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (``sep`` between the runs)."""
    values = sorted(set(values))
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return sep.join(out)


def compact_names(names) -> dict:
    """Names grouped by template: ``{"a.{}.b": "0-27"}``; each numeric segment becomes ``{}``.

    The inverse is ``expand_names``. A template with several numeric segments lists its
    index tuples as ``"0.0-7,1.0-7"`` (all but the last index dotted, the last as ranges).
    Names that contain a brace, or no numeric segment, are kept verbatim (indices ``""``).
    """
    groups, out = {}, {}
    for name in names:
        parts = name.split(".")
        idx = [int(p) for p in parts if INDEX.match(p)]
        if "{" in name or "}" in name or not idx:
            out[name] = ""
            continue
        template = ".".join("{}" if INDEX.match(p) else p for p in parts)
        groups.setdefault(template, {}).setdefault(tuple(idx[:-1]), []).append(idx[-1])
    for template, by_head in groups.items():
        items = []
        for head in sorted(by_head):
            prefix = "".join(f"{h}." for h in head)
            items.extend(prefix + r for r in ranges(by_head[head]).split(","))
        out[template] = ",".join(items)
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def expand_names(compact) -> set:
    """The exact set of names a ``compact_names`` mapping stands for."""
    names = set()
    for template, indices in compact.items():
        if not indices:
            names.add(template)
            continue
        pieces = template.split("{}")
        for item in indices.split(","):
            *head, last = item.split(".")
            lo, _, hi = last.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                values = [*head, str(i)]
                names.add("".join(p + (values[k] if k < len(values) else "") for k, p in enumerate(pieces)))
    return names


def names_sha256(names) -> str:
    """The self-check's hash of a set of names: sha256 of the sorted names, one a line."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()


def fingerprint(lrs, wds) -> str:
    """The Plan's fingerprint: a short hash of every trained parameter's name, learning rate
    and weight decay (``NAME=LR wd=WD`` lines, sorted by name). mixspec computes it from the
    Plan; train.py and the swift plugin recompute it from the optimizer they built."""
    text = "\n".join(f"{name}={lr!r} wd={wds.get(name)!r}" for name, lr in sorted(lrs.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_under(name: str, prefixes) -> bool:
    """Whether a dotted name is one of ``prefixes`` (a name or an iterable of names) or lies
    under one of them (dot-bounded: 'model.visual' covers 'model.visual.blocks', not
    'model.visual_extra')."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def shallowest(names) -> tuple[str, ...]:
    """Drop names nested under another name of the same collection; natural order."""
    kept: set[str] = set()
    for name in sorted(set(names), key=lambda n: (n.count("."), n)):
        # look up each dotted prefix (a few) rather than scan every kept name (quadratic)
        parts = name.split(".")
        if not any(".".join(parts[:i]) in kept for i in range(1, len(parts))):
            kept.add(name)
    return tuple(sorted(kept, key=natural_key))
