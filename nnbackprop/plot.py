"""Training curves as PNG files, with matplotlib (the optional extra ``plot``), imported only when a plot is drawn."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

from nnbackprop.files import atomic_write
from nnbackprop.metrics import EpochMetrics

INSTALL_HINT = "pip install 'nnbackprop[plot]' (or pip install matplotlib)"


def require_matplotlib() -> None:
    """Raise ``ModuleNotFoundError`` with the install command unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ModuleNotFoundError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from error


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, title: str,
                xlabel: str, ylabel: str, logy: bool = False) -> Path:
    """One line per entry of ``curves`` (``label -> (xs, ys)``) on one set of axes, saved as a PNG at ``path``."""
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))
    return path


def plot_history(history: Sequence[EpochMetrics], out_dir: str | Path) -> list[Path]:
    """``loss.png`` and ``accuracy.png`` in ``out_dir``: training and validation curves against the epoch."""
    epochs = [m.epoch for m in history]
    with_val = [m for m in history if m.val_loss is not None]

    def curves(train_key: str, val_key: str, scale: float) -> dict[str, Any]:
        lines = {"train": (epochs, [scale * getattr(m, train_key) for m in history])}
        if with_val:
            lines["validation"] = ([m.epoch for m in with_val], [scale * getattr(m, val_key) for m in with_val])
        return lines

    out = Path(out_dir)
    return [
        plot_curves(curves("train_loss", "val_loss", 1.0), out / "loss.png", title="Loss", xlabel="epoch",
                    ylabel="mean loss"),
        plot_curves(curves("train_accuracy", "val_accuracy", 100.0), out / "accuracy.png", title="Accuracy",
                    xlabel="epoch", ylabel="accuracy (%)"),
    ]
