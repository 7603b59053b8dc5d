"""Every loss and reduction: hand-written backward against autograd and finite differences, value against
``torch.nn``, stability for extreme logits."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from conftest import assert_passed, make_input

from nnbackprop import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss, check_gradients, check_gradients_fd

F64 = torch.float64
Target = Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]


def _labels(dtype: torch.dtype = torch.long) -> Target:
    """Class indices ``(N,)`` for logits ``(N, C)``."""
    return lambda g, shape: torch.randint(0, shape[1], (shape[0],), generator=g).to(dtype)


def _binary(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, 2, (shape[0],), generator=g)


def _like_input(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=F64)


def _probabilities(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=g, dtype=F64)


# name -> (loss, input shape, input scale, target maker)
LOSSES: dict[str, tuple[Callable[[], Loss], tuple[int, ...], float, Target]] = {
    "ce-mean": (CrossEntropyLoss, (6, 10), 1.0, _labels()),
    "ce-sum-large-logits": (lambda: CrossEntropyLoss("sum"), (5, 3), 20.0, _labels()),
    "ce-mean-batch1": (CrossEntropyLoss, (1, 4), 1.0, _labels()),
    "ce-int32-labels": (CrossEntropyLoss, (4, 5), 1.0, _labels(torch.int32)),
    "mse-mean": (MSELoss, (4, 3), 1.0, _like_input),
    "mse-sum-rank3": (lambda: MSELoss("sum"), (2, 3, 4), 1.0, _like_input),
    "mse-half_sum": (lambda: MSELoss("half_sum"), (3, 2), 1.0, _like_input),
    "mse-half_sum-labels": (lambda: MSELoss("half_sum"), (4, 3), 1.0, _labels()),
    "mse-mean-batch1": (MSELoss, (1, 5), 1.0, _like_input),
    "bce-mean-labels": (BCEWithLogitsLoss, (8,), 30.0, _binary),
    "bce-sum-probabilities-n1": (lambda: BCEWithLogitsLoss("sum"), (8, 1), 1.0, _probabilities),
    "bce-mean-batch1": (BCEWithLogitsLoss, (1,), 1.0, _binary),
}


def _build(name: str, gen: torch.Generator, device: torch.device | str = "cpu", dtype: torch.dtype = F64,
           layout: str = "contiguous") -> tuple[Loss, torch.Tensor, torch.Tensor]:
    factory, shape, scale, target = LOSSES[name]
    x = make_input(shape, gen, device=device, dtype=dtype, layout=layout, scale=scale)
    t = target(gen, shape)
    return factory(), x, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def _torch_loss(loss: Loss, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The same loss computed by the ``torch.nn`` module of the same name."""
    if isinstance(loss, CrossEntropyLoss):
        return torch.nn.CrossEntropyLoss(reduction=loss.reduction)(x, t.long())
    if isinstance(loss, BCEWithLogitsLoss):
        return torch.nn.BCEWithLogitsLoss(reduction=loss.reduction)(x, t.reshape(x.shape).to(x.dtype))
    if not t.is_floating_point():
        t = torch.nn.functional.one_hot(t, x.shape[1]).to(x.dtype)
    if loss.reduction == "half_sum":
        return 0.5 * torch.nn.MSELoss(reduction="sum")(x, t)
    return torch.nn.MSELoss(reduction=loss.reduction)(x, t)


@pytest.mark.parametrize("name", LOSSES)
def test_backward_matches_autograd(name: str, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
                                   layout: str) -> None:
    loss, x, t = _build(name, gen, device, dtype, layout)
    assert_passed(check_gradients(loss, x, t))


@pytest.mark.parametrize("name", LOSSES)
def test_backward_matches_finite_differences(name: str, gen: torch.Generator) -> None:
    loss, x, t = _build(name, gen)
    assert check_gradients_fd(loss, x, t)


@pytest.mark.parametrize("name", LOSSES)
def test_value_matches_torch_nn(name: str, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> None:
    loss, x, t = _build(name, gen, device, dtype)
    value = loss(x, t)
    assert value.shape == ()
    torch.testing.assert_close(value, _torch_loss(loss, x, t))


@pytest.mark.parametrize("name", LOSSES)
def test_backward_scales_with_dloss(name: str, gen: torch.Generator) -> None:
    loss, x, t = _build(name, gen)
    loss(x, t)
    dx = loss.backward()
    loss(x, t)
    torch.testing.assert_close(loss.backward(torch.tensor(2.5, dtype=F64)), 2.5 * dx)


@pytest.mark.parametrize("loss", [CrossEntropyLoss(), BCEWithLogitsLoss()], ids=["ce", "bce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_stay_finite_and_match_torch(loss: Loss, dtype: torch.dtype) -> None:
    if isinstance(loss, CrossEntropyLoss):
        x, t = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 1e4, 0.0]], dtype=dtype), torch.tensor([2, 1])
    else:
        x, t = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=dtype), torch.tensor([0, 1, 1, 0])
    value = loss(x, t)
    dx = loss.backward()
    assert torch.isfinite(value) and torch.isfinite(dx).all()
    torch.testing.assert_close(value, _torch_loss(loss, x, t))
    assert_passed(check_gradients(loss, x, t))


@pytest.mark.parametrize("cls, reduction", [(CrossEntropyLoss, "half_sum"), (BCEWithLogitsLoss, "none"),
                                             (MSELoss, "avg")])
def test_unknown_reduction_is_rejected(cls: type[Loss], reduction: str) -> None:
    with pytest.raises(ValueError, match=rf"{cls.__name__}: reduction must be one of .*'mean'.*got '{reduction}'"):
        cls(reduction)
