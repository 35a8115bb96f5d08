"""sbatch.sh (hf and swift targets): when it is written, what it asks Slurm for, and what it
runs on each node, through stand-in sbatch/srun/scontrol (tests/fixtures/fake_slurm) and fake
launchers that record their argv and environment. The real two-node trainings behind it are
in tests/e2e/test_multinode.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mixspec.cli import app
from mixspec.language.loader import load_spec
from mixspec.output import write_files
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, render
from mixspec.targets._slurm import job_name, slurm_value_problem

ROOT = Path(__file__).resolve().parents[2]
FAKE_SLURM = ROOT / "tests" / "fixtures" / "fake_slurm"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")

SPEC = """\
version: 1
model: Qwen/Qwen2.5-VL-3B-Instruct
components:
  vision: {{train: full, lr: 2.0e-6}}
  aligner: {{train: full, lr: 1.0e-5}}
  language: {{train: lora, lr: 1.0e-4, lora: {{rank: 8, alpha: 16}}}}
data: {{train: data/train.jsonl}}
distributed: {{nodes: {nodes}, gpus_per_node: 4{zero}}}
output_dir: runs/x
"""


def compile_files(tmp_path, target="hf", nodes=2, zero=None, name="spec.yaml", **options):
    spec = tmp_path / name
    spec.write_text(SPEC.format(nodes=nodes, zero=f", zero_stage: {zero}" if zero is not None else ""),
                    encoding="utf-8")
    return render(plan_spec(load_spec(spec)), target, TargetOptions(**options))


@pytest.mark.parametrize("target", ["hf", "swift"])
def test_sbatch_is_written_for_several_nodes_or_when_asked(tmp_path, target):
    assert "sbatch.sh" in compile_files(tmp_path, target, nodes=2)
    assert "sbatch.sh" not in compile_files(tmp_path, target, nodes=1)
    assert "sbatch.sh" in compile_files(tmp_path, target, nodes=1, launcher="slurm")
    assert "sbatch.sh" in compile_files(tmp_path, target, nodes=1, slurm_time="10")
    assert "sbatch.sh" not in compile_files(tmp_path, target, nodes=2, launcher="none")


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def test_cli_writes_the_directives(tmp_path):
    spec = tmp_path / "my run.yaml"
    spec.write_text(SPEC.format(nodes=2, zero=""), encoding="utf-8")
    result = CliRunner().invoke(app, ["compile", str(spec), "--target", "hf", "-o", str(tmp_path / "out"),
                                      "--slurm-partition", "gpu,gpu-long", "--slurm-time", "2-00:00:00",
                                      "--slurm-account", "proj_42"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "sbatch.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert directives(text) == [
        "#SBATCH --job-name=mixspec-my-run", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu,gpu-long", "#SBATCH --time=2-00:00:00",
        "#SBATCH --account=proj_42"]
    # sbatch reads #SBATCH lines only up to the first command
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert subprocess.run(["bash", "-n", str(tmp_path / "out" / "sbatch.sh")]).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--target", "hf", "--slurm-time", "1;rm -rf x"], "--slurm-time must be"),
    (["--target", "hf", "--slurm-partition", "gpu\n#SBATCH --x"], "--slurm-partition must be"),
    (["--target", "hf", "--slurm-account", "-a"], "--slurm-account must be"),
    (["--target", "hf", "--launcher", "pbs"], "--launcher must be one of auto, slurm, none"),
    (["--target", "deepspeed", "--launcher", "slurm"], "are for the hf and swift targets"),
    (["--target", "hf", "--launcher", "none", "--slurm-time", "10"], "--launcher none does not write"),
])
def test_bad_slurm_options_are_usage_errors(tmp_path, args, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(nodes=2, zero=""), encoding="utf-8")
    result = CliRunner().invoke(app, ["compile", str(spec), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, ok", [("30", True), ("4:00:00", True), ("1-12", True), ("7-00:00:00", True),
                                       ("unlimited", True), ("1 day", False), ("$(id)", False), ("", False)])
def test_time_forms(value, ok):
    assert (slurm_value_problem("time", value) is None) == ok


def test_job_name_keeps_only_plain_characters(tmp_path):
    plan = plan_spec(load_spec(_spec_at(tmp_path / "a $(touch x);`b`'\n.yaml")))
    assert job_name(plan) == "mixspec-a-touch-x-b"
    text = render(plan, "hf", TargetOptions())["sbatch.sh"]
    assert "#SBATCH --job-name=mixspec-a-touch-x-b" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def _spec_at(path: Path) -> Path:
    path.write_text(SPEC.format(nodes=2, zero=""), encoding="utf-8")
    return path


# -- running sbatch.sh through the stand-ins -------------------------------------------------

FAKE = """\
#!{python}
# records its name, argv, working directory and the rendezvous environment; reads a --hostfile
import json, os, sys
argv = sys.argv[1:]
record = {{"name": os.path.basename(sys.argv[0]), "argv": argv, "cwd": os.getcwd(),
          "env": {{k: os.environ.get(k) for k in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                 "NPROC_PER_NODE", "SLURM_NODEID")}}}}
if "--hostfile" in argv:
    record["hostfile"] = open(argv[argv.index("--hostfile") + 1]).read()
with open(os.path.join(os.environ["FAKE_LOG"], "call-%s" % os.environ["SLURM_NODEID"]), "w") as fh:
    json.dump(record, fh)
"""


def submit(tmp_path, files, *args, env_extra=None, sbatch_args=()):
    out = tmp_path / "out"
    write_files(out, files)
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name in ("torchrun", "deepspeed", "accelerate", "swift"):
        (bin_dir / name).write_text(FAKE.format(python=sys.executable), encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MIXSPEC_"))
           and k not in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "LAUNCHER", "HOSTFILE")}
    env.update(PATH=f"{bin_dir}:{FAKE_SLURM}:{os.environ['PATH']}", FAKE_LOG=str(log),
               FAKE_SLURM_SPOOL=str(tmp_path / "spool"), FAKE_SLURM_NODE_ROOT=str(tmp_path / "nodes"),
               MASTER_PORT="29611")
    env.update(env_extra or {})
    result = subprocess.run(["sbatch", *sbatch_args, str(out / "sbatch.sh"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    calls = [json.loads(p.read_text()) for p in sorted(log.iterdir())]
    return result, calls


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "accelerate"])
def test_hf_sbatch_starts_launch_sh_on_each_node(tmp_path, launcher):
    files = compile_files(tmp_path, "hf", nodes=2, zero=2)
    result, calls = submit(tmp_path, files, "--max-steps", "3", env_extra={"LAUNCHER": launcher})
    assert result.returncode == 0, result.stderr
    assert "mixspec: 2 node(s), master 127.0.0.1:29611" in result.stderr  # first host of 127.0.0.[1-2]
    assert [c["name"] for c in calls] == [launcher, launcher]
    for node, call in enumerate(calls):
        assert call["cwd"] == str(tmp_path / "nodes" / f"node{node}")
        assert call["env"]["NODE_RANK"] == str(node) and call["env"]["NNODES"] == "2"
        assert call["argv"][-3:] == [str(tmp_path / "out" / "train.py"), "--max-steps", "3"]
        argv = call["argv"]
        if launcher == "torchrun":
            assert argv[:10] == ["--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "4",
                                 "--master_addr", "127.0.0.1", "--master_port", "29611"]
        elif launcher == "deepspeed":  # one launcher per node, no ssh; the hostfile only sizes the world
            assert argv[:3] == ["--no_ssh", "--node_rank", str(node)]
            assert argv[5:13] == ["--num_nodes", "2", "--num_gpus", "4", "--master_addr", "127.0.0.1",
                                  "--master_port", "29611"]
            assert call["hostfile"] == "node0 slots=4\nnode1 slots=4\n"
        else:
            assert argv[:12] == ["launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(node),
                                 "--num_processes", "8", "--main_process_ip", "127.0.0.1",
                                 "--main_process_port", "29611"]


def test_swift_sbatch_starts_train_sh_on_each_node(tmp_path):
    files = compile_files(tmp_path, "swift", nodes=2)
    result, calls = submit(tmp_path, files, "--max_steps", "3")
    assert result.returncode == 0, result.stderr
    assert [c["name"] for c in calls] == ["swift", "swift"]
    for node, call in enumerate(calls):
        assert call["env"] == {"NNODES": "2", "NODE_RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": "29611", "NPROC_PER_NODE": "4", "SLURM_NODEID": str(node)}
        assert call["argv"][0] == "sft" and call["argv"][-2:] == ["--max_steps", "3"]


def test_swift_sbatch_refuses_another_node_count(tmp_path):
    result, calls = submit(tmp_path, compile_files(tmp_path, "swift", nodes=2), sbatch_args=["--nodes=3"])
    assert result.returncode == 1 and calls == []
    assert "the job has 3 nodes, the plan 2" in result.stderr


def test_hf_sbatch_runs_on_as_many_nodes_as_the_job_has(tmp_path):
    """Only swift's train.sh, which exports the planned NNODES itself, needs the plan's node
    count; launch.sh takes NNODES from sbatch.sh, so a 3-node job of a 2-node hf plan runs on 3."""
    result, calls = submit(tmp_path, compile_files(tmp_path, "hf", nodes=2), sbatch_args=["--nodes=3"])
    assert result.returncode == 0, result.stderr
    assert [(c["env"]["NNODES"], c["env"]["NODE_RANK"]) for c in calls] == [("3", "0"), ("3", "1"), ("3", "2")]
    assert [c["argv"][:4] for c in calls] == [["--nnodes", "3", "--node_rank", str(n)] for n in range(3)]


def test_sbatch_without_its_directory_says_how_to_fix(tmp_path):
    result, calls = submit(tmp_path, compile_files(tmp_path, "hf", nodes=2),
                           env_extra={"MIXSPEC_DIR": str(tmp_path / "elsewhere")})
    assert result.returncode == 1 and calls == []
    assert "no launch.sh in" in result.stderr and "set MIXSPEC_DIR" in result.stderr


def test_a_failing_node_stops_the_job(tmp_path):
    """--kill-on-bad-exit: node 1 fails at once, node 0 would wait for it forever."""
    files = compile_files(tmp_path, "hf", nodes=2)
    bin_dir = tmp_path / "bin0"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/usr/bin/env bash\n[ "$SLURM_NODEID" = 1 ] && exit 3\nsleep 300\n')
    (bin_dir / "torchrun").chmod(0o755)
    result, _ = submit(tmp_path, files, env_extra={"PATH": f"{bin_dir}:{FAKE_SLURM}:{os.environ['PATH']}"})
    assert result.returncode == 3
