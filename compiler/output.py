"""Write generated files safely: atomically, never over existing files without --force."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from .errors import MixspecError


class OutputError(MixspecError):
    """The output directory cannot take the generated files."""


def write_files(out_dir: Path, files: dict[str, str], force: bool = False,
                elsewhere: str = "choose another --out directory",
                dry_run: bool = False) -> list[str]:
    """Write every file or none: all checks happen before the first write. Returns a report.

    Each file is written to a temporary file in its destination directory, then renamed
    over the destination. A file replaced under ``force`` keeps a hard link until every
    rename has succeeded, so a failure at any point (disk full, a directory in the way, an
    interrupt) restores the directory as it was: old files back, new ones and temporaries
    gone, directories mixspec created removed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"error: output {out_dir} exists and is not a directory")
    plans = []
    clashes = []
    for name in sorted(files):
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts or "\x00" in name:
            raise OutputError(f"internal error: generated file name {name!r} leaves the output dir")
        dest = out_dir / rel
        if dest.is_dir():
            raise OutputError(f"error: {dest} is a directory; mixspec writes a file of that name there"
                              f"\n  hint: move it away, or {elsewhere}")
        if os.path.lexists(dest) and not force:  # lexists: a dangling symlink is there too
            clashes.append(str(dest))
        plans.append((dest, files[name]))
    if clashes:
        raise OutputError("error: would overwrite existing files: " + ", ".join(clashes)
                          + f"\n  hint: pass --force to overwrite, or {elsewhere}")
    if dry_run:
        return [f"would {'overwrite' if os.path.lexists(dest) else 'write'} {dest} ({len(text.encode())} bytes)"
                for dest, text in plans]
    created: list[Path] = []  # directories made here, removed again on failure
    temps: list[tuple[str, Path]] = []
    installed: list[tuple[Path, str | None]] = []  # (dest, hard link to the file it replaced)
    try:
        for dest, text in plans:
            _make_dirs(dest.parent, created)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            temps.append((tmp, dest))
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
            mode = 0o755 if dest.suffix == ".sh" or text.startswith("#!") else 0o644
            os.chmod(tmp, mode)
        for tmp, dest in temps:
            backup = _keep_old(dest) if os.path.lexists(dest) else None
            installed.append((dest, backup))
            os.replace(tmp, dest)
    except BaseException as exc:
        _roll_back(temps, installed, created)
        if isinstance(exc, OSError):
            raise OutputError(f"error: cannot write to {out_dir}: {exc.strerror or exc}"
                              + (f" ({exc.filename})" if exc.filename else "")
                              + "\n  nothing was written") from None
        raise
    for _, backup in installed:
        if backup:
            _unlink(backup)
    return [f"wrote {dest}" for _, dest in temps]


def _keep_old(dest: Path) -> str:
    """A second name for the file at ``dest`` (a hard link, else a copy), to restore it."""
    backup = str(dest.parent / f".{dest.name}.{secrets.token_hex(6)}.old")
    try:
        os.link(dest, backup, follow_symlinks=False)
    except OSError:
        if dest.is_symlink() or not dest.is_file():
            raise  # a directory in the way: the caller rolls back and reports it
        shutil.copy2(dest, backup)  # a filesystem without hard links
    return backup


def _make_dirs(path: Path, created: list[Path]) -> None:
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir()
        created.append(folder)


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _roll_back(temps, installed, created) -> None:
    """Undo a partial write_files, newest first; best effort, never raises."""
    for dest, backup in reversed(installed):
        try:
            if backup and os.path.lexists(dest) and os.path.samestat(os.lstat(backup), os.lstat(dest)):
                os.unlink(backup)  # the new file never got in (rename(2) of two links is a no-op)
            elif backup:
                os.replace(backup, dest)
            else:
                os.unlink(dest)  # nothing was there before
        except OSError:
            pass
    for tmp, _ in temps:
        _unlink(tmp)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass
