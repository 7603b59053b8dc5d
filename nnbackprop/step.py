r"""One training step — forward, loss, hand-written backward, gradient hook, optimizer update — in two layouts.

Both steps run :func:`forward_backward`, the step's core: the model's forward, the loss, and the loss's gradient
handed back through the model's hand-written ``backward``. What differs is where the tensors live:

* :class:`SimpleStep` is the step written out on a plain model: ``optimizer.zero_grad()``, :func:`forward_backward`,
  the hook, ``optimizer.step()``.
* :class:`FastStep` runs the *same* calls inside the fast layout (:mod:`nnbackprop.layout`): outputs and gradients in
  buffers allocated once, parameters, gradients and optimizer state as views of flat tensors (so the update and a
  data-parallel ``all_reduce`` each touch one tensor), nothing read back to the host, and optionally a 16-bit compute
  dtype with float32 master weights. On CUDA it can run float32 matrix products in TF32 and replay the whole step as a
  CUDA graph (:mod:`nnbackprop.graphs`). It holds no math of its own.

:func:`make_step` picks the step :func:`nnbackprop.train` uses: ``FastStep`` unless :meth:`FastStep.why_not` names a
reason, in which case ``SimpleStep`` (its ``fallback_reason`` says why).

Both steps check on their first call that the model's backward gave every parameter a gradient through
:meth:`~nnbackprop.module.Parameter.accumulate` (:class:`~nnbackprop.errors.BackwardError` naming the parameter
otherwise), and refuse to run under ``torch.autocast``, which cannot reach hand-written layers.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from nnbackprop.errors import BackwardError, ConfigError
from nnbackprop.evaluation import num_correct
from nnbackprop.graphs import GraphedStep
from nnbackprop.layers import Dropout
from nnbackprop.layout import LOW_PRECISION, FastLayout
from nnbackprop.losses import Loss
from nnbackprop.module import Module
from nnbackprop.optim import Optimizer

GradHook = Callable[[Tensor], None]
"""Called after backward with all parameter gradients as one flat tensor ``(P,)`` (``model.parameters()`` order), which
it may change in place before the update (data-parallel training averages it over the ranks)."""


def forward_backward(model: Module, loss_fn: Loss, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The core of every step: ``output = model(x)``, ``loss = loss_fn(output, y)``, then
    ``model.backward(loss_fn.backward())``, which accumulates every parameter's gradient.

    Returns ``(loss_sum, n_correct)`` as 0-dim tensors on the device, without a host sync: the mean loss times ``N``
    and the number of correct predictions. A pass that fails (bad labels, say) leaves nothing saved behind.
    """
    try:
        output = model(x)
        loss = loss_fn(output, y)
        correct = num_correct(output, y)  # before backward, which may reuse the output's buffer
        model.backward(loss_fn.backward())
    except BaseException:
        model.release_saved()
        loss_fn.release_saved()
        raise
    return loss * x.shape[0], correct


def check_gradients_written(model: Module) -> None:
    """Raise :class:`~nnbackprop.errors.BackwardError` naming the first parameter the model's backward left without
    a gradient, or whose ``grad`` it assigned instead of calling ``accumulate`` (no host sync)."""
    for owner, layer in model.named_modules():
        for attribute, p in layer.named_parameters():
            if "." in attribute:
                continue  # a child's: checked as that child's own
            name = f"{owner}.{attribute}" if owner else attribute
            call = f"self.{attribute}.accumulate(d{attribute})"
            if p.grad is None:
                raise BackwardError(f"{layer.name}.backward left parameter {name!r} without a gradient: call {call} in "
                                    "backward (a tensor that should not be trained is a buffer: register_buffer)")
            if not p.grad_accumulated:
                raise BackwardError(f"{layer.name}.backward assigned {name}.grad instead of accumulating it: call "
                                    f"{call}, which adds to what is there (gradients accumulate until zero_grad)")


def _refuse_autocast(x: Tensor) -> None:
    try:
        active = torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        active = torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()
    if active:
        raise ConfigError("torch.autocast cannot reach nnbackprop's hand-written layers (they compute in their "
                          "parameters' dtype); for mixed precision give the step a compute dtype instead: "
                          "make_step(..., dtype=torch.bfloat16), or nnbackprop train --dtype bfloat16")


class SimpleStep:
    """The training step written out: ``zero_grad``, :func:`forward_backward`, ``grad_hook``, update.

    Args:
        model: the network; its ``backward`` fills ``param.grad``.
        loss_fn: a :class:`~nnbackprop.losses.Loss`.
        optimizer: a ``torch.optim.Optimizer`` over ``model.parameters()`` (ours: :mod:`nnbackprop.optim`).
        grad_hook: see :data:`GradHook`; here the gradients are concatenated for it and copied back.
        fallback_reason: why this step runs instead of a :class:`FastStep` (what :func:`make_step` found).

    Calling it returns ``(loss_sum, n_correct)``: see :func:`forward_backward`.
    """

    def __init__(self, model: Module, loss_fn: Loss, optimizer: torch.optim.Optimizer,
                 grad_hook: GradHook | None = None, *, fallback_reason: str | None = None) -> None:
        dtype = next(model.parameters(), torch.empty(0)).dtype
        if dtype in LOW_PRECISION:
            raise ConfigError(f"the model's parameters are {dtype}: training in a 16-bit dtype keeps float32 master "
                              "weights, which only the fast step does; build the model in float32 and use "
                              f"make_step(..., dtype={dtype}) (or nnbackprop train without --no-fast)")
        self.model, self.loss_fn, self.optimizer, self.grad_hook = model, loss_fn, optimizer, grad_hook
        self.fallback_reason = fallback_reason
        self.params = list(model.parameters())
        self._checked = False
        model.needs_input_grad = False  # the model's input is data

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        _refuse_autocast(x)
        self.optimizer.zero_grad()
        result = forward_backward(self.model, self.loss_fn, x, y)
        if not self._checked:
            check_gradients_written(self.model)
            self._checked = True
        if self.grad_hook is not None:
            self._hook_on_concatenated()
        self.optimizer.step()
        return result

    def model_state_dict(self) -> dict[str, Tensor]:
        """The model's ``state_dict`` (what a checkpoint keeps)."""
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a ``state_dict`` of the model."""
        self.model.load_state_dict(state)

    def _hook_on_concatenated(self) -> None:
        """Run the hook on the gradients concatenated (a parameter without one contributes zeros) and copy its result
        back into each ``p.grad``."""
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        self.grad_hook(flat)  # (P,)
        for p, new in zip(self.params, flat.split([p.numel() for p in self.params])):
            if p.grad is not None:
                p.grad.copy_(new.view_as(p))


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Within the block, float32 matrix products and convolutions on CUDA may use TF32 (when ``enabled``; else torch's
    settings are left as they are, and torch's default lets cuDNN's convolutions use TF32); the previous settings are
    restored afterwards."""
    if not enabled:
        yield
        return
    with _float32_precision("tf32"):
        yield


def full_float32() -> AbstractContextManager[None]:
    """Within the block, float32 matrix products and convolutions on CUDA round as float32 does, whatever torch's
    settings (torch's default lets cuDNN's convolutions use TF32, 10 bits of mantissa, which a float32 gradient check
    would see as errors of 1e-4); the previous settings are restored afterwards."""
    return _float32_precision("ieee")


@contextmanager
def _float32_precision(value: str) -> Iterator[None]:
    """CUDA's float32 matrix products and convolutions in ``value`` (``tf32`` or ``ieee``) within the block. Uses
    torch's ``fp32_precision`` API where it exists (torch refuses a mix of it and the legacy ``allow_tf32`` flags),
    the legacy flags otherwise."""
    backends = [torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)]
    if all(hasattr(b, "fp32_precision") for b in backends):
        previous = [b.fp32_precision for b in backends]
        try:
            for b in backends:
                b.fp32_precision = value
            yield
        finally:
            for b, before in zip(backends, previous):
                b.fp32_precision = before
        return
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = value == "tf32"
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class FastStep:
    """The training step of :class:`SimpleStep`, run in the fast layout; see the module docstring.

    Args:
        model, loss_fn, optimizer, grad_hook: as :class:`SimpleStep`. The model's parameters become views of one flat
            tensor (values unchanged); with one of nnbackprop's optimizers over exactly them (one group), the update
            runs on the flat tensors and the optimizer's state becomes views of flat tensors too.
        dtype: the compute dtype (default: the parameters'). ``torch.bfloat16`` (or ``float16``) trains in mixed
            precision: the layers compute in it, the optimizer updates float32 master weights with float32 state
            (needs one of nnbackprop's optimizers); :meth:`model_state_dict` gives the master weights.
        tf32: (CUDA) run float32 matrix products and convolutions in TF32 (see :func:`tf32`).
        cuda_graph: (CUDA) capture the step as a CUDA graph and replay it (:class:`~nnbackprop.graphs.GraphedStep`);
            needs one of nnbackprop's optimizers.
        graph_warmup: eager steps of each new graph key before it is captured (at least 1).

    Attributes:
        fallback_reason: always ``None`` (see :class:`SimpleStep`).
        graph_failure: why capturing failed and the step runs eagerly, or ``None``.

    Raises:
        ValueError: naming what stops the model from the fast layout (:meth:`why_not`), or an option the device lacks.

    Example:
        >>> step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9))
        >>> loss_sum, n_correct = step(x, y)  # 0-dim tensors on the device; read them once per log interval
    """

    fallback_reason: str | None = None

    def __init__(self, model: Module, loss_fn: Loss, optimizer: torch.optim.Optimizer,
                 grad_hook: GradHook | None = None, *, dtype: torch.dtype | None = None, tf32: bool = False,
                 cuda_graph: bool = False, graph_warmup: int = 3) -> None:
        reason = self.why_not(model, optimizer)
        if reason is not None:
            raise ValueError(f"FastStep cannot run this model: {reason}")
        first = next(model.parameters())
        device = first.device
        if first.dtype in LOW_PRECISION and dtype in (None, first.dtype):
            raise ConfigError(f"the model's parameters are {first.dtype}: training in a 16-bit dtype keeps float32 "
                              f"master weights; build the model in float32 and pass dtype={first.dtype}")
        if dtype == torch.float16:
            raise ConfigError("float16 training needs loss scaling (its gradients underflow), which nnbackprop does "
                              "not do; use dtype=torch.bfloat16, which has float32's range")
        if dtype is not None and dtype != first.dtype and not (dtype in LOW_PRECISION and first.dtype == torch.float32):
            raise ValueError(f"FastStep: dtype {dtype} for a {first.dtype} model; the compute dtype is the model's "
                             "own, or bfloat16/float16 for a float32 model (mixed precision); cast the model with "
                             ".to()")
        if (tf32 or cuda_graph) and device.type != "cuda":
            raise ValueError(f"FastStep: tf32 and cuda_graph need the model on a CUDA device, it is on {device}")
        ours = isinstance(optimizer, Optimizer)
        if cuda_graph and not ours:
            raise ValueError("FastStep: cuda_graph needs one of nnbackprop's optimizers (nb.SGD, nb.Adam, nb.AdamW), "
                             "whose hyperparameters live on the device")
        self.model, self.loss_fn, self.optimizer, self.grad_hook = model, loss_fn, optimizer, grad_hook
        model.needs_input_grad = False  # the model's input is data
        self.layout = FastLayout(model, loss_fn, optimizer=optimizer, compute_dtype=dtype)
        self.tf32 = tf32
        self._ours = ours
        self._checked = False
        self.graphs = GraphedStep(self._eager, model, optimizer, self.layout.workspace, device,
                                  warmup=graph_warmup) if cuda_graph else None

    @staticmethod
    def why_not(model: Module, optimizer: torch.optim.Optimizer | None = None) -> str | None:
        """Why the fast layout cannot hold ``model`` (and ``optimizer``), or ``None`` when it can."""
        reason = FastLayout.why_not(model)
        if reason is None and optimizer is not None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not {id(p) for p in model.parameters()} <= owned:
                reason = "the optimizer does not update every parameter of the model"
        if reason is None:
            device = next(model.parameters()).device
            for layer in model.modules():
                if isinstance(layer, Dropout) and layer.generator is not None and not _same_device(
                        layer.generator.device, device):
                    reason = (f"{layer.name} draws its masks from a {layer.generator.device} generator and the model "
                              f"is on {device}: each step would wait for a copy; give it a generator on {device} "
                              "(or None)")
        return reason

    @property
    def graph_failure(self) -> str | None:
        return self.graphs.failure if self.graphs is not None else None

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self.layout.is_bound():
            raise RuntimeError("FastStep: the model left the fast layout (was it moved or cast with .to()?); build a "
                               "new step after moving the model")
        _refuse_autocast(x)
        with tf32(self.tf32):
            return self.graphs(x, y) if self.graphs is not None else self._eager(x, y)

    def _eager(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        flat = self.layout.flat
        for p in flat.params:  # zero_grad(): the backward writes each gradient into its home
            p.grad = None
        result = forward_backward(self.model, self.loss_fn, x, y)
        if not self._checked:
            check_gradients_written(self.model)
            self._checked = True
        flat.collect_grads()
        if self.grad_hook is not None:
            self.grad_hook(flat.grad)
        if self._ours and not self.optimizer.has_hooks():
            self.optimizer.update()
        else:
            self.optimizer.step()
        return result

    # ------------------------------------------------------------------ the weights, with mixed precision
    def model_state_dict(self) -> dict[str, Tensor]:
        """The model's ``state_dict`` with float32 master weights under mixed precision (what a checkpoint keeps)."""
        return self.layout.flat.master_state(self.model.state_dict(), self.layout.names)

    def load_model_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load :meth:`model_state_dict`'s output (or any ``state_dict`` of the model), master weights included."""
        self.model.load_state_dict(state)
        self.layout.flat.load_master(state, self.layout.names)


def make_step(model: Module, loss_fn: Loss, optimizer: torch.optim.Optimizer, *, fast: bool = True,
              grad_hook: GradHook | None = None, **options: Any) -> SimpleStep | FastStep:
    """The step :func:`nnbackprop.train` uses: :class:`FastStep` when ``fast`` and the fast layout can hold the model
    (``options`` — ``dtype``, ``tf32``, ``cuda_graph``, ``graph_warmup`` — go to it), else :class:`SimpleStep`, whose
    ``fallback_reason`` says why.

    Raises:
        ConfigError: ``options`` ask for what only the fast step does (a 16-bit ``dtype``, ``cuda_graph``, ``tf32``)
            and it cannot run.
    """
    reason = "fast=False" if not fast else FastStep.why_not(model, optimizer)
    if reason is None:
        return FastStep(model, loss_fn, optimizer, grad_hook, **options)
    asked = [name for name, value in options.items() if value and name != "graph_warmup"
             and (name != "dtype" or value in LOW_PRECISION)]
    if asked:
        raise ConfigError(f"{', '.join(asked)} need the fast step, which cannot run here ({reason})")
    return SimpleStep(model, loss_fn, optimizer, grad_hook, fallback_reason=reason)
