"""Pictures of a run: the training curves (integer epochs, best epoch, test result, learning rate) and the per-layer
diagnostics read from layers.jsonl, checked on the matplotlib figures themselves and on the PNG files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from nnbackprop.callbacks import TrainResult
from nnbackprop.diagnostics import LAYERS_FILE, read_layer_records
from nnbackprop.metrics import EpochMetrics
from nnbackprop.plot import (diagnostics_figures, diagnostics_grid_figure, epoch_positions, history_figures,
                             plot_diagnostics, plot_diagnostics_grid, plot_history, plot_run, run_title)

pytest.importorskip("matplotlib", reason="plotting needs the optional matplotlib")  # nnbackprop.plot imports it lazily


def history(epochs: int = 5, best: int = 3, lr: tuple[float, float] = (0.1, 0.1),
            validation: bool = True) -> list[EpochMetrics]:
    """``epochs`` epochs whose validation loss is lowest at ``best``; the lr goes geometrically from ``lr[0]`` to
    ``lr[1]``."""
    rows = []
    for e in range(1, epochs + 1):
        val = 0.5 + 0.1 * (e - best) ** 2 if validation else None
        rate = lr[0] * (lr[1] / lr[0]) ** ((e - 1) / max(epochs - 1, 1))
        rows.append(EpochMetrics(e, 1.0 / e, 1 - 0.4 / e, val, 0.9 - 0.01 * (e - best) ** 2 if validation else None,
                                 rate, 1.0, 100.0))
    return rows


def records(epochs: int = 2, steps_per_epoch: int = 4, every: int = 2) -> list[dict]:
    """Layer records of a Linear-ReLU-Linear model every ``every`` steps, as the training loop writes them."""
    rows = []
    for epoch in range(1, epochs + 1):
        for step in range(every, steps_per_epoch + 1, every):
            g = (epoch - 1) * steps_per_epoch + step
            rows.append({
                "epoch": epoch, "step": step, "global_step": g,
                "layers": {
                    "1": {"type": "Linear", "out_mean": 0.0, "out_std": 1.0, "saturated": None, "dead": None,
                          "dx_norm": None},
                    "2": {"type": "ReLU", "out_mean": 0.4, "out_std": 0.6, "saturated": 0.5, "dead": 0.01 * g,
                          "dx_norm": 0.03 / g},
                    "3": {"type": "Linear", "out_mean": 0.0, "out_std": 1.1, "saturated": None, "dead": None,
                          "dx_norm": 0.05 / g}},
                "parameters": {
                    "1.weight": {"norm": 10.0, "grad_norm": 0.8, "update_ratio": 1e-3 / g},
                    "1.bias": {"norm": 0.3, "grad_norm": 0.1, "update_ratio": 4e-3 / g},
                    "3.weight": {"norm": 5.0, "grad_norm": 0.4, "update_ratio": 1e-2 / g}}})
    return rows


def write_records(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def x_tick_labels(figure) -> list[str]:
    """The labels of the x ticks that are in view, as drawn."""
    figure.draw_without_rendering()
    axes = figure.axes[0]
    low, high = axes.get_xlim()
    return [label.get_text() for tick, label in zip(axes.get_xticks(), axes.get_xticklabels()) if low <= tick <= high]


def vertical_lines(axes) -> dict[str, float]:
    """Label -> x of each vertical line (``axvline``) on ``axes``."""
    return {line.get_label(): line.get_xdata()[0] for line in axes.get_lines()
            if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2}


def horizontal_lines(axes) -> dict[str, float]:
    return {line.get_label(): line.get_ydata()[0] for line in axes.get_lines()
            if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2}


def assert_png(path, min_width: int = 400, min_height: int = 300) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= min_height, image.size


# ------------------------------------------------------------------------------------------------------ curves


def test_plot_history_writes_three_pngs(tmp_path):
    paths = plot_history(history(), tmp_path, title="demo", best_epoch=3, test_accuracy=0.8816)
    assert sorted(p.name for p in paths) == ["accuracy.png", "loss.png", "lr.png"]
    for path in paths:
        assert path.parent == tmp_path
        assert_png(path)


@pytest.mark.parametrize("epochs", [1, 3, 7, 40])
def test_epoch_ticks_are_whole_numbers(epochs):
    for name, figure in history_figures(history(epochs, best=1)).items():
        labels = x_tick_labels(figure)
        assert labels, name
        ticks = [int(label) for label in labels]  # raises for "1.5"
        assert min(ticks) >= 0 and max(ticks) <= epochs + 1, (name, labels)
        if epochs <= 7:
            assert set(range(1, epochs + 1)) <= set(ticks), (name, labels)


def test_the_best_epoch_is_marked_where_it_was(tmp_path):
    figures = history_figures(history(6, best=4), best_epoch=2)
    for name, figure in figures.items():
        assert vertical_lines(figure.axes[0]) == {"best epoch 2": 2}, name


def test_the_best_epoch_comes_from_the_history_when_not_given():
    figures = history_figures(history(6, best=5))
    for name, figure in figures.items():
        assert vertical_lines(figure.axes[0]) == {"best epoch 5": 5}, name
        assert "best epoch 5" in figure.get_suptitle()


def test_without_validation_there_is_no_best_epoch():
    figures = history_figures(history(4, validation=False), test_accuracy=0.5)
    for figure in figures.values():
        assert vertical_lines(figure.axes[0]) == {} and "best epoch" not in figure.get_suptitle()
    labels = [line.get_label() for line in figures["loss.png"].axes[0].get_lines()]
    assert labels == ["train"]


def test_the_title_holds_the_run_and_the_test_accuracy():
    accuracy = 0.73125
    figures = history_figures(history(), title="catdog (imagefolder:cats-vs-dogs)", best_epoch=3,
                              test_accuracy=accuracy)
    for figure in figures.values():
        title = figure.get_suptitle()
        assert title.startswith("catdog (imagefolder:cats-vs-dogs)")
        assert f"test accuracy {100 * accuracy:.2f}%" in title and "best epoch 3" in title
    test_line = horizontal_lines(figures["accuracy.png"].axes[0])
    assert test_line == {f"test {100 * accuracy:.2f}%": pytest.approx(100 * accuracy)}


def test_the_learning_rate_panel_goes_logarithmic_past_a_factor_of_ten():
    lrs = [0.1, 0.001]
    axes = history_figures(history(5, lr=(lrs[0], lrs[1])))["lr.png"].axes[0]
    assert axes.get_yscale() == "log"
    line = next(line for line in axes.get_lines() if line.get_label() == "lr")
    assert line.get_ydata()[0] == pytest.approx(lrs[0]) and line.get_ydata()[-1] == pytest.approx(lrs[1])
    assert history_figures(history(5, lr=(0.1, 0.02)))["lr.png"].axes[0].get_yscale() == "linear"


def test_an_empty_history_is_an_error():
    with pytest.raises(ValueError, match="history is empty"):
        history_figures([])


@pytest.mark.parametrize("out, dataset, expected", [
    ("runs/fashion-mnist", "fashion-mnist", "fashion-mnist"),
    ("runs/demo", "fashion-mnist", "demo (fashion-mnist)"),
    ("/home/me/runs/catdog", "imagefolder:/data/cats-vs-dogs/", "catdog (imagefolder:cats-vs-dogs)"),
    ("runs/cats-vs-dogs", "imagefolder:/data/cats-vs-dogs", "cats-vs-dogs"),
])
def test_run_title(out, dataset, expected):
    assert run_title(out, dataset) == expected


# ------------------------------------------------------------------------------------------------------ records


def test_records_round_trip_and_a_missing_or_empty_file_is_no_records(tmp_path):
    assert read_layer_records(tmp_path / "nothing.jsonl") == []
    (tmp_path / "empty.jsonl").write_text("")
    assert read_layer_records(tmp_path / "empty.jsonl") == []
    rows = records()
    write_records(tmp_path / LAYERS_FILE, rows)
    with open(tmp_path / LAYERS_FILE, "a") as file:
        file.write("\n")  # a blank line is skipped
    assert read_layer_records(tmp_path / LAYERS_FILE) == rows


@pytest.mark.parametrize("line, problem", [
    ('{"epoch": 1, "step": 2', "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"epoch": 1, "step": 2}', "global_step = None"),
    ('{"epoch": 1, "step": 2, "global_step": 2, "layers": {"1": {"dx_norm": "big"}}}', "expected a number or null"),
    ('{"epoch": 1, "step": 2, "global_step": 2, "parameters": [1]}', "parameters is not an object"),
])
def test_a_malformed_line_is_a_one_line_error_naming_the_file_and_line(tmp_path, line, problem):
    path = tmp_path / LAYERS_FILE
    rows = records()
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n" + line + "\n")
    with pytest.raises(ValueError) as error:
        read_layer_records(path)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert f"{path}, line 3" in message and problem in message


def test_epoch_positions_come_from_the_global_step():
    rows = records(epochs=3, steps_per_epoch=4, every=2)
    assert epoch_positions(rows) == [r["epoch"] - 1 + r["step"] / 4 for r in rows]
    first_epoch = records(epochs=1, steps_per_epoch=10, every=5)
    assert epoch_positions(first_epoch) == [0.5, 1.0]


# ------------------------------------------------------------------------------------------------------ diagnostics


def test_diagnostics_write_three_pngs(tmp_path):
    paths = plot_diagnostics(records(), tmp_path, title="run")
    assert [p.name for p in paths] == ["gradients.png", "update_ratio.png", "saturation.png"]
    for path in paths:
        assert_png(path)


def test_gradients_show_each_layer_with_an_input_gradient_on_a_log_scale():
    rows = records(epochs=2, steps_per_epoch=4, every=2)
    axes = diagnostics_figures(rows)["gradients.png"].axes[0]
    assert axes.get_yscale() == "log"
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == ["2 ReLU", "3 Linear"]  # layer 1's dx_norm is null throughout
    assert list(lines["3 Linear"].get_xdata()) == epoch_positions(rows)
    assert list(lines["3 Linear"].get_ydata()) == [r["layers"]["3"]["dx_norm"] for r in rows]
    labels = x_tick_labels(diagnostics_figures(rows)["gradients.png"])
    assert [int(label) for label in labels] == list(range(len(labels)))  # 0, 1, 2: whole epochs


def test_update_ratio_is_logarithmic_with_a_guide_at_1e_3():
    axes = diagnostics_figures(records())["update_ratio.png"].axes[0]
    assert axes.get_yscale() == "log"
    guides = horizontal_lines(axes)
    assert guides == {"≈1e-3 is healthy": pytest.approx(1e-3)}
    assert {line.get_label() for line in axes.get_lines()} >= {"1.weight", "1.bias", "3.weight"}
    dashed = {line.get_label(): line.get_linestyle() for line in axes.get_lines()}
    assert dashed["1.weight"] == "-" and dashed["1.bias"] == "--"


def test_saturation_shows_only_layers_that_have_it():
    rows = records()
    figure = diagnostics_figures(rows)["saturation.png"]
    axes = figure.axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend[0] == "2 ReLU" and not any("Linear" in text for text in legend)
    ys = sorted(tuple(line.get_ydata()) for line in axes.get_lines())
    assert ys == sorted([tuple(r["layers"]["2"]["saturated"] for r in rows),
                         tuple(r["layers"]["2"]["dead"] for r in rows)])
    low, high = axes.get_ylim()
    assert low <= 0 and 1 <= high < 1.1


def test_a_figure_without_values_is_skipped(tmp_path):
    rows = records()
    for row in rows:
        row["parameters"] = {}
        for layer in row["layers"].values():
            layer["saturated"] = layer["dead"] = None
    assert [p.name for p in plot_diagnostics(rows, tmp_path)] == ["gradients.png"]
    assert plot_diagnostics([], tmp_path / "none") == []


def test_a_legend_of_many_layers_stays_outside_the_axes():
    rows = records()
    for row in rows:
        row["layers"] = {str(i): {"type": "Tanh", "saturated": 0.01 * i, "dead": None, "dx_norm": 0.1 / i}
                         for i in range(1, 13)}
    figure = diagnostics_figures(rows)["gradients.png"]
    figure.draw_without_rendering()
    axes = figure.axes[0]
    legend_box, axes_box = axes.get_legend().get_window_extent(), axes.get_window_extent()
    assert len(axes.get_legend().get_texts()) == 12
    assert legend_box.x0 >= axes_box.x1 and legend_box.x1 <= figure.bbox.x1 + 1


def test_a_grid_has_a_column_per_run_and_a_row_per_panel(tmp_path):
    runs = {"sigmoid": records(), "tanh": records(epochs=3), "empty": []}
    figure = diagnostics_grid_figure(runs, title="three runs")
    grid = figure.axes
    assert len(grid) == 3 * len(runs)
    assert [grid[c].get_title().splitlines()[0] for c in range(len(runs))] == list(runs)
    assert "no values recorded" in [text.get_text() for text in grid[2].texts]
    assert grid[len(runs)].get_ylim() == grid[len(runs) + 1].get_ylim()  # one y range per log-scale row
    path = plot_diagnostics_grid(runs, tmp_path / "grid.png", title="three runs")
    assert_png(path, min_width=1000, min_height=800)


# ------------------------------------------------------------------------------------------------------ a run


def result(hist: list[EpochMetrics], best: int | None, accuracy: float) -> TrainResult:
    return TrainResult(None, hist, best, False, 0.5, accuracy, 1.0,
                       {"data": {"name": "fashion-mnist"}, "config": {"dataset": "fashion-mnist"}})


def test_a_run_without_layer_records_gets_only_its_curves(tmp_path):
    paths = plot_run(result(history(), 3, 0.875), tmp_path)  # no layers.jsonl there
    assert sorted(p.name for p in paths) == ["accuracy.png", "loss.png", "lr.png"]


def test_a_run_with_layer_records_gets_its_diagnostics_too(tmp_path):
    out = tmp_path / "fashion-mnist"
    out.mkdir()
    write_records(out / LAYERS_FILE, records())
    paths = plot_run(result(history(), 2, 0.875), out)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png", "lr.png", "gradients.png", "update_ratio.png",
                                       "saturation.png"]
    for path in paths:
        assert_png(path)
