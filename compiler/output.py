"""Write generated files safely: atomically, never over existing files without --force."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mixspec.errors import MixspecError


class OutputError(MixspecError):
    """The output directory cannot take the generated files."""


def write_files(out_dir: Path, files: dict[str, str], force: bool = False,
                dry_run: bool = False) -> list[str]:
    """Write every file or none: all checks happen before the first write. Returns a report."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"error: output {out_dir} exists and is not a directory")
    plans = []
    clashes = []
    for name in sorted(files):
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise OutputError(f"internal error: generated file name {name!r} leaves the output dir")
        dest = out_dir / rel
        if dest.exists() and not force:
            clashes.append(str(dest))
        plans.append((dest, files[name]))
    if clashes:
        raise OutputError("error: would overwrite existing files: " + ", ".join(clashes)
                          + "\n  hint: pass --force to overwrite, or choose another --out directory")
    if dry_run:
        return [f"would write {dest} ({len(text.encode())} bytes)" for dest, text in plans]
    report = []
    temps: list[tuple[str, Path]] = []
    try:
        for dest, text in plans:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
            mode = 0o755 if dest.suffix == ".sh" or text.startswith("#!") else 0o644
            os.chmod(tmp, mode)
            temps.append((tmp, dest))
        for tmp, dest in temps:
            os.replace(tmp, dest)
            report.append(f"wrote {dest}")
    except OSError as exc:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise OutputError(f"error: cannot write to {out_dir}: {exc.strerror or exc}") from None
    return report
