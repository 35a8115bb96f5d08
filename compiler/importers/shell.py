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
    return _Splitter(text).run()


class _Splitter:
    """A shell script's text, read one character at a time into simple commands of words, each
    word with its position (line, col) and its raw text."""

    def __init__(self, text: str):
        self.text = text
        self.commands: list[list[Word]] = []
        self.words: list[Word] = []
        self.cur: list[str] = []
        self.raw: list[str] = []
        self.start = None  # (line, col) where the current word began
        self.line, self.col = 1, 1
        self.i = 0
        self.quote = ""  # "", "'" or '"'
        self.quote_start = (0, 0)

    def run(self) -> list[list[Word]]:
        """The whole text -> its commands; an unterminated quote raises UnterminatedQuote."""
        n = len(self.text)
        while self.i < n:
            ch = self.text[self.i]
            if self.quote == "'":
                self.single_quoted(ch)
            elif self.quote == '"':
                self.double_quoted(ch)
            else:
                self.unquoted(ch)
        if self.quote:
            raise UnterminatedQuote(self.quote, *self.quote_start)
        self.end_command()
        return self.commands

    def advance(self, ch: str) -> None:
        """Moves the position past ch."""
        if ch == "\n":
            self.line, self.col = self.line + 1, 1
        else:
            self.col += 1

    def begin_word(self, col_back: int = 0) -> None:
        """Marks where the current word starts, if it has not started yet."""
        if self.start is None:
            self.start = (self.line, self.col - col_back)

    def end_word(self) -> None:
        """The characters gathered so far -> one word of the current command."""
        if self.start is not None:
            self.words.append(Word("".join(self.cur), self.start[0], self.start[1], "".join(self.raw)))
        self.cur, self.raw, self.start = [], [], None

    def end_command(self) -> None:
        """The words gathered so far -> one command (none if there are no words)."""
        self.end_word()
        if self.words:
            self.commands.append(self.words)
        self.words = []

    def substitution(self, at: int) -> int:
        """$(...) / $((...)) at ``at`` into the word (marked "\0", expanded by expand());
        where the text goes on."""
        text = self.text
        j = _closing_paren(text, at + 1)
        self.cur.append("\0" + text[at + 1:j])
        self.raw.append(text[at:j])
        for c in text[at:j]:
            self.advance(c)
        return j

    def single_quoted(self, ch: str) -> None:
        """One character inside '...': taken as it is, up to the closing quote."""
        if ch == "'":
            self.quote = ""
        else:
            self.cur.append(ch)
        self.raw.append(ch)
        self.advance(ch)
        self.i += 1

    def double_quoted(self, ch: str) -> None:
        """One character (or escape, or substitution) inside "...": $ expands, \\ escapes a few."""
        text, i, n = self.text, self.i, len(self.text)
        if ch == '"':
            self.quote = ""
            self.raw.append(ch)
        elif ch == "\\" and i + 1 < n and text[i + 1] in '"\\$`\n':
            if text[i + 1] != "\n":
                self.cur.append(text[i + 1])
                self.raw.append(ch + text[i + 1])
            self.advance(ch)
            self.advance(text[i + 1])
            self.i += 2
            return
        elif ch == "$" and text.startswith("(", i + 1):
            self.i = self.substitution(i)
            return
        else:
            self.cur.append("\0" if ch == "$" else ch)  # "\0": an expansion, done by expand()
            self.raw.append(ch)
        self.advance(ch)
        self.i += 1

    def unquoted(self, ch: str) -> None:
        """One character outside quotes: blanks end words, newlines and ; | & end commands,
        # starts a comment, a quote opens, \\ escapes (or continues the line)."""
        text, i, n = self.text, self.i, len(self.text)
        if ch == "\\" and i + 1 < n:
            nxt = text[i + 1]
            self.advance(ch)
            self.advance(nxt)
            self.i += 2
            if nxt == "\n":
                return  # line continuation
            self.begin_word(col_back=2)
            self.cur.append(nxt)
            self.raw.append("\\" + nxt)
            return
        if ch in " \t\r":
            self.end_word()
        elif ch == "\n":
            self.end_command()
        elif ch == "#" and self.start is None:
            while self.i < n and text[self.i] != "\n":
                self.i += 1
                self.col += 1
            return
        elif ch in ";|&":
            self.end_command()
            if i + 1 < n and text[i + 1] in "|&" and ch != ";":
                self.advance(ch)
                self.i += 1
        elif ch == "$" and text.startswith("(", i + 1):  # $(...) / $((...)): one word, expanded later
            self.begin_word()
            self.i = self.substitution(i)
            return
        else:
            self.begin_word()
            if ch in "'\"":
                self.quote = ch
                self.quote_start = (self.line, self.col)
                self.raw.append(ch)
            else:
                self.cur.append("\0" if ch == "$" else ch)
                self.raw.append(ch)
        self.advance(ch)
        self.i += 1


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
