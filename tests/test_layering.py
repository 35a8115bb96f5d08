"""The direction of imports: the core (spec, models, planning, presenting) never imports the
targets, the importers or the entry points; targets read only the Plan (and the core)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"cli", "fast", "api", "__main__", "__init__"}  # compiler/<name>.py that wire the passes together


def _imports(path: Path) -> set[str]:
    """Every mixspec module a file imports (absolute, or relative resolved to mixspec.*)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["mixspec"] + list(path.relative_to(ROOT / "compiler").parent.parts)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mixspec")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("mixspec"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
    return out


def _core_files():
    for path in sorted((ROOT / "compiler").glob("*.py")):
        if path.stem not in ENTRY_POINTS:
            yield path


def test_the_core_never_imports_targets_importers_or_entry_points():
    forbidden = ("mixspec.targets", "mixspec.importers", *(f"mixspec.{m}" for m in ENTRY_POINTS))
    found = {f"{p.relative_to(ROOT)} imports {name}"
             for p in _core_files() for name in _imports(p)
             if any(name == f or name.startswith(f + ".") for f in forbidden)}
    assert not found, sorted(found)


def test_targets_never_import_importers_or_entry_points():
    forbidden = ("mixspec.importers", *(f"mixspec.{m}" for m in ENTRY_POINTS))
    found = set()
    for path in sorted((ROOT / "targets").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                if any(node.module == f or node.module.startswith(f + ".") for f in forbidden):
                    found.add(f"{path.relative_to(ROOT)} imports {node.module}")
    assert not found, sorted(found)


def test_the_checker_sees_an_import_when_there_is_one(tmp_path):
    """The walk finds absolute and relative imports (else the tests above prove nothing)."""
    probe = ROOT / "compiler" / "datacheck.py"
    names = _imports(probe)
    assert "mixspec.programs" in names or "mixspec.programs.hf_train" in names
    assert "mixspec.loader" in names and "mixspec.resolve.plan_spec" in names


MAX_FUNCTION_LINES = 70  # a function fits on a screen (issue #29): longer ones become named steps


def _product_files():
    """compiler/ and targets/, except compiler/programs/ (standalone generated programs)."""
    for top in ("compiler", "targets"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if (ROOT / "compiler" / "programs") not in path.parents:
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
