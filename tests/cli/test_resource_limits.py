"""Resource bombs end fast with a clear, located error: never a hang, never a traceback.

Each case asserts the CPU time it used (``time.process_time``), not wall time: a loaded
machine stretches wall time, not the work a bomb makes mixspec do. Wall-clock goals live in
benchmarks/speed.py. The limits are the documented ones: MAX_FILE_BYTES,
MAX_DEPTH and MAX_NODES in mixspec.language.yamlloc, MAX_COMPONENTS and MAX_PATTERNS in
mixspec.language.loader, MAX_PATTERN_LEN and MAX_BLOCK_INDEX in mixspec.language.patterns (RE2 patterns).
"""

from __future__ import annotations

import os
import time

import pytest

from hostile import FUZZ_MODEL, catalog_tree
from mixspec.language import loader, patterns, yamlloc
from mixspec.errors import SpecError
from mixspec.language.loader import load_spec, load_spec_text
from mixspec.planning.resolve import resolve

# "well under 5 seconds": every case here takes well under one CPU second
LIMIT_S = 2.5


def _cpu() -> float:
    """CPU seconds this process has used (all threads): what a bomb costs, however loaded
    the machine is."""
    return time.process_time()

HEAD = f"version: 1\nmodel: {FUZZ_MODEL}\ncomponents:\n  language: {{train: lora, lr: 1.0e-4}}\n"


def _fails_fast(fn, *expected: str, limit: float = LIMIT_S) -> SpecError:
    """Run fn; it must raise SpecError within ``limit`` seconds, every text in ``expected``
    in its message and every problem located in the spec."""
    start = _cpu()
    with pytest.raises(SpecError) as info:
        fn()
    elapsed = _cpu() - start
    assert elapsed < limit, f"took {elapsed:.2f}s"
    message = str(info.value)
    for text in expected:
        assert text in message, message
    assert "Traceback" not in message
    return info.value


def test_budget_counts_cpu_not_waiting():
    # a loaded machine makes a case wait, not work: waiting must not count against LIMIT_S
    start = _cpu()
    time.sleep(0.5)
    assert _cpu() - start < 0.25


def _text_fails_fast(text: str, *expected: str) -> SpecError:
    return _fails_fast(lambda: load_spec_text(text, "bomb.yaml"), *expected)


def _at(err: SpecError) -> tuple[int, int]:
    loc = err.problems[0].location
    return loc.line, loc.col


# -- YAML: aliases, nesting, node count ---------------------------------------------------

def test_billion_laughs_stops_at_the_node_budget():
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    err = _text_fails_fast("\n".join(lines) + "\n",
                           f"expands to more than {yamlloc.MAX_NODES} values through anchors and aliases")
    assert _at(err)[0] >= 2  # the alias use that blew the budget, not line 1


def test_wide_alias_fan_out_stops():
    big = "big: &big [" + ", ".join(str(i) for i in range(1000)) + "]\n"
    text = big + "copies: [" + ", ".join(["*big"] * 1000) + "]\n"
    _text_fails_fast(text, "through anchors and aliases")


@pytest.mark.parametrize("depth", [40, 10_000, 100_000])
def test_deep_flow_nesting(depth):
    err = _text_fails_fast("a: " + "[" * depth + "]" * depth + "\n",
                           f"nesting deeper than {yamlloc.MAX_DEPTH} levels")
    assert _at(err) == (1, 4 + yamlloc.MAX_DEPTH)  # the first bracket too deep


def test_deep_flow_mapping_nesting():
    _text_fails_fast("a: " + "{b: " * 50_000 + "1" + "}" * 50_000 + "\n",
                     f"nesting deeper than {yamlloc.MAX_DEPTH} levels")


def test_deep_block_nesting():
    text = "".join(" " * i + f"k{i}:\n" for i in range(300)) + " " * 300 + "v\n"
    err = _text_fails_fast(text, f"nesting deeper than {yamlloc.MAX_DEPTH} levels")
    assert 30 <= _at(err)[0] <= 40


def test_deep_compact_sequences():
    _text_fails_fast("- " * 5000 + "x\n", f"nesting deeper than {yamlloc.MAX_DEPTH} levels")


def test_nesting_at_the_limit_is_only_a_schema_error():
    # 30 levels under `a` is allowed by the YAML limits; the spec schema then rejects `a`
    text = HEAD + "a: " + "[" * 30 + "]" * 30 + "\n"
    err = _text_fails_fast(text, "unknown key 'a'")
    assert "nesting" not in str(err)


@pytest.mark.parametrize("shape", ["flow", "block-list", "block-keys"])
def test_too_many_nodes_stops_while_parsing(shape):
    n = 120_000
    if shape == "flow":
        text = "a: [" + "1," * (n - 1) + "1]\n"
    elif shape == "block-list":
        text = "a:\n" + "- 1\n" * (yamlloc.MAX_FILE_BYTES // 5)
    else:
        text = "".join(f"k{i}: 1\n" for i in range(yamlloc.MAX_FILE_BYTES // 12))
    assert len(text.encode()) <= yamlloc.MAX_FILE_BYTES
    err = _text_fails_fast(text, f"the document has more than {yamlloc.MAX_NODES} values")
    assert "aliases" not in str(err)
    assert _at(err)[0] >= 1


# -- size, encoding, binary ---------------------------------------------------------------

def test_file_over_the_size_limit(tmp_path):
    spec = tmp_path / "big.yaml"
    spec.write_text(HEAD + "# " + "x" * yamlloc.MAX_FILE_BYTES + "\n", encoding="utf-8")
    err = _fails_fast(lambda: load_spec(spec), f"larger than the {yamlloc.MAX_FILE_BYTES}-byte limit")
    assert err.problems[0].location.file == str(spec)


def test_text_over_the_size_limit():
    _text_fails_fast(HEAD + "# " + "é" * (yamlloc.MAX_FILE_BYTES // 2) + "\n",
                     f"larger than the {yamlloc.MAX_FILE_BYTES}-byte limit")


def test_file_just_under_the_limit_is_read(tmp_path):
    # the worst case the size limit allows: one long comment or string is still quick
    spec = tmp_path / "long.yaml"
    pad = yamlloc.MAX_FILE_BYTES - len(HEAD) - 40
    spec.write_text(HEAD + 'output_dir: "' + "x" * pad + '"\n', encoding="utf-8")
    start = _cpu()
    loaded = load_spec(spec)
    assert _cpu() - start < LIMIT_S
    assert len(loaded.spec.output_dir) == pad


def test_symlink_to_dev_zero_is_a_size_error(tmp_path):
    # git stores symlinks: a pull request can point mixspec.yaml at a device that never ends
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    spec = tmp_path / "mixspec.yaml"
    spec.symlink_to("/dev/zero")
    _fails_fast(lambda: load_spec(spec), "larger than the")


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4, "NUL bytes"),
    (b"\x1f\x8b\x08\x00" + os.urandom(64) + b"\x00", "NUL bytes"),
    ("version: 1\n".encode("utf-16"), "NUL bytes"),
    (b"version: 1\nmodel: caf\xe9\n", "not valid UTF-8"),
    (b"\xff\xfe\xfd", "not valid UTF-8"),
])
def test_binary_and_non_utf8_files(tmp_path, content, expected):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    err = _fails_fast(lambda: load_spec(spec), expected)
    if expected == "not valid UTF-8" and content.startswith(b"version"):
        assert _at(err) == (2, 11)  # the byte after "model: caf"


def test_control_characters_in_text_are_located():
    err = _text_fails_fast(HEAD + "output_dir: a\x07b\n", "character U+0007 is not allowed")
    assert _at(err) == (5, 14)


def test_integer_with_thousands_of_digits():
    _text_fails_fast(HEAD + "training: {max_steps: " + "9" * 5000 + "}\n", "cannot read value")


def test_nul_escape_is_refused_where_yaml_allows_it():
    err = _text_fails_fast(HEAD + 'data: {train: "a\\0b"}\n', "NUL character")
    assert _at(err) == (5, 15)


# -- patterns: RE2, counts, lengths ------------------------------------------------------

CATASTROPHIC = [
    "(a+)+$",
    "(x+x+)+y",
    "(.*a){25}",
    "^(([a-z])+.)+[A-Z]([a-z])+$",
    "(model|model\\.)*(visual|visual\\.)*(.*)*(.*)*(.*)*\\.zzz",
    "(.*){1,32}(.*){1,32}x",
]


@pytest.fixture(scope="module")
def tree():
    return catalog_tree()


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_backtracking_patterns_run_in_linear_time(tree, pattern):
    # python's re would backtrack for minutes on some of these against ~1,700 module and
    # parameter names; RE2 matches in linear time
    text = HEAD + f"  bomb:\n    modules: ['{pattern}']\n    train: full\n    lr: 1.0e-5\n"
    start = _cpu()
    with pytest.raises(SpecError) as info:
        resolve(load_spec_text(text, "re.yaml"), tree)
    assert _cpu() - start < LIMIT_S
    assert "matches no module or parameter" in str(info.value)
    assert info.value.problems[0].location.line == 6


def test_backtracking_lora_target_regex(tree):
    text = HEAD.replace("{train: lora, lr: 1.0e-4}",
                        "{train: lora, lr: 1.0e-4, lora: {targets: '(.*.*)*(q|k)_proj(a+)+$'}}")
    start = _cpu()
    with pytest.raises(SpecError) as info:
        resolve(load_spec_text(text, "re.yaml"), tree)
    assert _cpu() - start < LIMIT_S
    assert "matches no module of component 'language'" in str(info.value)


@pytest.mark.parametrize("pattern, expected", [
    ("(a)\\1", "invalid regex"),  # backreference: RE2 has none
    ("(?=model)x", "invalid regex"),  # lookahead
    ("((a{100}){100}){100}", "invalid regex"),  # repetition too large to compile
    ("x" * (patterns.MAX_PATTERN_LEN + 1), f"more than {patterns.MAX_PATTERN_LEN}"),
])
def test_patterns_re2_cannot_take(pattern, expected):
    text = HEAD + f"  bomb:\n    modules: ['{pattern}']\n    train: full\n    lr: 1.0e-5\n"
    err = _text_fails_fast(text, expected)
    assert _at(err)[0] == 6


def test_too_many_components():
    n = loader.MAX_COMPONENTS + 1
    text = HEAD.replace("  language: {train: lora, lr: 1.0e-4}\n", "") + "".join(
        f"  c{i}: {{train: full, lr: 1.0e-5, modules: ['model\\.visual\\.blocks\\.{i}']}}\n" for i in range(n))
    err = _text_fails_fast(text, f"{n} components, more than the limit of {loader.MAX_COMPONENTS}")
    assert _at(err) == (3, 1)


def test_too_many_patterns():
    n = loader.MAX_PATTERNS + 10
    text = HEAD + "  many:\n    train: full\n    lr: 1.0e-5\n    modules:\n" + "".join(
        f"      - 'model\\.visual\\.blocks\\.{i}'\n" for i in range(n))
    err = _text_fails_fast(text, f"{n} patterns, more than the limit of {loader.MAX_PATTERNS}")
    assert _at(err)[0] == 9 + loader.MAX_PATTERNS  # the first pattern over the limit


def test_worst_case_within_the_limits_is_fast(tree):
    # every component and every pattern the caps allow, each matching the whole model,
    # each conflicting with the others: the slowest spec that passes the loader
    comps = "".join(f"  c{i}: {{train: full, lr: 1.0e-5, modules: ['.*|x{i}']}}\n"
                    for i in range(loader.MAX_PATTERNS))
    text = HEAD.replace("  language: {train: lora, lr: 1.0e-4}\n", "") + comps
    start = _cpu()
    with pytest.raises(SpecError) as info:
        resolve(load_spec_text(text, "worst.yaml"), tree)
    assert _cpu() - start < LIMIT_S
    assert "also claims" in str(info.value)


def test_failing_patterns_do_not_each_search_for_suggestions(tree):
    # a near-miss pattern triggers a "did you mean" search over every module name; a
    # spec full of them must not multiply that cost
    pats = "".join(f"      - 'model.visual.blocks.{i}.mlpx'\n" for i in range(loader.MAX_PATTERNS))
    text = HEAD + "  many:\n    train: full\n    lr: 1.0e-5\n    modules:\n" + pats
    start = _cpu()
    with pytest.raises(SpecError) as info:
        resolve(load_spec_text(text, "near.yaml"), tree)
    assert _cpu() - start < LIMIT_S
    assert len(info.value.problems) == loader.MAX_PATTERNS


@pytest.mark.parametrize("layers, expected", [
    (",".join(f"{i}-100000" for i in range(3000)), None),  # wide overlapping ranges: merged once
    ("0-100001", "too large"),
    ("999999999999999999999", "too large"),
])
def test_lora_layer_ranges(layers, expected):
    text = HEAD.replace("{train: lora, lr: 1.0e-4}", f"{{train: lora, lr: 1.0e-4, lora: {{layers: '{layers}'}}}}")
    if expected:
        _text_fails_fast(text, expected)
    else:
        start = _cpu()
        load_spec_text(text, "layers.yaml")
        assert _cpu() - start < LIMIT_S


# -- the same through the CLI: exit 1, no traceback ---------------------------------------

@pytest.mark.parametrize("make", [
    lambda: "a: " + "[" * 50_000 + "]" * 50_000,
    lambda: "a: [" + "1," * 100_000 + "1]",
    lambda: "# " + "x" * (yamlloc.MAX_FILE_BYTES + 10),
])
def test_cli_bombs_exit_1_without_traceback(run_cli, tmp_path, make):
    spec = tmp_path / "bomb.yaml"
    spec.write_text(make() + "\n", encoding="utf-8")
    start = _cpu()
    result = run_cli("validate", str(spec))
    assert _cpu() - start < LIMIT_S
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(str(spec))


# -- config.json bombs: a model whose config asks for millions of blocks -------------------

@pytest.mark.parametrize("edit, key", [
    ({"num_hidden_layers": 10_000_000}, "num_hidden_layers is 10,000,000"),
    ({"vision_config": {"depth": 5_000}}, "vision_config.depth is 5,000"),
    ({"num_experts": 100_000}, "num_experts is 100,000"),
    ({"num_hidden_layers": 1000, "num_experts": 4000}, "1,000 blocks x 4,000 experts"),
])
def test_config_with_absurd_block_counts_is_refused_before_building(run_cli, tmp_path, monkeypatch, edit, key):
    """Building the tree makes modules in proportion to the config's block and expert counts:
    past any published model's, mixspec refuses at the spec's model line without building."""
    import json

    from mixspec.models.sources import find_model

    monkeypatch.setenv("MIXSPEC_CACHE_DIR", str(tmp_path / "cache"))
    config = dict(find_model("Qwen/Qwen2.5-VL-7B-Instruct").config)
    for name, value in edit.items():
        config[name] = {**config[name], **value} if isinstance(value, dict) else value
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\nmodel: {model}\ncomponents:\n  language: {{train: full, lr: 1.0e-5}}\n",
                    encoding="utf-8")
    start = _cpu()
    result = run_cli("plan", str(spec))
    assert _cpu() - start < LIMIT_S
    assert result.exit_code == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{spec}:2:8: error: model:"), result.stderr
    assert key in result.stderr and "config.json" in result.stderr
