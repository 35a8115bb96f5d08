"""examples/ci/: the GitHub Actions workflow's own `run:` steps, executed here the way the
runner executes them (bash -eo pipefail, the job's and step's env, `if:` conditions) on a
temporary git repository with a pull request's worth of spec changes; `gh` is a fake that
records the comment. The install step is skipped (mixspec is installed here), the cache
step is emulated by restoring this session's tree cache into the path it names. And the
pre-commit example names the hook mixspec defines, whose command is run on the repo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, seed_spec

WORKFLOW = ROOT / "examples" / "ci" / "mixspec.yml"

SEED = seed_spec(more="""\
distributed: {nodes: 1, gpus_per_node: 8, zero_stage: 2}
""")

# the same training, written another way
SEED_REWRITTEN = r"""
version: 1
model: Qwen/Qwen2.5-VL-7B-Instruct
components:
  language:
    train: lora
    lr: 0.0001
    lora:
      rank: 16
      alpha: 32
      dropout: 0.05
      targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  aligner: {lr: 1.0e-5, train: full}
  vision: {train: full, lr: 2.0e-6}
distributed: {zero_stage: 2, gpus_per_node: 8}
"""


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(repo.parent)}
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env)
    return done.stdout.strip()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


@pytest.fixture
def pull_request(tmp_path):
    """A repository at the base revision, then a head commit that changes an LR in one
    spec, rewrites another without changing its training, adds one, deletes one and
    changes a YAML file that is not a spec."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _write(repo / "train" / "qwen.mixspec.yaml", SEED)
    _write(repo / "train" / "same.mixspec.yaml", SEED)
    _write(repo / "old" / "mixspec.yaml", SEED)
    _write(repo / "config.yaml", "a: 1\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "base")
    base = _git(repo, "rev-parse", "HEAD")
    _write(repo / "train" / "qwen.mixspec.yaml", SEED.replace("lr: 1.0e-5", "lr: 3.0e-5"))
    _write(repo / "train" / "same.mixspec.yaml", SEED_REWRITTEN)
    _write(repo / "train" / "new.mixspec.yaml", SEED.replace("rank: 16", "rank: 8"))
    (repo / "old" / "mixspec.yaml").unlink()
    _write(repo / "config.yaml", "a: 2\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "head")
    return repo, base


def _fake_gh(bin_dir: Path, log: Path) -> None:
    gh = bin_dir / "gh"
    gh.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        # records `gh pr comment N --body-file F` as the runner would send it
        printf '%s\\n' "$@" > {log}.args
        while [ $# -gt 0 ]; do
          if [ "$1" = --body-file ]; then cp "$2" {log}.body; fi
          shift
        done
        """))
    gh.chmod(0o755)


class Runner:
    """Just enough of the Actions runner: ${{ }} expressions from a fixed table (an unknown
    one fails the test), env, `if: steps.X.outputs.Y == 'V'`, bash -eo pipefail."""

    def __init__(self, expressions: dict, env: dict):
        self.expressions = expressions
        self.env = env
        self.outputs: dict[str, dict[str, str]] = {}

    def expand(self, text: str) -> str:
        def one(m):
            key = m.group(1).strip()
            assert key in self.expressions, f"the test does not model the expression {key!r}"
            return self.expressions[key]

        return re.sub(r"\$\{\{(.+?)\}\}", one, str(text))

    def condition(self, cond: str | None) -> bool:
        if cond is None:
            return True
        m = re.fullmatch(r"steps\.(\w+)\.outputs\.(\w+) == '(.*)'", cond.strip())
        assert m, f"the test does not model the condition {cond!r}"
        return self.outputs.get(m.group(1), {}).get(m.group(2)) == m.group(3)

    def run(self, step: dict, cwd: Path, temp: Path) -> subprocess.CompletedProcess:
        out_file = temp / f"output-{step.get('id', 'step')}"
        out_file.write_text("")
        env = dict(self.env)
        env.update({k: self.expand(v) for k, v in (step.get("env") or {}).items()})
        env["GITHUB_OUTPUT"] = str(out_file)
        done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        if "id" in step:
            pairs = [line.split("=", 1) for line in out_file.read_text().splitlines() if "=" in line]
            self.outputs[step["id"]] = dict(pairs)
        return done


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_workflow_steps_on_a_pull_request(pull_request, tmp_path, tree_cache_dir):
    repo, base = pull_request
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    job = workflow["jobs"]["specs"]
    assert "pull_request" in workflow[True]  # pyyaml reads the key `on` as True
    assert workflow["permissions"]["pull-requests"] == "write"
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    summary = tmp_path / "summary.md"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gh_log = tmp_path / "gh"
    _fake_gh(bin_dir, gh_log)
    expressions = {
        "github.workspace": str(repo),
        "github.event.pull_request.base.sha": base,
        "github.event.pull_request.number": "17",
        "github.token": "fake-token",
        "github.run_id": "1",
        "runner.os": "Linux",
        "runner.temp": str(temp),
    }
    runner = Runner(expressions, {})
    expressions["env.MIXSPEC_CACHE_DIR"] = runner.expand(job["env"]["MIXSPEC_CACHE_DIR"])
    runner.env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path), "RUNNER_TEMP": str(temp), "GITHUB_STEP_SUMMARY": str(summary),
        **{k: runner.expand(v) for k, v in job["env"].items()},
    }
    ran = []
    for step in job["steps"]:
        if not runner.condition(step.get("if")):
            continue
        uses = step.get("uses", "")
        if uses.startswith("actions/cache@"):
            # restore: this session's tree cache is what an earlier run would have saved
            assert runner.expand(step["with"]["path"]) == runner.env["MIXSPEC_CACHE_DIR"]
            shutil.copytree(tree_cache_dir, runner.env["MIXSPEC_CACHE_DIR"])
            ran.append("cache")
            continue
        if uses.startswith("actions/upload-artifact@"):
            reports = Path(runner.expand(step["with"]["path"]))
            assert sorted(p.name for p in reports.iterdir()) == [
                "train_new.mixspec.yaml.html", "train_qwen.mixspec.yaml.html", "train_same.mixspec.yaml.html"]
            ran.append("upload")
            continue
        if uses or step.get("id") == "install":
            continue  # checkout, setup-python; mixspec is installed here already
        done = runner.run(step, repo, temp)
        if not step.get("continue-on-error"):
            assert done.returncode == 0, f"step {step.get('name')}: {done.stdout}\n{done.stderr}"
        ran.append(step.get("id") or step["name"])
    assert ran == ["cache", "Validate every spec", "diff", "Post the diff on the pull request", "upload"]

    body = (tmp_path / "gh.body").read_text(encoding="utf-8")
    assert (tmp_path / "gh.args").read_text().split() == ["pr", "comment", "17", "--body-file",
                                                          str(temp / "mixspec-diff.md")]
    assert summary.read_text(encoding="utf-8") == body
    sections = {m.group(1): m.group(2) for m in
                re.finditer(r"### mixspec: `([^`]+)`\n(.*?)(?=### mixspec: |\Z)", body, re.S)}
    assert set(sections) == {"train/qwen.mixspec.yaml", "train/same.mixspec.yaml",
                             "train/new.mixspec.yaml", "old/mixspec.yaml"}
    assert "| lr `aligner` | 1e-05 | 3e-05 |" in sections["train/qwen.mixspec.yaml"]
    assert "Same training as" in sections["train/same.mixspec.yaml"]
    assert "component(s) language are selected or configured in other words" in sections["train/same.mixspec.yaml"]
    short = _git(repo, "rev-parse", "--short", base)
    assert f"from `{short}:train/qwen.mixspec.yaml`" in sections["train/qwen.mixspec.yaml"]
    assert "New spec" in sections["train/new.mixspec.yaml"] and "lora r8 a32" in sections["train/new.mixspec.yaml"]
    assert "Spec removed" in sections["old/mixspec.yaml"]
    assert "config.yaml" not in body


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_validate_step_fails_on_a_broken_spec(pull_request, tmp_path):
    repo, _ = pull_request
    _write(repo / "train" / "bad.mixspec.yaml", SEED.replace("rank: 16", "rank: 0"))
    _git(repo, "add", "-A")
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    job = workflow["jobs"]["specs"]
    step = next(s for s in job["steps"] if s.get("name") == "Validate every spec")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "MIXSPEC_SPECS": job["env"]["MIXSPEC_SPECS"]}
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "train/bad.mixspec.yaml:" in done.stderr and "rank" in done.stderr


def test_pre_commit_example_uses_mixspecs_hook(tmp_path):
    config = yaml.safe_load((ROOT / "examples" / "ci" / "pre-commit-config.yaml").read_text(encoding="utf-8"))
    hooks = {h["id"]: h for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))}
    used = [h["id"] for repo in config["repos"] for h in repo["hooks"]]
    assert used == ["mixspec-validate"] and set(used) <= set(hooks)
    hook = hooks["mixspec-validate"]
    # the hook's selection is the workflow's: the same files are checked before and after a push
    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert hook["files"] == workflow["jobs"]["specs"]["env"]["MIXSPEC_SPECS"]
    good = tmp_path / "a.mixspec.yaml"
    bad = tmp_path / "b.mixspec.yaml"
    _write(good, SEED)
    _write(bad, SEED.replace("rank: 16", "rank: 0"))
    assert re.search(hook["files"], str(good)) and not re.search(hook["files"], str(tmp_path / "config.yaml"))
    mixspec = str(Path(sys.executable).parent / hook["entry"].split()[0])
    argv = [mixspec, *hook["entry"].split()[1:], *hook["args"]]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    assert subprocess.run([*argv, str(good)], env=env, capture_output=True).returncode == 0
    done = subprocess.run([*argv, str(good), str(bad)], env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "b.mixspec.yaml:" in done.stderr
