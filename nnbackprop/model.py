"""Models: the container :class:`Sequential`, the :func:`mlp` and :func:`cnn` builders, and the bridge to
``torch.nn``."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from nnbackprop.conv import AdaptiveAvgPool2d, Conv2d, MaxPool2d
from nnbackprop.init import SCHEMES
from nnbackprop.layers import GELU, BatchNorm1d, BatchNorm2d, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from nnbackprop.module import Module

ACTIVATIONS: dict[str, type[Module]] = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "gelu": GELU,
}


class Sequential(Module):
    """Layers applied in order; ``backward`` runs them in reverse, each layer's ``dx`` becoming the ``dout`` of the
    layer before it. Children are named ``"0"``, ``"1"``, … so ``state_dict`` keys match ``torch.nn.Sequential``.

    When ``needs_input_grad`` is cleared (a training step does, as the model's input is data), backward stops at the
    first layer with parameters, which is told not to compute its ``dx``, and the layers before it are skipped."""

    def __init__(self, *layers: Module) -> None:
        super().__init__()
        for layer in layers:
            self.append(layer)

    def append(self, layer: Module) -> "Sequential":
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential takes nnbackprop modules, got {type(layer).__name__}")
        setattr(self, str(len(self._modules)), layer)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._modules.values():
            x = layer(x)
        return x

    def backward(self, dout: Tensor) -> Tensor | None:
        layers = list(self._modules.values())
        stop = 0
        if not self.needs_input_grad:
            stop = next((i for i, layer in enumerate(layers) if next(layer.parameters(), None) is not None),
                        len(layers))
            for layer in layers[:stop]:
                layer.release_saved()
        for i in range(len(layers) - 1, stop - 1, -1):
            layers[i].needs_input_grad = self.needs_input_grad or i > stop
            dout = layers[i].backward(dout)
        return dout if self.needs_input_grad else None

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        for name, layer in self._modules.items():
            prefix = name + "."
            x = layer.reference_forward(x, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})
        return x

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.Sequential(*(layer.to_torch() for layer in self))


def to_torch(model: Module) -> torch.nn.Module:
    """The equivalent ``torch.nn`` model with copies of ``model``'s weights and buffers, in the same train/eval mode.

    ``to_torch(model).state_dict()`` has the same keys and shapes as ``model.state_dict()``, so weights move both ways.
    """
    return model.to_torch().train(model.training)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_common(builder: str, activation: str, dropout: float, init: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{builder}: unknown activation '{activation}', choose one of {', '.join(ACTIVATIONS)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{builder}: dropout must be a number in [0, 1), got {dropout!r}")
    if init not in SCHEMES:
        raise ValueError(f"{builder}: unknown init '{init}', choose one of {', '.join(SCHEMES)}")


def _widths(builder: str, what: str, widths: Any, example: str) -> list[int]:
    if isinstance(widths, (int, str)) or not isinstance(widths, Sequence):
        raise ValueError(f"{builder}: {what} must be a list of widths such as {example}, got {widths!r}")
    if not all(_positive_int(w) for w in widths):
        raise ValueError(f"{builder}: {what} must be positive integers, got {list(widths)}")
    return list(widths)


def _dense(width: int, hidden: Sequence[int], out_features: int, *, activation: str, dropout: float,
           batchnorm: bool, init: str, device: torch.device | str | None, dtype: torch.dtype | None,
           generator: torch.Generator | None) -> list[Module]:
    """``(Linear → [BatchNorm1d] → activation → [Dropout]) × len(hidden) → Linear``, from ``width`` features."""
    layers: list[Module] = []
    for h in hidden:
        layers.append(Linear(width, h, init=init, device=device, dtype=dtype, generator=generator))
        if batchnorm:
            layers.append(BatchNorm1d(h, device=device, dtype=dtype))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(Dropout(dropout, generator=generator))
        width = h
    layers.append(Linear(width, out_features, init=init, device=device, dtype=dtype, generator=generator))
    return layers


def mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    *,
    activation: str = "relu",
    dropout: float = 0.0,
    batchnorm: bool = False,
    init: str = "default",
    flatten: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Sequential:
    """A multilayer perceptron:
    ``[Flatten] → (Linear → [BatchNorm1d] → activation → [Dropout]) × len(hidden) → Linear``.

    Args:
        in_features: flattened input size (784 for 28×28 images).
        hidden: hidden layer widths, e.g. ``[512, 512]``; empty for a linear model.
        out_features: number of outputs (classes, or 1 for a binary task with ``BCEWithLogitsLoss``).
        activation: one of ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``gelu``.
        dropout: drop probability after each hidden activation (0 for none).
        batchnorm: insert ``BatchNorm1d`` after each hidden ``Linear``.
        init: ``Linear`` initialisation, see :class:`~nnbackprop.layers.Linear`.
        flatten: start with ``Flatten()`` so image batches ``(N, C, H, W)`` can be fed directly.
        generator: random source for the initial weights and the dropout masks.
    """
    if not _positive_int(in_features) or not _positive_int(out_features):
        raise ValueError(f"mlp: in_features and out_features must be positive integers, got {in_features!r} and "
                         f"{out_features!r}")
    if isinstance(hidden, (int, str)) or not isinstance(hidden, Sequence):
        raise ValueError(f"mlp: hidden must be a list of layer widths such as [512, 512] (or [] for none), got "
                         f"{hidden!r}")
    if not all(_positive_int(h) for h in hidden):
        raise ValueError(f"mlp: hidden layer widths must be positive integers, got {list(hidden)}")
    _check_common("mlp", activation, dropout, init)
    layers: list[Module] = [Flatten()] if flatten else []
    layers += _dense(in_features, hidden, out_features, activation=activation, dropout=dropout, batchnorm=batchnorm,
                     init=init, device=device, dtype=dtype, generator=generator)
    return Sequential(*layers)


def cnn(
    input_shape: tuple[int, int, int],
    channels: Sequence[int] = (32, 64, 128),
    num_classes: int = 10,
    *,
    convs_per_stage: int = 2,
    kernel_size: int = 3,
    activation: str = "relu",
    batchnorm: bool = True,
    dropout: float = 0.0,
    hidden: Sequence[int] = (),
    init: str = "default",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> Sequential:
    """A VGG-style convolutional network: one stage per entry of ``channels``, each
    ``(Conv2d k×k, padding k // 2 → [BatchNorm2d] → activation) × convs_per_stage → MaxPool2d(2)``, then the head
    ``AdaptiveAvgPool2d(1) → Flatten → [Dropout] → (Linear → activation → [Dropout]) × len(hidden) → Linear``.

    Each stage keeps the image size through its convolutions and halves it in the pooling; global average pooling
    then turns each of the last stage's channels into one feature, whatever the image size. A convolution followed by
    batch norm has no bias (the norm's mean subtraction would cancel it; its ``β`` takes the role).

    Args:
        input_shape: ``(C, H, W)`` of one image, e.g. ``(3, 64, 64)``; each side must survive ``len(channels)``
            halvings.
        channels: output channels of each stage, e.g. ``(32, 64, 128)``.
        num_classes: outputs of the last ``Linear``.
        convs_per_stage: convolutions per stage.
        kernel_size: odd size of the square kernels.
        activation: one of ``relu``, ``leaky_relu``, ``sigmoid``, ``tanh``, ``gelu``.
        batchnorm: ``BatchNorm2d`` after each convolution.
        dropout: drop probability before each ``Linear`` of the head (0 for none).
        hidden: widths of hidden ``Linear`` layers in the head (none by default).
        init: ``Conv2d``/``Linear`` initialisation, see :func:`nnbackprop.init.reset_`.
        generator: random source for the initial weights and the dropout masks.
    """
    if (isinstance(input_shape, (int, str)) or not isinstance(input_shape, Sequence) or len(input_shape) != 3
            or not all(_positive_int(v) for v in input_shape)):
        raise ValueError(f"cnn: input_shape must be (C, H, W) of one image, three positive integers such as "
                         f"(3, 64, 64), got {input_shape!r}")
    stages = _widths("cnn", "channels", channels, "(32, 64, 128)")
    if not stages:
        raise ValueError("cnn: channels must name at least one stage, e.g. (32, 64, 128)")
    hidden = _widths("cnn", "hidden", hidden, "[256] (or [] for none)")
    if not _positive_int(num_classes):
        raise ValueError(f"cnn: num_classes must be a positive integer, got {num_classes!r}")
    if not _positive_int(convs_per_stage):
        raise ValueError(f"cnn: convs_per_stage must be a positive integer, got {convs_per_stage!r}")
    if not _positive_int(kernel_size) or kernel_size % 2 == 0:
        raise ValueError(f"cnn: kernel_size must be an odd positive integer (padding k // 2 keeps the image size), "
                         f"got {kernel_size!r}")
    if not isinstance(batchnorm, bool):
        raise ValueError(f"cnn: batchnorm must be True or False, got {batchnorm!r}")
    _check_common("cnn", activation, dropout, init)
    in_channels, height, width = input_shape
    if min(height, width) < 2 ** len(stages):
        raise ValueError(f"cnn: {height}x{width} images are too small for {len(stages)} stages (each halves them, "
                         f"2x2 max pooling); use at most {min(height, width).bit_length() - 1} stages or larger images")
    layers: list[Module] = []
    for out_channels in stages:
        for _ in range(convs_per_stage):
            layers.append(Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                 bias=not batchnorm, init=init, device=device, dtype=dtype, generator=generator))
            if batchnorm:
                layers.append(BatchNorm2d(out_channels, device=device, dtype=dtype))
            layers.append(ACTIVATIONS[activation]())
            in_channels = out_channels
        layers.append(MaxPool2d(2))
    layers += [AdaptiveAvgPool2d(1), Flatten()]
    if dropout > 0:
        layers.append(Dropout(dropout, generator=generator))
    layers += _dense(in_channels, hidden, num_classes, activation=activation, dropout=dropout, batchnorm=False,
                     init=init, device=device, dtype=dtype, generator=generator)
    return Sequential(*layers)
