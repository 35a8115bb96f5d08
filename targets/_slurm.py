"""``sbatch.sh``: a Slurm batch script that runs a target's per-node launcher on every node.

Shared by the hf target (``launch.sh``) and the swift target (``train.sh``). One Slurm task
per node; each task starts the launcher, which starts that node's GPU processes (torchrun,
the deepspeed launcher without ssh, accelerate, or ``swift sft``). The rendezvous comes from
the allocation: node 0 is the first host of ``scontrol show hostnames "$SLURM_JOB_NODELIST"``,
a node's rank is ``$SLURM_NODEID``.

Slurm runs a copy of the batch script from its spool directory, so the script finds the
generated directory through ``scontrol show job`` (the ``Command=`` line holds the submitted
path), unless ``MIXSPEC_DIR`` names it.

Values that reach ``#SBATCH`` lines (partition, time, account) are checked against the
forms Slurm accepts; sbatch parses those lines itself, not the shell, so quoting cannot
protect them.
"""

from __future__ import annotations

import re

from .. import programs
from ..planning.plan import Plan
from . import TargetOptions
from ._common import generated_header, sh_assignments

SBATCH_FILE = "sbatch.sh"
LAUNCHERS = ("auto", "slurm", "none")

# partition: a name or a comma-separated list; account: a name
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_PARTITION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}(?:,[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}){0,15}$")
# sbatch --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or unlimited
_TIME = re.compile(r"^(?:[0-9]{1,6}(?::[0-9]{1,2}){0,2}|[0-9]{1,4}-[0-9]{1,2}(?::[0-9]{1,2}){0,2}|UNLIMITED|unlimited|infinite)$")
_JOB_CHARS = re.compile(r"[^A-Za-z0-9_.\-]+")


def slurm_value_problem(kind: str, value: str) -> str | None:
    """Why ``value`` cannot be the ``--partition``/``--time``/``--account`` of an #SBATCH line,
    or None when it can."""
    pattern, form = {
        "partition": (_PARTITION, "a partition name (letters, digits, _ . -) or a comma-separated list of them"),
        "time": (_TIME, "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. 2-00:00:00), or unlimited"),
        "account": (_NAME, "an account name (letters, digits, _ . -)"),
    }[kind]
    if pattern.match(value):
        return None
    return f"--slurm-{kind} must be {form} (got {value!r})"


def wants_sbatch(plan: Plan, options: TargetOptions) -> bool:
    """Whether a target writes sbatch.sh: several nodes, or asked for (--launcher slurm, --slurm-*)."""
    if options.launcher == "none":
        return False
    asked = options.launcher == "slurm" or any(
        getattr(options, f"slurm_{kind}") is not None for kind in ("partition", "time", "account"))
    return asked or plan.distributed.nodes > 1


def job_name(plan: Plan) -> str:
    """``mixspec-<spec file stem>``, reduced to the characters Slurm shows as they are."""
    stem = str(plan.spec_path).replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = _JOB_CHARS.sub("-", stem).strip("-.")[:48]
    return "mixspec-" + stem if stem else "mixspec"


def render_sbatch_sh(plan: Plan, options: TargetOptions, target: str, launcher: str) -> str:
    """sbatch.sh for ``target`` ("hf" or "swift"), running ``launcher`` (a file next to it) on each
    node: mixspec.programs' sbatch with its blocks filled."""
    dist = plan.distributed
    nodes, gpus = dist.nodes, dist.gpus_per_node
    directives = [
        f"--job-name={job_name(plan)}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={gpus}",
    ]
    for kind in ("partition", "time", "account"):
        value = getattr(options, f"slurm_{kind}")
        if value is None:
            continue
        problem = slurm_value_problem(kind, value)
        if problem:
            raise ValueError(problem)
        directives.append(f"--{kind}={value}")
    header = generated_header(plan, target, extra=[
        "",
        f"Slurm job: {nodes} node(s), one task per node, each running {launcher} (next to this file),",
        f"which starts that node's {gpus} GPU process(es).",
        "Submit from the directory the spec's relative paths (data, output_dir) are relative to:",
        f"    sbatch DIR/{SBATCH_FILE} [{'train.py' if target == 'hf' else 'swift sft'} options]",
    ])
    return programs.render("sbatch", {
        "header": "".join(f"#SBATCH {d}\n" for d in directives) + header,
        # launch.sh's own environment (LAUNCHER, GPUS_PER_NODE), documented in the program
        "launch_sh_env": programs.KEEP if target == "hf" else "",
        # swift's train.sh exports the planned NNODES itself: the job must have as many nodes
        "plan": sh_assignments({"NODE_SCRIPT": launcher, "REQUIRED_NNODES": nodes if target == "swift" else ""}),
    })
