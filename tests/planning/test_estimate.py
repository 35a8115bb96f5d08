"""The memory estimate against numbers worked out by hand from the formula (the table in
mixspec.planning.estimate), bytes per parameter as (weight, gradient, AdamW states):

    DeepSpeed, bf16/fp16: frozen (2, 0, 0); full and LoRA (2, 2, 12: fp32 master, m, v)
    DeepSpeed, fp32:      frozen (4, 0, 0); full and LoRA (4, 4, 8)
    no DeepSpeed, bf16/fp16: frozen (2, 0, 0); full and LoRA (4, 4, 8: trained params upcast to fp32)
    no DeepSpeed, fp32:      frozen (4, 0, 0); full and LoRA (4, 4, 8)

    N = nodes x gpus_per_node; ZeRO-1 divides the optimizer states by N, ZeRO-2 also the
    gradients, ZeRO-3 also the weights; offload moves states (and with "all" the weights)
    to CPU memory. Activations: tests/planning/test_activations.py.

The plan under test: 1,000,000 base parameters of which a full component trains
F = 100,000 (so 900,000 are frozen), plus L = 20,000 LoRA parameters. All A = 1,020,000,
trainable T = 120,000.
"""

from __future__ import annotations

import dataclasses

import pytest

from mixspec.planning.estimate import GIB, estimate
from mixspec.planning.plan import Totals
from mixspec.language.settings import DistributedSettings


@pytest.fixture(scope="module")
def base_plan():
    from mixspec.language.loader import load_spec_text
    from mixspec.planning.resolve import resolve
    from mixspec.models.tree import tree_from_model
    from tinymodels import build_model, tiny_config

    tree = tree_from_model(build_model(tiny_config("llama")))
    plan = resolve(load_spec_text(
        "version: 1\nmodel: x/y\ncomponents:\n  language: {train: lora, lr: 1.0e-4}\n"
        "  lm_head: {train: full, lr: 1.0e-5}\n", "s.yaml"), tree)
    language, head = plan.components
    return dataclasses.replace(
        plan,
        components=(dataclasses.replace(language, trainable_params=20_000),
                    dataclasses.replace(head, base_params=100_000, trainable_params=100_000)),
        totals=Totals(base_params=1_000_000, added_params=20_000, trainable_params=120_000))


def with_hardware(plan, precision, nodes, gpn, stage, offload, gpu_memory_gb=None, fsdp=None):
    return dataclasses.replace(
        plan, training=dataclasses.replace(plan.training, precision=precision),
        distributed=DistributedSettings(nodes=nodes, gpus_per_node=gpn, zero_stage=stage, offload=offload,
                                        gpu_memory_gb=gpu_memory_gb, fsdp=fsdp))


CASES = [
    # precision, nodes, gpus/node, stage, offload -> weights, gradients, optimizer, cpu per node
    # no DeepSpeed, fp32: 4A, 4T, 8T
    (("fp32", 1, 1, None, "none"), (4_080_000, 480_000, 960_000, 0)),
    # no DeepSpeed, fp16 (frozen fp16, trained fp32 under autocast): as bf16
    (("fp16", 1, 1, None, "none"), (2_280_000, 480_000, 960_000, 0)),
    # no DeepSpeed, bf16: weights 2*900k + 4*100k + 4*20k, grads 4*120k, states 8*120k
    (("bf16", 1, 1, None, "none"), (2_280_000, 480_000, 960_000, 0)),
    # plain data parallel replicates everything: 4 GPUs change nothing per GPU
    (("bf16", 1, 4, None, "none"), (2_280_000, 480_000, 960_000, 0)),
    # DeepSpeed ZeRO-0 shards nothing: 2A, 2T, 12T
    (("bf16", 1, 8, 0, "none"), (2_040_000, 240_000, 1_440_000, 0)),
    # ZeRO-1 on 8 GPUs: 12T/8
    (("bf16", 1, 8, 1, "none"), (2_040_000, 240_000, 180_000, 0)),
    # ZeRO-2: 2T/8 and 12T/8
    (("bf16", 1, 8, 2, "none"), (2_040_000, 30_000, 180_000, 0)),
    # ZeRO-3: 2A/8 too
    (("bf16", 1, 8, 3, "none"), (255_000, 30_000, 180_000, 0)),
    # ZeRO-3 on 2 nodes x 8: N = 16
    (("bf16", 2, 8, 3, "none"), (127_500, 15_000, 90_000, 0)),
    # DeepSpeed fp32, ZeRO-2 on 4 GPUs: 4A, 4T/4, 8T/4
    (("fp32", 1, 4, 2, "none"), (4_080_000, 120_000, 240_000, 0)),
    # ZeRO-2 + optimizer offload: the 12T/8 states go to CPU, 8 GPUs' worth per node
    (("bf16", 1, 8, 2, "optimizer"), (2_040_000, 30_000, 0, 180_000 * 8)),
    # fp16 ZeRO-1 on 2 GPUs + optimizer offload: 12T/2 per GPU on CPU, x2 per node
    (("fp16", 1, 2, 1, "optimizer"), (2_040_000, 240_000, 0, 720_000 * 2)),
    # ZeRO-3 on 2 nodes x 4 (N = 8) + offload all: states 12T/8 and weights 2A/8 on CPU, x4
    (("bf16", 2, 4, 3, "all"), (0, 30_000, 0, (180_000 + 255_000) * 4)),
]


@pytest.mark.parametrize("hardware,expected", CASES, ids=[
    f"{p}-{n}x{g}-zero{s}-{o}" for (p, n, g, s, o), _ in CASES])
def test_estimate_formula(base_plan, hardware, expected):
    est = estimate(with_hardware(base_plan, *hardware))
    weights, grads, optim, cpu = expected
    assert (est.weights_bytes, est.gradients_bytes, est.optimizer_bytes) == (weights, grads, optim)
    assert est.cpu_bytes_per_node == cpu
    assert est.total_bytes == weights + grads + optim
    assert est.world_size == hardware[1] * hardware[2]
    data = est.to_json()
    states = {k: data["per_gpu_bytes"][k] for k in ("weights", "gradients", "optimizer_states", "total")}
    assert states == {"weights": weights, "gradients": grads, "optimizer_states": optim,
                      "total": weights + grads + optim}
    assert data["per_gpu_bytes"]["peak"] == round(est.peak_bytes) > weights + grads + optim
    assert data["per_gpu_gib"] == round((weights + grads + optim) / GIB, 2)
    assert data["cpu_offload_bytes_per_node"] == cpu


def test_frozen_parameters_still_cost_weight_memory(base_plan):
    frozen = dataclasses.replace(
        base_plan, totals=Totals(1_000_000, 0, 0),
        components=tuple(dataclasses.replace(c, mode="freeze", trainable_params=0, lora=None)
                         for c in base_plan.components))
    est = estimate(with_hardware(frozen, "bf16", 1, 1, None, "none"))
    assert (est.weights_bytes, est.gradients_bytes, est.optimizer_bytes) == (2_000_000, 0, 0)
    est = estimate(with_hardware(frozen, "bf16", 1, 8, 3, "none"))
    assert (est.weights_bytes, est.gradients_bytes, est.optimizer_bytes) == (250_000, 0, 0)


def test_seed_case_memory(run_cli):
    """Qwen2.5-VL-7B mixed (examples/qwen25vl-7b-mixed.yaml), bf16, 8 GPUs, ZeRO-2:
    A = 8,292,166,656 + 40,370,176, T = 716,920,320."""
    import json

    result = run_cli("plan", "examples/qwen25vl-7b-mixed.yaml", "--json")
    assert result.exit_code == 0, result.stderr
    est = json.loads(result.stdout)["estimate"]
    assert est["world_size"] == 8 and est["zero_stage"] == 2
    assert est["per_gpu_bytes"]["weights"] == 2 * (8_292_166_656 + 40_370_176)
    assert est["per_gpu_bytes"]["gradients"] == 2 * 716_920_320 // 8
    assert est["per_gpu_bytes"]["optimizer_states"] == 12 * 716_920_320 // 8
    assert est["per_gpu_bytes"]["activations"] == sum(est["activation_terms"].values()) > 0


def test_fsdp_shards_every_model_state_like_zero3_and_gathers_per_strategy():
    """full_shard and shard_grad_op hold the same shards (weights, gradients, optimizer states
    of the DDP layout / N, frozen weights included); shard_grad_op gathers every weight from
    forward to backward, full_shard two blocks plus what is outside the blocks."""
    import dataclasses

    from mixspec.language.loader import load_spec_text
    from mixspec.planning.resolve import plan_spec

    plan = plan_spec(load_spec_text("version: 1\nmodel: Qwen/Qwen2.5-VL-7B-Instruct\ncomponents:\n"
                                    "  vision: {train: full, lr: 1.0e-5}\n  language: {train: lora, lr: 1.0e-4}\n"
                                    "distributed: {gpus_per_node: 8, fsdp: full_shard}\n", "spec.yaml"))
    ddp = estimate(plan, {"zero_stage": None})
    full, grad_op = estimate(plan), estimate(plan, {"fsdp": "shard_grad_op"})
    for est in (full, grad_op):
        assert est.weights_bytes == ddp.weights_bytes / 8 and est.gradients_bytes == ddp.gradients_bytes / 8
        assert est.optimizer_bytes == ddp.optimizer_bytes / 8
    largest = max(u["params"] for u in plan.units)
    assert grad_op.zero3_live_bytes == 2 * plan.totals.all_params
    assert 2 * 2 * largest < full.zero3_live_bytes < grad_op.zero3_live_bytes
    offloaded = estimate(plan, {"offload": "all"})
    assert offloaded.total_bytes == 0 and offloaded.cpu_bytes_per_node == full.total_bytes * 8
    assert full.to_json()["fsdp"] == "full_shard" and "fsdp" not in ddp.to_json()
    single = dataclasses.replace(plan, distributed=dataclasses.replace(plan.distributed, gpus_per_node=1))
    assert estimate(single).weights_bytes == ddp.weights_bytes
