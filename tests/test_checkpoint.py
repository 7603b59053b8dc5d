"""Checkpoint files: round trip, and one clear error for a missing, truncated, corrupted, foreign or malformed file."""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import os

import pytest
import torch

from nnbackprop import checkpoint as ckpt
from nnbackprop import files
from nnbackprop.checkpoint import CHECKPOINT_KEYS, CheckpointError, load_checkpoint, save_checkpoint
from nnbackprop.config import TrainConfig
from nnbackprop.files import WriteError


def _checkpoint(value: float = 1.0) -> dict:
    """A small checkpoint of the right structure."""
    metrics = {"epoch": 1, "train_loss": value, "train_accuracy": 0.5, "val_loss": None, "val_accuracy": None,
               "lr": 0.1, "seconds": 1.0, "samples_per_s": 10.0}
    return {
        "config": TrainConfig().to_dict(),
        "data": {"name": "toy", "source": "here", "classes": ["a", "b"], "input_shape": [1, 2, 2], "mean": [0.5],
                 "std": [0.25], "sizes": {"train": 4, "val": 0, "test": 2}},
        "epoch": 1,
        "model": {"weight": torch.full((300, 200), value)},
        "best_model": None,
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {},
        "early_stopping": {"best_loss": float("inf"), "best_epoch": None, "bad_epochs": 0},
        "rng": {"torch": torch.get_rng_state(), "cuda": None, "generators": [torch.get_rng_state()]},
        "history": [metrics],
        "run": {"device": "cpu", "world_size": 1, "elapsed_s": 1.0},
    }


def test_round_trip(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint(2.0))
    loaded = load_checkpoint(path)
    assert sorted(loaded) == sorted(CHECKPOINT_KEYS)
    assert torch.equal(loaded["model"]["weight"], torch.full((300, 200), 2.0))
    assert loaded["history"] == _checkpoint(2.0)["history"]
    assert load_checkpoint(tmp_path)["epoch"] == 1  # the run folder names its checkpoint


def test_save_refuses_an_incomplete_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "c.pt", {"model": {}})


class _FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes free: a write past them stores what fits and fails with ENOSPC."""

    def __init__(self, file, room: int) -> None:
        super().__init__()
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self.file.write(data[:self.room])
        if len(data) > self.room:
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()
        super().close()


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills up half way through the checkpoint (torch.save's own writer then said 'enforce fail at
    inline_container.cc ... unexpected pos')."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint(1.0))
    real_fdopen = files.os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), room=100_000))
    with pytest.raises(WriteError) as info:
        save_checkpoint(path, _checkpoint(5.0))
    monkeypatch.undo()
    assert str(info.value) == (f"cannot write {path}: No space left on device (ENOSPC); free some space or write "
                               "elsewhere (--out)")
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.full((300, 200), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_missing_checkpoint_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt not found"):
        load_checkpoint(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError, match="is a folder without a checkpoint.pt"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint())
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint at all", "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="cannot read this checkpoint") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_flipped_bytes_anywhere_in_the_weights_are_caught(tmp_path, where):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _checkpoint())
    data = bytearray(path.read_bytes())
    middle = int(len(data) * where)
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|cannot read") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "payload": torch.torch_version.TorchVersion("1.0")}, path)
    with pytest.raises(CheckpointError, match="Unsupported global"):
        load_checkpoint(path)


def _write_payload(path, payload) -> None:
    """A file with a valid hash around any payload (what a bug or a hostile writer could produce)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "sha256": hashlib.sha256(data).hexdigest(),
                "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}, path)


@pytest.mark.parametrize("content, message", [
    ([1, 2, 3], "not an nnbackprop checkpoint"),
    ({"model": {}}, "not an nnbackprop checkpoint"),
    ({"format": ckpt.FORMAT, "version": 1}, "version 1; this nnbackprop reads version 2"),
    ({"format": ckpt.FORMAT, "version": ckpt.VERSION}, "damaged checkpoint"),
])
def test_foreign_files_are_refused(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def _drop(key):
    return lambda c: c.pop(key)


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@pytest.mark.parametrize("edit, message", [
    (_drop("config"), "fields config are missing"),
    (_set("data", None), "its data is malformed"),
    (_set("model", {"weight": [1.0]}), "its model is malformed"),
    (_set("epoch", "1"), "its epoch is malformed"),
    (_set("history", [{"epoch": 1}]), "history entry 1 is malformed"),
    (_set("history", []), "history has 0 epochs but it claims 1"),
    (lambda c: c["early_stopping"].pop("bad_epochs"), "its early_stopping is malformed"),
    (lambda c: c["data"].__setitem__("mean", [0.5, 0.5]), "its data is malformed"),
], ids=["no-config", "data-none", "weights-not-tensors", "epoch-text", "history-fields", "history-short",
        "early-stopping", "mean-channels"])
def test_a_malformed_structure_is_one_line(tmp_path, edit, message):
    checkpoint = copy.deepcopy(_checkpoint())
    edit(checkpoint)
    path = tmp_path / "checkpoint.pt"
    _write_payload(path, checkpoint)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------- crafted checkpoints


CRAFTED = TrainConfig(dataset="toy", hidden=(16,), dropout=0.1, epochs=2, batch_size=32, lr=0.05, schedule="cosine",
                      warmup_epochs=0.5, device="cpu", log_every=4, patience=3)


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    """The checkpoint of a real run stopped after its first epoch, to edit and write back with a valid hash."""
    from test_training import Recorder, toy_data

    from nnbackprop.training import train

    out = tmp_path_factory.mktemp("real")
    with pytest.raises(KeyboardInterrupt):
        train(CRAFTED, data=toy_data(), out_dir=out, callback=Recorder(stop_after=1))
    return load_checkpoint(out)


def _resume_crafted(tmp_path, real_checkpoint, edit):
    """Write ``real_checkpoint`` edited by ``edit`` (with its hash) into a run folder and resume it for a second
    epoch."""
    from test_training import toy_data

    from nnbackprop.training import train

    checkpoint = copy.deepcopy(real_checkpoint)
    edit(checkpoint)
    save_checkpoint(tmp_path / "checkpoint.pt", checkpoint)
    return train(CRAFTED, data=toy_data(), out_dir=tmp_path, resume=True)


def test_a_checkpoint_without_cuda_random_state_resumes(tmp_path, real_checkpoint):
    result = _resume_crafted(tmp_path, real_checkpoint, lambda c: c["rng"].pop("cuda"))
    assert [m.epoch for m in result.history] == [1, 2]


@pytest.mark.parametrize("edit, words, read", [
    (lambda c: c["early_stopping"].__setitem__("best_score", float("nan")), "its early_stopping is malformed", True),
    (lambda c: c["rng"].__setitem__("torch", c["rng"]["torch"].float()), "its rng is malformed", True),
    (lambda c: c["rng"].__setitem__("generators", [c["rng"]["generators"][0].double()]), "its rng is malformed",
     True),
    (lambda c: c.__setitem__("scheduler", {"garbage": 1}), "its learning-rate schedule state is not this run's", False),
    (lambda c: c["scheduler"].__setitem__("last_epoch", "ten"), "(scheduler.last_epoch differs", False),
    (lambda c: c["scheduler"]["_schedulers"][1].__setitem__("base_lrs", None),
     "(scheduler._schedulers[1].base_lrs differs", False),
    (lambda c: c["scheduler"].__setitem__("_schedulers", []), "(scheduler._schedulers differs", False),
], ids=["best-score-nan", "rng-float", "generator-double", "scheduler-keys", "scheduler-epoch-text",
        "scheduler-no-lrs", "scheduler-parts"])
def test_a_crafted_checkpoint_with_a_valid_hash_is_refused_in_one_line(tmp_path, real_checkpoint, edit, words, read):
    """Refused where it is met: a field of the wrong type by every reader (``load_checkpoint``: evaluate, predict
    and resume alike), a schedule state that is not this run's when the run is rebuilt to resume."""
    with pytest.raises(CheckpointError) as info:
        _resume_crafted(tmp_path, real_checkpoint, edit)
    message = str(info.value)
    assert words in message and str(tmp_path / "checkpoint.pt") in message and "\n" not in message
    if read:
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(tmp_path / "checkpoint.pt")
    else:
        load_checkpoint(tmp_path / "checkpoint.pt")
