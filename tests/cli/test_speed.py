"""Speed (issue 7): the warm path never imports torch or transformers, the tree cache can
never serve a stale or corrupt tree and survives concurrent runs, and the hot loops stay
linear. Wall-time goals are measured by benchmarks/speed.py; the timing assertions here
have wide margins (a loaded 2-core CI machine), and the by-hand comparison is marked slow.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import seed_spec

ROOT = Path(__file__).resolve().parents[2]
MODEL = "Qwen/Qwen2.5-VL-72B-Instruct"
HEAVY = ("torch", "transformers", "peft", "accelerate")



def imported_modules(stderr: str) -> set[str]:
    """Module names in ``python -X importtime`` output."""
    out = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                out.add(name)
    return out


def heavy_imports(stderr: str) -> list[str]:
    return sorted({m for m in imported_modules(stderr) if m.split(".")[0] in HEAVY})


def run_mixspec(args, cache: Path, cwd: Path, importtime: bool = False, timeout: int = 300):
    env = {**os.environ, "MIXSPEC_CACHE_DIR": str(cache), "COLUMNS": "140"}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "mixspec", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A spec for the 72B VLM and a cache dir holding its tree (built here, in-process)."""
    from mixspec.models.sources import find_model
    from mixspec.models.tree import cache_dir, get_tree

    work = tmp_path_factory.mktemp("speed")
    spec = work / "mixed.yaml"
    spec.write_text(seed_spec(MODEL), encoding="utf-8")
    tree = get_tree(find_model(MODEL))  # the session cache (conftest), usually already warm
    return {"spec": spec, "cache": cache_dir(), "work": work, "tree": tree}


# -- the warm path imports neither torch nor transformers --------------------------------

def test_importtime_parser_sees_what_a_process_imports():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import json, email.message"],
                         capture_output=True, text=True, timeout=60)
    mods = imported_modules(out.stderr)
    assert {"json", "json.decoder", "email.message"} <= mods


@pytest.mark.parametrize("command", [
    ["plan", "{spec}"],
    ["plan", "{spec}", "--json"],
    ["validate", "{spec}"],
    ["explain", "{spec}", "model.visual.merger"],
    ["tree", MODEL, "--depth", "2"],
    ["--help"],
])
def test_warm_commands_import_neither_torch_nor_transformers(warm, command):
    args = [a.format(spec=warm["spec"]) for a in command]
    out = run_mixspec(args, warm["cache"], warm["work"], importtime=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert heavy_imports(out.stderr) == [], f"mixspec {' '.join(command)} imported heavy modules"


def test_warm_compile_imports_neither_torch_nor_transformers(warm):
    from mixspec.targets import available_targets

    targets = sorted(available_targets())
    if not targets:
        pytest.skip("no target installed yet")
    for target in targets:
        out = run_mixspec(["compile", str(warm["spec"]), "--target", target], warm["cache"],
                          warm["work"], importtime=True)
        # a target may refuse this spec (exit 1); it must still not need torch to say so
        assert out.returncode in (0, 1), out.stderr[-2000:]
        assert heavy_imports(out.stderr) == [], f"compile --target {target} imported heavy modules"


@pytest.mark.slow
def test_cold_plan_does_import_torch(tmp_path):
    """The guard above can fail: with an empty cache the same command builds the tree."""
    from tinymodels import tiny_config, write_config_dir

    model = write_config_dir(tiny_config("qwen2_5_vl"), tmp_path / "tiny")
    spec = tmp_path / "spec.yaml"
    spec.write_text(seed_spec(model).split("  language:")[0], encoding="utf-8")
    out = run_mixspec(["plan", str(spec)], tmp_path / "empty-cache", tmp_path, importtime=True)
    assert out.returncode == 0, out.stderr[-2000:]
    tops = {m.split(".")[0] for m in imported_modules(out.stderr)}
    assert {"torch", "transformers"} <= tops
    assert "peft" not in tops  # LoRA counts come from the tree, even on a build
    assert "trainable" in out.stdout  # the whole table, though the process skips teardown
    # a cold run that fails still exits 1 with its located error
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"version: 1\nmodel: {model}\ncomponents:\n"
                   "  x: {modules: ['no\\.such'], train: full, lr: 1.0e-5}\n", encoding="utf-8")
    out = run_mixspec(["plan", str(bad)], tmp_path / "empty-cache-2", tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"{bad}:4:" in out.stderr and "matches no module" in out.stderr


def _child_cpu() -> float:
    """CPU seconds of this process's finished children (a loaded machine stretches wall time,
    not CPU time: issue 12 keeps wall-clock goals in benchmarks/speed.py)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_warm_plan_is_fast(warm):
    """Goal: 0.2 s on an idle machine (benchmarks/speed.py). Here: 1 s of CPU, a wide margin."""
    run_mixspec(["plan", str(warm["spec"])], warm["cache"], warm["work"])  # page cache
    times = []
    for _ in range(3):
        start = _child_cpu()
        out = run_mixspec(["plan", str(warm["spec"])], warm["cache"], warm["work"])
        times.append(_child_cpu() - start)
        assert out.returncode == 0, out.stderr[-2000:]
    assert min(times) < 1.0, times


# -- validate: one tree read per model, linear in the number of specs ----------------------

def test_validate_many_specs_reads_each_tree_once(warm, tmp_path, run_cli, monkeypatch):
    from mixspec.models import tree as tree_mod

    specs = []
    for i in range(30):
        path = tmp_path / f"spec-{i:02d}.yaml"
        path.write_text(seed_spec(MODEL).replace("rank: 16", f"rank: {i + 1}"), encoding="utf-8")
        specs.append(str(path))
    reads = []
    real = tree_mod.ModuleTree.from_json
    monkeypatch.setattr(tree_mod.ModuleTree, "from_json",
                        classmethod(lambda cls, data: reads.append(1) or real(data)))
    tree_mod._MEMO.clear()
    result = run_cli("validate", *specs)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count(": ok") == 30
    assert len(reads) == 1


def test_validate_200_specs_in_one_call(warm, tmp_path):
    """Goal: 3 s for 200 specs (benchmarks/speed.py); here 15 s of CPU, a wide margin.
    (That each tree is read once, whatever the number of specs, is tested above.)"""
    specs = []
    for i in range(200):
        path = tmp_path / f"spec-{i:03d}.yaml"
        path.write_text(seed_spec(MODEL).replace("rank: 16", f"rank: {i % 64 + 1}"),
                        encoding="utf-8")
        specs.append(str(path))
    start = _child_cpu()
    out = run_mixspec(["validate", *specs], warm["cache"], warm["work"])
    elapsed = _child_cpu() - start
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count(": ok") == 200
    assert elapsed < 15.0, elapsed


def test_covering_and_roles_stay_linear():
    """The resolver's per-parameter loops: 8x the parameters may cost ~8x, not ~64x."""
    from mixspec.planning.resolve import covering

    def params(blocks):
        return [f"model.layers.{b}.{m}.{p}" for b in range(blocks)
                for m in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp.up", "mlp.down")
                for p in ("weight", "bias")]

    def cost(blocks):
        names = params(blocks)
        claimed = set(names[: len(names) // 2]) | {names[-1]}
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(5):
                covering(claimed, names)
            best = min(best, time.perf_counter() - start)
        return best

    small, big = cost(250), cost(2000)
    assert big < 30 * small, (small, big)
    names = params(4)
    assert covering(set(names[:12]) | {names[13]}, names) == ("model.layers.0", "model.layers.1.q_proj.bias")


# -- the tree cache ----------------------------------------------------------------------

def synthetic_tree(width: int = 8):
    from mixspec.models.tree import LINEAR, ModuleInfo, ModuleTree, library_versions

    modules = [ModuleInfo("", "Toy"), ModuleInfo("layers", "ModuleList")]
    for i in range(4):
        modules.append(ModuleInfo(f"layers.{i}", "Linear", LINEAR, width, width,
                                  params={"weight": (width, width), "bias": (width,)}))
    return ModuleTree(model_type="toy", architecture="ToyForCausalLM", modules=tuple(modules),
                      tied={}, input_embedding="", output_embedding="", base_model_prefix="model",
                      is_causal_lm_only=True, versions=library_versions())


def test_library_versions_match_importlib_metadata():
    from importlib import metadata

    from mixspec.models.tree import _dist_info_version, _lib_version, library_versions

    for name in ("torch", "transformers", "pydantic", "PyYAML", "google-re2", "typer"):
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = "absent"
        assert _lib_version(name) == expected
        assert _dist_info_version(name) in (expected, None)
    assert _lib_version("no-such-distribution-mixspec") == "absent"
    versions = library_versions()
    assert versions["transformers"] == metadata.version("transformers")
    assert versions["torch"] == metadata.version("torch")
    assert versions["tree_format"]


def test_cache_key_covers_the_tree_format(monkeypatch):
    from mixspec.models import tree as tree_mod

    config = {"model_type": "toy", "hidden_size": 8}
    key = tree_mod.cache_key(config)
    monkeypatch.setattr(tree_mod, "TREE_FORMAT", tree_mod.TREE_FORMAT + 1)
    assert tree_mod.cache_key(config) != key


def test_entry_with_a_wrong_digest_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    """Valid JSON with the right key, a shape edited: the digest catches it; the tree is
    built again and the entry rewritten whole."""
    from mixspec.models import tree as tree_mod
    from mixspec.models.sources import ModelSource

    monkeypatch.setenv("MIXSPEC_CACHE_DIR", str(tmp_path / "cache"))
    config = {"model_type": "toy", "hidden_size": 8}
    good = synthetic_tree()
    tree_mod.store_tree(config, good)
    path = tree_mod._cache_path(tree_mod.cache_key(config))
    text = path.read_text(encoding="utf-8")
    assert json.loads(text)["key"] == path.stem
    assert tree_mod.load_cached_tree(config) == good
    tampered = text.replace('"weight":[8,8]', '"weight":[8,9]', 1)
    assert tampered != text
    path.write_text(tampered, encoding="utf-8")
    assert tree_mod.load_cached_tree(config) is None
    builds = []
    monkeypatch.setattr(tree_mod, "build_tree", lambda source, **kw: builds.append(1) or good)
    source = ModelSource("toy", "local", str(tmp_path), config)
    assert tree_mod.get_tree(source) == good
    assert builds == [1]
    assert path.read_text(encoding="utf-8") == text
    # an older layout (no digest) is not trusted either
    path.write_text(json.dumps({"key": path.stem, "tree": good.to_json()}), encoding="utf-8")
    assert tree_mod.load_cached_tree(config) is None


def test_an_entry_replaced_by_another_process_is_read_again(tmp_path, monkeypatch):
    from mixspec.models import tree as tree_mod

    monkeypatch.setenv("MIXSPEC_CACHE_DIR", str(tmp_path / "cache"))
    config = {"model_type": "toy", "hidden_size": 8}
    first, second = synthetic_tree(8), synthetic_tree(16)
    tree_mod.store_tree(config, first)
    assert tree_mod.load_cached_tree(config) == first
    path = tree_mod._cache_path(tree_mod.cache_key(config))
    # another process writes its entry (same key): this process must not serve its memo
    code = ("import json, sys; from mixspec.models import tree as t; "
            "t.store_tree(json.loads(sys.argv[1]), t.ModuleTree.from_json(json.loads(sys.argv[2])))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(config), json.dumps(second.to_json())],
                         env={**os.environ, "MIXSPEC_CACHE_DIR": str(tmp_path / "cache")},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert tree_mod.load_cached_tree(config) == second
    path.unlink()
    assert tree_mod.load_cached_tree(config) is None


def _hammer(args):
    cache, config, tree_json, rounds = args
    os.environ["MIXSPEC_CACHE_DIR"] = cache
    from mixspec.models import tree as tree_mod

    tree = tree_mod.ModuleTree.from_json(tree_json)
    bad = 0
    for _ in range(rounds):
        tree_mod.store_tree(config, tree)
        tree_mod._MEMO.clear()  # read the file each time, as a new process would
        if tree_mod.load_cached_tree(config) != tree:
            bad += 1
    return bad


def test_concurrent_writers_and_readers_never_see_a_partial_entry(tmp_path):
    cache = str(tmp_path / "cache")
    config = {"model_type": "toy", "hidden_size": 8}
    tree_json = synthetic_tree(64).to_json()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        bad = pool.map(_hammer, [(cache, config, tree_json, 60)] * 4)
    assert bad == [0, 0, 0, 0]
    left = sorted(p.name for p in (tmp_path / "cache" / "trees").iterdir())
    assert len(left) == 1 and left[0].endswith(".json"), left  # no temporary files left behind


def test_unwritable_cache_dir_is_not_an_error(tmp_path, monkeypatch):
    from mixspec.models import tree as tree_mod

    blocker = tmp_path / "file"
    blocker.write_text("not a directory", encoding="utf-8")
    monkeypatch.setenv("MIXSPEC_CACHE_DIR", str(blocker / "cache"))
    config = {"model_type": "toy", "hidden_size": 8}
    tree_mod.store_tree(config, synthetic_tree())
    assert tree_mod.load_cached_tree(config) is None


# -- against the by-hand dry run (slow: PEFT wraps a 72B model on the meta device) ----------

def _cpu_of(cmd, env, cwd) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command; its CPU seconds and the completed process. CPU time, not wall clock:
    on a shared 2-core CI machine the wall clock of a 3-8 s process varies by a third from
    run to run (CI saw 0.502 x by hand where this machine measures 0.39-0.46)."""
    start = _child_cpu()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    return _child_cpu() - start, proc


@pytest.mark.slow
def test_cold_plan_beats_by_hand_and_counts_agree(tmp_path):
    """Goals (benchmarks/speed.py, medians of wall and CPU time): a cold plan costs at most
    1.3 x the import floor (a process that only imports torch, transformers and the model's
    modelling module), and well under the by-hand PEFT dry run. Here: CPU seconds, the best
    of two runs of the cold plan and of the floor, one by-hand run (it is the slowest, and
    its CPU time the steadiest); margins wide for a loaded CI machine: cold <= 1.6 x floor
    and <= 0.6 x by hand (measured here: 1.16 and 0.36-0.40). Counts equal to the parameter."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from speed import IMPORT_FLOOR, IMPORT_FLOOR_MODULES
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    spec = tmp_path / "mixed.yaml"
    spec.write_text(seed_spec(MODEL), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    by_hand, hand = _cpu_of([sys.executable, str(ROOT / "benchmarks" / "by_hand.py"),
                                str(ROOT / "compiler" / "models" / "catalog" / MODEL)], env, tmp_path)
    assert hand.returncode == 0, hand.stderr[-2000:]
    floor_cmd = [sys.executable, "-c", IMPORT_FLOOR.format(module=IMPORT_FLOOR_MODULES[MODEL])]
    colds, floors = [], []
    for attempt in range(2):
        cache_env = {**env, "MIXSPEC_CACHE_DIR": str(tmp_path / f"empty-cache-{attempt}"),
                     "COLUMNS": "140"}
        cpu, cold = _cpu_of([sys.executable, "-m", "mixspec", "plan", str(spec), "--json"],
                               cache_env, tmp_path)
        assert cold.returncode == 0, cold.stderr[-2000:]
        colds.append(cpu)
        cpu, floor = _cpu_of(floor_cmd, env, tmp_path)
        assert floor.returncode == 0, floor.stderr[-2000:]
        floors.append(cpu)
    counts = json.loads(hand.stdout.strip().splitlines()[-1])
    totals = json.loads(cold.stdout)["totals"]
    assert totals["trainable_params"] == counts["trainable_params"]
    assert totals["all_params"] == counts["all_params"]
    measured = {"cold": min(colds), "floor": min(floors), "by_hand": by_hand}
    assert min(colds) <= 1.6 * min(floors), measured
    assert min(colds) <= 0.6 * by_hand, measured
