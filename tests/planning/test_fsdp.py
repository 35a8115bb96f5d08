"""FSDP2 (distributed.fsdp) in the compiler and the hf target, without running it.

- wrap units: the blocks mixspec finds in its tree are exactly the modules transformers
  itself marks as layers (GradientCheckpointingLayer), in every tiny family, vision and
  language towers alike;
- the hf target's fsdp_config.json, read by transformers' own TrainingArguments, gives the
  FSDP plugin the planned units, strategy and offload; gradient checkpointing is the
  Trainer's switch (transformers' per-layer checkpointing), never together with FSDP's.

The run itself (2 processes on CPU, gloo) is tests/e2e/test_fsdp_e2e.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mixspec.language.loader import load_spec_text  # noqa: E402
from mixspec.planning.resolve import plan_spec  # noqa: E402
from mixspec.targets import TargetOptions, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinymodels  # noqa: E402

SPEC = """version: 1
model: {model}
components:
  language: {{train: lora, lr: 1.0e-4}}
training: {{gradient_checkpointing: {gc}}}
data: {{train: data/train.jsonl}}
distributed: {{gpus_per_node: 4, fsdp: {fsdp}, offload: {offload}}}
"""


def _plan(model, fsdp="full_shard", offload="none", gc="true"):
    return plan_spec(load_spec_text(SPEC.format(model=model, fsdp=fsdp, offload=offload, gc=gc), "spec.yaml"))


def _layer_modules(config: dict) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> class of every module transformers marks as a layer, the oracle; name -> class
    of every entry of a ModuleList)."""
    from transformers import CONFIG_MAPPING
    from transformers.modeling_layers import GradientCheckpointingLayer

    cfg = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = cls._from_config(cfg)
    marked = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}
    listed = {f"{n}.{i}": type(c).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
              for i, c in enumerate(m)}
    return marked, listed


@pytest.mark.parametrize("family", tinymodels.families())
def test_units_are_the_layers_transformers_marks(family, tmp_path):
    config = tinymodels.tiny_config(family)
    model_dir = tinymodels.write_config_dir(config, tmp_path / family)
    plan = _plan(model_dir)
    planned = {f"{u['prefix']}.{i}": u["class"] for u in plan.units for i in u["indices"]}
    marked, listed = _layer_modules(config)
    # every layer transformers marks is a unit; a unit it does not mark (Mllama's vision
    # layers are plain modules) is still an entry of one of the model's ModuleLists
    assert {n: c for n, c in planned.items() if n in marked} == marked
    assert all(listed.get(n) == c for n, c in planned.items()), planned
    roles = {u["role"] for u in plan.units}
    assert "language" in roles and (("vision" in roles) == ("vision" in plan.roles))


def test_hf_fsdp_config_is_what_the_trainer_builds_its_plugin_from(tmp_path):
    from transformers import TrainingArguments

    plan = _plan("Qwen/Qwen2.5-VL-7B-Instruct", offload="all")
    files = render(plan, "hf", TargetOptions())
    config = json.loads(files["fsdp_config.json"])
    assert config["version"] == 2
    # the classes of the blocks of both towers, by the model's own names
    assert config["transformer_layer_cls_to_wrap"] == ["Qwen2_5_VLVisionBlock", "Qwen2_5_VLDecoderLayer"]
    assert "ds_config.json" not in files
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=dict(config), use_cpu=True)
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["transformer_cls_names_to_wrap"] == "Qwen2_5_VLVisionBlock,Qwen2_5_VLDecoderLayer"
    assert plugin["cpu_offload"] is True and plugin["activation_checkpointing"] is False
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"
    launch = files["launch.sh"]
    assert "FSDP2 full_shard" in launch and "offload all" in launch


def test_shard_grad_op_keeps_weights_gathered():
    plan = _plan("Qwen/Qwen2.5-VL-7B-Instruct", fsdp="shard_grad_op", gc="false")
    config = json.loads(render(plan, "hf", TargetOptions())["fsdp_config.json"])
    assert config["reshard_after_forward"] is False and config["cpu_offload"] is False


def _import_train(path: Path):
    spec = importlib.util.spec_from_file_location("train_fsdp_args", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_py_checkpoints_with_the_trainers_switch_never_both(tmp_path):
    from mixspec.output import write_files

    plan = _plan("llava-hf/llava-1.5-7b-hf")
    write_files(tmp_path, render(plan, "hf", TargetOptions()), force=True)
    module = _import_train(tmp_path / "train.py")
    assert module.FSDP_CONFIG == "fsdp_config.json"
    assert module.expand_names(module.FSDP_UNITS) == {f"{u['prefix']}.{i}" for u in plan.units for i in u["indices"]}
    args = module.training_arguments(module.parse_args(["--output-dir", str(tmp_path / "o")]))
    switch = "activation_checkpointing" if hasattr(args, "activation_checkpointing") else "gradient_checkpointing"
    # transformers' own per-layer checkpointing (the spec's default on), FSDP's off: the Trainer refuses both
    assert args.fsdp and args.fsdp_plugin_args["activation_checkpointing"] is False and getattr(args, switch) is True
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**json.loads((tmp_path / "fsdp_config.json").read_text()),
                                  "activation_checkpointing": True}))
    args = module.training_arguments(module.parse_args(["--output-dir", str(tmp_path / "o"), "--fsdp-config", str(edited)]))
    assert args.fsdp_plugin_args["activation_checkpointing"] is True and getattr(args, switch) is False
    assert module.engine_text(module.parse_args([])).startswith("engine: FSDP2")


def test_fsdp_policy_is_accelerates_mixed_precision():
    """The execution policy of an FSDP2 run: every parameter gathered in the compute dtype (the
    param_dtype of the MixedPrecisionPolicy accelerate builds for bf16), so LoRA and trained
    weights compute in bf16 and no autocast copy of them is counted."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from mixspec.planning.estimate import estimate

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    plan = _plan("Qwen/Qwen2.5-VL-7B-Instruct")
    policy = estimate(plan).policy
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert (policy.engine, policy.module_cast, policy.adapter_dtype) == ("fsdp2", "bf16", "bf16")
    assert not policy.adapter_copies and "FSDP2 gathers every parameter in bf16" in policy.describe()
    # the same spec without fsdp: the DDP run keeps fp32 LoRA weights and their autocast copies
    ddp = estimate(plan, {"zero_stage": None}).policy
    assert ddp.engine == "ddp" and ddp.adapter_copies


def test_hf_refuses_a_quantized_base_or_8bit_optimizer_with_fsdp():
    text = SPEC.format(model="Qwen/Qwen2.5-VL-7B-Instruct", fsdp="full_shard", offload="none", gc="true")
    for extra, what in (("  language: {train: lora, lr: 1.0e-4, quantize: nf4}", "quantize with distributed.fsdp"),
                        ("  language: {train: lora, lr: 1.0e-4}\n  # 8-bit", "training.optimizer adamw_8bit")):
        spec = text.replace("  language: {train: lora, lr: 1.0e-4}", extra)
        if "8-bit" in extra:
            spec = spec.replace("training: {", "training: {optimizer: adamw_8bit, ")
        plan = plan_spec(load_spec_text(spec, "spec.yaml"))
        from mixspec.errors import MixspecError

        with pytest.raises(MixspecError) as err:
            render(plan, "hf", TargetOptions())
        assert what in str(err.value) and "drop distributed.fsdp" in str(err.value)


def test_swift_fsdp_json_is_what_the_trainer_builds_its_plugin_from(tmp_path):
    """swift's --fsdp JSON: swift passes its ``fsdp`` string and ``fsdp_config`` dict to the
    Trainer's arguments (swift/arguments/sft_args.py _init_fsdp); transformers' own
    TrainingArguments turns them into the FSDP plugin's arguments: the hf target's."""
    from transformers import TrainingArguments

    for fsdp, offload, reshard in (("full_shard", "all", True), ("shard_grad_op", "none", False)):
        plan = _plan("Qwen/Qwen2.5-VL-7B-Instruct", fsdp=fsdp, offload=offload)
        files = render(plan, "swift", TargetOptions())
        sw = json.loads(files["fsdp_config.json"])
        assert sw["fsdp_config"]["fsdp_version"] == 2 and "version" not in sw["fsdp_config"]
        assert '--fsdp "$HERE/fsdp_config.json"' in files["train.sh"] and "--deepspeed" not in files["train.sh"]
        args = TrainingArguments(output_dir=str(tmp_path), fsdp=sw["fsdp"], fsdp_config=dict(sw["fsdp_config"]),
                                 use_cpu=True)
        hf = json.loads(render(plan, "hf", TargetOptions())["fsdp_config.json"])
        want = TrainingArguments(output_dir=str(tmp_path), fsdp=True, fsdp_config=hf, use_cpu=True).fsdp_plugin_args
        plugin = args.fsdp_plugin_args
        assert plugin == want
        assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is reshard
        assert plugin["transformer_cls_names_to_wrap"] == "Qwen2_5_VLVisionBlock,Qwen2_5_VLDecoderLayer"
        assert plugin.get("cpu_offload", False) is (offload == "all") and plugin["activation_checkpointing"] is False
        assert plugin["state_dict_type"] == "FULL_STATE_DICT"


def test_swift_refuses_fsdp_it_cannot_run_exactly():
    import dataclasses

    from mixspec.errors import UnsupportedError

    plan = _plan("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(UnsupportedError) as err:
        render(plan, "swift", TargetOptions(swift_version=3))
    assert [i.code for i in err.value.items] == ["fsdp-swift3"]
    bf16 = dataclasses.replace(plan, training=dataclasses.replace(plan.training, precision="bf16",
                                                                  trained_dtype="bf16"))
    with pytest.raises(UnsupportedError) as err:
        render(bf16, "swift", TargetOptions())
    assert [i.code for i in err.value.items] == ["fsdp-trained-dtype"]
    assert "upcasts every trainable parameter to fp32" in str(err.value)
    spec = SPEC.format(model="Qwen/Qwen2.5-VL-7B-Instruct", fsdp="full_shard", offload="none", gc="true")
    spec = spec.replace("{train: lora, lr: 1.0e-4}", "{train: lora, lr: 1.0e-4, quantize: nf4}")
    with pytest.raises(UnsupportedError) as err:
        render(plan_spec(load_spec_text(spec, "spec.yaml")), "swift", TargetOptions())
    assert "quantize-fsdp" in [i.code for i in err.value.items]
