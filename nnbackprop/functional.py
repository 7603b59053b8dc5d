"""The math of every op, once: a forward/backward pair on plain tensors.

Each ``*_forward`` returns its output and the smallest set of tensors its backward needs; the ``*_backward`` right under
it takes the upstream gradient ``dout`` (the gradient of the loss with respect to the op's output) and returns the
gradients with respect to the op's inputs and parameters. No autograd: every derivative is written out.

Every function can write its results into tensors the caller supplies — ``out=`` for a forward's output (and other
named results such as ``mask=`` or ``xhat=``), ``dx=``, ``dW=``, ``db=`` for gradients — which is how the fast training
step runs the very same code on buffers it allocates once (:mod:`nnbackprop.layout`). Without them each function
allocates its results. A supplied tensor must have the result's shape, dtype and device and must not overlap the
inputs; the function returns it, filled.

Shapes: ``N`` batch size, ``D_in``/``D_out`` feature sizes, ``C`` classes or channels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------------- linear


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, *, out: Tensor | None = None) -> Tensor:
    """``out = x @ W^T + b``.

    Args:
        x: ``(N, D_in)``; weight: ``(D_out, D_in)``; bias: ``(D_out,)`` or ``None``.
    Returns:
        ``(N, D_out)``. Backward needs ``x`` and ``weight``.
    """
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def linear_backward(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    *,
    bias: bool = True,
    input_grad: bool = True,
    dx: Tensor | None = None,
    dW: Tensor | None = None,
    db: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """``dx = dout @ W``, ``dW = dout^T @ x``, ``db = Σ_n dout``.

    Args:
        dout: ``(N, D_out)``; x: ``(N, D_in)``; weight: ``(D_out, D_in)``.
        bias: whether the layer has a bias (else ``db`` is ``None``).
        input_grad: whether ``dx`` is needed (not for a first layer, whose input is data); else it is ``None``.
    Returns:
        ``dx (N, D_in)``, ``dW (D_out, D_in)``, ``db (D_out,)``.
    """
    dW = torch.mm(dout.t(), x, out=dW)
    db = torch.sum(dout, 0, out=db) if bias else None
    dx = torch.mm(dout, weight, out=dx) if input_grad else None
    return dx, dW, db


# ----------------------------------------------------------------------------------------------------- activations


def relu_forward(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``out = max(x, 0)``. Backward needs ``out`` (its sign pattern is ``x``'s)."""
    return torch.clamp_min(x, 0, out=out)


def relu_backward(dout: Tensor, out: Tensor, *, dx: Tensor | None = None) -> Tensor:
    """``dx = dout · 1[x > 0]`` (the gradient at 0 is taken as 0, as in torch), with ``1[x > 0] = sign(out)`` since
    ``out = max(x, 0) >= 0`` (a float mask: a boolean one costs several times more on the CPU). ``dx`` may be ``out``
    itself (which is then overwritten)."""
    return torch.sign(out, out=dx).mul_(dout)


def leaky_relu_forward(x: Tensor, negative_slope: float, *, out: Tensor | None = None) -> Tensor:
    """``out = x`` where ``x > 0``, else ``negative_slope · x``. Backward needs ``x``."""
    return torch.where(x > 0, x, x * negative_slope, out=out)


def leaky_relu_backward(dout: Tensor, x: Tensor, negative_slope: float, *, dx: Tensor | None = None) -> Tensor:
    """``dx = dout`` where ``x > 0``, else ``negative_slope · dout``."""
    return torch.where(x > 0, dout, dout * negative_slope, out=dx)


def sigmoid_forward(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``out = σ(x) = 1 / (1 + e^{-x})``. Backward needs ``out``."""
    return torch.sigmoid(x, out=out)


def sigmoid_backward(dout: Tensor, out: Tensor, *, dx: Tensor | None = None) -> Tensor:
    """``dx = dout · σ(x) · (1 − σ(x))``, computed as ``g − g σ`` with ``g = dout · σ``."""
    dx = torch.mul(dout, out, out=dx)
    return dx.addcmul_(dx, out, value=-1)


def tanh_forward(x: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``out = tanh(x)``. Backward needs ``out``."""
    return torch.tanh(x, out=out)


def tanh_backward(dout: Tensor, out: Tensor, *, dx: Tensor | None = None) -> Tensor:
    """``dx = dout · (1 − tanh²(x))``, computed as ``dout − dout · t²`` with ``t = tanh(x)``. ``dx`` may be ``out``
    itself (which is then overwritten)."""
    dx = torch.mul(out, out, out=dx)
    return torch.addcmul(dout, dout, dx, value=-1, out=dx)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


def gelu_forward(x: Tensor, approximate: str = "none", *, out: Tensor | None = None) -> Tensor:
    """``out = x · Φ(x)`` with ``Φ`` the standard normal CDF, or its tanh approximation
    ``0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`` when ``approximate == "tanh"``. Backward needs ``x``."""
    if approximate == "tanh":
        return torch.mul(x, 0.5 * (1 + torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x.pow(3)))), out=out)
    return torch.mul(x, 0.5 * (1 + torch.erf(x * _INV_SQRT_2)), out=out)


def gelu_backward(dout: Tensor, x: Tensor, approximate: str = "none", *, dx: Tensor | None = None) -> Tensor:
    """``dx = dout · (Φ(x) + x · φ(x))`` with ``φ`` the standard normal density; for the tanh form
    ``dx = dout · (0.5 (1 + t) + 0.5 x (1 − t²) · √(2/π) (1 + 3 · 0.044715 x²))``,
    ``t = tanh(√(2/π)(x + 0.044715 x³))``."""
    if approximate == "tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x.pow(3)))
        dt = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x)
        return torch.mul(dout, 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dt, out=dx)
    cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return torch.mul(dout, cdf + x * pdf, out=dx)


# ---------------------------------------------------------------------------------------------------- regularizers


def dropout_forward(
    x: Tensor, p: float, generator: torch.Generator | None = None, *, out: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Inverted dropout: ``out = x · m / (1 − p)`` with ``m ~ Bernoulli(1 − p)`` drawn elementwise.

    The kept units are scaled up during training so evaluation needs no rescaling. The uniform draws come from
    ``generator`` on the generator's device (and are moved to ``x``'s), so runs repeat. Returns ``out`` and the scaled
    mask ``m / (1 − p)``, which is all backward needs.
    """
    draw_device = generator.device if generator is not None else x.device
    draw = mask if mask is not None and mask.device == draw_device else None
    uniform = torch.rand(x.shape, generator=generator, device=draw_device, dtype=x.dtype, out=draw)
    keep_scale = 0.0 if p >= 1 else 1.0 / (1.0 - p)
    scaled = uniform.ge_(p).mul_(keep_scale)  # m / (1 − p), in place of the draws
    if mask is None:
        mask = scaled.to(x.device)
    elif mask is not scaled:
        mask.copy_(scaled)
    return torch.mul(x, mask, out=out), mask


def dropout_backward(dout: Tensor, mask: Tensor, *, dx: Tensor | None = None) -> Tensor:
    """``dx = dout · m / (1 − p)``."""
    return torch.mul(dout, mask, out=dx)


def batchnorm_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float,
    eps: float,
    *,
    out: Tensor | None = None,
    xhat: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch normalization over the batch dimension of ``x (N, C)``.

    Training: ``μ = mean_n x``, ``σ² = mean_n (x − μ)²`` (biased), ``x̂ = (x − μ) / √(σ² + ε)``, ``out = γ x̂ + β``; the
    running averages move as ``r ← (1 − momentum) r + momentum · stat`` with the *unbiased* variance, in place.
    Evaluation: ``x̂`` uses the running averages instead, in ``x``'s dtype (under mixed precision they are kept in
    float32). Returns ``out``, ``x̂`` and ``1/√(σ² + ε)`` for backward.
    """
    if training:
        n = x.shape[0]
        var, mean = torch.var_mean(x, 0, correction=0)  # (C,), (C,)
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var, alpha=momentum * n / (n - 1))
    else:  # the running averages may be kept in a wider dtype than x (float32 under bfloat16 training)
        mean, var = running_mean.to(x.dtype), running_var.to(x.dtype)
    rstd = torch.rsqrt(var + eps)  # (C,)
    xhat = torch.sub(x, mean, out=xhat).mul_(rstd)  # (N, C)
    return torch.addcmul(bias, xhat, weight, out=out), xhat, rstd


def batchnorm_backward(
    dout: Tensor,
    xhat: Tensor,
    rstd: Tensor,
    weight: Tensor,
    training: bool,
    *,
    input_grad: bool = True,
    dx: Tensor | None = None,
    dW: Tensor | None = None,
    db: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of batch normalization.

    ``dγ = Σ_n dout · x̂``, ``dβ = Σ_n dout``. With batch statistics (training), ``μ`` and ``σ`` depend on every row:
    ``dx = (γ/σ) · (dout − mean_n dout − x̂ · mean_n(dout · x̂)) = (γ/σ) · (dout − (dβ + x̂ · dγ) / N)``; with running
    statistics (evaluation) they are constants and ``dx = (γ/σ) · dout``.

    Returns ``dx (N, C)`` (``None`` unless ``input_grad``), ``dγ (C,)``, ``dβ (C,)``.
    """
    db = torch.sum(dout, 0, out=db)
    dW = torch.sum(dout * xhat, 0, out=dW)
    if not input_grad:
        return None, dW, db
    if training:
        dx = torch.mul(xhat, dW, out=dx).add_(db).mul_(-1.0 / dout.shape[0]).add_(dout)  # dout − (dβ + x̂ dγ) / N
        return dx.mul_(weight * rstd), dW, db
    return torch.mul(dout, weight * rstd, out=dx), dW, db


# ---------------------------------------------------------------------------------------------------------- losses


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return losses.mean() if reduction == "mean" else losses.sum()


def cross_entropy_forward(
    logits: Tensor, target: Tensor, reduction: str = "mean", *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy from logits, computed stably with log-sum-exp.

    ``loss_n = −log softmax(z_n)_{t_n} = log Σ_c e^{z_nc} − z_{n,t_n}``, reduced by mean or sum over ``n``;
    ``log softmax(z_n) = z_n − log Σ_c e^{z_nc}`` is computed as ``z_n − m_n − log Σ_c e^{z_nc − m_n}`` with
    ``m_n = max_c z_nc`` (``torch.log_softmax``), which never overflows. Args: logits ``(N, C)``, target class indices
    ``(N,)`` int64. Returns the loss (a 0-dim tensor) and the log-probabilities ``(N, C)`` (written into ``out``), which
    backward needs.
    """
    log_probs = torch.log_softmax(logits, 1, out=out)  # (N, C)
    losses = log_probs.gather(1, target.unsqueeze(1)).neg_()  # (N, 1)
    return _reduce(losses, reduction), log_probs


def cross_entropy_backward(
    dloss: Tensor | float, log_probs: Tensor, target: Tensor, reduction: str = "mean", *, dx: Tensor | None = None
) -> Tensor:
    """The fused softmax-cross-entropy gradient ``dz = dloss · (softmax(z) − onehot(t)) / N`` (no ``/N`` for sum)."""
    n = target.shape[0]
    dlogits = torch.exp(log_probs, out=dx)  # softmax(z)
    dlogits.scatter_add_(1, target.unsqueeze(1), dlogits.new_full((n, 1), -1.0))  # − onehot(t)
    return dlogits.mul_(dloss / n if reduction == "mean" else dloss)


def mse_forward(
    input: Tensor, target: Tensor, reduction: str = "mean", *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Squared error ``Σ (o − t)²``, averaged over all elements (``mean``), summed (``sum``), or halved and summed
    (``half_sum``, the ``E = ½ Σ (t − o)²`` of the classic backprop derivations). Returns the loss and ``o − t``
    (written into ``out``)."""
    diff = torch.sub(input, target, out=out)
    sq = torch.sum(diff * diff)
    if reduction == "mean":
        return sq / diff.numel(), diff
    return (0.5 * sq if reduction == "half_sum" else sq), diff


def mse_backward(dloss: Tensor | float, diff: Tensor, reduction: str = "mean", *, dx: Tensor | None = None) -> Tensor:
    """``do = dloss · 2 (o − t) / numel`` (mean), ``2 (o − t)`` (sum), or ``(o − t)`` (half_sum)."""
    scale = {"mean": 2.0 / diff.numel(), "sum": 2.0, "half_sum": 1.0}[reduction]
    return torch.mul(diff, dloss * scale, out=dx)


def bce_with_logits_forward(
    logits: Tensor, target: Tensor, reduction: str = "mean", *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Binary cross-entropy on logits, stable for any ``z``:
    ``loss = max(z, 0) − z · y + log(1 + e^{−|z|})`` (equal to ``−y log σ(z) − (1 − y) log(1 − σ(z))``).
    Returns the reduced loss and ``σ(z) − y`` (written into ``out``), which backward needs."""
    losses = logits.clamp_min(0) - logits * target + torch.log1p(torch.exp(-logits.abs()))
    return _reduce(losses, reduction), torch.sigmoid(logits, out=out).sub_(target)


def bce_with_logits_backward(
    dloss: Tensor | float, residual: Tensor, reduction: str = "mean", *, dx: Tensor | None = None
) -> Tensor:
    """``dz = dloss · (σ(z) − y) / numel`` (mean) or ``dloss · (σ(z) − y)`` (sum)."""
    return torch.mul(residual, dloss / residual.numel() if reduction == "mean" else dloss, out=dx)
