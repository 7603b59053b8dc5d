"""Writing a run's files: atomic replacement, one-line errors for a full disk, a read-only or missing folder, a path
through a file; no temporary file left behind, and the ones a killed run left removed at the next start; one run at a
time in an output folder."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from conftest import SUBPROCESS_TIMEOUT_S, subprocess_env

from nnbackprop import files
from nnbackprop.files import (LOCK_FILE, OutputLockedError, WriteError, atomic_write, lock_output_dir,
                              prepare_output_dir, remove_stale_temp_files, write_text)


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


# ------------------------------------------------------------------------------------------------------ the lock


def test_a_held_output_folder_is_refused_naming_the_holder(tmp_path):
    with lock_output_dir(tmp_path / "run") as lock:
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(OutputLockedError) as info:
            with lock_output_dir(tmp_path / "run"):
                pass
        assert str(info.value) == (f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()}), which writes "
                                   "its results there; wait for it to end, or write elsewhere (--out)")
        assert lock.exists()
    assert not lock.exists()
    with lock_output_dir(tmp_path / "run"):  # released: free again
        pass


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead.pid}\n")
    with lock_output_dir(tmp_path) as lock:
        assert lock.read_text() == f"{os.getpid()}\n"


def test_train_refuses_a_folder_another_run_writes_to(tmp_path):
    """Two --overwrite runs, or a --resume while the first runs, both ended well and one run's results vanished."""
    from nnbackprop import TrainConfig, train

    (tmp_path / "checkpoint.pt").write_bytes(b"the first run's")
    with lock_output_dir(tmp_path):
        for options in (dict(overwrite=True), dict(resume=True)):
            with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
                train(TrainConfig(dataset="nowhere-to-be-read", device="cpu"), out_dir=tmp_path, **options)
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"the first run's"


def test_a_second_trainer_on_the_same_folder_is_refused_and_the_first_goes_on(tmp_path):
    """``nnbackprop train`` twice on one --out: the second (--overwrite, --resume) stops in one line naming the first
    one's pid; the first one's checkpoint is untouched."""
    from datagen import write_fake_mnist

    from nnbackprop.checkpoint import load_checkpoint

    write_fake_mnist(tmp_path / "data", n_train=200, n_test=20)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "nnbackprop", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"),
               "--val-size", "20", "--hidden", "8", "--batch-size", "20", "--device", "cpu", "--quiet", "--out",
               str(out)]
    env = {**subprocess_env(), "NNBACKPROP_DATA": str(tmp_path / "cache")}
    first = subprocess.Popen([*command, "--epochs", "100000", "--schedule", "constant"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not (out / "checkpoint.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and (out / "checkpoint.pt").exists(), first.stderr.read() if first.stderr else ""
        for option in ("--overwrite", "--resume"):
            second = subprocess.run([*command, option], env=env, capture_output=True, text=True,
                                    timeout=SUBPROCESS_TIMEOUT_S)
            assert second.returncode == 2 and second.stdout == ""
            assert second.stderr == (f"nnbackprop: error: {out} is in use by another run (pid {first.pid}), which "
                                     "writes its results there; wait for it to end, or write elsewhere (--out)\n")
        assert first.poll() is None
        assert load_checkpoint(out)["config"]["epochs"] == 100000
    finally:
        first.kill()
        first.wait()
