r"""Learning-rate schedules stepped once per optimizer step: constant, step decay and cosine, each with linear warm-up.

A schedule is a pure function ``lr_at(t)`` of the number ``t`` of optimizer steps taken. With ``W`` warm-up steps and
base learning rate :math:`\eta` (the optimizer's ``lr`` when the scheduler is built):

.. math::
    \eta_t = \begin{cases}
        \eta \, \dfrac{t + 1}{W + 1} & 0 \le t < W \quad \text{(linear warm-up)} \\
        s(t - W) & t \ge W
    \end{cases}

where :math:`s` is the schedule proper, counted from the end of warm-up, with :math:`s(0) = \eta`. The warm-up rises in
equal steps :math:`\eta / (W + 1)` from :math:`\eta / (W + 1)` (never a wasted step at lr 0) to :math:`\eta` at step
``W``; it equals ``torch.optim.lr_scheduler.LinearLR(start_factor=1 / (W + 1), total_iters=W)`` followed, through
``SequentialLR(milestones=[W])``, by the schedule proper.

As in ``torch.optim.lr_scheduler``, building a scheduler sets the optimizer's lr to ``lr_at(0)``, and each call of
:meth:`LRScheduler.step`, made after ``optimizer.step()``, advances ``t`` by one and sets ``lr_at(t)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar, Mapping


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name: str, value: Any, minimum: float, *, strict: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value!r}")


class LRScheduler:
    """Base class: holds the optimizer, the base lr and the warm-up, and writes ``lr_at(t)`` into every param group.

    Subclasses set their own settings, then call ``super().__init__``, and implement :meth:`_schedule` (the schedule
    proper) and, when they have settings, extend :meth:`_config` and :meth:`_check_config`.

    Args:
        optimizer: any optimizer with ``param_groups`` (ours or ``torch.optim``'s). Its groups must share one lr, which
            becomes ``base_lr``.
        warmup_steps: the number ``W`` of linear warm-up steps (default 0: none).

    Attributes:
        base_lr: the lr the schedule starts from after warm-up.
        last_step: the number ``t`` of :meth:`step` calls so far; the optimizer's lr is ``lr_at(last_step)``.
    """

    name: ClassVar[str]

    def __init__(self, optimizer: Any, *, warmup_steps: int = 0) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not groups or any("lr" not in g for g in groups):
            raise TypeError(
                f"{type(self).__name__} needs an optimizer whose param_groups are dicts with an 'lr', got "
                f"{type(optimizer).__name__}"
            )
        lrs = {g["lr"] for g in groups}
        if len(lrs) != 1:
            raise ValueError(
                f"{type(self).__name__}: the optimizer's param groups have different learning rates {sorted(lrs)}; "
                "a scheduler here drives one base lr, so give every group the same lr"
            )
        _check_int("warmup_steps", warmup_steps, 0)
        self.optimizer = optimizer
        self.base_lr = float(groups[0]["lr"])
        self.warmup_steps = warmup_steps
        self._check_config()
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate after ``step`` optimizer steps (a pure function of ``step`` and the settings)."""
        _check_int("step", step, 0)
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / (self.warmup_steps + 1)
        return self._schedule(step - self.warmup_steps)

    def _schedule(self, step: int) -> float:
        """The schedule proper, ``step`` steps after the end of warm-up; ``_schedule(0) == base_lr``."""
        raise NotImplementedError

    def _check_config(self) -> None:
        """Raise ``ValueError`` when the settings do not fit together (``base_lr`` is known by now)."""

    def _config(self) -> dict[str, Any]:
        """The settings that define the schedule: saved with the step count, compared on load."""
        return {"schedule": self.name, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps}

    def step(self) -> None:
        """Advance by one optimizer step and set the optimizer's lr to ``lr_at(last_step)``."""
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        """The learning rate of each param group, as last set by this scheduler (``torch.optim`` convention)."""
        return [self.lr_at(self.last_step)] * len(self.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        """``{'step': last_step, 'schedule': name, 'base_lr': ..., 'warmup_steps': ..., <schedule settings>}``."""
        return {"step": self.last_step, **self._config()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume at the saved step and set the optimizer's lr accordingly.

        Raises:
            ValueError: when the saved settings differ from this scheduler's (all differences are listed), or the
                saved step is not an integer >= 0.
        """
        if not isinstance(state_dict, Mapping) or "step" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects a dict from state_dict() with a 'step', "
                f"got {state_dict!r}"
            )
        _check_int("the saved step", state_dict["step"], 0)
        saved = {k: v for k, v in state_dict.items() if k != "step"}
        own = self._config()
        differences = [
            f"{k}: saved {saved.get(k, '<missing>')!r}, here {own.get(k, '<missing>')!r}"
            for k in sorted(set(saved) | set(own))
            if saved.get(k, "<missing>") != own.get(k, "<missing>")
        ]
        if differences:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the scheduler was saved with other settings ("
                + "; ".join(differences)
                + "). Build the scheduler with the settings it was saved with, from the optimizer before loading the "
                "optimizer's state (whose lr is the scheduled one, not the base lr)."
            )
        self.last_step = state_dict["step"]
        self._apply()

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self._config().items() if k != "schedule")
        return f"{type(self).__name__}({settings}, last_step={self.last_step})"


class ConstantLR(LRScheduler):
    r"""The base lr after warm-up: :math:`s(t) = \eta`.

    Unlike ``torch.optim.lr_scheduler.ConstantLR`` (which scales the lr by a factor for a while), this is the plain
    constant schedule; with ``warmup_steps=0`` it leaves the lr unchanged.
    """

    name = "constant"

    def _schedule(self, step: int) -> float:
        return self.base_lr


class StepLR(LRScheduler):
    r"""Decay by ``gamma`` every ``step_size`` steps.

    .. math::
        s(t) = \eta \, \gamma^{\lfloor t / \text{step\_size} \rfloor}

    Equals ``torch.optim.lr_scheduler.StepLR(step_size, gamma)`` stepped once per optimizer step.

    Args:
        optimizer: see :class:`LRScheduler`.
        step_size: steps between decays (>= 1).
        gamma: the decay factor (> 0, default 0.1).
        warmup_steps: see :class:`LRScheduler`.
    """

    name = "step"

    def __init__(self, optimizer: Any, step_size: int, gamma: float = 0.1, *, warmup_steps: int = 0) -> None:
        _check_int("step_size", step_size, 1)
        _check_real("gamma", gamma, 0.0, strict=True)
        self.step_size = step_size
        self.gamma = float(gamma)
        super().__init__(optimizer, warmup_steps=warmup_steps)

    def _schedule(self, step: int) -> float:
        return self.base_lr * self.gamma ** (step // self.step_size)

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "step_size": self.step_size, "gamma": self.gamma}


class CosineLR(LRScheduler):
    r"""Cosine decay from the base lr to ``min_lr`` over the steps after warm-up, then constant at ``min_lr``.

    With :math:`T = \text{total\_steps} - W`:

    .. math::
        s(t) = \eta_{\min} + \tfrac12 (\eta - \eta_{\min}) \left(1 + \cos\frac{\pi \min(t, T)}{T}\right)

    For :math:`t \le T` this is ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T, eta_min=min_lr)``; past ``T``
    torch's lr climbs back up while this one stays at ``min_lr``.

    Args:
        optimizer: see :class:`LRScheduler`.
        total_steps: the length of training in optimizer steps, warm-up included (> ``warmup_steps``).
        min_lr: the final lr (0 <= ``min_lr`` <= base lr, default 0).
        warmup_steps: see :class:`LRScheduler`.
    """

    name = "cosine"

    def __init__(self, optimizer: Any, total_steps: int, min_lr: float = 0.0, *, warmup_steps: int = 0) -> None:
        _check_int("total_steps", total_steps, 1)
        _check_real("min_lr", min_lr, 0.0)
        self.total_steps = total_steps
        self.min_lr = float(min_lr)
        super().__init__(optimizer, warmup_steps=warmup_steps)

    def _check_config(self) -> None:
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"CosineLR: total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps}), "
                "leaving steps for the cosine decay"
            )
        if self.min_lr > self.base_lr:
            raise ValueError(
                f"CosineLR: min_lr ({self.min_lr}) is above the optimizer's lr ({self.base_lr}); the cosine decays "
                "from the lr down to min_lr, so choose min_lr <= lr"
            )

    def _schedule(self, step: int) -> float:
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(step, decay_steps) / decay_steps
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "total_steps": self.total_steps, "min_lr": self.min_lr}


SCHEDULES: tuple[str, ...] = (ConstantLR.name, StepLR.name, CosineLR.name)


def make_scheduler(
    name: str,
    optimizer: Any,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    step_size: int | None = None,
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> LRScheduler:
    """Build the schedule called ``name`` (one of :data:`SCHEDULES`), e.g. from command-line options.

    Settings that the named schedule does not use are ignored (``step_size`` and ``gamma`` belong to ``'step'``,
    ``min_lr`` to ``'cosine'``); ``total_steps`` (the length of training in optimizer steps) bounds the warm-up for
    every schedule and sets the length of the cosine.

    Raises:
        ValueError: for an unknown name, a warm-up longer than training, ``'step'`` without ``step_size``, or an
            invalid setting.
    """
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) is longer than training (total_steps={total_steps})")
    if name == ConstantLR.name:
        return ConstantLR(optimizer, warmup_steps=warmup_steps)
    if name == StepLR.name:
        if step_size is None:
            raise ValueError("the 'step' schedule needs step_size (optimizer steps between lr decays)")
        return StepLR(optimizer, step_size, gamma, warmup_steps=warmup_steps)
    if name == CosineLR.name:
        return CosineLR(optimizer, total_steps, min_lr, warmup_steps=warmup_steps)
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(map(repr, SCHEDULES))}")
