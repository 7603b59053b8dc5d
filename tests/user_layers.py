"""Layers as a user writes them, in public names only: one without parameters, one with."""

from __future__ import annotations

import torch

from nnbackprop import Module, Parameter


class Swish(Module):
    """``out = x · σ(x)``; ``dx = dout · (σ + x σ (1 − σ))``. No ``reference_forward``: checked through ``forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        s = torch.sigmoid(x)
        self.save_for_backward(x, s)
        return x * s

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        x, s = self.saved_tensors
        return dout * (s + x * s * (1 - s))


class Scale(Module):
    """``out = x · γ`` per feature; ``dγ = Σ_n dout · x``, ``dx = dout · γ``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gamma = Parameter(torch.linspace(0.5, 1.5, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ndim=2, features=self.gamma.shape[0])
        self.save_for_backward(x)
        return x * self.gamma

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        (x,) = self.saved_tensors
        self.gamma.accumulate((dout * x).sum(0))
        return dout * self.gamma


class ChannelScale(Module):
    """``out = x · γ_c`` per channel of images ``(N, C, H, W)``; ``dγ_c = Σ_{n,h,w} dout · x``, ``dx = dout · γ_c``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, ndim=4, channels=self.gamma.shape[0])
        self.save_for_backward(x)
        return x * self.gamma.view(-1, 1, 1)

    def backward(self, dout: torch.Tensor) -> torch.Tensor:
        (x,) = self.saved_tensors
        self.gamma.accumulate((dout * x).sum((0, 2, 3)))
        return dout * self.gamma.view(-1, 1, 1)
