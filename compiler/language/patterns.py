"""User-supplied module patterns: RE2 (linear time, so no pattern can hang mixspec)."""

from __future__ import annotations

import functools

from ..errors import quoted

MAX_PATTERN_LEN = 2000
MAX_BLOCK_INDEX = 100_000


class PatternError(ValueError):
    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str):
    """Compile a pattern with RE2; full-match semantics are applied by callers."""
    import re2

    if len(pattern) > MAX_PATTERN_LEN:
        raise PatternError(f"pattern is {len(pattern)} characters, more than {MAX_PATTERN_LEN}")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 8 << 20
    try:
        return re2.compile(pattern, options)
    except Exception as exc:  # re2 raises its own error type, with bytes messages
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        hint = "patterns use RE2 syntax (no lookaround or backreferences), e.g. 'model\\.visual\\.blocks\\.(2[4-9]|3[01])'"
        raise PatternError(f"invalid regex {quoted(pattern[:80])}: {detail}", hint) from None


def parse_layers(text: str) -> tuple[int, ...]:
    """Parse "20-27", "0,2,4-6" into sorted unique block indices."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in layer list {text!r}")
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(f"{part!r} is not a block index or range") from None
        if a < 0 or b < a:
            raise ValueError(f"range {part!r} must be ascending and non-negative")
        if b - a > MAX_BLOCK_INDEX or b > MAX_BLOCK_INDEX:
            raise ValueError(f"range {part!r} is too large (block indices go up to {MAX_BLOCK_INDEX})")
        ranges.append((a, b))
    # merge first, expand once: thousands of overlapping wide ranges stay cheap
    out: list[int] = []
    for a, b in sorted(ranges):
        start = max(a, out[-1] + 1) if out else a
        out.extend(range(start, b + 1))
    return tuple(out)
