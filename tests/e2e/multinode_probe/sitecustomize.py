"""Test-only probe for the multi-node tests (tests/e2e/test_multinode.py), never generated.

On PYTHONPATH with MIXSPEC_PROBE_DIR set, every training process (one with RANK in its
environment: the workers torchrun, the deepspeed launcher and swift start) gets a Trainer
callback that, at the end of training, writes what that rank ended with:

- ``PROBE_DIR/rank{RANK}.json``: rank, world size, node (its working directory), steps, the
  wrapped model's and optimizer's types, the DeepSpeed ZeRO stage, and each trainable
  parameter's learning rate as the optimizer in use holds it (through DeepSpeed's ZeRO
  optimizers, which keep their own copies of the groups);
- ``PROBE_DIR/rank{RANK}.safetensors``: every trainable parameter as that rank holds it
  (gathered from its ZeRO-3 shards), under bare-model names (PEFT's ``base_model.model.``
  prefix dropped).

With MIXSPEC_PROBE_CPU_DEEPSPEED=1, two CPU-only workarounds for DeepSpeed, which the tests
run on CPU (DS_ACCELERATOR=cpu) and nobody trains with: DeepSpeed does not build its
shared-memory communication op (a minutes-long C++ build that gloo does not need); and
accelerate gets the backend "gloo" for DeepSpeed: without a GPU it finds none and then counts
one process on every rank (``PartialState``: "No backend == no distributed training"), so each
rank would take itself for rank 0 and DeepSpeed would refuse the batch size. On GPUs
accelerate picks nccl itself.
Loaded by the interpreter itself (``sitecustomize``): the launchers run unchanged.
"""

import json
import os


def _plain(name):
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


def _unwrap_optimizer(opt):
    """The optimizer that maps parameters to groups: DeepSpeed's ZeRO optimizer, or torch's."""
    seen = set()
    while id(opt) not in seen:
        seen.add(id(opt))
        if hasattr(opt, "bit16_groups") or hasattr(opt, "fp16_groups"):
            return opt
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            return opt
        opt = inner
    return opt


def _lr_by_param(opt, model):
    names = {id(p): _plain(n) for n, p in model.named_parameters()}
    zero = _unwrap_optimizer(opt)
    groups = zero.param_groups
    members = getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", None)
    out = {}
    if members is None:  # torch's optimizer: the groups hold the parameters
        for group in groups:
            for p in group["params"]:
                out[names[id(p)]] = group["lr"]
        return out
    to_group = getattr(zero, "sub_group_to_group_id", None)  # ZeRO-3 splits groups into sub-groups
    for i, params in enumerate(members):
        group = groups[to_group[i] if to_group is not None else i]
        for p in params:
            out[names[id(p)]] = group["lr"]
    return out


def _install():
    from transformers import Trainer, TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_train_end(self, args, state, control, **kwargs):
            import torch
            from safetensors.torch import save_file

            trainer = self.trainer
            model = trainer.model
            trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            stage = 0
            if getattr(trainer, "is_deepspeed_enabled", False):
                stage = trainer.model_wrapped.zero_optimization_stage()
            if stage == 3:  # every rank must join the gather
                import deepspeed

                with deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None):
                    tensors = {_plain(n): p.detach().float().cpu().clone() for n, p in trained}
            else:
                tensors = {_plain(n): p.detach().float().cpu().clone() for n, p in trained}
            rank = int(os.environ["RANK"])
            out = os.environ["MIXSPEC_PROBE_DIR"]
            save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
            report = {
                "rank": rank, "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
                "node": os.getcwd(), "steps": state.global_step,
                "wrapped": type(trainer.model_wrapped).__name__,
                "optimizer": type(_unwrap_optimizer(trainer.optimizer)).__name__, "zero_stage": stage,
                "lr_by_param": _lr_by_param(trainer.optimizer, model),
            }
            with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
                json.dump(report, fh)

    import functools

    original = Trainer.__init__

    @functools.wraps(original)  # callers read its signature (ms-swift: tokenizer or processing_class)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Probe(self))

    Trainer.__init__ = init


def _cpu_deepspeed():
    import deepspeed.ops
    from accelerate.state import PartialState

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if backend is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            backend = "gloo"
        return backend, distributed_type

    PartialState._prepare_backend = prepare_backend


if os.environ.get("MIXSPEC_PROBE_DIR") and "RANK" in os.environ:
    if os.environ.get("MIXSPEC_PROBE_CPU_DEEPSPEED") == "1":
        _cpu_deepspeed()
    _install()
