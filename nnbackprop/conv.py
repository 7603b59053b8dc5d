"""Convolution and pooling layers on images ``(N, C, H, W)``: :class:`Conv2d`, :class:`MaxPool2d`, :class:`AvgPool2d`,
:class:`AdaptiveAvgPool2d`, with ``torch.nn``'s names, arguments, defaults, ``state_dict`` keys and initialisation.

Each wraps a pair of :mod:`nnbackprop.functional` as :mod:`nnbackprop.layers` does: ``forward`` checks its input and
keeps what ``backward`` needs, ``reference_forward`` is ``torch.nn.functional``'s op, ``to_torch`` the ``torch.nn``
module. Outputs and input gradients go into the fast layout's workspace where the op can write into a given tensor
(:meth:`~nnbackprop.module.Module.scratch`), parameter gradients into the flat gradient
(:meth:`~nnbackprop.module.Parameter.grad_out`).
"""

from __future__ import annotations

import weakref
from typing import Any, Mapping

import torch
import torch.nn.functional as TF
from torch import Tensor

from nnbackprop import functional as F
from nnbackprop.init import SCHEMES, reset_
from nnbackprop.module import Module, Parameter


def _pair_of(owner: str, what: str, value: Any, minimum: int) -> F.Pair:
    """``value`` (an int or two) as a pair of ints ``>= minimum``, else a one-line ``ValueError``."""
    values = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(values, (tuple, list)) or len(values) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values)):
        kind = "positive integer" if minimum > 0 else "non-negative integer"
        raise ValueError(f"{owner}: {what} must be a {kind} or a pair of them, got {value!r}")
    return values[0], values[1]


def _positive_int(owner: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {what} must be a positive integer, got {value!r}")
    return value


def _output_size(layer: Module, x: Tensor, kernel: F.Pair, stride: F.Pair, padding: F.Pair, dilation: F.Pair,
                 ceil_mode: bool = False) -> tuple[int, int]:
    """The ``(H_out, W_out)`` of a window op on ``x``, or a one-line error when the image is smaller than the kernel."""
    size = tuple(F.pooled_size(n, k, s, p, d, ceil_mode) for n, k, s, p, d in
                 zip(x.shape[2:], kernel, stride, padding, dilation))
    if min(size) < 1:
        extent = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
        padded = tuple(n + 2 * p for n, p in zip(x.shape[2:], padding))
        raise ValueError(f"{layer.name}: input images of {x.shape[2]}x{x.shape[3]} ({padded[0]}x{padded[1]} padded) "
                         f"are smaller than the kernel's extent {extent[0]}x{extent[1]}; use larger images or fewer "
                         "downsampling layers before this one")
    return size


class Conv2d(Module):
    r"""2-D convolution (cross-correlation) with learnable filters, as ``torch.nn.Conv2d``:

    :math:`\text{out}[n, o] = b[o] + \sum_c W[o, c] \star \tilde x[n, g C_g + c]` over the ``C_in / groups`` input
    channels of output channel ``o``'s group ``g`` (see :func:`nnbackprop.functional.conv2d_forward`).

    Args:
        in_channels, out_channels: ``C_in``, ``C_out`` (both divisible by ``groups``).
        kernel_size, stride, padding, dilation: an int or a pair ``(h, w)``; ``padding`` may also be ``"valid"``
            (none) or ``"same"`` (the output keeps the input's size; stride 1 and an odd ``dilation · (k − 1) + 1``
            only, as the padding must be even on both sides).
        groups: split the channels into this many independent groups (``groups == C_in``: depthwise).
        bias: learn an additive bias per output channel.
        padding_mode: ``"zeros"`` (the only one supported).
        init: ``"default"`` as ``torch.nn.Conv2d`` (``W, b ~ U(±1/√fan_in)``, ``fan_in = C_in / groups · k_h · k_w``),
            ``"kaiming"`` or ``"xavier"``; see :func:`nnbackprop.init.reset_`.
        generator: the random source for the initial values, so models repeat.

    Shape:
        input ``(N, C_in, H, W)``, output ``(N, C_out, H_out, W_out)`` with
        ``H_out = ⌊(H + 2 p_h − d_h (k_h − 1) − 1) / s_h⌋ + 1`` (and ``W_out`` likewise).

    Attributes:
        weight: ``(C_out, C_in / groups, k_h, k_w)``; bias: ``(C_out,)``, as in ``torch.nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        init: str = "default",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        owner = "Conv2d"
        self.in_channels = _positive_int(owner, "in_channels", in_channels)
        self.out_channels = _positive_int(owner, "out_channels", out_channels)
        self.groups = _positive_int(owner, "groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups ({groups})")
        self.kernel_size = _pair_of(owner, "kernel_size", kernel_size, 1)
        self.stride = _pair_of(owner, "stride", stride, 1)
        self.dilation = _pair_of(owner, "dilation", dilation, 1)
        self.padding: F.Pair | str = padding if isinstance(padding, str) else _pair_of(owner, "padding", padding, 0)
        self._padding = self._numeric_padding()
        if padding_mode != "zeros":
            raise ValueError(f"Conv2d: padding_mode '{padding_mode}' is not supported, only 'zeros' (pad the input "
                             "yourself for reflect/replicate/circular)")
        self.padding_mode = padding_mode
        if init not in SCHEMES:
            raise ValueError(f"Conv2d: unknown init '{init}', choose one of {', '.join(SCHEMES)}")
        self.init = init
        dtype = dtype or torch.get_default_dtype()
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.weight = Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    def _numeric_padding(self) -> F.Pair:
        if not isinstance(self.padding, str):
            return self.padding
        if self.padding == "valid":
            return 0, 0
        if self.padding != "same":
            raise ValueError(f"Conv2d: padding must be an int, a pair, 'valid' or 'same', got '{self.padding}'")
        if self.stride != (1, 1):
            raise ValueError(f"Conv2d: padding='same' needs stride 1, got stride {self.stride}")
        extents = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation)]
        if any(e % 2 for e in extents):
            raise ValueError(f"Conv2d: padding='same' with kernel_size {self.kernel_size} and dilation "
                             f"{self.dilation} would pad one side more than the other, which is not supported; use an "
                             "odd kernel size or explicit padding")
        return extents[0] // 2, extents[1] // 2

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw fresh initial values with this layer's ``init`` scheme (:func:`nnbackprop.init.reset_`)."""
        reset_(self.weight, self.bias, self.init, generator)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, ndim=4, channels=self.in_channels)
        _output_size(self, x, self.kernel_size, self.stride, self._padding, self.dilation)
        if x.stride(1) != 1 or not x.is_contiguous(memory_format=torch.channels_last):  # (one channel: ambiguous)
            # The fast layout runs convolutions channels-last (no reordering in and out of each convolution, and every
            # layer after it follows, its buffers taking the input's memory format): lay the input out so once.
            channels_last = self.scratch("input", (x.shape[0], *x.shape[2:], x.shape[1]), self.weight)
            if channels_last is not None:
                x = channels_last.permute(0, 3, 1, 2).copy_(x)
        self.save_for_backward(x)
        return F.conv2d_forward(x, self.weight, self.bias, self.stride, self._padding, self.dilation, self.groups)

    def backward(self, dout: Tensor) -> Tensor | None:
        (x,) = self.saved_tensors
        has_bias = self.bias is not None
        (p_h, p_w), (n, c, h, w) = self._padding, x.shape
        padded = None
        if self.groups == 1 and self._padding != (0, 0):  # where the weight gradient lays out x̃, channels-last as x
            padded = self.scratch("padded", (n, c, h + 2 * p_h, w + 2 * p_w), x)
        zeroed = self.__dict__.get("_zeroed")
        if padded is not None and (zeroed is None or zeroed() is not padded):  # only its interior is written after
            self.__dict__["_zeroed"] = weakref.ref(padded.zero_())
        dx, dW, db = F.conv2d_backward(
            dout, x, self.weight, self.stride, self._padding, self.dilation, self.groups, bias=has_bias,
            input_grad=self.needs_input_grad, dW=self.weight.grad_out(), db=self.bias.grad_out() if has_bias else None,
            padded=padded,
        )
        self.weight.accumulate(dW)
        if has_bias:
            self.bias.accumulate(db)
        return dx

    def __getstate__(self) -> dict[str, Any]:
        """What pickling and ``copy.deepcopy`` keep: all but the (weak) note of the buffer whose border is zero."""
        return {k: v for k, v in self.__dict__.items() if k != "_zeroed"}

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.conv2d(x, params["weight"], params.get("bias"), self.stride, self._padding, self.dilation,
                         self.groups)

    def to_torch(self) -> torch.nn.Module:
        w = self.weight
        m = torch.nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                            self.dilation, self.groups, self.bias is not None, self.padding_mode, device=w.device,
                            dtype=w.dtype)
        m.load_state_dict(self.state_dict())
        return m

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class MaxPool2d(Module):
    """The maximum of each window, as ``torch.nn.MaxPool2d``; backward sends each window's gradient to its maximum
    (the first one in the window, as torch picks it, when several are equal).

    Args:
        kernel_size: the window, an int or ``(k_h, k_w)``.
        stride: the step between windows (default: ``kernel_size``).
        padding: implicit ``−∞`` padding on both sides, at most half the kernel.
        dilation: the step between a window's elements.
        ceil_mode: round the output size up, so that windows cover the last rows and columns.

    Shape:
        input ``(N, C, H, W)``, output ``(N, C, H_out, W_out)``, ``H_out`` as for :class:`Conv2d` (``⌈⌉`` with
        ``ceil_mode``).
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 ceil_mode: bool = False) -> None:
        super().__init__()
        owner = "MaxPool2d"
        self.kernel_size, self.stride = kernel_size, kernel_size if stride is None else stride
        self.padding, self.dilation, self.ceil_mode = padding, dilation, bool(ceil_mode)
        self._kernel = _pair_of(owner, "kernel_size", kernel_size, 1)
        self._stride = self._kernel if stride is None else _pair_of(owner, "stride", stride, 1)
        self._padding = _pair_of(owner, "padding", padding, 0)
        self._dilation = _pair_of(owner, "dilation", dilation, 1)
        if any(2 * p > d * (k - 1) + 1 for p, k, d in zip(self._padding, self._kernel, self._dilation)):
            raise ValueError(f"MaxPool2d: padding {padding} must be at most half the kernel's extent "
                             f"(kernel_size {kernel_size}, dilation {dilation})")

    def _settings(self) -> tuple:
        return self._kernel, self._stride, self._padding, self._dilation, self.ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, ndim=4)
        shape = (*x.shape[:2], *_output_size(self, x, *self._settings()))
        out = self.scratch("out", shape, x)
        indices = None
        if out is not None:  # indices in the output's memory format, so torch writes them in place
            like = x.new_empty(0, dtype=torch.long)
            if out.is_contiguous() or not out.is_contiguous(memory_format=torch.channels_last):
                indices = self.scratch("indices", shape, like)
            else:
                indices = self.scratch("indices", (shape[0], *shape[2:], shape[1]), like).permute(0, 3, 1, 2)
        out, indices = F.max_pool2d_forward(x, *self._settings(), out=out, indices=indices)
        self.save_for_backward(indices, x.shape)
        return out

    def backward(self, dout: Tensor) -> Tensor:
        indices, shape = self.saved_tensors
        return F.max_pool2d_backward(dout, indices, shape, dx=self.scratch("dx", shape, dout))

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.max_pool2d(x, *self._settings())

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.MaxPool2d(self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """The mean of each window, as ``torch.nn.AvgPool2d``; backward spreads each window's gradient evenly over it.

    Args:
        kernel_size, stride (default: ``kernel_size``), padding (zeros, at most half the kernel), ceil_mode: as
            :class:`MaxPool2d`.
        count_include_pad: count the zero padding in a window's size (the divisor).
        divisor_override: divide every window's sum by this instead.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None,
                 padding: int | tuple[int, int] = 0, ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__()
        owner = "AvgPool2d"
        self.kernel_size, self.stride = kernel_size, kernel_size if stride is None else stride
        self.padding = padding
        self._kernel = _pair_of(owner, "kernel_size", kernel_size, 1)
        self._stride = self._kernel if stride is None else _pair_of(owner, "stride", stride, 1)
        self._padding = _pair_of(owner, "padding", padding, 0)
        if any(2 * p > k for p, k in zip(self._padding, self._kernel)):
            raise ValueError(f"AvgPool2d: padding {padding} must be at most half the kernel {kernel_size}")
        if divisor_override is not None:
            _positive_int(owner, "divisor_override", divisor_override)
        self.ceil_mode = bool(ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        self.divisor_override = divisor_override

    def _settings(self) -> tuple:
        return (self._kernel, self._stride, self._padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, ndim=4)
        size = _output_size(self, x, self._kernel, self._stride, self._padding, (1, 1), self.ceil_mode)
        self.save_for_backward(x.shape)
        return F.avg_pool2d_forward(x, *self._settings(), out=self.scratch("out", (*x.shape[:2], *size), x))

    def backward(self, dout: Tensor) -> Tensor:
        (shape,) = self.saved_tensors
        return F.avg_pool2d_backward(dout, shape, *self._settings(), dx=self.scratch("dx", shape, dout))

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.avg_pool2d(x, *self._settings())

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.AvgPool2d(self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                                  self.divisor_override)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size whatever the input's, as ``torch.nn.AdaptiveAvgPool2d``: output row
    ``i`` averages input rows ``⌊i·H/H_out⌋ … ⌈(i + 1)·H/H_out⌉ − 1`` (columns likewise). ``output_size=1`` is
    global average pooling, one mean per channel.

    Args:
        output_size: ``(H_out, W_out)``, or one int for a square; ``None`` in the pair keeps that input size.
    """

    def __init__(self, output_size: int | tuple[int | None, int | None]) -> None:
        super().__init__()
        sizes = (output_size, output_size) if isinstance(output_size, int) else output_size
        if (not isinstance(sizes, (tuple, list)) or len(sizes) != 2
                or any(s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 1) for s in sizes)):
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be a positive integer or a pair of them (or None), "
                             f"got {output_size!r}")
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x, ndim=4)
        sizes = (self.output_size,) * 2 if isinstance(self.output_size, int) else self.output_size
        size = tuple(n if s is None else s for s, n in zip(sizes, x.shape[2:]))
        self.save_for_backward(x.shape)
        return F.adaptive_avg_pool2d_forward(x, size, out=self.scratch("out", (*x.shape[:2], *size), x))

    def backward(self, dout: Tensor) -> Tensor:
        (shape,) = self.saved_tensors
        return F.adaptive_avg_pool2d_backward(dout, shape, dx=self.scratch("dx", shape, dout))

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return TF.adaptive_avg_pool2d(x, self.output_size)

    def to_torch(self) -> torch.nn.Module:
        return torch.nn.AdaptiveAvgPool2d(self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
