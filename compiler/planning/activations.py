"""Activation memory: the bytes autograd keeps for the backward pass, per GPU, from the tree's
real dimensions and the Plan's trainable set.

The model follows what PyTorch saves for each op of a transformer block as transformers
writes it (measured op by op with ``torch.autograd.graph.saved_tensors_hooks``; the
benchmark ``benchmarks/activation_check.py`` compares every term with such a count on
real-width layers). Per token of a block, with p bytes per activation element (2 for
bf16/fp16, 4 for fp32):

- RMSNorm-style norms (any norm that is not a torch LayerNorm: transformers upcasts to fp32):
  the fp32 input (4 d) and the reciprocal RMS (4), plus the p-byte normalised input when the
  norm's weight trains; torch LayerNorm: its input (p d) and mean/rstd (8).
- A Linear saves its input (p in) only when its weight trains; linears that read the same
  input (q/k/v, gate/up) share it. A LoRA adapter saves that input as well (dropout 0) or
  its own dropped-out copy plus the dropout mask (p in + in), and the rank-r middle (p r).
- Attention (sdpa / flash): the rotated q, k, v, the output and the log-sum-exp
  (4 bytes per head); the output projection reads the output without a copy. Eager
  attention also keeps the probabilities: p x heads x sequence per token.
- Gated MLP: the gate output (SiLU's input), SiLU's output and the up output (the product's
  operands); the product itself when the down projection trains. Plain MLP (fc1, GELU, fc2):
  GELU's input, and its output when fc2 trains.
- Nothing is saved in a block no gradient passes through: no trainable parameter in it or
  anywhere before it (towers and layers below the first trained one).
- Gradient checkpointing (per block, as transformers applies it): each block keeps its input
  (p h) and one block's activations exist at a time during the recompute.
- The loss: transformers upcasts the logits to fp32; cross-entropy keeps its log-softmax
  (4 x vocab per token); the logits' gradient (fp32, then p bytes) is transient at the start
  of the backward pass.

What is not modelled is stated with the result: fused kernels other than sdpa/flash, DoRA's
extra norm, model-specific extras (rotary tables are counted once; Mllama's cross-attention
states are counted as the vision tokens they come from).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

from ..models.names import is_under


# leaf names of linears that read the same input inside one block
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv", "qkv_proj", "query", "key", "value", "in_proj", "Wqkv",
            "query_key_value", "c_attn"}
_ATTN_OUT = {"o_proj", "out_proj", "proj", "dense", "c_proj", "o"}
_MLP_IN = {"gate_proj", "up_proj", "fc1", "w1", "w3", "gate_up_proj", "linear_fc1", "c_fc"}
_BLOCK = re.compile(r"^(.*)\.(0|[1-9][0-9]*)$")
_ACTIVATION = re.compile(r"GELU|SiLU|Silu|ReLU|Tanh|Sigmoid|Activation|Swish|Mish", re.IGNORECASE)
# activations that keep two tensors (x * sigmoid(a x) keeps x and the sigmoid)
_TWO_TENSOR_ACTIVATIONS = ("QuickGELU",)
_Q_NORMS = ("q_norm", "query_norm", "q_layernorm")
_K_NORMS = ("k_norm", "key_norm", "k_layernorm")


@dataclass(frozen=True)
class Linear:
    name: str  # relative to the block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BlockKind:
    """The blocks of one stack that share a structure (an LLM's decoder layers, a ViT's blocks)."""

    prefix: str  # e.g. "model.language_model.layers"
    indices: tuple[int, ...]
    linears: tuple[Linear, ...]
    norms: tuple[tuple[str, str, int, str], ...]  # (relative name, "layernorm" | "norm", dim, class name)
    hidden: int
    activation: str = ""  # class name of the MLP's activation module ("" when it is a function)
    gates: tuple[str, ...] = ()  # the block's own parameters (scalar gates on the residual stream)
    # transformers checkpoints the block (its class is a GradientCheckpointingLayer); Mllama's
    # vision layers are not, and keep everything under gradient checkpointing too
    checkpointed: bool = True

    def to_json(self) -> dict:
        return {"prefix": self.prefix, "indices": list(self.indices), "hidden": self.hidden,
                "linears": [[l.name, l.in_features, l.out_features] for l in self.linears],
                "norms": [list(n) for n in self.norms], "activation": self.activation, "gates": list(self.gates),
                "checkpointed": self.checkpointed}

    @staticmethod
    def from_json(data: dict) -> "BlockKind":
        return BlockKind(data["prefix"], tuple(data["indices"]), tuple(Linear(*l) for l in data["linears"]),
                         tuple(tuple(n) for n in data["norms"]), data["hidden"], data.get("activation", ""),
                         tuple(data.get("gates", ())), data.get("checkpointed", True))


def _checkpointed(class_name: str, model_type: str = "") -> bool:
    """Whether transformers checkpoints a block of this class: it derives from
    GradientCheckpointingLayer. Read from the model type's modeling source (no import: a warm
    plan does not load torch); a class defined elsewhere (LLaVA's CLIP layers) is assumed so."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if not model_type or spec is None or not spec.submodule_search_locations:
        return True
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / model_type / f"modeling_{model_type}.py"
    try:
        source = path.read_text(encoding="utf-8")
    except OSError:
        return True
    match = re.search(rf"^class {re.escape(class_name)}\(([^)]*)\)", source, re.MULTILINE)
    return match is None or "GradientCheckpointingLayer" in match.group(1)


def block_kinds(tree, prefixes, exclude=()) -> tuple[BlockKind, ...]:
    """The repeated blocks under a role's prefixes (minus ``exclude``): the numbered children
    of every ModuleList whose entries are blocks themselves (they hold a norm and a Linear,
    unlike a Sequential of layers, and are not inside another block), stack after stack in the
    model's order (Mllama's ViT: its 32 layers, then its 8 gated global layers), grouped by
    structure (Mllama's cross-attention layers apart from the self-attention ones)."""
    def ancestors(names):
        out = set()
        for name in names:
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts)))
        return out

    holders = ancestors(m.name for m in tree.modules if m.norm) & ancestors(
        m.name for m in tree.modules if m.kind == "linear")
    lists: dict[str, set[int]] = {}
    for m in tree.modules:
        if not is_under(m.name, prefixes) or m.name in prefixes:
            continue
        if is_under(m.name, exclude):
            continue
        match = _BLOCK.match(m.name)
        if match and m.name in holders:
            lists.setdefault(match.group(1), set()).add(int(match.group(2)))
    # a list inside a block of another list is part of that block
    stacks = [k for k in lists if not any(k.startswith(f"{o}.{i}.") for o in lists for i in lists[o] if o != k)]
    stacks = [k for k in stacks if len(lists[k]) > 1]
    out = []
    params_of = {m.name: m.params for m in tree.modules}
    for stack in stacks:  # in the tree's (registration) order
        kinds: dict[tuple, list[int]] = {}
        # each block's modules, in tree order, in one pass over the tree (not one per block)
        head = stack + "."
        members: dict[str, list] = {str(i): [] for i in lists[stack]}
        for m in tree.modules:
            if m.name.startswith(head):
                index, dot, rel = m.name[len(head):].partition(".")
                if dot and index in members:
                    members[index].append((rel, m))
        for index in sorted(lists[stack]):
            linears, norms, acts = [], [], []
            for rel, m in members[str(index)]:
                if m.kind == "linear" and m.in_features:
                    linears.append(Linear(rel, m.in_features, m.out_features))
                elif m.norm:
                    dim = next(iter(m.params.values()), (0,))
                    norms.append((rel, m.norm, int(dim[0]) if dim else 0, m.type))
                elif _ACTIVATION.search(m.type) and not m.params:
                    acts.append(m.type)
            # the block's own parameters (Mllama's tanh gates): each scales the residual stream
            gates = tuple(sorted(n for n, shape in (params_of.get(f"{stack}.{index}") or {}).items()))
            key = (tuple(linears), tuple(norms), acts[0] if acts else "", gates)
            kinds.setdefault(key, []).append(index)
        by_name = tree.by_name
        for (linears, norms, act, gates), indices in kinds.items():
            hidden = max((n[2] for n in norms), default=0) or max((l.in_features for l in linears), default=0)
            block = by_name.get(f"{stack}.{indices[0]}")
            out.append(BlockKind(stack, tuple(indices), linears, norms, hidden, act, gates,
                                 _checkpointed(block.type, getattr(tree, "model_type", "")) if block is not None else True))
    order = {stack: i for i, stack in enumerate(stacks)}
    return tuple(sorted(out, key=lambda k: (order[k.prefix], k.indices[0])))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


@dataclass(frozen=True)
class Training:
    """How one block index is trained: full-trained parameter local names, LoRA per linear."""

    full: frozenset  # relative parameter names ("self_attn.q_proj.weight", "input_layernorm.weight")
    lora: dict  # relative linear name -> (rank, dropout)


def block_bytes_per_token(kind: BlockKind, training: Training, p: int, grad_in: bool,
                          attention: str = "sdpa", seq: int = 0, policy=None) -> dict:
    """Bytes saved for backward per token in one block, by term. Empty when no gradient
    passes through the block (nothing trainable in it, nothing trainable before it).
    ``policy`` (mixspec.planning.policy.ExecutionPolicy; None: everything in p bytes, no autocast)
    adds what autocast's casts keep: a copy of the input per LoRA adapter held in fp32, a
    copy per reader of a trained norm's fp32 output, fp32 LayerNorms under CUDA autocast."""
    trains = bool(training.full or training.lora)
    if not (grad_in or trains):
        return {}
    fp32_out = _fp32_norm_outputs(kind, training, policy)
    terms = {"norms": 0.0, "linear_inputs": 0.0, "lora": 0.0, "attention": 0.0, "mlp": 0.0}
    terms["norms"] = _norm_bytes(kind, training, p, policy)
    groups = _linear_groups(kind)
    terms["attention"], attn_out_widths = _attention_bytes(groups, p, attention, seq)
    terms["linear_inputs"], terms["lora"] = _linear_input_bytes(kind, groups, training, p, policy, fp32_out,
                                                                attn_out_widths)
    terms["mlp"] = _mlp_bytes(kind, groups, training, p, policy)
    for gate in kind.gates:  # gate.tanh() * branch keeps the branch for the gate's gradient
        if gate in training.full:
            terms["gates"] = terms.get("gates", 0.0) + p * kind.hidden
    return {k: v for k, v in terms.items() if v}


def _norm_bytes(kind: BlockKind, training: Training, p: int, policy) -> float:
    """The block's norms -> bytes per token they save for backward."""
    total = 0.0
    q_width = next((l.out_features for l in kind.linears if _leaf(l.name) == "q_proj"), 0)
    k_width = next((l.out_features for l in kind.linears if _leaf(l.name) == "k_proj"), 0)
    for rel, norm, dim, cls in kind.norms:
        trains = f"{rel}.weight" in training.full
        # per-head q/k norms run over every head of the projection
        width, rows = dim, 1
        if _leaf(rel) in _Q_NORMS and q_width:
            width, rows = q_width, max(1, q_width // max(dim, 1))
        elif _leaf(rel) in _K_NORMS and k_width:
            width, rows = k_width, max(1, k_width // max(dim, 1))
        if norm == "layernorm":  # its input, and mean + rstd (fp32 on GPUs); CUDA autocast: an fp32 input copy
            total += (4 if _layernorm_fp32(policy) else p) * width + 8 * rows
        else:  # transformers' RMSNorms upcast: fp32 input and rstd; the weighted product for the weight's
            # gradient in p bytes (Gemma's (1 + w) product stays fp32)
            kept = (4 if "Gemma" in cls else p) * width if trains else 0
            total += 4 * width + 4 * rows + kept
    return total


def _linear_groups(kind: BlockKind) -> dict[tuple, list[Linear]]:
    """The block's Linears -> (parent, group) -> members: q/k/v as attn_in, gate/up as mlp_in, each
    other Linear alone."""
    groups: dict[tuple, list[Linear]] = {}
    for lin in kind.linears:
        leaf = _leaf(lin.name)
        group = "attn_in" if leaf in _ATTN_IN else "mlp_in" if leaf in _MLP_IN else lin.name
        groups.setdefault((_parent(lin.name), group), []).append(lin)
    return groups


def _attention_bytes(groups: dict, p: int, attention: str, seq: int) -> tuple[float, set]:
    """The attention groups -> (bytes per token attention saves, widths of the attention outputs
    an output projection reads from sdpa's saved output)."""
    total = 0.0
    attn_out_widths = set()
    for (parent, group), members in groups.items():
        if group == "attn_in":
            q, k, v = _qkv(members)
            heads = max(1, q // 128)
            if len(members) == 1:  # fused qkv: v stays a view that pins the whole fused output;
                v = q + k + v      # the output projection reads a reshaped copy (counted with it)
            elif attention != "eager":  # separate q/k/v: the output projection reads sdpa's saved output
                attn_out_widths.add(q)
            if attention == "eager" and len(members) > 1:
                # transformers' eager attention: q, k and v repeated to every query head, the fp32
                # softmax output and its p-byte cast (heads x sequence per token each); nothing
                # keeps the output unless the output projection trains
                total += p * 3 * q + (4 + p) * heads * seq
            else:
                total += p * (q + k + v + q) + 4 * heads
    return total, attn_out_widths


def _linear_input_bytes(kind: BlockKind, groups: dict, training: Training, p: int, policy, fp32_out: bool,
                        attn_out_widths: set) -> tuple[float, float]:
    """Each group's trained Linears -> (bytes per token of the inputs they save, bytes of their
    LoRA adapters' saved tensors)."""
    inputs_total = lora_total = 0.0
    adapter_copies = bool(policy and policy.adapter_copies)
    by_name = {l.name: l for l in kind.linears}
    # the down projection reads the MLP's product, counted with the MLP
    downs = {d.name for (parent, group) in groups if group == "mlp_in"
             for d in [_down_of(by_name, parent)] if d is not None}
    for (parent, group), members in groups.items():
        inputs_saved = False
        # a trained norm's fp32 output: every Linear reading it keeps its own cast copy
        per_reader = group in ("attn_in", "mlp_in") and fp32_out
        for lin in members:
            full = f"{lin.name}.weight" in training.full
            lora = training.lora.get(lin.name)
            reads_attn_output = _leaf(lin.name) in _ATTN_OUT and lin.in_features in attn_out_widths
            shares_input = full or (lora and lora[1] == 0 and not adapter_copies and not per_reader)
            if shares_input:
                if per_reader:
                    inputs_total += p * lin.in_features
                elif not inputs_saved and not reads_attn_output and lin.name not in downs:
                    inputs_total += p * lin.in_features
                inputs_saved = True
            if lora:
                rank, dropout = lora
                if dropout > 0:  # dropped-out copy + mask
                    lora_total += (p + _mask_bytes(policy, p)) * lin.in_features
                elif adapter_copies or per_reader:  # its own copy, cast from its fp32 input
                    lora_total += p * lin.in_features
                lora_total += p * rank
    return inputs_total, lora_total


def _mlp_bytes(kind: BlockKind, groups: dict, training: Training, p: int, policy) -> float:
    """The MLP groups -> bytes per token of their intermediate activations (the down
    projection's input counted here when it trains)."""
    total = 0.0
    by_name = {l.name: l for l in kind.linears}
    for (parent, group), members in groups.items():
        if group != "mlp_in":
            continue
        gate = next((l for l in members if _leaf(l.name) in ("gate_proj", "w1")), None)
        up = next((l for l in members if _leaf(l.name) in ("up_proj", "w3")), None)
        fused = next((l for l in members if _leaf(l.name) == "gate_up_proj"), None)
        down = _down_of(by_name, parent)
        if fused is not None:
            inter = fused.out_features // 2
            total += 3 * p * inter + (p * inter if _trains(down, training, policy) else 0)
        elif gate is not None and up is not None:
            inter = gate.out_features
            total += 3 * p * inter + (p * inter if _trains(down, training, policy) else 0)
        else:
            inter = members[0].out_features  # fc1 -> activation -> fc2
            kept = 2 if any(a in kind.activation for a in _TWO_TENSOR_ACTIVATIONS) else 1
            total += kept * p * inter + (p * inter if _trains(down, training, policy) else 0)
    return total


def _qkv(members) -> tuple[int, int, int]:
    by_leaf = {_leaf(l.name): l for l in members}
    if "q_proj" in by_leaf:
        q = by_leaf["q_proj"].out_features
        k = by_leaf.get("k_proj", by_leaf["q_proj"]).out_features
        v = by_leaf.get("v_proj", by_leaf["q_proj"]).out_features
        return q, k, v
    fused = members[0]
    third = fused.out_features // 3
    return third, third, third


def _down_of(by_name: dict, parent: str):
    for leaf in ("down_proj", "fc2", "w2", "linear_fc2", "c_proj"):
        lin = by_name.get(f"{parent}.{leaf}" if parent else leaf)
        if lin is not None:
            return lin
    return None


def _trains(lin, training: Training, policy=None) -> bool:
    """Whether `lin` keeps the tensor it reads: its weight trains, or a LoRA adapter reads
    it (not a cast copy of its own)."""
    if lin is None:
        return False
    if f"{lin.name}.weight" in training.full:
        return True
    # an adapter with dropout, or held in fp32 under autocast, keeps its own copy (counted with it)
    lora = training.lora.get(lin.name)
    return bool(lora) and lora[1] == 0 and not (policy is not None and policy.adapter_copies)


def block_fixed_bytes(kind: BlockKind, training: Training, policy) -> float:
    """Bytes a block keeps whatever the length: under autocast, the compute-dtype copy of
    every fp32 weight it trains (autocast casts it once per forward; the matmul keeps it for
    the input's gradient): fully trained Linears (in x out) and LoRA adapters (r x (in + out))."""
    if not (policy and policy.autocast):
        return 0.0
    p = policy.activation_bytes
    total = 0.0
    for lin in kind.linears:
        if policy.trained_copies and f"{lin.name}.weight" in training.full:
            total += p * lin.in_features * lin.out_features
        lora = training.lora.get(lin.name)
        if lora and policy.adapter_copies:
            total += p * lora[0] * (lin.in_features + lin.out_features)
    return total


def _layernorm_fp32(policy) -> bool:
    return bool(policy and policy.autocast and policy.device == "cuda")


def _mask_bytes(policy, p: int) -> int:
    """Bytes per element of a dropout mask: a bool on CUDA; on the CPU the dropout input's
    dtype (fp32 for an adapter's cast input under autocast)."""
    if policy is None or policy.device == "cuda":
        return 1
    return 4 if policy.adapter_copies else p


def _fp32_norm_outputs(kind: BlockKind, training: Training, policy) -> bool:
    """Whether the block's pre-norms hand fp32 to the Linears after them: under autocast a
    trained fp32 RMSNorm multiplies by its fp32 weight (Gemma's casts back to the input's
    dtype), and CUDA autocast runs LayerNorm in fp32."""
    if not (policy and policy.autocast):
        return False
    for rel, norm, _, cls in kind.norms:
        if _leaf(rel) in _Q_NORMS + _K_NORMS:
            continue
        if norm == "layernorm" and _layernorm_fp32(policy):
            return True
        if norm != "layernorm" and "Gemma" not in cls and policy.trained_copies and f"{rel}.weight" in training.full:
            return True
    return False


def block_index_training(kind: BlockKind, index: int, full_params: set, lora: dict) -> Training:
    """The Training of one block from the Plan's full-trained parameter names and LoRA map
    (full module name -> (rank, dropout))."""
    base = f"{kind.prefix}.{index}."
    full = frozenset(n[len(base):] for n in full_params if n.startswith(base))
    mine = {n[len(base):]: v for n, v in lora.items() if n.startswith(base)}
    return Training(full, mine)


def sorted_indices(kinds) -> list[tuple[int, BlockKind]]:
    """(block index, its kind) for every block, stack after stack (kinds come in stack order)."""
    order: dict[str, int] = {}
    for k in kinds:
        order.setdefault(k.prefix, len(order))
    return sorted(((i, k) for k in kinds for i in k.indices), key=lambda t: (order[t[1].prefix], t[0]))


def loss_bytes_per_token(vocab: int, hidden: int, p: int, lm_head_trains: bool) -> dict:
    """The loss head per token: kept for backward (fp32 log-softmax of the upcast logits, the
    int64 target, lm_head's input when it trains) and transient at the start of the backward
    pass (the logits' fp32 gradient and its p-byte cast)."""
    return {"saved": 4 * vocab + 8 + (p * hidden if lm_head_trains else 0), "transient": (4 + p) * vocab}


_STRUCTURES: dict = {}  # id(tree) -> (tree, {roles: structure}): one validate reads a tree for many specs
_STRUCTURES_KEPT = 16


def model_structure(tree, roles: dict) -> dict:
    """What the activation estimate needs from the tree (plain data, carried by the Plan).
    It depends on the tree and the roles alone, so it is computed once per tree object and
    roles in a process (each Plan gets its own copy)."""
    key = tuple(sorted((role, tuple(prefixes)) for role, prefixes in roles.items()))
    held = _STRUCTURES.get(id(tree))
    if held is None or held[0] is not tree:
        while len(_STRUCTURES) >= _STRUCTURES_KEPT:
            del _STRUCTURES[next(iter(_STRUCTURES))]
        held = _STRUCTURES[id(tree)] = (tree, {})
    if key not in held[1]:
        held[1][key] = _model_structure(tree, roles)
    return copy.deepcopy(held[1][key])


def _model_structure(tree, roles: dict) -> dict:
    out: dict = {"hidden": 0, "vocab": 0, "language": [], "vision": [], "aligner_linears": [], "aligner_norms": [],
                 "vision_position_embeddings": 0, "patch_kernel": 0, "vision_hidden": 0, "final_norm": ""}
    head = tree.by_name.get(tree.output_embedding)
    if head is not None:
        out["vocab"], out["hidden"] = head.out_features, head.in_features
    vision = roles.get("vision", ())
    aligner = roles.get("aligner", ())
    out["language"] = [k.to_json() for k in block_kinds(tree, roles.get("language", ()))]
    out["vision"] = [k.to_json() for k in block_kinds(tree, vision, exclude=aligner)]
    for m in tree.modules:
        in_vision = is_under(m.name, vision) and m.name not in vision
        in_aligner = is_under(m.name, aligner)
        if in_aligner and m.kind == "linear":
            out["aligner_linears"].append([m.name, m.in_features, m.out_features])
        elif in_aligner and m.norm:
            dim = next(iter(m.params.values()), (0,))
            out["aligner_norms"].append([m.name, m.norm, int(dim[0]) if dim else 0, m.type])
        elif in_vision and not in_aligner:
            if m.kind == "embedding" and "position" in _leaf(m.name) and not out["vision_position_embeddings"]:
                out["vision_position_embeddings"] = m.in_features
            elif m.kind == "conv" and len(m.kernel) >= 2 and not out["patch_kernel"]:
                out["patch_kernel"] = int(m.kernel[-1])
    if out["vision"]:
        out["vision_hidden"] = out["vision"][0]["hidden"]
    lang = roles.get("language", ())
    for m in tree.modules:  # the LLM's final norm: a norm directly under the language model
        if m.norm and any(m.name == f"{p}.norm" for p in lang):
            out["final_norm"] = m.name
    return out
