r"""Learning-rate schedules, built from ``torch.optim.lr_scheduler`` and stepped once per optimizer step.

:func:`make_scheduler` composes torch's schedulers: an optional linear warm-up (``LinearLR``), then the schedule proper
(``constant``: the lr as it is; ``step``: ``StepLR``; ``cosine``: ``CosineAnnealingLR`` down to ``min_lr`` at the end of
training), chained with ``SequentialLR``. With ``W`` warm-up steps and base learning rate :math:`\eta` the lr of step
``t`` (0-based) is

.. math::
    \eta_t = \begin{cases} \eta \, \dfrac{t + 1}{W + 1} & t < W \\ s(t - W) & t \ge W \end{cases}

— the warm-up rises in equal steps from :math:`\eta / (W + 1)` (no wasted step at lr 0) to :math:`\eta`. Being torch's,
the schedulers save and restore with ``state_dict``/``load_state_dict`` and drive any ``torch.optim.Optimizer``; the
optimizer's ``lr`` is a plain number they rewrite, which the fast step copies into a device tensor (CUDA graphs need
no recapture).
"""

from __future__ import annotations

import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR,
                                      StepLR)

SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine")

# SequentialLR of torch before 2.5 passes an epoch to its schedulers' step(), which then warns of that argument's
# deprecation at every milestone: torch's own call, not the user's, and nothing to act on.
warnings.filterwarnings("ignore", message=r"The epoch parameter in `scheduler\.step\(\)`", category=UserWarning)


def make_scheduler(name: str, optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0,
                   step_size: int | None = None, gamma: float = 0.1, min_lr: float = 0.0) -> LRScheduler:
    """The schedule called ``name`` (one of :data:`SCHEDULES`) over ``total_steps`` optimizer steps, after
    ``warmup_steps`` of linear warm-up.

    Args:
        step_size, gamma: the ``step`` schedule multiplies the lr by ``gamma`` every ``step_size`` steps.
        min_lr: where the ``cosine`` schedule ends.

    Raises:
        ValueError: for an unknown name, a warm-up as long as training, or ``step`` without ``step_size``.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warm-up ({warmup_steps} steps) must be shorter than training ({total_steps} steps)")
    if name == "step" and (step_size is None or step_size < 1):
        raise ValueError("the 'step' schedule needs step_size >= 1 (optimizer steps between lr decays)")
    if name == "constant":
        main: LRScheduler = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif name == "step":
        main = StepLR(optimizer, step_size, gamma)
    else:
        main = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=min_lr)
    if warmup_steps == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=1 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
