"""A test-only ms-swift 4.x plugin: ``--external_plugins swift_dump_plugin.py --callbacks
mixspec_test_dump`` saves every parameter of the model swift trains, at the start and at the
end of training, to ``OUTPUT_DIR/params_begin.safetensors`` and ``params_end.safetensors``
(names as in the bare model: PEFT's ``base_model.model.`` prefix and ``.base_layer`` removed).
The e2e tests compare them with the model directory's weights and with the Plan: frozen
parameters must come out bit-identical. Not part of what mixspec generates."""

import os

import safetensors.torch
from swift.callbacks.base import TrainerCallback as SwiftCallback
from swift.callbacks.mapping import callbacks_map


def _plain(name):
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


class DumpParams(SwiftCallback):
    def _dump(self, which, model):
        tensors = {}
        for name, param in model.named_parameters():
            tensors[_plain(name)] = param.detach().cpu().clone().contiguous()
        path = os.path.join(self.args.output_dir, f"params_{which}.safetensors")
        os.makedirs(self.args.output_dir, exist_ok=True)
        safetensors.torch.save_file(tensors, path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._dump("begin", model if model is not None else self.trainer.model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._dump("end", model if model is not None else self.trainer.model)


callbacks_map["mixspec_test_dump"] = DumpParams


class RecordOptimizer(SwiftCallback):
    """``--callbacks mixspec_test_optimizer``: at the start of training, every parameter the
    optimizer holds -> its group's learning rate, weight decay and the parameter's dtype, in
    ``OUTPUT_DIR/optimizer_record.json``, and every other parameter's dtype in
    ``frozen_dtypes.json`` (names as in the bare model). Works whatever built the optimizer
    (swift's own, its multimodal one, or mixspec's plugin)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        import json

        model = model if model is not None else self.trainer.model
        optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        names = {id(p): _plain(n) for n, p in model.named_parameters()}
        record = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                record[names[id(param)]] = {"lr": group.get("initial_lr", group["lr"]),
                                            "weight_decay": group.get("weight_decay", 0.0),
                                            "dtype": str(param.dtype).replace("torch.", "")}
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        frozen = {_plain(n): str(p.dtype).replace("torch.", "") for n, p in model.named_parameters()
                  if id(p) not in held}
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "optimizer_record.json"), "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1, sort_keys=True)
        with open(os.path.join(self.args.output_dir, "frozen_dtypes.json"), "w", encoding="utf-8") as fh:
            json.dump(frozen, fh, indent=1, sort_keys=True)


callbacks_map["mixspec_test_optimizer"] = RecordOptimizer
