#!/usr/bin/env python3
"""Regenerate schemas/mixspec.schema.json from the pydantic models in mixspec.language.spec.

    python scripts/gen_schema.py          # write the file
    python scripts/gen_schema.py --check  # exit 1 if the committed file is stale

tests/language/test_schema.py fails when the committed file differs from what this writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mixspec.language.spec import json_schema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "mixspec.schema.json"


def render_schema() -> str:
    """The schema file's exact text: sorted keys, so regeneration is byte-stable."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render_schema()
    if "--check" in argv:
        current = SCHEMA_PATH.read_text(encoding="utf-8") if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale; run: python scripts/gen_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.parent.mkdir(parents=True, exist_ok=True)
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
