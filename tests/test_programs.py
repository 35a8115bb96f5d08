"""The generated programs as real files (mixspec/programs/): each imports and lints as it
stands in the package; a generated file is that program with its marked blocks filled, byte
for byte (the golden files hold only the blocks); it runs where mixspec cannot be imported;
a program whose markers are missing, duplicated or malformed stops the renderer.

Oracles: the program files themselves (read from disk, substituted here by a splice written
for this test, not mixspec's), ruff, and a Python process in which importing mixspec fails.
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
from mixspec import names, programs
from mixspec.errors import UnsupportedError
from mixspec.loader import load_spec
from mixspec.resolve import plan_spec
from mixspec.targets import TargetOptions, render

PROGRAM_DIR = ROOT / "compiler" / "programs"
# generated file -> the package program it is rendered from
OUTPUT_OF = {"train.py": "hf_train", "launch.sh": "hf_launch", "mixspec_plugin.py": "swift_plugin"}
PYTHON_PROGRAMS = [p for p, f in programs.PROGRAMS.items() if f.endswith(".py")]
SWIFT_VENV = Path(os.environ.get("MIXSPEC_SWIFT_VENV") or ROOT / ".venv-swift")

sys.path.insert(0, str(ROOT / "tests" / "fixtures"))


# -- an independent splice: program + blocks -> file -------------------------------------------
_BEGIN = re.compile(r"# --- mixspec: (\w+) \(generated\) ---\n")


def split_blocks(text: str) -> dict[str, str]:
    """Block name -> the lines between its markers, from a golden data part."""
    out, name = {}, None
    for line in text.splitlines(keepends=True):
        begin = _BEGIN.fullmatch(line)
        if begin:
            name = begin.group(1)
            out[name] = ""
        elif name and line == f"# --- end mixspec: {name} ---\n":
            name = None
        elif name:
            out[name] += line
    return out


def splice(program: str, blocks: dict[str, str]) -> str:
    """The program with the lines inside each marked block replaced by blocks[name]."""
    out, inside = [], None
    for line in program.splitlines(keepends=True):
        if inside is None:
            out.append(line)
            begin = _BEGIN.fullmatch(line)
            if begin:
                inside = begin.group(1)
                out.append(blocks.pop(inside))
        elif line == f"# --- end mixspec: {inside} ---\n":
            out.append(line)
            inside = None
    assert inside is None and not blocks, (inside, sorted(blocks))
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
    found = 0
    for out_name, program in OUTPUT_OF.items():
        if out_name not in files:
            continue
        found += 1
        data = (ROOT / "tests" / "targets" / target / name / (out_name + ".data")).read_text(encoding="utf-8")
        blocks = split_blocks(data)
        assert sorted(blocks) == ["header", "plan"]
        program_file = (PROGRAM_DIR / programs.PROGRAMS[program]).read_text(encoding="utf-8")
        if programs.BEGIN.format("helpers") in program_file:
            blocks["helpers"] = programs.helpers_source()
        assert files[out_name] == splice(program_file, blocks), f"{case}/{out_name}"
    if target == "hf":
        assert found == 2  # every hf case that compiles writes train.py and launch.sh


def test_inlined_helpers_are_mixspec_names_source():
    """The helpers block of every output is the source of mixspec.names' functions, nothing else."""
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
        assert isinstance(node, ast.ImportFrom) and node.module == "mixspec.names"
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
    assert list(generated) == ["PLAN", "TRAINING", "DATA", "OUTPUT_DIR", "DISTRIBUTED", "DEEPSPEED_CONFIG"]
    for name in ("PLAN", "TRAINING", "DISTRIBUTED"):
        assert list(getattr(module, name)) == list(generated[name]), name
    assert module.PLAN["components"] == [] and module.DATA is None and module.DEEPSPEED_CONFIG is None


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
def _filled(program: str) -> dict[str, str]:
    """Blocks a target would fill, with the program's own placeholder values."""
    text = programs.program_text(program)
    return {"header": "# a header\n", "plan": programs.block_text(text, "plan", program)}


@pytest.mark.parametrize("program", list(programs.PROGRAMS))
def test_placeholder_blocks_render_to_a_valid_program(program, tmp_path):
    text = programs.render(program, _filled(program))
    if program in PYTHON_PROGRAMS:
        compile(text, program, "exec")
        assert programs.block_text(text, "helpers") == programs.helpers_source()
    else:
        (tmp_path / "p.sh").write_text(text, encoding="utf-8")
        assert subprocess.run(["bash", "-n", str(tmp_path / "p.sh")]).returncode == 0


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
