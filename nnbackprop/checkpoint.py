"""Checkpoints: the whole state of a training run in one file, written atomically, read back verified.

A checkpoint is a dict (:data:`CHECKPOINT_KEYS`): ``config`` (the run's settings), ``data`` (what the model was trained
on: classes, input shape, normalisation), ``epoch`` (epochs finished), ``model`` and ``best_model`` (state dicts:
current weights, lowest-validation-loss weights), ``optimizer`` and ``scheduler`` (torch's state dicts),
``early_stopping``, ``rng`` (random generator states), ``history`` (per-epoch metrics) and ``run`` (device, ranks,
threads, elapsed time, where the model came from).

On disk it is ``torch.save`` of ``{format, version, sha256, payload}``, the payload being the dict serialised by
``torch.save``, and the SHA-256 of those bytes. :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``
(so a file never runs code), recomputes the hash (so a flipped byte anywhere in the weights is caught, not trained on)
and checks the structure (so a field of the wrong type is a one-line error, not a traceback later). Every failure is a
:class:`CheckpointError` naming the file. The hash is a checksum, not a signature: a checkpoint is data, never code
(see :mod:`nnbackprop.user_model`), and every part of it is checked again when a run resumes from it.

How a run becomes a checkpoint and back lives here too, beside :data:`CHECKPOINT_KEYS`: :func:`make_checkpoint`
assembles one, :func:`checkpoint_to_resume` and :func:`check_same_run` decide whether a run may continue it, and
:func:`restore` puts it back into the run's objects.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from nnbackprop.config import TrainConfig
from nnbackprop.errors import CheckpointError, MissingFileError
from nnbackprop.files import atomic_write
from nnbackprop.metrics import EpochMetrics
from nnbackprop.module import Module
from nnbackprop.user_model import split_spec

FORMAT = "nnbackprop-checkpoint"
VERSION = 2
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_KEYS = ("config", "data", "epoch", "model", "best_model", "optimizer", "scheduler", "early_stopping", "rng",
                   "history", "run")


def resolve_checkpoint(path: str | Path) -> Path:
    """``path``, or ``path/checkpoint.pt`` for a run folder. Raises ``FileNotFoundError`` saying what is missing."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT_FILE).is_file():
            return path / CHECKPOINT_FILE
        raise MissingFileError(f"{path} is a folder without a {CHECKPOINT_FILE}; pass a run folder or its checkpoint")
    if not path.is_file():
        where = "" if path.parent.is_dir() else f" (no folder {path.parent})"
        raise MissingFileError(f"checkpoint {path} not found{where}")
    return path


def save_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> None:
    """Write ``checkpoint`` (a dict with the keys :data:`CHECKPOINT_KEYS`) to ``path`` atomically, with its hash.

    Raises:
        ValueError: keys are missing. :class:`~nnbackprop.files.WriteError`: the file could not be written (the
            previous checkpoint is intact).
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"save_checkpoint: the checkpoint lacks {missing}")
    buffer = io.BytesIO()
    torch.save(dict(checkpoint), buffer)
    payload = buffer.getbuffer()
    record = {"format": FORMAT, "version": VERSION, "sha256": hashlib.sha256(payload).hexdigest(),
              "payload": torch.frombuffer(payload, dtype=torch.uint8)}
    serialised = io.BytesIO()  # in memory first: a failing file write then raises its OSError (ENOSPC, EIO, ...)
    torch.save(record, serialised)
    atomic_write(path, lambda file: file.write(serialised.getbuffer()))


def _reason(error: Exception) -> str:
    """The first sentence of the informative part of a ``torch.load`` error, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    detail = (unpickler.group(1) if unpickler else text).strip().split("\n")[0].split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


def _read(source: Any, path: Path) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # truncation, garbage and forbidden pickles surface as many exception types
        raise CheckpointError(f"{path}: cannot read this checkpoint ({_reason(error)}); the file is truncated, corrupt "
                              "or not a checkpoint. Use another one, or start a new run") from error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint` (or the run folder holding it), with every
    tensor on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or corrupt (its hash does not match), holds something other than an
            nnbackprop checkpoint, was written by an incompatible version, or has a field of the wrong type or shape.
    """
    path = resolve_checkpoint(path)
    record = _read(path, path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an nnbackprop checkpoint (it holds a {type(record).__name__} without "
                              f"format={FORMAT!r}); pass a checkpoint.pt written by nnbackprop train")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {record.get('version')!r}; this nnbackprop reads "
                              f"version {VERSION} (train again to get one)")
    payload, digest = record.get("payload"), record.get("sha256")
    if not isinstance(payload, Tensor) or payload.dtype != torch.uint8 or not isinstance(digest, str):
        raise CheckpointError(f"{path}: damaged checkpoint (no payload or hash); use another one, or start a new run")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path}: the checkpoint is corrupt (its SHA-256 does not match the one stored at "
                              "writing); it was damaged on disk or in a copy. Use another one, or start a new run")
    checkpoint = _read(io.BytesIO(data), path)
    problem = _structure_problem(checkpoint)
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
    return checkpoint


# ---------------------------------------------------------------------------------------------------------- structure


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _byte_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())


_SHAPES: dict[str, tuple[type | tuple[type, ...], Any]] = {
    "config": (dict, None),
    "data": (dict, lambda d: (isinstance(d.get("classes"), list) and all(isinstance(c, str) for c in d["classes"])
                              and isinstance(d.get("input_shape"), list) and len(d["input_shape"]) == 3
                              and all(_is_int(s) and s > 0 for s in d["input_shape"])
                              and all(isinstance(d.get(k), list) and len(d[k]) == d["input_shape"][0]
                                      and all(_is_number(v) for v in d[k]) for k in ("mean", "std"))
                              and isinstance(d.get("name"), str))),
    "epoch": (int, lambda e: _is_int(e) and e >= 0),
    "model": (dict, _tensor_dict),
    "best_model": ((dict, type(None)), lambda m: m is None or _tensor_dict(m)),
    "optimizer": (dict, lambda o: isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)),
    "scheduler": (dict, None),
    "early_stopping": (dict, lambda e: _is_number(e.get("best_score", e.get("best_loss")))
                       and not math.isnan(e.get("best_score", e.get("best_loss")))
                       and _is_int(e.get("bad_epochs")) and e["bad_epochs"] >= 0
                       and (e.get("best_epoch") is None or _is_int(e.get("best_epoch")))),
    "rng": (dict, lambda r: _byte_tensor(r.get("torch")) and isinstance(r.get("generators"), list)
            and all(_byte_tensor(g) for g in r["generators"])
            and (r.get("cuda", None) is None or (isinstance(r["cuda"], list)
                                                 and all(_byte_tensor(g) for g in r["cuda"])))),
    "history": (list, None),
    "run": (dict, lambda r: isinstance(r.get("device"), str) and _is_int(r.get("world_size"))
            and _is_number(r.get("elapsed_s"))),
}


def _structure_problem(checkpoint: Any) -> str | None:
    """What is wrong with the structure of a loaded checkpoint, or ``None``."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict"
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing:
        return f"fields {', '.join(missing)} are missing"
    for key, (kind, check) in _SHAPES.items():
        value = checkpoint[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (check is not None and not check(value)):
            shown = type(value).__name__ if not isinstance(value, (int, float, str, type(None))) else repr(value)
            return f"its {key} is malformed ({shown})"
    for i, entry in enumerate(checkpoint["history"]):
        problem = EpochMetrics.problem(entry)
        if problem:
            return f"history entry {i + 1} is malformed: {problem}"
    if len(checkpoint["history"]) != checkpoint["epoch"]:
        return f"its history has {len(checkpoint['history'])} epochs but it claims {checkpoint['epoch']}"
    return None


def saved_config(checkpoint: Mapping[str, Any], path: Path) -> TrainConfig:
    """The :class:`~nnbackprop.config.TrainConfig` a checkpoint was written with."""
    try:
        return TrainConfig.from_mapping(checkpoint["config"], source=f"{path}: its configuration")
    except ValueError as error:
        raise CheckpointError(f"{error} (written by another version of nnbackprop?)") from error


def load_into(target: Any, state: Any, path: Path, what: str) -> None:
    """``target.load_state_dict(state)``, its failures reported as the checkpoint's."""
    try:
        target.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: its {what} do not fit this run ({detail})") from error


def _same_shape(value: Any, reference: Any, where: str) -> str | None:
    """Where ``value`` (from a checkpoint) is not built like ``reference`` (what this run's object writes): other
    keys, lengths or kinds of value; ``None`` when it is."""
    if isinstance(reference, dict):
        if not isinstance(value, dict) or set(value) != set(reference):
            return where
        return next((p for k in reference if (p := _same_shape(value[k], reference[k], f"{where}.{k}"))), None)
    if isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            return where
        return next((p for i, (v, r) in enumerate(zip(value, reference)) if (p := _same_shape(v, r, f"{where}[{i}]"))),
                    None)
    if isinstance(reference, bool) or reference is None or isinstance(reference, str):
        return None if type(value) is type(reference) else where
    if _is_number(reference):
        return None if _is_number(value) and math.isfinite(value) else where
    return None


# ---------------------------------------------------------------------------------------------------- a run's state


def model_source(config: TrainConfig, passed: Module | None) -> dict[str, Any]:
    """Where the model came from, for the checkpoint and the summary: the MLP of the settings, ``config.model``
    (``PATH.py:FUNCTION``, which rebuilding takes from the user again), or a model passed to ``train()`` (only its
    structure is recorded: the checkpoint alone cannot rebuild it)."""
    if passed is not None:
        return {"kind": "python", "repr": repr(passed)}
    if config.model is not None:
        return {"kind": "file", "spec": config.model, "path": str(split_spec(config.model)[0].resolve())}
    return {"kind": "mlp"}


def make_checkpoint(*, config: TrainConfig, data: Mapping[str, Any], model: Mapping[str, Tensor],
                    best_model: Mapping[str, Tensor] | None, optimizer: torch.optim.Optimizer, scheduler: Any,
                    early_stopping: Any, generators: list[Tensor], history: list[EpochMetrics],
                    run: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint after ``len(history)`` epochs (the keys :data:`CHECKPOINT_KEYS`). The shuffling needs no state:
    epoch ``e``'s order is drawn from ``config.seed`` and ``e``. ``generators`` holds each rank's
    dropout/augmentation generator state, by rank; ``run`` what :func:`checkpoint_to_resume` checks (``device``,
    ``world_size``), ``elapsed_s`` and facts for the reader."""
    return {
        "config": config.to_dict(),
        "data": dict(data),
        "epoch": len(history),
        "model": dict(model),
        "best_model": None if best_model is None else dict(best_model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "early_stopping": early_stopping.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                "generators": generators},
        "history": [asdict(m) for m in history],
        "run": {"torch": str(torch.__version__), "threads": torch.get_num_threads(), **run},
    }


def checkpoint_to_resume(path: Path | None, device: torch.device, world_size: int) -> dict[str, Any]:
    """The checkpoint in ``path``, after checking that this device and number of ranks may continue it."""
    if path is None:
        raise CheckpointError("resume needs an output folder (--out), the folder of the run to continue")
    if not path.exists():
        raise MissingFileError(f"{path} not found: there is no run to resume in {path.parent}; start one without "
                               "--resume")
    checkpoint = load_checkpoint(path)
    run = checkpoint["run"]
    if run["device"] != device.type:
        raise CheckpointError(f"{path} was written on {run['device']}; resume it on the same kind of device "
                              f"(--device {run['device']}), not {device.type}")
    if run["world_size"] != world_size:
        raise CheckpointError(f"{path} was written by {run['world_size']} process(es); resume it with as many "
                              f"(torchrun --nproc_per_node={run['world_size']}), not {world_size}")
    return checkpoint


def check_same_run(checkpoint: Mapping[str, Any], path: Path, config: TrainConfig, data: Mapping[str, Any]) -> None:
    """Refuse to continue ``checkpoint`` with other settings (but those :meth:`TrainConfig.resumable` lists) or on
    other ``data`` (a data set's ``info()``)."""
    saved = saved_config(checkpoint, path)
    resumable = TrainConfig.resumable()
    differences = [f"{name} {getattr(saved, name)!r} there, {getattr(config, name)!r} here"
                   for name in config.to_dict()
                   if name not in resumable and getattr(saved, name) != getattr(config, name)]
    if differences:
        raise CheckpointError(f"{path} was written by a run with other settings: {'; '.join(differences)}. Resume with "
                              "the checkpoint's settings, or start a new run in another directory")
    if saved.epochs != config.epochs and (config.schedule == "cosine" or
                                          (config.schedule == "step" and config.step_epochs is None)):
        raise CheckpointError(f"{path}: its {config.schedule} schedule was laid out for {saved.epochs} epochs; resume "
                              f"with --epochs {saved.epochs} (only a constant schedule or a step schedule with "
                              "--step-epochs can be stretched)")
    differences = [f"{k} {checkpoint['data'].get(k)!r} there, {data[k]!r} here" for k in data
                   if k not in ("source", "statistics") and checkpoint["data"].get(k) != data[k]]
    if differences:
        raise CheckpointError(f"{path} was trained on other data: {'; '.join(differences)}")


def restore(checkpoint: Mapping[str, Any], path: Path, *, model: Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, early_stopping: Any, generator: torch.Generator, rank: int) -> tuple[list[EpochMetrics],
                                                                                                float]:
    """Put the state of ``checkpoint`` into the run's objects, each part checked against what the object itself
    writes (so a crafted checkpoint is refused in one line, not met later as a traceback). Returns the history and
    the seconds the run had taken so far."""
    load_into(model, checkpoint["model"], path, "model weights")
    load_into(optimizer, checkpoint["optimizer"], path, "optimizer state")
    where = _same_shape(checkpoint["scheduler"], scheduler.state_dict(), "scheduler")
    if where is not None:
        raise CheckpointError(f"{path}: its learning-rate schedule state is not this run's ({where} differs; written "
                              "by another torch version or damaged); start a new run")
    load_into(scheduler, checkpoint["scheduler"], path, "learning-rate schedule")
    best = checkpoint["best_model"]
    if best is not None:
        own = model.state_dict()
        if list(best) != list(own) or any(best[k].shape != own[k].shape for k in own):
            raise CheckpointError(f"{path}: its best weights do not fit the model (keys or shapes differ)")
    early_stopping.load_state_dict(checkpoint["early_stopping"], best)
    rng = checkpoint["rng"]
    try:
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        generator.set_state(rng["generators"][rank])
    except (RuntimeError, IndexError, TypeError) as error:
        raise CheckpointError(f"{path}: its random generator states do not fit this run ({error})") from error
    return [EpochMetrics(**m) for m in checkpoint["history"]], float(checkpoint["run"]["elapsed_s"])


def run_settings(out_dir: Path) -> TrainConfig:
    """The settings of the run whose checkpoint is in ``out_dir`` (what ``--resume`` continues with)."""
    path = resolve_checkpoint(out_dir)
    return saved_config(load_checkpoint(path), path)
