#!/usr/bin/env python3
"""Write tests/constraints.txt: the versions installed in this environment, as pins.

Run it in a fresh venv after the fast suite passed there with the new releases (docs/testing.md,
"Moving the test pins"). A local version label (torch 2.13.0+cpu) is dropped, so the pin
holds for the CPU and the CUDA build of the same release; mixspec itself is not pinned.

    python scripts/pin_test_deps.py            write tests/constraints.txt
    python scripts/pin_test_deps.py --stdout   print it instead
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "constraints.txt"

HEADER = """\
# The versions the test suite is proven with (a constraints file: pip install -c tests/constraints.txt).
# The README's test command and .ci/run install through it, so a new release of any dependency
# cannot turn the tests red overnight. Users' installs are not pinned (ranges in pyproject.toml).
#
# Moving the pins (docs/testing.md, "Moving the test pins"): in a fresh venv install without -c, run the
# fast suite, then write this file anew with python scripts/pin_test_deps.py and run the whole
# suite. A golden or program test that fails names the packages whose installed version
# differs from these pins.
"""


def pins() -> list[str]:
    """``name==version`` for every installed distribution but mixspec and pip's own tools."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() in {"mixspec", "pip", "setuptools", "wheel"}:
            continue
        out[re.sub(r"[-_.]+", "-", name).lower()] = dist.version.split("+", 1)[0]
    return [f"{name}=={version}" for name, version in sorted(out.items())]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print the file instead of writing it")
    args = parser.parse_args(argv)
    text = HEADER + "".join(line + "\n" for line in pins())
    if args.stdout:
        sys.stdout.write(text)
    else:
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines()) - HEADER.count(chr(10))} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
