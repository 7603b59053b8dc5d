"""What a classifier's output says, and how well it says it: the one prediction rule and the one evaluation loop.

:func:`predicted_classes` is the rule everything uses — training's accuracy (:func:`num_correct`), validation and test
(:func:`evaluate`), ``nnbackprop evaluate`` and ``predict`` (:func:`class_probabilities`): the class with the largest
output, or for a single logit (a two-class model trained with ``bce``) class 1 when the logit is positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from nnbackprop.losses import Loss
from nnbackprop.module import Module

Reduce = Callable[..., tuple[Tensor, ...]]
"""Sums 0-dim tensors over data-parallel ranks (:func:`nnbackprop.distributed.reduce_metrics` bound to a context)."""


def _one_logit(output: Tensor) -> bool:
    return output.dim() < 2 or output.shape[1] == 1


def predicted_classes(output: Tensor) -> Tensor:
    """The predicted class of each row of a model's output, ``(N,)`` int64: ``output (N, C)``: the largest output
    (argmax); ``output (N,)`` or ``(N, 1)``, one logit: 1 where it is positive, else 0."""
    return (output.reshape(-1) > 0).long() if _one_logit(output) else output.argmax(1)


def class_probabilities(output: Tensor) -> Tensor:
    """The probability of each class from a model's output.

    ``output (N, C)``: the softmax of the logits (for a model trained with ``mse`` these are its outputs' softmax, a
    ranking more than a calibrated probability); ``output (N,)`` or ``(N, 1)``, one logit of a two-class model
    (``bce``): ``p(class 1) = sigmoid(logit)`` and ``p(class 0) = 1 - p(class 1)``. The most likely class is
    :func:`predicted_classes`'s.

    Returns:
        ``(N, C)`` (``(N, 2)`` for one logit), each row summing to 1, in at least float32.
    """
    output = output.to(torch.promote_types(output.dtype, torch.float32))
    if _one_logit(output):
        p1 = torch.sigmoid(output.reshape(-1))
        return torch.stack([1 - p1, p1], dim=1)
    return torch.softmax(output, dim=1)


def num_correct(output: Tensor, target: Tensor) -> Tensor:
    """How many :func:`predicted_classes` are right, as a 0-dim int64 tensor on the device (no host sync).

    ``target``: class labels ``(N,)``, or float targets shaped like the output (one-hot or soft), whose argmax (or,
    for one output, whether it is above ½) is the class.
    """
    if target.is_floating_point() and target.shape == output.shape:
        target = (target.reshape(-1) > 0.5).long() if _one_logit(output) else target.argmax(1)
    return (predicted_classes(output) == target).sum()


@dataclass(frozen=True)
class Scores:
    """How a model did on a set of labelled examples: mean ``loss``, ``accuracy`` (a fraction), ``num_examples``, and
    with ``num_classes`` given to :func:`evaluate`, ``confusion`` ``[true, predicted]`` int64 ``(C, C)`` on the CPU."""

    loss: float
    accuracy: float
    num_examples: int
    confusion: Tensor | None = None


@torch.no_grad()
def evaluate(model: Module, loss_fn: Loss, batches: Iterable[tuple[Tensor, Tensor]], *, num_classes: int | None = None,
             reduce: Reduce | None = None) -> Scores:
    """The mean loss and accuracy of ``model`` over ``batches`` of ``(x, y)``, in evaluation mode (dropout off, batch
    norm on running statistics; the model's mode is restored), under ``torch.no_grad()`` (nothing is saved for a
    backward). One host sync, at the end.

    Args:
        num_classes: also count the confusion matrix (labels ``y`` must be class indices).
        reduce: sum the loss, correct and example counts over data-parallel ranks, so every rank gets the whole
            split's scores (not with ``num_classes``).

    Raises:
        ValueError: there were no examples.
    """
    if num_classes is not None and reduce is not None:
        raise ValueError("evaluate: the confusion matrix is not reduced over ranks; pass num_classes or reduce")
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    confusion = torch.zeros(num_classes ** 2, dtype=torch.int64, device=device) if num_classes else None
    count = 0
    try:
        for x, y in batches:
            output = model(x)
            loss_sum += loss_fn(output, y).double() * len(y)
            correct += num_correct(output, y)
            count += len(y)
            if confusion is not None:
                confusion += torch.bincount(y * num_classes + predicted_classes(output), minlength=num_classes ** 2)
    finally:
        model.train(was_training)
    total = torch.tensor(count, dtype=torch.int64, device=device)
    if reduce is not None:
        loss_sum, correct, total = reduce(loss_sum, correct, total)
    n = int(total)
    if n == 0:
        raise ValueError("evaluate: there are no examples to evaluate")
    matrix = confusion.view(num_classes, num_classes).cpu() if confusion is not None else None
    return Scores(loss_sum.item() / n, correct.item() / n, n, matrix)
