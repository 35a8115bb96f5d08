"""Spec strings reach generated files only as literals: never as code, never as extra words.

Every hostile string (tests/hostile.py) goes into every string field of a spec: the model
(a local model directory of that name), data.train, data.eval, output_dir, a module
pattern and a LoRA target regex; and into ``--model`` (TargetOptions.model_override). The
same spec is compiled with a benign token in the same places, and for each target:

- Python files parse, and their AST equals the benign one once each benign string is
  mapped to its hostile counterpart: no call, name or statement the generator did not
  write, and every value carried unchanged;
- JSON and YAML files load, with the same mapping;
- shell scripts pass ``bash -n`` and, run with fake backends first on PATH (they record
  their argv), hand each value over unchanged as one argument, call nothing else, and
  the marker file that every smuggled command would create never appears.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hostile import (FUZZ_MODEL, NUL_STRINGS, catalog_tree, clean_env, hostile_strings, read_fake_calls,
                     write_fake_backends)
from mixspec.language import patterns
from mixspec.errors import SpecError, UnsupportedError
from mixspec.language.loader import load_spec, load_spec_text
from mixspec.planning.resolve import plan_spec
from mixspec.models.sources import find_model

TARGETS = ("hf", "deepspeed", "swift", "llamafactory", "axolotl")
BENIGN = "BENIGNVALUE"
HAS_BASH = shutil.which("bash") is not None

# Spec shapes: per-component LRs (hf, deepspeed, swift), one LR (what LLaMA-Factory can say).
BASE_PATTERN = "model\\.visual\\.blocks\\.(2[4-9]|3[01])"
BASE_TARGETS = "model\\.language_model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj"
SHAPES = {
    "mixed": lambda pattern, targets: {
        "vision": {"train": "full", "lr": 2.0e-6},
        "aligner": {"train": "full", "lr": 1.0e-5},
        "language": {"train": "lora", "lr": 1.0e-4,
                     "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": targets}},
        "late_vit_blocks": {"modules": [pattern], "train": "full", "lr": 5.0e-6},
    },
    "one-lr": lambda pattern, targets: {
        "language": {"train": "lora", "lr": 1.0e-4, "lora": {"rank": 8, "targets": targets}},
    },
}


def _with_alternative(base: str, extra: str, names) -> str:
    """``base|extra`` when RE2 takes it and it matches exactly what ``base`` matches (so the
    Plan is unchanged), else ``base``: the hostile text rides along in the pattern."""
    candidate = f"{base}|{extra}"
    try:
        new, old = patterns.compile_pattern(candidate), patterns.compile_pattern(base)
    except patterns.PatternError:
        return base
    if any(bool(new.fullmatch(n)) != bool(old.fullmatch(n)) for n in names):
        return base
    return candidate


class Workspace:
    """A scratch tree: model dirs, specs, compiled outputs, fake backends and the marker."""

    def __init__(self, root: Path):
        self.root = root
        self.marker = root / "MARKER"
        self.bin = root / "bin"
        write_fake_backends(self.bin, root / "unused-log")
        self.config = Path(find_model(FUZZ_MODEL).path) / "config.json"
        tree = catalog_tree()
        self.names = [m.name for m in tree.modules if m.name] + list(tree.param_shapes)

    def dir_name(self, value: str) -> str:
        return value.replace("/", "_")

    def compile(self, value: str, shape: str, target: str, override: bool, tag: str):
        """Compile the spec with ``value`` everywhere; returns (files, out_dir, spec_path)."""
        case = self.root / tag
        case.mkdir()
        model_dir = case / f"model {self.dir_name(value)}"
        model_dir.mkdir()
        shutil.copy(self.config, model_dir / "config.json")
        pattern = _with_alternative(BASE_PATTERN, value, self.names)
        targets = _with_alternative(BASE_TARGETS, value, self.names)
        spec = {
            "version": 1,
            "model": str(model_dir),
            "components": SHAPES[shape](pattern, targets),
            "data": {"train": f"{value}/train.jsonl", "eval": f"data/{value}.jsonl"},
            "distributed": {"nodes": 1, "gpus_per_node": 8, "zero_stage": 2},
            "output_dir": f"runs/{value}",
        }
        spec_path = case / "spec.yaml"
        spec_path.write_text(json.dumps(spec, ensure_ascii=True), encoding="utf-8")
        from mixspec.targets import TargetOptions, render

        plan = plan_spec(load_spec(spec_path))
        options = TargetOptions(model_override=f"org/{value}" if override else None)
        files = render(plan, target, options)
        out = case / f"out {self.dir_name(value)}"
        out.mkdir()
        for name, text in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(text, encoding="utf-8")
            if name.endswith(".sh"):
                (out / name).chmod(0o755)
        return files, out, case

    def run_script(self, script: Path, case: Path, env_extra: dict | None = None) -> list[dict]:
        """Run a generated script from the case dir with the fakes first on PATH."""
        log = case / f"log-{script.name}-{len(list(case.glob('log-*')))}"
        write_fake_backends(self.bin, log)
        env = clean_env(self.bin, case)
        env.update(env_extra or {})
        result = subprocess.run(["bash", str(script)], cwd=case, env=env, capture_output=True,
                                timeout=60, text=True, errors="surrogateescape")
        assert result.returncode == 0, result.stderr
        return read_fake_calls(log)


def _plan_fingerprint(files: dict) -> str:
    """The plan fingerprint the compiled files name (it hashes the spec's strings too)."""
    import re

    found = {m for text in files.values() for m in re.findall(r"[Pp]lan fingerprint ([0-9a-f]{16})", text)}
    assert len(found) == 1, found
    return found.pop()


def _mapper(workspace: "Workspace", value: str, benign_case: Path, case: Path, fingerprints=("", "")):
    """Benign text -> what the hostile compile must hold: the value, the paths made from it,
    and the plan fingerprint (a hash of the training view, spec strings included)."""
    name = workspace.dir_name(value)

    def to_hostile(text: str) -> str:
        if fingerprints[0]:
            text = text.replace(fingerprints[0], fingerprints[1])
        return (text.replace(str(benign_case), str(case))
                .replace(f"model {BENIGN}", f"model {name}").replace(f"out {BENIGN}", f"out {name}")
                .replace(BENIGN, value))
    return to_hostile


def _map_strings(obj, fn):
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, list):
        return [_map_strings(v, fn) for v in obj]
    if isinstance(obj, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in obj.items()}
    return obj


def _calls_and_names(tree: ast.AST) -> tuple[set, set]:
    calls, names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            calls.add(ast.dump(node.func))
        elif isinstance(node, ast.Name):
            names.add(node.id)
    return calls, names


def _strings(tree: ast.AST) -> set:
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _diff_but_strings(hostile, benign, mapper):
    """None when the two ASTs are equal node for node, except that each benign string
    constant maps (``mapper``) to the hostile one; else where and how they differ."""
    if type(hostile) is not type(benign):
        return f": {type(hostile).__name__} where the generator wrote {type(benign).__name__}"
    if isinstance(benign, ast.AST):
        for field in benign._fields:
            diff = _diff_but_strings(getattr(hostile, field, None), getattr(benign, field, None), mapper)
            if diff is not None:
                return f".{field}(line {getattr(benign, 'lineno', '?')}){diff}"
    elif isinstance(benign, list):
        if len(hostile) != len(benign):
            return f": {len(hostile)} items where the generator wrote {len(benign)}"
        for i, (h, b) in enumerate(zip(hostile, benign)):
            diff = _diff_but_strings(h, b, mapper)
            if diff is not None:
                return f"[{i}]{diff}"
    elif isinstance(benign, str):
        if hostile != mapper(benign):
            return f": {hostile!r} != {mapper(benign)!r}"
    elif hostile != benign:
        return f": {hostile!r} != {benign!r}"
    return None


_BENIGN_TREES: dict = {}


def _check_python(name: str, benign: str, hostile: str, mapper) -> None:
    hostile_tree = ast.parse(hostile, filename=name)  # a syntax error would be a quoting bug
    if benign not in _BENIGN_TREES:
        tree = ast.parse(benign, filename=name)
        _BENIGN_TREES[benign] = (tree, _calls_and_names(tree))
    benign_tree, benign_calls_names = _BENIGN_TREES[benign]
    assert _calls_and_names(hostile_tree) == benign_calls_names, f"{name}: calls or names differ"
    diff = _diff_but_strings(hostile_tree, benign_tree, mapper)
    assert diff is None, f"{name}: the AST differs beyond its string values at module{diff}"


def _load_data(name: str, text: str):
    if name.endswith(".json"):
        return json.loads(text)
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("injection"))


def _compiled_pairs():
    """(shape, target) pairs a target compiles: the others it refuses for reasons of its own."""
    return [(shape, target) for shape in SHAPES for target in TARGETS]


HOSTILE = hostile_strings("@MARKER@")  # @MARKER@ becomes the workspace's marker path
ACCEPTED = [h for h in HOSTILE if not h.startswith("-")]


@pytest.mark.parametrize("shape, target", _compiled_pairs())
def test_hostile_strings_stay_literals(workspace, shape, target):
    from mixspec.targets import available_targets

    if target not in available_targets():
        pytest.skip(f"target {target} is not written yet")
    try:
        benign = {override: workspace.compile(BENIGN, shape, target, override, f"{shape}-{target}-b{override:d}")
                  for override in (False, True)}
    except UnsupportedError:
        pytest.skip(f"{target} refuses the {shape} shape")
    benign_runs: dict = {}
    # every string through a target's first shape; a third of them through its others
    primary = shape == next(s for s in SHAPES if _compiles(workspace, s, target))
    for i, template in enumerate(ACCEPTED):
        if not primary and i % 3:
            continue
        value = template.replace("@MARKER@", str(workspace.marker))
        override = i % 2 == 1
        files, out, case = workspace.compile(value, shape, target, override, f"{shape}-{target}-{i}")
        reference, benign_out, benign_case = benign[override]
        mapper = _mapper(workspace, value, benign_case, case,
                         (_plan_fingerprint(reference), _plan_fingerprint(files)))
        assert sorted(files) == sorted(reference)
        for name, text in files.items():
            if name.endswith(".py"):
                _check_python(name, reference[name], text, mapper)
            elif name.endswith((".json", ".yaml", ".yml")):
                assert _load_data(name, text) == _map_strings(_load_data(name, reference[name]), mapper), name
            elif name.endswith(".sh"):
                _check_shell(workspace, name, out, case, benign_out, benign_case, mapper,
                             benign_runs.setdefault(override, {}))
            else:
                pytest.fail(f"no check for generated file {name}")
        assert not workspace.marker.exists(), f"a command smuggled in {value!r} ran"


_COMPILES: dict = {}


def _compiles(workspace, shape: str, target: str) -> bool:
    if (shape, target) not in _COMPILES:
        try:
            workspace.compile(BENIGN, shape, target, False, f"probe-{shape}-{target}")
            _COMPILES[shape, target] = True
        except UnsupportedError:
            _COMPILES[shape, target] = False
    return _COMPILES[shape, target]


def _check_shell(workspace, name, out, case, benign_out, benign_case, mapper, benign_runs):
    if not HAS_BASH:
        pytest.skip("bash not installed")
    script = out / name
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    for launcher in ("torchrun", "deepspeed", "accelerate"):
        env = {"LAUNCHER": launcher}
        key = (name, launcher)
        if key not in benign_runs:
            benign_runs[key] = workspace.run_script(benign_out / name, benign_case, env)
        calls = workspace.run_script(script, case, env)
        expected = [{"name": c["name"], "cwd": mapper(c["cwd"]), "argv": [mapper(a) for a in c["argv"]]}
                    for c in benign_runs[key]]
        assert calls == expected, f"{name} with LAUNCHER={launcher}: argv differs beyond the values"
        if "LAUNCHER" not in script.read_text():
            break  # one run is enough for a script that does not look at it


def test_every_target_is_checked(workspace):
    """Each available target compiles at least one shape (so the test above is not all skips)."""
    from mixspec.targets import available_targets

    for target in sorted(set(available_targets()) & set(TARGETS)):
        compiled = 0
        for shape in SHAPES:
            try:
                workspace.compile(BENIGN, shape, target, False, f"cover-{shape}-{target}")
                compiled += 1
            except UnsupportedError:
                pass
        assert compiled, f"{target} refused every shape: the injection test does not cover it"


def test_values_appear_unchanged_somewhere(workspace):
    """Not just 'parses': the hostile value itself reaches each target's output."""
    from mixspec.targets import available_targets

    value = HOSTILE[9].replace("@MARKER@", str(workspace.marker))  # $(touch MARKER)
    for target in sorted(set(available_targets()) & set(TARGETS)):
        for shape in SHAPES:
            try:
                files, out, case = workspace.compile(value, shape, target, False, f"seen-{shape}-{target}")
            except UnsupportedError:
                continue
            carried = set()
            for name, text in files.items():
                if name.endswith(".py"):
                    carried |= _strings(ast.parse(text))
                elif name.endswith((".json", ".yaml", ".yml")):
                    carried |= set(_flatten(_load_data(name, text)))
                elif name.endswith(".sh"):
                    for call in workspace.run_script(out / name, case):
                        carried |= set(call["argv"])
            if target != "deepspeed":  # a DeepSpeed config holds no path
                assert any(value in s for s in carried), (target, shape)


def _flatten(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from _flatten(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _flatten(v)
    elif isinstance(obj, str):
        yield obj


@pytest.mark.parametrize("field", ["model", "output_dir", "data.train", "data.eval"])
@pytest.mark.parametrize("value", ["-rf", "--output_dir=/tmp/evil", "--model=x"])
def test_option_lookalikes_are_refused_in_the_spec(field, value):
    """A path or id that starts with '-' would read as a backend option: a located error."""
    spec = {"version": 1, "model": FUZZ_MODEL, "components": {"language": {"train": "lora", "lr": 1e-4}},
            "data": {"train": "d.jsonl"}}
    if field.startswith("data."):
        spec["data"][field.split(".")[1]] = value
    else:
        spec[field] = value
    with pytest.raises(SpecError) as info:
        load_spec_text(json.dumps(spec), "spec.json")
    problem = info.value.problems[0]
    assert problem.path == field and problem.location.line == 1
    assert "would read it as an option" in problem.message


def test_nul_never_reaches_a_shell_word_and_stays_a_python_literal(workspace):
    """The loader refuses NUL; a Plan built by hand with one still gives Python that parses
    (the NUL kept in a literal) and no shell script at all."""
    import dataclasses

    from mixspec.planning.resolve import resolve
    from mixspec.targets import TargetOptions, available_targets

    loaded = load_spec_text(json.dumps({
        "version": 1, "model": FUZZ_MODEL, "components": {"language": {"train": "lora", "lr": 1e-4}},
        "data": {"train": "d.jsonl"}, "output_dir": "runs/x"}), "nul.json")
    plan = resolve(loaded, catalog_tree())
    for nul in NUL_STRINGS:
        bad = dataclasses.replace(plan, data=dataclasses.replace(plan.data, train=nul, eval=None), output_dir=nul)
        for target, cls in sorted(available_targets().items()):
            try:
                files = cls().render(bad, TargetOptions())
            except (ValueError, UnsupportedError):
                continue  # refusing is fine; writing a broken script is not
            for name, text in files.items():
                if name.endswith(".py"):
                    assert nul in _strings(ast.parse(text)), (target, name)
                assert not (name.endswith(".sh") and "\x00" in text), (target, name)
                assert "\x00" not in text, (target, name)  # literals escape it


def test_hostile_list_is_what_the_loader_round_trips():
    """Guard for the test itself: each accepted hostile value survives YAML and JSON intact."""
    for value in ACCEPTED:
        text = json.dumps({"version": 1, "model": FUZZ_MODEL, "output_dir": value,
                           "components": {"language": {"train": "lora", "lr": 1e-4}}}, ensure_ascii=True)
        assert load_spec_text(text).spec.output_dir == value
    assert len(ACCEPTED) >= 40 and os.sep == "/"
