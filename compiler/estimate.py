"""estimate(plan) -> Estimate: memory per GPU for weights, gradients and optimizer states.

The formula (mixed precision as DeepSpeed and the generated scripts run it):

* every base parameter, frozen or not, is held once in the training dtype
  (bf16/fp16: 2 bytes, fp32: 4 bytes); LoRA adapters likewise;
* every trainable parameter (full components and LoRA adapters) also has a gradient in the
  training dtype, and AdamW state: fp32 momentum and variance (8 bytes) plus, for
  bf16/fp16, an fp32 master copy (4 bytes);
* with N = nodes x gpus_per_node data-parallel ranks, ZeRO stage 1 divides optimizer
  states by N, stage 2 also gradients, stage 3 also the weights (frozen ones included);
* offload "optimizer" moves optimizer states to CPU memory, "all" (ZeRO-3) also weights.

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


def estimate(plan: Plan) -> Estimate:
    """Memory per GPU for the Plan on the spec's hardware (activations excluded)."""
    dist = plan.distributed
    precision = plan.training["precision"]
    nodes, gpn = dist["nodes"], dist["gpus_per_node"]
    n = nodes * gpn
    stage = dist["zero_stage"]
    offload = dist["offload"]
    wbytes = 4 if precision == "fp32" else 2
    obytes = 8 if precision == "fp32" else 12
    all_params = plan.totals.base_params + plan.totals.added_params
    trainable = plan.totals.trainable_params
    weights = all_params * wbytes
    grads = trainable * wbytes
    optim = trainable * obytes
    s = stage or 0
    if s >= 1:
        optim /= n
    if s >= 2:
        grads /= n
    if s >= 3:
        weights /= n
    cpu_per_gpu = 0.0
    if offload in ("optimizer", "all") and stage is not None and s >= 1:
        cpu_per_gpu += optim
        optim = 0.0
    if offload == "all" and s >= 3:
        cpu_per_gpu += weights
        weights = 0.0
    return Estimate(n, stage, offload, weights, grads, optim, cpu_per_gpu * gpn,
                    dist.get("gpu_memory_gb"))
