"""Shell words with their positions: enough of POSIX shell to read a training script.

Splits a script into simple commands (at newlines, ``;``, ``&&``, ``||``, ``|``, ``&``),
each a list of words with the line and column where the word starts. Handles line
continuations, comments, single and double quotes, backslash escapes and ``$VAR`` /
``${VAR}`` / ``${VAR:-default}`` expansion from the assignments the script itself makes.
Nothing is executed; command substitution (``$(...)``, backquotes) is left unexpanded and
marked, so a value that depends on it is reported instead of guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


@dataclass
class Word:
    """One shell word: its text after quote removal, where it starts (1-based), and
    whether it holds expansions the reader could not resolve."""

    text: str
    line: int
    col: int
    raw: str = ""
    unresolved: tuple = ()  # names of variables / "$(...)" it depends on and nobody set


def split_commands(text: str) -> list[list[Word]]:
    """The script's simple commands, in order, each a list of words (expansion not yet done)."""
    commands: list[list[Word]] = []
    words: list[Word] = []
    cur: list[str] = []
    raw: list[str] = []
    start = None
    line, col = 1, 1
    i, n = 0, len(text)
    quote = ""  # "", "'" or '"'
    quote_start = (0, 0)

    def pos_advance(ch: str) -> None:
        nonlocal line, col
        if ch == "\n":
            line, col = line + 1, 1
        else:
            col += 1

    def end_word() -> None:
        nonlocal cur, raw, start
        if start is not None:
            words.append(Word("".join(cur), start[0], start[1], "".join(raw)))
        cur, raw, start = [], [], None

    def substitution(at: int) -> int:
        """$(...) / $((...)) at ``at`` into the word (marked "\0", expanded by expand());
        where the text goes on."""
        j = _closing_paren(text, at + 1)
        cur.append("\0" + text[at + 1:j])
        raw.append(text[at:j])
        for c in text[at:j]:
            pos_advance(c)
        return j

    def end_command() -> None:
        nonlocal words
        end_word()
        if words:
            commands.append(words)
        words = []

    while i < n:
        ch = text[i]
        if quote == "'":
            if ch == "'":
                quote = ""
            else:
                cur.append(ch)
            raw.append(ch)
            pos_advance(ch)
            i += 1
            continue
        if quote == '"':
            if ch == '"':
                quote = ""
                raw.append(ch)
            elif ch == "\\" and i + 1 < n and text[i + 1] in '"\\$`\n':
                if text[i + 1] != "\n":
                    cur.append(text[i + 1])
                    raw.append(ch + text[i + 1])
                pos_advance(ch)
                pos_advance(text[i + 1])
                i += 2
                continue
            elif ch == "$" and text.startswith("(", i + 1):
                i = substitution(i)
                continue
            else:
                cur.append("\0" if ch == "$" else ch)  # "\0": an expansion, done by expand()
                raw.append(ch)
            pos_advance(ch)
            i += 1
            continue
        if ch == "\\" and i + 1 < n:
            nxt = text[i + 1]
            pos_advance(ch)
            pos_advance(nxt)
            i += 2
            if nxt == "\n":
                continue  # line continuation
            if start is None:
                start = (line, col - 2)
            cur.append(nxt)
            raw.append("\\" + nxt)
            continue
        if ch in " \t\r":
            end_word()
        elif ch == "\n":
            end_command()
        elif ch == "#" and start is None:
            while i < n and text[i] != "\n":
                i += 1
                col += 1
            continue
        elif ch in ";|&":
            end_command()
            if i + 1 < n and text[i + 1] in "|&" and ch != ";":
                pos_advance(ch)
                i += 1
        elif ch == "$" and text.startswith("(", i + 1):  # $(...) / $((...)): one word, expanded later
            if start is None:
                start = (line, col)
            i = substitution(i)
            continue
        else:
            if start is None:
                start = (line, col)
            if ch in "'\"":
                quote = ch
                quote_start = (line, col)
                raw.append(ch)
            else:
                cur.append("\0" if ch == "$" else ch)
                raw.append(ch)
        pos_advance(ch)
        i += 1
    if quote:
        raise UnterminatedQuote(quote, *quote_start)
    end_command()
    return commands


def _closing_paren(text: str, i: int) -> int:
    """The index just past the ``)`` that closes the ``(`` at ``i`` (the end of ``text`` if none)."""
    depth, quote = 0, ""
    while i < len(text):
        ch = text[i]
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def _substitution(inner: str, variables: dict[str, str]):
    """The value of ``$(inner)`` where it is integer arithmetic the script itself fixes
    (``$((16 / N))``, ``$(expr 16 / $N)``), else None: nothing is ever run."""
    inner = inner.replace("\0", "$")
    if inner.startswith("(") and inner.endswith(")"):  # $(( ... )): bare names are variables too
        body = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", r"\1", inner[1:-1])
    else:
        words = inner.split()
        if len(words) != 4 or words[0] != "expr" or words[2] not in ("+", "-", "\\*", "*", "/", "%"):
            return None
        body = " ".join((words[1], words[2].lstrip("\\"), words[3]))
    body = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", r"\1", body)
    names = {n: variables.get(n) for n in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", body)}
    if any(v is None or not re.fullmatch(r"-?\d+", v.strip()) for v in names.values()):
        return None
    body = re.sub(r"[A-Za-z_][A-Za-z0-9_]*", lambda m: names[m.group(0)].strip(), body)
    return _arith(body)


def _arith(body: str):
    """Integer + - * / % and parentheses, as the shell computes them (division truncates)."""
    import ast

    try:
        tree = ast.parse(body.replace("/", "//").strip(), mode="eval").body
    except SyntaxError:
        return None

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, (ast.FloorDiv, ast.Mod)):
                if b == 0:
                    raise ZeroDivisionError
                q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
                return q if isinstance(node.op, ast.FloorDiv) else a - q * b
            return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
        raise ValueError

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


class UnterminatedQuote(ValueError):
    """A quote opened at (line, col) and never closed."""

    def __init__(self, quote: str, line: int, col: int):
        super().__init__(f"unterminated {quote} quote")
        self.quote, self.line, self.col = quote, line, col


def expand(word: Word, variables: dict[str, str]) -> Word:
    """``$VAR`` / ``${VAR}`` / ``${VAR:-default}`` replaced from ``variables``; anything else
    that starts with ``$`` (``$(...)``, ``$1``, ``$@``) or names an unset variable is kept as
    written and listed in ``unresolved``."""
    marked = word.text
    if "\0" not in marked:
        return word
    missing: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(marked):
        ch = marked[i]
        if ch != "\0":
            out.append(ch)
            i += 1
            continue
        if marked.startswith("(", i + 1):  # $(...) from split_commands
            j = _closing_paren(marked, i + 1)
            value = _substitution(marked[i + 2:j - 1], variables)
            if value is None:
                missing.append("$" + marked[i + 1:j].replace("\0", "$"))
                out.append("$" + marked[i + 1:j].replace("\0", "$"))
            else:
                out.append(str(value))
            i = j
            continue
        m = _VAR.match("$" + marked[i + 1:].replace("\0", "$"))
        if not m:
            rest = marked[i + 1:]
            missing.append("$(...)" if rest.startswith("(") else "$" + rest[:1])
            out.append("$")
            i += 1
            continue
        name = m.group(1) or m.group(3)
        default = m.group(2)
        if name in variables:
            out.append(variables[name])
        elif default is not None:
            out.append(default)
        else:
            missing.append("$" + name)
            out.append(m.group(0))
        i += len(m.group(0))
    return Word("".join(out), word.line, word.col, word.raw, tuple(dict.fromkeys(missing)))
