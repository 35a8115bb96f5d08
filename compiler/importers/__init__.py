"""mixspec import: read the config people already have (a `swift sft` command line, a
LLaMA-Factory or axolotl YAML), apply that backend's own selection rules at its version over
the model's real module tree, and give back the mixspec spec that trains exactly that, with
every silent effect found on the way.

Each backend module (``swift``, ``llamafactory``, ``axolotl``) exposes

    read(text: str, path: str) -> Imported

which never raises for a problem in the user's file: what cannot be expressed goes to
``Imported.problems`` (located), flags the importer does not model go to ``unmodelled``
(listed, never silently ignored), and surprising or no-op flags go to ``effects``.
The spec is plain data the loader validates like any spec (``mixspec.api.load_spec``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from ..errors import Location, Problem

BACKENDS = ("swift", "llamafactory", "axolotl")


@dataclass(frozen=True)
class Effect:
    """A flag that has no effect, or a surprising one, for this model and backend version."""

    code: str          # a stable id tests and tools can match, e.g. "pattern-matches-nothing"
    where: Location    # the flag or key in the user's file
    message: str       # what the backend really does
    fix: str           # how to get what the user most likely meant

    def render(self) -> str:
        return f"{self.where}: {self.code}: {self.message}\n  fix: {self.fix}"

    def to_json(self) -> dict:
        return {**self.where.to_json(), "code": self.code, "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Unmodelled:
    """A flag or key the importer does not model (it may still change the training)."""

    where: Location
    key: str
    note: str = ""

    def render(self) -> str:
        return f"{self.where}: {self.key}: not modelled by mixspec import" + (f" ({self.note})" if self.note else "")

    def to_json(self) -> dict:
        return {**self.where.to_json(), "key": self.key, "note": self.note}


@dataclass
class Imported:
    """What a backend config really trains, as a mixspec spec plus everything noticed."""

    backend: str                 # one of BACKENDS
    rules: str                   # whose rules at which version, e.g. "ms-swift 4.x (4.6.0)"
    spec: dict                   # the mixspec spec, plain data
    # dotted spec key ("components.vision.lr") -> where its value came from: a Location in the
    # user's file, or a sentence ("ms-swift 4.x default") when the backend's default decided
    origins: dict[str, object] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)   # spec component -> the backend's name for it
    effects: list[Effect] = field(default_factory=list)
    unmodelled: list[Unmodelled] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # errors: the spec language cannot say it
    # the Plan of ``spec`` when the importer resolved it (None: not resolved, or problems)
    plan: object = None

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)


def read(backend: str, text: str, path: str) -> Imported:
    """Read ``text`` (the content of ``path``, or of stdin with path '<stdin>') as a config
    of ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    module = importlib.import_module(f"mixspec.importers.{backend}")
    return module.read(text, path)


def spec_yaml(imported: Imported, source: str) -> str:
    """The imported spec as YAML, each line commented with where its value came from
    (``file:line:col --flag``, or the backend's default), headed by what was imported and
    which silent effects and unmodelled keys to read. Loads back as ``imported.spec``."""
    from .. import __version__

    lines = [
        f"# Imported by mixspec {__version__} (mixspec import --from {imported.backend}) from {source},",
        f"# read with the rules of {imported.rules}. Each comment says where the value came from.",
    ]
    if imported.effects:
        lines.append(f"# {len(imported.effects)} silent effect(s) found there (mixspec import prints them):")
        lines += [f"#   {_one_line(e.where)}: {e.code}" for e in imported.effects]
    if imported.unmodelled:
        lines.append(f"# {len(imported.unmodelled)} flag(s)/key(s) not modelled: {_one_line(', '.join(u.key for u in imported.unmodelled))}"[:400])
    lines.append("")
    _emit(imported.spec, (), 0, imported, lines)
    return "\n".join(lines) + "\n"


def _one_line(value) -> str:
    text = str(value)
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _origin(imported: Imported, path: tuple) -> str:
    key = ".".join(str(p) for p in path)
    origin = imported.origins.get(key)
    extra = imported.groups.get(path[1]) if len(path) == 2 and path[0] == "components" else None
    parts = [_one_line(origin) for origin in (origin,) if origin is not None]
    if extra:
        parts.append(_one_line(extra))
    return "  # " + "; ".join(parts) if parts else ""


def _emit(node, path: tuple, indent: int, imported: Imported, lines: list) -> None:
    pad = "  " * indent
    for key, value in node.items():
        here = path + (key,)
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:{_origin(imported, here)}")
            _emit(value, here, indent + 1, imported, lines)
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}{_origin(imported, here)}")


def _scalar(value) -> str:
    from ..targets._common import yaml_value

    if isinstance(value, float) and not isinstance(value, bool):
        from ..planning.resolve import _yaml_number

        text = _yaml_number(value)  # 1.0e-5, as specs write learning rates
        return text if float(text) == value else yaml_value(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, str) and "\\" in value and value.isascii() and value.isprintable() and "'" not in value:
        return f"'{value}'"  # a regex reads best without doubled backslashes
    return yaml_value(value)


def tied_copies(tree, modules) -> list[tuple[str, str, str]]:
    """``(module, parameter, partner)`` for each tied parameter under ``modules`` (the modules
    PEFT's modules_to_save would copy). ``copy.deepcopy`` of one module gives its weight a
    tensor of its own, so the copy unties the pair: the copy trains, the partner stays frozen
    (PEFT's ``ensure_weight_tying`` is off by default). A spec trains a tied pair as one tensor."""
    out = []
    for alias, canon in sorted(tree.tied.items()):
        for param, partner in ((alias, canon), (canon, alias)):
            for module in modules:
                if param == module or param.startswith(module + "."):
                    out.append((module, param, partner))
    return out


def tied_copy_text(module: str, param: str, partner: str, numel: int, setting: str) -> tuple[str, str]:
    """The problem's message and hint for a modules_to_save copy that unties a tied pair."""
    return (f"{setting} copies {module}, whose {param} is tied to {partner}: PEFT's copy unties them and trains "
            f"a separate {param} ({numel:,} parameters) while {partner} stays frozen; a mixspec spec trains a "
            "tied pair as one tensor and cannot say this",
            "drop it from the copied modules, or train the pair as one in a spec "
            "(embeddings: {train: full, ...} and lm_head: {train: full, ...} with the same LR)")
