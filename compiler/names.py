"""Helpers over dotted module/parameter names, shared by the passes and the targets."""

from __future__ import annotations


def natural_key(name: str) -> tuple:
    """Sort 'blocks.2' before 'blocks.10' (numeric segments compare as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def shallowest(names) -> tuple[str, ...]:
    """Drop names nested under another name of the same collection; natural order."""
    kept: set[str] = set()
    for name in sorted(set(names), key=lambda n: (n.count("."), n)):
        # look up each dotted prefix (a few) rather than scan every kept name (quadratic)
        parts = name.split(".")
        if not any(".".join(parts[:i]) in kept for i in range(1, len(parts))):
            kept.add(name)
    return tuple(sorted(kept, key=natural_key))
