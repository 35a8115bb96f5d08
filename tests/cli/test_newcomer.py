"""A newcomer's first hour (issue 12): usage errors, tree and explain output, located
errors that say what to write, cache lookups as huggingface_hub does them."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mixspec.errors import SpecError
from mixspec.language.loader import load_spec_text
from mixspec.planning.resolve import plan_spec

ROOT = Path(__file__).resolve().parents[2]
SEED = "examples/qwen25vl-7b-mixed.yaml"


def _spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# -- 2. an unknown target is a usage error ------------------------------------------------

def test_unknown_target_is_a_usage_error_with_did_you_mean(run_cli):
    result = run_cli("compile", SEED, "-t", "swfit")
    assert result.exit_code == 2
    assert "unknown target 'swfit'; did you mean 'swift'?" in result.stderr
    assert "targets: axolotl, deepspeed, hf, llamafactory, swift" in result.stderr
    assert "cannot express" not in result.stderr


# -- 3. tree: a collapsed block hides its children too ------------------------------------

def test_tree_collapsed_blocks_hide_their_children(run_cli):
    result = run_cli("tree", "Qwen/Qwen2-VL-2B-Instruct", "--depth", "5")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("blocks ModuleList"))
    more = next(i for i, line in enumerate(lines) if line.strip() == "... (30 more)")
    # the vision tower has 32 blocks of 4 children each: block 0, the marker, block 31
    shown = lines[start + 1:more + 6]
    assert [line.strip().split()[0] for line in shown] == [
        "0", "norm1", "norm2", "attn", "mlp", "...", "31", "norm1", "norm2", "attn", "mlp"]
    assert sum(1 for line in lines if line.strip().startswith("norm1 LayerNorm")) == 2


# -- 4. swift: the lora_llm explanation is a whole sentence ---------------------------------

def test_swift_lora_llm_explanation_is_not_cut(run_cli):
    result = run_cli("compile", "tests/targets/specs/swift/lmhead-aligner.yaml", "-t", "swift", "--no-plugin")
    assert result.exit_code == 1
    assert "would not be\n" not in result.stderr + "\n"
    assert re.search(r"fully, but the spec does not train these \d+ parameters fully", result.stderr)


# -- 5. tied embedding / lm_head: name the role, show the line; plan says where it trains --

TIED = "version: 1\nmodel: Qwen/Qwen2-VL-2B-Instruct\ncomponents:\n  lm_head: {train: full, lr: 1.0e-5}\n"
TIED_BOTH = TIED + "  embeddings: {train: full, lr: 1.0e-5}\n"


def test_tied_hint_names_the_embeddings_role_and_the_line_to_add(tmp_path):
    with pytest.raises(SpecError) as info:
        plan_spec(load_spec_text(TIED, "tied.yaml"))
    [error] = [p for p in info.value.problems if p.severity == "error"]
    hint = error.hint
    assert "'unassigned'" not in hint
    assert "add `embeddings: {train: full, lr: 1.0e-5}` under components" in hint
    # the line it shows is a spec that resolves, and trains the tied tensor
    plan = plan_spec(load_spec_text(TIED_BOTH, "fixed.yaml"))
    assert {c.name: c.trainable_params for c in plan.components}["embeddings"] > 0


def test_plan_shows_lm_head_trained_through_its_tied_partner(run_cli, tmp_path):
    spec = _spec(tmp_path, TIED_BOTH)
    result = run_cli("plan", spec)
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("│ lm_head"))
    assert "tied to" in row and "'embeddings'" in result.stdout


# -- 6. explain: the component's mode, LR, LoRA and a tied partner --------------------------

def test_explain_shows_mode_lr_lora_and_targets(run_cli):
    result = run_cli("explain", SEED, "model.language_model.layers.3.self_attn")
    assert result.exit_code == 0, result.stderr
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert "mode lora, lr 0.0001, LoRA rank 16 alpha 32 targets all-linear" in out
    assert "LoRA on 4 module(s) here" in out
    assert "model.language_model.layers.3.self_attn.q_proj" in out
    vit = run_cli("explain", SEED, "model.visual.blocks.0.attn")
    assert "mode full, lr 2e-06" in " ".join(vit.stdout.split())


def test_explain_names_the_tied_partner_and_who_trains_it(run_cli, tmp_path):
    spec = _spec(tmp_path, TIED_BOTH)
    result = run_cli("explain", spec, "lm_head")
    out = " ".join(result.stdout.split())
    assert "lm_head.weight is tied to model.language_model.embed_tokens.weight (one tensor), " \
           "which component 'embeddings' claims" in out


# -- 9. unknown keys are reported even when `train` is missing --------------------------------

@pytest.mark.parametrize("train", ["trian: full", "train: fulll"])
def test_unknown_keys_reported_without_a_valid_train(train):
    text = ("version: 1\nmodel: Qwen/Qwen2-VL-2B-Instruct\ncomponents:\n"
            f"  language: {{{train}, lr: 1.0e-5, weight_decy: 0.1}}\n")
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "typo.yaml")
    by_path = {p.path: p for p in info.value.problems}
    assert by_path["components.language.weight_decy"].hint == "did you mean 'weight_decay'?"
    assert by_path["components.language.weight_decy"].location.col == text.splitlines()[3].index("weight_decy") + 1
    if train.startswith("trian"):
        assert by_path["components.language.trian"].hint == "did you mean 'train'?"


# -- 10. regexes are shown as written -------------------------------------------------------

def test_regexes_are_echoed_as_written(run_cli, tmp_path):
    spec = _spec(tmp_path, r"""
        version: 1
        model: Qwen/Qwen2-VL-2B-Instruct
        components:
          late:
            modules: ['model\.visual\.blockz\.3', 'model\.visual\.blocks\.(2|3)']
            train: full
            lr: 1.0e-5
        """)
    result = run_cli("validate", spec)
    assert r"pattern 'model\.visual\.blockz\.3' matches no module" in result.stderr
    assert "\\\\" not in result.stderr
    Path(spec).write_text(Path(spec).read_text().replace("blockz", "blocks"))
    explained = run_cli("explain", spec, "model.visual.blocks.3.attn")
    assert r"by pattern 'model\.visual\.blocks\.3'" in explained.stdout
    assert "\\\\" not in explained.stdout


def test_control_characters_in_echoed_strings_stay_escaped():
    from mixspec.errors import quoted

    assert quoted("a\x1b[31mb") == repr("a\x1b[31mb")
    assert quoted(r"model\.x") == r"'model\.x'"


# -- 11. plan warns about a spec that trains nothing ---------------------------------------

def test_plan_warns_when_nothing_is_trained(run_cli, tmp_path):
    spec = _spec(tmp_path, """\
        version: 1
        model: Qwen/Qwen2-VL-2B-Instruct
        components:
          language: {train: freeze}
        """)
    result = run_cli("plan", spec)
    assert result.exit_code == 0
    assert "warning: components: the spec trains nothing" in result.stderr


# -- 12. help, several specs, one JSON convention, catalog did-you-mean ---------------------

@pytest.mark.parametrize("command, usage", [
    ("plan", "Usage: mixspec plan [OPTIONS] SPEC..."),
    ("validate", "Usage: mixspec validate [OPTIONS] SPEC..."),
    ("explain", "Usage: mixspec explain [OPTIONS] SPEC NAME"),
    ("compile", "Usage: mixspec compile [OPTIONS] SPEC"),
    ("tree", "Usage: mixspec tree [OPTIONS] MODEL"),
])
def test_help_usage_reads_as_typed(run_cli, command, usage):
    result = run_cli(command, "--help")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == usage
    assert "{" not in result.stdout.split("Options:")[0]
    assert "<list[" not in result.stdout


def test_plan_takes_several_specs_and_both_json_spellings(run_cli):
    one = run_cli("plan", SEED, "--json")
    assert one.exit_code == 0, one.stderr
    assert json.loads(one.stdout)["totals"]["trainable_params"] == 716_920_320
    fmt = run_cli("plan", SEED, "--format", "json")
    assert fmt.stdout == one.stdout
    two = run_cli("plan", SEED, "examples/" + sorted(p.name for p in (ROOT / "examples").glob("*.yaml")
                                                    if p.name != Path(SEED).name)[0], "--json")
    assert two.exit_code == 0, two.stderr
    plans = json.loads(two.stdout)
    assert isinstance(plans, list) and len(plans) == 2 and plans[0] == json.loads(one.stdout)
    text = run_cli("plan", SEED, SEED)
    assert text.stdout.count("base params 8,292,166,656") == 2


def test_validate_json_alias(run_cli):
    a = run_cli("validate", SEED, "--json", "--no-model")
    b = run_cli("validate", SEED, "--format", "json", "--no-model")
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout and json.loads(a.stdout)["valid"] is True


def test_tree_unknown_id_suggests_catalog_ids(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    result = run_cli("tree", "Qwen/Qwen2.5-VL-72B")
    assert result.exit_code == 1
    assert "did you mean 'Qwen/Qwen2.5-VL-72B-Instruct'" in result.stderr


# -- 14. caches: huggingface_hub's own rule (XDG_CACHE_HOME included), fake layouts ----------

CONFIG = (ROOT / "compiler" / "models" / "catalog" / "Qwen" / "Qwen2-VL-2B-Instruct" / "config.json").read_text()

_FIND = ("import sys; from mixspec.models.sources import find_model; m = find_model(sys.argv[1]); "
         "print(m.kind); print(m.path)")


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "MODELSCOPE_CACHE")}


def _find_in_subprocess(ref: str, env: dict, cwd: Path) -> tuple[str, str]:
    result = subprocess.run([sys.executable, "-c", _FIND, ref], env={**_clean_env(), **env}, cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kind, path = result.stdout.splitlines()
    return kind, path


def _fake_hf_repo(hub: Path, ref: str, commit: str = "abc123") -> Path:
    repo = hub / ("models--" + ref.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(CONFIG)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.mark.parametrize("var", ["XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE"])
def test_hf_cache_found_where_huggingface_hub_looks(tmp_path, var):
    pytest.importorskip("huggingface_hub")
    env = {"HOME": str(tmp_path / "home"), var: str(tmp_path / "root")}
    # the oracle: where huggingface_hub itself keeps the hub cache in this environment
    where = subprocess.run([sys.executable, "-c", "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"],
                           env={**_clean_env(), **env}, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    hub = Path(where.stdout.strip())
    assert str(hub).startswith(str(tmp_path / "root"))
    snap = _fake_hf_repo(hub, "someorg/tiny-vl")
    kind, path = _find_in_subprocess("someorg/tiny-vl", env, tmp_path)
    assert (kind, Path(path)) == ("hf-cache", snap)


def test_hf_cache_follows_refs_main(tmp_path):
    hub = tmp_path / "hub"
    old = _fake_hf_repo(hub, "someorg/tiny-vl", "old")
    new = old.parent / "new"
    new.mkdir()
    (new / "config.json").write_text(CONFIG)
    (old.parent.parent / "refs" / "main").write_text("old")
    kind, path = _find_in_subprocess("someorg/tiny-vl", {"HF_HUB_CACHE": str(hub), "HOME": str(tmp_path)}, tmp_path)
    assert Path(path) == old


@pytest.mark.parametrize("layout", ["models/someorg/tiny-vl", "someorg/tiny-vl", "models/someorg/tiny___vl1___5"])
def test_modelscope_cache_layouts(tmp_path, layout):
    ms = tmp_path / "ms"
    (ms / layout).mkdir(parents=True)
    (ms / layout / "config.json").write_text(CONFIG)
    ref = "someorg/tiny.vl1.5" if "___" in layout else "someorg/tiny-vl"
    env = {"MODELSCOPE_CACHE": str(ms), "HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "nohf")}
    kind, path = _find_in_subprocess(ref, env, tmp_path)
    assert (kind, Path(path)) == ("modelscope-cache", ms / layout)


# -- 16. docs/testing.md: the ms-swift venv's size -----------------------------------------

@pytest.mark.slow
def test_docs_state_the_swift_venv_size():
    venv = os.environ.get("MIXSPEC_SWIFT_VENV") or str(ROOT / ".venv-swift")
    if not Path(venv).is_dir():
        pytest.skip(f"no ms-swift venv at {venv} (bash scripts/swift_env.sh)")
    out = subprocess.run(["du", "-sk", venv], capture_output=True, text=True, timeout=300).stdout
    size_gb = int(out.split()[0]) * 1024 / 2**30
    page = (ROOT / "docs" / "testing.md").read_text()
    stated = float(re.search(r"\(`\.venv-swift`, about ([\d.]+) GB", page).group(1))
    assert abs(stated - size_gb) <= 0.3, f"docs/testing.md says {stated} GB, the venv is {size_gb:.1f} GiB"


# -- 1. hf: train.py --check runs offline for catalog, cache and local-dir models ---------

def _compile_hf(tmp_path: Path, model: str) -> Path:
    from mixspec.language.loader import load_spec
    from mixspec.output import write_files
    from mixspec.targets import TargetOptions, render

    spec = _spec(tmp_path, f"""\
        version: 1
        model: {model}
        components:
          vision: {{train: full, lr: 2.0e-6}}
          language: {{train: lora, lr: 1.0e-4, lora: {{rank: 8}}}}
        data: {{train: data/train.jsonl}}
        """)
    out = tmp_path / "out"
    write_files(out, render(plan_spec(load_spec(spec)), "hf", TargetOptions()), force=True)
    return out


def test_hf_output_carries_the_models_config(tmp_path):
    out = _compile_hf(tmp_path, "Qwen/Qwen2-VL-2B-Instruct")
    # the oracle: the published config the catalog ships, as data
    assert json.loads((out / "model_config.json").read_text()) == json.loads(CONFIG)


def _offline_check(train_py: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    # no network, an empty Hugging Face home: nothing but what the compiled output carries
    env = {**_clean_env(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(train_py), "--check"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_hf_check_offline_for_a_catalog_model(tmp_path):
    out = _compile_hf(tmp_path, "Qwen/Qwen2-VL-2B-Instruct")
    result = _offline_check(out / "train.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "self-check passed" in result.stdout
    assert f"config: {out / 'model_config.json'}" in result.stdout


@pytest.mark.slow
def test_hf_check_offline_for_a_local_dir_that_is_gone(tmp_path):
    model = tmp_path / "models" / "qwen2vl"
    model.mkdir(parents=True)
    (model / "config.json").write_text(CONFIG)
    out = _compile_hf(tmp_path, str(model))
    for f in model.iterdir():  # train.py now runs where that directory does not exist
        f.unlink()
    model.rmdir()
    result = _offline_check(out / "train.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "self-check passed" in result.stdout


# -- 13. LLaMA-Factory: train.yaml names paths relative to where it is run -------------------

def test_llamafactory_paths_are_relative_to_the_run_directory(run_cli, tmp_path):
    out = tmp_path / "lf"  # an absolute -o
    result = run_cli("compile", "examples/qwen25vl-7b-mixed.yaml", "-t", "llamafactory", "--approximate",
                     "-o", str(out))
    assert result.exit_code == 0, result.stderr
    text = (out / "train.yaml").read_text()
    cfg = yaml.safe_load((out / "train.yaml").read_text())
    info = json.loads((out / "dataset_info.json").read_text())
    paths = (cfg["dataset_dir"], cfg["deepspeed"], info["mixspec_train"]["file_name"])
    assert not any(p.startswith("/") for p in paths), paths
    assert f"llamafactory-cli train {cfg['dataset_dir']}/train.yaml" in text
    # run from ROOT (where compile ran), each path reaches what it names
    assert (ROOT / cfg["dataset_dir"]).resolve() == out.resolve()
    assert (ROOT / cfg["deepspeed"]).resolve() == (out / "ds_z2_config.json").resolve()
    assert (ROOT / cfg["dataset_dir"] / info["mixspec_train"]["file_name"]).resolve() == ROOT / "data" / "train.jsonl"


# -- 7. refusals: one message per cause, listing the parts; --approximate named where it helps --

def test_refusal_says_each_cause_once_and_lists_the_components(run_cli):
    result = run_cli("compile", "examples/design-example.yaml", "-t", "llamafactory")
    assert result.exit_code == 1
    err = result.stderr
    assert err.count("LLaMA-Factory trains every parameter with one learning_rate") == 1
    assert err.count("trains a module fully only through additional_target") == 1
    for line in (":13:3: component 'vision' at learning rate 2e-06", ":14:3: component 'aligner' at learning rate 1e-05",
                 ":15:3: component 'language' at learning rate 0.0001",
                 ":19:3: component 'late_vit_blocks' at learning rate 5e-06"):
        assert line in err
    assert err.count("hint:") == 2
    assert err.count("or pass --approximate") == 2  # both causes are approximable
    # a cause --approximate cannot lift does not mention it
    no_data = run_cli("compile", "tests/specs/valid/minimal.yaml", "-t", "llamafactory")
    assert no_data.exit_code == 1 and "--approximate" not in no_data.stderr


def test_refusal_items_stay_one_per_part():
    import mixspec

    with pytest.raises(mixspec.UnsupportedError) as info:
        mixspec.render(mixspec.plan_spec("examples/design-example.yaml"), "llamafactory")
    assert len([i for i in info.value.items if i.code == "per-component-lr"]) == 4


# -- 8. --approximate's one LR: least harm, each factor on stderr ---------------------------

def test_approximate_lr_is_the_minimax_choice_and_factors_are_printed(run_cli, tmp_path):
    result = run_cli("compile", SEED, "-t", "llamafactory", "--approximate", "-o", str(tmp_path / "lf"))
    assert result.exit_code == 0, result.stderr
    chosen = yaml.safe_load((tmp_path / "lf" / "train.yaml").read_text())["learning_rate"]
    planned = {"vision": 2e-6, "aligner": 1e-5, "language": 1e-4}  # the spec's own numbers

    def worst(lr: float) -> float:  # the largest factor any component is off by
        return max(max(lr / p, p / lr) for p in planned.values())

    # least harm: no single LR keeps every component closer to its own (3 digits of rounding)
    candidates = [10 ** (e / 100) for e in range(-700, -300)] + list(planned.values())
    assert worst(chosen) <= min(worst(c) for c in candidates) * 1.005
    assert worst(chosen) < worst(max(planned.values())) and worst(chosen) < worst(min(planned.values()))
    for name, lr in planned.items():
        assert (f"warning: target llamafactory: --approximate: component {name!r} trains at learning rate "
                f"{chosen:g} instead of {lr:g}: {chosen / lr:.3g}x") in result.stderr


# -- the front page: a short README, links that lead somewhere ----------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)  # not `# node 0`
    heads = re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_is_a_front_page_of_at_most_300_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move reference text to docs/"
    heads = [line[3:] for line in lines if line.startswith("## ")]
    order = ["Install", "Two commands", "Tutorial", "CLI", "Exit codes", "Targets", "Documentation"]
    found = [next(i for i, h in enumerate(heads) if h.startswith(name)) for name in order]
    assert found == sorted(found), heads


def test_every_relative_link_in_readme_and_docs_leads_somewhere():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in _LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:: not this test's business
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert len(pages) > 5 and not broken, "\n".join(broken)


def test_readme_uses_only_commands_the_cli_has():
    """Every `mixspec CMD` the README shows is a command of the CLI (click's own list)."""
    import typer

    from mixspec.cli import app

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(typer.main.get_command(app).commands)
    # as typed: in code blocks and `inline code`, at a line's start or after &&
    blocks = re.findall(r"^```.*?^```", readme, flags=re.M | re.S)
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.M | re.S)
    code = "\n".join(blocks + re.findall(r"`([^`\n]+)`", prose))
    used = set(re.findall(r"(?:^|&& )mixspec ([a-z][a-z-]+)", code, flags=re.M))
    assert {"validate", "plan", "compile", "data"} <= used
    missing = sorted(used - listed)
    assert not missing, f"README shows mixspec {missing}, which the CLI does not have"


def test_readme_demo_output_is_what_plan_prints():
    """The demo's output in the README is `mixspec plan` on the seed example, unwrapped (a wide
    terminal), but for the installed transformers version."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.search(r"^```\n(examples/qwen25vl-7b-mixed\.yaml: .*?)^```", readme, flags=re.M | re.S).group(1)
    env = dict(os.environ, COLUMNS="200", TERM="dumb", NO_COLOR="1")
    got = subprocess.run([sys.executable, "-c", "from mixspec.fast import main; main()", "plan", SEED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    version = re.compile(r"transformers [\d.]+\)")
    assert version.sub("transformers X)", shown) == version.sub("transformers X)", got.stdout)


@pytest.mark.slow
def test_readme_tutorial_runs_as_written(tmp_path):
    """The tutorial's shell blocks, as the README prints them, in a fresh directory: from a
    tiny model directory to 3 training steps on CPU and a saved run."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tutorial = readme[readme.index("## Tutorial"):readme.index("## CLI")]
    blocks = re.findall(r"^```bash\n(.*?)^```", tutorial, flags=re.M | re.S)
    assert len(blocks) >= 5
    # no repository files: the tutorial needs only the installed package (mixspec tiny, not a test fixture)
    assert "tests/" not in "\n".join(blocks)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    run = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(blocks)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert "my-spec.yaml: ok" in said and "self-check passed" in said
    final = tmp_path / "try" / "runs" / "my-model" / "final"
    assert (final / "trained_params.safetensors").is_file() and (final / "mixspec_plan.json").is_file()


# -- issue 28: the generated train.py as a newcomer meets it --------------------------------
# The oracle is the compiled program itself, run as a user runs it (a subprocess, no mixspec
# needed) on a tiny random LLaVA with its real tokenizer and processor files.

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):
    """(compiled output dir, model dir, data file) for a tiny LLaVA: one step, fp32, on CPU."""
    pytest.importorskip("PIL")
    sys.path.insert(0, str(FIXTURES))
    import make_tiny_vlm

    from mixspec.language.loader import load_spec
    from mixspec.output import write_files
    from mixspec.targets import TargetOptions, render

    root = tmp_path_factory.mktemp("tiny_train")
    model = make_tiny_vlm.make_tiny_llava(root / "model")
    (root / "data").mkdir()
    data = make_tiny_vlm.colour_rows(root / "data")
    spec = _spec(root, f"""\
        version: 1
        model: {model}
        components:
          vision: {{train: full, lr: 1.0e-6}}
          language: {{train: lora, lr: 2.0e-4, lora: {{rank: 4, alpha: 8, targets: all-linear}}}}
        training: {{max_length: 512, precision: fp32, gradient_checkpointing: true, max_steps: 1, logging_steps: 1}}
        data: {{train: {data}}}
        """)
    out = root / "out"
    write_files(out, render(plan_spec(load_spec(spec)), "hf", TargetOptions()), force=True)
    return out, model, data


def _run_train_py(train_py: Path, *args, cwd: Path, python_args=(), timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIXSPEC_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, *python_args, str(train_py), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# runs a script as __main__ and reports, at its exit, whether torch / transformers were imported
_IMPORT_PROBE = """\
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("loaded:", "torch" in sys.modules, "transformers" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["--no-such-option"], 2), (["--max-steps", "x"], 2)])
def test_train_py_help_and_usage_errors_answer_before_torch_loads(tiny_train, tmp_path, args, code):
    out, _, _ = tiny_train
    result = _run_train_py(out / "train.py", *args, cwd=tmp_path, python_args=["-c", _IMPORT_PROBE])
    assert result.returncode == code, result.stderr[-2000:]
    assert "loaded: False False" in result.stderr, result.stderr[-2000:]
    assert ("--output-dir" in result.stdout) if code == 0 else ("train.py: error:" in result.stderr)


@pytest.fixture(scope="module")
def trained(tiny_train, tmp_path_factory):
    """One training run of the compiled train.py, run as a user in another folder runs it:
    `python ../out/train.py --output-dir run` (cwd, the run's result)."""
    out, _, _ = tiny_train
    work = tmp_path_factory.mktemp("work")
    script = os.path.relpath(out / "train.py", work)
    result = _run_train_py(Path(script), "--output-dir", "run", cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, script, result


def test_the_merge_hint_is_a_command_that_runs_where_training_ran(trained):
    work, script, result = trained
    [hint] = re.findall(r"merge with: (.*)$", result.stdout, re.M)
    assert hint == f"python {script} --merge run/final --out MERGED_DIR"
    # pasted as printed, in the folder where training ran, it merges (the oracle: a model
    # directory transformers loads)
    command = [sys.executable if word == "python" else word for word in shlex.split(hint.replace("MERGED_DIR", "merged"))]
    merged = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads((work / "merged" / "config.json").read_text())["model_type"] == "llava"
    assert "FutureWarning" not in merged.stderr, merged.stderr[-3000:]


def test_a_run_prints_no_future_warning(trained):
    # transformers 5.2x renamed gradient checkpointing: the Trainer's arguments take the new
    # name where it exists, and PEFT's reads of the old one are not the user's to fix
    _, _, result = trained
    assert "gradient checkpointing" in result.stderr.lower() or "use_cache=False" in result.stderr  # it was on
    assert "FutureWarning" not in result.stderr, result.stderr[-3000:]


def _tree_bytes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_refuses_to_overwrite_the_final_model_unless_told(trained, tiny_train, tmp_path):
    work, _, _ = trained
    out, _, _ = tiny_train
    shutil.copytree(work / "run", tmp_path / "run")
    before = _tree_bytes(tmp_path / "run")
    again = _run_train_py(out / "train.py", "--output-dir", "run", cwd=tmp_path)
    assert again.returncode == 1, again.stdout[-2000:] + again.stderr[-2000:]
    assert "error: run/final exists" in again.stderr and "Traceback" not in again.stderr
    assert "hint: pass --overwrite to replace it, or --output-dir DIR" in again.stderr
    # stopped before the data check and the model: nothing read, nothing written
    assert "data check" not in again.stdout and "Loading weights" not in again.stderr
    assert _tree_bytes(tmp_path / "run") == before
    # --overwrite: the new final replaces the old one whole (a file only the old one had is gone)
    (tmp_path / "run" / "final" / "left-by-the-old-run.txt").write_text("old")
    (tmp_path / "run" / "checkpoint-7").mkdir()  # the old run's: a later --resume must not pick it up
    replaced = _run_train_py(out / "train.py", "--output-dir", "run", "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    final = tmp_path / "run" / "final"
    assert not (final / "left-by-the-old-run.txt").exists() and not (tmp_path / "run" / "checkpoint-7").exists()
    assert (final / "adapter_model.safetensors").is_file() and (final / "mixspec_plan.json").is_file()


def test_a_new_run_over_an_earlier_runs_checkpoints_needs_resume_or_overwrite(tiny_train, tmp_path):
    out, _, _ = tiny_train
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    result = _run_train_py(out / "train.py", "--output-dir", "run", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: run/checkpoint-2 exists (1 checkpoint(s) of an earlier run in run)" in result.stderr
    assert "hint: pass --resume to continue that run, --overwrite" in result.stderr
    assert (tmp_path / "run" / "checkpoint-2").is_dir()


def test_a_model_dir_without_tokenizer_files_is_a_clear_error(tiny_train, tmp_path):
    out, model, _ = tiny_train
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(model / "config.json", config_only / "config.json")
    for args in (["--preview-data", "2", "--preview-out", "preview"], ["--output-dir", "run"]):
        result = _run_train_py(out / "train.py", "--model", "config-only", *args, cwd=tmp_path)
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "warning: no image processor" not in result.stdout
        assert "error: model dir config-only has no tokenizer or processor files" in result.stderr
        assert "hint: pass --model DIR with a directory that has them" in result.stderr
        assert not (tmp_path / "preview").exists() and not (tmp_path / "run").exists()


def test_the_log_explains_learning_rate_beside_each_components_lr(trained):
    _, _, result = trained
    assert ("log: learning_rate is the Trainer's own key, the LR of its first optimizer group (component vision); "
            "each component trains at its own LR, logged as lr/<component> (lr/vision, lr/language)") in result.stdout
    [logged] = [ast.literal_eval(line[line.index("{'loss'"):].strip()) for line in (result.stdout + result.stderr).splitlines()
                if "{'loss'" in line]
    # the oracle: the Trainer's own key, read by the Trainer; the same step's LR of group 0
    assert float(logged["learning_rate"]) == float(logged["lr/vision"]) == 1e-6
    assert float(logged["lr/language"]) == 2e-4  # one step, no warmup: the spec's LR
