"""Early stopping: which epoch's weights a run keeps, and when it stops trying to beat them."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from torch import Tensor


class EarlyStopping:
    """Keeps the weights of the epoch with the best validation result, and says when to stop.

    Args:
        patience: stop once the validation result has not improved for ``patience`` epochs in a row (``None``: never).
        monitor: ``"val_loss"`` (lower is better) or ``"val_accuracy"`` (higher is better).

    Attributes:
        best_score, best_epoch, best_state: the best result so far signed so that lower is better (the loss, or minus
            the accuracy), its epoch and a copy of the model's weights then (``inf``, ``None``, ``None`` before the
            first epoch).
        bad_epochs: epochs since ``best_epoch``.
    """

    def __init__(self, patience: int | None = None, monitor: str = "val_loss") -> None:
        if monitor not in ("val_loss", "val_accuracy"):
            raise ValueError(f"EarlyStopping: monitor must be 'val_loss' or 'val_accuracy', got {monitor!r}")
        self.patience, self.monitor = patience, monitor
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, val_loss: float, val_accuracy: float,
               weights: Callable[[], dict[str, Tensor]]) -> bool:
        """Record epoch ``epoch``'s validation result; on a new best keep ``weights()`` (a copy of the model's state)
        and return ``True``."""
        score = val_loss if self.monitor == "val_loss" else -val_accuracy
        if score < self.best_score:
            self.best_score, self.best_epoch, self.best_state, self.bad_epochs = score, epoch, weights(), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights (which a checkpoint keeps as ``best_model``)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any], best_state: dict[str, Tensor] | None) -> None:
        self.best_score = state["best_score"] if "best_score" in state else state["best_loss"]  # earlier checkpoints
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]
        self.best_state = best_state
