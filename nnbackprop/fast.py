r"""The fast training step: the math of the layer-by-layer path, laid out so that a step neither allocates nor syncs.

:class:`FastStep` computes exactly what :class:`nnbackprop.train.SimpleStep` computes — forward, loss, the hand-written
backward, the optional ``grad_hook``, then ``torch.optim.SGD``'s update — and differs only in how the work is laid out:

* **One flat parameter tensor.** Every ``Parameter.data`` of the model is rebound to a view into one flat tensor
  ``(P,)``, and every ``Parameter.grad`` to a view into one flat gradient tensor, in ``model.parameters()`` order. The
  model, its ``state_dict`` and checkpoints keep working on the views. Each layer writes ``dW`` and ``db`` straight into
  its gradient views (``torch.mm(dout.t(), x, out=dW)``), so ``grad_hook`` receives the whole gradient as one tensor
  (one ``all_reduce`` in data-parallel training) and the SGD update is three or four ops on flat tensors.
* **Buffers allocated once.** Each stage owns its output (and, where needed, gradient) buffers, allocated for the
  largest batch seen and used as their first ``N`` rows, so a smaller last batch costs nothing. ``Linear`` is one
  ``addmm``; activations write into their own buffer and apply their derivative to ``dout`` in place; the loss
  computes its value and its fused gradient together (softmax-cross-entropy: ``(softmax(z) − onehot(t)) / N``).
* **No host–device synchronisation.** The loss sum and the number of correct predictions come back as 0-dim tensors
  on the device; the hyperparameters (read from ``optimizer.param_groups[0]`` at every step, so a schedule can change
  them) live in a small device tensor refreshed with ``fill_`` when they change. The labels are range-checked on the
  first call only (that check reads them on the host).

The momentum buffers are views into one flat tensor too, and they are what ``optimizer.state[p]['momentum_buffer']``
holds, so ``optimizer.state_dict()`` saves them; buffers put there by ``optimizer.load_state_dict`` are copied in at the
next step. The update is ``torch.optim.SGD``'s rule (see :class:`nnbackprop.optim.SGD`): the buffer starts as the first
gradient, then ``b ← μ b + (1 − τ) g``; Nesterov; weight decay.

CUDA options (each raises ``ValueError`` on another device):

* ``tf32``: float32 matrix products in TF32 during the step (the global setting is restored afterwards).
* ``amp_bf16``: bf16 mixed precision. The flat float32 parameters stay the master copy and receive the update; a bf16
  copy of them (refreshed at the start of each step) does the forward and backward; the gradients are cast back to the
  flat float32 gradient, which ``grad_hook`` sees. The loss is computed in float32. (It also runs on the CPU.)
* ``cuda_graph``: the whole step (forward, backward, ``grad_hook``, update) is captured in a CUDA graph on static
  input buffers and replayed. A graph holds one batch shape: the first ``graph_warmup`` steps of each new shape run
  eagerly on a side stream, the next one is captured, then every step of that shape is a copy of ``x``/``y`` into the
  static buffers and one replay. A smaller last batch therefore gets its own graph (after its own warm-up epochs), and
  a batch larger than any before reallocates the buffers and drops every graph. Changing the train/eval mode, or
  whether momentum, dampening, weight decay or Nesterov are in use, captures another graph; ``lr`` and the values of
  the other hyperparameters are read from device tensors, so a schedule needs no recapture. ``grad_hook`` is captured
  too, so it must not synchronise (NCCL ``all_reduce`` is fine). Dropout needs a CUDA generator (or ``None``). The
  layers' own settings (dropout ``p``, batch-norm ``momentum`` and ``eps``) are fixed in a graph when it is captured.

Supported: :class:`~nnbackprop.model.Sequential` of ``Flatten``, ``Linear``, ``ReLU``, ``LeakyReLU`` (slope in
``[0, 1]``), ``Sigmoid``, ``Tanh``, ``GELU`` (``approximate='none'``), ``Dropout`` and ``BatchNorm1d``, with
``CrossEntropyLoss``, ``MSELoss`` (integer labels, one-hot targets) or ``BCEWithLogitsLoss`` (one logit), all with mean
reduction, and :class:`~nnbackprop.optim.SGD` over exactly the model's parameters. :meth:`FastStep.supports` says
whether a model qualifies; the training loop falls back to ``SimpleStep`` otherwise.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import Tensor

from nnbackprop.layers import GELU, BatchNorm1d, Dropout, Flatten, LeakyReLU, Linear, ReLU, Sigmoid, Tanh
from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from nnbackprop.model import Sequential
from nnbackprop.module import Module, Parameter
from nnbackprop.optim import SGD

GradHook = Callable[[Tensor], None]


# ---------------------------------------------------------------------------------------------------------- buffers


class _Rows:
    """A ``(capacity, *features)`` buffer handed out as its first ``n`` rows (a view, cached per ``n``)."""

    def __init__(self, features: tuple[int, ...], dtype: torch.dtype, device: torch.device, fill: float | None) -> None:
        self.features, self.dtype, self.device, self.fill = features, dtype, device, fill
        self.full: Tensor | None = None
        self._views: dict[int, Tensor] = {}

    def allocate(self, capacity: int) -> None:
        self.full = torch.empty((capacity, *self.features), dtype=self.dtype, device=self.device)
        if self.fill is not None:
            self.full.fill_(self.fill)
        self._views = {}

    def __call__(self, n: int) -> Tensor:
        view = self._views.get(n)
        if view is None:
            view = self._views[n] = self.full[:n]
        return view


class _Buffers:
    """Every per-sample buffer of a plan, allocated together for the largest batch seen so far."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.capacity = 0
        self._rows: list[_Rows] = []

    def rows(self, *features: int, dtype: torch.dtype, fill: float | None = None,
             device: torch.device | None = None) -> _Rows:
        """Declare a buffer of ``features`` per sample (``fill``: a constant it always holds)."""
        rows = _Rows(features, dtype, device or self.device, fill)
        self._rows.append(rows)
        return rows

    def reserve(self, n: int) -> bool:
        """Make room for a batch of ``n``; return whether the buffers were reallocated (earlier views are stale)."""
        if n <= self.capacity:
            return False
        self.capacity = n
        for rows in self._rows:
            rows.allocate(n)
        return True


class _FlatParameters:
    """The parameters, their gradients and their momentum buffers as views into flat tensors ``(P,)``.

    ``bind`` (re)attaches the model's ``Parameter`` s to the views, copying in any value that was assigned since. With
    ``compute_dtype`` other than the parameters' dtype (bf16 mixed precision) there are also flat compute copies of the
    parameters and gradients, which the layers use.
    """

    def __init__(self, params: list[Parameter], compute_dtype: torch.dtype) -> None:
        first = params[0].data
        self.params = params
        self.data = torch.empty(sum(p.data.numel() for p in params), dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        self.momentum = torch.zeros_like(self.data)
        self.scratch = torch.zeros_like(self.data)
        mixed = compute_dtype != first.dtype
        self.compute_data = torch.empty_like(self.data, dtype=compute_dtype) if mixed else self.data
        self.compute_grad = torch.zeros_like(self.data, dtype=compute_dtype) if mixed else self.grad
        self.data_views = self._views(self.data)
        self.grad_views = self._views(self.grad)
        self.momentum_views = self._views(self.momentum)
        self._compute = dict(zip(map(id, params), zip(self._views(self.compute_data), self._views(self.compute_grad))))
        self.bind()

    def _views(self, flat: Tensor) -> list[Tensor]:
        sizes = [p.data.numel() for p in self.params]
        return [view.view(p.data.shape) for view, p in zip(flat.split(sizes), self.params)]

    def compute_views(self, p: Parameter) -> tuple[Tensor, Tensor]:
        """The tensors the layers compute with for ``p``: its value and its gradient."""
        return self._compute[id(p)]

    def bind(self) -> None:
        for p, data, grad in zip(self.params, self.data_views, self.grad_views):
            if p.data is not data:
                if p.data.shape != data.shape or p.data.dtype != data.dtype or p.data.device != data.device:
                    raise RuntimeError(
                        f"FastStep: {p} no longer matches the {tuple(data.shape)} {data.dtype} tensor on {data.device} "
                        "it was built for (was the model moved or cast with .to()?). Build a new FastStep after "
                        "moving the model."
                    )
                data.copy_(p.data)
                p.data = data
            if p.grad is not grad:
                p.grad = grad


# ----------------------------------------------------------------------------------------------------------- stages
#
# A stage is one layer of the plan. ``forward(x)`` writes the layer's output into a buffer the stage owns and returns
# it; ``backward(dout)`` writes the parameter gradients into their flat views and returns ``dx``, usually ``dout``
# changed in place. A stage's output buffer is free once its backward runs (every stage after it is done), so backward
# may use it as scratch; a stage never writes into its input.


class _Stage:
    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def backward(self, dout: Tensor) -> Tensor | None:
        raise NotImplementedError


class _FlattenStage(_Stage):
    def __init__(self, layer: Flatten) -> None:
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        self.shape = x.shape
        return torch.flatten(x, self.layer.start_dim, self.layer.end_dim)

    def backward(self, dout: Tensor) -> Tensor:
        return dout.reshape(self.shape)


def _check_features(stage: str, x: Tensor, features: int) -> None:
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(
            f"FastStep: {stage} expects input of shape (N, {features}), got {tuple(x.shape)}. Check the input size "
            "against the model (images are flattened by a leading Flatten())."
        )


class _LinearStage(_Stage):
    """``out = addmm(b, x, Wᵀ)``; backward ``dW = doutᵀ x``, ``db = Σ_n dout``, ``dx = dout W`` (not for the first)."""

    def __init__(self, layer: Linear, buffers: _Buffers, flat: _FlatParameters, dtype: torch.dtype,
                 needs_input_grad: bool) -> None:
        self.name = layer._name()
        self.in_features = layer.in_features
        self.weight, self.dweight = flat.compute_views(layer.weight)
        self.weight_t = self.weight.t()
        self.bias, self.dbias = flat.compute_views(layer.bias) if layer.bias is not None else (None, None)
        self.out = buffers.rows(layer.out_features, dtype=dtype)
        self.dx = buffers.rows(layer.in_features, dtype=dtype) if needs_input_grad else None

    def forward(self, x: Tensor) -> Tensor:
        _check_features(self.name, x, self.in_features)
        self.x = x
        out = self.out(x.shape[0])
        if self.bias is None:
            return torch.mm(x, self.weight_t, out=out)
        return torch.addmm(self.bias, x, self.weight_t, out=out)

    def backward(self, dout: Tensor) -> Tensor | None:
        torch.mm(dout.t(), self.x, out=self.dweight)
        if self.bias is not None:
            torch.sum(dout, 0, out=self.dbias)
        if self.dx is None:
            return None
        return torch.mm(dout, self.weight, out=self.dx(dout.shape[0]))


class _BatchNormStage(_Stage):
    """Batch normalization, as :func:`nnbackprop.functional.batchnorm_forward`/``_backward``, on buffers.

    With batch statistics the backward is ``dx = (γ/σ) · (dout − mean_n dout − x̂ · mean_n(dout · x̂))``, where
    ``Σ_n dout = dβ`` and ``Σ_n dout · x̂ = dγ`` are the parameter gradients already computed.
    """

    def __init__(self, layer: BatchNorm1d, buffers: _Buffers, flat: _FlatParameters, dtype: torch.dtype) -> None:
        self.layer = layer
        self.weight, self.dweight = flat.compute_views(layer.weight)
        self.bias, self.dbias = flat.compute_views(layer.bias)
        c = layer.num_features
        self.xhat = buffers.rows(c, dtype=dtype)
        self.out = buffers.rows(c, dtype=dtype)
        self.mean, self.var, self.rstd, self.scratch = torch.empty(4, c, dtype=dtype, device=buffers.device)

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        _check_features(layer._name(), x, layer.num_features)
        n = x.shape[0]
        self.training = layer.training
        if layer.training:
            if n < 2:
                raise ValueError(f"FastStep: {layer._name()} needs more than one sample per batch in training, got {n}")
            mean, var = torch.mean(x, 0, out=self.mean), torch.var(x, 0, correction=0, out=self.var)
            layer.running_mean.mul_(1 - layer.momentum).add_(mean, alpha=layer.momentum)
            layer.running_var.mul_(1 - layer.momentum).add_(var, alpha=layer.momentum * n / (n - 1))
            layer.num_batches_tracked.add_(1)
        else:
            mean, var = layer.running_mean, layer.running_var
        torch.add(var, layer.eps, out=self.rstd).rsqrt_()  # (C,)
        xhat = torch.sub(x, mean, out=self.xhat(n)).mul_(self.rstd)  # (N, C)
        return torch.addcmul(self.bias, xhat, self.weight, out=self.out(n))

    def backward(self, dout: Tensor) -> Tensor:
        n = dout.shape[0]
        xhat = self.xhat(n)
        torch.sum(dout, 0, out=self.dbias)
        torch.sum(torch.mul(dout, xhat, out=self.out(n)), 0, out=self.dweight)
        if self.training:
            dout.sub_(torch.mul(self.dbias, 1 / n, out=self.scratch))
            dout.addcmul_(xhat, torch.mul(self.dweight, -1 / n, out=self.scratch))
        return dout.mul_(torch.mul(self.weight, self.rstd, out=self.scratch))


def _shaped_like(rows: _Rows, x: Tensor) -> Tensor:
    """``rows``' first ``N`` rows in the shape of ``x`` (layers before ``Flatten`` see image batches)."""
    buffer = rows(x.shape[0])
    return buffer if buffer.shape == x.shape else buffer.view(x.shape)


class _ActivationStage(_Stage):
    """An elementwise activation into its own buffer; backward multiplies ``dout`` in place by the derivative."""

    def __init__(self, layer: Module, buffers: _Buffers, width: int, dtype: torch.dtype) -> None:
        self.layer = layer
        self.out = buffers.rows(width, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        self.x = x
        self.y = self.activate(x, _shaped_like(self.out, x))
        return self.y

    def activate(self, x: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError


class _ReLUStage(_ActivationStage):
    def activate(self, x: Tensor, out: Tensor) -> Tensor:
        return torch.clamp_min(x, 0, out=out)

    def backward(self, dout: Tensor) -> Tensor:
        return dout.mul_(self.y.gt_(0))  # 1[y > 0] = 1[x > 0]


class _LeakyReLUStage(_ActivationStage):
    def activate(self, x: Tensor, out: Tensor) -> Tensor:
        return torch.maximum(x, torch.mul(x, self.layer.negative_slope, out=out), out=out)  # 0 ≤ slope ≤ 1

    def backward(self, dout: Tensor) -> Tensor:
        slope = self.layer.negative_slope
        return dout.mul_(self.y.gt_(0).mul_(1 - slope).add_(slope))  # 1 where y > 0 (x > 0), else slope


class _SigmoidStage(_ActivationStage):
    def activate(self, x: Tensor, out: Tensor) -> Tensor:
        return torch.sigmoid(x, out=out)

    def backward(self, dout: Tensor) -> Tensor:
        return dout.mul_(torch.addcmul(self.y, self.y, self.y, value=-1, out=self.y))  # σ − σ²


class _TanhStage(_ActivationStage):
    def activate(self, x: Tensor, out: Tensor) -> Tensor:
        return torch.tanh(x, out=out)

    def backward(self, dout: Tensor) -> Tensor:
        return dout.addcmul_(dout, self.y.mul_(self.y), value=-1)  # dout · (1 − tanh²)


class _GELUStage(_ActivationStage):
    """``x Φ(x)``; backward ``dout · (Φ(x) + x φ(x))``, in the output buffer and one scratch buffer."""

    def __init__(self, layer: GELU, buffers: _Buffers, width: int, dtype: torch.dtype) -> None:
        super().__init__(layer, buffers, width, dtype)
        self.scratch = buffers.rows(width, dtype=dtype)

    def activate(self, x: Tensor, out: Tensor) -> Tensor:
        return self._cdf(x, out).mul_(x)

    def backward(self, dout: Tensor) -> Tensor:
        x = self.x
        pdf = torch.mul(x, x, out=_shaped_like(self.scratch, x)).mul_(-0.5).exp_().mul_(1 / math.sqrt(2 * math.pi))
        x_pdf = pdf.mul_(x)
        return dout.mul_(self._cdf(x, self.y).add_(x_pdf))

    @staticmethod
    def _cdf(x: Tensor, out: Tensor) -> Tensor:
        return torch.mul(x, 1 / math.sqrt(2), out=out).erf_().add_(1).mul_(0.5)


class _DropoutStage(_Stage):
    """Inverted dropout with the layer's generator, drawing the masks of :func:`~nnbackprop.functional.dropout_forward`;
    the identity in evaluation mode or with ``p = 0``."""

    def __init__(self, layer: Dropout, buffers: _Buffers, width: int, dtype: torch.dtype) -> None:
        self.layer = layer
        self.out = buffers.rows(width, dtype=dtype)
        self.mask = buffers.rows(width, dtype=dtype)
        gen = layer.generator
        # as in the simple path the masks are drawn on the generator's device; from another device they are copied over
        # (a host-device copy each step: give the layer a generator on the model's device)
        self.draw = self.mask
        if gen is not None and gen.device != buffers.device:
            self.draw = buffers.rows(width, dtype=dtype, device=gen.device)

    def forward(self, x: Tensor) -> Tensor:
        p = self.layer.p
        self.active = self.layer.training and p > 0
        if not self.active:
            return x
        draw = _shaped_like(self.draw, x)
        torch.rand(draw.shape, generator=self.layer.generator, out=draw).ge_(p).mul_(0.0 if p >= 1 else 1 / (1 - p))
        self.m = draw if self.draw is self.mask else _shaped_like(self.mask, x).copy_(draw)
        return torch.mul(x, self.m, out=_shaped_like(self.out, x))

    def backward(self, dout: Tensor) -> Tensor:
        return dout.mul_(self.m) if self.active else dout


class _CastStage(_Stage):
    """Casts the input to the compute dtype (bf16 mixed precision), just before the first layer with parameters."""

    def __init__(self, buffers: _Buffers, width: int, dtype: torch.dtype) -> None:
        self.out = buffers.rows(width, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x.shape[0]).copy_(x)


_ACTIVATIONS: dict[type, type[_ActivationStage]] = {
    ReLU: _ReLUStage, LeakyReLU: _LeakyReLUStage, Sigmoid: _SigmoidStage, Tanh: _TanhStage, GELU: _GELUStage,
}


# ------------------------------------------------------------------------------------------------------------ losses


class _LossHead:
    """Loss value and gradient together: ``(loss_sum, n_correct, dz)`` from logits ``z (N, C)`` and labels ``y (N,)``.

    ``loss_sum`` is the mean loss times ``N``; ``dz`` (the head's own buffer) is the gradient of the mean loss;
    ``n_correct`` counts argmax hits (``C > 1``) or positive-logit hits (``C = 1``), as
    :func:`nnbackprop.train.num_correct`.
    """

    def __init__(self, buffers: _Buffers, classes: int, dtype: torch.dtype) -> None:
        self.classes = classes
        self.top_label = classes - 1
        self.dz = buffers.rows(classes, dtype=dtype)
        self.column = buffers.rows(1, dtype=dtype)
        self.minus_one = buffers.rows(1, dtype=dtype, fill=-1.0)
        self.predicted = buffers.rows(dtype=torch.long)

    def __call__(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def check_labels(self, y: Tensor) -> None:
        """Range-check the labels (reads them on the host: done once)."""
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi > self.top_label:
            raise ValueError(f"FastStep: labels must be in [0, {self.top_label}] for {self.classes} output(s), found "
                             f"{lo if lo < 0 else hi}. Check the data set's labels against the model's output size.")

    def count_correct(self, z: Tensor, y: Tensor) -> Tensor:
        n = z.shape[0]
        predicted = self.predicted(n)
        if self.classes > 1:
            torch.argmax(z, 1, out=predicted)
        else:
            torch.gt(z.view(n), 0, out=predicted)
        return torch.eq(predicted, y, out=predicted).sum()


class _CrossEntropyHead(_LossHead):
    """``loss_n = −log softmax(z_n)_{t_n}``; ``dz = (softmax(z) − onehot(t)) / N`` (see ``cross_entropy_forward``)."""

    def __call__(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = z.shape[0]
        n_correct = self.count_correct(z, y)
        target = y.view(n, 1)
        log_probs = torch.log_softmax(z, 1, out=self.dz(n))  # z − logsumexp(z), (N, C)
        loss_sum = torch.gather(log_probs, 1, target, out=self.column(n)).sum().neg()
        dz = log_probs.exp_().scatter_add_(1, target, self.minus_one(n)).mul_(1 / n)
        return loss_sum, n_correct, dz


class _MSEHead(_LossHead):
    """``loss = Σ (o − onehot(t))² / (N C)``; ``dz = 2 (o − onehot(t)) / (N C)``."""

    def __call__(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = z.shape[0]
        n_correct = self.count_correct(z, y)
        diff = self.dz(n).copy_(z).scatter_add_(1, y.view(n, 1), self.minus_one(n))  # (N, C)
        flat = diff.view(-1)
        loss_sum = torch.dot(flat, flat) / self.classes
        return loss_sum, n_correct, diff.mul_(2 / diff.numel())


class _BCEHead(_LossHead):
    """``loss_n = max(z, 0) − z t + log(1 + e^{−|z|})``; ``dz = (σ(z) − t) / N``, one logit per sample."""

    def __init__(self, buffers: _Buffers, classes: int, dtype: torch.dtype) -> None:
        super().__init__(buffers, classes, dtype)
        self.top_label = 1
        self.target = buffers.rows(1, dtype=dtype)

    def __call__(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = z.shape[0]
        n_correct = self.count_correct(z, y)
        target = self.target(n).copy_(y.view(n, 1))
        losses = torch.abs(z, out=self.column(n)).neg_().exp_().log1p_()  # (N, 1)
        losses.add_(torch.clamp_min(z, 0, out=self.dz(n))).addcmul_(z, target, value=-1)
        loss_sum = losses.sum()
        return loss_sum, n_correct, torch.sigmoid(z, out=self.dz(n)).sub_(target).mul_(1 / n)


_HEADS: dict[type, type[_LossHead]] = {
    CrossEntropyLoss: _CrossEntropyHead, MSELoss: _MSEHead, BCEWithLogitsLoss: _BCEHead,
}


# ------------------------------------------------------------------------------------------------------------- plan


def _unsupported(model: Module, loss_fn: Loss) -> list[str]:
    """Why :class:`FastStep` cannot run ``model`` with ``loss_fn``; empty when it can."""
    if not isinstance(model, Sequential):
        return [f"the model is a {type(model).__name__}, FastStep runs a Sequential"]
    reasons = []
    for i, layer in enumerate(model):
        kind = type(layer)
        if kind not in (Flatten, Linear, BatchNorm1d, Dropout, *_ACTIVATIONS):
            reasons.append(f"layer {i} {layer._name()} has no fast kernel")
        elif kind is LeakyReLU and not 0 <= layer.negative_slope <= 1:
            reasons.append(f"layer {i} {layer._name()}: the fast kernel needs a slope in [0, 1]")
        elif kind is GELU and layer.approximate != "none":
            reasons.append(f"layer {i} {layer._name()}: the fast kernel is for approximate='none'")
    if not any(isinstance(layer, (Linear, BatchNorm1d)) for layer in model):
        reasons.append("the model has no Linear or BatchNorm1d layer to train")
    if type(loss_fn) not in _HEADS:
        reasons.append(f"the loss {type(loss_fn).__name__} has no fast kernel")
    elif loss_fn.reduction != "mean":
        reasons.append(f"{loss_fn._name()}: the fast kernel is for reduction='mean', got '{loss_fn.reduction}'")
    return reasons


def _in_width(layer: Module) -> int:
    return layer.in_features if isinstance(layer, Linear) else layer.num_features


def _widths(model: Sequential) -> list[int]:
    """The number of features per sample after each layer (before the first ``Linear`` or ``BatchNorm1d``, its input
    size: the layers there only flatten or act elementwise)."""
    width = _in_width(next(layer for layer in model if isinstance(layer, (Linear, BatchNorm1d))))
    widths = []
    for layer in model:
        if isinstance(layer, Linear):
            width = layer.out_features
        elif isinstance(layer, BatchNorm1d):
            width = layer.num_features
        widths.append(width)
    return widths


# --------------------------------------------------------------------------------------------------------- the step


@contextmanager
def _tf32_matmuls() -> Iterator[None]:
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


class FastStep:
    """One optimisation step of ``model`` on a batch, with flat buffers and no host sync; see the module docstring.

    Args:
        model: a :class:`~nnbackprop.model.Sequential` that :meth:`supports` accepts. Its parameters are rebound to
            views into flat tensors (values unchanged).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` with mean reduction.
        optimizer: an :class:`~nnbackprop.optim.SGD` with one parameter group holding exactly ``model.parameters()``.
            Its hyperparameters are read at every step; its ``state`` holds views of the flat momentum buffer.
        grad_hook: called after backward with the flat gradient ``(P,)`` of all parameters in ``model.parameters()``
            order; it may change it in place (e.g. ``all_reduce`` and divide) before the update.
        tf32: (CUDA) run float32 matrix products in TF32.
        cuda_graph: (CUDA) capture the step in a CUDA graph and replay it (fixed batch shape per graph).
        amp_bf16: bf16 forward and backward with float32 master weights, gradients and update.
        graph_warmup: eager steps of each new batch shape before it is captured (with ``cuda_graph``).

    Raises:
        ValueError: naming every unsupported layer or setting, or an option the device does not have.

    Example:
        >>> step = FastStep(model, CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9))
        >>> loss_sum, n_correct = step(x, y)  # 0-dim tensors on the device; read them once per log interval
    """

    def __init__(
        self,
        model: Sequential,
        loss_fn: Loss,
        optimizer: SGD,
        grad_hook: GradHook | None = None,
        *,
        tf32: bool = False,
        cuda_graph: bool = False,
        amp_bf16: bool = False,
        graph_warmup: int = 3,
    ) -> None:
        reasons = _unsupported(model, loss_fn)
        if reasons:
            raise ValueError("FastStep cannot run this model: " + "; ".join(reasons) + ". Use SimpleStep instead.")
        params = list(model.parameters())
        self._check_optimizer(optimizer, params)
        device, dtype = params[0].data.device, params[0].data.dtype
        if any(p.data.device != device or p.data.dtype != dtype for p in params):
            raise ValueError("FastStep needs all parameters on one device with one dtype; call model.to(device, dtype)")
        if (tf32 or cuda_graph) and device.type != "cuda":
            raise ValueError(f"FastStep: tf32 and cuda_graph need the model on a CUDA device, it is on {device}")
        if amp_bf16 and dtype != torch.float32:
            raise ValueError(f"FastStep: amp_bf16 keeps float32 master weights; the model is {dtype}. "
                             "Call model.to(dtype=torch.float32).")
        if amp_bf16 and any(isinstance(layer, BatchNorm1d) for layer in model):
            raise ValueError("FastStep: amp_bf16 does not support BatchNorm1d; train that model in float32")
        if cuda_graph:
            self._check_graph_generators(model)
        if not isinstance(graph_warmup, int) or graph_warmup < 0:
            raise ValueError(f"FastStep: graph_warmup must be an integer >= 0, got {graph_warmup!r}")
        widths = _widths(model)
        if isinstance(loss_fn, BCEWithLogitsLoss) and widths[-1] != 1:
            raise ValueError(f"FastStep: BCEWithLogitsLoss needs one output per sample, the model has {widths[-1]}")

        self.model, self.loss_fn, self.optimizer, self.grad_hook = model, loss_fn, optimizer, grad_hook
        self.tf32, self.cuda_graph, self.graph_warmup = tf32, cuda_graph, graph_warmup
        self.device, self.dtype = device, dtype
        self.compute_dtype = torch.bfloat16 if amp_bf16 else dtype
        self._flat = _FlatParameters(params, self.compute_dtype)
        self._buffers = _Buffers(device)
        self._stages, first_trained = self._plan(model, widths)
        self._backward_stages = self._stages[first_trained:][::-1]  # backward stops at the first layer with parameters
        self._head = _HEADS[type(loss_fn)](self._buffers, widths[-1], dtype)
        self._logits = self._buffers.rows(widths[-1], dtype=dtype) if amp_bf16 else None
        self._dlogits = self._buffers.rows(widths[-1], dtype=self.compute_dtype) if amp_bf16 else None
        self._moded = [layer for layer in model if isinstance(layer, (Dropout, BatchNorm1d))]
        self._hyper = torch.zeros(4, dtype=dtype, device=device).unbind()  # −lr, μ, 1 − τ, λ as 0-dim views
        self._hyper_values: tuple[float, ...] | None = None
        self._labels_checked = False
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, Tensor]]] = {}
        self._eager_runs: dict[tuple, int] = {}

    # ------------------------------------------------------------------ construction
    @staticmethod
    def supports(model: Module, loss_fn: Loss) -> bool:
        """Whether ``FastStep(model, loss_fn, ...)`` can run them (the constructor names what it cannot)."""
        return not _unsupported(model, loss_fn)

    @staticmethod
    def _check_optimizer(optimizer: SGD, params: list[Parameter]) -> None:
        if not isinstance(optimizer, SGD):
            raise ValueError(f"FastStep updates with nnbackprop.optim.SGD's rule; got a {type(optimizer).__name__}")
        groups = optimizer.param_groups
        if len(groups) != 1 or {id(p) for p in groups[0]["params"]} != {id(p) for p in params}:
            raise ValueError("FastStep needs an SGD with one parameter group holding exactly the model's parameters: "
                             "SGD(model.parameters(), ...)")

    @staticmethod
    def _check_graph_generators(model: Sequential) -> None:
        for layer in model:
            if isinstance(layer, Dropout) and layer.generator is not None and layer.generator.device.type != "cuda":
                raise ValueError(f"FastStep: cuda_graph cannot capture {layer._name()} drawing its masks from a "
                                 f"{layer.generator.device} generator; give it a CUDA generator or None")

    def _plan(self, model: Sequential, widths: list[int]) -> tuple[list[_Stage], int]:
        """One stage per layer (plus the bf16 cast before the first layer with parameters); returns the stages and the
        index of the first one with parameters."""
        stages: list[_Stage] = []
        first_trained = -1
        dtype = self.dtype
        for layer, width in zip(model, widths):
            if isinstance(layer, (Linear, BatchNorm1d)) and first_trained < 0:
                if self.compute_dtype != dtype:
                    dtype = self.compute_dtype
                    stages.append(_CastStage(self._buffers, _in_width(layer), dtype))
                first_trained = len(stages)
            if isinstance(layer, Flatten):
                stages.append(_FlattenStage(layer))
            elif isinstance(layer, Linear):
                stages.append(_LinearStage(layer, self._buffers, self._flat, dtype, len(stages) > first_trained))
            elif isinstance(layer, BatchNorm1d):
                stages.append(_BatchNormStage(layer, self._buffers, self._flat, dtype))
            elif isinstance(layer, Dropout):
                stages.append(_DropoutStage(layer, self._buffers, width, dtype))
            else:
                stages.append(_ACTIVATIONS[type(layer)](layer, self._buffers, width, dtype))
        return stages, first_trained

    # ------------------------------------------------------------------ the step
    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One step on ``x (N, ...)`` and labels ``y (N,)``; returns ``(loss_sum, n_correct)``, 0-dim, on the device."""
        self._flat.bind()
        self._check_batch(x, y)
        if self._buffers.reserve(x.shape[0]):
            self._graphs.clear()
        started = self._momentum_started()
        hyper = self._refresh_hyperparameters()
        with _tf32_matmuls() if self.tf32 else nullcontext():
            if self.cuda_graph:
                loss_sum, n_correct = self._graphed_step(x, y, started, hyper)
            else:
                loss_sum, n_correct = self._step(x, y, started, hyper)
        if hyper[1] != 0 and not started:
            state = self.optimizer.state
            for p, view in zip(self._flat.params, self._flat.momentum_views):
                state.setdefault(p, {})["momentum_buffer"] = view
        self._labels_checked = True
        return loss_sum, n_correct

    def _step(self, x: Tensor, y: Tensor, started: bool, hyper: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        flat = self._flat
        if flat.compute_data is not flat.data:
            flat.compute_data.copy_(flat.data)
        out = x
        for stage in self._stages:
            out = stage.forward(out)
        n = x.shape[0]
        logits = out if self._logits is None else self._logits(n).copy_(out)
        loss_sum, n_correct, dout = self._head(logits, y)
        if self._dlogits is not None:
            dout = self._dlogits(n).copy_(dout)
        for stage in self._backward_stages:
            dout = stage.backward(dout)
        if flat.compute_grad is not flat.grad:
            flat.grad.copy_(flat.compute_grad)
        if self.grad_hook is not None:
            self.grad_hook(flat.grad)
        self._update(started, hyper)
        return loss_sum, n_correct

    def _update(self, started: bool, hyper: tuple[float, ...]) -> None:
        """``torch.optim.SGD``'s rule on the flat tensors; the values come from ``self._hyper`` (device tensors), the
        choice of ops from ``hyper`` (python floats)."""
        _, momentum, dampening, weight_decay, nesterov = hyper
        flat = self._flat
        neg_lr, mu, keep, decay = self._hyper
        grad = flat.grad
        if weight_decay != 0:
            grad = torch.addcmul(grad, flat.data, decay, out=flat.scratch)  # g + λ θ
        if momentum != 0:
            buf = flat.momentum
            if not started:
                buf.copy_(grad)
            elif dampening == 0:
                torch.addcmul(grad, buf, mu, out=buf)  # μ b + g, one pass
            else:
                buf.mul_(mu).addcmul_(grad, keep)  # μ b + (1 − τ) g
            grad = torch.addcmul(grad, buf, mu, out=flat.scratch) if nesterov else buf
        flat.data.addcmul_(grad, neg_lr)

    # ------------------------------------------------------------------ per-call bookkeeping
    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        """Shapes, dtypes and devices (no sync); until a step has succeeded, also the label values."""
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise ValueError(f"FastStep expects tensors x and y, got {type(x).__name__} and {type(y).__name__}")
        if x.dtype != self.dtype or x.device != self.device or y.device != self.device:
            raise ValueError(f"FastStep: x must be {self.dtype} and x, y on {self.device}; got x {x.dtype} on "
                             f"{x.device}, y on {y.device}. Convert the batch, e.g. x.to('{self.device}', {self.dtype})")
        if x.dim() < 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise ValueError(f"FastStep: expected x (N, ...) and labels y (N,) with N >= 1, got x {tuple(x.shape)} and "
                             f"y {tuple(y.shape)}")
        if y.dtype != torch.long:
            raise ValueError(f"FastStep: y must hold int64 integer class labels, got dtype {y.dtype}; integer labels "
                             "convert with y.long()")
        if not self._labels_checked:
            self._head.check_labels(y)

    def _momentum_started(self) -> bool:
        """Whether the momentum buffers carry history, taking over buffers that ``optimizer.load_state_dict`` put in
        ``optimizer.state``. ``torch.optim.SGD`` starts a buffer as the first gradient."""
        state = self.optimizer.state
        found = 0
        for p, view in zip(self._flat.params, self._flat.momentum_views):
            buffer = state[p].get("momentum_buffer") if p in state else None
            if buffer is None:
                continue
            found += 1
            if buffer is not view:
                view.copy_(buffer)
                state[p]["momentum_buffer"] = view
        if found not in (0, len(self._flat.params)):
            raise RuntimeError(f"FastStep: the optimizer holds momentum buffers for {found} of "
                               f"{len(self._flat.params)} parameters; FastStep updates all parameters together")
        return found > 0

    def _refresh_hyperparameters(self) -> tuple[float, ...]:
        group = self.optimizer.param_groups[0]
        values = (group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"])
        if values != self._hyper_values:
            lr, momentum, dampening, weight_decay, _ = values
            for i, value in enumerate((-lr, momentum, 1 - dampening, weight_decay)):
                self._hyper[i].fill_(value)
            self._hyper_values = values
        return values

    # ------------------------------------------------------------------ CUDA graphs
    def _graphed_step(self, x: Tensor, y: Tensor, started: bool, hyper: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        """Replay the graph of this batch shape and structure. Run eagerly (on a side stream) while warming up, and for
        the first momentum step (its update differs from every later one); capture once warm."""
        _, momentum, dampening, weight_decay, nesterov = hyper
        if momentum != 0 and not started:
            return self._on_side_stream(x, y, started, hyper)
        key = (tuple(x.shape), tuple(m.training for m in self._moded),
               momentum != 0, dampening != 0, weight_decay != 0, nesterov)
        entry = self._graphs.get(key)
        if entry is None:
            runs = self._eager_runs.get(key, 0)
            if runs < self.graph_warmup:
                self._eager_runs[key] = runs + 1
                return self._on_side_stream(x, y, started, hyper)
            entry = self._graphs[key] = self._capture(x, y, hyper)
        graph, static_x, static_y, (loss_sum, n_correct) = entry
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        return loss_sum.clone(), n_correct.clone()

    def _on_side_stream(self, x: Tensor, y: Tensor, started: bool, hyper: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = self._step(x, y, started, hyper)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return result

    def _capture(self, x: Tensor, y: Tensor,
                 hyper: tuple[float, ...]) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, tuple[Tensor, Tensor]]:
        static_x, static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        for layer in self.model:
            if isinstance(layer, Dropout) and layer.generator is not None:
                graph.register_generator_state(layer.generator)
        with torch.cuda.graph(graph):
            outputs = self._step(static_x, static_y, True, hyper)
        return graph, static_x, static_y, outputs
