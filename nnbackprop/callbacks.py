"""What :func:`nnbackprop.train` tells the outside while it runs: :class:`TrainCallback` and what it hears."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from nnbackprop.config import TrainConfig
from nnbackprop.datasets import DataSplits
from nnbackprop.metrics import EpochMetrics
from nnbackprop.module import Module

if TYPE_CHECKING:
    from nnbackprop.diagnostics import Diagnostics


@dataclass(frozen=True)
class RunInfo:
    """What :meth:`TrainCallback.on_train_begin` is told about the run."""

    config: TrainConfig
    data: DataSplits
    model: Module
    num_parameters: int
    device: torch.device
    step: str
    step_reason: str | None
    steps_per_epoch: int
    start_epoch: int
    out_dir: Path | None
    diagnostics: Diagnostics | None = None


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` holds the best weights (the lowest validation loss, or the highest
    accuracy with ``monitor="val_accuracy"``; the last epoch's without a validation split); ``history`` has one
    :class:`~nnbackprop.metrics.EpochMetrics` per epoch trained, resumed runs included."""

    model: Module
    history: list[EpochMetrics]
    best_epoch: int | None
    stopped_early: bool
    test_loss: float
    test_accuracy: float
    wall_time: float
    summary: dict[str, Any] = field(repr=False)


class TrainCallback:
    """Hooks through which :func:`~nnbackprop.train` reports; each does nothing here. Subclass to print, plot or
    record.

    Attributes:
        wants_activations: ask the loop to keep a CPU copy of each layer's output and input gradient at the last
            recorded step of each interval (``info.diagnostics.activations`` and ``.gradients``), e.g. for histograms.
    """

    wants_activations = False

    def on_train_begin(self, info: RunInfo) -> None:
        """Before the first epoch (also when resuming; ``info.start_epoch`` epochs are already done)."""

    def on_epoch_begin(self, epoch: int, num_steps: int) -> None:
        """Before the ``num_steps`` steps of epoch ``epoch`` (1-based)."""

    def on_step(self, epoch: int, step: int, running_loss: float | None) -> None:
        """After each step; ``running_loss`` (the mean training loss of the epoch so far) every ``log_every`` steps
        and at the last step of the epoch, ``None`` in between."""

    def on_interval(self, record: dict[str, Any]) -> None:
        """At the end of each log interval (with diagnostics on): its per-layer record (see
        :mod:`nnbackprop.diagnostics`), as written to ``layers.jsonl``."""

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        """After an epoch's validation, once its checkpoint is written."""

    def on_train_end(self, result: TrainResult) -> None:
        """After the test evaluation."""




class Callbacks(TrainCallback):
    """Several callbacks heard in turn, as one."""

    def __init__(self, callbacks: Sequence[TrainCallback]) -> None:
        self.callbacks = list(callbacks)
        self.wants_activations = any(c.wants_activations for c in self.callbacks)

    def on_train_begin(self, info: RunInfo) -> None:
        for c in self.callbacks:
            c.on_train_begin(info)

    def on_epoch_begin(self, epoch: int, num_steps: int) -> None:
        for c in self.callbacks:
            c.on_epoch_begin(epoch, num_steps)

    def on_step(self, epoch: int, step: int, running_loss: float | None) -> None:
        for c in self.callbacks:
            c.on_step(epoch, step, running_loss)

    def on_interval(self, record: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_interval(record)

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        for c in self.callbacks:
            c.on_epoch_end(metrics)

    def on_train_end(self, result: TrainResult) -> None:
        for c in self.callbacks:
            c.on_train_end(result)
