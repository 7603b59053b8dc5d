"""The math of every op as a forward/backward pair on plain tensors.

Each ``*_forward`` returns its output and the smallest set of tensors its backward needs; the ``*_backward`` right under
it takes the upstream gradient ``dout`` (the gradient of the loss with respect to the op's output) and returns the
gradients with respect to the op's inputs and parameters. No autograd: every derivative is written out.

Shapes: ``N`` batch size, ``D_in``/``D_out`` feature sizes, ``C`` classes or channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------- linear


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out = x @ W^T + b``.

    Args:
        x: ``(N, D_in)``; weight: ``(D_out, D_in)``; bias: ``(D_out,)`` or ``None``.
    Returns:
        ``(N, D_out)``. Backward needs ``x`` and ``weight``.
    """
    if bias is None:
        return x @ weight.t()
    return torch.addmm(bias, x, weight.t())


def linear_backward(dout: Tensor, x: Tensor, weight: Tensor, has_bias: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``dx = dout @ W``, ``dW = dout^T @ x``, ``db = Σ_n dout``.

    Args:
        dout: ``(N, D_out)``; x: ``(N, D_in)``; weight: ``(D_out, D_in)``.
    Returns:
        ``dx (N, D_in)``, ``dW (D_out, D_in)``, ``db (D_out,)`` or ``None``.
    """
    dx = dout @ weight
    dW = dout.t() @ x
    db = dout.sum(0) if has_bias else None
    return dx, dW, db


# ----------------------------------------------------------------------------------------------------- activations


def relu_forward(x: Tensor) -> Tensor:
    """``out = max(x, 0)``. Backward needs ``out`` (its sign pattern is ``x``'s)."""
    return x.clamp_min(0)


def relu_backward(dout: Tensor, out: Tensor) -> Tensor:
    """``dx = dout · 1[x > 0]`` (the gradient at 0 is taken as 0, as in torch)."""
    return dout.masked_fill(out <= 0, 0)


def leaky_relu_forward(x: Tensor, negative_slope: float) -> Tensor:
    """``out = x`` where ``x > 0``, else ``negative_slope · x``. Backward needs ``x``."""
    return torch.where(x > 0, x, x * negative_slope)


def leaky_relu_backward(dout: Tensor, x: Tensor, negative_slope: float) -> Tensor:
    """``dx = dout`` where ``x > 0``, else ``negative_slope · dout``."""
    return torch.where(x > 0, dout, dout * negative_slope)


def sigmoid_forward(x: Tensor) -> Tensor:
    """``out = σ(x) = 1 / (1 + e^{-x})``. Backward needs ``out``."""
    return torch.sigmoid(x)


def sigmoid_backward(dout: Tensor, out: Tensor) -> Tensor:
    """``dx = dout · σ(x) · (1 − σ(x))``."""
    return dout * out * (1 - out)


def tanh_forward(x: Tensor) -> Tensor:
    """``out = tanh(x)``. Backward needs ``out``."""
    return torch.tanh(x)


def tanh_backward(dout: Tensor, out: Tensor) -> Tensor:
    """``dx = dout · (1 − tanh²(x))``."""
    return dout * (1 - out * out)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def gelu_forward(x: Tensor, approximate: str = "none") -> Tensor:
    """``out = x · Φ(x)`` with ``Φ`` the standard normal CDF, or its tanh approximation
    ``0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`` when ``approximate == "tanh"``. Backward needs ``x``."""
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))
    return 0.5 * x * (1 + torch.erf(x * _INV_SQRT_2))


def gelu_backward(dout: Tensor, x: Tensor, approximate: str = "none") -> Tensor:
    """``dx = dout · (Φ(x) + x · φ(x))`` with ``φ`` the standard normal density; for the tanh form
    ``dx = dout · (0.5 (1 + t) + 0.5 x (1 − t²) · √(2/π) (1 + 3 · 0.044715 x²))``, ``t = tanh(√(2/π)(x + 0.044715 x³))``."""
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3)))
        dt = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        return dout * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dt)
    cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return dout * (cdf + x * pdf)


# ---------------------------------------------------------------------------------------------------- regularizers


def dropout_forward(x: Tensor, p: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Inverted dropout: ``out = x · m / (1 − p)`` with ``m ~ Bernoulli(1 − p)`` drawn elementwise.

    The kept units are scaled up during training so evaluation needs no rescaling. The mask is drawn from ``generator``
    (on the generator's device, then moved to ``x``'s) so runs repeat. Returns ``out`` and the scaled mask
    ``m / (1 − p)``, which is all backward needs.
    """
    rand_device = generator.device if generator is not None else x.device
    keep = torch.rand(x.shape, generator=generator, device=rand_device, dtype=x.dtype) >= p
    scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    mask = (keep.to(x.dtype) * scale).to(x.device)
    return x * mask, mask


def dropout_backward(dout: Tensor, mask: Tensor) -> Tensor:
    """``dx = dout · m / (1 − p)``."""
    return dout * mask


def batchnorm_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch normalization over the batch dimension of ``x (N, C)``.

    Training: ``μ = mean_n x``, ``σ² = mean_n (x − μ)²`` (biased), ``x̂ = (x − μ) / √(σ² + ε)``, ``out = γ x̂ + β``; the
    running averages move as ``r ← (1 − momentum) r + momentum · stat`` with the *unbiased* variance, in place.
    Evaluation: ``x̂`` uses the running averages instead. Returns ``out``, ``x̂`` and ``1/√(σ² + ε)`` for backward.
    """
    if training:
        n = x.shape[0]
        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var, alpha=momentum * n / (n - 1))
    else:
        mean, var = running_mean, running_var
    rstd = torch.rsqrt(var + eps)  # (C,)
    xhat = (x - mean) * rstd  # (N, C)
    return torch.addcmul(bias, xhat, weight), xhat, rstd


def batchnorm_backward(
    dout: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor, training: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of batch normalization.

    ``dγ = Σ_n dout · x̂``, ``dβ = Σ_n dout``. With batch statistics (training), ``μ`` and ``σ`` depend on every row:
    ``dx = (1/σ) · (dx̂ − mean_n dx̂ − x̂ · mean_n(dx̂ · x̂))`` where ``dx̂ = dout · γ``; with running statistics
    (evaluation) they are constants and ``dx = dx̂ / σ``.

    Returns ``dx (N, C)``, ``dγ (C,)``, ``dβ (C,)``.
    """
    dbeta = dout.sum(0)
    dgamma = (dout * xhat).sum(0)
    dxhat = dout * weight
    if training:
        dx = (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)) * rstd
    else:
        dx = dxhat * rstd
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------------------------------------- losses


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()


def cross_entropy_forward(logits: Tensor, target: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy from logits, computed stably with log-sum-exp.

    ``loss_n = log Σ_c e^{z_nc} − z_{n,t_n}`` with ``log Σ_c e^{z_nc} = m_n + log Σ_c e^{z_nc − m_n}``, ``m_n = max_c z_nc``,
    reduced by mean or sum over ``n``. Args: logits ``(N, C)``, target class indices ``(N,)``. Returns the loss (a
    0-dim tensor) and the softmax probabilities ``(N, C)``, which backward needs.
    """
    m = logits.amax(1, keepdim=True)  # (N, 1)
    shifted = logits - m
    lse = shifted.exp().sum(1, keepdim=True).log()  # (N, 1)
    log_probs = shifted - lse  # (N, C)
    losses = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,)
    return _reduce(losses, reduction), log_probs.exp()


def cross_entropy_backward(dloss: Tensor | float, probs: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """The fused softmax-cross-entropy gradient ``dz = dloss · (softmax(z) − onehot(t)) / N`` (no ``/N`` for sum)."""
    dlogits = probs.clone()
    dlogits[torch.arange(target.shape[0], device=target.device), target] -= 1
    scale = dloss / target.shape[0] if reduction == "mean" else dloss
    return dlogits.mul_(scale)


def mse_forward(input: Tensor, target: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Squared error ``Σ (o − t)²``, averaged over all elements (``mean``), summed (``sum``), or halved and summed
    (``half_sum``, the ``E = ½ Σ (t − o)²`` of the classic backprop derivations). Returns the loss and ``o − t``."""
    diff = input - target
    sq = (diff * diff).sum()
    if reduction == "mean":
        return sq / diff.numel(), diff
    return (0.5 * sq if reduction == "half_sum" else sq), diff


def mse_backward(dloss: Tensor | float, diff: Tensor, reduction: str = "mean") -> Tensor:
    """``do = dloss · 2 (o − t) / numel`` (mean), ``2 (o − t)`` (sum), or ``(o − t)`` (half_sum)."""
    scale = {"mean": 2.0 / diff.numel(), "sum": 2.0, "half_sum": 1.0}[reduction]
    return diff * (dloss * scale)


def bce_with_logits_forward(logits: Tensor, target: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Binary cross-entropy on logits, stable for any ``z``:
    ``loss = max(z, 0) − z · y + log(1 + e^{−|z|})`` (equal to ``−y log σ(z) − (1 − y) log(1 − σ(z))``).
    Returns the reduced loss and ``σ(z) − y``, which backward needs."""
    losses = logits.clamp_min(0) - logits * target + torch.log1p(torch.exp(-logits.abs()))
    return _reduce(losses, reduction), torch.sigmoid(logits) - target


def bce_with_logits_backward(dloss: Tensor | float, residual: Tensor, reduction: str = "mean") -> Tensor:
    """``dz = dloss · (σ(z) − y) / numel`` (mean) or ``dloss · (σ(z) − y)`` (sum)."""
    scale = dloss / residual.numel() if reduction == "mean" else dloss
    return residual * scale
