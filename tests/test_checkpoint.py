"""Atomic writes and checkpoint files: round trip, and clear errors for missing, truncated, garbage or foreign files."""

from __future__ import annotations

import pytest
import torch

from nnbackprop import checkpoint as ckpt
from nnbackprop.checkpoint import CHECKPOINT_KEYS, CheckpointError, atomic_write, load_checkpoint, save_checkpoint


def _checkpoint(value: float = 1.0) -> dict:
    state = {key: None for key in CHECKPOINT_KEYS}
    state.update(model={"weight": torch.full((3, 2), value)}, epoch=1, history=[{"epoch": 1, "train_loss": value}])
    return state


def _leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_creates_and_replaces(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(path, lambda f: f.write(b"first"))
    atomic_write(path, lambda f: f.write(b"second"))
    assert path.read_bytes() == b"second"
    assert _leftovers(tmp_path) == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_bytes(b"old")

    def fail_half_way(file):
        file.write(b"half of the new con")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail_half_way)
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint(2.0))
    loaded = load_checkpoint(path)
    assert loaded["format"] == ckpt.FORMAT and loaded["version"] == ckpt.VERSION
    assert torch.equal(loaded["model"]["weight"], torch.full((3, 2), 2.0))
    assert loaded["history"] == [{"epoch": 1, "train_loss": 2.0}]


def test_save_refuses_an_incomplete_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "c.pt", {"model": {}})


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint(1.0))
    real_save = torch.save

    def save_then_crash(obj, file):
        real_save(obj, file)  # a complete new checkpoint reaches the temporary file...
        file.truncate(100)  # ...then the write is cut short, as by a full disk
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", save_then_crash)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _checkpoint(5.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.full((3, 2), 1.0))
    assert _leftovers(tmp_path) == []


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt not found"):
        load_checkpoint(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint())
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint at all", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="cannot read this checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "payload": torch.torch_version.TorchVersion("1.0")}, path)
    with pytest.raises(CheckpointError, match="Unsupported global"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "not an nnbackprop checkpoint"),
    ({"model": {}}, "not an nnbackprop checkpoint"),
    ({"format": ckpt.FORMAT, "version": 99}, "version 99"),
    ({"format": ckpt.FORMAT, "version": ckpt.VERSION, "model": {}}, "incomplete checkpoint, missing config"),
])
def test_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
