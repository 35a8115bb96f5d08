"""The house: one folder per pass, imports that lead to files and point one way.

compiler/ is the import package ``mixspec``: language/ (a spec file in, a Spec out), models/
(a model in, its module tree and roles out), planning/ (Spec + tree in, the Plan and its memory
out), data/ (the data preflight), presenting/ (tables, HTML, diff); the entry points (cli, fast,
api), errors (the one error type) and output (the one way files are written) sit at the top.
targets/ is installed as ``mixspec.targets`` (pyproject's package-dir), so ``..`` from a target
is compiler/.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PASSES = ("language", "models", "planning", "data", "presenting")  # each may import only the ones before it
ENTRY_POINTS = {"cli", "fast", "api", "__main__"}  # compiler/<name>.py that wire the passes together
PROGRAMS = ROOT / "compiler" / "programs"  # standalone generated programs (not package code) live here


def _package(path: Path) -> list[str]:
    """The package a file's relative imports start from."""
    if ROOT / "targets" in path.parents:
        return ["mixspec", "targets"]
    return ["mixspec", *path.relative_to(ROOT / "compiler").parent.parts]


def _import_nodes(path: Path, top_level_only: bool = False):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    return [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))]


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Every mixspec module a file imports (absolute, or relative resolved to mixspec.*), with the
    imported names appended (``from .x import y`` gives mixspec.x and mixspec.x.y)."""
    package, out = _package(path), set()
    for node in _import_nodes(path, top_level_only):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mixspec")}
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        if name.startswith("mixspec"):
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return out


def _package_files():
    """compiler/ and targets/, except the standalone programs in compiler/programs/."""
    for top in ("compiler", "targets"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if PROGRAMS not in path.parents or path.name == "__init__.py":
                yield path


def _core_files():
    yield ROOT / "compiler" / "errors.py"
    yield ROOT / "compiler" / "output.py"
    for folder in PASSES:
        yield from sorted((ROOT / "compiler" / folder).rglob("*.py"))


def _file_of(module: str) -> Path | None:
    """The file a mixspec module lives in (None when there is none)."""
    parts = module.split(".")[1:]
    base = ROOT / "targets" if parts[:1] == ["targets"] else ROOT / "compiler"
    rest = parts[1:] if parts[:1] == ["targets"] else parts
    here = base.joinpath(*rest) if rest else base
    for candidate in (here.with_suffix(".py"), here / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _forbidden(names, forbidden) -> set[str]:
    return {n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)}


def test_every_pass_is_a_folder_and_the_top_holds_only_entry_points():
    assert {p.name for p in (ROOT / "compiler").iterdir() if p.is_dir() and p.name != "__pycache__"} == \
        {*PASSES, "importers", "programs"}
    assert {p.stem for p in (ROOT / "compiler").glob("*.py")} == {*ENTRY_POINTS, "errors", "output", "__init__"}
    for folder in (*PASSES, "importers", "programs"):
        init = ROOT / "compiler" / folder / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init}: say what comes in and out"


def test_tests_mirror_the_folders():
    """Each test file sits in the folder of what it tests (cli/: the entry points and the house)."""
    assert not sorted(p.name for p in (ROOT / "tests").glob("test_*.py")), "move these into a folder"
    folders = {p.parent.relative_to(ROOT / "tests").parts[0] for p in (ROOT / "tests").rglob("test_*.py")}
    assert folders <= {*PASSES, "importers", "targets", "cli", "e2e"}, folders


def test_imports_inside_the_package_are_relative_and_lead_to_files():
    absolute, dangling = set(), set()
    for path in _package_files():
        for node in _import_nodes(path):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("mixspec"):
                absolute.add(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith("mixspec") for a in node.names):
                absolute.add(f"{path.relative_to(ROOT)}:{node.lineno} import mixspec...")
        for name in _imports(path):
            module = name if _file_of(name) else name.rsplit(".", 1)[0]  # `from .x import y`: y may be a name
            if _file_of(module) is None:
                dangling.add(f"{path.relative_to(ROOT)} imports {name}")
    assert not absolute, sorted(absolute)
    assert not dangling, sorted(dangling)


def test_the_core_never_imports_targets_importers_or_entry_points():
    forbidden = ("mixspec.targets", "mixspec.importers", *(f"mixspec.{m}" for m in ENTRY_POINTS))
    found = {f"{p.relative_to(ROOT)} imports {name}"
             for p in _core_files() for name in _forbidden(_imports(p), forbidden)}
    assert not found, sorted(found)


def test_each_pass_imports_only_the_passes_before_it():
    found = set()
    for i, folder in enumerate(PASSES):
        later = tuple(f"mixspec.{f}" for f in PASSES[i + 1:])
        for path in sorted((ROOT / "compiler" / folder).rglob("*.py")):
            found |= {f"{path.relative_to(ROOT)} imports {n}" for n in _forbidden(_imports(path), later)}
    assert not found, sorted(found)


def test_targets_never_import_importers_or_entry_points():
    forbidden = ("mixspec.importers", *(f"mixspec.{m}" for m in ENTRY_POINTS))
    found = {f"{p.relative_to(ROOT)} imports {name}"
             for p in sorted((ROOT / "targets").glob("*.py")) for name in _forbidden(_imports(p), forbidden)}
    assert not found, sorted(found)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT / ("targets" if ROOT / "targets" in path.parents else "compiler")).parts)
    parts[-1] = parts[-1][:-3]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["mixspec", *(["targets"] if ROOT / "targets" in path.parents else []), *parts])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles, each as a path that returns to its start."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles_at_module_level():
    """Top-level imports form no cycle (imports inside a function load lazily, on first use)."""
    modules = {_module_name(p): p for p in _package_files()}
    graph = {m: {n for n in _imports(p, top_level_only=True) if n in modules and n != m} for m, p in modules.items()}
    assert not _cycles(graph), _cycles(graph)


def test_the_checkers_see_what_is_there(tmp_path):
    """The walk finds relative imports, the file check finds a missing module, the cycle check a
    cycle (else the tests above prove nothing)."""
    names = _imports(ROOT / "compiler" / "data" / "datacheck.py")
    assert "mixspec.programs.hf_train" in names
    assert "mixspec.language.loader" in names and "mixspec.planning.resolve.plan_spec" in names
    assert _file_of("mixspec.planning.plan") == ROOT / "compiler" / "planning" / "plan.py"
    assert _file_of("mixspec.targets._common") == ROOT / "targets" / "_common.py"
    assert _file_of("mixspec.planning.nothing") is None
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


MAX_FUNCTION_LINES = 70  # a function fits on a screen (issue #29): longer ones become named steps


def _product_files():
    """compiler/ and targets/, except compiler/programs/ (standalone generated programs)."""
    for top in ("compiler", "targets"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if PROGRAMS not in path.parents:
                yield path


def _long_functions(paths) -> dict[str, int]:
    """'path:function' -> its length in lines, for functions (nested ones too) over MAX_FUNCTION_LINES."""
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{path.as_posix()}:{node.name}"] = length
    return found


def test_no_product_function_over_70_lines():
    found = _long_functions(_product_files())
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {found}"


def test_the_length_check_sees_a_long_function(tmp_path):
    """A 71-line method is found and a 70-line function is not (else the test above proves nothing)."""
    body = "".join(f"        x{i} = {i}\n" for i in range(69))
    (tmp_path / "m.py").write_text("class C:\n    def long(self):\n" + body + "        return 0\n\n\n"
                                   "def short():\n" + body.replace("        ", "    ") + "\n", encoding="utf-8")
    assert list(_long_functions([tmp_path / "m.py"]).values()) == [71]
