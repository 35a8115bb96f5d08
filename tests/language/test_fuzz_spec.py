"""Property tests over the spec language: any input gives a Plan or a located error.

Valid specs are mutated (one or more fields broken, wrong types, extreme numbers, NaN/inf,
huge strings, unicode, hostile text), serialised as JSON or YAML or edited as raw text,
then loaded and resolved against one module tree built once (the catalog Qwen2.5-VL-3B).
Valid results are also estimated and rendered by every available target. Anything but a
Plan, a located SpecError or a target's UnsupportedError fails the test. A fraction goes
through the CLI (exit code 0 or 1, never a traceback).

The fixed-seed CI run draws MIXSPEC_FUZZ_EXAMPLES examples in all (default 2000), derandomized;
a long run:  MIXSPEC_FUZZ_EXAMPLES=50000 MIXSPEC_FUZZ_SEED=$RANDOM pytest tests/language/test_fuzz_spec.py
"""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from hostile import FUZZ_MODEL, catalog_tree, hostile_strings
from mixspec.errors import ModelSourceError, SpecError, UnsupportedError
from mixspec.planning.estimate import estimate
from mixspec.language.loader import load_spec_text
from mixspec.planning.plan import Plan
from mixspec.planning.resolve import resolve
from mixspec.language.spec import ROLES

EXAMPLES = int(os.environ.get("MIXSPEC_FUZZ_EXAMPLES", "2000"))
SEED = os.environ.get("MIXSPEC_FUZZ_SEED")
NAME = "fuzz.yaml"

# share of the examples each property draws (sums to 1)
SHARES = {"mutated": 0.6, "text": 0.2, "cli": 0.1, "model_ref": 0.1}


def fuzz_settings(kind: str):
    def decorate(fn):
        fn = settings(
            max_examples=max(1, round(EXAMPLES * SHARES[kind])),
            deadline=None,
            database=None,
            derandomize=SEED is None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        )(fn)
        return seed(int(SEED))(fn) if SEED is not None else fn
    return decorate


# -- valid starting points (each resolves on the tree) ------------------------------------

BASES = [
    {  # the design example, on the 3B model
        "version": 1,
        "model": FUZZ_MODEL,
        "components": {
            "vision": {"train": "full", "lr": 2.0e-6},
            "aligner": {"train": "full", "lr": 1.0e-5},
            "language": {"train": "lora", "lr": 1.0e-4,
                         "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}},
            "late_vit_blocks": {"modules": ["model\\.visual\\.blocks\\.(2[4-9]|3[01])"],
                                "train": "full", "lr": 5.0e-6},
        },
        "training": {"epochs": 1, "micro_batch_size": 1, "gradient_accumulation": 16,
                     "precision": "bf16", "gradient_checkpointing": True, "max_length": 4096,
                     "optimizer": "adamw", "weight_decay": 0.0},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"},
        "distributed": {"nodes": 1, "gpus_per_node": 8, "zero_stage": 2, "offload": "none"},
        "output_dir": "runs/qwen25vl-mix",
    },
    {"version": 1, "model": FUZZ_MODEL, "components": {"language": {"train": "lora", "lr": 1.0e-4}}},
    {
        "version": 1,
        "model": FUZZ_MODEL,
        "components": {
            "vision": {"train": "freeze"},
            "aligner": {"train": "lora", "lr": 3.0e-5,
                        "lora": {"rank": 4, "targets": "model\\.visual\\.merger\\.mlp\\.[02]"}},
            "language": {"train": "lora", "lr": 2.0e-4, "weight_decay": 0.01,
                         "lora": {"rank": 8, "alpha": 8, "targets": ["q_proj", "v_proj"],
                                  "layers": "20-27", "rslora": True, "dora": True}},
            "embeddings": {"train": "full", "lr": 1.0e-5},
            "lm_head": {"train": "full", "lr": 1.0e-5},
        },
        "training": {"max_steps": 100, "warmup_ratio": 0.03, "lr_scheduler": "constant_with_warmup",
                     "precision": "fp16", "seed": 7, "max_grad_norm": 0.5},
        "data": {"train": "org/dataset"},
        "distributed": {"nodes": 2, "gpus_per_node": 4, "zero_stage": 3, "offload": "all",
                        "gpu_memory_gb": 80},
        "trust_remote_code": False,
    },
]

SPEC_KEYS = sorted({
    "version", "model", "components", "training", "data", "distributed", "output_dir",
    "trust_remote_code", "train", "lr", "modules", "lora", "weight_decay", "rank", "alpha",
    "dropout", "targets", "layers", "rslora", "dora", "epochs", "max_steps", "micro_batch_size",
    "gradient_accumulation", "precision", "gradient_checkpointing", "max_length", "optimizer",
    "warmup_ratio", "lr_scheduler", "max_grad_norm", "seed", "logging_steps", "save_steps",
    "eval", "nodes", "gpus_per_node", "zero_stage", "offload", "gpu_memory_gb", "unassigned",
    *ROLES,
})

SPECIAL_STRINGS = [
    *ROLES, "unassigned", "all-linear", "freeze", "full", "lora", "20-27", "0,2,4-6", "27-20",
    "0-100000", "-1", "", " ", ".*", "model\\.visual.*", "q_proj", "lm_head", "bf16", "fp32",
    "cosine", "adamw", "none", "optimizer", "all", FUZZ_MODEL, "1e-4", "true", "null", "~",
    ".nan", "(a+)+$", "(?=x)", "[", "\\", "model\\.language_model\\.layers\\.\\d+",
]

HUGE_INTS = [0, -1, 1, 2, 3, 4096, 4097, 2**31, 2**63, -(2**63), 10**100, 10**4000]
ODD_FLOATS = [0.0, -0.0, 1e-300, 5e-324, 1e308, -1e308, float("inf"), float("-inf"),
              float("nan"), 0.999999999, 1.0, 1e-4]

strings = st.one_of(
    st.text(max_size=24),
    st.sampled_from(SPECIAL_STRINGS),
    st.sampled_from(hostile_strings("/nonexistent/marker")),
    # huge strings, ASCII, accented, astral and regex-special (70k: a quarter of the size limit)
    st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "🚀", "(", ".*", "\\."]),
              st.sampled_from([200, 2001, 70_000])),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(HUGE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ODD_FLOATS),
    strings,
)
# values a field could plausibly hold: most pass the schema, and reach resolve and the targets
plausible = st.one_of(
    st.floats(min_value=1e-12, max_value=10.0),
    st.sampled_from([1e-300, 5e-324, 0.5, 0.999999, 1.0, 1e30]),
    st.integers(min_value=0, max_value=64),
    st.sampled_from([1, 2, 3, 4096, 2**31, 2**62]),
    st.booleans(),
    st.sampled_from(["freeze", "full", "lora", "bf16", "fp16", "fp32", "none", "optimizer", "all",
                     "linear", "constant", "cosine", "all-linear"]),
    st.sampled_from(hostile_strings("/nonexistent/marker")),
)
keys = st.one_of(st.sampled_from(SPEC_KEYS), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=5,
)

TARGETS = ("hf", "deepspeed", "swift", "llamafactory", "axolotl")

MUTATIONS = ["replace", "replace", "plausible", "plausible", "plausible", "delete", "add_key", "rename",
             "wrap", "duplicate", "selector", "selector"]

# plausible values that pass the loader and fail against the tree (or just pass)
SELECTORS = {
    "modules": st.lists(st.sampled_from(["model\\.visual\\.blocks\\.99", "model\\.visual", "lm_head",
                                         "model\\.language_model\\.layers\\.\\d+\\.mlp", "nothing",
                                         "model\\.visual\\.blocks\\.(2[4-9]|3[01])", ".*"]),
                        min_size=1, max_size=3),
    "targets": st.one_of(st.sampled_from(["all-linear", "q_proj", ".*_proj", "nothing", "lm_head"]),
                         st.lists(st.sampled_from(["q_proj", "v_proj", "fc1", "qkv", "norm", "embed_tokens",
                                                   "merger", "nothing"]), min_size=1, max_size=3)),
    "layers": st.one_of(st.sampled_from(["0-3", "20-27", "40-50", "99", "0,2,4-6"]),
                        st.lists(st.integers(-2, 60), min_size=1, max_size=4)),
    "train": st.sampled_from(["freeze", "full", "lora"]),
}


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield prefix + (i,)
            yield from _paths(value, prefix + (i,))


def _at(node, path):
    for part in path:
        node = node[part]
    return node


def _mutate(data, spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    # a uniform pick among paths (sampled_from favours the first ones: `version`, every time)
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="path seed"))
    for op in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=2), label="ops"):
        paths = list(_paths(spec))
        if not paths:
            break
        if op == "plausible":  # a leaf: the spec keeps its shape, one value goes odd
            paths = [p for p in paths if not isinstance(_at(spec, p), (dict, list))] or paths
        path = rng.choice(paths)
        parent = spec
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if op == "replace":
            parent[last] = data.draw(values, label="value")
        elif op == "plausible":
            parent[last] = data.draw(plausible, label="plausible value")
        elif op == "delete":
            del parent[last]
        elif op == "add_key":
            target = parent[last] if isinstance(parent[last], dict) else parent
            if isinstance(target, dict):
                target[data.draw(keys, label="key")] = data.draw(values, label="value")
        elif op == "rename" and isinstance(parent, dict):
            new = data.draw(keys, label="new key")
            parent[new] = parent.pop(last)
        elif op == "wrap":
            parent[last] = data.draw(st.sampled_from([[parent[last]], {"x": parent[last]}]), label="wrap")
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif op == "selector":
            comps = spec.get("components")
            if isinstance(comps, dict) and comps:
                name = rng.choice(sorted(comps, key=str))
                comp = comps[name]
                if isinstance(comp, dict):
                    key = data.draw(st.sampled_from(sorted(SELECTORS)), label="selector")
                    value = data.draw(SELECTORS[key], label="selector value")
                    if key in ("targets", "layers"):
                        comp.setdefault("lora", {})
                        if isinstance(comp["lora"], dict):
                            comp["lora"][key] = value
                    else:
                        comp[key] = value
    return spec


def _serialise(data, spec) -> str:
    form = data.draw(st.sampled_from(["json", "json-ascii", "yaml-block", "yaml-flow"]), label="form")
    if form.startswith("json"):
        return json.dumps(spec, ensure_ascii=form == "json-ascii")
    return yaml.safe_dump(spec, default_flow_style=form == "yaml-flow", sort_keys=False,
                          allow_unicode=data.draw(st.booleans(), label="unicode"), width=4096)


# -- the property ---------------------------------------------------------------------------

def _assert_located(exc: SpecError, name: str = NAME) -> None:
    assert exc.problems, "a SpecError with no problem"
    assert any(p.severity == "error" for p in exc.problems)
    for p in exc.problems:
        assert p.location.file == name
        assert p.location.line >= 0 and p.location.col >= 0
        assert p.message.strip()
        assert "Traceback" not in p.render()


def _check(text: str, tree, targets=()) -> str:
    """Load, resolve, estimate and render with ``targets``; returns the outcome, fails on
    anything unexpected."""
    from mixspec.targets import TargetOptions, available_targets

    try:
        loaded = load_spec_text(text, NAME)
    except SpecError as exc:
        _assert_located(exc)
        return "load-error"
    try:
        plan = resolve(loaded, tree, model_source="catalog", model_path="/models/qwen")
    except SpecError as exc:
        _assert_located(exc)
        return "resolve-error"
    assert isinstance(plan, Plan)
    json.dumps(plan.to_json())
    json.dumps(estimate(plan).to_json())
    for name in targets:
        target = available_targets().get(name)
        if target is None:  # not written yet
            continue
        try:
            files = target().render(plan, TargetOptions())
        except UnsupportedError as exc:
            assert exc.items and str(exc)
            continue
        assert files and all(isinstance(v, str) for v in files.values()), name
    return "plan"


@pytest.fixture(scope="module")
def tree():
    tree = catalog_tree()
    for base in BASES:  # every starting point is valid, so mutations start from a Plan
        assert _check(json.dumps(base), tree, TARGETS) == "plan", base
    return tree


@fuzz_settings("mutated")
@given(data=st.data())
def test_mutated_specs_give_a_plan_or_a_located_error(tree, data):
    spec = _mutate(data, data.draw(st.sampled_from(BASES), label="base"))
    # rendering costs more than resolving: one target, for a quarter of the examples
    targets = data.draw(st.sampled_from([(), (), (), ("hf",), ("deepspeed",), ("swift",), ("llamafactory",)]),
                        label="targets")
    _check(_serialise(data, spec), tree, targets)


# raw-text edits: YAML structure, tags, anchors and quoting broken in place
SNIPPETS = [
    ": ", "- ", "[", "]", "{", "}", ",", "&a ", "*a", "*b", "!!python/object/apply:os.system ['true']",
    "!!python/name:os.system", "!!binary aGk=", "!!set {a}", "!!timestamp 2001-12-14", "<<: *a",
    "\t", "'", '"', "\\", "---\n", "...\n", "%YAML 1.1\n", "? ", "|\n", ">-\n", "# ", "\n", "  ",
    "\ufeff", "\x85", "\u2028", "\x07", "\x00", ".inf", ".nan", "0x1F", "0o17", "1_000", "1e400",
    "9" * 5000, "~", "null", "yes", "on", "=", "@", "`", "%",
]


@fuzz_settings("text")
@given(data=st.data())
def test_edited_text_gives_a_plan_or_a_located_error(tree, data):
    base = data.draw(st.sampled_from(BASES), label="base")
    text = yaml.safe_dump(base, sort_keys=False, default_flow_style=data.draw(st.booleans(), label="flow"))
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        pos = data.draw(st.integers(0, len(text)), label="pos")
        kind = data.draw(st.sampled_from(["insert", "insert", "delete", "dup-line", "indent"]), label="edit")
        if kind == "insert":
            piece = data.draw(st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=6)), label="piece")
            text = text[:pos] + piece + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + data.draw(st.integers(1, 40), label="n"):]
        else:
            lines = text.split("\n")
            i = pos % len(lines)
            if kind == "dup-line":
                lines.insert(i, lines[i])
            else:
                lines[i] = " " * data.draw(st.integers(0, 7), label="spaces") + lines[i].lstrip(" ")
            text = "\n".join(lines)
    _check(text, tree)


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tree):
    from typer.testing import CliRunner

    from mixspec.cli import app

    folder = tmp_path_factory.mktemp("fuzz-cli")
    runner = CliRunner()

    def invoke(text: str, command: str):
        spec = folder / NAME
        spec.write_text(text, encoding="utf-8", errors="surrogatepass")
        args = {"validate": ["validate", str(spec)], "plan": ["plan", "--json", str(spec)],
                "compile": ["compile", str(spec), "--target", "swift"]}[command]
        return spec, runner.invoke(app, args)

    return invoke


@fuzz_settings("cli")
@given(data=st.data())
def test_cli_exits_0_or_1_and_never_prints_a_traceback(tree, cli, data):
    spec = _mutate(data, data.draw(st.sampled_from(BASES), label="base"))
    # keep the model: another id would only test "model not found" (the tree is cached for this one)
    assume(not isinstance(spec, dict) or spec.get("model") in (FUZZ_MODEL, None))
    text = _serialise(data, spec)
    outcome = _check(text, tree)
    command = data.draw(st.sampled_from(["validate", "validate", "plan", "compile"]), label="command")
    path, result = cli(text, command)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code in (0, 1), result.exit_code
    if outcome != "plan":
        assert result.exit_code == 1
        assert result.stderr.startswith(str(path)), result.stderr[:300]
    elif command == "validate":
        assert result.exit_code == 0, result.stderr
    elif command == "plan":
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["model"]["ref"] == FUZZ_MODEL


model_refs = st.one_of(
    st.text(max_size=40),
    st.sampled_from(hostile_strings("/nonexistent/marker")),
    st.sampled_from([".", "..", "/", "~", "~root", "Qwen/..", "Qwen/.", "a/b/c", "./", "/dev/null",
                     "/proc/self", "/etc/passwd", "Qwen/Qwen2.5-VL-3B-Instruct/", "models--x--y",
                     FUZZ_MODEL, "x" * 300, "x/" * 200, "é/🚀"]),
    st.builds(lambda a, b: f"{a}/{b}", st.text(max_size=12), st.text(max_size=12)),
)


@fuzz_settings("model_ref")
@given(ref=model_refs)
def test_any_model_ref_gives_a_source_or_a_clear_error(ref, tmp_path_factory):
    from mixspec.models.sources import ModelSource, find_model

    try:
        source = find_model(ref)
    except ModelSourceError as exc:
        assert str(exc).startswith("model ")
        assert "Traceback" not in str(exc)
        return
    assert isinstance(source, ModelSource) and isinstance(source.config, dict)


def test_examples_cover_every_outcome(tree):
    """The generators reach plans, load errors and resolve errors (not just one kind)."""
    seen = set()

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def probe(data):
        spec = _mutate(data, data.draw(st.sampled_from(BASES), label="base"))
        seen.add(_check(_serialise(data, spec), tree))

    probe()
    assert seen == {"plan", "load-error", "resolve-error"}, seen


@pytest.mark.parametrize("value, expected", [
    (float("nan"), "must be a finite number (got .nan)"),
    (float("inf"), "must be a finite number (got .inf)"),
    (10**4000, "must be a number"),  # an int too large for a float
])
def test_odd_numbers_reach_the_validator_as_numbers(value, expected):
    # the strategies rely on yaml.safe_dump writing these so that the loader reads numbers
    spec = dict(BASES[1], training={"epochs": value})
    with pytest.raises(SpecError) as info:
        load_spec_text(yaml.safe_dump(spec), NAME)
    assert expected in str(info.value)
