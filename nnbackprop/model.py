"""Models: the container :class:`Sequential`, the :func:`mlp` builder, and the bridge to ``torch.nn``."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from nnbackprop.layers import GELU, BatchNorm1d, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
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
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if not positive_int(in_features) or not positive_int(out_features):
        raise ValueError(f"mlp: in_features and out_features must be positive integers, got {in_features!r} and "
                         f"{out_features!r}")
    if isinstance(hidden, (int, str)) or not isinstance(hidden, Sequence):
        raise ValueError(f"mlp: hidden must be a list of layer widths such as [512, 512] (or [] for none), got "
                         f"{hidden!r}")
    if not all(positive_int(h) for h in hidden):
        raise ValueError(f"mlp: hidden layer widths must be positive integers, got {list(hidden)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"mlp: unknown activation '{activation}', choose one of {', '.join(ACTIVATIONS)}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"mlp: dropout must be a number in [0, 1), got {dropout!r}")
    layers: list[Module] = [Flatten()] if flatten else []
    width = in_features
    for h in hidden:
        layers.append(Linear(width, h, init=init, device=device, dtype=dtype, generator=generator))
        if batchnorm:
            layers.append(BatchNorm1d(h, device=device, dtype=dtype))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(Dropout(dropout, generator=generator))
        width = h
    layers.append(Linear(width, out_features, init=init, device=device, dtype=dtype, generator=generator))
    return Sequential(*layers)
