"""The experiment scripts run as the README shows them, on small fake data (the real data sets are not needed)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, SUBPROCESS_TIMEOUT_S, subprocess_env
from datagen import write_fake_mnist


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
