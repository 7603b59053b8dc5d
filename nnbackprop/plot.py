"""Pictures of a run as PNG files, with matplotlib (the optional extra ``plot``), imported only when a plot is drawn.

Two kinds of figure:

* the training curves, from the run's history (:class:`~nnbackprop.metrics.EpochMetrics`): ``loss.png``,
  ``accuracy.png`` and ``lr.png`` (:func:`plot_history`), with integer epoch ticks, the best epoch marked and the test
  result in the title;
* the diagnostics, from the per-layer records of ``layers.jsonl`` (:func:`read_layer_records`): ``gradients.png``,
  ``update_ratio.png`` and ``saturation.png`` (:func:`plot_diagnostics`), or the same three panels for several runs
  side by side in one PNG (:func:`plot_diagnostics_grid`).

Every ``*_figure(s)`` function returns matplotlib ``Figure`` objects (no pyplot, no global state) that the ``plot_*``
functions save atomically; :func:`plot_run` draws everything a finished run has.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from nnbackprop.diagnostics import LAYERS_FILE, read_layer_records
from nnbackprop.errors import MissingExtraError
from nnbackprop.files import atomic_write
from nnbackprop.metrics import EpochMetrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from nnbackprop.callbacks import TrainResult

INSTALL_HINT = "pip install 'nnbackprop[plot]' (or pip install matplotlib)"
HEALTHY_UPDATE_RATIO = 1e-3
"""Where the update-to-value ratio of a parameter usually sits when the learning rate is about right."""

DPI = 120


def require_matplotlib() -> None:
    """Raise ``ModuleNotFoundError`` with the install command unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from error


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **subplots: Any) -> tuple[Figure, Any]:
    """A matplotlib ``Figure`` of ``width x height`` inches with constrained layout, and its ``subplots(nrows,
    ncols, **subplots)``."""
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.subplots(nrows, ncols, **subplots)


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (atomically); return the path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    path = Path(path)
    atomic_write(path, lambda file: file.write(buffer.getvalue()))
    return path


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, *, title: str,
                xlabel: str, ylabel: str, logy: bool = False) -> Path:
    """One line per entry of ``curves`` (``label -> (xs, ys)``) on one set of axes, saved as a PNG at ``path``."""
    figure, axes = new_figure(6.4, 4.2)
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, label=label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)


def _integer_ticks(axes: Axes) -> None:
    """Whole numbers only on the x axis (epochs)."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _outside_legend(axes: Axes, handles: Sequence[Any] | None = None, fontsize: float = 7) -> None:
    """The legend to the right of the axes, in columns of at most 16 entries, so that many layers stay readable."""
    handles = handles if handles is not None else axes.get_legend_handles_labels()[0]
    if handles:
        axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                    fontsize=fontsize, ncols=math.ceil(len(handles) / 16), frameon=False)


def _depth_colors(n: int) -> list[Any]:
    """``n`` colours from dark (first layer) to light (last layer) of the viridis map, so depth reads as colour."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


# ------------------------------------------------------------------------------------------------------ curves


def best_epoch_of(history: Sequence[EpochMetrics]) -> int | None:
    """The epoch with the lowest validation loss (the first of equals); ``None`` without a validation split."""
    with_val = [m for m in history if m.val_loss is not None]
    return min(with_val, key=lambda m: m.val_loss).epoch if with_val else None


def headline(title: str | None, test_accuracy: float | None = None, best_epoch: int | None = None) -> str:
    """``"title — test accuracy 88.16% (best epoch 3)"``, leaving out what is ``None``."""
    parts = [title] if title else []
    if test_accuracy is not None:
        parts.append(f"test accuracy {100 * test_accuracy:.2f}%")
    text = " — ".join(parts)
    if best_epoch is not None:
        text += f" (best epoch {best_epoch})" if text else f"best epoch {best_epoch}"
    return text


def run_title(out_dir: str | Path, dataset: str) -> str:
    """A run's name for a title: its output folder's name, and the data set's if that differs (an image folder by the
    last part of its path): ``"demo (fashion-mnist)"``, ``"catdog (imagefolder:cats-vs-dogs)"``."""
    run = Path(out_dir).resolve().name
    if dataset.startswith("imagefolder:"):
        dataset = "imagefolder:" + (Path(dataset.removeprefix("imagefolder:")).expanduser().resolve().name or "/")
    return run if run in (dataset, dataset.removeprefix("imagefolder:")) or not run else f"{run} ({dataset})"


def history_figures(history: Sequence[EpochMetrics], *, title: str | None = None, best_epoch: int | None = None,
                    test_accuracy: float | None = None) -> dict[str, Figure]:
    """The training curves of ``history`` as ``{"loss.png": Figure, "accuracy.png": ..., "lr.png": ...}``.

    Each has integer epoch ticks, a dotted vertical line at ``best_epoch`` (default: :func:`best_epoch_of`
    ``history``; none without a validation split) and :func:`headline` as its title. The accuracy figure also shows
    ``test_accuracy`` as a dashed horizontal line; the learning rate is on a log scale when it spans more than a
    factor of 10.

    Raises:
        ValueError: ``history`` is empty.
    """
    if not history:
        raise ValueError("no epochs to plot: the run's history is empty")
    if best_epoch is None:
        best_epoch = best_epoch_of(history)
    top = headline(title, test_accuracy, best_epoch)
    epochs = [m.epoch for m in history]
    with_val = [m for m in history if m.val_loss is not None]
    marker = "o" if len(history) <= 30 else None
    figures: dict[str, Figure] = {}

    def panel(name: str, axes_title: str, ylabel: str) -> Axes:
        figure, axes = new_figure(6.4, 4.2)
        if top:
            figure.suptitle(top, fontsize=10)
        axes.set(title=axes_title, xlabel="epoch", ylabel=ylabel)
        axes.grid(alpha=0.3)
        _integer_ticks(axes)
        axes.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        figures[name] = figure
        return axes

    for name, what, key, scale, ylabel in (("loss.png", "Loss", "loss", 1.0, "mean loss"),
                                           ("accuracy.png", "Accuracy", "accuracy", 100.0, "accuracy (%)")):
        axes = panel(name, what, ylabel)
        axes.plot(epochs, [scale * getattr(m, f"train_{key}") for m in history], marker=marker, markersize=3,
                  label="train")
        if with_val:
            val = {m.epoch: scale * getattr(m, f"val_{key}") for m in with_val}
            axes.plot(list(val), list(val.values()), marker=marker, markersize=3, label="validation")
            if best_epoch in val:
                axes.plot([best_epoch], [val[best_epoch]], marker="*", markersize=12, color="C3", linestyle="none")
        if key == "accuracy" and test_accuracy is not None:
            axes.axhline(100 * test_accuracy, color="C2", linestyle="--", linewidth=1,
                         label=f"test {100 * test_accuracy:.2f}%")
        if best_epoch is not None:
            axes.axvline(best_epoch, color="0.35", linestyle=":", label=f"best epoch {best_epoch}")
        axes.legend(fontsize=8)

    axes = panel("lr.png", "Learning rate (at the end of each epoch)", "learning rate")
    lrs = [m.lr for m in history]
    axes.plot(epochs, lrs, marker=marker, markersize=3, color="C4", label="lr")
    if min(lrs) > 0 and max(lrs) / min(lrs) > 10:
        axes.set_yscale("log")
    else:
        axes.set_ylim(0, 1.1 * max(lrs) or 1)
    if best_epoch is not None:
        axes.axvline(best_epoch, color="0.35", linestyle=":", label=f"best epoch {best_epoch}")
    axes.legend(fontsize=8)
    return figures


def plot_history(history: Sequence[EpochMetrics], out_dir: str | Path, *, title: str | None = None,
                 best_epoch: int | None = None, test_accuracy: float | None = None) -> list[Path]:
    """Write :func:`history_figures` (``loss.png``, ``accuracy.png``, ``lr.png``) to ``out_dir``; return their
    paths."""
    figures = history_figures(history, title=title, best_epoch=best_epoch, test_accuracy=test_accuracy)
    return [save_figure(figure, Path(out_dir) / name) for name, figure in figures.items()]


# ------------------------------------------------------------------------------------------------------ diagnostics


def epoch_positions(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Where each record lies in training, in epochs: ``global_step / steps_per_epoch`` (``epoch - 1 +
    step / steps_per_epoch``). ``steps_per_epoch`` is ``(global_step - step) / (epoch - 1)`` of a record after the
    first epoch, or the last step recorded when all are in the first epoch."""
    later = [r for r in records if r["epoch"] > 1 and r["global_step"] > r["step"]]
    if later:
        steps_per_epoch = (later[0]["global_step"] - later[0]["step"]) / (later[0]["epoch"] - 1)
    else:
        steps_per_epoch = max((r["step"] for r in records), default=1) or 1
    return [r["global_step"] / steps_per_epoch for r in records]


def _series(records: Sequence[Mapping[str, Any]], section: str,
            key: str) -> dict[str, tuple[list[float], list[float]]]:
    """``{name: (epoch positions, values)}`` of ``record[section][name][key]`` over the records, for each name (in
    order of first appearance) that has at least one value that is not null."""
    xs = epoch_positions(records)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for x, record in zip(xs, records):
        for name, values in record.get(section, {}).items():
            value = values.get(key)
            if value is not None:
                series.setdefault(name, ([], []))
                series[name][0].append(x)
                series[name][1].append(value)
    return series


def _layer_label(records: Sequence[Mapping[str, Any]], name: str) -> str:
    """``"2 ReLU"``: a layer's name and type."""
    kind = next((r["layers"][name].get("type") for r in records if name in r.get("layers", {})), None)
    return f"{name} {kind}" if kind else name


def _diagnostics_axes(axes: Axes, title: str, ylabel: str) -> None:
    """Title, labels, grid and integer epoch ticks from 0 (the start of training)."""
    axes.set(title=title, xlabel="epoch", ylabel=ylabel)
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    _integer_ticks(axes)


def draw_gradients(axes: Axes, records: Sequence[Mapping[str, Any]]) -> list[Any]:
    """On ``axes``: the norm of the loss's gradient with respect to each layer's input (``dx_norm``) over training,
    on a log scale, coloured from the first layer (dark) to the last (light). Returns the legend entries (``[]``:
    nothing to draw)."""
    series = _series(records, "layers", "dx_norm")
    if not series:
        return []
    for color, (name, (xs, ys)) in zip(_depth_colors(len(series)), series.items()):
        axes.plot(xs, ys, color=color, linewidth=1.2, label=_layer_label(records, name))
    axes.set_yscale("log", nonpositive="mask")
    _diagnostics_axes(axes, "Gradient norm at each layer's input", "‖∂loss/∂input‖")
    return axes.get_legend_handles_labels()[0]


def draw_update_ratio(axes: Axes, records: Sequence[Mapping[str, Any]]) -> list[Any]:
    """On ``axes``: each parameter's update-to-value ratio (``‖Δθ‖ / ‖θ‖`` of a step) over training on a log scale,
    weights solid, other parameters dashed, with a dashed grey guide at :data:`HEALTHY_UPDATE_RATIO`. Returns the
    legend entries (``[]``: nothing to draw)."""
    series = _series(records, "parameters", "update_ratio")
    if not series:
        return []
    for color, (name, (xs, ys)) in zip(_depth_colors(len(series)), series.items()):
        axes.plot(xs, ys, color=color, linewidth=1.2, linestyle="-" if name.endswith("weight") else "--", label=name)
    axes.axhline(HEALTHY_UPDATE_RATIO, color="0.45", linestyle="--", linewidth=1, label="≈1e-3 is healthy")
    axes.set_yscale("log", nonpositive="mask")
    _diagnostics_axes(axes, "Update-to-value ratio per parameter", "‖update‖ / ‖value‖")
    return axes.get_legend_handles_labels()[0]


def draw_saturation(axes: Axes, records: Sequence[Mapping[str, Any]]) -> list[Any]:
    """On ``axes``: per layer, the fraction of saturated units (tanh/sigmoid outputs near their bounds; ReLU outputs
    that are 0) as a solid line, and of dead ReLU units (0 for the whole batch) dashed in the same colour; y in
    [0, 1]. Returns the legend entries: one per layer, then the two line styles (``[]``: nothing to draw)."""
    from matplotlib.lines import Line2D

    saturated, dead = _series(records, "layers", "saturated"), _series(records, "layers", "dead")
    names = list(dict.fromkeys([*saturated, *dead]))
    if not names:
        return []
    handles = []
    for color, name in zip(_depth_colors(len(names)), names):
        for series, style in ((saturated, "-"), (dead, "--")):
            if name in series:
                axes.plot(*series[name], color=color, linestyle=style, linewidth=1.2)
        handles.append(Line2D([], [], color=color, label=_layer_label(records, name)))
    if dead:  # say which line style is which
        handles.append(Line2D([], [], color="0.3", linestyle="-", label="saturated (ReLU: output 0)"))
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="dead (0 for the whole batch)"))
    axes.set_ylim(-0.02, 1.02)
    _diagnostics_axes(axes, "Saturated and dead units per layer" if dead else "Saturated units per layer",
                      "fraction of units")
    return handles


DIAGNOSTICS = {"gradients.png": draw_gradients, "update_ratio.png": draw_update_ratio,
               "saturation.png": draw_saturation}
"""The diagnostics figures and the function that draws each."""


def diagnostics_figures(records: Sequence[Mapping[str, Any]], *, title: str | None = None) -> dict[str, Figure]:
    """The figures of :data:`DIAGNOSTICS` that ``records`` (from :func:`read_layer_records`) have values for, by file
    name; ``{}`` for no records. ``title`` goes above each."""
    figures = {}
    for name, draw in DIAGNOSTICS.items():
        figure, axes = new_figure(7.6, 4.2)
        handles = draw(axes, records)
        if handles:
            _outside_legend(axes, handles)
            if title:
                figure.suptitle(title, fontsize=10)
            figures[name] = figure
    return figures


def plot_diagnostics(records: Sequence[Mapping[str, Any]], out_dir: str | Path, *,
                     title: str | None = None) -> list[Path]:
    """Write :func:`diagnostics_figures` (``gradients.png``, ``update_ratio.png``, ``saturation.png``, each only
    when the records have values for it) to ``out_dir``; return their paths."""
    figures = diagnostics_figures(records, title=title)
    return [save_figure(figure, Path(out_dir) / name) for name, figure in figures.items()]


def diagnostics_grid_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], *, title: str | None = None) -> Figure:
    """Several runs side by side: one column per run (``{run name: records}``), the three panels of
    :data:`DIAGNOSTICS` as rows, each log-scale row on one y range so that the runs compare at a glance. A panel a
    run has no values for says so.

    Raises:
        ValueError: ``runs`` is empty.
    """
    if not runs:
        raise ValueError("no runs to plot")
    figure, grid = new_figure(6.0 * len(runs), 3.4 * len(DIAGNOSTICS), len(DIAGNOSTICS), len(runs), squeeze=False)
    for row, draw in enumerate(DIAGNOSTICS.values()):
        for column, (run, records) in enumerate(runs.items()):
            axes = grid[row][column]
            handles = draw(axes, records)
            if handles:
                _outside_legend(axes, handles, fontsize=6)
            else:
                axes.text(0.5, 0.5, "no values recorded", ha="center", va="center", transform=axes.transAxes,
                          color="0.5")
                axes.set(xticks=[], yticks=[])
            if row == 0:
                axes.set_title(f"{run}\n{axes.get_title()}", fontsize=10)
        logs = [axes for axes in grid[row] if axes.get_yscale() == "log"]
        if len(logs) > 1:
            low, high = min(a.get_ylim()[0] for a in logs), max(a.get_ylim()[1] for a in logs)
            for axes in logs:
                axes.set_ylim(low, high)
    if title:
        figure.suptitle(title, fontsize=12)
    return figure


def plot_diagnostics_grid(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *,
                          title: str | None = None) -> Path:
    """Write :func:`diagnostics_grid_figure` as one PNG at ``path``; return it."""
    return save_figure(diagnostics_grid_figure(runs, title=title), path)


# ------------------------------------------------------------------------------------------------------ a run


def plot_run(result: TrainResult, out_dir: str | Path) -> list[Path]:
    """Everything a finished run can show, in ``out_dir``: the training curves of ``result`` titled with the run's
    name, test accuracy and best epoch, and the diagnostics when ``out_dir/layers.jsonl`` has records. Returns the
    paths written.

    Raises:
        ModuleNotFoundError: matplotlib is not installed. ValueError: ``layers.jsonl`` has a malformed line.
    """
    require_matplotlib()
    dataset = result.summary.get("data", {}).get("name") or result.summary.get("config", {}).get("dataset", "")
    title = run_title(out_dir, dataset)
    paths = plot_history(result.history, out_dir, title=title, best_epoch=result.best_epoch,
                         test_accuracy=result.test_accuracy)
    records = read_layer_records(Path(out_dir) / LAYERS_FILE)
    if records:
        paths += plot_diagnostics(records, out_dir, title=title)
    return paths


# ------------------------------------------------------------------------------------------------------ comparisons


def plot_comparison(groups: Sequence[Any], path: str | Path) -> Path:
    """The validation accuracy (the training accuracy without a validation split) of every run of every group of
    :func:`~nnbackprop.compare.group_runs`, overlaid: one colour per group, one line per seed, the group's
    differing settings in the legend; saved as a PNG at ``path``."""
    from nnbackprop.compare import differing_settings

    figure, axes = new_figure(7.2, 4.4)
    differing = differing_settings(groups)
    colors = _depth_colors(len(groups))
    for i, (group, color) in enumerate(zip(groups, colors), start=1):
        label = f"group {i}" + (": " + ", ".join(f"{k}={group.settings[k]}" for k in differing) if differing else "")
        for j, run in enumerate(group.runs):
            history = run.history
            key = "val_accuracy" if history and history[0].get("val_accuracy") is not None else "train_accuracy"
            axes.plot([m["epoch"] for m in history], [100 * m[key] for m in history], color=color, alpha=0.8,
                      label=label if j == 0 else None)
    axes.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"{sum(len(g.runs) for g in groups)} runs in "
             f"{len(groups)} group{'s' * (len(groups) != 1)}")
    _integer_ticks(axes)
    axes.grid(alpha=0.3)
    _outside_legend(axes, fontsize=8)
    return save_figure(figure, path)
