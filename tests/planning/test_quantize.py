"""Quantized bases and 8-bit optimizers: the Plan's quantized modules and byte formulas
against real bitsandbytes and transformers on CPU.

Oracles: the storage bytes of every tensor bitsandbytes keeps (quantized data, absmax,
codes, nested state, row scales), the state of a real bnb AdamW8bit / PagedAdamW8bit /
PagedAdamW after a step, and the modules transformers replaces by bnb.nn.Linear4bit when a
tiny model is loaded with the Plan's skip list.
"""

from __future__ import annotations

import re
import warnings

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from mixspec.language.loader import load_spec_text  # noqa: E402
from mixspec.planning.quantize import optimizer_fixed_bytes, optimizer_state_bytes, quantized_weight_bytes  # noqa: E402
from mixspec.planning.resolve import resolve  # noqa: E402
from mixspec.errors import SpecError  # noqa: E402

SHAPES = [(128, 64), (37, 100), (4096, 1024), (777, 333), (32, 32)]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared storage counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def quant_tensors(param):
    """Every tensor bitsandbytes holds for one weight: data, 4-bit quant state or int8 scales."""
    out = [param.data, getattr(param, "SCB", None)]
    qs = getattr(param, "quant_state", None)
    if qs is not None:
        out += [qs.absmax, qs.code]
        if qs.nested:
            out += [qs.state2.absmax, qs.state2.code, qs.offset]
    return out


def within(estimate, measured, tol=0.02):
    return abs(estimate - measured) <= tol * measured


@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("method,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_4bit_weight_bytes_equal_bitsandbytes(out_f, in_f, method, double_quant):
    weight = torch.randn(out_f, in_f)
    param = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant, quant_type=method)
    param = param._quantize("cpu")
    measured = storage_bytes(quant_tensors(param))
    assert quantized_weight_bytes(method, double_quant, out_f, in_f) == measured


@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_int8_weight_bytes_equal_bitsandbytes(out_f, in_f):
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    q = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    q.load_state_dict(linear.state_dict())
    q = q.to("cpu")
    assert q.weight.dtype == torch.int8
    measured = storage_bytes(quant_tensors(q.weight))
    assert quantized_weight_bytes("int8", False, out_f, in_f) == measured


@pytest.mark.parametrize("optimizer,cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit"),
                                           ("paged_adamw", "PagedAdamW"), ("adamw", "AdamW")])
def test_optimizer_state_bytes_equal_bitsandbytes(optimizer, cls):
    # sizes on both sides of bnb's 4096-element threshold for 8-bit states, in two groups
    sizes = [(64, 128), (100, 37), (4096,), (333, 777), (10,), (4095,)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in sizes]
    factory = getattr(bnb.optim, cls) if optimizer != "adamw" else torch.optim.AdamW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers fall back to plain memory on CPU
        opt = factory([{"params": params[:3], "lr": 1e-3}, {"params": params[3:], "lr": 1e-4}])
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    moments = [t for p in params for k, t in opt.state[p].items() if k != "step"]
    measured = storage_bytes(moments)
    numels = [p.numel() for p in params]
    estimate = sum(optimizer_state_bytes(optimizer, n) for n in numels) + optimizer_fixed_bytes(optimizer, numels)
    assert estimate == measured


# -- the Plan's quantized modules, against transformers' replacement ----------------------

SPEC = """version: 1
model: tiny/qwen2_5_vl
components:
  vision: {{train: full, lr: 1.0e-5}}
  aligner: {{train: full, lr: 1.0e-4}}
  language: {{train: lora, lr: 1.0e-3, quantize: {method}{options}}}
training: {{precision: bf16, optimizer: adamw_8bit}}
"""


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from mixspec.models.tree import tree_from_model
    from tinymodels import build_model, tiny_config

    model = build_model(tiny_config("qwen2_5_vl"))
    path = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(path)
    return type(model), path, tree_from_model(model)


def plan_for(tree, method="nf4", options=""):
    return resolve(load_spec_text(SPEC.format(method=method, options=options), "q.yaml"), tree)


def bnb_config(plan):
    """The BitsAndBytesConfig train.py builds (mixspec.targets.hf writes the same values)."""
    import transformers

    q = plan.quant_config()
    skip = [re.escape(n) for n in plan.quant_skip_modules]
    if q.method == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[q.compute_dtype]
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.method, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)


@pytest.mark.parametrize("method,options", [("nf4", ""), ("fp4", ", quantize_options: {double_quant: false}"),
                                            ("int8", "")])
def test_planned_modules_are_what_transformers_quantizes_and_bytes_match(tiny_qwen, method, options):
    from peft import prepare_model_for_kbit_training

    from mixspec.planning.estimate import quantized_model_states, trained_sizes

    cls, path, tree = tiny_qwen
    plan = plan_for(tree, method, options)
    assert plan.quant_skip_modules == ("lm_head", "model.visual")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(path, quantization_config=bnb_config(plan), device_map="cpu",
                                    dtype=torch.bfloat16)
    kinds = (bnb.nn.Linear8bitLt,) if method == "int8" else (bnb.nn.Linear4bit,)
    found = {n for n, m in model.named_modules() if isinstance(m, kinds)}
    planned = set(plan.component("language").quantize.modules)
    assert found == planned and len(planned) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    tensors = []
    for p in model.parameters():
        tensors += quant_tensors(p)
    measured = storage_bytes(tensors)
    weights, _, _ = quantized_model_states(plan)
    adapters = 4 * sum(s for c in plan.components if c.lora for s in c.lora.param_sizes)
    # the loaded model has no adapters yet: the estimate's weights less the fp32 LoRA tensors
    assert within(weights - adapters, measured), (weights - adapters, measured)
    assert sum(trained_sizes(plan)) == plan.totals.trainable_params


def test_lm_head_is_never_quantized(tiny_qwen):
    _, _, tree = tiny_qwen
    text = ("version: 1\nmodel: tiny/qwen2_5_vl\ncomponents:\n  language: {train: lora, lr: 1.0e-3}\n"
            "  lm_head: {train: freeze, quantize: nf4}\n")
    with pytest.raises(SpecError) as err:
        resolve(load_spec_text(text, "q.yaml"), tree)
    problem = err.value.problems[0]
    assert problem.path == "components.lm_head.quantize" and "no Linear module" in problem.message
    assert str(problem.location) == "q.yaml:5:38"


def test_one_quantization_config_for_the_model(tiny_qwen):
    _, _, tree = tiny_qwen
    text = ("version: 1\nmodel: tiny/qwen2_5_vl\ncomponents:\n  language: {train: lora, lr: 1.0e-3, quantize: nf4}\n"
            "  vision: {train: freeze, quantize: int8}\n")
    with pytest.raises(SpecError) as err:
        resolve(load_spec_text(text, "q.yaml"), tree)
    assert "one quantization config" in err.value.problems[0].message


def test_counts_are_unchanged_by_quantization(tiny_qwen):
    _, _, tree = tiny_qwen
    quantized, plain = plan_for(tree), resolve(load_spec_text(
        SPEC.format(method="nf4", options="").replace(", quantize: nf4", ""), "q.yaml"), tree)
    assert quantized.totals == plain.totals
    assert [c.trainable_params for c in quantized.components] == [c.trainable_params for c in plain.components]
    assert quantized.fingerprint() == plain.fingerprint()


def test_fit_searches_no_deepspeed_for_a_quantized_plan(tiny_qwen):
    from mixspec.planning.fit import fit

    _, _, tree = tiny_qwen
    result = fit(plan_for(tree), 0.001)  # nothing fits: every option is listed
    assert result.options and {o.zero_stage for o in result.options} == {None}


@pytest.mark.parametrize("optimizer,cls", [("adamw_torch_8bit", "AdamW8bit"), ("adamw_torch_4bit", "AdamW4bit")])
def test_optimizer_state_bytes_equal_torchao(optimizer, cls):
    """torchao's low-bit AdamW (what transformers' adamw_torch_8bit/4bit and train.py build):
    tensor-subclass moments (codes, scales, lookup table) measured storage by storage; sizes on
    both sides of its 4096-element threshold and of whole blocks (4160 = 16.25 blocks of 256)."""
    torchao_optim = pytest.importorskip("torchao.optim")
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def inner(t):
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            return [x for n in names for x in inner(getattr(t, n))]
        return [t]

    sizes = [(64, 128), (100, 37), (4096,), (4160,), (10,), (512, 24)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in sizes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = getattr(torchao_optim, cls)([{"params": params[:3], "lr": 1e-3}, {"params": params[3:], "lr": 1e-4}])
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    moments = [x for p in params for k, t in opt.state[p].items() if k != "step" for x in inner(t)]
    numels = [p.numel() for p in params]
    estimate = sum(optimizer_state_bytes(optimizer, n) for n in numels) + optimizer_fixed_bytes(optimizer, numels)
    assert estimate == storage_bytes(moments)
    assert any(is_traceable_wrapper_subclass(t) for p in params for t in opt.state[p].values())  # low-bit taken
