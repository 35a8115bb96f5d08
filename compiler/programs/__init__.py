"""The programs mixspec generates, kept as real files of this package.

``hf_train.py`` is the hf target's ``train.py``, ``hf_launch.sh`` its ``launch.sh``,
``swift_plugin.py`` the swift target's ``mixspec_plugin.py``, ``swift_train.sh`` its
``train.sh``, and ``sbatch.sh`` the Slurm batch script of both (``sbatch.sh``). They are
complete programs: the tests import the Python ones and ruff lints them as they are
(``bash -n`` the shell ones). What differs from one Plan to the next stands in marked blocks::

    # --- mixspec: plan (generated) ---
    PLAN = {...}                      placeholder values: the file imports as it is
    # --- end mixspec: plan ---

A target renders a program (``render``) by replacing the lines between each block's two
marker lines (which stay, so a reader of the output sees what was generated) with text it
computes: the ``header`` comment, the ``plan`` as Python literals or shell assignments, and
the ``helpers`` block. In the package the helpers block imports the helpers from
``mixspec.models.names`` (so this copy runs); in the output it holds their source
(``helpers_source``), so a generated file is self-contained and needs nothing of mixspec.

A block marked ``(default)`` instead of ``(generated)`` is the program's own text, which a
target either keeps (it fills the block with ``KEEP``) or replaces whole (the output then marks
it ``(generated)``). It may hold generated blocks, one level deep: those are filled when it is
kept, and go with it when it is replaced. train.sh's check for model code is one: kept unless
the spec allows the model's own code.

Every block the program has must be filled, each exactly once, and a plan block must assign
the same names as the program's placeholder. Anything else is a bug in a program or in a
target, and ``render`` stops with a ``ProgramError`` naming the program and the block.
"""

from __future__ import annotations

import ast
import inspect
import re
from importlib import resources
from typing import NamedTuple

from ..models import names

#: the programs of this package: name -> file name
PROGRAMS = {"hf_train": "hf_train.py", "hf_launch": "hf_launch.sh", "swift_plugin": "swift_plugin.py",
            "swift_train": "swift_train.sh", "sbatch": "sbatch.sh"}

BEGIN = "# --- mixspec: {} (generated) ---"
BEGIN_DEFAULT = "# --- mixspec: {} (default) ---"
END = "# --- end mixspec: {} ---"
_BEGIN = re.compile(r"# --- mixspec: ([a-z_]+) \((generated|default)\) ---")
_END = re.compile(r"# --- end mixspec: ([a-z_]+) ---")
# anything that looks like a marker must be one, exactly (a typo would silently leave a block)
_LOOKS_LIKE_MARKER = re.compile(r"\s*#\s*---\s*(end\s+)?mixspec\b")

#: the block whose package text imports the helpers and whose output text is their source
HELPERS = "helpers"
#: the functions inlined into every generated program (after ``INDEX``), in this order
_INLINED = (names.natural_key, names.ranges, names.compact_names, names.expand_names, names.names_sha256,
            names.fingerprint)


class _Keep:
    def __repr__(self) -> str:
        return "programs.KEEP"


#: what a target fills a default block with to keep the program's own text
KEEP = _Keep()


class ProgramError(RuntimeError):
    """A program's marked blocks do not fit what a target fills in (a bug, not user input)."""


class Block(NamedTuple):
    """Where a marked block stands: the line indexes of its begin and end markers, whether it
    is a default block, and the default block it sits in (None at the top level)."""

    start: int
    end: int
    default: bool = False
    parent: str | None = None


def program_text(name: str) -> str:
    """The source of one of this package's programs."""
    if name not in PROGRAMS:
        raise ProgramError(f"no program {name!r} in mixspec.programs (there are: {', '.join(PROGRAMS)})")
    return resources.files(__name__).joinpath(PROGRAMS[name]).read_text(encoding="utf-8")


def helpers_source() -> str:
    """mixspec.models.names' helpers as source, for the helpers block of a generated program (which
    imports ``re`` and ``hashlib``): written once, in the package, inlined into each output."""
    funcs = "\n\n".join(inspect.getsource(f) for f in _INLINED)
    return f"INDEX = re.compile({names.INDEX.pattern!r})\n\n\n" + funcs


def helpers_import() -> str:
    """The helpers block as it stands in the package programs: the same helpers, imported."""
    imported = sorted(["INDEX"] + [f.__name__ for f in _INLINED], key=lambda n: (n != "INDEX", n))
    return f"from mixspec.models.names import {', '.join(imported)}  # noqa: F401\n"


def blocks(text: str, program: str = "program") -> dict[str, Block]:
    """Each marked block of a program, in file order: name -> Block. Raises ProgramError on a
    duplicated, unclosed or malformed marker, or a block inside a generated block (or a
    default block inside another)."""
    out: dict[str, Block] = {}
    stack: list[tuple[str, int, bool]] = []  # open blocks: (name, line index, default)
    for i, line in enumerate(text.split("\n")):
        begin, end = _BEGIN.fullmatch(line), _END.fullmatch(line)
        if not begin and not end:
            if _LOOKS_LIKE_MARKER.match(line):
                raise ProgramError(f"{program}:{i + 1}: a malformed block marker: {line.strip()!r} "
                                   f"(write {BEGIN.format('NAME')!r} or {BEGIN_DEFAULT.format('NAME')!r}"
                                   f" ... {END.format('NAME')!r})")
            continue
        if begin:
            name, default = begin.group(1), begin.group(2) == "default"
            if stack and (default or not stack[-1][2]):
                raise ProgramError(f"{program}:{i + 1}: block {name!r} begins inside block {stack[-1][0]!r}"
                                   + (" (only a generated block may sit in a default block)" if stack[-1][2] else ""))
            seen = {n for n, _, _ in stack} | set(out)
            if name in seen:
                first = out[name].start if name in out else next(at for n, at, _ in stack if n == name)
                raise ProgramError(f"{program}:{i + 1}: block {name!r} appears twice (first at line {first + 1})")
            stack.append((name, i, default))
            continue
        name = end.group(1)
        if stack and stack[-1][0] != name and name in {n for n, _, _ in stack}:
            raise ProgramError(f"{program}:{stack[-1][1] + 1}: block {stack[-1][0]!r} has no end marker "
                               f"{END.format(stack[-1][0])!r} (block {name!r}, which holds it, ends at line {i + 1})")
        if not stack or stack[-1][0] != name:
            raise ProgramError(f"{program}:{i + 1}: the end of block {name!r} without its begin marker"
                               + (f" (block {stack[-1][0]!r} is open)" if stack else ""))
        _, start, default = stack.pop()
        out[name] = Block(start, i, default, stack[-1][0] if stack else None)
    if stack:
        name, start, _ = stack[-1]
        raise ProgramError(f"{program}:{start + 1}: block {name!r} has no end marker {END.format(name)!r}")
    return dict(sorted(out.items(), key=lambda kv: kv[1].start))


def block_text(text: str, name: str, program: str = "program") -> str:
    """The lines inside one block (markers excluded, nested blocks' included), each ending in a
    newline."""
    where = blocks(text, program)
    if name not in where:
        raise ProgramError(f"{program}: has no block {name!r}")
    start, end = where[name][:2]
    return "".join(line + "\n" for line in text.split("\n")[start + 1:end])


def data_part(text: str, program: str = "program") -> str:
    """What a generated file adds to its program: every generated block but the helpers (the
    same source in every output), markers included, in file order; a kept default block is the
    program's text, so only the generated blocks inside it count. The golden files hold this."""
    lines = text.split("\n")
    out = []
    for name, block in blocks(text, program).items():
        if name != HELPERS and not block.default:
            out += lines[block.start:block.end + 1]
    return "".join(line + "\n" for line in out)


_SH_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")


def _assigned(source: str, where: str, shell: bool) -> list[str]:
    """The names a plan block assigns, in order (Python, or shell ``NAME=word`` lines)."""
    if shell:
        return [m.group(1) for line in source.splitlines() if (m := _SH_ASSIGNMENT.match(line))]
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ProgramError(f"{where}: not valid Python: {exc.msg} (line {exc.lineno})") from None
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)]


def render(program: str, filled: dict) -> str:
    """The program ``program`` (a name in PROGRAMS) with each block's lines replaced by
    ``filled[block]`` (a missing final newline is added; a default block: text, or ``KEEP``);
    ``helpers`` is filled here."""
    text = program_text(program)
    return fill(text, filled, f"mixspec/programs/{PROGRAMS[program]}", shell=PROGRAMS[program].endswith(".sh"))


def fill(text: str, filled: dict, where: str = "program", shell: bool = False) -> str:
    """``render`` for a program's text (``where`` names it in errors; ``shell``: a shell
    program, whose plan block is ``NAME=word`` lines)."""
    found = blocks(text, where)
    filled = dict(filled)
    if HELPERS in found:
        if HELPERS in filled:
            raise ProgramError(f"{where}: the {HELPERS!r} block is filled by mixspec.programs, not by a target")
        if block_text(text, HELPERS, where) != helpers_import():
            raise ProgramError(f"{where}: the {HELPERS!r} block must be exactly {helpers_import()!r}, "
                               "the helpers that helpers_source() inlines")
        filled[HELPERS] = helpers_source()
    for name, value in filled.items():
        if value is KEEP and name in found and not found[name].default:
            raise ProgramError(f"{where}: block {name!r} is generated: it has no text of the program's to keep")
    replaced = {name for name, block in found.items() if block.default and filled.get(name, KEEP) is not KEEP}
    gone = {name for name, block in found.items() if block.parent in replaced}  # they go with their block
    if gone & set(filled):
        name = sorted(gone & set(filled))[0]
        raise ProgramError(f"{where}: block {name!r} is filled, but the default block {found[name].parent!r} "
                           "that holds it is replaced")
    wanted = set(found) - gone
    missing, unknown = sorted(wanted - set(filled)), sorted(set(filled) - set(found))
    if missing or unknown:
        raise ProgramError(f"{where}: " + "; ".join(
            part for part in (f"blocks not filled: {', '.join(missing)}" if missing else "",
                              f"no block for: {', '.join(unknown)}" if unknown else "") if part))
    if "plan" in wanted:
        want = _assigned(block_text(text, "plan", where), f"{where} (plan block)", shell)
        got = _assigned(filled["plan"], f"{where}: the generated plan block", shell)
        if got != want:
            raise ProgramError(f"{where}: the generated plan block assigns {got}, the program's placeholder {want}")
    lines = text.split("\n")
    out: list[str] = []
    pos = 0
    for name, block in found.items():
        if name in gone or filled[name] is KEEP:
            continue
        body = filled[name]
        if body and not body.endswith("\n"):
            body += "\n"
        out += lines[pos:block.start]
        out.append(BEGIN.format(name))  # a replaced default block is generated text now
        out += body.split("\n")[:-1]
        pos = block.end
    out += lines[pos:]
    result = "\n".join(out)
    expect = [(name, found[name].default and name not in replaced) for name in found if name not in gone]
    try:
        same = [(name, block.default) for name, block in blocks(result, where).items()] == expect
    except ProgramError:
        same = False
    if not same:
        raise ProgramError(f"{where}: a filled block holds a line that is a block marker")
    return result
