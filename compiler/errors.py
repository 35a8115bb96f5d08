"""The two families of user-facing errors.

``SpecError`` collects every problem found in a spec (or in what it refers to) and is
reported all at once, each problem located as ``file:line:col``. ``UnsupportedError``
is raised by a target that cannot express part of a Plan exactly. Anything else is an
internal error and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def quoted(text: str) -> str:
    """A string (a regex above all) quoted as the user wrote it: repr() would double
    every backslash of 'model\\.visual'. Control characters keep repr's escapes."""
    if not text.isprintable():
        return repr(text)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    return repr(text)


@dataclass(frozen=True)
class Location:
    """Where in a spec file something came from (1-based line and column)."""

    file: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.col}"
        return self.file

    def to_json(self) -> dict:
        return {"file": self.file, "line": self.line, "col": self.col}


@dataclass(frozen=True)
class Problem:
    """One located problem: where, the dotted key, what is wrong, how to fix it."""

    location: Location
    path: str
    message: str
    hint: str = ""
    severity: str = "error"  # "error" or "warning"

    def render(self) -> str:
        key = f"{self.path}: " if self.path else ""
        text = f"{self.location}: {self.severity}: {key}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_json(self) -> dict:
        return {
            **self.location.to_json(),
            "severity": self.severity,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


class MixspecError(Exception):
    """Base class of errors that are the user's to fix (exit 1, no traceback)."""

    exit_code = 1


class SpecError(MixspecError):
    """One or more problems in a spec, all reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(
            problems, key=lambda p: (p.location.file, p.location.line, p.location.col, p.path)
        )
        super().__init__("\n".join(p.render() for p in self.problems))


class ModelSourceError(MixspecError):
    """A model reference that cannot be resolved to a config, or may not be built safely.
    ``hint`` says how to fix it (shown under the message, as a spec problem's hint is)."""

    def __init__(self, message: str, hint: str = ""):
        if not hint and "\n  hint: " in message:  # the hint written into the message
            message, hint = message.split("\n  hint: ", 1)
        message = message.rstrip(".\n") if hint else message
        super().__init__(message + (f"\n  hint: {hint}" if hint else ""))
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """``error: MESSAGE`` and its hint, for a command that has no spec line to point at."""
        return f"error: {self.message}" + (f"\n  hint: {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class Unsupported:
    """One part of a Plan that a target cannot express exactly."""

    code: str
    origin: Location | None
    what: str
    why: str
    hint: str = ""
    # --approximate may emit the output anyway, with this deviation written as a comment;
    # otherwise the target refuses even with --approximate (Target.render decides)
    approximable: bool = False

    def render(self, target: str) -> str:
        where = f"{self.origin}: " if self.origin else ""
        text = f"{where}error: target {target} cannot express {self.what}: {self.why}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


APPROXIMATE_HINT = "or pass --approximate for an approximation, each deviation written as a comment"


class UnsupportedError(MixspecError):
    """A target refused to compile a Plan; lists every part it cannot express, one message
    per cause (parts refused for the same reason are listed under it). ``approximable``:
    the items --approximate would emit instead (their hint says so)."""

    def __init__(self, target: str, items: list[Unsupported], approximable=()):
        self.target = target
        self.items = items
        marked = list(approximable)
        self.approximable = [i for i in items if i in marked or getattr(i, "approximable", False)]
        super().__init__(render_refusal(target, items, self.approximable))


def render_refusal(target: str, items: list[Unsupported], approximable=()) -> str:
    """Items grouped by cause (code and reason), in order of first appearance."""
    groups: dict[tuple, list[Unsupported]] = {}
    for item in items:
        groups.setdefault((item.code, item.why), []).append(item)
    out = []
    for (_, why), group in groups.items():
        hints = list(dict.fromkeys(i.hint for i in group if i.hint))
        if len(hints) > 1:  # the same advice, one per part: say it once
            hints = [f"{hints[0]} (and likewise for the other {len(group) - 1} part{'s' if len(group) > 2 else ''})"]
        if any(i in approximable for i in group):
            hints = [h.rstrip(".") + "; " + APPROXIMATE_HINT if h else APPROXIMATE_HINT for h in hints[:1]] + hints[1:] \
                if hints else [APPROXIMATE_HINT[3:]]
        if len(group) == 1:
            text = Unsupported(group[0].code, group[0].origin, group[0].what, why).render(target)
        else:
            first = group[0]
            where = f"{first.origin}: " if first.origin else ""
            text = f"{where}error: target {target} cannot express {len(group)} parts, for one reason: {why}"
            for i in group:
                text += f"\n  - {str(i.origin) + ': ' if i.origin else ''}{i.what}"
        for hint in hints:
            text += f"\n  hint: {hint}"
        out.append(text)
    return "\n".join(out)


@dataclass
class Diagnostics:
    """Collects problems while a pass runs, so all of them are reported together."""

    problems: list[Problem] = field(default_factory=list)

    def error(self, location: Location, path: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(location, path, message, hint))

    def warn(self, location: Location, path: str, message: str, hint: str = "") -> None:
        self.problems.append(Problem(location, path, message, hint, severity="warning"))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise SpecError(self.problems)
