"""Losses: ``forward(input, target)`` returns a 0-dim loss tensor; ``backward(dloss=1.0)`` returns ``d input``.

The returned gradient is what the model's ``backward`` takes as ``dout``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor

from nnbackprop import functional as F
from nnbackprop.module import Module


class Loss(Module):
    """Base class of the losses. ``reduction`` is one of :attr:`reductions`."""

    reductions: tuple[str, ...] = ("mean", "sum")

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in self.reductions:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {self.reductions}, got '{reduction}'")
        self.reduction = reduction

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return self.forward(input, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        raise NotImplementedError

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        raise NotImplementedError

    def reference_forward(self, input: Tensor, target: Any) -> Tensor:  # type: ignore[override]
        """The loss in ``torch.nn.functional``, for the gradient checker (``target`` as passed to ``forward``)."""
        raise NotImplementedError

    def _check_logits(self, input: Tensor, ndim: tuple[int, ...]) -> None:
        self.check_input(input)
        if input.dim() not in ndim:
            shapes = " or ".join({1: "(N,)", 2: "(N, C)"}[d] for d in ndim)
            raise ValueError(f"{self._name()}: expected input of shape {shapes}, got {tuple(input.shape)}")
        if input.shape[0] == 0:
            raise ValueError(f"{self._name()}: got an empty batch")

    def _check_target_device(self, input: Tensor, target: Tensor) -> None:
        if target.device != input.device:
            raise ValueError(
                f"{self._name()}: target is on {target.device} but input is on {input.device}; move the labels with "
                f"target.to('{input.device}')"
            )

    def _class_indices(self, input: Tensor, target: Any) -> Tensor:
        """Validate integer class labels ``(N,)`` for logits ``(N, C)`` and return them as int64."""
        name = self._name()
        if not isinstance(target, Tensor):
            raise ValueError(f"{name}: target must be a tensor of class indices, got {type(target).__name__}")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(
                f"{name}: target must hold integer class indices of shape (N,), got dtype {target.dtype}. "
                "Pass labels such as torch.tensor([3, 0, 7]), not one-hot or probabilities."
            )
        n, c = input.shape
        if target.shape != (n,):
            raise ValueError(f"{name}: target must have shape ({n},) to match input {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        self._check_target_device(input, target)
        lo, hi = int(target.min()), int(target.max())
        if lo < 0 or hi >= c:
            raise ValueError(
                f"{name}: labels must be in [0, {c - 1}] for {c} classes, found {lo if lo < 0 else hi}. "
                "Check the data set's labels against the model's output size."
            )
        return target.long()


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy from logits: ``loss = mean_n (log Σ_c e^{z_nc} − z_{n,t_n})`` (or the sum).

    Shape: input ``(N, C)`` logits, target ``(N,)`` integer class indices in ``[0, C)``.
    Backward is the fused ``(softmax(z) − onehot(t)) / N``.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        self._check_logits(input, (2,))
        target = self._class_indices(input, target)
        loss, probs = F.cross_entropy_forward(input, target, self.reduction)
        self._save_for_backward(probs, target)
        return loss

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        probs, target = self._pop_cache()
        return F.cross_entropy_backward(dloss, probs, target, self.reduction)

    def reference_forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return TF.cross_entropy(input, target.long(), reduction=self.reduction)


class MSELoss(Loss):
    """Squared error between outputs and targets.

    Reductions: ``mean`` (over all elements, as ``torch.nn.MSELoss``), ``sum``, and ``half_sum``:
    ``E = ½ Σ (t − o)²``, the error of the classic backpropagation derivations.

    Shape: input ``(N, *)``; target of the same shape, or — for classification with a squared error — integer class
    labels ``(N,)`` for input ``(N, C)``, turned into one-hot rows.
    """

    reductions = ("mean", "sum", "half_sum")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        target = self._as_target(input, target)
        loss, diff = F.mse_forward(input, target, self.reduction)
        self._save_for_backward(diff)
        return loss

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        (diff,) = self._pop_cache()
        return F.mse_backward(dloss, diff, self.reduction)

    def reference_forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        target = self._as_target(input, target)
        if self.reduction == "half_sum":
            return 0.5 * TF.mse_loss(input, target, reduction="sum")
        return TF.mse_loss(input, target, reduction=self.reduction)

    def _as_target(self, input: Tensor, target: Any) -> Tensor:
        self.check_input(input)
        if isinstance(target, Tensor) and not target.is_floating_point() and input.dim() == 2:
            return TF.one_hot(self._class_indices(input, target), input.shape[1]).to(input.dtype)
        if not isinstance(target, Tensor) or not target.is_floating_point():
            raise ValueError(f"{self._name()}: target must be a float tensor shaped like the input "
                             f"{tuple(input.shape)}, or integer class labels (N,) for input (N, C)")
        if target.shape != input.shape:
            raise ValueError(f"{self._name()}: target shape {tuple(target.shape)} differs from input shape "
                             f"{tuple(input.shape)}")
        self._check_target_device(input, target)
        return target.to(input.dtype)


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on logits, stable for large ``|z|``:
    ``loss = mean(max(z, 0) − z·y + log(1 + e^{−|z|}))`` (or the sum). Backward: ``(σ(z) − y) / numel``.

    Shape: input ``(N,)`` or ``(N, 1)`` logits; target 0/1 labels (integer or float in ``[0, 1]``) with ``N`` elements.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        target = self._as_target(input, target)
        loss, residual = F.bce_with_logits_forward(input, target, self.reduction)
        self._save_for_backward(residual)
        return loss

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        (residual,) = self._pop_cache()
        return F.bce_with_logits_backward(dloss, residual, self.reduction)

    def reference_forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return TF.binary_cross_entropy_with_logits(input, self._as_target(input, target), reduction=self.reduction)

    def _as_target(self, input: Tensor, target: Any) -> Tensor:
        self._check_logits(input, (1, 2))
        name = self._name()
        if input.dim() == 2 and input.shape[1] != 1:
            raise ValueError(f"{name}: expected one logit per sample, input (N,) or (N, 1), got {tuple(input.shape)}; "
                             "for several classes use CrossEntropyLoss")
        if not isinstance(target, Tensor) or target.numel() != input.shape[0] or target.dim() > 2:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"{name}: target must hold {input.shape[0]} labels to match input "
                             f"{tuple(input.shape)}, got {shape}")
        self._check_target_device(input, target)
        lo, hi = float(target.min()), float(target.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name}: targets must lie in [0, 1], found {lo if lo < 0 else hi}")
        return target.reshape(input.shape).to(input.dtype)
