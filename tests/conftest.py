"""Shared fixtures: the devices and dtypes every gradient test runs on, and a seeded random source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from nnbackprop.gradcheck import GradCheckReport
from nnbackprop.module import Module

ROOT = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 1800.0
"""How long a test waits for a command it starts: a safety net that only a command that hangs reaches, whatever the
load of the machine (importing torch alone has taken 20 s on a busy one). Tests that check how fast something fails
measure that themselves."""
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[CUDA, pytest.mark.cuda])]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    """Every device the test should run on: cpu, and cuda where there is one."""
    return torch.device(request.param)


@pytest.fixture(params=DTYPES)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """float64 (checked against :data:`~nnbackprop.gradcheck.TOLERANCES` tightly) and float32 (loosely)."""
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed; draw on the CPU and move, so every device sees the same numbers."""
    return torch.Generator().manual_seed(0)


def assert_passed(report: GradCheckReport) -> None:
    """Fail with the checker's own table, so a broken gradient says which tensor and by how much."""
    assert report.passed, f"\n{report}"


def assert_failed(report: GradCheckReport, *names: str) -> None:
    """The check must fail, and on exactly the tensors ``names``."""
    assert not report.passed, f"a wrong gradient passed the check:\n{report}"
    assert sorted(c.name for c in report.failures()) == sorted(names), f"\n{report}"


def assert_matches_torch_nn(layer: Module, x: torch.Tensor) -> None:
    """The layer's ``to_torch()`` equivalent is in the same mode, computes the same output and has the same
    ``state_dict`` keys and values."""
    ref = layer.to_torch().train(layer.training)
    with torch.no_grad():
        expected = ref(x)
    torch.testing.assert_close(layer(x), expected)
    ours_state, ref_state = layer.state_dict(), ref.state_dict()
    assert list(ours_state) == list(ref_state)
    for key in ours_state:
        torch.testing.assert_close(ours_state[key], ref_state[key], msg=key)


def randomize_batchnorm(bn: Module, g: torch.Generator, training: bool) -> Module:
    """A batch norm layer with random affine parameters and running statistics, so that none of them is trivial."""
    bn.weight.data.normal_(1.0, 0.5, generator=g)
    bn.bias.data.normal_(0.0, 0.5, generator=g)
    bn.running_mean.normal_(0.0, 1.0, generator=g)
    bn.running_var.uniform_(0.5, 2.0, generator=g)
    return bn.train(training)


LAYOUTS = ("contiguous", "transposed", "strided")


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest) -> str:
    """How the input tensor is laid out in memory: hand-written code must not assume contiguity."""
    return request.param


def make_input(
    shape: tuple[int, ...],
    gen: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    layout: str = "contiguous",
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """A standard normal tensor of ``shape`` (times ``scale`` plus ``shift``), drawn in float64 on the CPU from ``gen``.

    ``layout``: ``contiguous``; ``transposed`` (a tensor of the reversed shape with all dimensions permuted back);
    ``strided`` (every other element of a last dimension twice as long).
    """
    storage = {"contiguous": shape, "transposed": shape[::-1], "strided": (*shape[:-1], 2 * shape[-1])}
    if layout not in storage:
        raise ValueError(f"unknown layout '{layout}'")
    base = torch.randn(storage[layout], generator=gen, dtype=torch.float64) * scale + shift
    base = base.to(device=device, dtype=dtype)
    if layout == "transposed":
        return base.permute(*reversed(range(len(shape))))
    return base[..., ::2] if layout == "strided" else base


def subprocess_env() -> dict[str, str]:
    """The environment for running the project's scripts with ``sys.executable``: the checkout first on the path, and
    one CPU thread (the checks use tiny tensors, and several threads on a busy machine slow them down many times)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
