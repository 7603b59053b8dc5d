"""Layers: the ops of :mod:`nnbackprop.functional` wrapped as modules with parameters, state and checks.

Each layer's ``forward`` validates its input, computes the op and saves exactly what its ``backward`` needs;
``backward(dout)`` returns ``dx`` and adds the parameter gradients into ``param.grad``. ``reference_forward`` is the
same function in ``torch.nn.functional`` (what the gradient checker differentiates with autograd), and ``to_torch``
gives the equivalent ``torch.nn`` module. Outputs and input gradients go into the fast layout's workspace when one is
bound (:meth:`~nnbackprop.module.Module.scratch`), parameter gradients into its flat gradient
(:meth:`~nnbackprop.module.Parameter.grad_out`); otherwise the ops allocate them.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as TF
from torch import Tensor

from nnbackprop import functional as F
from nnbackprop.init import SCHEMES, reset_
from nnbackprop.module import Module, Parameter


class Linear(Module):
    r"""Affine map :math:`y = x W^T + b`.

    Args:
        in_features: size ``D_in`` of each input row.
        out_features: size ``D_out`` of each output row.
        bias: learn an additive bias.
        init: ``"default"`` as ``torch.nn.Linear`` (``W, b ~ U(−1/√D_in, 1/√D_in)``), ``"kaiming"``
            (``W ~ N(0, 2/D_in)``, for ReLU nets; ``b = 0``) or ``"xavier"``
            (``W ~ U(±√(6/(D_in + D_out)))``; ``b = 0``), drawn as :mod:`nnbackprop.init` draws them.
        generator: the random source for the initial values, so models repeat.

    Shape:
        input ``(N, D_in)``, output ``(N, D_out)``.

    Attributes:
        weight: ``(D_out, D_in)``, as in ``torch.nn.Linear``.
        bias: ``(D_out,)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ValueError(f"Linear: {what} must be a positive integer, got {size!r}")
        if init not in SCHEMES:
            raise ValueError(f"Linear: unknown init '{init}', choose one of {', '.join(SCHEMES)}")
        self.in_features = in_features
        self.out_features = out_features
        self.init = init
        dtype = dtype or torch.get_default_dtype()
        self.weight = Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh initial values with this layer's ``init`` scheme (:func:`nnbackprop.init.reset_`)."""
        reset_(self.weight, self.bias, self.init, generator)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, ndim=2, features=self.in_features)
        self.save_for_backward(x)
        out = self.scratch("out", (x.shape[0], self.out_features), x)
        return F.linear_forward(x, self.weight, self.bias, out=out)

    def backward(self, dout: Tensor) -> Tensor | None:
        (x,) = self.saved_tensors
        has_bias = self.bias is not None
        dx, dW, db = F.linear_backward(
            dout, x, self.weight, bias=has_bias, input_grad=self.needs_input_grad,
            dx=self.scratch("dx", x.shape, x) if self.needs_input_grad else None,
            dW=self.weight.grad_out(), db=self.bias.grad_out() if has_bias else None,
        )
        self.weight.accumulate(dW)
        if has_bias:
            self.bias.accumulate(db)
        return dx

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.linear(x, params["weight"], params.get("bias"))

    def to_torch(self) -> torch.nn.Module:
        w = self.weight
        m = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                            dtype=w.dtype)
        m.load_state_dict(self.state_dict())
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Elementwise(Module):
    """An activation applied elementwise: any input shape, output of the same shape, no parameters. Subclasses give
    the op (``_forward``: output and what backward needs) and its derivative (``_backward``)."""

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        out, saved = self._forward(x, self.scratch("out", x.shape, x))
        self.save_for_backward(saved)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        (saved,) = self.saved_tensors
        return self._backward(dout, saved, self.scratch("dx", dout.shape, dout))

    def _forward(self, x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _backward(self, dout: Tensor, saved: Tensor, dx: Tensor | None) -> Tensor:
        raise NotImplementedError


class ReLU(_Elementwise):
    """:math:`\\max(x, 0)`, elementwise."""

    def _forward(self, x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
        out = F.relu_forward(x, out=out)
        return out, out

    def _backward(self, dout: Tensor, out: Tensor, dx: Tensor | None) -> Tensor:
        # In the fast layout the output buffer is free once the next layer's backward has run: dx can reuse it.
        reuse = dx is not None and out is self.scratch("out", out.shape, out)
        return F.relu_backward(dout, out, dx=out if reuse else dx)

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.relu(x)

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.ReLU()


class LeakyReLU(_Elementwise):
    """``x`` for positive ``x``, ``negative_slope · x`` otherwise."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise ValueError(f"LeakyReLU: negative_slope must be a number, got {negative_slope!r}")
        self.negative_slope = negative_slope

    def _forward(self, x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
        return F.leaky_relu_forward(x, self.negative_slope, out=out), x

    def _backward(self, dout: Tensor, x: Tensor, dx: Tensor | None) -> Tensor:
        return F.leaky_relu_backward(dout, x, self.negative_slope, dx=dx)

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.leaky_relu(x, self.negative_slope)

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.LeakyReLU(self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Sigmoid(_Elementwise):
    """The logistic function :math:`1 / (1 + e^{-x})`, elementwise."""

    def _forward(self, x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
        out = F.sigmoid_forward(x, out=out)
        return out, out

    def _backward(self, dout: Tensor, out: Tensor, dx: Tensor | None) -> Tensor:
        return F.sigmoid_backward(dout, out, dx=dx)

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return torch.sigmoid(x)

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.Sigmoid()


class Tanh(_Elementwise):
    """The hyperbolic tangent, elementwise."""

    def _forward(self, x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
        out = F.tanh_forward(x, out=out)
        return out, out

    def _backward(self, dout: Tensor, out: Tensor, dx: Tensor | None) -> Tensor:
        reuse = dx is not None and out is self.scratch("out", out.shape, out)  # as ReLU's
        return F.tanh_backward(dout, out, dx=out if reuse else dx)

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return torch.tanh(x)

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.Tanh()


class GELU(_Elementwise):
    """Gaussian error linear unit :math:`x Φ(x)`; ``approximate="tanh"`` uses the tanh form, as ``torch.nn.GELU``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got '{approximate}'")
        self.approximate = approximate

    def _forward(self, x: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
        return F.gelu_forward(x, self.approximate, out=out), x

    def _backward(self, dout: Tensor, x: Tensor, dx: Tensor | None) -> Tensor:
        return F.gelu_backward(dout, x, self.approximate, dx=dx)

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.gelu(x, approximate=self.approximate)

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.GELU(self.approximate)

    def extra_repr(self) -> str:
        return f"approximate='{self.approximate}'"


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the rest by ``1/(1 − p)``;
    in evaluation, the identity.

    Args:
        p: drop probability, in ``[0, 1]``.
        generator: the random source of the masks (``None``: torch's global one). Give one to make runs repeat.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be a number in [0, 1], got {p!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"Dropout: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.p = p
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if not self.training or self.p == 0:
            self.save_for_backward(None)
            return x
        # The mask buffer is laid out in x's logical order whatever x's memory format, so that a seed draws the same
        # mask in every layout (random draws fill a tensor in memory order).
        out, mask = F.dropout_forward(x, self.p, self.generator, out=self.scratch("out", x.shape, x),
                                      mask=self.scratch("mask", x.shape, x.new_empty(0)))
        self.save_for_backward(mask)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        (mask,) = self.saved_tensors
        return dout if mask is None else F.dropout_backward(dout, mask, dx=self.scratch("dx", dout.shape, dout))

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """``x · mask`` with the mask of the last :meth:`forward` (torch's own dropout draws masks it cannot share)."""
        (mask,) = self.saved_tensors
        return x if mask is None else x * mask

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.Dropout(self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Flatten(Module):
    """Flatten dimensions ``start_dim..end_dim`` into one, as ``torch.nn.Flatten``: ``(N, C, H, W) → (N, C·H·W)``."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim = start_dim
        self.end_dim = end_dim

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        self.save_for_backward(x.shape)
        return torch.flatten(x, self.start_dim, self.end_dim)

    def backward(self, dout: Tensor) -> Tensor:
        (shape,) = self.saved_tensors
        return dout.reshape(shape)

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return torch.flatten(x, self.start_dim, self.end_dim)

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.Flatten(self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class _BatchNorm(Module):
    r"""Batch normalization of each channel (dim 1) over all its values in the batch:
    :math:`y = γ (x − μ) / \sqrt{σ² + ε} + β`, one pair of :mod:`~nnbackprop.functional` for every rank.

    In training ``μ, σ²`` are the batch's (biased variance) and the running averages are updated with ``momentum``
    (unbiased variance), as in ``torch.nn``; in evaluation the running averages are used.

    Args:
        num_features: ``C``, the channels (features) of dim 1.
        eps: added to the variance for stability.
        momentum: weight of the new batch statistic in the running averages.

    Attributes:
        weight (γ), bias (β): ``(C,)`` parameters. Buffers ``running_mean``, ``running_var`` ``(C,)`` and
        ``num_batches_tracked``, with ``torch.nn``'s names.
    """

    _torch_class: type[torch.nn.Module]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{type(self).__name__}: num_features must be a positive integer, got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        dtype = dtype or torch.get_default_dtype()
        self.weight = Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _check(self, x: Tensor) -> None:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if self.training and x.numel() < 2 * self.num_features:
            needs = "sample per batch" if x.dim() == 2 else "value per channel (N·H·W > 1)"
            got = f"batch size {x.shape[0]}" if x.dim() == 2 else f"shape {tuple(x.shape)}"
            raise ValueError(f"{self.name}: training needs more than one {needs} to estimate the batch variance, "
                             f"got {got}. Use a larger batch or call model.eval().")
        if self.training:
            self.num_batches_tracked.add_(1)
        out, xhat, rstd = F.batchnorm_forward(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.training, self.momentum, self.eps,
            out=self.scratch("out", x.shape, x), xhat=self.scratch("xhat", x.shape, x),
        )
        self.save_for_backward(xhat, rstd, self.training)
        return out

    def backward(self, dout: Tensor) -> Tensor | None:
        xhat, rstd, training = self.saved_tensors
        dx, dgamma, dbeta = F.batchnorm_backward(
            dout, xhat, rstd, self.weight, training, input_grad=self.needs_input_grad,
            dx=self.scratch("dx", dout.shape, dout), dW=self.weight.grad_out(), db=self.bias.grad_out(),
        )
        self.weight.accumulate(dgamma)
        self.bias.accumulate(dbeta)
        return dx

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """``F.batch_norm`` on copies of the running averages (the real forward has already updated them), in ``x``'s
        dtype."""
        return TF.batch_norm(
            x, self.running_mean.to(x.dtype, copy=True), self.running_var.to(x.dtype, copy=True), params["weight"],
            params["bias"], self.training, self.momentum, self.eps,
        )

    def to_torch(self) -> torch.nn.Module:
        w = self.weight
        m = self._torch_class(self.num_features, self.eps, self.momentum, device=w.device, dtype=w.dtype)
        m.load_state_dict(self.state_dict())
        return m

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm1d(_BatchNorm):
    """Batch normalization of features ``(N, C)`` over the batch, as ``torch.nn.BatchNorm1d``; see
    :class:`_BatchNorm`."""

    _torch_class = torch.nn.BatchNorm1d

    def _check(self, x: Tensor) -> None:
        self.check_input(x, ndim=2, features=self.num_features)


class BatchNorm2d(_BatchNorm):
    """Batch normalization of images ``(N, C, H, W)``, each channel over its ``N·H·W`` values, as
    ``torch.nn.BatchNorm2d``; see :class:`_BatchNorm`."""

    _torch_class = torch.nn.BatchNorm2d

    def _check(self, x: Tensor) -> None:
        self.check_input(x, ndim=4, channels=self.num_features)
