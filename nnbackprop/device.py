"""Where a run computes: the device (``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against what this machine
has) and torch's CPU threads."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from nnbackprop.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for a device this machine lacks is a
    :class:`~nnbackprop.errors.ConfigError` (a ``ValueError``) saying what there is."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but CUDA is not available on this machine; use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def make_current(device: torch.device) -> None:
    """Make ``cuda:N`` torch's current CUDA device (where CUDA streams, graphs and ``"cuda"`` tensors go); ``cuda``
    without an index already means the current one, and the CPU has none."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (``None``: left as they are) for the ``with`` block."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
