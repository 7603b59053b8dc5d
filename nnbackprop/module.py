"""The module API: parameters, saved tensors, train/eval, device moves and ``state_dict``, shaped like ``torch.nn``.

A :class:`Module` computes ``forward(x)`` and, from the gradient of the loss with respect to its output,
``backward(dout)`` returns the gradient with respect to its input and *accumulates* the gradients of its parameters into
``param.grad``. Nothing here records an autograd graph: parameters are tensors that never require grad.

Writing a layer takes only these public names (``torch.autograd.Function``'s where it has them)::

    class Swish(nb.Module):
        def forward(self, x):
            self.check_input(x)                  # a clear error for a non-float, mis-shaped or misplaced input
            s = torch.sigmoid(x)
            self.save_for_backward(x, s)         # what backward needs, nothing more
            return x * s

        def backward(self, dout):
            x, s = self.saved_tensors
            return dout * (s + x * s * (1 - s))  # parameters, if any: self.weight.accumulate(dW)

The base class checks every call for you: ``backward`` without a ``forward`` (or a second ``backward`` after one),
``backward`` after two ``forward`` passes (whose saved tensors would be the wrong batch's), and a ``dout`` whose shape,
dtype or device is not the output's each raise an error naming the layer. As in torch, a ``forward`` under
``torch.no_grad()`` keeps nothing for backward (use it for evaluation and logging passes) and leaves what an earlier
``forward`` saved untouched.

**The fast layout, as a layer sees it.** The fast training step (:mod:`nnbackprop.layout`) gives every module a
*workspace* and every parameter a *gradient home*, through methods they own: :meth:`Module.bind_workspace` and
:meth:`Parameter.bind_grad_home`. A layer that wants to run without allocating asks for them with two calls, and
works unchanged (allocating) when there is no fast layout::

    def forward(self, x):                                    # x: (N, D_in)
        out = self.scratch("out", (x.shape[0], self.d_out), x)        # a buffer, or None: the op allocates
        ...                                                  # torch.mm(x, self.weight.t(), out=out)

    def backward(self, dout):
        dW = torch.mm(dout.t(), x, out=self.weight.grad_out())       # the gradient's home, or None
        self.weight.accumulate(dW)                           # always: it accumulates, or adopts dW if it is the home
        return torch.mm(dout, self.weight, out=self.scratch("dx", x.shape, x))

``scratch(name, shape, like)`` returns the same memory at every step (its content is undefined: write all of it);
``grad_out()`` returns where the gradient lives while ``grad`` is clear. The built-in layers are written this way.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from nnbackprop.errors import ReferenceForwardError, gist

HIDDEN_FROM_AUTOGRAD = ".data, .detach(), .item(), NumPy, in-place ops on the input"
"""What in a forward keeps autograd from following it (named in :class:`ReferenceForwardError`)."""


class Parameter(torch.nn.Parameter):
    """A trainable tensor of a :class:`Module`, and its gradient.

    It is a ``torch.Tensor`` — every tensor op, ``torch.optim`` optimizers and learning-rate schedulers take it as
    they take a ``torch.nn.Parameter`` — that never requires grad: its gradient is written by the hand-written
    backward passes, through :meth:`accumulate`, into ``.grad`` (same shape, dtype and device), which stays ``None``
    until the first backward and is cleared by :meth:`Module.zero_grad`.

    The fast training step rebinds the parameter's storage to a view of one flat tensor of all parameters and gives it
    a view of one flat gradient tensor as its *gradient home* (:meth:`bind_grad_home`, :mod:`nnbackprop.layout`);
    nothing changes for the code that uses it.
    """

    _grad_home: Tensor | None = None  # where accumulate() puts a new gradient (a view of the fast layout's)
    _accumulated: Tensor | None = None  # the tensor accumulate() last left in grad

    def __new__(cls, data: Tensor | None = None, requires_grad: bool = False) -> "Parameter":
        if data is None:
            data = torch.empty(0)
        if not isinstance(data, Tensor):
            raise TypeError(f"Parameter expects a torch.Tensor, got {type(data).__name__}")
        if not data.is_floating_point():
            raise TypeError(f"Parameter expects a floating-point tensor, got dtype {data.dtype}: gradient steps need "
                            "real numbers; convert it first, e.g. Parameter(data.float())")
        return torch.Tensor._make_subclass(cls, data.detach(), False)

    def bind_grad_home(self, home: Tensor | None) -> None:
        """Make ``home`` (this parameter's shape, dtype and device) where :meth:`accumulate` puts the gradient while
        ``grad`` is clear, and what :meth:`grad_out` offers; ``None``: a fresh tensor each time."""
        if home is not None and (home.shape != self.shape or home.dtype != self.dtype or home.device != self.device):
            raise ValueError(f"a gradient home must be shaped like its parameter {tuple(self.shape)} ({self.dtype}, "
                             f"{self.device}), got {tuple(home.shape)} ({home.dtype}, {home.device})")
        self._grad_home = home

    @property
    def grad_home(self) -> Tensor | None:
        """Where the gradient lives in the fast layout (see :meth:`bind_grad_home`), else ``None``."""
        return self._grad_home

    @property
    def grad_accumulated(self) -> bool:
        """Whether ``grad`` is what :meth:`accumulate` left there (``False`` when it is ``None``, or was assigned)."""
        return self.grad is not None and self.grad is self._accumulated

    def accumulate(self, dgrad: Tensor) -> None:
        """Add ``dgrad`` (this parameter's shape, dtype and device) into ``grad``; a cleared ``grad`` becomes a copy
        (in the gradient home, when there is one)."""
        if dgrad is self._grad_home:  # written in place through grad_out()
            self.grad = self._accumulated = dgrad
            return
        if dgrad.shape != self.shape or dgrad.dtype != self.dtype or dgrad.device != self.device:
            raise ValueError(
                f"gradient of a parameter of shape {tuple(self.shape)} ({self.dtype}, {self.device}) got "
                f"{tuple(dgrad.shape)} ({dgrad.dtype}, {dgrad.device}); a layer's backward must accumulate exactly "
                "d loss / d parameter"
            )
        if self.grad is not None:
            self.grad.add_(dgrad)
            self._accumulated = self.grad
        elif self._grad_home is None:
            self.grad = self._accumulated = dgrad.detach().clone(memory_format=torch.contiguous_format)
        else:
            self.grad = self._accumulated = self._grad_home.copy_(dgrad)

    def grad_out(self) -> Tensor | None:
        """Where a backward may write this parameter's gradient directly (``out=``) before :meth:`accumulate`: the
        gradient home while ``grad`` is clear, else ``None`` (compute the gradient, then accumulate)."""
        return self._grad_home if self.grad is None else None


class _StandIn(torch.Tensor):
    """A parameter's stand-in while :meth:`Module.reference_forward` runs a layer's own forward under autograd: it is
    the tensor autograd differentiates, and its ``.data`` is itself, so a forward that reads ``self.weight.data`` is
    traced too."""

    @property
    def data(self) -> Tensor:  # type: ignore[override]
        return self


def _checked_backward(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``backward``: refuse it unless exactly one ``forward`` saved for it, check ``dout``, release
    the saved tensors afterwards, and run the backward hooks."""

    @functools.wraps(backward)
    def checked_backward(self: "Module", *args: Any, **kwargs: Any) -> Any:
        state = self.__dict__
        if state["_depth"]:  # a subclass calling super().backward
            return backward(self, *args, **kwargs)
        if state["_pending"] != 1:
            self._refuse_backward()
        if args:
            self._check_dout(args[0])
        state["_depth"] = 1
        try:
            dx = backward(self, *args, **kwargs)
        finally:
            state["_depth"] = 0
            state["_saved"], state["_pending"], state["_output"] = None, 0, None
        if state["_backward_hooks"]:
            for hook in state["_backward_hooks"].values():
                hook(self, (dx,), args[:1])
        return dx

    return checked_backward


class Module:
    """Base class of every layer, loss and container.

    Subclasses assign :class:`Parameter` s, sub-modules and (via :meth:`register_buffer`) buffers as attributes, and
    implement :meth:`forward` and :meth:`backward`: ``forward`` keeps what ``backward`` needs with
    :meth:`save_for_backward`; ``backward`` reads it from :attr:`saved_tensors`, returns ``dx`` and accumulates the
    parameter gradients. Each forward serves one backward (see the module docstring for what is checked).

    A layer may also implement :meth:`reference_forward` (the same function written with ``torch.nn.functional``, for
    the gradient checker) and :meth:`to_torch` (the equivalent ``torch.nn`` module). A user's layer that implements
    neither is checked by running autograd through its own ``forward``.

    Attributes:
        training: dropout active and batch norm on batch statistics (``train()``), or not (``eval()``).
        needs_input_grad: whether ``backward`` must return ``dx``. A training step clears it on the model, whose
            input is data; a layer may then skip computing ``dx`` and return ``None`` (``torch.autograd.Function``'s
            ``ctx.needs_input_grad``).
    """

    def __init__(self) -> None:
        state = self.__dict__
        state.update(_parameters=OrderedDict(), _buffers=OrderedDict(), _modules=OrderedDict(), training=True,
                     needs_input_grad=True, _saved=None, _pending=0, _depth=0, _output=None, _workspace=None,
                     _scratch={}, _forward_hooks=OrderedDict(), _backward_hooks=OrderedDict(), _custom_name=None)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "backward" in cls.__dict__:
            cls.backward = _checked_backward(cls.__dict__["backward"])

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               "before assigning attributes")
        for store in (self._parameters, self._modules, self._buffers):
            store.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, tensor: Tensor) -> None:
        """Keep ``tensor`` as state that is saved and moved with the module but not trained (e.g. running means)."""
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__setattr__(self, name, tensor)
        self._buffers[name] = tensor  # a buffer registered again keeps its place in state_dict

    # ------------------------------------------------------------------ computation
    def forward(self, *inputs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dout: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, *inputs: Any) -> Any:
        """Run :meth:`forward` (call the module, ``layer(x)``, as in torch: calling ``forward`` directly skips the
        bookkeeping that lets :meth:`backward` check it has exactly one forward to go with) and the forward hooks."""
        state = self.__dict__
        saving = torch.is_grad_enabled()
        try:
            out = self.forward(*inputs)
        except BaseException:
            if saving:  # forget what a failed pass saved, here and in the children it reached
                self.release_saved()
            raise
        if saving:
            state["_pending"] += 1
            state["_output"] = out  # what backward checks dout against
        if state["_forward_hooks"]:
            for hook in state["_forward_hooks"].values():
                result = hook(self, inputs, out)
                if result is not None:
                    out = result
        return out

    def save_for_backward(self, *values: Any) -> None:
        """Keep what :meth:`backward` needs (tensors, or any values), replacing what an earlier forward kept. Under
        ``torch.no_grad()`` nothing is kept, as in torch."""
        if torch.is_grad_enabled():
            self.__dict__["_saved"] = values

    @property
    def saved_tensors(self) -> tuple[Any, ...]:
        """What the last :meth:`forward` passed to :meth:`save_for_backward`, for :meth:`backward` to use."""
        saved = self.__dict__["_saved"]
        if saved is None:
            raise RuntimeError(f"{self.name}: nothing was saved for backward; call save_for_backward(...) in forward, "
                               "and run forward (with gradients enabled, outside torch.no_grad()) before backward")
        return saved

    def _refuse_backward(self) -> None:
        pending = self.__dict__["_pending"]
        self.release_saved()
        if pending == 0:
            raise RuntimeError(
                f"{self.name}.backward() called without a forward() to go with it: backward needs the values that "
                "forward saves, and each forward serves one backward. Call forward(x) first (a forward under "
                "torch.no_grad() saves nothing, as in torch)."
            )
        raise RuntimeError(
            f"{self.name}.backward() after {pending} forward passes: each forward replaces the tensors saved for "
            "backward, so this gradient would be computed with the last batch's values. Call backward right after "
            "the forward it belongs to, and run passes that need no backward (logging, evaluation) under "
            "torch.no_grad(), which saves nothing. The saved tensors were released; run forward again."
        )

    def release_saved(self) -> None:
        """Forget what forward saved here and in the children, without a backward (e.g. a container that does not
        need this module's ``dx``, or a step that failed half-way)."""
        for m in self.modules():
            m.__dict__["_saved"], m.__dict__["_pending"] = None, 0

    def _check_dout(self, dout: Any) -> None:
        if isinstance(dout, Tensor) and dout.requires_grad:
            raise ValueError(f"{self.name}.backward: dout requires grad, as for a second-order gradient; nnbackprop's "
                             "backward is written by hand to first order and cannot be differentiated: for "
                             "second-order gradients use torch.func or autograd on the torch.nn model (nb.to_torch)")
        out = self.__dict__["_output"]
        if not isinstance(out, Tensor):
            return
        if not isinstance(dout, Tensor):
            raise ValueError(f"{self.name}.backward: dout must be a tensor shaped like the output "
                             f"{tuple(out.shape)}, got {type(dout).__name__}")
        if dout.shape != out.shape or dout.dtype != out.dtype or dout.device != out.device:
            raise ValueError(
                f"{self.name}.backward: dout must match the output of forward, shape {tuple(out.shape)} {out.dtype} "
                f"on {out.device}; got shape {tuple(dout.shape)} {dout.dtype} on {dout.device}. dout is d loss / d "
                "output."
            )

    # ------------------------------------------------------------------ the fast layout
    def bind_workspace(self, workspace: Any) -> None:
        """Draw :meth:`scratch` buffers from ``workspace`` (a :class:`~nnbackprop.layout.Workspace`, which the fast
        layout binds to every module of a model and its loss); ``None``: allocate again. Only this module, not its
        children."""
        self.__dict__.update(_workspace=workspace, _scratch={})

    @property
    def workspace(self) -> Any:
        """The :class:`~nnbackprop.layout.Workspace` this module writes into, or ``None``."""
        return self.__dict__["_workspace"]

    def scratch(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
        """A tensor of ``shape`` (``like``'s dtype and device) from the bound workspace, for an op to write its result
        into (``out=``, ``dx=``); ``None`` when no workspace is bound or under ``torch.no_grad()`` (the op then
        allocates). Its content is undefined, and the same memory comes back at every step."""
        state = self.__dict__
        workspace = state["_workspace"]
        if workspace is None or not torch.is_grad_enabled():
            return None
        cached = state["_scratch"].get((name, shape))
        if cached is not None and cached[0] == workspace.generation:
            return cached[1]
        view = workspace.buffer(self, name, shape, like)
        state["_scratch"][(name, shape)] = (workspace.generation, view)
        return view

    def check_input(self, x: Any, *, ndim: int | None = None, features: int | None = None,
                    channels: int | None = None) -> None:
        """Raise a ``ValueError`` naming this module, what it expected and what it got, unless ``x`` is a
        floating-point tensor of rank ``ndim`` whose last dimension is ``features`` and whose dimension 1 is
        ``channels`` (images ``(N, C, H, W)``: ``ndim=4, channels=C``), on the parameters' dtype and device."""
        if (isinstance(x, Tensor) and x.is_floating_point() and (ndim is None or x.dim() == ndim)
                and (features is None or (x.dim() > 0 and x.shape[-1] == features))
                and (channels is None or (x.dim() > 1 and x.shape[1] == channels))):
            params = self._parameters
            if not params:
                return
            p = params[next(iter(params))]
            if x.dtype == p.dtype and x.device == p.device:
                return
        self._input_error(x, ndim, features, channels)

    def _input_error(self, x: Any, ndim: int | None, features: int | None, channels: int | None) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{self.name}: expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(
                f"{self.name}: expected a floating-point input, got dtype {x.dtype}. Convert it first, e.g. x.float() "
                "(uint8 images should also be scaled, e.g. x.float() / 255)."
            )
        images = ndim == 4
        if ndim is not None and x.dim() != ndim:
            expected = f"(N, {features})" if ndim == 2 and features is not None else f"rank {ndim}"
            if images:
                expected = f"(N, {channels if channels is not None else 'C'}, H, W)"
            hint = ("Give images as (N, C, H, W) (x.view(N, C, H, W) undoes a Flatten); add a batch dimension with "
                    "x.unsqueeze(0)." if images else
                    "Flatten images with nnbackprop.Flatten() or add a batch dimension with x.unsqueeze(0).")
            raise ValueError(f"{self.name}: expected input of shape {expected}, got shape {tuple(x.shape)} "
                             f"(rank {x.dim()}). {hint}")
        if features is not None and (x.dim() == 0 or x.shape[-1] != features):
            raise ValueError(
                f"{self.name}: expected {features} input features, shape (N, {features}), got shape {tuple(x.shape)}"
            )
        if channels is not None and (x.dim() < 2 or x.shape[1] != channels):
            rest = ", H, W" if images else ", ..."
            raise ValueError(f"{self.name}: expected {channels} input channels, shape (N, {channels}{rest}), got "
                             f"shape {tuple(x.shape)}")
        p = next(iter(self._parameters.values()))
        if x.dtype != p.dtype:
            raise ValueError(
                f"{self.name}: input dtype {x.dtype} differs from the parameters' {p.dtype}. Cast the input "
                f"(x.to({p.dtype})) or the model (model.to(dtype={x.dtype}))."
            )
        raise ValueError(
            f"{self.name}: input is on {x.device} but the parameters are on {p.device}. Move one of them, "
            f"e.g. x.to('{p.device}') or model.to('{x.device}')."
        )

    # ------------------------------------------------------------------ hooks
    def register_forward_hook(self, hook: Callable[["Module", tuple, Any], Any]) -> RemovableHandle:
        """Call ``hook(module, inputs, output)`` after every ``module(...)`` call (a non-``None`` result replaces the
        output), as ``torch.nn.Module.register_forward_hook``."""
        handle = RemovableHandle(self._forward_hooks)
        self._forward_hooks[handle.id] = hook
        return handle

    def register_full_backward_hook(self, hook: Callable[["Module", tuple, tuple], None]) -> RemovableHandle:
        """Call ``hook(module, (dx,), (dout,))`` after every ``backward``, as torch's full backward hooks
        (``grad_input``, ``grad_output``); ``dx`` is ``None`` where the input gradient was not needed."""
        handle = RemovableHandle(self._backward_hooks)
        self._backward_hooks[handle.id] = hook
        return handle

    @property
    def hooked(self) -> bool:
        """Whether forward or backward hooks are registered on this module (not its children)."""
        return bool(self.__dict__["_forward_hooks"] or self.__dict__["_backward_hooks"])

    # ------------------------------------------------------------------ checking
    def reference_forward(self, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """The forward computation written with autograd-traceable torch ops, for the gradient checker.

        ``params`` maps this module's parameter names to tensors that stand in for them (they may require grad).
        The default runs :meth:`forward` itself with the parameters swapped in, so a user's layer is checked against
        autograd through its own forward. Built-in layers override this with ``torch.nn.functional`` so that a wrong
        forward is caught too. Nothing the module saved or its workspace holds is changed.
        """
        modules = list(self.named_modules())
        saved = [(m, {k: m.__dict__[k] for k in ("_saved", "_pending", "_output", "_workspace")}) for _, m in modules]
        swapped = [(m, name, p, f"{mod_name}.{name}" if mod_name else name)
                   for mod_name, m in modules for name, p in m._parameters.items()]
        try:
            for m, _ in saved:
                m.__dict__["_workspace"] = None
            for m, name, _, path in swapped:
                object.__setattr__(m, name, params[path].as_subclass(_StandIn))
            out = self.forward(x)
        except ReferenceForwardError:
            raise
        except Exception as error:  # a forward autograd cannot run (NumPy on a tensor that requires grad, ...)
            raise self._untraceable(gist(error)) from error
        finally:
            for m, name, p, _ in swapped:
                object.__setattr__(m, name, p)
            for m, state in saved:
                m.__dict__.update(state)
        if (isinstance(out, Tensor) and not out.requires_grad
                and (x.requires_grad or any(v.requires_grad for v in params.values()))):
            raise self._untraceable("its output is not connected to its input or parameters")
        return out

    def _untraceable(self, why: str) -> ReferenceForwardError:
        return ReferenceForwardError(
            f"{self.name}: autograd cannot follow its forward ({why}); write a reference_forward(self, x, params) "
            f"for it with differentiable torch ops (no {HIDDEN_FROM_AUTOGRAD}), see Module.reference_forward")

    def to_torch(self) -> torch.nn.Module:
        """The equivalent ``torch.nn`` module, holding copies of this module's parameters and buffers (the same
        ``state_dict`` keys).

        Built-in layers return torch.nn's own (``torch.nn.Linear``, ...). For any other module — a user's layer, or a
        block made of built-in layers — the default builds one from the module itself: its children converted (each
        by its own ``to_torch``), its parameters, buffers and settings copied, and its own ``forward`` run as the
        torch module's forward. That works when ``forward`` uses torch ops, its children and its parameters (the calls
        nnbackprop adds — ``check_input``, ``save_for_backward``, ``scratch`` — do nothing there). A layer whose
        forward needs anything else overrides this method and returns its own ``torch.nn`` equivalent.
        """
        return _torch_equivalent(self)

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
            m.__dict__["training"] = mode
        return self

    def eval(self) -> "Module":
        """Set evaluation mode: dropout off, batch norm on running statistics."""
        return self.train(False)

    @torch.no_grad()
    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None) -> "Module":
        """Move parameters, gradients and floating-point buffers to ``device`` and/or cast them to ``dtype``, in place;
        as in torch, ``to(torch.float64)`` is ``to(dtype=torch.float64)``. A model bound to the fast layout leaves it
        (its parameters get storage of their own)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"{self.name}.to(dtype={dtype}): parameters must be floating point")
        moved = False
        for m in self.modules():
            for name, p in list(m._parameters.items()):
                data = p.data.to(device=device, dtype=dtype)
                if data.data_ptr() == p.data_ptr() and data.dtype == p.dtype and data.device == p.device:
                    continue
                moved = True
                grad = None if p.grad is None else p.grad.to(device=device, dtype=dtype)
                p.grad = None
                p.bind_grad_home(None)
                if torch._has_compatible_shallow_copy_type(p, data):
                    p.data = data
                else:  # e.g. to the meta device: a new Parameter, as torch.nn.Module.to makes then
                    p = Parameter(data)
                    m.__setattr__(name, p)
                p.grad = grad
            for name, b in list(m._buffers.items()):
                moved_buffer = b.to(device=device, dtype=dtype if b.is_floating_point() else None)
                if moved_buffer is not b:
                    moved = True
                    m.register_buffer(name, moved_buffer)
        if moved:  # what forward saved, and the fast layout's buffers, are on the old device or dtype
            for m in self.modules():
                m.__dict__.update(_saved=None, _pending=0)
                m.bind_workspace(None)
        return self

    def float(self) -> "Module":
        """``to(torch.float32)``, as torch.nn's."""
        return self.to(torch.float32)

    def double(self) -> "Module":
        """``to(torch.float64)``, as torch.nn's."""
        return self.to(torch.float64)

    def cpu(self) -> "Module":
        """``to("cpu")``, as torch.nn's."""
        return self.to("cpu")

    def cuda(self, device: int | torch.device | str | None = None) -> "Module":
        """``to("cuda")`` (or ``cuda:device``), as torch.nn's."""
        return self.to(torch.device("cuda", device) if isinstance(device, int) else device or "cuda")

    def state_dict(self) -> "OrderedDict[str, Tensor]":
        """Parameters and buffers by dotted name; the keys and shapes match the equivalent ``torch.nn`` model."""
        state: OrderedDict[str, Tensor] = OrderedDict()
        for mod_name, mod in self.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for name, p in mod._parameters.items():
                state[prefix + name] = p.detach().clone()
            for name, b in mod._buffers.items():
                state[prefix + name] = b.detach().clone()
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True) -> None:
        """Copy values from ``state_dict`` (ours or a ``torch.nn`` model's) into this module, keeping its dtype and
        device, in place (so a model bound to the fast layout stays bound).

        Raises:
            RuntimeError: listing every missing or unexpected key (with ``strict``), non-tensor value and shape
                mismatch, as ``torch.nn.Module.load_state_dict``; nothing is loaded then.
        """
        targets: dict[str, Tensor] = dict(self.named_parameters())
        targets.update(self.named_buffers())
        problems = []
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        if strict and missing:
            problems.append(f"missing keys {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys {unexpected}")
        for key, value in state_dict.items():
            if key not in targets:
                continue
            if not isinstance(value, Tensor):
                problems.append(f"'{key}' holds a {type(value).__name__}, not a tensor")
            elif value.shape != targets[key].shape:
                problems.append(f"size mismatch for '{key}': {tuple(value.shape)} in the state dict, "
                                f"{tuple(targets[key].shape)} in the model")
        if problems:
            raise RuntimeError(f"load_state_dict into {self.name}: {'; '.join(problems)}. The state dict must come "
                               "from a model of the same architecture.")
        for key, value in state_dict.items():
            if key in targets:
                targets[key].copy_(value.detach())

    # ------------------------------------------------------------------ display
    @property
    def name(self) -> str:
        """How errors and reports name this module: ``Type(settings)`` unless a name was assigned."""
        return self.__dict__["_custom_name"] or f"{type(self).__name__}({self.extra_repr()})"

    @name.setter
    def name(self, value: str) -> None:
        self.__dict__["_custom_name"] = value

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return self.name
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            child_repr = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_repr}")
        lines.append(")")
        return "\n".join(lines)


class _InTorch:
    """What an nnbackprop module's ``forward`` may call on ``self`` beyond torch ops, for :func:`_torch_equivalent`:
    each does nothing (or says there is no buffer) in a ``torch.nn`` module."""

    def check_input(self, *args: Any, **kwargs: Any) -> None:
        return None

    def save_for_backward(self, *values: Any) -> None:
        return None

    def scratch(self, *args: Any, **kwargs: Any) -> None:
        return None

    @property
    def name(self) -> str:
        return type(self).__name__


def _torch_equivalent(module: Module) -> torch.nn.Module:
    """A ``torch.nn.Module`` of a class with ``module``'s own methods (its class and bases up to :class:`Module`),
    holding ``module``'s children converted, copies of its parameters and buffers, and its other attributes."""
    cls = type(module)
    namespace: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or issubclass(Module, klass):  # Module itself and what it derives from
            continue
        namespace.update({k: v for k, v in vars(klass).items()
                          if not (k.startswith("__") and k.endswith("__")) and k not in ("backward", "to_torch")})
    torch_class = type(cls.__name__, (_InTorch, torch.nn.Module), {**namespace, "__module__": cls.__module__})
    converted = torch_class.__new__(torch_class)
    torch.nn.Module.__init__(converted)
    state = module.__dict__
    for key, value in state.items():
        if not key.startswith("_") and key not in state["_parameters"] and key not in state["_modules"] \
                and key not in state["_buffers"] and key not in ("training", "needs_input_grad"):
            object.__setattr__(converted, key, value)
    for key, child in state["_modules"].items():
        converted.add_module(key, child.to_torch())
    for key, p in state["_parameters"].items():
        converted.register_parameter(key, torch.nn.Parameter(p.detach().clone()))
    for key, b in state["_buffers"].items():
        converted.register_buffer(key, b.detach().clone())
    return converted.train(module.training)
