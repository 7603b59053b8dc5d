"""What a run records per epoch: :class:`EpochMetrics`, one line of ``metrics.jsonl`` each.

The checkpoint holds the same history, and is the authority: :func:`write_metrics` rewrites ``metrics.jsonl`` from it
whenever a checkpoint is written or read back, so a run killed between the two writes is repaired at its next load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from nnbackprop.files import write_text

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class EpochMetrics:
    """One line of ``metrics.jsonl``. Accuracies are fractions in ``[0, 1]``; ``val_*`` are ``None`` without a
    validation split; ``lr`` is the learning rate of the epoch's last step; ``seconds`` covers training and
    validation, ``samples_per_s`` the training alone."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float
    samples_per_s: float

    @staticmethod
    def problem(record: Any) -> str | None:
        """What is wrong with ``record`` as the dict of an :class:`EpochMetrics` (a checkpoint's history entry)."""
        if not isinstance(record, dict):
            return f"a {type(record).__name__}, not a dict"
        names = [f.name for f in fields(EpochMetrics)]
        if sorted(record) != sorted(names):
            return f"fields {sorted(record)}, expected {names}"
        for name, value in record.items():
            optional = name.startswith("val_")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number or (optional and value is None)) or (name == "epoch" and not isinstance(value, int)):
                return f"{name} = {value!r}"
        return None


def metrics_lines(history: Sequence[EpochMetrics]) -> str:
    return "".join(json.dumps(asdict(m)) + "\n" for m in history)


def write_metrics(out_dir: str | Path, history: Sequence[EpochMetrics]) -> None:
    """Write ``out_dir/metrics.jsonl`` for ``history`` (atomically; a no-op when it already says the same)."""
    path = Path(out_dir) / METRICS_FILE
    text = metrics_lines(history)
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text)
