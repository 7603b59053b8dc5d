"""Learning-rate schedules built from torch's schedulers: the lr of every step against the closed form, warm-up,
resuming from a state dict, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from nnbackprop.module import Parameter
from nnbackprop.optim import SGD
from nnbackprop.schedule import SCHEDULES, make_scheduler

BASE_LR, TOTAL = 0.4, 24


def _optimizer() -> SGD:
    return SGD([Parameter(torch.zeros(3))], lr=BASE_LR, momentum=0.9)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _expected(name: str, t: int, warmup: int) -> float:
    """The closed form of the module docstring."""
    if t < warmup:
        return BASE_LR * (t + 1) / (warmup + 1)
    s = t - warmup
    if name == "constant":
        return BASE_LR
    if name == "step":
        return BASE_LR * 0.5 ** (s // 5)
    return 0.5 * BASE_LR * (1 + math.cos(math.pi * s / (TOTAL - warmup)))


@pytest.mark.parametrize("warmup", [0, 4])
@pytest.mark.parametrize("name", SCHEDULES)
def test_every_step_follows_the_closed_form(name: str, warmup: int) -> None:
    optimizer = _optimizer()
    scheduler = make_scheduler(name, optimizer, total_steps=TOTAL, warmup_steps=warmup, step_size=5, gamma=0.5)
    assert _lrs(scheduler, optimizer, TOTAL) == pytest.approx([_expected(name, t, warmup) for t in range(TOTAL)],
                                                              rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", SCHEDULES)
def test_a_resumed_schedule_continues_exactly(name: str) -> None:
    optimizer = _optimizer()
    scheduler = make_scheduler(name, optimizer, total_steps=TOTAL, warmup_steps=4, step_size=5, gamma=0.5)
    straight = _lrs(scheduler, optimizer, TOTAL)

    optimizer = _optimizer()
    scheduler = make_scheduler(name, optimizer, total_steps=TOTAL, warmup_steps=4, step_size=5, gamma=0.5)
    first = _lrs(scheduler, optimizer, 10)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    optimizer = _optimizer()
    scheduler = make_scheduler(name, optimizer, total_steps=TOTAL, warmup_steps=4, step_size=5, gamma=0.5)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    assert first + _lrs(scheduler, optimizer, TOTAL - 10) == straight


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="linear"), "unknown schedule 'linear'"),
    (dict(warmup_steps=TOTAL), "must be shorter than training"),
    (dict(name="step"), "needs step_size"),
])
def test_errors_say_what_is_wrong(kwargs: dict, message: str) -> None:
    kwargs = {"name": "cosine", "total_steps": TOTAL, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_scheduler(kwargs.pop("name"), _optimizer(), **kwargs)
