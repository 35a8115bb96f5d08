"""The spec language (v1): pydantic models, strict, with descriptions for the JSON Schema."""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .spec_names import COMPONENT_NAME_PATTERN, ROLES, TRAIN_MODES  # noqa: F401  (re-exported)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


PositiveLR = Annotated[
    float,
    Field(gt=0, description="Learning rate of this component (> 0, finite), e.g. 1.0e-4."),
]


class LoraOptions(_Strict):
    """LoRA settings of one component."""

    rank: int = Field(8, ge=1, le=4096, description="LoRA rank r (>= 1).")
    alpha: float = Field(16, gt=0, description="LoRA alpha (> 0); scaling is alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input, 0 <= dropout < 1.")
    targets: Union[Literal["all-linear"], list[str], str] = Field(
        "all-linear",
        description=(
            "Which modules inside the component get LoRA: 'all-linear' (every Linear in the component, "
            "never the output embedding), a list of leaf names (e.g. [q_proj, v_proj]), or a regex "
            "full-matched against module names."
        ),
    )
    # flat Union[..., None], never Optional[Union[...]]: typing caches Optional[X] under an X that
    # compares equal in any order, so a library's Optional[Union[list[int], str]] imported first
    # would reorder this union and with it the published schema
    layers: Union[str, list[int], None] = Field(
        None,
        description="Only these block indices, e.g. \"20-27\", \"0,2,4-6\" or [20, 21]. Default: all blocks.",
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA (scaling alpha/sqrt(r)).")
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA); adds a magnitude vector per module.")

    _finite_alpha = field_validator("alpha", "dropout")(_finite)

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("must list at least one module name")
            for item in value:
                if not item:
                    raise ValueError("module names must not be empty")
        elif not value:
            raise ValueError("must not be empty")
        return value


_MODULES_DESC = (
    "Regexes (RE2 syntax, full-matched) over module or parameter names; a matched module is "
    "claimed with everything under it. Required for a component whose key is not a role name."
)


QUANT_METHODS = ("nf4", "fp4", "int8")
_QUANTIZE_DESC = (
    "Hold the component's base Linear weights quantized by bitsandbytes (QLoRA): nf4 or fp4 (4 bit, "
    "blocks of 64), int8 (LLM.int8). Only for frozen and LoRA components; the output embedding "
    "(lm_head) is never quantized. Default: not quantized."
)


class QuantizeOptions(_Strict):
    """bitsandbytes settings of a quantized component."""

    double_quant: bool = Field(
        True, description="nf4/fp4: quantize the per-block absmax constants too (8 bit, blocks of 256).")
    compute_dtype: Optional[Literal["bf16", "fp16", "fp32"]] = Field(
        None, description="nf4/fp4: dtype of the dequantized weights in the matmul (default: training.precision).")


class FreezeComponent(_Strict):
    """A component whose parameters are not trained."""

    train: Literal["freeze"] = Field(description="freeze: no parameter of the component is trained.")
    modules: Optional[list[str]] = Field(None, description=_MODULES_DESC, min_length=1)
    quantize: Optional[Literal["nf4", "fp4", "int8"]] = Field(None, description=_QUANTIZE_DESC)
    quantize_options: Optional[QuantizeOptions] = Field(None, description="Options of quantize (nf4/fp4 only).")


class FullComponent(_Strict):
    """A component trained with all its parameters."""

    train: Literal["full"] = Field(description="full: every parameter of the component is trained.")
    lr: PositiveLR
    modules: Optional[list[str]] = Field(None, description=_MODULES_DESC, min_length=1)
    weight_decay: Optional[float] = Field(
        None, ge=0, description="Weight decay of this component (default: training.weight_decay)."
    )

    _finite_lr = field_validator("lr", "weight_decay")(lambda v: v if v is None else _finite(v))


class LoraComponent(_Strict):
    """A component trained through LoRA adapters; its base weights stay frozen."""

    train: Literal["lora"] = Field(description="lora: LoRA adapters on the component's modules.")
    lr: PositiveLR
    modules: Optional[list[str]] = Field(None, description=_MODULES_DESC, min_length=1)
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA options.")
    quantize: Optional[Literal["nf4", "fp4", "int8"]] = Field(None, description=_QUANTIZE_DESC)
    quantize_options: Optional[QuantizeOptions] = Field(None, description="Options of quantize (nf4/fp4 only).")
    weight_decay: Optional[float] = Field(
        None, ge=0, description="Weight decay of this component (default: training.weight_decay)."
    )

    _finite_lr = field_validator("lr", "weight_decay")(lambda v: v if v is None else _finite(v))


Component = Annotated[
    Union[FreezeComponent, FullComponent, LoraComponent], Field(discriminator="train")
]


class Training(_Strict):
    """Optimisation settings shared by all components."""

    epochs: float = Field(1, gt=0, description="Number of epochs (> 0).")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int = Field(1, ge=1, description="Per-GPU batch size.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Training precision.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in the backward pass.")
    max_length: int = Field(2048, ge=1, description="Maximum tokens per sample.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adamw_torch_8bit",
                       "adamw_torch_4bit"] = Field(
        "adamw",
        description="AdamW: adamw (torch, 32-bit states), adamw_8bit (bitsandbytes, 8-bit blockwise states), "
                    "paged_adamw_8bit / paged_adamw (bitsandbytes, states in paged memory that can spill to CPU), "
                    "adamw_torch_8bit / adamw_torch_4bit (torchao, 8-bit / 4-bit blockwise states).")
    weight_decay: float = Field(0.0, ge=0, description="Default weight decay (not applied to biases and norms).")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps for linear warm-up.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule (applied to every component's LR)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, ge=0, description="Random seed.")
    logging_steps: int = Field(10, ge=1, description="Log every N optimizer steps.")
    save_steps: int = Field(500, ge=1, description="Save a checkpoint every N optimizer steps.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (torch's default 0.9).")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2 (torch's default 0.999; ms-swift's own default is 0.95).")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon (torch's default 1e-8).")

    _finite = field_validator("epochs", "weight_decay", "max_grad_norm", "adam_epsilon")(_finite)


class Data(_Strict):
    """Training data. Paths are checked for form, not existence (`mixspec data check` reads them)."""

    train: Union[str, list[str]] = Field(
        description="Training data: a .jsonl file (messages + images), a dataset id, or a list of them (mixed, "
                    "each checked and reported on its own).")
    eval: Union[str, list[str], None] = Field(None, description="Optional evaluation data: a file, a dataset id "
                                                                    "or a list of them.")
    max_pixels: int = Field(
        1003520, ge=1,
        description="Pixels per image for encoders that take any size, and the processor's limit in every target "
                    "(train.py's image processor, ms-swift MAX_PIXELS, LLaMA-Factory image_max_pixels) (Qwen2-VL "
                    "family: patches = pixels / 14^2, 4 merged into one LLM token); 1003520 = 1280 LLM tokens.")
    min_pixels: Optional[int] = Field(
        None, ge=1, description="Smallest pixels per image, for processors that have this limit (Qwen2-VL family; "
                                "ms-swift MIN_PIXELS, LLaMA-Factory image_min_pixels); null: the processor's own.")
    images_per_sample: int = Field(
        1, ge=0, description="Memory estimate: images (or tiles/crops) per sample that go through the vision tower.")

    @field_validator("train", "eval")
    @classmethod
    def _files(cls, value):
        names = [value] if isinstance(value, str) else value
        if value is not None and (not names or any(not n for n in names)):
            raise ValueError("must be a non-empty path or dataset id, or a non-empty list of them")
        return value


class Distributed(_Strict):
    """Hardware the run is planned for."""

    nodes: int = Field(1, ge=1, description="Number of nodes.")
    gpus_per_node: int = Field(1, ge=1, description="GPUs per node.")
    zero_stage: Optional[Literal[0, 1, 2, 3]] = Field(
        None, description="DeepSpeed ZeRO stage 0-3; omit for plain data parallel without DeepSpeed. Not with fsdp."
    )
    offload: Literal["none", "optimizer", "all"] = Field(
        "none",
        description=(
            "CPU offload: none, optimizer (DeepSpeed ZeRO >= 1), all = optimizer + parameters (ZeRO 3; "
            "with fsdp: parameters, gradients and optimizer states together, FSDP's only offload)."
        ),
    )
    gpu_memory_gb: Optional[float] = Field(None, gt=0, description="Memory of one GPU in GB, to warn when the estimate exceeds it.")
    fsdp: Optional[Literal["full_shard", "shard_grad_op"]] = Field(
        None,
        description=(
            "PyTorch FSDP2 instead of DeepSpeed: full_shard shards weights, gradients and optimizer states and "
            "reshards each block after its forward (like ZeRO-3); shard_grad_op keeps the weights gathered "
            "from forward to backward (like ZeRO-2). Not with zero_stage."
        ),
    )


class Spec(_Strict):
    """A mixspec spec: how each part of a model is trained, and at which learning rate."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, title="mixspec spec (v1)",
    )

    version: Literal[1] = Field(description="Spec language version; always 1.")
    model: str = Field(
        min_length=1,
        description="Model: a catalog id (mixspec models), a Hugging Face/ModelScope cache id, or a local directory with config.json.",
    )
    components: dict[
        Annotated[str, Field(pattern=COMPONENT_NAME_PATTERN)], Component
    ] = Field(
        min_length=1,
        description=(
            "Per-part training. Keys that are role names (" + ", ".join(ROLES) + ") select by role; any "
            "other key selects by `modules` patterns. Parameters in no component are frozen ('unassigned')."
        ),
    )
    training: Training = Field(default_factory=Training, description="Optimisation settings.")
    data: Optional[Data] = Field(None, description="Training data (needed to compile, not to plan).")
    distributed: Distributed = Field(default_factory=Distributed, description="Hardware and ZeRO.")
    output_dir: Optional[str] = Field(None, min_length=1, description="Where the backend writes checkpoints.")
    trust_remote_code: bool = Field(
        False, description="Allow building a model whose config needs code from the model repo (auto_map). Off by default."
    )


def json_schema() -> dict:
    """The published JSON Schema of the spec language."""
    schema = Spec.model_json_schema(mode="validation")
    # pydantic writes the key pattern as patternProperties; without this, a component whose
    # name breaks the pattern would be accepted, unchecked, by editors and jsonschema
    schema["properties"]["components"]["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://mixspec.dev/schemas/mixspec.schema.json"
    return schema
