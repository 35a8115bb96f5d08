"""Generated files are written atomically, all or nothing, and never over a file without --force.

write_files (mixspec.output) writes each file to a temporary name in its destination
directory and renames it into place; a failure at any point, simulated here, leaves the
output directory exactly as it was.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

import pytest

from hostile import FUZZ_MODEL
from mixspec import output
from mixspec.errors import Unsupported, UnsupportedError
from mixspec.output import OutputError, write_files

FILES = {
    "train.sh": "#!/usr/bin/env bash\nset -euo pipefail\necho 'hi'\n",
    "config.json": '{"a": 1}\n',
    "plugin.py": "# generated\nX = 'ü'\n",
    "sub/dir/extra.yaml": "a: 1\n",
}


def snapshot(folder: Path) -> dict:
    """Every entry under folder (dot files included): content or link target, and mode."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = (path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return out


def test_writes_every_file_with_exact_bytes_and_modes(tmp_path):
    out = tmp_path / "out"
    report = write_files(out, FILES)
    assert report == [f"wrote {out / name}" for name in sorted(FILES)]
    for name, text in FILES.items():
        assert (out / name).read_bytes() == text.encode("utf-8")
    assert stat.S_IMODE((out / "train.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644
    assert sorted(snapshot(out)) == ["config.json", "plugin.py", "sub", "sub/dir", "sub/dir/extra.yaml",
                                     "train.sh"]  # no temporaries left


def test_each_file_is_renamed_into_place_complete(tmp_path, monkeypatch):
    """Temp file, then rename: the temp sits beside its destination and is complete when renamed."""
    seen = []
    real_replace = os.replace

    def checking_replace(src, dst):
        src, dst = Path(src), Path(dst)
        assert src.parent == dst.parent and src.name.startswith(".")
        assert not dst.exists()
        seen.append((dst.name, src.read_text(encoding="utf-8")))
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", checking_replace)
    write_files(tmp_path / "out", FILES)
    assert sorted(seen) == sorted((Path(n).name, t) for n, t in FILES.items())


def test_existing_files_are_never_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.sh").write_text("mine\n")
    (out / "config.json").write_text("mine too\n")
    before = snapshot(out)
    with pytest.raises(OutputError) as info:
        write_files(out, FILES)
    message = str(info.value)
    assert f"would overwrite existing files: {out / 'config.json'}, {out / 'train.sh'}" in message
    assert "--force" in message
    assert snapshot(out) == before  # not even the files that did not clash


def test_dangling_symlink_counts_as_existing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="would overwrite"):
        write_files(out, FILES)


def test_force_overwrites_and_leaves_no_backups(tmp_path):
    out = tmp_path / "out"
    write_files(out, {name: "old\n" for name in FILES})
    write_files(out, FILES, force=True)
    assert {k: v[0] for k, v in snapshot(out).items() if len(v) == 2} == {
        name: text.encode() for name, text in FILES.items()}


def test_force_replaces_a_symlink_not_its_target(tmp_path):
    # a link planted in the output dir must not let mixspec write outside it
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(outside)
    write_files(out, FILES, force=True)
    assert outside.read_text() == "keep me\n"
    assert not (out / "config.json").is_symlink()
    assert (out / "config.json").read_text() == FILES["config.json"]


def test_dry_run_writes_nothing_and_says_what_it_would_write(tmp_path):
    out = tmp_path / "out"
    report = write_files(out, FILES, dry_run=True)
    assert not out.exists()
    assert report == [f"would write {out / name} ({len(FILES[name].encode())} bytes)" for name in sorted(FILES)]
    out.mkdir()
    (out / "train.sh").write_text("old\n")
    report = write_files(out, FILES, dry_run=True, force=True)
    assert f"would overwrite {out / 'train.sh'} ({len(FILES['train.sh'].encode())} bytes)" in report
    assert (out / "train.sh").read_text() == "old\n"
    with pytest.raises(OutputError, match="would overwrite"):
        write_files(out, FILES, dry_run=True)  # the dry run reports the clash too


def _fail_on_call(n: int, real, exc: BaseException):
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "force-over-existing"])
@pytest.mark.parametrize("where", ["create-temp", "rename"])
@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
def test_failure_mid_write_leaves_the_directory_as_it_was(tmp_path, monkeypatch, existing, where, exc):
    out = tmp_path / "out"
    if existing:
        write_files(out, {name: f"old {name}\n" for name in FILES})
    before = snapshot(out)
    if where == "create-temp":  # the third temporary file cannot be created
        monkeypatch.setattr(output.tempfile, "mkstemp", _fail_on_call(3, tempfile.mkstemp, exc))
    else:  # the third rename fails, after two files are already in place
        monkeypatch.setattr(output.os, "replace", _fail_on_call(3, os.replace, exc))
    with pytest.raises((OutputError, KeyboardInterrupt)) as info:
        write_files(out, FILES, force=existing)
    if isinstance(exc, OSError):
        assert "No space left on device" in str(info.value)
        assert "nothing was written" in str(info.value)
    monkeypatch.undo()
    assert snapshot(out) == before
    assert not out.exists() or existing


def test_directory_in_the_way(tmp_path):
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)
    before = snapshot(out)
    with pytest.raises(OutputError, match="is a directory"):
        write_files(out, FILES, force=True)
    assert snapshot(out) == before


def test_output_path_that_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        write_files(out, FILES)


@pytest.mark.parametrize("name", ["/etc/evil", "../evil", "a/../../evil", "", "nul\x00.py"])
def test_file_names_that_leave_the_output_dir_are_refused(tmp_path, name):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="leaves the output dir"):
        write_files(out, {"ok.txt": "x", name: "evil"})
    assert not out.exists()
    assert not (tmp_path / "evil").exists()


# -- through the CLI ---------------------------------------------------------------------

class _FakeTarget:
    """A target that renders two files, or fails part way through rendering."""

    name = "fake"
    fail: BaseException | None = None

    def render(self, plan, options):
        files = {"train.sh": "#!/usr/bin/env bash\necho run\n", "config.json": f'{{"model": "{plan.model}"}}\n'}
        if self.fail is not None:
            raise self.fail
        return files


@pytest.fixture
def fake_target(monkeypatch):
    import mixspec.targets as targets

    monkeypatch.setattr(targets, "available_targets", lambda: {"fake": _FakeTarget})
    _FakeTarget.fail = None
    yield _FakeTarget
    _FakeTarget.fail = None


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(f"version: 1\nmodel: {FUZZ_MODEL}\ncomponents:\n  language: {{train: lora, lr: 1.0e-4}}\n")
    return str(path)


def test_cli_compile_writes_refuses_then_forces(run_cli, tmp_path, fake_target, spec):
    out = tmp_path / "out"
    first = run_cli("compile", spec, "--target", "fake", "-o", str(out))
    assert first.exit_code == 0, first.stderr
    assert f"wrote {out / 'train.sh'}" in first.stderr
    (out / "train.sh").write_text("edited by hand\n")
    second = run_cli("compile", spec, "--target", "fake", "-o", str(out))
    assert second.exit_code == 1
    assert "would overwrite existing files" in second.stderr and "Traceback" not in second.stderr
    assert (out / "train.sh").read_text() == "edited by hand\n"
    third = run_cli("compile", spec, "--target", "fake", "-o", str(out), "--force")
    assert third.exit_code == 0, third.stderr
    assert (out / "train.sh").read_text() == "#!/usr/bin/env bash\necho run\n"


def test_cli_dry_run_writes_nothing(run_cli, tmp_path, fake_target, spec):
    out = tmp_path / "out"
    result = run_cli("compile", spec, "--target", "fake", "-o", str(out), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert not out.exists()
    assert f"would write {out / 'config.json'}" in result.stderr
    assert f"would write {out / 'train.sh'}" in result.stderr


@pytest.mark.parametrize("failure", [
    UnsupportedError("fake", [Unsupported("x", None, "everything", "it is a test")]),
    RuntimeError("internal error in a target"),
], ids=["refusal", "internal-error"])
def test_cli_error_mid_compile_leaves_no_output(run_cli, tmp_path, fake_target, failure, spec):
    out = tmp_path / "out"
    fake_target.fail = failure
    result = run_cli("compile", spec, "--target", "fake", "-o", str(out))
    assert result.exit_code == 1
    assert not out.exists()
    if isinstance(failure, UnsupportedError):
        assert "error: target fake cannot express everything: it is a test" in result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit)
    else:  # an internal error keeps its traceback (STYLE.md), and still writes nothing
        assert isinstance(result.exception, RuntimeError)
