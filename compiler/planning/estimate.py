"""estimate(plan) -> Estimate: memory per GPU for weights, gradients and optimizer states.

The formula follows how the generated configs run (bytes per parameter):

| | frozen base | trained base (full) | LoRA adapter |
|---|---|---|---|
| no DeepSpeed, bf16/fp16 (frozen 16 bit, trained upcast to fp32) | 2 | 4 w + 4 grad + 8 AdamW | 4 + 4 + 8 (PEFT keeps adapters fp32) |
| no DeepSpeed, fp32 | 4 | 4 + 4 + 8 | 4 + 4 + 8 |
| DeepSpeed, bf16/fp16 (module cast to 16 bit, fp32 master) | 2 | 2 + 2 + 12 (fp32 master, m, v) | 2 + 2 + 12 |
| DeepSpeed, fp32 | 4 | 4 + 4 + 8 | 4 + 4 + 8 |

With N = nodes x gpus_per_node data-parallel ranks, ZeRO stage 1 divides optimizer
states by N, stage 2 also gradients, stage 3 also the weights (frozen ones included).
Offload "optimizer" moves optimizer states to CPU memory, "all" (ZeRO-3) also weights.

FSDP2 (``distributed.fsdp``) holds weights as the hf target's DDP run does (frozen in the
training precision, trained ones fp32: the rows "no DeepSpeed") and shards all three by N,
frozen weights included, for both strategies; what differs is what is gathered while the
model runs (``fsdp_gathered_bytes``): full_shard (like ZeRO-3) the running block, the next
one (prefetched) and what accelerate never reshards (root and tail units: every parameter
outside the blocks); shard_grad_op (like ZeRO-2) every block from its forward to its
backward, i.e. all weights. Offload "all" moves weights, gradients and optimizer states to
CPU memory together (FSDP has no optimizer-only offload).

Activations (mixspec.planning.activations, checked op by op against the bytes autograd saves on
real-width blocks: benchmarks/activation_check.py) are added per GPU for one micro-batch of
``training.max_length`` tokens and ``data.images_per_sample`` images of ``data.max_pixels``
pixels; the peak adds what is transient (the logits' gradient, or one block recomputed under
gradient checkpointing), ZeRO-3's gathered parameters and a stated framework overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..models.names import is_under
from .plan import Plan
from ..language.lightspec import default

GIB = 1024 ** 3
# CUDA context, NCCL buffers and allocator slack: not counted by torch.cuda.memory_allocated,
# present on every GPU; a stated constant, not a measurement of your machine
OVERHEAD_BYTES = 1.0 * GIB


@dataclass(frozen=True)
class Estimate:
    world_size: int
    zero_stage: int | None
    offload: str
    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float
    cpu_bytes_per_node: float
    gpu_memory_gb: float | None
    activations: dict = field(default_factory=dict)  # term -> bytes kept for backward
    transient: dict = field(default_factory=dict)  # term -> bytes alive only for a moment (the largest counts)
    zero3_live_bytes: float = 0.0
    overhead_bytes: float = 0.0
    assumptions: dict = field(default_factory=dict)
    fsdp: str | None = None  # FSDP2 strategy; zero3_live_bytes then holds FSDP's gathered weights
    policy: object = None  # mixspec.planning.policy.ExecutionPolicy: how the target runs it

    @property
    def total_bytes(self) -> float:
        """Model states: weights + gradients + optimizer states."""
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes

    @property
    def activation_bytes(self) -> float:
        return sum(self.activations.values())

    @property
    def transient_bytes(self) -> float:
        return max(self.transient.values(), default=0.0)

    @property
    def peak_bytes(self) -> float:
        return (self.total_bytes + self.activation_bytes + self.transient_bytes + self.zero3_live_bytes
                + self.overhead_bytes)

    def to_json(self) -> dict:
        return {
            "world_size": self.world_size, "zero_stage": self.zero_stage, "offload": self.offload,
            "per_gpu_bytes": {
                "weights": round(self.weights_bytes), "gradients": round(self.gradients_bytes),
                "optimizer_states": round(self.optimizer_bytes), "total": round(self.total_bytes),
                "activations": round(self.activation_bytes),
                "transient": round(self.transient_bytes),
                "zero3_live_params": round(self.zero3_live_bytes),
                "overhead": round(self.overhead_bytes),
                "peak": round(self.peak_bytes),
            },
            "activation_terms": {k: round(v) for k, v in self.activations.items()},
            "transient_terms": {k: round(v) for k, v in self.transient.items()},
            "per_gpu_gib": round(self.total_bytes / GIB, 2),
            "peak_gib": round(self.peak_bytes / GIB, 2),
            "assumptions": self.assumptions,
            "policy": self.policy.to_json() if self.policy is not None else None,
            "cpu_offload_bytes_per_node": round(self.cpu_bytes_per_node),
            **({"fsdp": self.fsdp} if self.fsdp else {}),
        }

    @property
    def engine(self) -> str:
        """How the run shards, in words."""
        if self.fsdp:
            return f"FSDP2 {self.fsdp}"
        return "no DeepSpeed (DDP)" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"


def bytes_per_param(precision: str, deepspeed: bool) -> dict:
    """(weight, gradient, optimizer) bytes for frozen, full-trained and LoRA parameters."""
    if deepspeed:
        w = 4 if precision == "fp32" else 2
        opt = 8 if precision == "fp32" else 12
        trained = (w, w, opt)
        return {"frozen": (w, 0, 0), "full": trained, "lora": trained}
    frozen = 4 if precision == "fp32" else 2
    # trained parameters are upcast to fp32 (hf target; PEFT keeps adapters in fp32)
    return {"frozen": (frozen, 0, 0), "full": (4, 4, 8), "lora": (4, 4, 8)}


def estimate(plan: Plan, overrides: dict | None = None, target: str | None = None) -> Estimate:
    """Memory per GPU for the Plan on the spec's hardware, as ``target`` runs it (default hf:
    the generated train.py; mixspec.planning.policy). ``overrides`` replaces settings (zero_stage,
    offload, gradient_checkpointing, micro_batch_size) for what-if searches, and the shape of
    the longest micro-batch (max_length, images_per_sample, max_pixels: mixspec.data.datacheck's
    data_peak)."""
    from .policy import execution_policy

    o = overrides or {}
    dist, training = plan.distributed, plan.training
    nodes, gpn = dist.nodes, dist.gpus_per_node
    n = nodes * gpn
    stage = o.get("zero_stage", dist.zero_stage)
    # an override of the ZeRO stage alone means DeepSpeed (or DDP), not the spec's FSDP
    fsdp = o.get("fsdp", None if "zero_stage" in o else dist.fsdp)
    offload = o.get("offload", dist.offload)
    if fsdp:
        return _fsdp_estimate(plan, o, fsdp, offload, execution_policy(plan, target, deepspeed=False, fsdp=fsdp))
    precision = training.precision
    rates = bytes_per_param(precision, deepspeed=stage is not None)
    full = sum(c.trainable_params for c in plan.components if c.mode == "full")
    lora = plan.totals.added_params
    frozen = plan.totals.base_params - full
    weights = grads = optim = 0.0
    for count, kind in ((frozen, "frozen"), (full, "full"), (lora, "lora")):
        w, g, opt = rates[kind]
        weights += count * w
        grads += count * g
        optim += count * opt
    s = stage or 0
    if s >= 1:
        optim /= n
    if s >= 2:
        grads /= n
    if s >= 3:
        weights /= n
    cpu_per_gpu = 0.0
    if offload in ("optimizer", "all") and s >= 1:
        cpu_per_gpu += optim
        optim = 0.0
    if offload == "all" and s >= 3:
        cpu_per_gpu += weights
        weights = 0.0
    policy = execution_policy(plan, target, deepspeed=stage is not None, fsdp=False)
    acts, transient, assumptions = activation_terms(plan, o, policy)
    if plan.quantized or training.optimizer != "adamw":
        if stage is None:
            weights, grads, optim = quantized_model_states(plan)
        assumptions["model_states"] = model_states_notes(plan, deepspeed=stage is not None)
    live = zero3_live_bytes(plan, 4 if precision == "fp32" else 2) if s >= 3 else 0.0
    return Estimate(n, stage, offload, weights, grads, optim, cpu_per_gpu * gpn,
                    dist.gpu_memory_gb, acts, transient, live, OVERHEAD_BYTES, assumptions, policy=policy)


def trained_sizes(plan: Plan) -> list[int]:
    """Elements of every trained tensor (fully trained base parameters, LoRA adapter tensors)."""
    sizes = []
    for comp in plan.components:
        if comp.mode == "full":
            sizes += [math.prod(plan.param_shapes[p]) for p in comp.params]
        elif comp.mode == "lora" and comp.lora:
            sizes += list(comp.lora.param_sizes)
    return sizes


def quantized_model_states(plan: Plan) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes without DeepSpeed, for a quantized base
    or a bitsandbytes optimizer: quantized Linear weights at bitsandbytes' bytes
    (mixspec.planning.quantize); with a quantized base PEFT's prepare_model_for_kbit_training holds every
    other parameter in fp32; trained tensors fp32 with an fp32 gradient; AdamW's moments as the
    optimizer keeps them, tensor by tensor."""
    from .quantize import optimizer_fixed_bytes, optimizer_state_bytes, quantized_weight_bytes

    training = plan.training
    sizes = trained_sizes(plan)
    full = sum(c.trainable_params for c in plan.components if c.mode == "full")
    quantized = held = 0
    for comp in plan.components:
        if comp.quantize:
            q = comp.quantize
            quantized += q.params
            held += sum(quantized_weight_bytes(q.method, q.double_quant, o, i) for o, i in q.shapes)
    frozen = plan.totals.base_params - full - quantized
    frozen_bytes = 4 if plan.quantized or training.precision == "fp32" else 2
    weights = held + frozen * frozen_bytes + 4 * sum(sizes)
    optim = sum(optimizer_state_bytes(training.optimizer, n) for n in sizes)
    optim += optimizer_fixed_bytes(training.optimizer, sizes)
    return float(weights), float(4 * sum(sizes)), float(optim)


def model_states_notes(plan: Plan, deepspeed: bool) -> dict:
    """What the model-state estimate assumed about quantization and the optimizer."""
    from .quantize import PAGED_OPTIMIZERS

    notes = {"optimizer": plan.training.optimizer}
    q = plan.quant_config()
    if q:
        notes["quantized"] = f"{q.method}, {sum(c.quantize.params for c in plan.components if c.quantize):,} weights"
        notes["kbit_preparation"] = "PEFT prepare_model_for_kbit_training: every other parameter held in fp32"
    if plan.training.optimizer in PAGED_OPTIMIZERS:
        notes["paged"] = "optimizer states in paged (unified) memory: counted on the GPU, can spill to CPU"
    if deepspeed:
        notes["deepspeed"] = "not modelled: quantized bases and bitsandbytes optimizers are estimated without DeepSpeed"
    return notes


def _model_states(plan: Plan, rates: dict) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) bytes of the whole model, unsharded."""
    full = sum(c.trainable_params for c in plan.components if c.mode == "full")
    counts = {"frozen": plan.totals.base_params - full, "full": full, "lora": plan.totals.added_params}
    return tuple(sum(counts[k] * rates[k][i] for k in counts) for i in range(3))


def _fsdp_estimate(plan: Plan, o: dict, fsdp: str, offload: str, policy) -> Estimate:
    """FSDP2: every model state sharded over the ranks, the gathered weights on top."""
    dist, precision = plan.distributed, plan.training.precision
    n = dist.nodes * dist.gpus_per_node
    weights, grads, optim = (x / n for x in _model_states(plan, bytes_per_param(precision, deepspeed=False)))
    cpu_per_gpu = 0.0
    if offload == "all":
        cpu_per_gpu, weights, grads, optim = weights + grads + optim, 0.0, 0.0, 0.0
    acts, transient, assumptions = activation_terms(plan, o, policy)
    live = fsdp_gathered_bytes(plan, 4 if precision == "fp32" else 2, fsdp)
    return Estimate(n, None, offload, weights, grads, optim, cpu_per_gpu * dist.gpus_per_node,
                    dist.gpu_memory_gb, acts, transient, live, OVERHEAD_BYTES, assumptions, fsdp=fsdp, policy=policy)


def fsdp_gathered_bytes(plan: Plan, p: int, fsdp: str) -> float:
    """Weights FSDP2 holds gathered (in the compute precision, p bytes) while the model runs.
    full_shard: two of the largest block (the running one and the prefetched next) plus the
    parameters outside the blocks that accelerate does not reshard after forward (its root and
    tail units: aligner, patch embedding, norms, lm_head); the input embedding has a unit of its
    own, gathered only at the ends of forward and backward (with the lm_head when tied).
    shard_grad_op: every block stays gathered from forward to backward: all weights."""
    if fsdp == "shard_grad_op" or not plan.units:
        return float(p * plan.totals.all_params)
    largest = max(u["params"] for u in plan.units)
    in_blocks = sum(u["params"] * len(u["indices"]) for u in plan.units)
    st = plan.structure or {}
    embedding = 0 if plan.tied else st.get("vocab", 0) * st.get("hidden", 0)
    outside = max(0, plan.totals.base_params - in_blocks - embedding)
    return float(p * (2 * largest + outside))


def _trained_sets(plan: Plan):
    """(fully trained parameter names, LoRA module name -> (rank, dropout))."""
    full, lora = set(), {}
    for comp in plan.components:
        if comp.mode == "full":
            full.update(comp.params)
        elif comp.mode == "lora" and comp.lora:
            for target in comp.lora.targets:
                lora[target] = (comp.lora.rank, comp.lora.dropout)
    return full, lora


def _stack_bytes(kinds, full, lora, p, grad_in, checkpointing, tokens, policy):
    """(bytes kept by a stack of blocks, bytes of one block recomputed, grad flows out) for `tokens`."""
    from .activations import block_bytes_per_token, block_fixed_bytes, block_index_training, sorted_indices

    kept = recompute = 0.0
    for index, kind in sorted_indices(kinds):
        training = block_index_training(kind, index, full, lora)
        per_token = sum(block_bytes_per_token(kind, training, p, grad_in, policy=policy).values())
        if per_token:
            whole = per_token * tokens + block_fixed_bytes(kind, training, policy)
            trains = bool(training.full or training.lora)
            # LLaMA-Factory checkpoints only blocks that hold a trainable parameter
            if checkpointing and kind.checkpointed and (trains or policy.checkpoint_frozen_blocks):
                kept += p * kind.hidden * tokens  # each block keeps its input
                recompute = max(recompute, whole)
            else:
                kept += whole
        grad_in = grad_in or bool(training.full or training.lora)
    return kept, recompute, grad_in


def _aligner_bytes(st, full, lora, p, merged, merge, policy, trains_weights) -> float:
    """The aligner (a norm, Linear, activation, Linear chain): the norms' saved inputs (over the
    vision tokens before merging), each Linear's input, the activation's input, and under
    autocast a compute-dtype copy of each trained fp32 weight."""
    aligner = st.get("aligner_linears", [])
    total = 0.0
    for name, norm, dim, cls in st.get("aligner_norms", []):
        per = dim * merge  # its dim per vision token, `merge` tokens per merged one
        trains = f"{name}.weight" in full
        if norm == "layernorm":
            total += ((4 if policy.autocast and policy.device == "cuda" else p) * per + 8 * merge) * merged
        else:
            total += (4 * per + 4 * merge + ((4 if "Gemma" in cls else p) * per if trains else 0)) * merged
    total += sum(p * fin for _, fin, _ in aligner) * merged + p * aligner[0][2] * merged
    if policy.trained_copies and trains_weights:
        total += sum(p * fin * fout for name, fin, fout in aligner if f"{name}.weight" in full)
    return total


def activation_terms(plan: Plan, overrides: dict | None = None, policy=None):
    """(activation term -> bytes, transient term -> bytes, assumptions) per GPU, for the run
    ``policy`` describes (default: the hf target's for the Plan and ``overrides``)."""
    from .activations import BlockKind, loss_bytes_per_token
    from .policy import execution_policy

    o = overrides or {}
    if policy is None:
        policy = execution_policy(plan, deepspeed=o.get("zero_stage", plan.distributed.zero_stage) is not None)
    st = plan.structure or {}
    training = plan.training
    if not st or not st.get("language"):
        return {}, {}, {"activations": "not estimated: no decoder stack found in the tree"}
    p = policy.activation_bytes
    micro = o.get("micro_batch_size", training.micro_batch_size)
    seq = o.get("max_length", training.max_length)
    checkpointing = o.get("gradient_checkpointing", training.gradient_checkpointing)
    tokens = micro * seq
    full, lora = _trained_sets(plan)
    acts, transient = {}, {}
    assumptions = {"tokens_per_gpu": tokens, "micro_batch_size": micro, "max_length": seq,
                   "attention": "sdpa/flash (no sequence-squared term)", "gradient_checkpointing": checkpointing,
                   "activation_bytes": p, "policy": policy.describe()}
    grad_in = _vision_terms(plan, st, full, lora, p, micro, checkpointing, policy, acts, transient, assumptions, o)
    roles = plan.roles
    embeddings = roles.get("embeddings", ())
    grad_in = grad_in or _under(embeddings, full) or _under(embeddings, lora)
    # transformers' checkpointing calls enable_input_require_grads: a gradient flows from the
    # embeddings, so frozen blocks below the first trained one keep their input too
    grad_in = grad_in or (checkpointing and policy.checkpoint_frozen_blocks)
    lang_kinds = [BlockKind.from_json(k) for k in st["language"]]
    kept, recompute, grad_out = _stack_bytes(lang_kinds, full, lora, p, grad_in, checkpointing, tokens, policy)
    if kept:
        acts["llm_blocks"] = kept
    if recompute:
        transient["llm_block_recompute"] = recompute
    if (full or lora) and st.get("vocab"):
        hidden = st["hidden"]
        head_trains = _under(roles.get("lm_head", ()), full)
        if grad_out or head_trains:
            acts["final_norm"] = (4 * hidden + 4) * tokens
        loss = loss_bytes_per_token(st["vocab"], hidden, p, head_trains)
        acts["loss"] = loss["saved"] * tokens
        transient["logits_gradient"] = loss["transient"] * tokens
    return acts, transient, assumptions


def _under(prefixes, names) -> bool:
    return any(is_under(n, prefixes) for n in names)


def _vision_terms(plan, st, full, lora, p, micro, checkpointing, policy, acts, transient, assumptions,
                  o: dict | None = None) -> bool:
    """The vision tower's blocks and the aligner into ``acts``/``transient``; whether a
    gradient flows out of them into the LLM. ``o`` may replace images_per_sample and
    max_pixels (the data's own, from a data check)."""
    from .activations import BlockKind

    vision_kinds = [BlockKind.from_json(k) for k in st.get("vision", ())]
    if not vision_kinds:
        return False
    data, roles = plan.data, plan.roles
    # no data section: the spec's defaults for these keys (mixspec.language.spec.Data)
    o = o or {}
    images = o.get("images_per_sample", data.images_per_sample if data is not None else default("Data", "images_per_sample"))
    max_pixels = o.get("max_pixels", data.max_pixels if data is not None else default("Data", "max_pixels"))
    if st.get("vision_position_embeddings"):
        per_image = st["vision_position_embeddings"]
        how = "fixed by the encoder's position embeddings"
    elif st.get("patch_kernel"):
        per_image = max(1, max_pixels // (st["patch_kernel"] ** 2))
        how = (f"the data's largest image, {max_pixels} pixels," if "max_pixels" in o else f"data.max_pixels {max_pixels}")
        how += f" / {st['patch_kernel']}^2"
    else:
        per_image, how = 0, "unknown"
    vision_tokens = per_image * images * micro
    assumptions.update(vision_tokens_per_image=per_image, vision_tokens_how=how, images_per_sample=images)
    below = _under(roles.get("vision", ()), full) and not _under(tuple(k.prefix for k in vision_kinds), full)
    kept, recompute, grad_out = _stack_bytes(vision_kinds, full, lora, p, below, checkpointing, vision_tokens,
                                             policy)
    if kept:
        acts["vision_blocks"] = kept
    if recompute:
        transient["vision_block_recompute"] = recompute
    aligner = st.get("aligner_linears", [])
    aligner_roles = roles.get("aligner", ())
    aligner_trains = _under(aligner_roles, full) or _under(aligner_roles, lora)
    if aligner and (grad_out or aligner_trains) and vision_tokens:
        merge = max(1, aligner[0][1] // max(1, st.get("vision_hidden") or aligner[0][1]))
        acts["aligner"] = _aligner_bytes(st, full, lora, p, vision_tokens / merge, merge, policy,
                                         _under(aligner_roles, full))
    return grad_out or aligner_trains


def zero3_live_bytes(plan: Plan, p: int) -> float:
    """ZeRO-3 gathers each block's parameters to run it and prefetches the next: about two
    of the largest blocks' weights live at once (DeepSpeed's defaults via the Trainer)."""
    from .activations import BlockKind

    st = plan.structure or {}
    largest = 0
    for role in ("language", "vision"):
        for data in st.get(role, ()):
            kind = BlockKind.from_json(data)
            size = sum(l.in_features * l.out_features for l in kind.linears) + sum(n[2] for n in kind.norms)
            largest = max(largest, size)
    return 2.0 * largest * p
