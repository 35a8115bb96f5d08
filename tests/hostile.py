"""Hostile inputs shared by the fuzz, resource-limit, model-dir, output and injection tests.

``hostile_strings(marker)`` are values a pull request could put in a spec: quotes of every
kind, backslashes, shell substitutions, newlines, Python string terminators, format
placeholders, option look-alikes, unicode that changes how text reads. Each one that would
run a command runs ``touch MARKER``, so "nothing ran" is checked by the marker's absence.

``catalog_tree()`` is the module tree of one catalog model, built once per process (and
kept in the session's tree cache, see conftest.py), for tests that resolve many specs.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

FUZZ_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"

# Templates: "{m}" is replaced with the marker file's path (quoted where a shell would need it).
_TEMPLATES = [
    "it's",
    'say "hi"',
    "'''",
    '"""',
    "\\",
    "ends with a backslash\\",
    "\\'",
    '\\"',
    "a\\nb\\x41\\u0041",  # escape sequences as text, not as characters
    "$(touch {m})",
    "`touch {m}`",
    "${{IFS}}touch${{IFS}}{m}",
    "$HOME/$USER",
    "a; touch {m}",
    "a && touch {m} || touch {m}",
    "a | touch {m}",
    "> {m}",
    "new\nline; touch {m}",
    "carriage\rreturn",
    "tab\tseparated",
    "'; touch {m}; '",
    "\"; touch {m}; \"",
    "'$(touch {m})'",
    "\"$(touch {m})\"",
    "'; import os; os.system('touch {m}'); '",
    "\"); __import__('os').system('touch {m}'); (\"",
    "''' + __import__('os').system('touch {m}') + '''",
    '""" + __import__("os").system("touch {m}") + """',
    "{{__import__('os').system('touch {m}')}}",
    "%(x)s %s {{0}} {{}}",
    "${{{{ github.token }}}}",
    "{{{{ jinja }}}}",
    "#not a comment",
    "--output_dir=/tmp/evil",
    "-rf",
    "*",
    "~",
    "!!",
    "a  b   c",
    " leading and trailing ",
    "ünïcødé/数据/train.jsonl",
    "emoji 🚀.jsonl",
    "rtl \u202eexe.txt",
    "line\u2028separator",
    "next\x85line",
    "form\x0cfeed and \x0bvtab",
    "\x1b[31mred\x1b[0m",
    "bell\x07",
]


def hostile_strings(marker: str | Path) -> list[str]:
    """Hostile values; any command they smuggle in would create ``marker``."""
    m = str(marker)
    return [t.format(m=m) for t in _TEMPLATES]


# NUL cannot reach a spec (the loader refuses it) nor a shell word; Python literals must
# still carry it if a Plan is built by hand
NUL_STRINGS = ["nul\x00byte", "\x00"]


def catalog_tree(model: str = FUZZ_MODEL):
    """The module tree of a catalog model, built once per process."""
    return _catalog_tree(model)


@functools.lru_cache(maxsize=None)
def _catalog_tree(model: str):
    from mixspec.models.sources import find_model
    from mixspec.models.tree import get_tree

    return get_tree(find_model(model))


def write_fake_backends(bin_dir: Path, log_dir: Path,
                        names=("swift", "torchrun", "deepspeed", "accelerate", "llamafactory-cli",
                               "python", "python3")) -> None:
    """Executables that record their name, working directory and argv, exactly, and exit 0.

    Each call writes one file in ``log_dir``: NUL-separated fields (a NUL is the one byte
    no argument can hold). Put ``bin_dir`` first on PATH and run a generated script: what
    each backend would have received is in the log, and nothing else runs.
    """
    import shlex

    bin_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(
            "#!/usr/bin/env bash\n"
            f"log={shlex.quote(str(log_dir))}/$(date +%s%N)-$$\n"
            'printf \'%s\\0\' "$(basename "$0")" "$PWD" "$@" > "$log"\n',
            encoding="utf-8",
        )
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def read_fake_calls(log_dir: Path) -> list[dict]:
    """The recorded calls, oldest first: {"name", "cwd", "argv"}."""
    calls = []
    for path in sorted(log_dir.iterdir()) if log_dir.exists() else []:
        fields = path.read_bytes().split(b"\0")[:-1]
        name, cwd, *argv = (f.decode("utf-8", "surrogateescape") for f in fields)
        calls.append({"name": name, "cwd": cwd, "argv": argv})
    return calls


def clean_env(bin_dir: Path, home: Path) -> dict:
    """An environment for running generated scripts: fakes first on PATH, a throwaway HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXSPEC_", "PYTHON"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(home)
    return env
