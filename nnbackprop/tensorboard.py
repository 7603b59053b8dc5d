"""TensorBoard logs of a run (the optional extra ``tensorboard``): ``tensorboard --logdir OUT/tensorboard``.

:class:`TensorBoardLogger` writes, through ``torch.utils.tensorboard.SummaryWriter``: the training and validation loss
and accuracy and the learning rate of each epoch; the per-layer diagnostics of each log interval as scalars
(:mod:`nnbackprop.diagnostics`), against the global step; and, at the end of each epoch, histograms of every
parameter, its gradient, and each layer's output and input gradient at the epoch's last recorded step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnbackprop.errors import MissingExtraError
from nnbackprop.metrics import EpochMetrics
from nnbackprop.callbacks import RunInfo, TrainCallback

INSTALL_HINT = "pip install 'nnbackprop[tensorboard]' (or pip install tensorboard)"
TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> None:
    """Raise ``ModuleNotFoundError`` with the install command unless TensorBoard's writer can be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(f"--tensorboard needs the tensorboard package, which is not installed: "
                                  f"{INSTALL_HINT}") from error


class TensorBoardLogger(TrainCallback):
    """Writes a run to ``out_dir/tensorboard`` (see the module docstring); ``wants_activations``: it asks the loop to
    keep the last recorded step's activations for the histograms."""

    wants_activations = True

    def __init__(self, out_dir: str | Path) -> None:
        require_tensorboard()
        self.log_dir = Path(out_dir) / TENSORBOARD_DIR
        self.writer: Any = None
        self.info: RunInfo | None = None
        self.steps_per_epoch = 1

    def on_train_begin(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.info, self.steps_per_epoch = info, info.steps_per_epoch
        self.writer = SummaryWriter(str(self.log_dir), purge_step=info.start_epoch * info.steps_per_epoch or None)

    def on_interval(self, record: dict[str, Any]) -> None:
        step = record["global_step"]
        for kind in ("layers", "parameters"):
            for name, statistics in record[kind].items():
                for statistic, value in statistics.items():
                    if isinstance(value, float):
                        self.writer.add_scalar(f"{kind}/{name}/{statistic}", value, step)

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        step = metrics.epoch * self.steps_per_epoch
        scalars = {"loss/train": metrics.train_loss, "accuracy/train": metrics.train_accuracy, "lr": metrics.lr,
                   "loss/val": metrics.val_loss, "accuracy/val": metrics.val_accuracy}
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        info = self.info
        for name, p in info.model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().cpu(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", p.grad.detach().cpu(), step)
        if info.diagnostics is not None:
            for name, tensor in info.diagnostics.activations.items():
                self.writer.add_histogram(f"activations/{name}", tensor, step)
            for name, tensor in info.diagnostics.gradients.items():
                self.writer.add_histogram(f"input_gradients/{name}", tensor, step)
        self.writer.flush()

    def on_train_end(self, result: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
