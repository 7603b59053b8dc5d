"""The module API: parameters, buffers, train/eval, device moves and ``state_dict``, shaped like ``torch.nn``.

A :class:`Module` computes ``forward(x)`` and, from the gradient of the loss with respect to its output, ``backward(dout)``
returns the gradient with respect to its input and *accumulates* the gradients of its parameters into ``param.grad``.
Nothing here records an autograd graph: parameters are plain tensors that never require grad.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor


class Parameter:
    """A trainable tensor and its gradient.

    Attributes:
        data: the value, updated in place by the optimizer.
        grad: the accumulated gradient of the loss with respect to ``data`` (same shape, dtype and device), or ``None``
            until the first ``backward``. Backward adds into it; :meth:`Module.zero_grad` clears it.
    """

    __slots__ = ("data", "grad")

    def __init__(self, data: Tensor) -> None:
        if not isinstance(data, Tensor):
            raise TypeError(f"Parameter expects a torch.Tensor, got {type(data).__name__}")
        self.data = data.detach()
        self.grad: Tensor | None = None

    def accumulate(self, dgrad: Tensor) -> None:
        """Add ``dgrad`` into ``grad`` (allocating it on first use)."""
        if self.grad is None:
            self.grad = dgrad.detach().clone()
        else:
            self.grad.add_(dgrad)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, device={self.data.device})"


class Module:
    """Base class of every layer, loss-free model and container.

    Subclasses assign :class:`Parameter` s, sub-modules and (via :meth:`register_buffer`) buffers as attributes, and
    implement :meth:`forward` and :meth:`backward`. ``forward`` keeps what ``backward`` needs in ``self._cache``;
    ``backward`` consumes it, so calling ``backward`` before ``forward``, or twice after one ``forward``, is an error.

    A layer may also implement :meth:`reference_forward` (the same function written with ``torch.nn.functional``, for
    the gradient checker) and :meth:`to_torch` (the equivalent ``torch.nn`` module). A user's layer that implements
    neither is checked by running autograd through its own ``forward``.
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_cache", None)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning attributes")
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, tensor: Tensor) -> None:
        """Keep ``tensor`` as state that is saved and moved with the module but not trained (e.g. running means)."""
        object.__setattr__(self, name, tensor)
        self._buffers[name] = tensor

    def _set_buffer(self, name: str, tensor: Tensor) -> None:
        object.__setattr__(self, name, tensor)
        self._buffers[name] = tensor

    # ------------------------------------------------------------------ computation
    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dout: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def _pop_cache(self) -> Any:
        """Return what forward saved for backward, and forget it; raise if there is nothing to use."""
        cache = self._cache
        if cache is None:
            raise RuntimeError(
                f"{self._name()}.backward() called without a forward() to go with it: backward needs the values that "
                "forward saves, and each forward serves one backward. Call forward(x) first."
            )
        object.__setattr__(self, "_cache", None)
        return cache

    def _save_for_backward(self, *values: Any) -> None:
        object.__setattr__(self, "_cache", values)

    def check_input(self, x: Any, *, ndim: int | None = None, features: int | None = None) -> None:
        """Raise a ``ValueError`` naming this module, what it expected and what it got, unless ``x`` is a
        floating-point tensor of rank ``ndim`` whose last dimension is ``features``, on the parameters' dtype and device.
        """
        name = self._name()
        if not isinstance(x, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(
                f"{name}: expected a floating-point input, got dtype {x.dtype}. Convert it first, e.g. x.float() "
                "(uint8 images should also be scaled, e.g. x.float() / 255)."
            )
        if ndim is not None and x.dim() != ndim:
            expected = f"(N, {features})" if ndim == 2 and features is not None else f"rank {ndim}"
            raise ValueError(
                f"{name}: expected input of shape {expected}, got shape {tuple(x.shape)} (rank {x.dim()}). "
                "Flatten images with nnbackprop.Flatten() or add a batch dimension with x.unsqueeze(0)."
            )
        if features is not None and (x.dim() == 0 or x.shape[-1] != features):
            raise ValueError(
                f"{name}: expected {features} input features, shape (N, {features}), got shape {tuple(x.shape)}"
            )
        p = next(iter(self._parameters.values()), None)
        if p is not None and x.dtype != p.data.dtype:
            raise ValueError(
                f"{name}: input dtype {x.dtype} differs from the parameters' {p.data.dtype}. Cast the input "
                f"(x.to({p.data.dtype})) or the model (model.to(dtype={x.dtype}))."
            )
        if p is not None and x.device != p.data.device:
            raise ValueError(
                f"{name}: input is on {x.device} but the parameters are on {p.data.device}. Move one of them, "
                f"e.g. x.to('{p.data.device}') or model.to('{x.device}')."
            )

    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """The forward computation written with autograd-traceable torch ops, for the gradient checker.

        ``params`` maps this module's parameter names to tensors that stand in for them (they may require grad).
        The default runs :meth:`forward` itself with the parameters swapped in, so a user's layer is checked against
        autograd through its own forward. Built-in layers override this with ``torch.nn.functional`` so that a wrong
        forward is caught too.
        """
        own = dict(self.named_parameters())
        saved = {name: p.data for name, p in own.items()}
        caches = [(m, m._cache) for m in self.modules()]
        try:
            for name, p in own.items():
                p.data = params[name]
            return self.forward(x)
        finally:
            for name, p in own.items():
                p.data = saved[name]
            for m, cache in caches:
                object.__setattr__(m, "_cache", cache)

    def to_torch(self) -> torch.nn.Module:
        """Return the equivalent ``torch.nn`` module, holding copies of this module's parameters and buffers."""
        raise NotImplementedError(f"{type(self).__name__} has no torch.nn equivalent")

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def children(self) -> Iterator["Module"]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for mod_name, mod in self.named_modules(prefix):
            for name, p in mod._parameters.items():
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for mod_name, mod in self.named_modules(prefix):
            for name, b in mod._buffers.items():
                yield (f"{mod_name}.{name}" if mod_name else name), b

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient (to ``None``, or to zeros in place with ``set_to_none=False``)."""
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def train(self, mode: bool = True) -> "Module":
        """Set training mode (dropout active, batch norm on batch statistics) on this module and its children."""
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        """Set evaluation mode: dropout off, batch norm on running statistics."""
        return self.train(False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Module":
        """Move parameters, gradients and floating-point buffers to ``device`` and/or cast them to ``dtype``, in place."""
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{self._name()}.to(dtype={dtype}): parameters must be floating point")
        for m in self.modules():
            for p in m._parameters.values():
                p.data = p.data.to(device=device, dtype=dtype)
                if p.grad is not None:
                    p.grad = p.grad.to(device=device, dtype=dtype)
            for name, b in list(m._buffers.items()):
                m._set_buffer(name, b.to(device=device, dtype=dtype if b.is_floating_point() else None))
            object.__setattr__(m, "_cache", None)
        return self

    def state_dict(self) -> "OrderedDict[str, Tensor]":
        """Parameters and buffers by dotted name; the keys and shapes match the equivalent ``torch.nn`` model."""
        state: OrderedDict[str, Tensor] = OrderedDict()
        for mod_name, mod in self.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for name, p in mod._parameters.items():
                state[prefix + name] = p.data.detach().clone()
            for name, b in mod._buffers.items():
                state[prefix + name] = b.detach().clone()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Copy values from ``state_dict`` (ours or a ``torch.nn`` model's) into this module, keeping its dtype and device.

        Raises:
            KeyError: with ``strict``, when keys are missing or unexpected (all are listed).
            ValueError: when a tensor's shape differs from this module's.
        """
        own = OrderedDict(self.named_parameters())
        buffers = {}
        for mod_name, mod in self.named_modules():
            for name in mod._buffers:
                buffers[f"{mod_name}.{name}" if mod_name else name] = (mod, name)
        missing = [k for k in list(own) + list(buffers) if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own and k not in buffers]
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict into {self._name()}: missing keys {missing}, unexpected keys {unexpected}. "
                "The state dict must come from a model of the same architecture."
            )
        for key, value in state_dict.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"load_state_dict: '{key}' holds a {type(value).__name__}, expected a tensor")
            target = own[key].data if key in own else getattr(*buffers[key]) if key in buffers else None
            if target is None:
                continue
            if target.shape != value.shape:
                raise ValueError(
                    f"load_state_dict: '{key}' has shape {tuple(value.shape)} in the state dict but "
                    f"{tuple(target.shape)} in the model"
                )
            target.copy_(value.detach())

    # ------------------------------------------------------------------ display
    def _name(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return self._name()
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        lines.append(")")
        return "\n".join(lines)
