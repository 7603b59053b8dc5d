"""Comparing runs: the runs that differ only in their seed form a group, and each group is summed up by the mean and
standard deviation of its test accuracy, its best epoch and its time, beside the settings that tell the groups apart.

A result on 2,000 test photos moves by about a point from the seed alone: a difference between two groups means
something only when it is large against their standard deviations. ``nnbackprop compare RUN...`` prints it (``--json``,
``--plot``); it reads each run's ``summary.json`` and ``metrics.jsonl`` and writes nothing else.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from nnbackprop.config import TrainConfig
from nnbackprop.errors import ConfigError, MissingFileError

SUMMARY_FILE = "summary.json"
NOT_THE_EXPERIMENT = ("seed", "out", "data_dir", "download", "device", "log_every", "diagnostics", "tensorboard",
                      "threads")
"""Settings that do not make two runs different experiments: runs that differ only in these share a group."""


@dataclass(frozen=True)
class Run:
    """A finished run: its folder, its ``summary.json`` and its settings."""

    path: Path
    summary: dict[str, Any]
    config: TrainConfig

    @property
    def history(self) -> list[dict[str, Any]]:
        """Its ``metrics.jsonl``, one dict per epoch (empty if the file is gone)."""
        metrics = self.path / "metrics.jsonl"
        if not metrics.is_file():
            return []
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


@dataclass
class Group:
    """Runs with the same settings but for :data:`NOT_THE_EXPERIMENT`; ``settings`` are theirs."""

    settings: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    def _values(self, key: str) -> list[float]:
        return [r.summary[key] for r in self.runs if isinstance(r.summary.get(key), (int, float))]

    def mean_std(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation of a summary field over the runs (std ``None`` for one run)."""
        values = self._values(key)
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    def to_dict(self, differing: Sequence[str]) -> dict[str, Any]:
        accuracy, accuracy_std = self.mean_std("test_accuracy")
        best, _ = self.mean_std("best_epoch")
        wall, _ = self.mean_std("wall_time_s")
        return {"runs": [str(r.path) for r in self.runs], "seeds": [r.config.seed for r in self.runs],
                "test_accuracy_mean": accuracy, "test_accuracy_std": accuracy_std, "best_epoch_mean": best,
                "wall_time_s_mean": wall, "settings": {k: self.settings[k] for k in differing}}


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The finished runs in ``paths``: each a run folder (with ``summary.json``) or a folder holding run folders at any
    depth (a sweep's ``--out``), in path order.

    Raises:
        MissingFileError: a path does not exist. ConfigError: a path holds no finished run, or a summary is unreadable.
    """
    runs: list[Run] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise MissingFileError(f"{path} does not exist; pass run folders (each with a summary.json) or the "
                                   "folder of a sweep")
        summaries = [path / SUMMARY_FILE] if (path / SUMMARY_FILE).is_file() else sorted(path.rglob(SUMMARY_FILE))
        if not summaries:
            raise ConfigError(f"{path} holds no finished run (no {SUMMARY_FILE}); a run writes it when it ends")
        for file in summaries:
            try:
                summary = json.loads(file.read_text())
                config = TrainConfig.from_mapping(summary["config"], source=str(file))
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"{file}: not a run's summary ({error})") from None
            runs.append(Run(file.parent, summary, config))
    return runs


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """The runs grouped by their settings but for :data:`NOT_THE_EXPERIMENT`, in the order first met."""
    groups: dict[str, Group] = {}
    for run in runs:
        settings = {k: v for k, v in run.config.to_dict().items() if k not in NOT_THE_EXPERIMENT}
        key = json.dumps(settings, sort_keys=True)
        groups.setdefault(key, Group(settings)).runs.append(run)
    return list(groups.values())


def differing_settings(groups: Sequence[Group]) -> list[str]:
    """The settings whose values are not the same in every group, in the settings' order."""
    if len(groups) < 2:
        return []
    names = list(groups[0].settings)
    return [name for name in names if len({json.dumps(g.settings.get(name)) for g in groups}) > 1]


def comparison_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """A table row per group: its number, runs, test accuracy mean ± std (percent), best epoch, epochs, wall time, and
    the settings that differ between groups."""
    differing = differing_settings(groups)
    rows = []
    for i, group in enumerate(groups, start=1):
        accuracy, std = group.mean_std("test_accuracy")
        best, _ = group.mean_std("best_epoch")
        epochs, _ = group.mean_std("epochs_trained")
        wall, _ = group.mean_std("wall_time_s")
        row: dict[str, Any] = {
            "group": i, "runs": len(group.runs),
            "test acc %": "-" if accuracy is None else f"{100 * accuracy:.2f}" + (
                "" if std is None else f" ± {100 * std:.2f}"),
            "best epoch": "-" if best is None else f"{best:.1f}", "epochs": "-" if epochs is None else f"{epochs:g}",
            "wall s": "-" if wall is None else f"{wall:.1f}"}
        for name in differing:
            value = group.settings[name]
            row[name] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        rows.append(row)
    return rows


def to_json(groups: Sequence[Group]) -> dict[str, Any]:
    """The comparison as one JSON-ready document."""
    differing = differing_settings(groups)
    return {"differing_settings": differing, "groups": [g.to_dict(differing) for g in groups]}

