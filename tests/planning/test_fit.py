"""mixspec fit: settings that fit a GPU, at the same global batch, and the peak in plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mixspec.planning.estimate import estimate
from mixspec.planning.fit import fit
from mixspec.language.loader import load_spec
from mixspec.planning.resolve import plan_spec

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "qwen25vl-7b-mixed.yaml"


def test_a_spec_that_does_not_fit_gets_settings_that_do_at_the_same_global_batch(run_cli, tmp_path):
    plan = plan_spec(load_spec(SEED))
    now = estimate(plan)
    gb = (now.peak_bytes / 1e9) * 0.8  # 20% too small for the spec as written
    result = fit(plan, gb)
    assert not result.current.fits and result.best is not None
    best = result.best
    per_gpu = plan.training.micro_batch_size * plan.training.gradient_accumulation
    assert best.micro_batch_size * best.gradient_accumulation == per_gpu
    assert best.estimate.peak_bytes <= gb * 1e9
    # nothing more preferred fits, and the list is ordered by preference
    assert all(not o.fits for o in result.options[: result.options.index(best)])
    assert [o.preference for o in result.options] == sorted(o.preference for o in result.options)

    # --write: the copy, planned again, has exactly the estimate fit reported
    spec = tmp_path / "seed.yaml"
    shutil.copy(SEED, spec)
    out = tmp_path / "fitted.yaml"
    r = run_cli("fit", str(spec), "--gpu-memory", f"{gb:.3f}", "--write", str(out))
    assert r.exit_code == 0, r.output
    assert "fits with the least slowdown" in r.stdout and "spec lines to change:" in r.stdout
    again = plan_spec(load_spec(out))
    assert abs(estimate(again).peak_bytes - best.estimate.peak_bytes) < 1
    assert again.trainable_lrs() == plan.trainable_lrs()


def test_a_spec_that_cannot_fit_says_by_how_much(run_cli):
    r = run_cli("fit", str(SEED), "--gpu-memory", "2", "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert data["best"] is None and not any(o["fits"] for o in data["options"])
    r = run_cli("fit", str(SEED), "--gpu-memory", "2")
    assert r.exit_code == 1 and "does not fit: the smallest peak is" in r.stdout and "GiB over" in r.stdout
    r = run_cli("fit", str(SEED))
    assert r.exit_code == 2 and "--gpu-memory" in r.stderr


def test_plan_shows_every_term_of_the_peak(run_cli):
    r = run_cli("plan", str(SEED), "--json")
    assert r.exit_code == 0
    est = json.loads(r.stdout)["estimate"]
    terms = est["per_gpu_bytes"]
    assert set(est["activation_terms"]) == {"vision_blocks", "aligner", "llm_blocks", "final_norm", "loss"}
    assert terms["activations"] == sum(est["activation_terms"].values())
    assert terms["transient"] == max(est["transient_terms"].values())
    assert terms["peak"] == (terms["total"] + terms["activations"] + terms["transient"] + terms["zero3_live_params"]
                             + terms["overhead"])
    assert est["assumptions"]["vision_tokens_per_image"] == 1003520 // 14 ** 2
    r = run_cli("plan", str(SEED))
    assert "peak" in r.stdout and "assuming 1 x 4096 tokens per GPU" in r.stdout


def test_plan_with_gpu_memory_gives_the_fit_advice(run_cli, tmp_path):
    spec = tmp_path / "seed.yaml"
    spec.write_text(SEED.read_text().replace("  zero_stage: 2\n", "  zero_stage: 2\n  gpu_memory_gb: 24\n"))
    r = run_cli("plan", str(spec))
    assert r.exit_code == 0
    best = fit(plan_spec(load_spec(spec)), 24).best
    assert f"exceeds gpu_memory_gb (24 GB): it fits with {best.describe()}" in " ".join(r.stdout.split())


def test_fsdp_layouts_are_searched_for_targets_that_run_them_and_written_back(run_cli, tmp_path):
    plan = plan_spec(load_spec(SEED))
    both, zero_only = fit(plan, 40), fit(plan, 40, fsdp=False)
    strategies = {(o.fsdp, o.offload) for o in both.options if o.fsdp}
    assert strategies == {(s, off) for s in ("shard_grad_op", "full_shard") for off in ("none", "all")}
    assert all(o.zero_stage is None for o in both.options if o.fsdp)
    assert not any(o.fsdp for o in zero_only.options)
    # swift compiles FSDP2 too (its --fsdp JSON); LLaMA-Factory refuses it
    assert {(o.fsdp, o.offload) for o in fit(plan, 40, target="swift").options if o.fsdp} == strategies
    assert not any(o.fsdp for o in fit(plan, 40, target="llamafactory").options)
    assert [o.preference for o in both.options] == sorted(o.preference for o in both.options)
    # the estimate of an FSDP2 option is the estimate of the spec that says it
    option = next(o for o in both.options if o.fsdp == "full_shard" and o.offload == "none")
    spec = tmp_path / "seed.yaml"
    shutil.copy(SEED, spec)
    from mixspec.planning.fit import write_fitted_spec

    write_fitted_spec(spec, option, tmp_path / "fsdp.yaml")
    again = plan_spec(load_spec(tmp_path / "fsdp.yaml"))
    assert (again.distributed.fsdp, again.distributed.zero_stage) == ("full_shard", None)
    assert abs(estimate(again).peak_bytes - option.estimate.peak_bytes) < 1
    r = run_cli("fit", str(spec), "--gpu-memory", "40", "--json", "--no-fsdp")
    assert not any(o["fsdp"] for o in json.loads(r.stdout)["options"])
