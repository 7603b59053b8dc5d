"""Atomic file writes, and checkpoints: the whole state of a training run in one file, read back with clear errors.

A file is written to a temporary name in its destination directory, flushed and ``fsync``-ed, then renamed over the
destination with ``os.replace``: a reader (or a run resumed after a crash) sees the old file or the new one, never half
of one.

A checkpoint is a ``dict`` saved with ``torch.save`` and read with ``torch.load(weights_only=True)``, so it holds only
tensors, numbers, strings and containers of them, and loading it never runs code from the file. Its keys
(:data:`CHECKPOINT_KEYS`): ``config`` (the run's settings), ``data`` (what the model was trained on), ``epoch`` (epochs
finished), ``model`` and ``best_model`` (state dicts: current weights, lowest-validation-loss weights), ``optimizer``,
``scheduler``, ``early_stopping``, ``rng`` (random generator states), ``history`` (per-epoch metrics) and ``run``
(device and elapsed time), plus ``format`` and ``version``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import torch

FORMAT = "nnbackprop-checkpoint"
VERSION = 1
CHECKPOINT_KEYS = ("config", "data", "epoch", "model", "best_model", "optimizer", "scheduler", "early_stopping", "rng",
                   "history", "run")


class CheckpointError(ValueError):
    """A checkpoint is unreadable, not a checkpoint, or does not match the run; the message names the file."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes into a binary file object, atomically.

    If ``write`` raises, ``path`` keeps its previous content (if any), the temporary file is removed and the error
    propagates.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(error: Exception) -> str:
    """The first sentence of the informative part of a ``torch.load`` error, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    detail = (unpickler.group(1) if unpickler else text).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> None:
    """Write ``checkpoint`` (a dict with the keys :data:`CHECKPOINT_KEYS`) to ``path`` atomically."""
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"save_checkpoint: the checkpoint lacks {missing}")
    atomic_write(path, lambda file: torch.save({"format": FORMAT, "version": VERSION, **checkpoint}, file))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with every tensor on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or corrupt, holds something other than an nnbackprop checkpoint, or was
            written by an incompatible version; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found" + ("" if path.parent.is_dir() else
                                                                   f" (no directory {path.parent})"))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncation, garbage and forbidden pickles surface as many exception types
        raise CheckpointError(f"{path}: cannot read this checkpoint ({_reason(error)}); the file is "
                              "truncated, corrupt or not a checkpoint. Use another one, or start a new run") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nnbackprop checkpoint (it holds a {type(checkpoint).__name__} without "
                              f"format={FORMAT!r}); pass a checkpoint.pt written by nnbackprop train")
    if checkpoint.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {checkpoint.get('version')!r}, this nnbackprop reads "
                              f"version {VERSION}")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return checkpoint
