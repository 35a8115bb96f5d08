"""The generated programs as real files (mixspec/programs/): each imports and lints as it
stands in the package (Python: ruff; shell: bash -n, shellcheck where installed); a generated
file is that program with its marked blocks filled and its default blocks kept or replaced,
byte for byte (the golden files hold only the generated blocks); it runs where mixspec cannot
be imported; a program whose markers are missing, duplicated, malformed or wrongly nested
stops the renderer, and so does a target that fills the blocks wrongly.

Oracles: the program files themselves (read from disk, substituted here by a splice written
for this test, not mixspec's), ruff, bash, and a Python process in which importing mixspec fails.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, goldens
from mixspec.models import names
from mixspec import programs
from mixspec.errors import UnsupportedError
from mixspec.language.loader import load_spec
from mixspec.planning.resolve import plan_spec
from mixspec.targets import TargetOptions, render

PROGRAM_DIR = ROOT / "compiler" / "programs"
# generated file -> the package program it is rendered from
OUTPUT_OF = {"train.py": "hf_train", "launch.sh": "hf_launch", "mixspec_plugin.py": "swift_plugin",
             "train.sh": "swift_train", "sbatch.sh": "sbatch"}
PYTHON_PROGRAMS = [p for p, f in programs.PROGRAMS.items() if f.endswith(".py")]
SHELL_PROGRAMS = [p for p, f in programs.PROGRAMS.items() if f.endswith(".sh")]
SWIFT_VENV = Path(os.environ.get("MIXSPEC_SWIFT_VENV") or ROOT / ".venv-swift")

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


# -- an independent splice: program + blocks -> file -------------------------------------------
# A (generated) block's lines come from the golden data part. A (default) block is the program's
# own text: kept as it is (the data part then holds only the generated blocks inside it), or
# replaced whole (the data part holds it as a generated block of the same name).
_BEGIN = re.compile(r"# --- mixspec: (\w+) \((generated|default)\) ---\n")


def split_blocks(text: str) -> dict[str, str]:
    """Block name -> the lines between its markers, from a golden data part."""
    out, name = {}, None
    for line in text.splitlines(keepends=True):
        begin = _BEGIN.fullmatch(line)
        if begin:
            assert name is None and begin.group(2) == "generated", line  # a data part is flat
            name = begin.group(1)
            out[name] = ""
        elif name and line == f"# --- end mixspec: {name} ---\n":
            name = None
        elif name:
            out[name] += line
    return out


def splice(program: str, blocks: dict[str, str]) -> str:
    """The program with the lines inside each generated block replaced by blocks[name], and each
    default block kept, or replaced when blocks has it."""
    out, skip_to = [], None
    for line in program.splitlines(keepends=True):
        if skip_to is not None:  # inside a block being replaced: drop its lines up to its end
            if line == skip_to:
                out.append(line)
                skip_to = None
            continue
        begin = _BEGIN.fullmatch(line)
        if begin and (begin.group(2) == "generated" or begin.group(1) in blocks):
            name = begin.group(1)
            out.append(f"# --- mixspec: {name} (generated) ---\n")
            out.append(blocks.pop(name))
            skip_to = f"# --- end mixspec: {name} ---\n"
        else:
            out.append(line)
    assert skip_to is None and not blocks, (skip_to, sorted(blocks))
    return "".join(out)


def _swift_cases():
    from test_target_swift import _cases

    return [(f"swift/{case}", rel, options) for case, rel, options in _cases()]


GOLDEN_CASES = [(f"hf/{case}", rel, {}) for case, rel in sorted(goldens.cases().items())] + _swift_cases()


@pytest.mark.parametrize("case,rel,options", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_generated_file_is_the_package_program_with_the_golden_blocks(monkeypatch, case, rel, options):
    """What a target writes == the program file on disk with the golden data part and the
    inlined helpers spliced in, byte for byte: the golden files lose nothing."""
    monkeypatch.chdir(ROOT)
    target, name = case.split("/")
    plan = plan_spec(load_spec(Path(rel)))
    try:
        files = render(plan, target, TargetOptions(**options))
    except UnsupportedError:  # a refused case has no program
        return
    folder = ROOT / "tests" / "targets" / target / name
    if not folder.exists() and name.endswith("--no-plugin"):  # the plugin case's files (test_target_swift's golden test)
        folder = folder.with_name(name.removesuffix("--no-plugin"))
    found = []
    for out_name, program in OUTPUT_OF.items():
        if out_name not in files:
            continue
        found.append(out_name)
        data = (folder / (out_name + ".data")).read_text(encoding="utf-8")
        blocks = split_blocks(data)
        program_file = (PROGRAM_DIR / programs.PROGRAMS[program]).read_text(encoding="utf-8")
        generated = re.findall(r"^# --- mixspec: (\w+) \(generated\) ---$", program_file, re.M)
        defaults = re.findall(r"^# --- mixspec: (\w+) \(default\) ---$", program_file, re.M)
        # the golden holds every generated block (bar the helpers), and a default block only when replaced
        assert set(generated) - {"helpers"} - set(blocks) <= _inside_replaced(program_file, blocks), out_name
        assert set(blocks) - set(generated) <= set(defaults), out_name
        if programs.BEGIN.format("helpers") in program_file:
            blocks["helpers"] = programs.helpers_source()
        # the golden data part holds a placeholder for the recorded library versions
        assert goldens.normalise_versions(files[out_name]) == splice(program_file, blocks), \
            f"{case}/{out_name}: {goldens.drift_hint()}"
    # every case that compiles writes its target's programs
    assert {"hf": {"train.py", "launch.sh"}, "swift": {"train.sh"}}[target] <= set(found)
    assert ("sbatch.sh" in found) == ("sbatch.sh" in files)


def _inside_replaced(program: str, blocks: dict[str, str]) -> set[str]:
    """The generated blocks inside a default block that ``blocks`` replaces (they go with it)."""
    out, inside = set(), None
    for line in program.splitlines():
        begin = re.fullmatch(r"# --- mixspec: (\w+) \((generated|default)\) ---", line)
        if begin and begin.group(2) == "default" and begin.group(1) in blocks:
            inside = begin.group(1)
        elif begin and inside:
            out.add(begin.group(1))
        elif inside and line == f"# --- end mixspec: {inside} ---":
            inside = None
    return out


def test_inlined_helpers_are_mixspec_names_source():
    """The helpers block of every output is the source of mixspec.models.names' functions, nothing else."""
    source = programs.helpers_source()
    tree = ast.parse(source)
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert defined == ["natural_key", "ranges", "compact_names", "expand_names", "names_sha256", "fingerprint"]
    for fn in defined:
        assert inspect.getsource(getattr(names, fn)) in source
    namespace = {"re": re, "hashlib": __import__("hashlib")}
    exec(compile(source, "helpers", "exec"), namespace)
    assert namespace["INDEX"].pattern == names.INDEX.pattern
    # the package's Python programs import the same names in their helpers block
    for program in PYTHON_PROGRAMS:
        imported = programs.block_text(programs.program_text(program), "helpers", program)
        node = ast.parse(imported).body[0]
        assert isinstance(node, ast.ImportFrom) and node.module == "mixspec.models.names"
        assert sorted(a.name for a in node.names) == sorted(["INDEX", *defined])


# -- the package programs import and lint as they are -------------------------------------------
def _fresh_import(module_name: str):
    sys.modules.pop(module_name, None)
    return importlib.import_module(module_name)


def test_hf_train_program_imports_and_its_placeholder_plan_has_the_generated_shape(tmp_path, monkeypatch):
    module = _fresh_import("mixspec.programs.hf_train")
    with pytest.raises(SystemExit) as info:
        module.parse_args(["--help"])
    assert info.value.code == 0
    # the placeholder values have the keys a generated Plan has (the program reads them)
    monkeypatch.chdir(ROOT)
    text = render(plan_spec(load_spec(Path("examples/qwen25vl-7b-mixed.yaml"))), "hf", TargetOptions())["train.py"]
    generated = {}
    exec(compile(programs.block_text(text, "plan"), "plan", "exec"), {}, generated)
    assert list(generated) == ["PLAN", "TRAINING", "DATA", "OUTPUT_DIR", "DISTRIBUTED", "DEEPSPEED_CONFIG",
                               "FSDP_CONFIG", "FSDP_UNITS"]
    for name in ("PLAN", "TRAINING", "DISTRIBUTED"):
        assert list(getattr(module, name)) == list(generated[name]), name
    assert module.PLAN["components"] == [] and module.DATA is None and module.DEEPSPEED_CONFIG is None
    assert module.FSDP_CONFIG is None and module.FSDP_UNITS is None


def test_swift_plugin_program_imports_and_registers(monkeypatch):
    from test_target_swift import _stub_swift

    from mixspec.targets.swift import FULL_PARAMS_FILE, PLUGIN_NAME

    mods = _stub_swift(monkeypatch, 4)
    module = _fresh_import("mixspec.programs.swift_plugin")
    try:
        # registered under the name train.sh passes (--tuner_type/--optimizer)
        assert mods["swift.tuner_plugin"].tuners_map[PLUGIN_NAME] is module.MixspecTuner
        assert mods["swift.optimizers"].optimizers_map[PLUGIN_NAME] is module.MixspecOptimizer
        assert module.FULL_PARAMS_FILE == FULL_PARAMS_FILE
        assert module.plan_lrs() == {} and module.COMPONENTS == []
    finally:
        sys.modules.pop("mixspec.programs.swift_plugin", None)


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe:
        return [exe]
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")


def test_ruff_passes_on_the_programs_and_on_generated_files(tmp_path, monkeypatch):
    ruff = _ruff()
    config = PROGRAM_DIR / "ruff.toml"
    result = subprocess.run([*ruff, "check", "--no-cache", str(PROGRAM_DIR)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # the generated files too (their Plan data may run long lines)
    monkeypatch.chdir(ROOT)
    plan = plan_spec(load_spec(Path("examples/design-example.yaml")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.py").write_text(render(plan, "hf", TargetOptions())["train.py"], encoding="utf-8")
    for version in (3, 4):
        plugin = render(plan, "swift", TargetOptions(swift_version=version))["mixspec_plugin.py"]
        (out / f"plugin{version}.py").write_text(plugin, encoding="utf-8")
    result = subprocess.run([*ruff, "check", "--no-cache", "--config", str(config), "--extend-ignore", "E501",
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # and the check bites: an unused import in a copy of a program fails it
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n" + (PROGRAM_DIR / "hf_train.py").read_text(encoding="utf-8").split("\n", 1)[1],
                   encoding="utf-8")
    result = subprocess.run([*ruff, "check", "--no-cache", "--config", str(config), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "F401" in result.stdout, result.stdout + result.stderr


def test_pyflakes_finds_nothing_in_the_project(tmp_path):
    """ruff's pyflakes rules (F: unused or undefined names, a function defined twice) over the
    package, the tests, benchmarks and scripts: a second test helper of the same name once
    replaced the first and broke two speed tests only CI ran."""
    ruff = _ruff()
    dirs = [str(ROOT / d) for d in ("compiler", "targets", "tests", "benchmarks", "scripts")]
    result = subprocess.run([*ruff, "check", "--no-cache", "--isolated", "--select", "F", *dirs],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # and it bites on exactly that: a function defined twice
    twice = tmp_path / "twice.py"
    twice.write_text("def helper():\n    return 1\n\n\ndef helper(x):\n    return x\n", encoding="utf-8")
    result = subprocess.run([*ruff, "check", "--no-cache", "--isolated", "--select", "F", str(twice)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "F811" in result.stdout, result.stdout + result.stderr


def test_the_programs_package_ships_in_a_non_editable_install():
    """pyproject lists every package under compiler/ (the programs are modules of one)."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    for init in (ROOT / "compiler").rglob("__init__.py"):
        package = ".".join(("mixspec", *init.parent.relative_to(ROOT / "compiler").parts))
        assert package in listed, f"{package} is not in pyproject's [tool.setuptools] packages"
    assert "mixspec.programs" in listed


# -- self-contained: the generated files run where mixspec cannot be imported -------------------
HARNESS = textwrap.dedent("""\
    import importlib.abc, os, runpy, sys

    class HideMixspec(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mixspec" or name.startswith("mixspec."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
            return None

    sys.meta_path.insert(0, HideMixspec())
    mode, script, *rest = sys.argv[1:]
    sys.path[:0] = [os.path.dirname(script)] + [p for p in os.environ.get("STUBS", "").split(os.pathsep) if p]
    if mode == "script":
        sys.argv = [script, *rest]
        runpy.run_path(script, run_name="__main__")
    else:  # a plugin: import it and show what it registered
        import json
        module = runpy.run_path(script, run_name="mixspec_plugin")
        import swift
        maps = {}
        for mod_name in ("swift.tuner_plugin", "swift.optimizers", "swift.plugin"):
            mod = sys.modules.get(mod_name)
            for attr in ("tuners_map", "optimizers_map", "extra_tuners"):
                if mod is not None and isinstance(getattr(mod, attr, None), dict):
                    maps[mod_name + "." + attr] = sorted(getattr(mod, attr))
        print(json.dumps({"swift_version": module["SWIFT_VERSION"], "maps": maps}))
""")


def run_hidden(python: str, mode: str, script: Path, *args: str, stubs: Path | None = None, timeout: int = 300):
    """Run a script (or import a plugin) in a fresh, isolated interpreter in which importing
    mixspec fails: -I ignores PYTHONPATH and the user site, the finder hides the editable install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    if stubs is not None:
        env["STUBS"] = str(stubs)
    return subprocess.run([python, "-I", "-c", HARNESS, mode, str(script), *args], cwd=script.parent,
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_hf_compile(tmp_path_factory):
    """A tiny Qwen2.5-VL (config only) and train.py + model_config.json compiled for it, copied
    into a directory of their own."""
    import make_tiny_vlm

    root = tmp_path_factory.mktemp("selfcontained")
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(make_tiny_vlm.tiny_qwen25vl_config(num_layers=2)), encoding="utf-8")
    spec = root / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        model: {model}
        components:
          vision: {{train: full, lr: 2.0e-5}}
          aligner: {{train: full, lr: 1.0e-4, weight_decay: 0.01}}
          language:
            train: lora
            lr: 1.0e-3
            lora: {{rank: 4, alpha: 8, dropout: 0.05, targets: all-linear}}
        data: {{train: data.jsonl}}
        """), encoding="utf-8")
    plan = plan_spec(load_spec(spec))
    out = root / "copy"
    out.mkdir()
    for name, text in render(plan, "hf", TargetOptions()).items():
        (out / name).write_text(text, encoding="utf-8")
    for version in (3, 4):
        text = render(plan, "swift", TargetOptions(swift_version=version))["mixspec_plugin.py"]
        (out / f"plugin{version}" / "mixspec_plugin.py").parent.mkdir()
        (out / f"plugin{version}" / "mixspec_plugin.py").write_text(text, encoding="utf-8")
    return plan, out


def test_train_py_runs_help_and_check_without_mixspec(tiny_hf_compile):
    plan, out = tiny_hf_compile
    # the harness can fail: a script that imports mixspec (as the package's own copy of the
    # program does, in its helpers block) dies in it
    probe = out / "probe" / "uses_mixspec.py"
    probe.parent.mkdir(exist_ok=True)
    probe.write_text(programs.helpers_import(), encoding="utf-8")
    hidden = run_hidden(sys.executable, "script", probe)
    assert hidden.returncode == 1 and "No module named 'mixspec'" in hidden.stderr, hidden.stderr[-2000:]
    assert subprocess.run([sys.executable, str(probe)], capture_output=True).returncode == 0  # it is installed
    # the generated train.py needs none of it
    result = run_hidden(sys.executable, "script", out / "train.py", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--check" in result.stdout and "--preview-data" in result.stdout
    result = run_hidden(sys.executable, "script", out / "train.py", "--check")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "self-check passed" in result.stdout
    assert f"actual trainable parameters:  {plan.totals.trainable_params:,}" in result.stdout


def _fake_swift(root: Path) -> Path:
    """ms-swift's registries, as files (the plugin imports them by module name)."""
    pkg = root / "swift"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "optimizers.py").write_text("class OptimizerCallback:\n    pass\n\n\noptimizers_map = {}\n", encoding="utf-8")
    (pkg / "tuner_plugin.py").write_text("class Tuner:\n    pass\n\n\ntuners_map = {}\n", encoding="utf-8")
    (pkg / "plugin.py").write_text("class Tuner:\n    pass\n\n\nextra_tuners = {}\noptimizers_map = {}\n",
                                   encoding="utf-8")
    return root


@pytest.mark.parametrize("version", [4, 3])
def test_swift_plugin_imports_without_mixspec(tiny_hf_compile, tmp_path, version):
    _, out = tiny_hf_compile
    stubs = _fake_swift(tmp_path / "stubs")
    result = run_hidden(sys.executable, "plugin", out / f"plugin{version}" / "mixspec_plugin.py", stubs=stubs)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert shown["swift_version"] == version
    if version >= 4:
        assert shown["maps"] == {"swift.tuner_plugin.tuners_map": ["mixspec"],
                                 "swift.optimizers.optimizers_map": ["mixspec"]}
    else:
        assert shown["maps"] == {"swift.plugin.extra_tuners": ["mixspec"], "swift.plugin.optimizers_map": ["mixspec"]}


@pytest.mark.slow
@pytest.mark.skipif(not (SWIFT_VENV / "bin" / "python").exists(), reason=f"no ms-swift venv at {SWIFT_VENV}")
def test_swift_plugin_registers_with_the_real_ms_swift_without_mixspec(tiny_hf_compile):
    """In the ms-swift venv (which has no mixspec) the plugin registers its tuner and optimizer
    in ms-swift 4's own registries."""
    _, out = tiny_hf_compile
    result = run_hidden(str(SWIFT_VENV / "bin" / "python"), "plugin", out / "plugin4" / "mixspec_plugin.py")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert "mixspec" in shown["maps"]["swift.tuner_plugin.tuners_map"]
    assert "mixspec" in shown["maps"]["swift.optimizers.optimizers_map"]


# -- the renderer fails loudly on a program whose markers do not fit ----------------------------
def _filled(program: str) -> dict:
    """Blocks a target would fill, with the program's own placeholder values (default blocks kept)."""
    text = programs.program_text(program)
    return {name: programs.KEEP if block.default else
            "# a header\n" if name == "header" else programs.block_text(text, name, program)
            for name, block in programs.blocks(text, program).items() if name != programs.HELPERS}


def _bash_n(path: Path) -> None:
    """bash -n (syntax), and shellcheck where it is installed."""
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("program", list(programs.PROGRAMS))
def test_placeholder_blocks_render_to_a_valid_program(program, tmp_path):
    text = programs.render(program, _filled(program))
    if program in SHELL_PROGRAMS:  # placeholders and default blocks kept: the program itself, but for the header
        original = programs.program_text(program)
        assert text == original.replace(programs.block_text(original, "header"), "# a header\n", 1)
    if program in PYTHON_PROGRAMS:
        compile(text, program, "exec")
        assert programs.block_text(text, "helpers") == programs.helpers_source()
    else:
        (tmp_path / "p.sh").write_text(text, encoding="utf-8")
        _bash_n(tmp_path / "p.sh")
        # and with each default block replaced (the blocks inside it go with it)
        found = programs.blocks(programs.program_text(program))
        for name in [n for n, block in found.items() if block.default]:
            filled = {k: v for k, v in _filled(program).items() if found[k].parent != name}
            text = programs.render(program, {**filled, name: "# replaced\n"})
            assert programs.block_text(text, name) == "# replaced\n" and not programs.blocks(text)[name].default
            assert not {n for n, block in found.items() if block.parent == name} & set(programs.blocks(text))
            (tmp_path / "r.sh").write_text(text, encoding="utf-8")
            _bash_n(tmp_path / "r.sh")


@pytest.mark.parametrize("program", SHELL_PROGRAMS)
def test_shell_programs_are_valid_bash_as_they_stand(program):
    _bash_n(PROGRAM_DIR / programs.PROGRAMS[program])
    # and the check bites: an unclosed if
    bad = (PROGRAM_DIR / programs.PROGRAMS[program]).read_text(encoding="utf-8") + "if true; then\n"
    assert subprocess.run(["bash", "-n"], input=bad, text=True, capture_output=True).returncode == 2


def _mutations(text: str) -> dict[str, tuple[str, str]]:
    """name -> (mutated program text, what the error must say)."""
    begin, end = programs.BEGIN.format("plan"), programs.END.format("plan")
    plan_block = text[text.index(begin):text.index(end) + len(end)]
    first = programs.block_text(text, "plan").split("\n", 1)[0]  # NAME = ...
    return {
        "begin missing": (text.replace(begin + "\n", "", 1), "without its begin marker"),
        "end missing": (text.replace(end + "\n", "", 1), "has no end marker"),
        "block duplicated": (text.replace(plan_block, plan_block + "\n" + plan_block, 1), "appears twice"),
        "block removed": (text.replace(plan_block + "\n", "", 1), "no block for: plan"),
        "marker misspelt": (text.replace(begin, "# --- mixspec: plan (generatd) ---", 1), "malformed block marker"),
        "nested": (text.replace(begin + "\n", begin + "\n" + programs.BEGIN.format("inner") + "\n", 1),
                   "block 'inner' begins inside block 'plan'"),
        "helpers edited": (text.replace(programs.helpers_import(), programs.helpers_import().replace(", ranges", "")),
                           "the 'helpers' block must be exactly"),
        "placeholder name changed": (text.replace(begin + "\n" + first, begin + "\n" + re.sub(r"^(\w+)", r"\1_X", first)),
                                     "the generated plan block assigns"),
    }


_MUTATIONS = ["begin missing", "end missing", "block duplicated", "block removed", "marker misspelt", "nested",
              "helpers edited", "placeholder name changed"]


@pytest.mark.parametrize("program,mutation", [(p, m) for p in programs.PROGRAMS for m in _MUTATIONS
                                              if m != "helpers edited" or p in PYTHON_PROGRAMS])
def test_a_program_whose_markers_do_not_fit_stops_the_renderer(program, mutation):
    text = programs.program_text(program)
    filled = _filled(program)
    bad, message = _mutations(text)[mutation]
    assert bad != text
    where = programs.PROGRAMS[program]
    with pytest.raises(programs.ProgramError) as info:
        programs.fill(bad, filled, where, shell=where.endswith(".sh"))
    assert message in str(info.value), str(info.value)
    assert where in str(info.value)


def test_a_target_that_fills_too_little_or_too_much_stops_the_renderer():
    filled = _filled("hf_train")
    with pytest.raises(programs.ProgramError, match="blocks not filled: header"):
        programs.render("hf_train", {"plan": filled["plan"]})
    with pytest.raises(programs.ProgramError, match="no block for: extra"):
        programs.render("hf_train", {**filled, "extra": "X = 1\n"})
    with pytest.raises(programs.ProgramError, match="filled by mixspec.programs"):
        programs.render("hf_train", {**filled, "helpers": "pass\n"})
    with pytest.raises(programs.ProgramError, match="assigns"):
        programs.render("hf_train", {**filled, "plan": filled["plan"].replace("TRAINING = ", "TRAINNG = ")})
    with pytest.raises(programs.ProgramError, match="no program"):
        programs.program_text("nope")
    for marker in (programs.END.format("header"), programs.BEGIN.format("plan")):
        with pytest.raises(programs.ProgramError, match="holds a line that is a block marker"):
            programs.render("hf_train", {**filled, "header": f"# a\n{marker}\n# b\n"})


# -- default blocks: the program's own text, kept or replaced whole ---------------------------
_WITH_DEFAULT = """\
#!/usr/bin/env bash
# --- mixspec: header (generated) ---
# placeholder header
# --- end mixspec: header ---
# --- mixspec: check (default) ---
# the program's own check
# --- mixspec: plan (generated) ---
MODEL=placeholder
# --- end mixspec: plan ---
test -n "$MODEL"
# --- end mixspec: check ---
echo done
"""


def test_a_default_block_is_kept_or_replaced_whole():
    header = "# the header\n"
    kept = programs.fill(_WITH_DEFAULT, {"header": header, "check": programs.KEEP, "plan": "MODEL=m\n"}, shell=True)
    assert kept == _WITH_DEFAULT.replace("# placeholder header\n", header).replace("MODEL=placeholder", "MODEL=m")
    # the golden keeps the generated blocks, the kept default block's text is the program's
    assert programs.data_part(kept) == (programs.BEGIN.format("header") + "\n" + header + programs.END.format("header")
                                        + "\n" + programs.BEGIN.format("plan") + "\nMODEL=m\n"
                                        + programs.END.format("plan") + "\n")
    replaced = programs.fill(_WITH_DEFAULT, {"header": header, "check": "# no check\n"}, shell=True)
    assert replaced == ("#!/usr/bin/env bash\n" + programs.BEGIN.format("header") + "\n" + header
                        + programs.END.format("header") + "\n" + programs.BEGIN.format("check") + "\n# no check\n"
                        + programs.END.format("check") + "\necho done\n")
    assert programs.data_part(replaced) == replaced.split("\n", 1)[1].removesuffix("echo done\n")
    # both round-trip through this test's own splice
    for text in (kept, replaced):
        assert splice(_WITH_DEFAULT, split_blocks(programs.data_part(text))) == text


@pytest.mark.parametrize("filled,message", [
    ({"header": "#\n", "plan": "MODEL=m\n"}, "blocks not filled: check"),  # a default block is filled too: KEEP
    ({"header": "#\n", "check": programs.KEEP}, "blocks not filled: plan"),  # a kept one's blocks are filled
    ({"header": "#\n", "check": "#\n", "plan": "MODEL=m\n"}, "block 'plan' is filled, but the default block 'check'"),
    ({"header": programs.KEEP, "check": "#\n"}, "block 'header' is generated"),
    ({"header": "#\n", "check": programs.KEEP, "plan": "NAME=m\n"}, "the generated plan block assigns"),
    ({"header": "#\n", "check": f"{programs.BEGIN.format('plan')}\n{programs.END.format('plan')}\n"},
     "holds a line that is a block marker"),
])
def test_a_default_block_filled_wrongly_stops_the_renderer(filled, message):
    with pytest.raises(programs.ProgramError) as info:
        programs.fill(_WITH_DEFAULT, filled, "p.sh", shell=True)
    assert message in str(info.value) and "p.sh" in str(info.value), str(info.value)


@pytest.mark.parametrize("old,new,message", [
    ("# --- mixspec: plan (generated) ---", "# --- mixspec: plan (default) ---", "block 'plan' begins inside block 'check'"),
    ("# --- mixspec: check (default) ---", "# --- mixspec: check (generated) ---", "block 'plan' begins inside block 'check'"),
    ("# --- end mixspec: header ---\n", "", "block 'check' begins inside block 'header'"),
    ("# --- end mixspec: plan ---\n", "", "block 'plan' has no end marker"),
    ("# --- mixspec: plan (generated) ---\n", "", "the end of block 'plan' without its begin marker"),
    ("(default)", "(defualt)", "malformed block marker"),
])
def test_a_default_block_whose_markers_do_not_fit_stops_the_renderer(old, new, message):
    bad = _WITH_DEFAULT.replace(old, new, 1)
    assert bad != _WITH_DEFAULT
    with pytest.raises(programs.ProgramError) as info:
        programs.blocks(bad, "p.sh")
    assert message in str(info.value) and "p.sh:" in str(info.value), str(info.value)


def test_train_sh_without_the_model_code_check_is_the_program_with_its_blocks(tmp_path):
    """A spec that allows the model's own code: train.sh's model_code_check block is replaced,
    and the output is still the package program with the data part spliced in."""
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config("qwen2_5_vl"), tmp_path / "model")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nmodel: {model}\ntrust_remote_code: true\n"
                    "components:\n  language: {train: lora, lr: 1.0e-4, lora: {rank: 8, targets: all-linear}}\n"
                    "data: {train: data.jsonl}\n",
                    encoding="utf-8")
    text = render(plan_spec(load_spec(spec)), "swift", TargetOptions())["train.sh"]
    data = goldens.golden_form({"train.sh": text})["train.sh.data"]
    blocks = split_blocks(data)
    assert sorted(blocks) == ["command", "env", "header", "model_code_check"]  # no MODEL: no check to run
    assert "no check for code in the model directory" in blocks["model_code_check"]
    program = (PROGRAM_DIR / "swift_train.sh").read_text(encoding="utf-8")
    assert text == splice(program, blocks)
    assert "find \"$MODEL\"" in program and "find \"$MODEL\"" not in text
    (tmp_path / "train.sh").write_text(text, encoding="utf-8")
    _bash_n(tmp_path / "train.sh")
