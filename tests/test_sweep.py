"""Repeats and sweeps (``nnbackprop train --seeds``, ``--sweep GRID.toml``) and ``nnbackprop compare``, end to end on
small fake data: a folder per run, a line per run as it ends, resumable, failures that do not stop the others, and
groups of seeds summed up as mean ± std beside the settings that differ."""

from __future__ import annotations

import json

import pytest
from test_cli import SMALL, mnist_dir, run  # noqa: F401  (mnist_dir is a fixture)

from nnbackprop.config import TrainConfig
from nnbackprop.errors import ConfigError
from nnbackprop.sweep import load_grid, parse_seeds, plan


def train_args(mnist_dir, out):  # noqa: F811
    return ["train", "--dataset", "mnist", "--data-dir", str(mnist_dir), "--epochs", "1", "--out", str(out), *SMALL]


def test_seeds_train_one_run_each_and_compare_sums_them_up(tmp_path, mnist_dir, capsys):  # noqa: F811
    out = tmp_path / "fm"
    code, printed, err = run(capsys, *train_args(mnist_dir, out), "--seeds", "0,1,2")
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[0] == f"3 runs under {out}/, one after the other"
    assert [line.split(":")[0] for line in lines[1:4]] == ["run seed=0", "run seed=1", "run seed=2"]
    assert all(", test accuracy " in line for line in lines[1:4])
    assert lines[4] == f"compare them: nnbackprop compare {out}"
    summaries = [json.loads((out / f"seed={s}" / "summary.json").read_text()) for s in range(3)]
    assert [s["config"]["seed"] for s in summaries] == [0, 1, 2]

    code, printed, err = run(capsys, "compare", str(out))
    assert code == 0, err
    header, rule, row = printed.splitlines()
    assert header.split()[:3] == ["group", "runs", "test"] and row.split()[:2] == ["1", "3"]
    accuracies = [100 * s["test_accuracy"] for s in summaries]
    mean = sum(accuracies) / 3
    std = (sum((a - mean) ** 2 for a in accuracies) / 2) ** 0.5
    assert f"{mean:.2f} ± {std:.2f}" in row

    code, printed, _ = run(capsys, *train_args(mnist_dir, out), "--seeds", "0,1,2")  # again: nothing left to do
    assert code == 0 and printed.count("done before, skipped") == 3


def test_a_sweep_over_a_grid_is_resumable_and_compare_names_what_differs(tmp_path, mnist_dir, capsys):  # noqa: F811
    grid = tmp_path / "grid.toml"
    grid.write_text("lr = [0.01, 0.1]\nhidden = [[8], [16, 8]]\n")
    out = tmp_path / "sweep"
    code, printed, err = run(capsys, *train_args(mnist_dir, out), "--sweep", str(grid), "--seeds", "0,1")
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 8 and "lr=0.01_hidden=16-8_seed=1" in names
    (out / "lr=0.1_hidden=8_seed=0" / "summary.json").unlink()  # as if stopped before it could write its summary
    code, printed, _ = run(capsys, *train_args(mnist_dir, out), "--sweep", str(grid), "--seeds", "0,1")
    assert code == 0 and printed.count("done before, skipped") == 7 and "run lr=0.1_hidden=8_seed=0: resumed" in printed

    code, printed, err = run(capsys, "compare", str(out), "--json")
    assert code == 0, err
    document = json.loads(printed)
    assert document["differing_settings"] == ["hidden", "lr"]
    assert [len(g["runs"]) for g in document["groups"]] == [2, 2, 2, 2]
    assert all(g["test_accuracy_std"] is not None for g in document["groups"])


def test_compare_plot(tmp_path, mnist_dir, capsys):  # noqa: F811
    pytest.importorskip("matplotlib", reason="--plot needs the optional matplotlib")
    out = tmp_path / "fm"
    assert run(capsys, *train_args(mnist_dir, out), "--seeds", "0,1")[0] == 0
    code, printed, err = run(capsys, "compare", str(out / "seed=0"), str(out / "seed=1"), "--plot",
                             str(tmp_path / "c.png"))
    assert code == 0 and (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG"), err


def test_a_run_that_fails_does_not_stop_the_sweep(tmp_path, mnist_dir, capsys):  # noqa: F811
    grid = tmp_path / "grid.toml"
    grid.write_text("lr = [1e12, 0.05]\n")
    code, printed, _ = run(capsys, *train_args(mnist_dir, tmp_path / "sweep"), "--sweep", str(grid), "--warmup-epochs",
                           "0")
    assert code == 1
    assert "run lr=1000000000000.0: failed: the training loss became non-finite" in printed
    assert "run lr=0.05: trained, test accuracy" in printed and printed.endswith("(1 failed)\n")


@pytest.mark.parametrize("text, message", [
    ("lr = 0.1\n", "lr must be a non-empty list of the values to try"),
    ("lr = []\n", "lr must be a non-empty list"),
    ("nonsense = [1, 2]\n", "unknown setting"),
    ("lr = [0.1, -1.0]\n", "lr must be > 0"),
    ("lr = [0.1\n", "not valid TOML"),
])
def test_a_bad_grid_is_one_line_naming_the_file(tmp_path, text, message):
    grid = tmp_path / "grid.toml"
    grid.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_grid(grid)
    assert str(grid) in str(caught.value) and "\n" not in str(caught.value)


def test_seeds_and_plans():
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5") == [3, 4, 5] and parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("", "a", "1,1", "-1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    runs = plan(TrainConfig(epochs=2), {"lr": [0.1, 0.2], "hidden": [[8], [16, 8]]}, [4])
    assert [r.name for r in runs] == ["lr=0.1_hidden=8_seed=4", "lr=0.1_hidden=16-8_seed=4", "lr=0.2_hidden=8_seed=4",
                                      "lr=0.2_hidden=16-8_seed=4"]
    assert runs[1].config.hidden == (16, 8) and runs[1].config.seed == 4 and runs[1].config.epochs == 2
    assert [r.name for r in plan(TrainConfig())] == ["run"]
