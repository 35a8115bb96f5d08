"""The FSDP2 configuration of a Plan (``distributed.fsdp``), in the Trainer's words.

One dict for every target that runs FSDP2 through the Hugging Face Trainer/accelerate: the
Trainer's ``fsdp_config`` (keys without accelerate's ``fsdp_`` prefix; accelerate's YAML and
ms-swift's JSON carry the same values). The decisions:

- version 2 (``fully_shard``: one DTensor per parameter, so frozen and trained parameters
  share a unit and optimizer groups stay per parameter; FSDP1's flat parameters need one
  ``requires_grad`` per unit).
- wrap units: the blocks of every tower (mixspec.planning.units), named by class; what is outside the
  blocks goes to accelerate's embedding, tail (final norm + lm_head) and root units.
- ``reshard_after_forward``: true for full_shard (weights sharded between forward and
  backward, like ZeRO-3), false for shard_grad_op (gathered until backward, like ZeRO-2).
- ``cpu_offload``: offload all (FSDP moves parameters, gradients and optimizer states to
  CPU together; there is no optimizer-only offload).
- ``activation_checkpointing``: false; training.gradient_checkpointing stays the Trainer's
  switch (the Trainer refuses both on). transformers 5 checkpoints each layer's ``forward``,
  inside FSDP2's hooks, so the recompute in backward reuses the gathered block (no second
  all-gather) and is the same checkpointing the DDP and DeepSpeed runs have. FSDP's own
  (torch's checkpoint_wrapper around each unit) failed on Gemma 3 here: the recomputed
  attention got a mask of another length (tests/e2e/test_fsdp_e2e.py runs Gemma 3).
- one original dtype per unit: FSDP2 asserts that the *trainable* parameters of a unit share
  one dtype. train.py keeps every trained parameter (full or LoRA) in fp32 and frozen ones in
  the training precision, so every unit qualifies without splitting LoRA modules into units
  of their own: the memory is the same (adapters are fp32 either way, mixspec's estimate
  counts 4 + 4 + 8 bytes for them), with one all-gather per block instead of one per adapter.
- the full state dict at save time (gathered on rank 0), so a checkpoint is today's
  adapter_model.safetensors + trained_params.safetensors and --merge works unchanged.
"""

from __future__ import annotations

from ..planning.plan import Plan
from ..planning.units import wrap_classes

FSDP_FILE = "fsdp_config.json"


def trainer_fsdp_config(plan: Plan) -> dict:
    """The Trainer's ``fsdp_config`` for a Plan with ``distributed.fsdp`` set."""
    dist = plan.distributed
    return {
        "version": 2,
        "reshard_after_forward": dist.fsdp == "full_shard",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": wrap_classes(plan.units),
        "cpu_offload": dist.offload == "all",
        "activation_checkpointing": False,
        "state_dict_type": "FULL_STATE_DICT",
        # accelerate's rank-0 loading moves the model to meta and back; train.py loads on
        # every rank (the plan's checks run on the loaded model before sharding)
        "cpu_ram_efficient_loading": False,
    }


def unit_prefixes(plan: Plan) -> dict[str, list[int]]:
    """Block list prefix -> indices: the modules train.py checks are FSDP units after preparation."""
    out: dict[str, list[int]] = {}
    for unit in plan.units:
        out.setdefault(unit["prefix"], []).extend(unit["indices"])
    return {k: sorted(v) for k, v in out.items()}


def describe(plan: Plan) -> str:
    """One line: how the run shards (launch.sh's header, train.py's start)."""
    dist = plan.distributed
    how = ("weights, gradients and optimizer states sharded, blocks resharded after forward"
           if dist.fsdp == "full_shard" else "gradients and optimizer states sharded, weights gathered forward to backward")
    offload = ", offload all (parameters, gradients, optimizer states on CPU)" if dist.offload == "all" else ""
    return f"FSDP2 {dist.fsdp} ({how}){offload}"
