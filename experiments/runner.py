"""How the scripts beside this file run an experiment: train with console output, plot, tabulate.

Each script imports it as ``from runner import ...`` (Python puts a script's own folder on its path)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from nnbackprop.callbacks import TrainResult
from nnbackprop.config import TrainConfig
from nnbackprop.console import ConsoleLogger, fail, format_table, print_error
from nnbackprop.datasets import DataSplits
from nnbackprop.errors import NNBackpropError, WriteError
from nnbackprop.module import Module
from nnbackprop.plot import plot_run
from nnbackprop.training import train


def run_experiment(config: TrainConfig, out_dir: str | Path, data: DataSplits | None = None,
                   model: Module | None = None, progress: bool | None = None) -> TrainResult:
    """Train as an experiment script does: a :class:`~nnbackprop.console.ConsoleLogger` (progress bars when stderr
    is a terminal), results in ``out_dir`` (replacing an earlier run's), the curves and diagnostics plotted
    (:func:`~nnbackprop.plot.plot_run`) when matplotlib is installed. Exits with one error line when the data set is
    missing, the settings do not fit it, a file cannot be written, or the training diverges; prints one error line
    and goes on when the plots cannot be drawn (e.g. a malformed ``layers.jsonl``)."""
    logger = ConsoleLogger(progress=sys.stderr.isatty() if progress is None else progress)
    try:
        result = train(config, model, data, out_dir=out_dir, overwrite=True, callback=logger)
    except (NNBackpropError, ValueError) as error:
        fail(error)
    finally:
        logger.close()
    try:
        plot_run(result, out_dir)
    except ModuleNotFoundError:
        print("(no plots: matplotlib is not installed; pip install 'nnbackprop[plot]')")
    except (ValueError, WriteError) as error:  # the run is done and saved: say why it has no plots, and go on
        print_error(error)
    return result


def result_row(name: str, result: TrainResult) -> dict[str, Any]:
    """One row of an experiment's summary table."""
    last = result.history[-1]
    return {"run": name, "test acc %": round(100 * result.test_accuracy, 2), "test loss": result.test_loss,
            "best epoch": result.best_epoch if result.best_epoch is not None else "-", "epochs": last.epoch,
            "train loss": last.train_loss, "wall s": round(result.wall_time, 1)}


def report(name: str, result: TrainResult, out_dir: str | Path) -> None:
    """Print the experiment's summary table (one row, :func:`result_row`) and where its files are."""
    print()
    print(format_table([result_row(name, result)]))
    print(f"results in {out_dir}/")
