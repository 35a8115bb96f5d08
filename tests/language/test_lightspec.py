"""The console script's light spec check (mixspec.language.lightspec) against the oracle it stands in
for, mixspec.language.spec's pydantic models: a spec it accepts, pydantic accepts with the same values
(types included: 2 and 2.0 differ here), and a load with ``light=True`` gives the same spec
values or the same located problems as one without, on every spec fixture and on the fuzz
corpus's generated specs (tests/language/test_fuzz_spec.py's bases and mutations). Its rule table
must have the models' keys, defaults, required keys and bounds. And a plain warm validate
through the console script's entry point does not import pydantic at all (the point of it).

Mutations these tests catch (tried): RULES' Training.seed as a float (the kind check), the
LoRA rank without its upper bound (the rule check, and rank 4097 in the edge sweep).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_fuzz_spec as fuzz
from conftest import ROOT
from mixspec.language import lightspec
from mixspec.language import spec as spec_mod
from mixspec.errors import SpecError
from mixspec.language.loader import load_spec, load_spec_text

SPEC_FILES = sorted(
    p for pattern in ("tests/specs/valid/*.yaml", "tests/specs/invalid/*.yaml", "examples/*.yaml",
                      "tests/targets/specs/*/*.yaml")
    for p in ROOT.glob(pattern))


def typed(value):
    """A value with every scalar's type spelt out: == then tells 1, 1.0 and True apart."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)


def outcome(load) -> tuple:
    try:
        loaded = load()
    except SpecError as exc:
        return ("error", [p.render() for p in exc.problems])
    return ("ok", typed(loaded.spec.model_dump()), typed(loaded.spec.model_dump(mode="json")),
            [p.render() for p in loaded.warnings])


def assert_light_is_pydantic(data) -> bool:
    """light_spec(data) is None, or pydantic accepts data with the same values; True if accepted."""
    light = lightspec.light_spec(data)
    if light is None:
        return False
    pyd = spec_mod.Spec.model_validate(data)  # raises if the light check accepted too much
    assert typed(light.model_dump()) == typed(pyd.model_dump())
    assert typed(light.model_dump(mode="json")) == typed(pyd.model_dump(mode="json"))
    return True


# -- the rule table is the models' -----------------------------------------------------------------
def _bounds(field) -> dict:
    out = {}
    for meta in field.metadata:
        for key in ("gt", "ge", "lt", "le", "min_length"):
            if getattr(meta, key, None) is not None:
                out[key] = getattr(meta, key)
    return out


def _kind(annotation) -> str:
    """The light check's kind for a field's annotation (as RULES spells it)."""
    import types
    import typing

    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return _kind(rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]) + "?"
    if origin is typing.Literal:
        if all(type(a) is str for a in args):
            return "enum:" + "|".join(args)
        return {(1,): "version", (0, 1, 2, 3): "stage"}[args]
    if origin in (typing.Union, types.UnionType):
        return {frozenset({"enum:all-linear", "list[str]", "str"}): "targets",
                frozenset({"str", "list[int]"}): "layers",
                frozenset({"str", "list[str]"}): "files"}[frozenset(_kind(a) for a in args)]
    if origin is list:
        return f"list[{args[0].__name__}]"
    if origin is dict:
        return "components"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    return annotation.__name__


@pytest.mark.parametrize("model", sorted(lightspec.RULES))
def test_rules_have_the_models_keys_defaults_and_bounds(model):
    cls = getattr(spec_mod, model)
    rules = lightspec.RULES[model]
    assert list(rules) == list(cls.model_fields), f"lightspec.RULES[{model!r}]: keys differ from mixspec.language.spec"
    for key, field in cls.model_fields.items():
        kind, default, bounds = rules[key]
        assert kind == _kind(field.annotation).replace("list[str]", "modules"), (model, key, _kind(field.annotation))
        assert (default is lightspec.REQUIRED) == field.is_required(), (model, key)
        if field.default_factory is not None:  # a nested model's defaults
            assert default is None and kind == field.default_factory.__name__, (model, key)
            for mode in ("python", "json"):
                assert typed(lightspec._model(kind, {}).model_dump(mode)) == \
                    typed(field.default_factory().model_dump(mode=mode))
        elif not field.is_required():
            assert typed(default) == typed(field.default), (model, key)
        if key != "components":  # the key pattern is checked by the spec fixtures and the fuzz below
            assert bounds == _bounds(field), (model, key)
    assert lightspec.COMPONENT_NAME_PATTERN == spec_mod.COMPONENT_NAME_PATTERN


def test_default_reads_the_rule_table():
    assert lightspec.default("Data", "max_pixels") == spec_mod.Data.model_fields["max_pixels"].default
    with pytest.raises(KeyError):
        lightspec.default("Data", "train")


# -- the same outcome on every fixture ---------------------------------------------------------------
@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.relative_to(ROOT).as_posix() for p in SPEC_FILES])
def test_light_load_of_each_spec_file_equals_pydantics(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rel = path.relative_to(ROOT)
    assert outcome(lambda: load_spec(rel, light=True)) == outcome(lambda: load_spec(rel))
    from mixspec.language.yamlloc import load_located

    try:
        data = load_located(rel).data
    except SpecError:  # not YAML: neither check sees it
        assert "invalid" in rel.parts
        return
    accepted = assert_light_is_pydantic(data)
    if "invalid" not in rel.parts:  # every valid fixture takes the light path (it is not a no-op)
        assert accepted, f"{rel}: valid, but the light check leaves it to pydantic"


def test_light_objects_read_like_the_models():
    text = (ROOT / "examples" / "design-example.yaml").read_text(encoding="utf-8")
    light, pyd = load_spec_text(text, "x.yaml", light=True).spec, load_spec_text(text, "x.yaml").spec
    assert isinstance(light, lightspec.LightModel) and isinstance(pyd, spec_mod.Spec)

    def plain(value):
        return value.model_dump() if hasattr(value, "model_dump") else value

    for name, comp in pyd.components.items():
        other = light.components[name]
        for key in type(comp).model_fields:
            assert typed(plain(getattr(other, key))) == typed(plain(getattr(comp, key))), (name, key)
        assert hasattr(other, "lr") == hasattr(comp, "lr")  # a frozen component has no lr
    for section in ("training", "distributed", "data"):
        assert typed(getattr(light, section).model_dump(mode="json")) == \
            typed(getattr(pyd, section).model_dump(mode="json"))
    with pytest.raises(AttributeError):
        light.model = "other"  # frozen, as the models are


# -- the same outcome on generated specs -----------------------------------------------------------------
EXAMPLES = max(200, fuzz.EXAMPLES // 4)


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_light_load_of_generated_specs_equals_pydantics(data):
    base = data.draw(st.sampled_from(fuzz.BASES), label="base")
    spec = fuzz._mutate(data, base) if data.draw(st.integers(0, 4), label="mutate") else base
    text = fuzz._serialise(data, spec)
    assert outcome(lambda: load_spec_text(text, "fuzz.yaml", light=True)) == \
        outcome(lambda: load_spec_text(text, "fuzz.yaml"))
    from mixspec.language.yamlloc import load_located_text

    try:
        parsed = load_located_text(text, "fuzz.yaml").data
    except SpecError:
        return
    assert_light_is_pydantic(parsed)


# values at the edges of each rule, in each place: the light check never accepts what pydantic refuses
EDGES = [None, True, False, 0, 1, -1, 2, 3, 4, 4096, 4097, 2**53, 2**53 + 1, 2**63, -(2**63), 10**30,
         0.0, -0.0, 1.0, 0.5, 1e-300, 5e-324, 1e308, float("inf"), float("-inf"), float("nan"),
         "", "x", "all-linear", "bf16", "none", "freeze", "full", "lora", "0-3", [], [""], ["q_proj"], [1, 2],
         [True], {}, {"x": 1}]


@pytest.mark.parametrize("base", range(len(fuzz.BASES)))
def test_every_edge_value_in_every_place(base):
    import copy

    accepted = 0
    for path in fuzz._paths(fuzz.BASES[base]):
        for value in EDGES:
            spec = copy.deepcopy(fuzz.BASES[base])
            node = spec
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = copy.deepcopy(value)
            accepted += assert_light_is_pydantic(spec)
            if isinstance(node, dict):  # and without the key
                del node[path[-1]]
                accepted += assert_light_is_pydantic(spec)
    assert accepted > 10  # the edges it does accept were compared value by value


# -- the point of it: a plain warm validate does not import pydantic ------------------------------------
def test_console_validate_of_a_plain_spec_does_not_import_pydantic(tmp_path):
    code = ("import sys\nsys.argv = ['mixspec', 'validate', '--no-model', sys.argv[1]]\n"
            "from mixspec.fast import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
            "print(code, sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')))\n")
    spec = ROOT / "examples" / "design-example.yaml"
    out = subprocess.run([sys.executable, "-c", code, str(spec)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr
    # an invalid spec: pydantic words the problem (and is imported for that)
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text(encoding="utf-8").replace("lr: 2.0e-6", "lr: -2.0e-6", 1), encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("1 ['pydantic'"), out.stdout + out.stderr
    assert "must be > 0 (got -2e-06)" in out.stderr


def test_cpu_time_of_a_light_load_is_below_a_pydantic_one():
    """CPU seconds, generous margin (no wall clock): a fresh process that loads a spec light
    spends less CPU than one that imports pydantic and builds the models to load it."""
    code = ("import time, sys\nfrom pathlib import Path\nt = time.process_time()\n"
            "from mixspec.language.loader import load_spec\nload_spec(Path(sys.argv[1]), light=sys.argv[2] == '1')\n"
            "print(time.process_time() - t)\n")
    spec = str(ROOT / "examples" / "design-example.yaml")

    def cpu(light: str) -> float:
        runs = [float(subprocess.run([sys.executable, "-c", code, spec, light], capture_output=True, text=True,
                                     timeout=120, check=True).stdout) for _ in range(3)]
        return min(runs)

    assert cpu("1") < cpu("0")



def test_light_objects_copy_and_pickle():
    import copy
    import pickle

    text = (ROOT / "examples" / "design-example.yaml").read_text(encoding="utf-8")
    light = load_spec_text(text, "x.yaml", light=True).spec
    for again in (copy.copy(light), copy.deepcopy(light), pickle.loads(pickle.dumps(light))):
        assert again == light and again.model_dump() == light.model_dump()
