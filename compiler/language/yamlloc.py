"""Read a YAML or JSON spec file into plain data plus a map of source locations.

Resource limits are enforced here, before any value reaches pydantic: file size, nesting
depth and the number of nodes after alias expansion (so "billion laughs" documents stop
at once). Scalars are resolved with YAML 1.2 core rules: ``1e-4`` is a float and only
``true``/``false`` are booleans (YAML 1.1 would read ``1e-4`` as a string and ``no`` as
false).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import Location, Problem, SpecError

# a spec is a few hundred bytes; 256 KiB keeps the worst case (pure-Python YAML) well under a second
MAX_FILE_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 20_000

Path_ = tuple  # a key path: tuple of str | int

_CORE_TAGS = frozenset(
    "tag:yaml.org,2002:" + name for name in ("str", "int", "float", "bool", "null", "map", "seq")
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars, and limits enforced while parsing.

    PyYAML's scanner slows down quadratically with flow nesting and its composer is
    recursive, so depth and node count are checked as the text is read: a hostile file
    stops at the first node past a limit instead of being composed whole first.
    """

    def __init__(self, stream, name: str = "<spec>"):
        super().__init__(stream)
        self.spec_name = name
        self.composed_nodes = 0

    def _too_deep(self) -> SpecError:
        mark = self.get_mark()
        return _fail(self.spec_name, mark.line + 1, mark.column + 1,
                     f"nesting deeper than {MAX_DEPTH} levels", "a spec needs only a few levels")

    def fetch_flow_collection_start(self, TokenClass):
        # open collections = block indents + flow levels; one more than MAX_DEPTH allows
        # is already deeper than any node _convert accepts
        if len(self.indents) + self.flow_level + 1 > MAX_DEPTH + 1:
            raise self._too_deep()
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column):
        added = super().add_indent(column)
        if added and len(self.indents) + self.flow_level > MAX_DEPTH + 1:
            raise self._too_deep()
        return added

    def compose_node(self, parent, index):
        self.composed_nodes += 1
        if self.composed_nodes > MAX_NODES:
            mark = self.peek_event().start_mark
            raise _fail(self.spec_name, mark.line + 1, mark.column + 1,
                        f"the document has more than {MAX_NODES} values",
                        "a spec has a few dozen values; is this the right file?")
        return super().compose_node(parent, index)


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


def _join_surrogates(text: str, node, file: str) -> str:
    """JSON writes characters beyond U+FFFF as two escapes ("\\ud83d\\ude80") and PyYAML
    decodes each alone: pair them up as a JSON reader would; a lone half is an error."""
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    try:
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise _fail(file, node.start_mark.line + 1, node.start_mark.column + 1,
                    "unpaired surrogate escape (\\ud800-\\udfff)",
                    "write the character itself, or both halves of its surrogate pair") from None


def _convert(node, file: str, loader: _Loader, out: Located) -> object:
    budget = [MAX_NODES]
    seen: set[int] = set()

    def walk(node, path: tuple, depth: int, alias_site: Location | None = None):
        # PyYAML hands an alias back as the anchored node itself: a node seen before is an
        # alias use, and the container holding the first one is where to point the user
        if id(node) in seen and alias_site is None and path:
            alias_site = out.value_locs.get(path[:-1])
        seen.add(id(node))
        budget[0] -= 1
        if budget[0] < 0:
            where = alias_site or _mark_loc(file, node.start_mark)
            raise _fail(
                file, where.line, where.col,
                f"the document expands to more than {MAX_NODES} values through anchors and aliases",
                "a spec is small; anchors/aliases that multiply content are not allowed",
            )
        if depth > MAX_DEPTH:
            raise _fail(
                file, node.start_mark.line + 1, node.start_mark.column + 1,
                f"nesting deeper than {MAX_DEPTH} levels", "a spec needs only a few levels",
            )
        out.value_locs[path] = _mark_loc(file, node.start_mark)
        if node.tag not in _CORE_TAGS:
            # SafeLoader would build bytes, sets or timestamps from these; a spec has no use for them
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise _fail(file, node.start_mark.line + 1, node.start_mark.column + 1,
                        f"unsupported YAML tag {tag!r}",
                        "specs hold plain strings, numbers, booleans, lists and mappings: remove the tag")
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _fail(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                "mapping keys must be plain strings")
                key = _join_surrogates(str(key_node.value), key_node, file)
                if "\x00" in key:
                    raise _fail(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                "key contains a NUL character (\\0)", "remove the \\0 escape")
                if key == "<<":
                    raise _fail(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                "YAML merge keys (<<) are not supported", "write the keys out")
                if key in result:
                    first = out.key_locs[path + (key,)]
                    raise _fail(
                        file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                        f"duplicate key {key!r} (first at line {first.line}, column {first.col})",
                        "each key may appear once in a mapping; YAML loaders that allow it keep only the last",
                    )
                out.key_locs[path + (key,)] = _mark_loc(file, key_node.start_mark)
                result[key] = walk(value_node, path + (key,), depth + 1, alias_site)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [walk(v, path + (i,), depth + 1, alias_site) for i, v in enumerate(node.value)]
        try:
            value = _scalar(node, loader)
        except (ValueError, yaml.YAMLError) as exc:
            raise _fail(file, node.start_mark.line + 1, node.start_mark.column + 1,
                        f"cannot read value {node.value[:40]!r}: {exc}") from None
        if isinstance(value, str):
            value = _join_surrogates(value, node, file)
        if isinstance(value, str) and "\x00" in value:
            # no path, id or pattern holds one, and a shell word cannot carry it
            raise _fail(file, node.start_mark.line + 1, node.start_mark.column + 1,
                        "value contains a NUL character (\\0)", "remove the \\0 escape")
        return value

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
        # bounded read: a device has no size (a symlink in a pull request can point at /dev/zero)
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise _fail(name, 0, 0, f"file is larger than the {MAX_FILE_BYTES}-byte limit for specs",
                        "a spec is a few hundred bytes; is this the right file?")
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
        # count characters, not bytes, up to the bad byte (editors show character columns)
        col = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1
        raise _fail(name, line, col, "file is not valid UTF-8", "save the spec as UTF-8") from None
    return load_located_text(text, name)


def load_located_text(text: str, name: str) -> Located:
    """Parse spec text (YAML 1.2 core scalars; JSON is accepted as YAML)."""
    if len(text) > MAX_FILE_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise _fail(name, 0, 0, f"spec is larger than the {MAX_FILE_BYTES}-byte limit for specs",
                    "a spec is a few hundred bytes; is this the right file?")
    try:
        loader = _Loader(text, name)
    except yaml.reader.ReaderError as exc:
        # control characters other than tab and newlines: point at the first one
        before = text[: exc.position]
        line, col = before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1
        raise _fail(name, line, col, f"character U+{exc.character:04X} is not allowed in YAML (a control or non-character code point)",
                    "remove it; write it as an escape (\\x..) inside double quotes if you need it") from None
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message, hint = _describe_syntax_error(exc)
        raise _fail(name, line, col, f"YAML syntax error: {message}", hint) from None
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


# PyYAML names tokens the way its parser sees them; say what they are in the file
_TOKEN_WORDS = {
    "'<stream end>'": "the end of the file",
    "'<scalar>'": "a value",
    "'<block mapping start>'": "a key indented differently",
    "<block end>": "the end of the indented block",
    "'?'": "a key",
}


def _describe_syntax_error(exc: yaml.MarkedYAMLError) -> tuple[str, str]:
    """PyYAML's problem and context rewritten as one message, plus a hint for the usual causes."""
    problem = exc.problem or "invalid YAML"
    context = exc.context or ""
    for token, words in _TOKEN_WORDS.items():
        problem = problem.replace(token, words)
    opened = ""
    cm, pm = exc.context_mark, exc.problem_mark
    elsewhere = cm is not None and (pm is None or (cm.line, cm.column) != (pm.line, pm.column))
    if context.startswith("while ") and elsewhere:
        what = context.removeprefix("while parsing ").removeprefix("while scanning ").removeprefix("a ")
        opened = f"line {cm.line + 1}, column {cm.column + 1}"
        message = f"{problem} (in the {what} that starts at {opened})"
    elif problem.startswith("but ") and context:
        message = f"{context}, {problem}"
    else:
        message = problem
    hint = "check indentation, quotes and colons around this point"
    if "'\\t'" in problem:
        hint = "indent with spaces: YAML does not allow tabs for indentation"
    elif opened and ("flow mapping" in context or "flow sequence" in context):
        bracket = "{" if "mapping" in context else "["
        hint = f"the '{bracket}' at {opened} is not closed, or a comma is missing between its items"
    elif opened and "quoted scalar" in context:
        hint = f"the quote at {opened} is not closed"
    elif "indented block" in problem:
        hint = "indent every key of one mapping by the same number of spaces"
    elif "mapping values are not allowed" in problem:
        hint = "quote a value that contains ': ', or check this key's indentation"
    elif "another document" in problem:
        hint = "a spec file holds one YAML document: remove the '---' separator"
    elif "undefined alias" in problem:
        hint = "define the anchor (&name) before using the alias (*name)"
    return message, hint
