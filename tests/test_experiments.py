"""The experiment scripts run as the README shows them, on small fake data (the real data sets are not needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SUBPROCESS_TIMEOUT_S, subprocess_env
from datagen import write_fake_mnist, write_image_folder


def test_custom_layer_checks_trains_and_evaluates_from_the_command_line(tmp_path):
    write_fake_mnist(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "experiments/custom_layer.py", "--epochs", "1", "--data-dir", str(tmp_path / "data"),
         "--val-size", "50", "--batch-size", "50", "--out", str(tmp_path / "run")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "BrokenSwish (wrong on purpose)" in out and out.count(" FAIL") == 2 and "a whole model" in out
    assert "$ nnbackprop train --model experiments/custom_layer.py:build" in out
    assert "model: experiments/custom_layer.py:build (Sequential of 8 layers)" in out and "FastStep" in out
    assert f"$ nnbackprop evaluate {tmp_path / 'run'}" in out and "test split (50 examples" in out


@pytest.mark.parametrize("script, data, options", [
    ("mnist_mlp.py", "mnist", ["--hidden", "16"]),
    ("fashion_mnist_mlp.py", "mnist", ["--dataset", "mnist", "--hidden", "16"]),
    ("small_cnn.py", "mnist", ["--dataset", "mnist", "--channels", "4,8", "--hidden", "8"]),
    ("cat_vs_dog.py", "folder", ["--hidden", "16", "--image-size", "8", "--shift", "1", "--val-size", "4"]),
    ("cat_vs_dog_cnn.py", "folder", ["--channels", "4,8", "--image-size", "8", "--val-size", "4"]),
])
def test_a_training_script_runs_as_the_readme_shows_it(tmp_path, script, data, options):
    """Each training script, its own settings shrunk by command-line options: one epoch, its table, its files."""
    if data == "mnist":
        write_fake_mnist(tmp_path / "data")
        source = ["--data-dir", str(tmp_path / "data"), "--val-size", "50"]
    else:
        write_image_folder(tmp_path / "photos" / "train", per_class=8)
        write_image_folder(tmp_path / "photos" / "test", per_class=4)
        source = ["--dataset", f"imagefolder:{tmp_path / 'photos'}"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *source, *options, "--epochs", "1", "--warmup-epochs", "0",
         "--batch-size", "8", "--threads", "1"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test acc %" in result.stdout and "results in results/" in result.stdout
    written = result.stdout.rsplit("results in ", 1)[1].split("/\n")[0]
    summary = json.loads((tmp_path / written / "summary.json").read_text())
    assert summary["epochs_trained"] == 1 and summary["config"]["epochs"] == 1


def test_a_training_script_writes_where_out_says(tmp_path):
    """--out moves a script's results from their default folder, as it does train's."""
    write_fake_mnist(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "mnist_mlp.py"), "--data-dir", str(tmp_path / "data"),
         "--val-size", "50", "--hidden", "16", "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8",
         "--threads", "1", "--out", "elsewhere"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "results in elsewhere/" in result.stdout and (tmp_path / "elsewhere" / "summary.json").is_file()
    assert not (tmp_path / "results").exists()
