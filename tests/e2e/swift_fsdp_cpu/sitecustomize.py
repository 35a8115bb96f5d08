"""Test-only shim for tests/e2e/test_swift_fsdp_e2e.py (on PYTHONPATH of the `swift sft` run).

On a machine without GPUs accelerate never picks FSDP: a CPU run under torchrun is MULTI_CPU
(DDP). With MIXSPEC_FSDP_ON_CPU=1 this switches the Trainer's accelerator state to FSDP with the
FullyShardedDataParallelPlugin the Trainer built from ms-swift's --fsdp JSON (as the hf
target's train.py does), so accelerate's own fsdp2_prepare_model shards over gloo. It changes
nothing else: the model, the plugin, ms-swift's optimizer and its saving run as they would on GPUs.

With MIXSPEC_FSDP_RECORD=DIR it also records, at the first training step, what each rank
holds: for every parameter whether it is a DTensor, its local and global shape, and the
learning rate of the optimizer group it sits in (DIR/rank<R>.json); and after training every
parameter gathered by DTensor.full_tensor() (DIR/final.safetensors, from rank 0). The test's
evidence, from outside mixspec's plugin.

Lives here (not in the plugin) because it is the test's doing, not the compiled run's: a run
compiled without a plugin (swift's own flags) goes through the same switch.
"""

import json
import os

if os.environ.get("MIXSPEC_FSDP_ON_CPU") == "1":
    import transformers

    _create = transformers.Trainer.create_accelerator_and_postprocess
    _step = transformers.Trainer.training_step

    def create_accelerator_and_postprocess(self):
        _create(self)
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if not self.args.fsdp or state.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"shim: expected --fsdp on MULTI_CPU, got fsdp={self.args.fsdp!r}, "
                               f"{state.distributed_type}")
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True

    def training_step(self, model, inputs, *args, **kwargs):
        out_dir = os.environ.get("MIXSPEC_FSDP_RECORD")
        if out_dir and not getattr(self, "_mixspec_recorded", False):
            self._mixspec_recorded = True
            lr = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
            params = {}
            for name, p in model.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                params[name] = {"dtensor": type(p).__name__ == "DTensor", "local": list(local.shape),
                                "global": list(p.shape), "requires_grad": p.requires_grad,
                                "dtype": str(p.dtype), "lr": lr.get(id(p))}
            os.makedirs(out_dir, exist_ok=True)
            rank = int(os.environ.get("RANK", "0"))
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
                json.dump({"distributed_type": str(self.accelerator.state.distributed_type),
                           "model_class": type(model).__name__, "params": params}, fh)
        return _step(self, model, inputs, *args, **kwargs)

    def _save_final(model, out_dir):
        """Every parameter, gathered from the shards of all ranks (a collective: all ranks call it)."""
        import safetensors.torch

        full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().contiguous()
                for n, p in model.named_parameters()}
        if int(os.environ.get("RANK", "0")) == 0:
            safetensors.torch.save_file(full, os.path.join(out_dir, "final.safetensors"))

    _train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        out = _train(self, *args, **kwargs)
        out_dir = os.environ.get("MIXSPEC_FSDP_RECORD")
        if out_dir:
            _save_final(self.model, out_dir)
        return out

    transformers.Trainer.train = train
    transformers.Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    transformers.Trainer.training_step = training_step
