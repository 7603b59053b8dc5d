"""Bad input raises ``ValueError``/``RuntimeError`` whose message names the layer, what it expected and what it got."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from nnbackprop import (GELU, BatchNorm1d, BatchNorm2d, BCEWithLogitsLoss, Conv2d, CrossEntropyLoss, Dropout, Flatten,
                        LeakyReLU, Linear, Module, MSELoss, ReLU, Sequential, cnn, mlp)

LINEAR = "Linear(in_features=4, out_features=3, bias=True)"


def _ce(logits: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    return lambda: CrossEntropyLoss()(logits, target)


def _bce(logits: torch.Tensor, target: torch.Tensor) -> Callable[[], object]:
    return lambda: BCEWithLogitsLoss()(logits, target)


BAD_INPUTS = {
    "linear-feature-size": (lambda: Linear(4, 3)(torch.randn(2, 5)), [LINEAR, "expected 4 input features",
                                                                       "(N, 4)", "got shape (2, 5)"]),
    "linear-rank3": (lambda: Linear(4, 3)(torch.randn(2, 3, 4)), [LINEAR, "expected input of shape (N, 4)",
                                                                  "got shape (2, 3, 4) (rank 3)", "Flatten"]),
    "linear-rank1": (lambda: Linear(4, 3)(torch.randn(4)), [LINEAR, "(N, 4)", "got shape (4,) (rank 1)", "unsqueeze"]),
    "linear-integer-input": (lambda: Linear(4, 3)(torch.ones(2, 4, dtype=torch.long)),
                             [LINEAR, "expected a floating-point input", "got dtype torch.int64"]),
    "relu-uint8-input": (lambda: ReLU()(torch.ones(2, 4, dtype=torch.uint8)),
                         ["ReLU()", "floating-point", "torch.uint8", "/ 255"]),
    "flatten-not-a-tensor": (lambda: Flatten()([[1.0, 2.0]]), ["Flatten(start_dim=1, end_dim=-1)", "torch.Tensor",
                                                              "got list"]),
    "linear-dtype-differs": (lambda: Linear(4, 3)(torch.randn(2, 4, dtype=torch.float64)),
                             [LINEAR, "input dtype torch.float64", "parameters' torch.float32"]),
    "batchnorm-dtype-differs": (lambda: BatchNorm1d(4, dtype=torch.float64)(torch.randn(2, 4)),
                                ["BatchNorm1d(4", "input dtype torch.float32", "parameters' torch.float64"]),
    "linear-device-differs": (lambda: Linear(4, 3)(torch.empty(2, 4, device="meta")),
                              [LINEAR, "input is on meta", "parameters are on cpu"]),
    "model-names-the-failing-layer": (lambda: mlp(6, [5], 3, flatten=False)(torch.randn(2, 6)[:, :5]),
                                      ["Linear(in_features=6, out_features=5, bias=True)", "got shape (2, 5)"]),
    "batchnorm-feature-size": (lambda: BatchNorm1d(4)(torch.randn(3, 5)), ["BatchNorm1d(4", "(N, 4)", "(3, 5)"]),
    "batchnorm2d-flat-input": (lambda: BatchNorm2d(4)(torch.randn(3, 4)),
                               ["BatchNorm2d(4", "expected input of shape (N, 4, H, W)", "(rank 2)"]),
    "conv-images-flattened": (lambda: Conv2d(1, 2, 3)(torch.randn(2, 784)), ["Conv2d(1, 2", "(N, 1, H, W)",
                                                                            "got shape (2, 784) (rank 2)"]),
    "batchnorm-train-batch1": (lambda: BatchNorm1d(4)(torch.randn(1, 4)),
                               ["BatchNorm1d(4", "more than one sample", "got batch size 1", "model.eval()"]),
    "ce-label-too-large": (_ce(torch.randn(4, 3), torch.tensor([0, 1, 3, 2])),
                           ["CrossEntropyLoss()", "labels must be in [0, 2] for 3 classes", "found 3"]),
    "ce-label-negative": (_ce(torch.randn(4, 3), torch.tensor([0, -1, 2, 2])), ["in [0, 2]", "found -1"]),
    "ce-label-shape": (_ce(torch.randn(4, 3), torch.tensor([[0], [1], [2], [0]])),
                       ["CrossEntropyLoss()", "target must have shape (4,)", "input (4, 3)", "got (4, 1)"]),
    "ce-one-hot-labels": (_ce(torch.randn(4, 3), torch.eye(3)[[0, 1, 2, 0]]),
                          ["CrossEntropyLoss()", "integer class indices of shape (N,)", "got dtype torch.float32"]),
    "ce-float-labels": (_ce(torch.randn(2, 3), torch.tensor([0.0, 2.0])), ["integer class indices", "torch.float32"]),
    "ce-label-device": (_ce(torch.randn(2, 3), torch.tensor([0, 1], device="meta")),
                        ["CrossEntropyLoss()", "target is on meta but input is on cpu"]),
    "ce-logits-rank1": (_ce(torch.randn(4), torch.tensor([0, 1, 0, 1])),
                        ["CrossEntropyLoss()", "expected input of shape (N, C)", "got (4,)"]),
    "ce-integer-logits": (_ce(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1])),
                          ["CrossEntropyLoss()", "floating-point", "torch.int64"]),
    "bce-target-above-1": (_bce(torch.randn(3), torch.tensor([0.0, 2.0, 1.0])),
                           ["BCEWithLogitsLoss()", "targets must lie in [0, 1]", "found 2.0"]),
    "bce-target-negative": (_bce(torch.randn(3), torch.tensor([0.0, -0.5, 1.0])), ["[0, 1]", "found -0.5"]),
    "bce-target-count": (_bce(torch.randn(3), torch.tensor([0.0, 1.0])),
                         ["BCEWithLogitsLoss()", "3 labels", "input (3,)", "got (2,)"]),
    "bce-two-logits": (_bce(torch.randn(3, 2), torch.tensor([0, 1, 1])),
                       ["BCEWithLogitsLoss()", "one logit per sample", "(3, 2)", "CrossEntropyLoss"]),
    "mse-shape": (lambda: MSELoss()(torch.randn(3, 2), torch.randn(2, 3)),
                  ["MSELoss()", "target shape (2, 3)", "input shape (3, 2)"]),
    "mse-empty-batch": (lambda: MSELoss()(torch.randn(0, 3), torch.randn(0, 3)),
                        ["MSELoss(): got an empty batch (input of shape (0, 3)); a loss needs at least one example"]),
    "mse-empty-batch-labels": (lambda: MSELoss("sum")(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)),
                               ["MSELoss(): got an empty batch (input of shape (0, 3))"]),
    "ce-empty-batch": (_ce(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)),
                       ["CrossEntropyLoss(): got an empty batch (input of shape (0, 3))"]),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_a_message_naming_layer_expectation_and_value(name: str) -> None:
    call, expected = BAD_INPUTS[name]
    with pytest.raises(ValueError) as info:
        call()
    for part in expected:
        assert part in str(info.value), f"{part!r} missing from: {info.value}"


def _backward_without_forward(module: Module) -> None:
    module.backward(torch.ones(2, 3))


def _backward_twice(module: Module) -> None:
    module(torch.randn(2, 3))
    module.backward(torch.ones(2, 3))
    module.backward(torch.ones(2, 3))


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: Linear(3, 3), "Linear(in_features=3, out_features=3, bias=True)"),
        (ReLU, "ReLU()"),
        (GELU, "GELU(approximate='none')"),
        (lambda: Dropout(0.5), "Dropout(p=0.5)"),
        (Flatten, "Flatten(start_dim=1, end_dim=-1)"),
        (lambda: BatchNorm1d(3), "BatchNorm1d(3, eps=1e-05, momentum=0.1)"),
        (lambda: Sequential(Linear(3, 3), ReLU()), "Sequential()"),
    ],
    ids=["linear", "relu", "gelu", "dropout", "flatten", "batchnorm", "sequential"],
)
@pytest.mark.parametrize("misuse", [_backward_without_forward, _backward_twice], ids=["before-forward", "twice"])
def test_backward_needs_its_own_forward(build: Callable[[], Module], name: str,
                                        misuse: Callable[[Module], None]) -> None:
    with pytest.raises(RuntimeError, match=r"backward\(\) called without a forward\(\)") as info:
        misuse(build())
    assert str(info.value).startswith(f"{name}.backward()")


@pytest.mark.parametrize("loss", [CrossEntropyLoss(), MSELoss(), BCEWithLogitsLoss()], ids=["ce", "mse", "bce"])
def test_loss_backward_before_forward(loss: Module) -> None:
    with pytest.raises(RuntimeError, match=rf"^{type(loss).__name__}\(\)\.backward\(\) called without a forward"):
        loss.backward()


def test_loss_backward_twice() -> None:
    loss = CrossEntropyLoss()
    loss(torch.randn(2, 3), torch.tensor([0, 2]))
    loss.backward()
    with pytest.raises(RuntimeError, match=r"^CrossEntropyLoss\(\)\.backward\(\) called without a forward"):
        loss.backward()


BAD_ARGUMENTS = {
    "linear-zero-features": (lambda: Linear(0, 3), "Linear: in_features must be a positive integer, got 0"),
    "linear-float-features": (lambda: Linear(3, 2.0), "Linear: out_features must be a positive integer, got 2.0"),
    "linear-init": (lambda: Linear(2, 3, init="he"), "unknown init 'he', choose one of default, kaiming, xavier"),
    "dropout-p": (lambda: Dropout(1.5), "Dropout: p must be a number in [0, 1], got 1.5"),
    "dropout-text": (lambda: Dropout("0.5"), "Dropout: p must be a number in [0, 1], got '0.5'"),
    "leaky-slope-text": (lambda: LeakyReLU("0.1"), "LeakyReLU: negative_slope must be a number, got '0.1'"),
    "gelu-approximate": (lambda: GELU("fast"), "GELU: approximate must be 'none' or 'tanh', got 'fast'"),
    "batchnorm-features": (lambda: BatchNorm1d(0), "BatchNorm1d: num_features must be a positive integer, got 0"),
    "batchnorm2d-features": (lambda: BatchNorm2d(2.0), "BatchNorm2d: num_features must be a positive integer, got 2.0"),
    "conv-groups": (lambda: Conv2d(3, 6, 3, groups=2), "Conv2d: in_channels (3) and out_channels (6) must both be "
                                                       "divisible by groups (2)"),
    "cnn-stages": (lambda: cnn((3, 8, 8), [16, 32, 64, 128], 10), "cnn: 8x8 images are too small for 4 stages"),
    "mlp-activation": (lambda: mlp(4, [3], 2, activation="swish"), "unknown activation 'swish'"),
    "mlp-hidden": (lambda: mlp(4, [3, 0], 2), "hidden layer widths must be positive integers, got [3, 0]"),
    "mlp-hidden-int": (lambda: mlp(784, 512, 10), "mlp: hidden must be a list of layer widths such as [512, 512]"),
    "mlp-hidden-float": (lambda: mlp(784, [2.5], 10), "hidden layer widths must be positive integers, got [2.5]"),
    "mlp-in-features": (lambda: mlp("784", [8], 10), "in_features and out_features must be positive integers"),
    "mlp-dropout": (lambda: mlp(4, [3], 2, dropout=1.0), "dropout must be a number in [0, 1), got 1.0"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_constructor_arguments_are_rejected(name: str) -> None:
    build, message = BAD_ARGUMENTS[name]
    with pytest.raises(ValueError) as info:
        build()
    assert message in str(info.value)
