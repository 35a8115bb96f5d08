"""FSDP2 wrap units: the repeated blocks of every tower, found in the module tree.

FSDP2 shards each wrap unit as one group: its parameters are gathered together before the
unit runs and freed after. The units mixspec plans are the blocks of every tower that has a
stack of them (the LLM's decoder layers, a ViT's blocks, an audio encoder's layers), found
the way the activation estimate finds them (mixspec.planning.activations.block_kinds: the numbered
children of a ModuleList that hold a norm and a Linear), never from a list of class names.
A unit is named by its class, as the Trainer's ``transformer_layer_cls_to_wrap`` wants it;
what is outside every block (embeddings, a ViT's patch embedding, the aligner, final norm,
lm_head) stays with accelerate's embedding, tail and root units.
"""

from __future__ import annotations

from .activations import block_kinds
from ..models.names import is_under

# roles that are single modules, never a stack of blocks
_NOT_TOWERS = ("embeddings", "lm_head")


def wrap_units(tree, roles: dict) -> tuple[dict, ...]:
    """One entry per (tower, stack, block class): role, prefix, class, indices and the largest
    block's parameter count, in the tree's order."""
    entries: dict[tuple, dict] = {}
    block_of: dict[str, dict] = {}  # block module name -> its entry
    for role, prefixes in roles.items():
        if role in _NOT_TOWERS or not prefixes:
            continue
        # a role nested in this one (Qwen2-VL's merger inside model.visual) keeps its own units
        nested = tuple(p for other, ps in roles.items() if other != role for p in ps
                       if is_under(p, tuple(prefixes)) and p not in prefixes)
        for kind in block_kinds(tree, tuple(prefixes), exclude=nested):
            for index in kind.indices:
                name = f"{kind.prefix}.{index}"
                cls = tree.by_name[name].type
                entry = entries.setdefault((kind.prefix, cls), {
                    "role": role, "prefix": kind.prefix, "class": cls, "indices": [], "params": 0})
                entry["indices"].append(index)
                block_of[name] = entry
    sizes: dict[str, int] = {}
    for param, count in tree.param_numel.items():
        if param in tree.tied:  # an alias of a tensor counted under its own name
            continue
        parts = param.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the innermost block holding it
            owner = ".".join(parts[:cut])
            if owner in block_of:
                sizes[owner] = sizes.get(owner, 0) + count
                break
    for name, entry in block_of.items():
        entry["params"] = max(entry["params"], sizes.get(name, 0))
    order = {m.name: i for i, m in enumerate(tree.modules)}
    out = sorted(entries.values(), key=lambda e: (order.get(f"{e['prefix']}.{e['indices'][0]}", 0), e["class"]))
    for entry in out:
        entry["indices"].sort()
    return tuple(out)


def wrap_classes(units) -> list[str]:
    """The block class names, each once, in the units' order."""
    return list(dict.fromkeys(u["class"] for u in units))
