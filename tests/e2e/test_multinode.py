"""Two nodes on one machine, for real: the generated launchers started as two "nodes" on
localhost (NODE_RANK 0 and 1, MASTER_ADDR 127.0.0.1, a free port, gloo on CPU, one process
per node), each node in its own working directory, 2 steps on a tiny random Qwen2.5-VL
(tests/fixtures/tiny_families.py) with image rows:

- hf ``launch.sh`` with torchrun (DDP), submitted as a Slurm job: the generated ``sbatch.sh``
  through stand-in ``sbatch``/``srun``/``scontrol`` (tests/fixtures/fake_slurm) that run each
  node's task locally, so the script's own logic (finding its directory from a spool copy,
  master address from the node list, NODE_RANK from SLURM_NODEID) is what runs;
- hf ``launch.sh`` with DeepSpeed ZeRO-2 (LAUNCHER=deepspeed: one launcher per node, no ssh)
  and ZeRO-3 (LAUNCHER=torchrun, DeepSpeed inside the Trainer), started on each node by hand;
- swift ``train.sh`` (``swift sft`` reading NNODES/NODE_RANK/MASTER_ADDR), on each node by hand.

Each run must end, within a timeout (a hang is a failure), with: a world of 2 ranks, one on
each node; 2 steps on both; identical trained parameters on both ranks (a test-only probe,
tests/e2e/multinode_probe/sitecustomize.py, dumps them at the end of training, gathered from
ZeRO-3 shards); every trainable parameter at its planned LR in the optimizer in use (through
DeepSpeed's ZeRO optimizers); the saved output written once, by node 0, equal to what the
ranks hold; and every planned parameter moved.

The family's processor needs torchvision, so everything runs with the ms-swift venv's python
(bash scripts/swift_env.sh; $MIXSPEC_SWIFT_VENV), and its torchrun/swift on PATH. That venv
has no DeepSpeed: when it cannot import one, the tests put this project's own DeepSpeed (a
pure-Python install; its C++ ops are built on demand, and none is needed here) on its
PYTHONPATH, through symlinks, with a ``deepspeed`` launcher script for that python.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from mixspec.language.loader import load_spec  # noqa: E402
from mixspec.output import write_files  # noqa: E402
from mixspec.planning.resolve import plan_spec  # noqa: E402
from mixspec.targets import TargetOptions, render  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
PROBE = Path(__file__).resolve().parent / "multinode_probe"
FAKE_SLURM = FIXTURES / "fake_slurm"
sys.path.insert(0, str(FIXTURES))
from swift_venv import VENV as SWIFT_VENV  # noqa: E402

MM_BIN = SWIFT_VENV / "bin"
TIMEOUT = 240  # seconds for one two-node run; a hang fails the test

if not (MM_BIN / "python").exists():
    pytest.skip(f"Qwen2.5-VL's processor needs torchvision: no venv at {SWIFT_VENV} (bash scripts/swift_env.sh)",
                allow_module_level=True)

SPEC = """\
version: 1
model: {model}
components:
  vision: {{train: full, lr: 1.0e-5}}
  aligner: {{train: full, lr: 1.0e-4}}
  language: {{train: lora, lr: 2.0e-4, lora: {{rank: 4, alpha: 8, dropout: 0.0, targets: all-linear}}}}
training: {{epochs: 1, max_steps: 2, micro_batch_size: 1, gradient_accumulation: 1, precision: fp32,
           gradient_checkpointing: false, max_length: 1024, logging_steps: 1, lr_scheduler: constant,
           save_steps: 100, seed: 3}}
data: {{train: {data}}}
distributed: {{nodes: 2, gpus_per_node: 1{zero}}}
output_dir: run
"""

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MODELSCOPE_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
    "OMP_NUM_THREADS": "1", "MAX_PIXELS": str(112 * 112),
}
for _key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "LAUNCHER",
             "HOSTFILE", "GPUS_PER_NODE", "NPROC_PER_NODE", "PYTHONPATH"):
    ENV.pop(_key, None)
ENV = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed_overlay(root: Path) -> Path | None:
    """A PYTHONPATH dir for the swift venv's python with this project's DeepSpeed in it, and a
    bin dir with a ``deepspeed`` launcher for that python; empty when it has its own."""
    site, bin_dir = root / "site", root / "bin"
    site.mkdir(parents=True)
    bin_dir.mkdir()
    has = subprocess.run([str(MM_BIN / "python"), "-c", "import deepspeed"], env=ENV, capture_output=True)
    if has.returncode == 0:
        return root
    import importlib.metadata as md

    try:
        md.distribution("deepspeed")
    except md.PackageNotFoundError:
        return None  # the DeepSpeed tests skip
    for dist_name in ("deepspeed", "hjson", "msgpack", "py-cpuinfo", "ninja"):
        dist = md.distribution(dist_name)
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in sorted(tops):
            if top.endswith(".py") or (base / top).is_dir():
                if not (site / top).exists() and top not in ("bin", "__pycache__"):
                    (site / top).symlink_to(base / top)
    launcher = bin_dir / "deepspeed"
    launcher.write_text(f"#!{MM_BIN / 'python'}\nfrom deepspeed.launcher.runner import main\nmain()\n",
                        encoding="utf-8")
    launcher.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny Qwen2.5-VL (published special-token ids: swift hard-codes them), image rows,
    the probe and the DeepSpeed overlay, shared by the module's tests."""
    root = tmp_path_factory.mktemp("multinode")
    built = subprocess.run([str(MM_BIN / "python"), str(FIXTURES / "tiny_families.py"), "qwen2_5_vl",
                            str(root / "model"), "--real-ids"], env=ENV, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    import make_tiny_vlm

    data = make_tiny_vlm.colour_rows(root, sizes=((56, 56), (84, 56), (56, 84), (56, 56)))
    overlay = _deepspeed_overlay(root / "ds-overlay")
    from safetensors.torch import load_file

    initial = load_file(str(root / "model" / "model.safetensors"))
    return {"root": root, "model": root / "model", "data": data, "overlay": overlay, "initial": initial}


def compile_case(world, case: str, target: str, zero: int | None = None):
    folder = world["root"] / case
    folder.mkdir()
    spec = folder / "spec.yaml"
    spec.write_text(SPEC.format(model=world["model"], data=world["data"],
                                zero=f", zero_stage: {zero}" if zero is not None else ""), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    files = render(plan, target, TargetOptions())
    write_files(folder / "out", files)
    for node in (0, 1):
        (folder / f"node{node}").mkdir()
    (folder / "probe").mkdir()
    return plan, folder, files


def run_env(world, folder: Path, extra: dict | None = None) -> dict:
    overlay = world["overlay"] or world["root"] / "no-deepspeed"
    return {**ENV, "PATH": f"{overlay / 'bin'}:{MM_BIN}:{FAKE_SLURM}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": f"{PROBE}:{overlay / 'site'}", "MIXSPEC_PROBE_DIR": str(folder / "probe"),
            **(extra or {})}


def start_nodes(folder: Path, script: str, env: dict, args=(), port: int | None = None) -> tuple[list[str], float]:
    """``bash SCRIPT`` on two "nodes" (NODE_RANK 0 and 1), each in its own directory; both must
    exit 0 within TIMEOUT. Returns both logs and the seconds it took."""
    port = port or free_port()
    procs = []
    start = time.monotonic()
    for node in (0, 1):
        log = open(folder / f"node{node}.log", "w", encoding="utf-8")
        procs.append((subprocess.Popen(["bash", str(folder / "out" / script), *args], cwd=folder / f"node{node}",
                                       env={**env, "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                                            "MASTER_PORT": str(port)},
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(1.0, TIMEOUT - (time.monotonic() - start))))
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
            log.close()
    took = time.monotonic() - start
    logs = [(folder / f"node{n}.log").read_text(errors="replace") for n in (0, 1)]
    tails = "\n".join(f"== node{n} ==\n" + log[-5000:] for n, log in enumerate(logs))
    assert codes is not None, f"hang: the two nodes did not finish within {TIMEOUT} s\n{tails}"
    assert codes == [0, 0], f"exit codes {codes}\n{tails}"
    return logs, took


def check_ranks(world, plan, folder: Path, saved: dict[str, torch.Tensor], zero_stage: int = 0) -> dict:
    """What every multi-node run must show; returns a summary for the log."""
    probe = folder / "probe"
    reports = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    params = [safetensors_torch.load_file(str(probe / f"rank{r}.safetensors")) for r in (0, 1)]
    planned = plan.trainable_lrs()
    # a world of two, one rank on each node, both through 2 steps
    assert [r["world_size"] for r in reports] == [2, 2]
    assert {Path(r["node"]).name for r in reports} == {"node0", "node1"}
    assert [r["steps"] for r in reports] == [2, 2]
    assert [r["zero_stage"] for r in reports] == [zero_stage] * 2
    # per-component LRs as planned, in the optimizer in use
    for report in reports:
        assert report["lr_by_param"] == planned, sorted(set(report["lr_by_param"]) ^ set(planned))[:10]
    # identical trained parameters on both ranks: exactly the planned ones
    assert set(params[0]) == set(planned) == set(params[1])
    differ = [n for n in planned if not torch.equal(params[0][n], params[1][n])]
    assert not differ, f"ranks differ on {len(differ)} parameters, e.g. {differ[:5]}"
    # the saved output (node 0's) holds what the ranks hold
    assert set(saved) == set(planned), sorted(set(saved) ^ set(planned))[:5]
    for name, tensor in saved.items():
        assert torch.equal(tensor.float(), params[0][name]), name
    # and training happened: every planned parameter moved from its start (LoRA A may not:
    # its first gradient is zero while B is)
    still = []
    for name in planned:
        if ".lora_A." in name:
            continue
        start = torch.zeros_like(params[0][name]) if ".lora_B." in name else initial_tensor(world["initial"], name)
        if torch.equal(params[0][name], start):
            still.append(name)
    assert not still, f"{len(still)} planned parameters did not move, e.g. {still[:5]}"
    return {"world": 2, "steps": 2, "trainable_tensors": len(planned), "saved_tensors": len(saved),
            "optimizers": sorted({r["optimizer"] for r in reports}), "wrapped": sorted({r["wrapped"] for r in reports})}


def initial_tensor(initial: dict, name: str) -> torch.Tensor:
    """The model file's tensor of a plan name (save_pretrained may write Qwen2.5-VL's checkpoint
    layout: ``model.visual.*`` as ``visual.*``, ``model.language_model.*`` as ``model.*``)."""
    for key in (name, name.replace("model.visual.", "visual.", 1), name.replace("model.language_model.", "model.", 1)):
        if key in initial:
            return initial[key]
    raise AssertionError(f"{name} is not in the model file")


def written_files(node_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(node_dir)) for p in node_dir.rglob("*") if p.is_file())


def hf_saved(node_dir: Path) -> dict[str, torch.Tensor]:
    """final/: the fully trained parameters and the LoRA adapter, under plan names."""
    final = node_dir / "run" / "final"
    out = dict(safetensors_torch.load_file(str(final / "trained_params.safetensors")))
    for key, tensor in safetensors_torch.load_file(str(final / "adapter_model.safetensors")).items():
        out[_adapter_name(key)] = tensor
    return out


def _adapter_name(key: str) -> str:
    key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return re.sub(r"\.(lora_A|lora_B)\.weight$", r".\1.default.weight", key)


# what rank 1 itself writes into a checkpoint: its RNG state (the Trainer), its ZeRO shards (DeepSpeed)
RANK1_STATE = re.compile(r"^run/checkpoint-\d+/(?:rng_state_1\.pth|global_step\d+/zero_pp_rank_1_mp_rank_\d+_\w+\.pt)$")


def assert_written_once(folder: Path, saved: list[str]):
    """The saved output is on node 0 only; node 1 wrote nothing but its own per-rank state."""
    node0, node1 = written_files(folder / "node0"), written_files(folder / "node1")
    assert set(saved) <= set(node0), sorted(set(saved) - set(node0))
    assert [f for f in node1 if not RANK1_STATE.match(f)] == [], node1


def test_hf_torchrun_two_nodes_through_slurm(world):
    """sbatch.sh -> srun (two tasks) -> launch.sh on each node -> torchrun -> train.py (DDP, gloo)."""
    plan, folder, files = compile_case(world, "hf-ddp-slurm", "hf")
    assert "sbatch.sh" in files
    env = run_env(world, folder, {"FAKE_SLURM_SPOOL": str(folder / "spool"),
                                  "FAKE_SLURM_NODE_ROOT": str(folder), "MASTER_PORT": str(free_port())})
    start = time.monotonic()
    with open(folder / "sbatch.log", "w", encoding="utf-8") as log:
        proc = subprocess.Popen(["sbatch", str(folder / "out" / "sbatch.sh"), "--data", str(world["data"])],
                                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
            os.killpg(proc.pid, 15)  # the stand-in srun passes it on to each node's task
            proc.wait()
    took = time.monotonic() - start
    text = (folder / "sbatch.log").read_text(errors="replace")
    assert code is not None, f"hang: the job did not finish within {TIMEOUT} s\n{text[-8000:]}"
    assert code == 0, text[-8000:]
    assert "mixspec: 2 node(s), master 127.0.0.1:" in text  # the first host of 127.0.0.[1-2]
    summary = check_ranks(world, plan, folder, hf_saved(folder / "node0"))
    assert summary["wrapped"] == ["DistributedDataParallel"]
    assert_written_once(folder, ["run/final/trained_params.safetensors", "run/final/adapter_model.safetensors"])
    print(json.dumps({"case": "hf torchrun DDP via sbatch.sh", "seconds": round(took, 1), **summary}))


@pytest.mark.parametrize("zero,launcher", [(2, "deepspeed"), (3, "torchrun")], ids=["zero2-deepspeed", "zero3-torchrun"])
def test_hf_deepspeed_two_nodes(world, zero, launcher):
    """launch.sh on each node: ZeRO-2 through the deepspeed launcher (one per node, --no_ssh),
    ZeRO-3 through torchrun with DeepSpeed inside the Trainer."""
    if world["overlay"] is None:
        pytest.skip("no DeepSpeed here or in the swift venv (pip install -e '.[test]')")
    plan, folder, files = compile_case(world, f"hf-zero{zero}", "hf", zero=zero)
    assert "ds_config.json" in files
    _, took = start_nodes(folder, "launch.sh", run_env(world, folder, {
        "LAUNCHER": launcher, "DS_ACCELERATOR": "cpu", "MIXSPEC_PROBE_CPU_DEEPSPEED": "1"}))
    summary = check_ranks(world, plan, folder, hf_saved(folder / "node0"), zero_stage=zero)
    assert summary["wrapped"] == ["DeepSpeedEngine"]
    assert summary["optimizers"] == ["DeepSpeedZeroOptimizer" if zero == 2 else "DeepSpeedZeroOptimizer_Stage3"]
    assert_written_once(folder, ["run/final/trained_params.safetensors", "run/final/adapter_model.safetensors"])
    print(json.dumps({"case": f"hf ZeRO-{zero} via LAUNCHER={launcher}", "seconds": round(took, 1), **summary}))


def test_swift_two_nodes(world):
    """train.sh on each node: swift sft reads NNODES (the plan's), NODE_RANK, MASTER_ADDR, MASTER_PORT."""
    plan, folder, files = compile_case(world, "swift", "swift")
    text = files["train.sh"]
    assert "export NNODES=2" in text and "NODE_RANK" in text
    # environment, not Plan; --use_cpu: without it, on a machine with no GPU, accelerate finds no
    # backend, the Trainer does not wrap the model in DDP and each rank trains a model of its own
    extra = ["--check_model", "false", "--report_to", "none", "--dataloader_num_workers", "0", "--use_cpu", "true"]
    port = free_port()
    logs, took = start_nodes(folder, "train.sh", run_env(world, folder), extra, port=port)
    for node, log in enumerate(logs):  # swift's torchrun line on each node
        assert f"--nproc_per_node 1 --master_port {port}" in log and f"--nnodes 2 --node_rank {node}" in log, log[:3000]
    node0 = folder / "node0" / "run"
    ckpt = node0 / "checkpoint-2"
    saved = {}
    for key, tensor in safetensors_torch.load_file(str(ckpt / "adapter_model.safetensors")).items():
        saved[_adapter_name(key)] = tensor
    for name in ("vit.safetensors", "full_params.safetensors"):
        if (ckpt / name).exists():
            for key, tensor in safetensors_torch.load_file(str(ckpt / name)).items():
                saved[key[len("base_model.model."):] if key.startswith("base_model.model.") else key] = tensor
    summary = check_ranks(world, plan, folder, saved)
    assert summary["wrapped"] == ["DistributedDataParallel"]
    assert_written_once(folder, ["run/checkpoint-2/adapter_model.safetensors"])
    print(json.dumps({"case": "swift sft, NNODES=2", "seconds": round(took, 1), **summary}))
