"""Typed run settings of a Plan: every default in one place, targets read attributes only.

The spec's own keys (``training``, ``distributed``, ``data``) take their defaults from
mixspec.language.spec (the pydantic models, which the JSON Schema publishes) and have none here:
``settings_from_spec`` builds these objects once, in resolve. What the spec
language does not expose but a backend could otherwise choose differently is decided
here, once, so every target emits the same value (or refuses):

- the dtype of trained parameters (fp32 master weights, whatever ``precision`` says) and of
  frozen ones (the training precision).

``to_json`` keeps the keys ``plan --json`` has always shown, in the same order, and adds
the decided ones after them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

TRAINED_DTYPE = "fp32"


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation settings shared by all components (spec ``training`` + decided values)."""

    epochs: float
    max_steps: Optional[int]
    micro_batch_size: int
    gradient_accumulation: int
    precision: str
    gradient_checkpointing: bool
    max_length: int
    optimizer: str
    weight_decay: float
    warmup_ratio: float
    lr_scheduler: str
    max_grad_norm: float
    seed: int
    logging_steps: int
    save_steps: int
    # AdamW's betas and epsilon: spec keys, emitted by every target (ms-swift's own default
    # beta2 is 0.95, transformers' and torch's 0.999: a target never leaves them to the backend)
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    # decided by mixspec (no spec key): every target emits this
    trained_dtype: str = TRAINED_DTYPE

    @property
    def frozen_dtype(self) -> str:
        """Frozen parameters are held in the training precision."""
        return self.precision

    def to_json(self) -> dict:
        return {**asdict(self), "frozen_dtype": self.frozen_dtype}


@dataclass(frozen=True)
class DistributedSettings:
    """The hardware the run is planned for (spec ``distributed``)."""

    nodes: int
    gpus_per_node: int
    zero_stage: Optional[int]
    offload: str
    gpu_memory_gb: Optional[float]
    fsdp: Optional[str]  # FSDP2 sharding (full_shard | shard_grad_op); never with zero_stage

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def deepspeed(self) -> bool:
        """Whether the run uses DeepSpeed (a ZeRO stage is set)."""
        return self.zero_stage is not None

    @property
    def engine(self) -> str:
        """What shards the run: "ddp", "deepspeed" or "fsdp"."""
        return "fsdp" if self.fsdp else "deepspeed" if self.deepspeed else "ddp"

    def to_json(self) -> dict:
        out = asdict(self)
        if out["fsdp"] is None:  # plans without FSDP keep the keys they always had
            del out["fsdp"]
        return out


@dataclass(frozen=True)
class DataSettings:
    """Training data (spec ``data``); paths as written, checked for form only."""

    train: Union[str, list]  # a file or dataset id, or a list of them
    eval: Union[str, list, None]
    max_pixels: int
    min_pixels: Optional[int]
    images_per_sample: int

    def to_json(self) -> dict:
        return asdict(self)


def settings_from_spec(spec) -> tuple[TrainingSettings, DistributedSettings, Optional[DataSettings]]:
    """The typed settings of a (validated) Spec; the spec's pydantic models give the defaults."""
    training = TrainingSettings(**spec.training.model_dump(mode="json"))
    distributed = DistributedSettings(**spec.distributed.model_dump(mode="json"))
    data = DataSettings(**spec.data.model_dump(mode="json")) if spec.data else None
    return training, distributed, data
