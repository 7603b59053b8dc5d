"""Repeats and sweeps: one training run per seed and per point of a grid of settings, each in a folder of its own.

::

    nnbackprop train --dataset fashion-mnist --seeds 0,1,2 --out runs/fm      # runs/fm/seed=0, seed=1, seed=2
    nnbackprop train --sweep grid.toml --seeds 0,1 --out runs/sweep           # every point of the grid, twice

A grid file is TOML naming settings — any of ``nnbackprop train``'s, as ``--config`` takes them — each with the list of
values it takes; every combination is a run (times every seed)::

    lr = [0.01, 0.05]
    hidden = [[256], [512, 512]]

A run is named by what it sets (``hidden=256_lr=0.01_seed=0``). Runs go one after the other (on one device they would
only slow each other down). A run whose ``summary.json`` exists is done and skipped, one with a checkpoint and no
summary is resumed, so the same command continues a sweep that was stopped. ``nnbackprop compare`` reads the results
(:mod:`nnbackprop.compare`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nnbackprop.callbacks import TrainCallback, TrainResult
from nnbackprop.config import TrainConfig, load_toml
from nnbackprop.errors import ConfigError, NNBackpropError, one_line

MAX_RUNS = 1000
"""The most runs one sweep may plan."""


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its folder's ``name``, its ``config`` and the settings it ``changes`` from the base."""

    name: str
    config: TrainConfig
    changes: dict[str, Any]


@dataclass(frozen=True)
class Finished:
    """How a planned run ended: ``how`` is ``trained``, ``resumed``, ``done before`` (skipped) or ``failed``;
    ``result`` its :class:`~nnbackprop.callbacks.TrainResult` (``None`` unless trained or resumed), ``error`` the
    one-line reason of a failure."""

    run: PlannedRun
    how: str
    result: TrainResult | None = None
    error: str | None = None


def load_grid(path: str | Path) -> dict[str, list[Any]]:
    """The grid of a TOML file: each setting with the non-empty list of values it takes (each value checked as the
    setting checks it).

    Raises:
        ConfigError: the file cannot be read, a name is not a setting, a value is not a list or does not fit its
            setting; the message names the file.
    """
    values = load_toml(path)
    grid: dict[str, list[Any]] = {}
    for name, choices in values.items():
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"grid file {path}: {name} must be a non-empty list of the values to try, e.g. "
                              f"{name} = [..., ...], got {choices!r}")
        for value in choices:
            TrainConfig.from_mapping({name: value}, source=f"grid file {path}")
        grid[name] = choices
    return grid


def _label(value: Any) -> str:
    text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text)


def plan(base: TrainConfig, grid: Mapping[str, Sequence[Any]] | None = None,
         seeds: Sequence[int] | None = None) -> list[PlannedRun]:
    """Every combination of ``grid``'s values (in the grid's order), each with every one of ``seeds`` (default: the
    base's own seed alone), as runs of ``base`` changed accordingly.

    Raises:
        ConfigError: a combination is not a valid configuration, or there are more than :data:`MAX_RUNS` runs.
    """
    grid = dict(grid or {})
    names = list(grid)
    points = list(itertools.product(*(grid[name] for name in names)))
    seeds = list(seeds) if seeds else None
    if len(points) * len(seeds or [0]) > MAX_RUNS:
        raise ConfigError(f"the sweep plans {len(points) * len(seeds or [0])} runs, more than {MAX_RUNS}; use fewer "
                          "values or seeds")
    runs = []
    for point in points:
        for seed in seeds or [None]:
            changes = dict(zip(names, point))
            if seed is not None:
                changes["seed"] = seed
            name = "_".join(f"{key}={_label(value)}" for key, value in changes.items()) or "run"
            runs.append(PlannedRun(name, TrainConfig.from_mapping(changes, base, f"sweep run {name}"), changes))
    return runs


def run_all(runs: Sequence[PlannedRun], out: str | Path, *, callback: Callable[[PlannedRun], TrainCallback | None]
            = lambda run: None, on_finished: Callable[[Finished], None] = lambda finished: None) -> list[Finished]:
    """Train ``runs`` one after the other, each in ``out/NAME``: skip one that finished before (its ``summary.json``
    exists), resume one that was stopped (a checkpoint and no summary), train the others. A run that fails (it
    diverges, say) is reported and the next one goes on. ``on_finished`` hears each as it ends."""
    from nnbackprop.training import train

    finished = []
    for run in runs:
        folder = Path(out) / run.name
        config = run.config.replace(out=str(folder))
        if (folder / "summary.json").is_file():
            outcome = Finished(run, "done before")
        else:
            resume = (folder / "checkpoint.pt").is_file()
            try:
                result = train(config, out_dir=folder, resume=resume, callback=callback(run))
                outcome = Finished(run, "resumed" if resume else "trained", result)
            except (NNBackpropError, ValueError) as error:
                outcome = Finished(run, "failed", error=one_line(error))
        finished.append(outcome)
        on_finished(outcome)
    return finished


def describe(finished: Finished) -> str:
    """The line printed as a run finishes."""
    if finished.how == "done before":
        return f"run {finished.run.name}: done before, skipped"
    if finished.how == "failed":
        return f"run {finished.run.name}: failed: {finished.error}"
    r = finished.result
    best = f"best epoch {r.best_epoch}" if r.best_epoch is not None else "last epoch"
    return (f"run {finished.run.name}: {finished.how}, test accuracy {100 * r.test_accuracy:.2f}% ({best}; "
            f"{r.wall_time:.1f} s)")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` as a list of seeds."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            seeds.extend(range(int(low), int(high) + 1) if high else [int(low)])
    except ValueError:
        raise ConfigError(f"--seeds takes seeds such as 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds takes distinct seeds >= 0, such as 0,1,2, got {text!r}")
    return seeds
