"""execution_policy(plan, target) -> ExecutionPolicy: how a backend runs the Plan's model, in
the dtypes and casts that decide its memory. Decided here, once; the estimate reads it.

What each backend does (bf16/fp16 precision; fp32 runs everything in fp32, no autocast):

| | no DeepSpeed | DeepSpeed (any ZeRO stage) |
|---|---|---|
| hf (train.py) | weights_dtype(): frozen weights loaded in 16 bit; setup_model() upcasts what trains to fp32; PEFT's get_peft_model keeps LoRA weights fp32 (autocast_adapter_dtype=True); the Trainer (accelerate) runs the forward under 16-bit autocast | loaded in fp32; the engine casts the whole module (adapters and trained parameters too) to 16 bit (module.bfloat16()/half()); no autocast; fp32 master weights live in the optimizer |
| swift (the plugin, the target's default) | --torch_dtype: frozen 16 bit; the plugin upcasts trained parameters to fp32; LoRA through PEFT, fp32; swift's Trainer is transformers' (autocast) | as hf |
| llamafactory | frozen in the compute dtype; init_adapter's cast_trainable_params_to_fp32 upcasts LoRA and fully trained parameters (not pure_bf16, which the target never sets); upcast_layernorm and upcast_lmhead_output stay at their default (off); Trainer autocast | as hf (ZeRO-3: trainable parameters stay fp32 until the engine casts the module) |

Gradient checkpointing: train.py passes use_reentrant False; swift passes no
gradient_checkpointing_kwargs (transformers' default: non-reentrant in 5.x); LLaMA-Factory
uses use_reentrant_gc (default True) and checkpoints only the blocks that hold a trainable
parameter (get_custom_gradient_checkpointing_func): a frozen block runs without it.

A quantized base (the spec's quantize, hf target without DeepSpeed): ``frozen_dtype`` is the
bitsandbytes method ("nf4", "fp4", "int8"; the compute dtype stays ``compute``) and
``kbit_prepared`` says PEFT's prepare_model_for_kbit_training holds every other base parameter in
fp32; the model-state bytes come from mixspec.planning.estimate.quantized_model_states.

Extension points, for runs other issues add: ``adapter_dtype`` and ``trained_dtype``
(where a backend holds them), ``module_cast`` (an engine that casts the whole module, as
DeepSpeed does; FSDP2's MixedPrecisionPolicy casts parameters for compute the same way) and
``master_dtype`` (where fp32 master weights live).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TARGETS = ("hf", "deepspeed", "swift", "llamafactory")
_ENGINE_NAMES = {"hf": "train.py", "deepspeed": "train.py", "swift": "ms-swift", "llamafactory": "LLaMA-Factory"}


@dataclass(frozen=True)
class ExecutionPolicy:
    """The dtypes a run holds and computes in, and the casts between them."""

    target: str  # hf | swift | llamafactory ("deepspeed" is hf's DeepSpeed config)
    engine: str  # "ddp" (Trainer without DeepSpeed) | "deepspeed" | "fsdp2"
    compute: str  # the dtype activations are computed in: bf16 | fp16 | fp32
    autocast: bool  # the forward runs under torch.autocast(compute)
    frozen_dtype: str  # frozen base weights, as held in memory
    adapter_dtype: str  # LoRA weights, as held in the module the forward uses
    trained_dtype: str  # fully trained parameters, as held in the module the forward uses
    module_cast: str | None = None  # the engine casts the whole module to this dtype
    master_dtype: str | None = None  # fp32 master copies kept by the optimizer (DeepSpeed)
    checkpoint_reentrant: bool = False
    checkpoint_frozen_blocks: bool = True  # False: blocks without a trainable parameter run without checkpointing
    # the device the forward runs on: "cuda" for a training run. The CPU benchmark sets "cpu",
    # where two ops differ: CPU autocast keeps layer_norm in the compute dtype (CUDA's op list
    # runs it in fp32), and CPU dropout keeps its mask in the input's dtype (CUDA: 1-byte bool)
    device: str = "cuda"
    attention: str = "sdpa"
    # a quantized base (frozen_dtype nf4/fp4/int8): PEFT's prepare_model_for_kbit_training holds
    # every parameter bitsandbytes does not quantize in fp32 (mixspec.planning.estimate.quantized_model_states)
    kbit_prepared: bool = False

    @property
    def activation_bytes(self) -> int:
        return 4 if self.compute == "fp32" else 2

    @property
    def adapter_copies(self) -> bool:
        """Each LoRA adapter casts its input to its own dtype and autocast casts it back: a
        fresh compute-dtype copy per adapted Linear, kept for backward."""
        return self.autocast and self.adapter_dtype != self.compute

    @property
    def trained_copies(self) -> bool:
        """Fully trained fp32 weights under autocast: each forward keeps a compute-dtype copy of
        the weight (autocast's cast), and fp32 outputs (a trained norm's) are cast per reader."""
        return self.autocast and self.trained_dtype != self.compute

    def describe(self) -> str:
        """One line: how the target runs it."""
        who = _ENGINE_NAMES.get(self.target, self.target)
        if self.compute == "fp32":
            how = "fp32 throughout, no autocast"
        elif self.module_cast and self.engine == "fsdp2":
            how = (f"FSDP2 gathers every parameter in {self.module_cast} for compute (LoRA and trained weights "
                   f"too), {self.master_dtype} shards of what trains")
        elif self.module_cast:
            how = (f"DeepSpeed casts the whole module to {self.module_cast} (LoRA and trained weights too), "
                   f"no autocast, {self.master_dtype} master weights in the optimizer")
        else:
            how = (f"{self.compute} autocast, LoRA weights {self.adapter_dtype}, trained weights {self.trained_dtype}, "
                   f"frozen {self.frozen_dtype}")
            if self.kbit_prepared:
                how += " (bitsandbytes; every other base parameter fp32: PEFT's k-bit preparation)"

        ckpt = "reentrant" if self.checkpoint_reentrant else "non-reentrant"
        if not self.checkpoint_frozen_blocks:
            ckpt += ", trainable blocks only"
        return f"as {who} runs it: {how}; checkpointing {ckpt}"

    def to_json(self) -> dict:
        return {**asdict(self), "describe": self.describe()}


def execution_policy(plan, target: str | None = None, deepspeed: bool | None = None,
                     fsdp: str | bool | None = None) -> ExecutionPolicy:
    """The policy of ``target`` (default hf: the train.py the hf target writes) for the Plan's
    precision and its ``distributed`` block (a ZeRO stage means DeepSpeed, ``fsdp`` FSDP2;
    ``deepspeed`` and ``fsdp`` (a strategy, or False: none) override them, for fit's what-ifs)."""
    target = target or "hf"
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (one of {', '.join(TARGETS)})")
    compute = plan.training.precision
    if deepspeed is None:
        deepspeed = plan.distributed.zero_stage is not None
    reentrant = target == "llamafactory"
    frozen_blocks = target != "llamafactory"
    if fsdp is None and not deepspeed:
        fsdp = getattr(plan.distributed, "fsdp", None)
    if fsdp:
        return _fsdp_policy(target, compute, reentrant, frozen_blocks)
    if compute == "fp32":
        return ExecutionPolicy(target, "deepspeed" if deepspeed else "ddp", "fp32", False, "fp32", "fp32", "fp32",
                               checkpoint_reentrant=reentrant, checkpoint_frozen_blocks=frozen_blocks)
    if deepspeed:
        return ExecutionPolicy(target, "deepspeed", compute, False, compute, compute, compute, module_cast=compute,
                               master_dtype="fp32", checkpoint_reentrant=reentrant,
                               checkpoint_frozen_blocks=frozen_blocks)
    q = plan.quant_config()
    return ExecutionPolicy(target, "ddp", compute, True, q.method if q else compute, "fp32",
                           plan.training.trained_dtype, checkpoint_reentrant=reentrant,
                           checkpoint_frozen_blocks=frozen_blocks, kbit_prepared=q is not None)


def _fsdp_policy(target: str, compute: str, reentrant: bool, frozen_blocks: bool) -> ExecutionPolicy:
    """FSDP2 as train.py runs it through accelerate (utils/fsdp_utils.py fsdp2_prepare_model):
    trained parameters upcast to fp32 and sharded (the shards are the master weights), frozen
    ones sharded in the load dtype; MixedPrecisionPolicy(param_dtype=compute) gathers every
    parameter in the compute dtype for the forward, so LoRA and trained weights compute in 16
    bit (no autocast copies); the Trainer's autocast stays on."""
    if compute == "fp32":
        return ExecutionPolicy(target, "fsdp2", "fp32", False, "fp32", "fp32", "fp32",
                               checkpoint_reentrant=reentrant, checkpoint_frozen_blocks=frozen_blocks)
    return ExecutionPolicy(target, "fsdp2", compute, True, compute, compute, compute, module_cast=compute,
                           master_dtype="fp32", checkpoint_reentrant=reentrant, checkpoint_frozen_blocks=frozen_blocks)
