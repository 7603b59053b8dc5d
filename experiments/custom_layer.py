"""Write your own layer and prove its backward: Swish and LayerNorm, checked against torch.autograd.

A layer subclasses ``nnbackprop.Module``: ``forward`` saves what ``backward`` needs, ``backward(dout)`` returns ``dx``
and accumulates parameter gradients. With no ``reference_forward`` of its own, the checker differentiates the layer's
own ``forward`` with autograd, and ``check_gradients_fd`` compares against finite differences. A Swish with a
deliberately wrong backward shows what a failure looks like.

    python experiments/custom_layer.py
"""

import torch
from torch import Tensor

from nnbackprop import Linear, Module, Parameter, Sequential, check_gradients, check_gradients_fd

torch.manual_seed(0)


class Swish(Module):
    """``out = x · σ(x)``; ``dx = dout · (σ(x) + x · σ(x) · (1 − σ(x)))``."""

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        s = torch.sigmoid(x)
        self.save_for_backward(x, s)
        return x * s

    def backward(self, dout: Tensor) -> Tensor:
        x, s = self.saved_tensors
        return dout * (s + x * s * (1 - s))


class BrokenSwish(Swish):
    """Forgets the ``x · σ'(x)`` term of the product rule."""

    def backward(self, dout: Tensor) -> Tensor:
        x, s = self.saved_tensors
        return dout * s


class LayerNorm(Module):
    """Normalise each row of ``x (N, D)``: ``x̂ = (x − mean) / √(var + ε)``, ``out = γ x̂ + β``.

    ``dx = (1/σ) (dx̂ − mean_d dx̂ − x̂ · mean_d(dx̂ · x̂))`` with ``dx̂ = dout · γ``, the row-wise twin of batch norm.
    """

    def __init__(self, features: int, eps: float = 1e-5, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.features = features
        self.eps = eps
        self.weight = Parameter(torch.ones(features, dtype=dtype))
        self.bias = Parameter(torch.zeros(features, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, ndim=2, features=self.features)
        rstd = torch.rsqrt(x.var(1, unbiased=False, keepdim=True) + self.eps)  # (N, 1)
        xhat = (x - x.mean(1, keepdim=True)) * rstd  # (N, D)
        self.save_for_backward(xhat, rstd)
        return xhat * self.weight.data + self.bias.data

    def backward(self, dout: Tensor) -> Tensor:
        xhat, rstd = self.saved_tensors
        self.weight.accumulate((dout * xhat).sum(0))
        self.bias.accumulate(dout.sum(0))
        dxhat = dout * self.weight.data
        return (dxhat - dxhat.mean(1, keepdim=True) - xhat * (dxhat * xhat).mean(1, keepdim=True)) * rstd

    def extra_repr(self) -> str:
        return f"{self.features}, eps={self.eps}"


x64 = torch.randn(16, 8, dtype=torch.float64)
layer_norm = LayerNorm(8, dtype=torch.float64)
layer_norm.weight.data.uniform_(0.5, 1.5)
layer_norm.bias.data.uniform_(-0.5, 0.5)
model = Sequential(Linear(8, 8, dtype=torch.float64), LayerNorm(8, dtype=torch.float64), Swish(),
                   Linear(8, 3, dtype=torch.float64))

print(f"{'layer':<34} {'vs autograd (max rel err)':>27} {'finite differences':>19}")
for name, module in [("Swish", Swish()), ("LayerNorm(8)", layer_norm), ("Linear-LayerNorm-Swish-Linear", model),
                     ("BrokenSwish (wrong on purpose)", BrokenSwish())]:
    report = check_gradients(module, x64)
    print(f"{name:<34} {report.max_rel_err:>20.1e} {'ok' if report.passed else 'FAIL':>6} {'ok' if check_gradients_fd(module, x64) else 'FAIL':>19}")

print("\nfloat32, the whole model:")
print(check_gradients(model.to(dtype=torch.float32), x64.float()))
