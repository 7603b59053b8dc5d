"""The gradient checker itself: it passes correct user layers, and fails wrong backwards, wrong forwards and wrong
losses, through autograd and through finite differences."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from torch.autograd.gradcheck import GradcheckError
from conftest import assert_failed, assert_passed, make_input
from user_layers import Scale, Swish

from nnbackprop import (BatchNorm1d, CrossEntropyLoss, Dropout, Linear, MaxPool2d, Module, Parameter, ReLU,
                        Sequential, check_gradients, check_gradients_fd)
from nnbackprop import functional as F
from nnbackprop.gradcheck import LAYOUTS, TOLERANCES, builtin_checks, compare
from nnbackprop.module import ReferenceForwardError

F64 = torch.float64


class ReLUForgetsMask(ReLU):
    """Backward passes ``dout`` straight through, as if ReLU were the identity."""

    def _backward(self, dout: torch.Tensor, out: torch.Tensor, dx: torch.Tensor | None) -> torch.Tensor:
        return dout


class LinearWrongdW(Linear):
    """A ``Linear`` whose weight gradient is passed through ``wrong`` (e.g. scaled or transposed)."""

    def __init__(self, features: int, wrong: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(features, features, dtype=F64, generator=torch.Generator().manual_seed(0))
        self.wrong = wrong

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        dx = super().backward(dout)
        self.weight.grad = self.wrong(self.weight.grad)
        return dx


class LeakyPretendingReLU(ReLU):
    """A leaky forward with its own, consistent backward; it keeps ``ReLU.reference_forward``."""

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return F.leaky_relu_forward(x, 0.1, out=out), x

    def _backward(self, dout: torch.Tensor, x: torch.Tensor, dx: torch.Tensor | None) -> torch.Tensor:
        return F.leaky_relu_backward(dout, x, 0.1, dx=dx)


class CrossEntropyForgetsMean(CrossEntropyLoss):
    """Backward of the summed loss for a mean-reduced forward."""

    def backward(self, dloss: torch.Tensor | float = 1.0) -> torch.Tensor:
        probs, target = self.saved_tensors
        return F.cross_entropy_backward(dloss, probs, target, "sum")


class SwishForgetsProductRule(Swish):
    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        x, s = self.saved_tensors
        return dout * s


class LayerNorm(Module):
    """A user's layer with parameters and no ``reference_forward``: normalise each row, then scale and shift."""

    def __init__(self, features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        g = torch.Generator().manual_seed(0)
        self.weight = Parameter(1 + 0.5 * torch.randn(features, generator=g, dtype=F64))
        self.bias = Parameter(0.5 * torch.randn(features, generator=g, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ndim=2, features=self.weight.shape[0])
        rstd = torch.rsqrt(x.var(1, unbiased=False, keepdim=True) + self.eps)  # (N, 1)
        xhat = (x - x.mean(1, keepdim=True)) * rstd  # (N, D)
        self.save_for_backward(xhat, rstd)
        return xhat * self.weight + self.bias

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        xhat, rstd = self.saved_tensors
        self.weight.accumulate((dout * xhat).sum(0))
        self.bias.accumulate(dout.sum(0))
        return self._dx(dout * self.weight, xhat, rstd)

    @staticmethod
    def _dx(dxhat: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        return (dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True)) * rstd


class LayerNormConstantStatistics(LayerNorm):
    """Treats the row mean and variance as constants: the ``dx`` of evaluation-mode batch norm, wrong here."""

    @staticmethod
    def _dx(dxhat: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        return dxhat * rstd


class LayerNormForgetsXhat(LayerNorm):
    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        dx = super().backward(dout)
        self.weight.grad = dout.sum(0)
        return dx


# name -> (module, input shape, the tensors whose check must fail; none for a correct module)
SUBJECTS: dict[str, tuple[Callable[[], Module], tuple[int, ...], tuple[str, ...]]] = {
    "swish": (Swish, (5, 7), ()),
    "layernorm": (lambda: LayerNorm(6), (4, 6), ()),
    "relu-forgets-mask": (ReLUForgetsMask, (5, 7), ("input",)),
    "linear-dW-scaled": (lambda: LinearWrongdW(4, lambda dW: 2 * dW), (3, 4), ("weight",)),
    "linear-dW-transposed": (lambda: LinearWrongdW(4, lambda dW: dW.t()), (3, 4), ("weight",)),
    "leaky-forward-with-relu-reference": (LeakyPretendingReLU, (5, 7), ("output", "input")),
    "swish-forgets-product-rule": (SwishForgetsProductRule, (5, 7), ("input",)),
    "layernorm-constant-statistics": (lambda: LayerNormConstantStatistics(6), (4, 6), ("input",)),
    "layernorm-dgamma-forgets-xhat": (lambda: LayerNormForgetsXhat(6), (4, 6), ("weight",)),
}
# A wrong forward with a consistent backward is invisible to finite differences; only the reference catches it.
FD_WRONG = [name for name, (_, _, failing) in SUBJECTS.items() if failing and "output" not in failing]


@pytest.mark.parametrize("name", SUBJECTS)
def test_check_gradients_passes_right_and_fails_wrong(name: str, gen: torch.Generator, device: torch.device,
                                                      dtype: torch.dtype) -> None:
    factory, shape, failing = SUBJECTS[name]
    module = factory().to(device=device, dtype=dtype)
    report = check_gradients(module, make_input(shape, gen, device=device, dtype=dtype), generator=gen)
    if failing:
        assert_failed(report, *failing)
        assert "FAIL" in str(report)
    else:
        assert_passed(report)


@pytest.mark.parametrize("name", SUBJECTS)
def test_finite_differences_pass_right_and_fail_wrong_backward(name: str, gen: torch.Generator) -> None:
    factory, shape, _ = SUBJECTS[name]
    x = make_input(shape, gen)
    assert check_gradients_fd(factory(), x) is (name not in FD_WRONG)
    if name in FD_WRONG:
        with pytest.raises(GradcheckError, match="Jacobian mismatch"):
            check_gradients_fd(factory(), x, raise_exception=True)


def test_wrong_loss_backward_fails(gen: torch.Generator) -> None:
    x, labels = make_input((5, 4), gen), torch.tensor([0, 3, 1, 1, 2])
    assert_passed(check_gradients(CrossEntropyLoss(), x, labels))
    assert_failed(check_gradients(CrossEntropyForgetsMean(), x, labels), "input")
    assert check_gradients_fd(CrossEntropyLoss(), x, labels) is True
    assert check_gradients_fd(CrossEntropyForgetsMean(), x, labels) is False


def test_check_leaves_hand_written_gradients_and_state_behind(gen: torch.Generator) -> None:
    layer = Linear(3, 2, dtype=F64, generator=gen)
    layer.weight.grad = torch.full((2, 3), 100.0, dtype=F64)
    x, dout = make_input((4, 3), gen), make_input((4, 2), gen)
    assert_passed(check_gradients(layer, x, dout=dout))
    torch.testing.assert_close(layer.weight.grad, dout.t() @ x)


def test_finite_differences_restore_buffers_and_clear_gradients(gen: torch.Generator) -> None:
    bn = BatchNorm1d(4, dtype=F64)
    bn.weight.grad = torch.ones(4, dtype=F64)
    state = bn.state_dict()
    assert check_gradients_fd(bn, make_input((6, 4), gen, scale=2.0, shift=1.0))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in bn.parameters())


def test_finite_differences_see_the_same_dropout_mask_in_every_evaluation(gen: torch.Generator) -> None:
    dropout = Dropout(0.5, generator=torch.Generator().manual_seed(3))
    assert check_gradients_fd(dropout, make_input((6, 4), gen))


def test_compare_is_relative_to_the_larger_of_the_reference_and_the_check_scale() -> None:
    zeros, rounding = torch.zeros(3, dtype=F64), torch.full((3,), 1e-13, dtype=F64)
    assert compare("bias", rounding, zeros, TOLERANCES[F64], scale=1.0).passed
    assert not compare("bias", rounding, zeros, TOLERANCES[F64], scale=1e-4).passed
    ref = torch.tensor([1e-3, -2e-3], dtype=F64)
    assert compare("w", ref * (1 + 1e-12), ref, TOLERANCES[F64]).passed
    assert not compare("w", ref * (1 + 1e-8), ref, TOLERANCES[F64]).passed
    assert not compare("w", torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), 1e-5).passed
    with pytest.raises(ValueError, match="shape"):
        compare("w", torch.zeros(2, 3), torch.zeros(3, 2), 1e-5)


def test_tolerances_are_tight_in_float64_and_loose_in_float32() -> None:
    assert TOLERANCES[torch.float64] <= 1e-10 < TOLERANCES[torch.float32] <= 1e-4


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: check_gradients(CrossEntropyLoss(), torch.randn(2, 3)), ValueError, "a loss needs a target"),
        (lambda: check_gradients_fd(ReLU(), torch.randn(2, 3)), ValueError, "needs float64"),
        (lambda: check_gradients(ReLU(), torch.ones(2, 3, dtype=torch.int64)), ValueError, "pass rtol"),
    ],
    ids=["loss-without-target", "fd-in-float32", "no-tolerance-for-dtype"],
)
def test_checker_misuse_is_reported(call: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("dtype_", [torch.float64, torch.float32])
def test_builtin_checks_all_pass(dtype_: torch.dtype, device: torch.device) -> None:
    reports = builtin_checks(device, dtype_)
    assert len(reports) > 40
    covered = " ".join(report.subject for report in reports)
    for layer in ("Conv2d", "depthwise", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm2d", "CNN"):
        assert layer in covered
    for report in reports:
        assert_passed(report)


# ------------------------------------------------------------------------------------------------------ untraceable


class SwishThroughNumPy(Swish):
    def forward(self, x):
        s = torch.from_numpy(1 / (1 + np.exp(-x.numpy())))
        self.save_for_backward(x, s)
        return x * s


class SwishDetached(Swish):
    def forward(self, x):
        return super().forward(x).detach()


class DoublesInPlace(Module):
    def forward(self, x):
        x.mul_(2)
        return x

    def backward(self, dout):
        return 2 * dout


class ScaleOfData(Scale):
    def forward(self, x):
        self.save_for_backward(x)
        return x.data * self.gamma


@pytest.mark.parametrize("layer, why, in_model", [
    (SwishThroughNumPy(), "RuntimeError: Can't call numpy() on Tensor that requires grad", False),
    (SwishThroughNumPy(), "RuntimeError: Can't call numpy() on Tensor that requires grad", True),
    (SwishDetached(), "its output is not connected to its input or parameters", False),
    (SwishDetached(), "its output is not connected to its input or parameters", True),
    (DoublesInPlace(), "RuntimeError: a leaf Variable that requires grad is being used in an in-place operation",
     False),  # (after a layer, its input is no leaf: autograd follows the in-place op)
], ids=["numpy", "numpy-in-a-model", "detach", "detach-in-a-model", "in-place"])
def test_a_forward_autograd_cannot_follow_asks_for_a_reference_forward(layer, why, in_model):
    x = torch.randn(4, 5, dtype=F64)
    subject = Sequential(Linear(5, 5, dtype=F64), layer) if in_model else layer
    with pytest.raises(ReferenceForwardError) as info:
        check_gradients(subject, x)
    name = type(layer).__name__
    assert str(info.value).startswith(f"{name}(): autograd cannot follow its forward ({why}")
    assert str(info.value).endswith("; write a reference_forward(self, x, params) for it with differentiable torch "
                                    "ops (no .data, .detach(), .item(), NumPy, in-place ops on the input), see "
                                    "Module.reference_forward")
    assert "\n" not in str(info.value)


def test_an_input_hidden_from_autograd_is_not_blamed_on_the_layers_before():
    """``x.data`` cuts the input off: the Linear before it used to FAIL, as if its backward were wrong."""
    model = Sequential(Linear(5, 4, dtype=F64), ScaleOfData(4).to(F64))
    with pytest.raises(ReferenceForwardError, match=r"^check_gradients\(Sequential\(\)\): autograd finds no path from "
                       r"the output to input, 0.weight, 0.bias, whose hand-written gradient is not zero: the forward "
                       r"of ScaleOfData\(\) hides them from autograd .*write a reference_forward"):
        check_gradients(model, torch.randn(3, 5, dtype=F64))


def test_a_reference_forward_that_returns_something_autograd_cannot_use():
    class ScaleWithBadReference(Scale):
        def reference_forward(self, x, params):
            return (x * params["gamma"]).detach()

    with pytest.raises(ReferenceForwardError, match=r"^check_gradients\(ScaleWithBadReference\(\)\): its "
                       "reference_forward returned a tensor not connected to the input or parameters"):
        check_gradients(ScaleWithBadReference(3).to(F64), torch.randn(2, 3, dtype=F64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_built_in_suite_passes_in_bfloat16_within_a_tolerance_derived_from_its_precision(layout):
    """bfloat16 keeps 8 bits of mantissa: the tolerance is eight roundings of half a unit in the last place, and every
    built-in check — the deep GELU + dropout + batch-norm MLP and the CNN with max pooling included — lies within it,
    in both layouts, on twelve random draws of inputs and weights."""
    assert TOLERANCES[torch.bfloat16] == 8 * torch.finfo(torch.bfloat16).eps / 2 == 2 ** -5
    for seed in range(12):
        reports = builtin_checks("cpu", torch.bfloat16, layout=layout, seed=seed)
        assert reports and all(r.passed for r in reports), \
            f"seed {seed}:\n" + "\n".join(str(r) for r in reports if not r.passed)


class NudgeFirst(Module):
    """Scales the first pixel of each row by ``factor`` in forward and backward; its reference is the identity."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., 0] *= self.factor
        return out

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        dx = dout.clone()
        dx[..., 0] *= self.factor
        return dx

    def reference_forward(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        return x * 1


def test_a_16_bit_check_follows_the_path_our_forward_took():
    """A near-tie that our bfloat16 forward decides the other way from float64 (and from torch in bfloat16) sends the
    gradient to another pixel: the check follows our forward's path (which max-pool window won) and measures rounding
    there. A nudge of 2^-6 (within bfloat16's rounding) passes; one of 2^-4 fails."""
    x = torch.tensor([[[[1.0, 1.0078125]]]], dtype=torch.bfloat16)  # adjacent in bfloat16: the second is larger
    dout = torch.ones(1, 1, 1, 1, dtype=torch.bfloat16)
    within = Sequential(NudgeFirst(1 + 2 ** -6), MaxPool2d((1, 2)))  # 1.015625 > 1.0078125: our max is the first
    report = check_gradients(within, x, dout=dout)
    assert report.passed, str(report)
    assert report.checks[1].name == "input" and report.checks[1].max_rel_err == pytest.approx(2 ** -6, rel=0.01)
    beyond = check_gradients(Sequential(NudgeFirst(1 + 2 ** -4), MaxPool2d((1, 2))), x, dout=dout)
    assert not beyond.passed and beyond.checks[1].max_rel_err > TOLERANCES[torch.bfloat16], str(beyond)
