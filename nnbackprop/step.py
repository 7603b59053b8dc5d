r"""One training step — forward, loss, hand-written backward, gradient hook, optimizer update — in two layouts.

:class:`SimpleStep` is the step written out on a plain model. :class:`FastStep` runs the *same* calls — the same layers,
the same :mod:`nnbackprop.functional` math, the same optimizer rule — inside the fast layout (:mod:`nnbackprop.layout`):
outputs and gradients in buffers allocated once, parameters, gradients and optimizer state as views of flat tensors
(so the update and a data-parallel ``all_reduce`` each touch one tensor), and nothing read back to the host. On CUDA it
can also capture the whole step in a CUDA graph and replay it. It holds no math of its own.

:func:`make_step` picks the step :func:`nnbackprop.train` uses: ``FastStep`` unless :meth:`FastStep.why_not` names a
reason, in which case ``SimpleStep`` (and the reason).

CUDA options of :class:`FastStep` (each raises ``ValueError`` on another device):

* ``tf32``: float32 matrix products in TF32 during the step (the global setting is restored afterwards).
* ``cuda_graph``: the step is captured in a CUDA graph on static input buffers and replayed. A graph holds one batch
  shape, one train/eval mode per layer and one branch structure of the optimizer's rule (e.g. with or without weight
  decay; before and after its state exists): the first ``graph_warmup`` steps of each such key run eagerly on a side
  stream, the next is captured, and every later step of that key is a copy of ``x``/``y`` into the static buffers and
  one replay. ``lr`` and the other hyperparameters live in device tensors, so a schedule needs no recapture. A batch
  larger than any before reallocates the workspace and drops every graph. ``grad_hook`` is captured too, so it must not
  synchronise (NCCL ``all_reduce`` is fine). A dropout layer needs a CUDA generator (or ``None``). If capturing fails
  (an op of a user's layer that a graph cannot hold), the step goes on eagerly and :attr:`FastStep.graph_failure` says
  why.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import Tensor

from nnbackprop.errors import gist
from nnbackprop.layers import Dropout
from nnbackprop.layout import FastLayout
from nnbackprop.losses import Loss
from nnbackprop.module import Module

GradHook = Callable[[Tensor], None]
"""Called after backward with all parameter gradients as one flat tensor ``(P,)`` (``model.parameters()`` order), which
it may change in place before the update (data-parallel training averages it over the ranks)."""


class TrainStep(Protocol):
    """One optimisation step on ``(x (N, ...), y (N,))``. Returns ``(loss_sum, n_correct)`` as 0-dim tensors on the
    device, without a host sync: the mean loss times ``N``, and the number of correct predictions."""

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]: ...


def num_correct(output: Tensor, target: Tensor) -> Tensor:
    """How many predictions are right, as a 0-dim int64 tensor on the device.

    ``output (N, C)``: the class with the largest output (argmax); ``output (N,)`` or ``(N, 1)``, one logit of a
    binary task: class 1 when the logit is positive. ``target``: class labels ``(N,)``, or float targets shaped like
    the output (one-hot or soft), whose argmax (or, for one output, whether it is above ½) is the class.
    """
    binary = output.dim() < 2 or output.shape[1] == 1
    if target.is_floating_point() and target.shape == output.shape:
        target = (target.reshape(-1) > 0.5).long() if binary else target.argmax(1)
    predicted = (output.reshape(-1) > 0).long() if binary else output.argmax(1)
    return (predicted == target).sum()


class SimpleStep:
    """The training step written out: ``zero_grad``, forward, loss, hand-written backward, ``grad_hook``, update.

    Args:
        model: the network; its ``backward`` fills ``param.grad``.
        loss_fn: a :class:`~nnbackprop.losses.Loss`.
        optimizer: a ``torch.optim.Optimizer`` over ``model.parameters()`` (ours: :mod:`nnbackprop.optim`).
        grad_hook: see :data:`GradHook`; here the gradients are concatenated for it and copied back.
    """

    def __init__(self, model: Module, loss_fn: Loss, optimizer: torch.optim.Optimizer,
                 grad_hook: GradHook | None = None) -> None:
        self.model, self.loss_fn, self.optimizer, self.grad_hook = model, loss_fn, optimizer, grad_hook
        self.params = list(model.parameters())
        model.needs_input_grad = False  # the model's input is data

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return self._step(x, y)
        except BaseException:  # a step that fails (bad labels, say) leaves nothing behind for the next one
            self.model._release_saved()
            self.loss_fn._release_saved()
            raise

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad()
        output = self.model(x)
        loss = self.loss_fn(output, y)
        self.model.backward(self.loss_fn.backward())
        if self.grad_hook is not None:
            self.grad_hook_on_flat()
        self.optimizer.step()
        return loss * x.shape[0], num_correct(output, y)

    def grad_hook_on_flat(self) -> None:
        """Run the hook on the gradients concatenated (a parameter without one contributes zeros) and copy its
        result back into each ``p.grad``."""
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        self.grad_hook(flat)  # (P,)
        for p, new in zip(self.params, flat.split([p.numel() for p in self.params])):
            if p.grad is not None:
                p.grad.copy_(new.view_as(p))


@contextmanager
def _tf32_matmuls() -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


class FastStep(SimpleStep):
    """The training step of :class:`SimpleStep`, run in the fast layout; see the module docstring.

    Args:
        model, loss_fn, optimizer, grad_hook: as :class:`SimpleStep`. The model's parameters become views of one flat
            tensor (values unchanged); with one of nnbackprop's optimizers over exactly them (one group), the update
            runs on the flat tensors and the optimizer's state becomes views of flat tensors too.
        tf32: (CUDA) run float32 matrix products in TF32.
        cuda_graph: (CUDA) capture the step in a CUDA graph and replay it.
        graph_warmup: eager steps of each new graph key before it is captured (at least 1).

    Raises:
        ValueError: naming what stops the model from the fast layout (:meth:`why_not`), or an option the device lacks.

    Example:
        >>> step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9))
        >>> loss_sum, n_correct = step(x, y)  # 0-dim tensors on the device; read them once per log interval
    """

    def __init__(self, model: Module, loss_fn: Loss, optimizer: torch.optim.Optimizer,
                 grad_hook: GradHook | None = None, *, tf32: bool = False, cuda_graph: bool = False,
                 graph_warmup: int = 3) -> None:
        reason = self.why_not(model, optimizer)
        if reason is not None:
            raise ValueError(f"FastStep cannot run this model: {reason}")
        device = next(model.parameters()).device
        if (tf32 or cuda_graph) and device.type != "cuda":
            raise ValueError(f"FastStep: tf32 and cuda_graph need the model on a CUDA device, it is on {device}")
        if not isinstance(graph_warmup, int) or graph_warmup < 1:
            raise ValueError(f"FastStep: graph_warmup must be an integer >= 1, got {graph_warmup!r}")
        if cuda_graph:
            for layer in model.modules():
                if isinstance(layer, Dropout) and layer.generator is not None and layer.generator.device.type != "cuda":
                    raise ValueError(f"FastStep: cuda_graph cannot capture {layer.name} drawing its masks from a "
                                     f"{layer.generator.device} generator; give it a CUDA generator or None")
        super().__init__(model, loss_fn, optimizer, grad_hook)
        self.layout = FastLayout(model, loss_fn, optimizer=optimizer)
        self._update = getattr(optimizer, "update", None)  # nnbackprop's optimizers: the rule without torch's wrapper
        self.tf32, self.cuda_graph, self.graph_warmup = tf32, cuda_graph, graph_warmup
        self.graph_failure: str | None = None
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, Tensor]]] = {}
        self._eager_runs: dict[tuple, int] = {}
        self._generation = self.layout.workspace.generation

    @staticmethod
    def why_not(model: Module, optimizer: Any = None) -> str | None:
        """Why the fast layout cannot hold ``model`` (and ``optimizer``), or ``None`` when it can."""
        reason = FastLayout.why_not(model)
        if reason is None and optimizer is not None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not {id(p) for p in model.parameters()} <= owned:
                reason = "the optimizer does not update every parameter of the model"
        return reason

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self.layout.is_bound():
            raise RuntimeError("FastStep: the model left the fast layout (was it moved or cast with .to()?); build a "
                               "new step after moving the model")
        if self.tf32 or self.cuda_graph:
            with _tf32_matmuls() if self.tf32 else nullcontext():
                return super().__call__(x, y)
        return super().__call__(x, y)

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.cuda_graph and self.graph_failure is None:
            return self._graphed(x, y)
        return self._eager_step(x, y)

    def _eager_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        flat = self.layout.flat
        for p in flat.params:  # zero_grad(): the backward writes each gradient into its flat view
            p.grad = None
        output = self.model(x)
        loss = self.loss_fn(output, y)
        correct = num_correct(output, y)  # before backward, which may reuse the output's buffer
        self.model.backward(self.loss_fn.backward())
        in_place = True
        for p, grad in zip(flat.params, flat.grad_views):
            if p.grad is grad:
                continue
            if p.grad is None:  # a parameter this batch did not reach: zero in the flat gradient, skipped by the update
                grad.zero_()
                in_place = False
            else:  # a layer that assigned .grad itself: the flat gradient is what the hook and the update see
                p.grad = grad.copy_(p.grad)
        flat.grads_in_place = in_place
        if self.grad_hook is not None:
            self.grad_hook(flat.grad)
        if self._update is not None and not self.optimizer.has_hooks():
            self._update()
        else:
            self.optimizer.step()
        return loss * x.shape[0], correct

    # ------------------------------------------------------------------ CUDA graphs
    def _graphed(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Replay the graph of this key; run eagerly (on a side stream) while warming up; capture once warm."""
        if self.layout.workspace.generation != self._generation:
            self._graphs.clear()
            self._generation = self.layout.workspace.generation
        if self._hooked():  # a step someone watches (diagnostics) runs its hooks: eagerly
            return self._on_side_stream(x, y)
        structure = self.optimizer.structure() if hasattr(self.optimizer, "structure") else None
        key = (tuple(x.shape), tuple(m.training for m in self.model.modules()), structure)
        entry = self._graphs.get(key)
        if entry is None:
            runs = self._eager_runs.get(key, 0)
            if structure is None or runs < self.graph_warmup:
                self._eager_runs[key] = runs + 1
                return self._on_side_stream(x, y)
            try:
                entry = self._graphs[key] = self._capture(x, y)
            except RuntimeError as error:  # an op that a graph cannot hold; eager from now on
                self.graph_failure = gist(error)
                return self._eager_step(x, y)
        graph, static_x, static_y, (loss_sum, n_correct) = entry
        self.optimizer.refresh_scalars()
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return loss_sum.clone(), n_correct.clone()

    def _hooked(self) -> bool:
        optimizer_hooks = getattr(self.optimizer, "has_hooks", lambda: True)()
        return optimizer_hooks or any(m._forward_hooks or m._backward_hooks for m in self.model.modules())

    def _on_side_stream(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        device = x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            result = self._eager_step(x, y)
        torch.cuda.current_stream(device).wait_stream(side)
        return result

    def _capture(self, x: Tensor, y: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, Tensor]]:
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        for layer in self.model.modules():
            if isinstance(layer, Dropout) and layer.generator is not None:
                graph.register_generator_state(layer.generator)
        with torch.cuda.graph(graph):
            outputs = self._eager_step(static_x, static_y)
        return graph, static_x, static_y, outputs


def make_step(model: Module, loss_fn: Loss, optimizer: torch.optim.Optimizer, *, fast: bool = True,
              grad_hook: GradHook | None = None, **cuda_options: Any) -> SimpleStep:
    """The step :func:`nnbackprop.train` uses: :class:`FastStep` when ``fast`` and the fast layout can hold the model
    (``cuda_options`` go to it), else :class:`SimpleStep`; the step's ``fallback_reason`` says why it is simple."""
    reason = "fast=False" if not fast else FastStep.why_not(model, optimizer)
    if reason is None:
        step: SimpleStep = FastStep(model, loss_fn, optimizer, grad_hook, **cuda_options)
    else:
        step = SimpleStep(model, loss_fn, optimizer, grad_hook)
    step.fallback_reason = reason
    return step
