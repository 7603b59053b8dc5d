"""The seed article's 2-2-2 sigmoid network: exact values, gradients against autograd, and the experiment script."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SUBPROCESS_TIMEOUT_S, subprocess_env

from nnbackprop import to_torch

sys.path.insert(0, str(ROOT / "experiments"))
from seed_worked_example import (INPUT, LEARNING_RATE, TARGET, WEIGHTS, WorkedExample,  # noqa: E402
                                 run_worked_example, seed_network)

EXPECTED = {"H1": 0.538424, "H2": 0.520813, "Y1": 0.633710, "Y2": 0.648998, "E": 0.184979, "dE_dw5": 0.072952,
            "w5_after": 0.179270}


@pytest.fixture(scope="module")
def result() -> WorkedExample:
    return run_worked_example()


@pytest.mark.parametrize("name", EXPECTED)
def test_value(result: WorkedExample, name: str) -> None:
    assert getattr(result, name) == pytest.approx(EXPECTED[name], abs=1e-6)


def test_update_is_a_gradient_descent_step(result: WorkedExample) -> None:
    assert WEIGHTS[4] == 0.18
    assert result.w5_after == pytest.approx(0.18 - LEARNING_RATE * result.dE_dw5, abs=1e-15)


def test_gradients_agree_with_autograd(result: WorkedExample) -> None:
    net = to_torch(seed_network())
    out = net(torch.tensor([INPUT], dtype=torch.float64))
    loss = 0.5 * ((torch.tensor([TARGET], dtype=torch.float64) - out) ** 2).sum()
    loss.backward()
    assert loss.item() == pytest.approx(result.E, abs=1e-15)
    expected = dict(net.named_parameters())
    assert sorted(result.grads) == sorted(expected)
    for name, grad in result.grads.items():
        torch.testing.assert_close(grad, expected[name].grad, rtol=1e-12, atol=1e-15, msg=name)


def test_experiment_script_prints_the_values() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "seed_worked_example.py")], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    for value in EXPECTED.values():
        assert f"{value:.6f}" in proc.stdout, f"{value:.6f} missing from:\n{proc.stdout}"
    assert proc.stdout.rstrip().endswith("-> ok")
