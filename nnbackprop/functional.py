"""The math of every op, once: a forward/backward pair on plain tensors.

Each ``*_forward`` returns its output and the smallest set of tensors its backward needs; the ``*_backward`` right under
it takes the upstream gradient ``dout`` (the gradient of the loss with respect to the op's output) and returns the
gradients with respect to the op's inputs and parameters. No autograd: every derivative is written out.

Every function can write its results into tensors the caller supplies — ``out=`` for a forward's output (and other
named results such as ``mask=`` or ``xhat=``), ``dx=``, ``dW=``, ``db=`` for gradients — which is how the fast training
step runs the very same code on buffers it allocates once (:mod:`nnbackprop.layout`). Without them each function
allocates its results. A supplied tensor must have the result's shape, dtype and device and must not overlap the
inputs; the function returns it, filled.

Shapes: ``N`` batch size, ``D_in``/``D_out`` feature sizes, ``C`` classes or channels, ``H``/``W`` image height
and width.
"""

from __future__ import annotations

import math
from typing import Callable

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


_16_BIT = (torch.bfloat16, torch.float16)


def _rounded(value: Tensor, out: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``value`` in ``dtype``, written into ``out`` when given."""
    return value.to(dtype) if out is None else out.copy_(value)


def _per_channel(x: Tensor) -> tuple[list[int], tuple[int, ...], int]:
    """For ``x (N, C, *)``: the dims batch norm reduces over (all but 1), the shape that broadcasts a ``(C,)`` tensor
    against ``x``, and the number of values per channel."""
    dims = [0, *range(2, x.dim())]
    return dims, (x.shape[1],) + (1,) * (x.dim() - 2), x.numel() // x.shape[1]


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
    """Batch normalization of each channel ``c`` of ``x (N, C)`` or ``(N, C, H, W)`` (any ``(N, C, *)``) over all its
    ``M`` values (``M = N`` for ``(N, C)``, ``N·H·W`` for images).

    Training: ``μ = mean x``, ``σ² = mean (x − μ)²`` (biased), ``x̂ = (x − μ) / √(σ² + ε)``, ``out = γ x̂ + β``; the
    running averages move as ``r ← (1 − momentum) r + momentum · stat`` with the *unbiased* variance
    (``σ² · M / (M − 1)``), in place. Evaluation: ``x̂`` uses the running averages instead, in ``x``'s dtype (under
    mixed precision they are kept in float32). ``γ, β, μ, σ`` are ``(C,)``, broadcast over the other dims. Returns
    ``out``, ``x̂`` (both shaped like ``x``) and ``1/√(σ² + ε)`` for backward.
    """
    if x.dtype in _16_BIT:  # the same in float32, rounded once, as torch's kernels compute it
        out32, xhat32, rstd = batchnorm_forward(x.float(), weight.float(), bias.float(), running_mean, running_var,
                                                training, momentum, eps)
        return _rounded(out32, out, x.dtype), _rounded(xhat32, xhat, x.dtype), rstd.to(x.dtype)
    dims, shape, m = _per_channel(x)
    if training:
        mean = torch.mean(x, dims)  # (C,)
        xhat = torch.sub(x, mean.view(shape), out=xhat)  # x − μ, scaled to x̂ below
        var = torch.mean(torch.mul(xhat, xhat, out=out), dims)  # (C,); out holds (x − μ)² until it is written
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var, alpha=momentum * m / (m - 1))
    else:  # the running averages may be kept in a wider dtype than x (float32 under bfloat16 training)
        xhat = torch.sub(x, running_mean.to(x.dtype).view(shape), out=xhat)
        var = running_var.to(x.dtype)
    rstd = torch.rsqrt(var + eps)  # (C,)
    xhat.mul_(rstd.view(shape))
    return torch.addcmul(bias.view(shape), xhat, weight.view(shape), out=out), xhat, rstd


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
    """Gradients of batch normalization, the sums running over the ``M`` values of each channel (dims 0, 2, 3, …).

    ``dγ = Σ dout · x̂``, ``dβ = Σ dout``. With batch statistics (training), ``μ`` and ``σ`` depend on every value:
    ``dx = (γ/σ) · (dout − mean dout − x̂ · mean(dout · x̂)) = (γ/σ) · (dout − (dβ + x̂ · dγ) / M)``; with running
    statistics (evaluation) they are constants and ``dx = (γ/σ) · dout``.

    Returns ``dx`` (shaped like ``dout``; ``None`` unless ``input_grad``), ``dγ (C,)``, ``dβ (C,)``. ``dx`` may be
    ``dout``'s buffer only when ``input_grad`` is false.
    """
    if dout.dtype in _16_BIT:  # the same in float32, rounded once: in 16 bits the terms of dx cancel each other
        grads = batchnorm_backward(dout.float(), xhat.float(), rstd.float(), weight.float(), training,
                                   input_grad=input_grad)
        return tuple(None if g is None else _rounded(g, buffer, dout.dtype)  # type: ignore[return-value]
                     for g, buffer in zip(grads, (dx, dW, db)))
    dims, shape, m = _per_channel(dout)
    db = torch.sum(dout, dims, out=db)
    dW = torch.sum(torch.mul(dout, xhat, out=dx), dims, out=dW)  # dx's buffer holds dout · x̂ until dx is written
    if not input_grad:
        return None, dW, db
    scale = weight * rstd  # (C,) γ/σ
    if training:  # dx = (γ/σ) dout − (γ/σ) dβ / M − (γ/σ) dγ / M · x̂: two passes
        dx = torch.addcmul((scale * db / -m).view(shape), dout, scale.view(shape), out=dx)
        return dx.addcmul_(xhat, (scale * dW / -m).view(shape)), dW, db
    return torch.mul(dout, scale.view(shape), out=dx), dW, db


# ------------------------------------------------------------------------------------------ convolution and pooling
# Images are (N, C, H, W); a kernel is (k_h, k_w) with stride s, zero padding p and dilation d per spatial dim. x̃ is x
# padded by p on each side. An output position (h, w) reads x̃ at (s_h·h + d_h·i, s_w·w + d_w·j) for each kernel tap
# (i, j), so H_out = ⌊(H + 2 p_h − d_h (k_h − 1) − 1) / s_h⌋ + 1 (and ⌈⌉ with ceil_mode in pooling).

Pair = tuple[int, int]


def pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1, ceil_mode: bool = False) -> int:
    """The output length along one spatial dim, as torch computes it: ``⌊(size + 2p − d(k − 1) − 1) / s⌋ + 1``
    (``⌈⌉`` with ``ceil_mode``, where the last window must still start inside the input or its left padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv2d_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair = (1, 1), padding: Pair = (0, 0),
                   dilation: Pair = (1, 1), groups: int = 1) -> Tensor:
    """2-D convolution (a cross-correlation, as in torch), channels split into ``G = groups`` groups:

    ``out[n, o, h, w] = b[o] + Σ_{c, i, j} W[o, c, i, j] · x̃[n, g·C_g + c, s_h·h + d_h·i, s_w·w + d_w·j]``

    with ``g = ⌊o / O_g⌋`` the group of output channel ``o``, ``C_g = C_in / G``, ``O_g = C_out / G``.

    Args:
        x: ``(N, C_in, H, W)``; weight: ``(C_out, C_in / G, k_h, k_w)``; bias: ``(C_out,)`` or ``None``.
    Returns:
        ``(N, C_out, H_out, W_out)``, in ``x``'s memory format. Backward needs ``x`` and ``weight``. There is no
        ``out=``: torch's convolution has no kernel that writes into a given tensor (its ``out=`` variant copies).
    """
    return torch.conv2d(x, weight, bias, stride, padding, dilation, groups)


def conv2d_backward_naive(
    dout: Tensor, x: Tensor, weight: Tensor, stride: Pair = (1, 1), padding: Pair = (0, 0), dilation: Pair = (1, 1),
    groups: int = 1, *, bias: bool = True, input_grad: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """:func:`conv2d_backward` written out with im2col, the readable reference its fast path is tested against.

    ``unfold`` lays every window of ``x̃`` out as a column, ``cols (N, C_in·k_h·k_w, L)`` with ``L = H_out·W_out``, so
    the convolution is a matrix product per group, ``out_g = W_g (O_g, C_g·k_h·k_w) @ cols_g``, and its gradients are
    the two other products: ``dW_g = Σ_n dout_g @ cols_gᵀ`` and ``dcols_g = W_gᵀ @ dout_g``, which ``fold`` sums back
    onto the pixels every window read (and drops the padding). Memory: ``k_h·k_w`` times the input's.
    """
    n, c_in, height, width = x.shape
    c_out, c_g, k_h, k_w = weight.shape
    cols = torch.nn.functional.unfold(x, (k_h, k_w), dilation, padding, stride)  # (N, C_in·k_h·k_w, L)
    cols = cols.view(n, groups, c_g * k_h * k_w, -1)  # (N, G, C_g·k_h·k_w, L)
    d = dout.reshape(n, groups, c_out // groups, -1)  # (N, G, O_g, L)
    dW = torch.matmul(d, cols.transpose(2, 3)).sum(0).view(c_out, c_g, k_h, k_w)  # Σ_n dout_g @ cols_gᵀ
    db = dout.sum((0, 2, 3)) if bias else None
    dx = None
    if input_grad:
        w = weight.reshape(groups, c_out // groups, c_g * k_h * k_w)  # (G, O_g, C_g·k_h·k_w)
        dcols = torch.matmul(w.transpose(1, 2), d).view(n, c_in * k_h * k_w, -1)  # W_gᵀ @ dout_g
        dx = torch.nn.functional.fold(dcols, (height, width), (k_h, k_w), dilation, padding, stride)
    return dx, dW, db


def conv2d_backward(
    dout: Tensor,
    x: Tensor,
    weight: Tensor,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    groups: int = 1,
    *,
    bias: bool = True,
    input_grad: bool = True,
    dx: Tensor | None = None,
    dW: Tensor | None = None,
    db: Tensor | None = None,
    padded: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Gradients of :func:`conv2d_forward`, each a convolution itself:

    * ``dx`` is the *transposed* convolution of ``dout`` with ``W`` — every output gradient flows back to the pixels
      its window read: ``dx̃[n, g·C_g + c, s_h·h + d_h·i, s_w·w + d_w·j] += Σ_o W[o, c, i, j] · dout[n, o, h, w]``,
      with the padding cropped off (``conv_transpose2d``, whose ``output_padding`` restores rows the stride skipped);
    * ``dW[o, c, i, j] = Σ_{n, h, w} dout[n, o, h, w] · x̃[n, g·C_g + c, s_h·h + d_h·i, s_w·w + d_w·j]``, the
      correlation of ``x`` with ``dout`` (:func:`conv2d_weight_grad`);
    * ``db[o] = Σ_{n, h, w} dout[n, o, h, w]``.

    :func:`conv2d_backward_naive` right above computes the same with ``unfold``/``fold`` and matrix products.

    Args:
        dout: ``(N, C_out, H_out, W_out)``; x: ``(N, C_in, H, W)``; weight: ``(C_out, C_in / G, k_h, k_w)``.
        bias: whether the layer has a bias (else ``db`` is ``None``).
        input_grad: whether ``dx`` is needed (not for a first layer); else it is ``None``.
        padded: where :func:`conv2d_weight_grad` may lay out ``x̃``, its border zero (see there).
    Returns:
        ``dx`` like ``x`` (in ``dout``'s memory format), ``dW`` like ``weight``, ``db (C_out,)``. ``dx`` and ``dW`` are
        copied into the given buffers: torch's transposed convolution has no kernel that writes into a given tensor.
    """
    db = torch.sum(dout, (0, 2, 3), out=db) if bias else None
    dW_ = conv2d_weight_grad(dout, x, weight.shape, stride, padding, dilation, groups, padded=padded)
    dW = dW_ if dW is None else dW.copy_(dW_)
    if not input_grad:
        return None, dW, db
    out_pad = tuple(size - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for size, o, s, p, d, k in
                    zip(x.shape[2:], dout.shape[2:], stride, padding, dilation, weight.shape[2:]))
    dx_ = torch.conv_transpose2d(dout, weight, None, stride, padding, out_pad, groups, dilation)
    return (dx_ if dx is None else dx.copy_(dx_)), dW, db


CHUNK_BYTES = 1 << 20
"""The most memory the window matrix of :func:`conv2d_weight_grad` takes at a time on the CPU (some images' windows, one
image's at least): a small chunk is still in the core's cache when the product reads it back, just after the copy that
laid it out (30 MiB chunks made the weight gradients of the cats-vs-dogs network a third slower on a 2-core CPU)."""

CHUNK_BYTES_GPU = 256 << 20
"""The same on a GPU, where a product needs many rows to fill the device and every chunk costs two kernel launches."""


def conv2d_weight_grad(dout: Tensor, x: Tensor, weight_shape: torch.Size, stride: Pair = (1, 1),
                       padding: Pair = (0, 0), dilation: Pair = (1, 1), groups: int = 1, *,
                       padded: Tensor | None = None) -> Tensor:
    """``dW[o, c, i, j] = Σ_{n, h, w} dout[n, o, h, w] · x̃[n, g·C_g + c, s_h·h + d_h·i, s_w·w + d_w·j]``, by the
    faster of two formulations with primitive ops. On the CPU the first is as fast or up to 2.5 times faster (the
    second is a convolution with an image-sized kernel and a 3x3 output, a shape convolution kernels are not made for);
    grouped layers would need one product per group, so they take the second:

    * ungrouped (``groups == 1``): a matrix product over every output position ``(n, h, w)``:
      ``dW (C_out, k_h·k_w·C_in) = doutᵀ (C_out, N·H_out·W_out) @ windows (N·H_out·W_out, k_h·k_w·C_in)``, row
      ``(n, h, w)`` of ``windows`` being the window of ``x̃`` that output position read, channels last. ``x̃`` is laid
      out channels-last once (into ``padded`` if given: a channels-last ``(N, C_in, H + 2 p_h, W + 2 p_w)`` tensor
      whose border is zero, e.g. a workspace buffer zeroed once, as only its interior is written); the windows are a
      strided view of it, copied a few images (:data:`CHUNK_BYTES`, :data:`CHUNK_BYTES_GPU`) at a time and
      multiplied in;
    * grouped: one ``conv2d`` with batch and channels exchanged: the ``C_g`` images ``xᵀ (C_g, G·N, H, W)`` (channel
      ``g·N + n`` is ``x[n, g·C_g + c]``) filtered by the ``C_out`` filters ``doutᵀ (C_out, N, H_out, W_out)`` in
      ``G`` groups, with stride ``d`` and dilation ``s``: output ``(c, o, i, j)`` is exactly the sum above (for
      ``i ≥ k_h`` too where the stride leaves room, hence the crop).
    """
    if groups == 1:
        return _weight_grad_by_windows(dout, x, weight_shape, stride, padding, dilation, padded)
    return _weight_grad_by_swapped_conv(dout, x, weight_shape, stride, padding, dilation, groups)


def _weight_grad_by_windows(dout: Tensor, x: Tensor, weight_shape: torch.Size, stride: Pair, padding: Pair,
                            dilation: Pair, padded: Tensor | None) -> Tensor:
    n, c_in, height, width = x.shape
    c_out, _, k_h, k_w = weight_shape
    (p_h, p_w), (h_out, w_out) = padding, dout.shape[2:]
    if padding == (0, 0) and x.is_contiguous(memory_format=torch.channels_last):
        xp = x
    else:
        if padded is None:
            padded = x.new_zeros((n, height + 2 * p_h, width + 2 * p_w, c_in)).permute(0, 3, 1, 2)
        if not padded.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(f"conv2d_weight_grad: padded must be a channels-last tensor, got strides "
                             f"{padded.stride()}")
        xp = padded
        xp[:, :, p_h:p_h + height, p_w:p_w + width].copy_(x)
    xl = xp.permute(0, 2, 3, 1)  # (N, H + 2p_h, W + 2p_w, C_in), contiguous
    sn, sh, sw, _ = xl.stride()
    windows = xl.as_strided((n, h_out, w_out, k_h, k_w, c_in), (sn, stride[0] * sh, stride[1] * sw,
                                                                 dilation[0] * sh, dilation[1] * sw, 1))
    d = dout.permute(0, 2, 3, 1).reshape(n * h_out * w_out, c_out)  # a view of channels-last dout
    per_image = h_out * w_out * k_h * k_w * c_in * x.element_size()
    images = max(1, min(n, (CHUNK_BYTES if x.device.type == "cpu" else CHUNK_BYTES_GPU) // per_image))
    rows = x.new_empty((images * h_out * w_out, k_h * k_w * c_in))
    dW = x.new_empty((c_out, k_h * k_w * c_in))
    for first in range(0, n, images):
        m = min(images, n - first)
        chunk = rows[: m * h_out * w_out]
        chunk.view(m, h_out, w_out, k_h, k_w, c_in).copy_(windows[first:first + m])
        _matmul_into(dW, d[first * h_out * w_out:(first + m) * h_out * w_out].t(), chunk, accumulate=first > 0)
    return dW.view(c_out, k_h, k_w, c_in).permute(0, 3, 1, 2)


def _onednn_matmul() -> Callable[..., Tensor] | None:
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return None


_ONEDNN_MATMUL = _onednn_matmul()


def _matmul_into(out: Tensor, a: Tensor, b: Tensor, *, accumulate: bool) -> None:
    """``out = a @ b``, or ``out += a @ b`` when ``accumulate``. On the CPU in float32 the product is oneDNN's, the
    library torch's convolutions run on (as a linear layer, ``a @ (bᵀ)ᵀ``): MKL's sgemm, ``torch.mm``'s kernel there,
    runs at about half oneDNN's speed on AMD CPUs."""
    if _ONEDNN_MATMUL is not None and out.device.type == "cpu" and out.dtype == torch.float32:
        product = _ONEDNN_MATMUL(a, b.t(), None, "none", [], "")
        out.add_(product) if accumulate else out.copy_(product)
    else:
        out.addmm_(a, b, beta=1 if accumulate else 0)


def _weight_grad_by_swapped_conv(dout: Tensor, x: Tensor, weight_shape: torch.Size, stride: Pair, padding: Pair,
                                 dilation: Pair, groups: int) -> Tensor:
    n, c_in, height, width = x.shape
    c_out, c_g, k_h, k_w = weight_shape
    xt = x.reshape(n, groups, c_g, height, width).permute(2, 1, 0, 3, 4).reshape(c_g, groups * n, height, width)
    dW = torch.conv2d(xt, dout.transpose(0, 1), None, dilation, padding, stride, groups)  # (C_g, C_out, ≥k_h, ≥k_w)
    return dW[:, :, :k_h, :k_w].transpose(0, 1)


def max_pool2d_forward(
    x: Tensor, kernel_size: Pair, stride: Pair, padding: Pair = (0, 0), dilation: Pair = (1, 1),
    ceil_mode: bool = False, *, out: Tensor | None = None, indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``out[n, c, h, w] = max_{i, j} x̃[n, c, s_h·h + d_h·i, s_w·w + d_w·j]`` (``x̃`` padded with −∞), and ``indices``:
    where in its ``(H, W)`` plane each maximum came from, as the flat index ``h'·W + w'`` of ``x`` — the first maximum
    of the window in row-major order (a NaN wins), as torch picks it. Returns ``out`` and ``indices`` (int64), both
    ``(N, C, H_out, W_out)``; backward needs ``indices`` (and ``x``'s shape)."""
    if out is None:
        return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    return torch._C._nn.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode,
                                                out=(out, indices))


def max_pool2d_backward(dout: Tensor, indices: Tensor, input_shape: torch.Size, *, dx: Tensor | None = None) -> Tensor:
    """``dx[n, c, indices[n, c, h, w]] += dout[n, c, h, w]``: each window's gradient goes to its maximum only (the
    others did not move the output), and a pixel that is the maximum of several overlapping windows collects all their
    gradients (on CUDA in no fixed order, by atomic adds, so such a sum of three or more may differ from torch's in its
    last bits from run to run). ``dx``, if given, must be contiguous or channels-last (its ``(H, W)`` plane flattens to
    a view)."""
    dx = dout.new_zeros(input_shape) if dx is None else dx.zero_()
    dx.flatten(2).scatter_add_(2, indices.flatten(2), dout.flatten(2))  # (N, C, H·W) ← (N, C, H_out·W_out)
    return dx


def _avg_pool_divisor(size: int, out_size: int, kernel: int, stride: int, padding: int, count_include_pad: bool,
                      like: Tensor) -> Tensor:
    """How many of one spatial dim's positions each window counts, ``(out_size,)``: the window clipped to the padded
    input (``count_include_pad``) or to the input itself, as torch's average pooling counts them."""
    start = torch.arange(out_size, device=like.device) * stride - padding
    end = torch.clamp_max(start + kernel, size + padding)
    if not count_include_pad:
        start, end = start.clamp_min(0), end.clamp_max(size)
    return (end - start).to(like.dtype)


def avg_pool2d_forward(
    x: Tensor, kernel_size: Pair, stride: Pair, padding: Pair = (0, 0), ceil_mode: bool = False,
    count_include_pad: bool = True, divisor_override: int | None = None, *, out: Tensor | None = None,
) -> Tensor:
    """``out[n, c, h, w] = Σ_{i, j} x̃[n, c, s_h·h + i, s_w·w + j] / q[h, w]`` (``x̃`` zero-padded) with the divisor
    ``q`` the window's size — counting the padding (``count_include_pad``) or not — or ``divisor_override``.
    Backward needs only the settings and ``x``'s shape."""
    return torch._C._nn.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override,
                                   out=out) if out is not None else torch.nn.functional.avg_pool2d(
        x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool2d_backward(
    dout: Tensor, input_shape: torch.Size, kernel_size: Pair, stride: Pair, padding: Pair = (0, 0),
    ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None, *,
    dx: Tensor | None = None,
) -> Tensor:
    """``dx̃[n, c, s_h·h + i, s_w·w + j] += dout[n, c, h, w] / q[h, w]`` for every tap ``(i, j)``: each window's
    gradient spread evenly over the pixels it averaged — the transposed convolution of ``dout / q`` with a
    ``k_h × k_w`` kernel of ones, per channel — then the padding cropped off (and zeros for trailing pixels no window
    read). ``q[h, w] = q_h[h] · q_w[w]``, the clipped window's height times its width, or ``divisor_override``."""
    n, c, height, width = input_shape
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = kernel_size, stride, padding
    h_out, w_out = dout.shape[2:]
    if divisor_override:
        q = torch.full((h_out, w_out), float(divisor_override), dtype=dout.dtype, device=dout.device)
    else:
        q = torch.outer(_avg_pool_divisor(height, h_out, k_h, s_h, p_h, count_include_pad, dout),
                        _avg_pool_divisor(width, w_out, k_w, s_w, p_w, count_include_pad, dout))  # (H_out, W_out)
    ones = dout.new_ones(c, 1, k_h, k_w)
    full = torch.conv_transpose2d(dout / q, ones, None, stride, 0, 0, c)  # x̃'s rows from −p: ((H_out − 1)s + k, …)
    cropped = torch.nn.functional.pad(full, (-p_w, width + p_w - full.shape[3], -p_h, height + p_h - full.shape[2]))
    return cropped if dx is None else dx.copy_(cropped)


def _adaptive_pool_matrix(size: int, out_size: int, like: Tensor) -> Tensor:
    """``A (out_size, size)``: ``A[i, h] = 1 / (e_i − s_i)`` for ``s_i = ⌊i·size / out_size⌋ ≤ h < e_i = ⌈(i + 1)·size /
    out_size⌉``, else 0; row ``i`` averages adaptive window ``i``."""
    i = torch.arange(out_size, device=like.device)
    start, end = (i * size) // out_size, -((-(i + 1) * size) // out_size)
    h = torch.arange(size, device=like.device)
    inside = (h >= start[:, None]) & (h < end[:, None])  # (out_size, size)
    return inside.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def adaptive_avg_pool2d_forward(x: Tensor, output_size: Pair, *, out: Tensor | None = None) -> Tensor:
    """Adaptive average pooling to ``(H_out, W_out)``: ``out[n, c, i, j]`` is the mean of ``x[n, c]`` over rows
    ``⌊i·H / H_out⌋ … ⌈(i + 1)·H / H_out⌉ − 1`` and the columns likewise, i.e. ``out = A_H · x · A_Wᵀ`` per ``(n, c)``
    with the averaging matrices of :func:`_adaptive_pool_matrix`. ``(1, 1)`` is global average pooling, the mean of
    each channel. Backward needs only ``x``'s shape."""
    return torch._C._nn.adaptive_avg_pool2d(x, output_size, out=out) if out is not None else \
        torch.nn.functional.adaptive_avg_pool2d(x, output_size)


def adaptive_avg_pool2d_backward(dout: Tensor, input_shape: torch.Size, *, dx: Tensor | None = None) -> Tensor:
    """``dx = A_Hᵀ · dout · A_W`` per ``(n, c)``: each window's gradient spread evenly over its pixels (summed where
    windows overlap). For global pooling (``(1, 1)``) that is ``dx = dout / (H·W)`` at every pixel."""
    height, width = input_shape[2:]
    if dout.shape[2:] == (1, 1):
        return torch.div(dout.expand(input_shape), height * width, out=dx)
    rows = _adaptive_pool_matrix(height, dout.shape[2], dout)  # (H_out, H)
    cols = _adaptive_pool_matrix(width, dout.shape[3], dout)  # (W_out, W)
    return torch.matmul(torch.matmul(rows.t(), dout), cols, out=dx)  # (N, C, H, W)


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
