"""Read a YAML or JSON spec file into plain data plus a map of source locations.

Resource limits are enforced here, before any value reaches pydantic: file size, nesting
depth and the number of nodes after alias expansion (so "billion laughs" documents stop
at once). Scalars are resolved with YAML 1.2 core rules: ``1e-4`` is a float and only
``true``/``false`` are booleans (YAML 1.1 would read ``1e-4`` as a string and ``no`` as
false).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from mixspec.errors import Location, Problem, SpecError

MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 20_000

Path_ = tuple  # a key path: tuple of str | int


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars."""


_Loader.yaml_implicit_resolvers = {}
for _tag, _regexp, _first in [
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+0123456789."),
    ),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
]:
    _Loader.add_implicit_resolver(_tag, re.compile(_regexp), _first)


@dataclass
class Located:
    """Plain data from a spec file and the location of every key and value in it."""

    file: str
    data: object
    value_locs: dict  # path -> Location of the value node
    key_locs: dict  # path -> Location of the key node (mappings only)

    def loc(self, path: Path_) -> Location:
        """Best location for a path: its value, else its key, else its nearest parent."""
        path = tuple(path)
        while True:
            if path in self.key_locs:
                return self.key_locs[path]
            if path in self.value_locs:
                return self.value_locs[path]
            if not path:
                return Location(self.file, 1, 1)
            path = path[:-1]

    def value_loc(self, path: Path_) -> Location:
        path = tuple(path)
        return self.value_locs.get(path) or self.loc(path)


def _mark_loc(file: str, mark) -> Location:
    return Location(file, mark.line + 1, mark.column + 1)


def _fail(file: str, line: int, col: int, message: str, hint: str = "") -> SpecError:
    return SpecError([Problem(Location(file, line, col), "", message, hint)])


def _scalar(node: yaml.ScalarNode, loader: _Loader):
    value = loader.construct_object(node, deep=True)
    if node.tag == "tag:yaml.org,2002:int":
        value = int(node.value, 0) if node.value.lower().startswith(("0x", "0o")) else int(node.value)
    elif node.tag == "tag:yaml.org,2002:float" and isinstance(value, str):
        value = float(value)
    return value


def _convert(node, file: str, loader: _Loader, out: Located) -> object:
    budget = [MAX_NODES]

    def walk(node, path: tuple, depth: int):
        budget[0] -= 1
        if budget[0] < 0:
            raise _fail(
                file, node.start_mark.line + 1, node.start_mark.column + 1,
                f"the document expands to more than {MAX_NODES} values",
                "a spec is small; anchors/aliases that multiply content are not allowed",
            )
        if depth > MAX_DEPTH:
            raise _fail(
                file, node.start_mark.line + 1, node.start_mark.column + 1,
                f"nesting deeper than {MAX_DEPTH} levels", "a spec needs only a few levels",
            )
        out.value_locs[path] = _mark_loc(file, node.start_mark)
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _fail(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                "mapping keys must be plain strings")
                key = str(key_node.value)
                if key == "<<":
                    raise _fail(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                "YAML merge keys (<<) are not supported", "write the keys out")
                if key in result:
                    raise _fail(
                        file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                        f"duplicate key {key!r}", "each key may appear once in a mapping",
                    )
                out.key_locs[path + (key,)] = _mark_loc(file, key_node.start_mark)
                result[key] = walk(value_node, path + (key,), depth + 1)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [walk(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        try:
            return _scalar(node, loader)
        except (ValueError, yaml.YAMLError) as exc:
            raise _fail(file, node.start_mark.line + 1, node.start_mark.column + 1,
                        f"cannot read value {node.value[:40]!r}: {exc}") from None

    return walk(node, (), 0)


def load_located(path: str | Path, display_name: str | None = None) -> Located:
    """Parse a YAML/JSON file; every failure is a located ``SpecError``."""
    path = Path(path)
    name = display_name or str(path)
    try:
        if path.is_dir():
            raise _fail(name, 0, 0, "is a directory, expected a spec file (.yaml, .yml or .json)")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _fail(name, 0, 0, f"file is {size} bytes, larger than the {MAX_FILE_BYTES}-byte limit for specs",
                        "a spec is a few hundred bytes; is this the right file?")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _fail(name, 0, 0, "no such file") from None
    except OSError as exc:
        raise _fail(name, 0, 0, f"cannot read file: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise _fail(name, 1, 1, "file contains NUL bytes: this is not a text spec")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        raise _fail(name, line, col, "file is not valid UTF-8", "save the spec as UTF-8") from None
    return load_located_text(text, name)


def load_located_text(text: str, name: str) -> Located:
    """Parse spec text (YAML 1.2 core scalars; JSON is accepted as YAML)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = exc.problem or "invalid YAML"
        if exc.context:
            what = f"{exc.context}, {what}"
        raise _fail(name, line, col, f"YAML syntax error: {what}",
                    "check indentation, quotes and colons around this point") from None
    except yaml.YAMLError as exc:
        raise _fail(name, 1, 1, f"YAML error: {exc}") from None
    except RecursionError:
        raise _fail(name, 1, 1, f"nesting deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()
    out = Located(name, None, {}, {})
    if node is None:
        out.data = None
        return out
    try:
        out.data = _convert(node, name, loader, out)
    except RecursionError:
        raise _fail(name, 1, 1, f"nesting deeper than {MAX_DEPTH} levels") from None
    return out


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
