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

Activations depend on sequence length, batch, image size and checkpointing; they are
**not included** and are reported as excluded, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixspec.plan import Plan

GIB = 1024 ** 3


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

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes

    def to_json(self) -> dict:
        return {
            "world_size": self.world_size, "zero_stage": self.zero_stage, "offload": self.offload,
            "per_gpu_bytes": {
                "weights": round(self.weights_bytes), "gradients": round(self.gradients_bytes),
                "optimizer_states": round(self.optimizer_bytes), "total": round(self.total_bytes),
                "activations": "excluded",
            },
            "per_gpu_gib": round(self.total_bytes / GIB, 2),
            "cpu_offload_bytes_per_node": round(self.cpu_bytes_per_node),
        }


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


def estimate(plan: Plan) -> Estimate:
    """Memory per GPU for the Plan on the spec's hardware (activations excluded)."""
    dist = plan.distributed
    nodes, gpn = dist.nodes, dist.gpus_per_node
    n = nodes * gpn
    stage = dist.zero_stage
    offload = dist.offload
    rates = bytes_per_param(plan.training.precision, deepspeed=dist.deepspeed)
    full = sum(c.trainable_params for c in plan.components if c.mode == "full")
    lora = plan.totals.added_params
    frozen = plan.totals.base_params - full
    weights = grads = optim = 0.0
    for count, kind in ((frozen, "frozen"), (full, "full"), (lora, "lora")):
        w, g, o = rates[kind]
        weights += count * w
        grads += count * g
        optim += count * o
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
    return Estimate(n, stage, offload, weights, grads, optim, cpu_per_gpu * gpn,
                    dist.gpu_memory_gb)
