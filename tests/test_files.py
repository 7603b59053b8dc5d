"""Writing a run's files: atomic replacement, one-line errors for a full disk, a read-only or missing folder, a path
through a file; no temporary file left behind, and the ones a killed run left removed at the next start."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from nnbackprop import files
from nnbackprop.files import WriteError, atomic_write, prepare_output_dir, remove_stale_temp_files, write_text


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@contextlib.contextmanager
def small_file_system(tmp_path: Path, size: str = "64k", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` (or read-only) mounted in ``tmp_path``; skips the test where it cannot be mounted."""
    mount_point = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({result.stderr.decode().strip() or 'not permitted'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(path, lambda f: f.write(b"first"))
    atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second"
    assert _temp_files(tmp_path) == []


def test_an_error_inside_the_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old")

    def fail_half_way(file):
        file.write(b"half of the new con")
        raise KeyError("a bug in the writer")

    with pytest.raises(KeyError):
        atomic_write(path, fail_half_way)
    assert path.read_bytes() == b"old" and _temp_files(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device (ENOSPC); free some space"),
                                         (errno.EROFS, "Read-only file system (EROFS)"),
                                         (errno.EACCES, "Permission denied (EACCES)")])
def test_file_system_errors_are_one_line_naming_file_and_cause(tmp_path, code, words):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")

    def fail(file):
        file.write(b"new")
        raise OSError(code, os.strerror(code))

    with pytest.raises(WriteError) as info:
        atomic_write(path, fail)
    message = str(info.value)
    assert message.startswith(f"cannot write {path}: ") and words in message and "\n" not in message
    assert path.read_text() == "old\n" and _temp_files(tmp_path) == []


def test_torch_save_failures_count_as_write_errors(tmp_path):
    def fail(file):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")

    with pytest.raises(WriteError, match="cannot write"):
        atomic_write(tmp_path / "checkpoint.pt", fail)


def test_a_full_disk_keeps_the_previous_file(tmp_path):
    with small_file_system(tmp_path, "64k") as fs:
        path = fs / "data.bin"
        atomic_write(path, lambda f: f.write(b"x" * 1000))
        with pytest.raises(WriteError, match=r"data.bin: No space left on device \(ENOSPC\)"):
            atomic_write(path, lambda f: f.write(b"y" * 200_000))
        assert path.read_bytes() == b"x" * 1000 and _temp_files(fs) == []


def test_output_folder_is_checked_before_anything_runs(tmp_path):
    assert prepare_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WriteError, match=r"cannot write to the output folder .*file/run: .*\(ENOTDIR\)"):
        prepare_output_dir(blocker / "run")
    with small_file_system(tmp_path, read_only=True) as fs:
        with pytest.raises(WriteError, match=r"output folder .*: Read-only file system \(EROFS\)"):
            prepare_output_dir(fs)


def test_output_folder_permission_denied(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(WriteError, match=r"output folder .*: Permission denied \(EACCES\); no permission"):
        prepare_output_dir(tmp_path)


def test_stale_temporary_files_are_removed(tmp_path):
    write_text(tmp_path / "metrics.jsonl", "{}\n")
    stale = [tmp_path / ".checkpoint.pt.abc123.tmp", tmp_path / ".metrics.jsonl.x.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    keep = tmp_path / ".other.tmp"
    keep.write_bytes(b"not ours")
    assert sorted(remove_stale_temp_files(tmp_path, ("checkpoint.pt", "metrics.jsonl"))) == sorted(stale)
    assert _temp_files(tmp_path) == [".other.tmp"]
