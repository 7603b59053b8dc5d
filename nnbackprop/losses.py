"""Losses: ``forward(input, target)`` returns a 0-dim loss tensor; ``backward(dloss=1.0)`` returns ``d input``.

The returned gradient is what the model's ``backward`` takes as ``dout``.

Labels are checked on every call. On the CPU that is a plain read. On a GPU, reading them would stall the device every
step, so there the check runs on the device: out-of-range labels are clamped (no device-side assert), set a flag that
stays set, and turn the loss into NaN; :meth:`Loss.label_error` (which the training loop consults when it meets a
non-finite loss) reads the flag and says what the labels must be. The flag is one tensor the loss keeps, written in
place, so a CUDA graph's replays set it as an eager step does.
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
        self.__dict__.update(_label_flag=None, _label_rule="")  # on a GPU: a bool on the device, and the rule

    def __call__(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return super().__call__(input, target)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        raise NotImplementedError

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        raise NotImplementedError

    def reference_forward(self, input: Tensor, target: Any) -> Tensor:  # type: ignore[override]
        """The loss in ``torch.nn.functional``, for the gradient checker (``target`` as passed to ``forward``)."""
        raise NotImplementedError

    def _check_dout(self, dloss: Any) -> None:
        if isinstance(dloss, Tensor) and dloss.requires_grad:
            super()._check_dout(dloss)  # refuses a second-order use
        if isinstance(dloss, Tensor) and dloss.numel() != 1:
            raise ValueError(f"{self.name}.backward: dloss must be a number or a one-element tensor "
                             "(d total / d loss), "
                             f"got shape {tuple(dloss.shape)}")

    def label_error(self) -> str | None:
        """Why labels of a GPU batch since the last call were invalid, or ``None``; clears the flag (reading it is a
        host sync)."""
        flag = self.__dict__["_label_flag"]
        if flag is None or not bool(flag):
            return None
        flag.zero_()
        return f"{self.name}: {self.__dict__['_label_rule']}, found some outside that range on the device"

    # ------------------------------------------------------------------ input checks
    def _check_logits(self, input: Tensor, ndim: tuple[int, ...]) -> None:
        self.check_input(input)
        if input.dim() not in ndim:
            shapes = " or ".join({1: "(N,)", 2: "(N, C)"}[d] for d in ndim)
            raise ValueError(f"{self.name}: expected input of shape {shapes}, got {tuple(input.shape)}")
        self._check_not_empty(input)

    def _check_not_empty(self, input: Tensor) -> None:
        """A loss over no examples is undefined (a mean of nothing is NaN): refuse it."""
        if input.numel() == 0:
            raise ValueError(f"{self.name}: got an empty batch (input of shape {tuple(input.shape)}); a loss needs at "
                             "least one example, so check the loader or the slicing that made the batch")

    def _check_target_device(self, input: Tensor, target: Tensor) -> None:
        if target.device != input.device:
            raise ValueError(
                f"{self.name}: target is on {target.device} but input is on {input.device}; move the labels with "
                f"target.to('{input.device}')"
            )

    def _in_range(self, target: Tensor, lo: float, hi: float, what: str, *, indices: bool = False) -> Tensor:
        """``target`` with every value in ``[lo, hi]``: checked on the CPU (for class ``indices`` by the indexing op
        itself, see :meth:`_out_of_range`), clamped and flagged on a GPU."""
        if not target.is_cuda:
            if not indices:
                self._raise_if_outside(target, lo, hi, what)
            return target
        flag = self.__dict__["_label_flag"]
        if flag is None or flag.device != target.device:
            flag = torch.zeros((), dtype=torch.bool, device=target.device)
            self.__dict__["_label_flag"] = flag
        flag.logical_or_(((target < lo) | (target > hi)).any())
        self.__dict__["_label_rule"] = what
        return target.clamp(lo, hi)

    def _raise_if_outside(self, target: Tensor, lo: float, hi: float, what: str) -> None:
        found_lo, found_hi = (value.item() for value in torch.aminmax(target))
        if found_lo < lo or found_hi > hi:
            raise ValueError(f"{self.name}: {what}, found {found_lo if found_lo < lo else found_hi}. Check the "
                             "data set's labels against the model's output size.")

    def _label_error(self, target: Tensor, classes: int) -> ValueError | None:
        """On the CPU the gather or scatter that uses class indices refuses one out of range (at no cost when all are
        in range): the loss's own error for it, or ``None`` when the labels were not the problem."""
        try:
            self._raise_if_outside(target, 0, classes - 1, f"labels must be in [0, {classes - 1}] for {classes} "
                                   "classes")
        except ValueError as label_error:
            return label_error
        return None

    def _poisoned(self, loss: Tensor) -> Tensor:
        """``loss``, or NaN when the device check flagged this batch's labels."""
        flag = self.__dict__["_label_flag"]
        if flag is None or not loss.is_cuda:
            return loss
        return torch.where(flag, torch.full_like(loss, float("nan")), loss)

    def _class_indices(self, input: Tensor, target: Any) -> Tensor:
        """Validate integer class labels ``(N,)`` for logits ``(N, C)`` and return them as int64."""
        if (isinstance(target, Tensor) and target.dtype == torch.long and target.dim() == 1
                and target.shape[0] == input.shape[0] and target.device == input.device):
            if not target.is_cuda:  # the values: checked by the op that indexes with them, see _label_error
                return target
            c = input.shape[1]
            return self._in_range(target, 0, c - 1, f"labels must be in [0, {c - 1}] for {c} classes", indices=True)
        if not isinstance(target, Tensor):
            raise ValueError(f"{self.name}: target must be a tensor of class indices, got {type(target).__name__}")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(
                f"{self.name}: target must hold integer class indices of shape (N,), got dtype {target.dtype}. "
                "Pass labels such as torch.tensor([3, 0, 7]), not one-hot or probabilities."
            )
        n, c = input.shape
        if target.shape != (n,):
            raise ValueError(f"{self.name}: target must have shape ({n},) to match input {tuple(input.shape)}, "
                             f"got {tuple(target.shape)}")
        self._check_target_device(input, target)
        target = target if target.dtype == torch.long else target.long()
        return self._in_range(target, 0, c - 1, f"labels must be in [0, {c - 1}] for {c} classes", indices=True)


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy from logits: ``loss = mean_n (log Σ_c e^{z_nc} − z_{n,t_n})`` (or the sum).

    Shape: input ``(N, C)`` logits, target ``(N,)`` integer class indices in ``[0, C)``.
    Backward is the fused ``(softmax(z) − onehot(t)) / N``.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        self._check_logits(input, (2,))
        target = self._class_indices(input, target)
        try:
            loss, log_probs = F.cross_entropy_forward(input, target, self.reduction,
                                                      out=self.scratch("log_probs", input.shape, input))
        except RuntimeError as error:
            label_error = self._label_error(target, input.shape[1])
            if label_error is None:
                raise
            raise label_error from error
        self.save_for_backward(log_probs, target)
        return self._poisoned(loss)

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        log_probs, target = self.saved_tensors
        return F.cross_entropy_backward(dloss, log_probs, target, self.reduction,
                                        dx=self.scratch("dx", log_probs.shape, log_probs))

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
        loss, diff = F.mse_forward(input, target, self.reduction, out=self.scratch("diff", input.shape, input))
        self.save_for_backward(diff)
        return self._poisoned(loss)

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        (diff,) = self.saved_tensors
        return F.mse_backward(dloss, diff, self.reduction, dx=self.scratch("dx", diff.shape, diff))

    def reference_forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        squares = (input - self._as_target(input, target)) ** 2  # the definition (torch 2.4 has no bf16 mse_loss)
        if self.reduction == "mean":
            return squares.mean()
        return squares.sum() * (0.5 if self.reduction == "half_sum" else 1.0)

    def _as_target(self, input: Tensor, target: Any) -> Tensor:
        self.check_input(input)
        self._check_not_empty(input)
        if isinstance(target, Tensor) and not target.is_floating_point() and input.dim() == 2:
            labels = self._class_indices(input, target)
            try:
                return torch.zeros_like(input).scatter_(1, labels.unsqueeze(1), 1.0)  # one-hot rows (N, C)
            except RuntimeError as error:
                label_error = self._label_error(labels, input.shape[1])
                if label_error is None:
                    raise
                raise label_error from error
        if not isinstance(target, Tensor) or not target.is_floating_point():
            raise ValueError(f"{self.name}: target must be a float tensor shaped like the input "
                             f"{tuple(input.shape)}, or integer class labels (N,) for input (N, C)")
        if target.shape != input.shape:
            raise ValueError(f"{self.name}: target shape {tuple(target.shape)} differs from input shape "
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
        loss, residual = F.bce_with_logits_forward(input, target, self.reduction,
                                                   out=self.scratch("residual", input.shape, input))
        self.save_for_backward(residual)
        return self._poisoned(loss)

    def backward(self, dloss: Tensor | float = 1.0) -> Tensor:
        (residual,) = self.saved_tensors
        return F.bce_with_logits_backward(dloss, residual, self.reduction,
                                          dx=self.scratch("dx", residual.shape, residual))

    def reference_forward(self, input: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return TF.binary_cross_entropy_with_logits(input, self._as_target(input, target), reduction=self.reduction)

    def _as_target(self, input: Tensor, target: Any) -> Tensor:
        self._check_logits(input, (1, 2))
        if input.dim() == 2 and input.shape[1] != 1:
            raise ValueError(f"{self.name}: expected one logit per sample, input (N,) or (N, 1), got "
                             f"{tuple(input.shape)}; for several classes use CrossEntropyLoss")
        if not isinstance(target, Tensor) or target.numel() != input.shape[0] or target.dim() > 2:
            shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"{self.name}: target must hold {input.shape[0]} labels to match input "
                             f"{tuple(input.shape)}, got {shape}")
        if target.dtype == torch.bool:
            target = target.long()
        self._check_target_device(input, target)
        target = self._in_range(target, 0, 1, "targets must lie in [0, 1]")
        return target.reshape(input.shape).to(input.dtype)


LOSSES: dict[str, type[Loss]] = {"ce": CrossEntropyLoss, "mse": MSELoss, "bce": BCEWithLogitsLoss}
"""The losses by the names ``nnbackprop train --loss`` takes (each with mean reduction there)."""
