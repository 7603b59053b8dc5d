"""Using a trained model: rebuild it from its checkpoint, and evaluate it.

:func:`load_model` rebuilds the model a checkpoint describes — the MLP of its settings, or a user's model from the
``PATH.py:FUNCTION`` it records — with the best weights, in evaluation mode. :func:`evaluate_checkpoint` measures it on
the test split of the data set it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nnbackprop.checkpoint import CheckpointError, load_checkpoint, load_into, resolve_checkpoint, saved_config
from nnbackprop.datasets import load_dataset
from nnbackprop.distributed import resolve_device
from nnbackprop.loaders import make_loader
from nnbackprop.losses import Loss
from nnbackprop.metrics import EpochMetrics, write_metrics
from nnbackprop.module import Module
from nnbackprop.training import DTYPES, EVAL_BATCH_SIZE, build_loss, build_model, evaluate


def load_model(path: str | Path, device: torch.device | str = "cpu",
               model: str | None = None) -> tuple[Module, Loss, dict[str, Any]]:
    """Rebuild the model of a checkpoint (or run folder) with its best weights (its last ones if it has no best), in
    eval mode.

    Args:
        model: ``PATH.py:FUNCTION`` to build the model with, instead of what the checkpoint records (e.g. when the file
            has moved).

    Returns:
        ``(model, loss_fn, checkpoint)``: the loss the model was trained with, and the whole checkpoint dict.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`~nnbackprop.checkpoint.load_checkpoint`; also when the model
            cannot be rebuilt (saying what is missing) or the weights do not fit it.
    """
    path = resolve_checkpoint(path)
    checkpoint = load_checkpoint(path)
    _repair_metrics(path, checkpoint)
    config = saved_config(checkpoint, path)
    source = checkpoint["run"].get("model", {"kind": "mlp"})
    if model is not None:
        config = config.replace(model=model)
    elif source.get("kind") == "python":
        raise CheckpointError(f"{path} holds a model that was passed to nnbackprop.train() in Python, which the "
                              "checkpoint cannot rebuild: build it again and load checkpoint['model'] into it, or pass "
                              "--model PATH.py:FUNCTION")
    elif config.model is not None and not Path(config.model.rpartition(":")[0]).expanduser().is_file():
        raise CheckpointError(f"{path} was trained with the model of {config.model}, and that file is not here; pass "
                              "--model PATH.py:FUNCTION to rebuild it")
    info = checkpoint["data"]
    rebuilt = build_model(config, tuple(info["input_shape"]), len(info["classes"]), device)
    weights = checkpoint["best_model"] if checkpoint["best_model"] is not None else checkpoint["model"]
    load_into(rebuilt, weights, path, "model weights")
    return rebuilt.eval(), build_loss(config), checkpoint


def _repair_metrics(path: Path, checkpoint: dict[str, Any]) -> None:
    """Repair the run folder's ``metrics.jsonl`` from the checkpoint's history (a run killed between writing the two
    leaves the checkpoint one epoch ahead); skipped where the folder is not writable."""
    try:
        write_metrics(path.parent, [EpochMetrics(**m) for m in checkpoint["history"]])
    except OSError:
        pass


def evaluate_checkpoint(path: str | Path, *, data_dir: str | None = None, device: str = "auto",
                        batch_size: int = EVAL_BATCH_SIZE, model: str | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint's model on the test split of the data set it was trained on.

    The data set is found as in training (``data_dir`` overrides the checkpoint's) and normalised with the statistics
    saved in the checkpoint.

    Returns:
        ``{"test_loss", "test_accuracy", "num_examples", "epoch", "dataset", "source"}``.
    """
    torch_device = resolve_device(device)
    rebuilt, loss_fn, checkpoint = load_model(path, torch_device, model)
    config = saved_config(checkpoint, Path(path))
    info = checkpoint["data"]
    data = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir, False,
                        config.val_size, config.seed, config.image_size, grayscale=config.grayscale)
    if list(data.classes) != info["classes"] or list(data.input_shape) != info["input_shape"]:
        raise CheckpointError(f"{path}: trained on {info['name']} with classes {info['classes']} and input shape "
                              f"{info['input_shape']}, but {data.source} has {data.classes} and {data.input_shape}")
    loader = make_loader(data.test, batch_size, mean=info["mean"], std=info["std"], device=torch_device,
                         dtype=DTYPES[config.dtype])
    loss, accuracy = evaluate(rebuilt, loss_fn, loader)
    return {"test_loss": loss, "test_accuracy": accuracy, "num_examples": len(data.test),
            "epoch": checkpoint["epoch"], "dataset": config.dataset, "source": data.source}
