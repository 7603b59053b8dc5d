"""Initial values for weights, as :mod:`torch.nn.init` draws them (bit for bit under the same seed), for the built-in
layers and for yours.

Every function fills a tensor in place and returns it; ``generator`` (optional) is the random source. A CPU generator
may fill a tensor on another device: the values are drawn on the generator's device and copied, so a seed gives the
same model on the CPU and on CUDA.

Example, a user's layer initialised as ``torch.nn.Conv2d`` initialises itself::

    weight = nb.Parameter(torch.empty(out_channels, in_channels, 3, 3))
    bias = nb.Parameter(torch.empty(out_channels))
    nb.init.default_(weight, bias, generator=generator)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCHEMES = ("default", "kaiming", "xavier")
"""The schemes :func:`reset_` (and ``Linear``/``Conv2d``'s ``init=``) take."""

_GAINS = {"linear": 1.0, "conv2d": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3, "relu": math.sqrt(2.0), "selu": 3.0 / 4}


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The gain that keeps the activations' variance through ``nonlinearity``: 1 (linear, conv2d, sigmoid), 5/3 (tanh),
    √2 (relu), √(2 / (1 + slope²)) (leaky_relu, ``param`` the slope, default 0.01), 3/4 (selu)."""
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else param
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise ValueError(f"calculate_gain: negative slope {slope!r} is not a number")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity not in _GAINS:
        raise ValueError(f"calculate_gain: unknown nonlinearity '{nonlinearity}', choose one of "
                         f"{', '.join([*_GAINS, 'leaky_relu'])}")
    return _GAINS[nonlinearity]


def calculate_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """``fan_in = size(1) · receptive field``, ``fan_out = size(0) · receptive field``, the receptive field being the
    product of the sizes after the first two (``k_h · k_w`` for a ``Conv2d`` weight ``(C_out, C_in/groups, k_h, k_w)``,
    1 for a ``Linear`` weight ``(D_out, D_in)``)."""
    if tensor.dim() < 2:
        raise ValueError(f"fan in and fan out need a tensor of 2 or more dimensions, got shape {tuple(tensor.shape)}")
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _fan(tensor: Tensor, mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


@torch.no_grad()
def _fill(tensor: Tensor, generator: torch.Generator | None, draw: str, a: float, b: float) -> Tensor:
    """``tensor.uniform_(a, b)`` or ``tensor.normal_(a, b)`` from ``generator``, drawn on the generator's device."""
    device = generator.device if generator is not None else tensor.device
    target = tensor if device == tensor.device else torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    getattr(target, f"{draw}_")(a, b, generator=generator)
    return tensor if target is tensor else tensor.copy_(target)


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Fill with draws from ``U(a, b)``."""
    return _fill(tensor, generator, "uniform", a, b)


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Fill with draws from ``N(mean, std²)``."""
    return _fill(tensor, generator, "normal", mean, std)


def kaiming_uniform_(tensor: Tensor, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                     generator: torch.Generator | None = None) -> Tensor:
    """He et al. (2015): ``U(−bound, bound)`` with ``bound = gain · √(3 / fan)``, ``gain = calculate_gain(nonlinearity,
    a)`` and ``fan`` the ``mode``'s (``fan_in`` keeps the forward variance, ``fan_out`` the backward's)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound, generator)


def kaiming_normal_(tensor: Tensor, a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    generator: torch.Generator | None = None) -> Tensor:
    """He et al. (2015): ``N(0, std²)`` with ``std = gain / √fan`` (see :func:`kaiming_uniform_`)."""
    return normal_(tensor, 0.0, calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode)), generator)


def xavier_uniform_(tensor: Tensor, gain: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """Glorot & Bengio (2010): ``U(−a, a)`` with ``a = gain · √(6 / (fan_in + fan_out))``."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    bound = math.sqrt(3.0) * (gain * math.sqrt(2.0 / float(fan_in + fan_out)))
    return uniform_(tensor, -bound, bound, generator)


def default_(weight: Tensor, bias: Tensor | None = None, generator: torch.Generator | None = None) -> None:
    """What ``torch.nn.Linear`` and ``torch.nn.Conv2d``'s ``reset_parameters`` draw: ``W ~ kaiming_uniform_(a=√5)``,
    i.e. ``U(±1/√fan_in)``, then (if there is a bias) ``b ~ U(±1/√fan_in)``, in that order."""
    kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if bias is not None:
        fan_in, _ = calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        uniform_(bias, -bound, bound, generator)


def reset_(weight: Tensor, bias: Tensor | None, scheme: str = "default",
           generator: torch.Generator | None = None) -> None:
    """Initialise a layer's ``weight`` and ``bias`` with ``scheme``: ``"default"`` (:func:`default_`), ``"kaiming"``
    (``kaiming_normal_`` for ReLU, ``N(0, 2/fan_in)``; bias 0) or ``"xavier"`` (``xavier_uniform_``; bias 0)."""
    if scheme == "default":
        default_(weight, bias, generator)
        return
    if scheme == "kaiming":
        kaiming_normal_(weight, nonlinearity="relu", generator=generator)
    elif scheme == "xavier":
        xavier_uniform_(weight, generator=generator)
    else:
        raise ValueError(f"unknown init '{scheme}', choose one of {', '.join(SCHEMES)}")
    if bias is not None:
        with torch.no_grad():
            bias.zero_()
