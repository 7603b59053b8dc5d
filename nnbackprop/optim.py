"""Stochastic gradient descent with momentum, Nesterov momentum and weight decay, shaped like ``torch.optim.SGD``.

The optimizer reads ``param.grad`` (filled by the hand-written backward passes) and updates ``param.data`` in place
with plain tensor ops; no autograd graph is involved. Full-batch gradient descent is this optimizer with one batch
holding the whole data set.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from .module import Parameter

_HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "foreach")


def _check_hyperparameters(
    lr: Any, momentum: Any, dampening: Any, weight_decay: Any, nesterov: Any, foreach: Any
) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter (``torch.optim.SGD``'s rules, plus finiteness)."""
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r}. SGD needs a finite number >= 0 for {name}.")
    if not isinstance(dampening, numbers.Real) or isinstance(dampening, bool) or not math.isfinite(dampening):
        raise ValueError(f"Invalid dampening: {dampening!r}. SGD needs a finite number for dampening.")
    if not isinstance(nesterov, bool):
        raise ValueError(f"Invalid nesterov: {nesterov!r}. Pass True or False.")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"Nesterov momentum requires a momentum > 0 and zero dampening (got momentum={momentum}, "
            f"dampening={dampening}). Set momentum > 0 and dampening=0, or nesterov=False."
        )
    if foreach not in (None, True, False):
        raise ValueError(f"Invalid foreach: {foreach!r}. Pass None (automatic), True or False.")


class SGD:
    r"""Implements stochastic gradient descent (optionally with momentum), exactly as ``torch.optim.SGD``.

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \theta_0 \text{ (params)},\ \lambda \text{ (weight decay)},
                \ \mu \text{ (momentum)},\ \tau \text{ (dampening)},\ \textit{nesterov} \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ g_t \leftarrow g_t + \lambda \theta_{t-1} \\
            &\quad \textbf{if}\ \mu \neq 0: \\
            &\qquad b_t \leftarrow g_t \ \text{ if } t = 1 \text{ else } \mu b_{t-1} + (1 - \tau) g_t \\
            &\qquad g_t \leftarrow g_t + \mu b_t \ \text{ if nesterov else } b_t \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \gamma g_t
        \end{aligned}

    "First step" is per parameter: a parameter's momentum buffer :math:`b` starts as its first gradient, so dampening
    applies from its second update on. Parameters whose ``grad`` is ``None`` are skipped (no update, no state).

    Two implementations compute the same update:

    * the per-parameter loop (``foreach=False``), the reference: a few tensor ops per parameter;
    * the multi-tensor path (``foreach=True``): the parameters are grouped by device and dtype and each group is updated
      with ``torch._foreach_*`` ops, at most five kernel launches per group and step, whatever the number of parameters.

    ``foreach=None`` (the default) picks the multi-tensor path when every parameter with a gradient is on CUDA, the
    rule ``torch.optim`` follows: there the launches saved matter, while on CPU the foreach ops fall back to a
    per-tensor loop and gain nothing.

    Args:
        params: the parameters to optimize, e.g. ``model.parameters()``.
        lr: learning rate :math:`\gamma` (>= 0). Read from ``param_groups[0]['lr']`` at every step, so a schedule can
            change it.
        momentum: momentum factor :math:`\mu` (>= 0, default 0).
        dampening: dampening :math:`\tau` for momentum (default 0).
        weight_decay: L2 penalty :math:`\lambda` (>= 0, default 0).
        nesterov: use Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (default False).
        foreach: ``True`` for the multi-tensor path, ``False`` for the loop, ``None`` to choose as described above.

    Attributes:
        param_groups: a list holding one dict with the hyperparameters above and ``'params'`` (the parameter list),
            as in ``torch.optim``.
        state: maps a parameter to its state, ``{'momentum_buffer': tensor}`` once it has taken a step with momentum.

    Example:
        >>> optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer.zero_grad()
        >>> model.backward(loss_fn.backward())
        >>> optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _check_hyperparameters(lr, momentum, dampening, weight_decay, nesterov, foreach)
        if isinstance(params, (Parameter, Tensor)):
            raise TypeError("SGD expects an iterable of Parameters, e.g. model.parameters(), not a single one")
        params = list(params)
        if not params:
            raise ValueError("SGD got an empty parameter list: pass model.parameters() of a model that has parameters")
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"SGD expects nnbackprop Parameters (model.parameters()), got a {type(p).__name__}"
                )
        if len({id(p) for p in params}) != len(params):
            raise ValueError("SGD got the same parameter more than once; pass each parameter once")
        self.param_groups: list[dict[str, Any]] = [
            {
                "params": params,
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "foreach": foreach,
            }
        ]
        self.state: dict[Parameter, dict[str, Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every parameter's gradient (to ``None``, or to zeros in place with ``set_to_none=False``)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """Update every parameter that has a gradient by one step of the rule above, in place."""
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                if p.grad.shape != p.data.shape or p.grad.dtype != p.data.dtype or p.grad.device != p.data.device:
                    raise RuntimeError(
                        f"SGD.step: {p} has a gradient of shape {tuple(p.grad.shape)}, dtype {p.grad.dtype}, device "
                        f"{p.grad.device}; it must match the parameter. Was the model moved (.to) after backward?"
                    )
            if not with_grad:
                continue
            momentum = group["momentum"]
            buffers = [self.state.get(p, {}).get("momentum_buffer") if momentum != 0 else None for p in with_grad]
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.data.device.type == "cuda" for p in with_grad)
            update = _multi_tensor_sgd if foreach else _single_tensor_sgd
            update(
                [p.data for p in with_grad],
                [p.grad for p in with_grad],
                buffers,
                lr=group["lr"],
                momentum=momentum,
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
            )
            if momentum != 0:
                for p, buffer in zip(with_grad, buffers):
                    self.state.setdefault(p, {})["momentum_buffer"] = buffer

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state in ``torch.optim``'s format, with parameters replaced by their positions.

        Returns:
            ``{'state': {index: {'momentum_buffer': tensor}}, 'param_groups': [{hyperparameters..., 'params':
            [indices]}]}``, where ``index`` counts the parameters in order across groups. The buffers are copies, so
            the result is a snapshot that later steps do not change.
        """
        index: dict[Parameter, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(p, len(index)) for p in group["params"]]
            groups.append(packed)
        state = {
            index[p]: {k: v.clone() for k, v in entry.items()}
            for p, entry in sorted(self.state.items(), key=lambda item: index[item[0]])
        }
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore hyperparameters and momentum buffers saved by :meth:`state_dict`.

        The buffers are copied to the device and dtype of the parameters they belong to. Everything is checked before
        anything changes, so a failed load leaves the optimizer as it was.

        Raises:
            ValueError: when the state dict is malformed or belongs to a different set of parameters (another number
                of parameters, or a buffer whose shape differs from its parameter's).
        """
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"state", "param_groups"}:
            found = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(
                f"SGD.load_state_dict expects a dict with keys 'state' and 'param_groups' "
                f"(from SGD.state_dict()), got {found}"
            )
        saved_groups = state_dict["param_groups"]
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            n_saved = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else saved_groups
            raise ValueError(
                f"SGD.load_state_dict: the state dict has {n_saved} parameter groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        by_index: dict[Any, Parameter] = {}
        new_hyperparameters = []
        for g, (own, saved) in enumerate(zip(self.param_groups, saved_groups)):
            expected = set(_HYPERPARAMETERS) | {"params"}
            if not isinstance(saved, Mapping) or set(saved) != expected:
                found = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
                raise ValueError(
                    f"SGD.load_state_dict: parameter group {g} must have keys {sorted(expected)}, got {found}"
                )
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"SGD.load_state_dict: parameter group {g} has {len(saved['params'])} parameters in the state "
                    f"dict but {len(own['params'])} in this optimizer. The state dict must come from an optimizer "
                    "over a model of the same architecture."
                )
            _check_hyperparameters(*(saved[k] for k in _HYPERPARAMETERS))
            new_hyperparameters.append({k: saved[k] for k in _HYPERPARAMETERS})
            by_index.update(zip(saved["params"], own["params"]))

        new_state: dict[Parameter, dict[str, Tensor]] = {}
        for index, entry in state_dict["state"].items():
            if index not in by_index:
                raise ValueError(
                    f"SGD.load_state_dict: the state dict has state for parameter {index!r}, which no parameter group "
                    "lists"
                )
            p = by_index[index]
            if not isinstance(entry, Mapping) or set(entry) != {"momentum_buffer"}:
                found = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
                raise ValueError(
                    f"SGD.load_state_dict: the state of parameter {index} must be {{'momentum_buffer': tensor}}, "
                    f"got {found}"
                )
            buffer = entry["momentum_buffer"]
            if not isinstance(buffer, Tensor) or buffer.shape != p.data.shape:
                found = tuple(buffer.shape) if isinstance(buffer, Tensor) else type(buffer).__name__
                raise ValueError(
                    f"SGD.load_state_dict: the momentum buffer of parameter {index} is {found} but the parameter has "
                    f"shape {tuple(p.data.shape)}. The state dict must come from a model of the same architecture."
                )
            new_state[p] = {"momentum_buffer": buffer.detach().to(p.data.device, p.data.dtype, copy=True)}

        for group, hyperparameters in zip(self.param_groups, new_hyperparameters):
            group.update(hyperparameters)
        self.state = new_state

    def __repr__(self) -> str:
        group = self.param_groups[0]
        settings = ", ".join(f"{k}={group[k]}" for k in _HYPERPARAMETERS)
        return f"SGD({settings})"


def _single_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    """The reference update, one parameter at a time. Updates ``params`` in place and fills ``momentum_buffers``."""
    for i, (param, grad) in enumerate(zip(params, grads)):
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buffer = momentum_buffers[i]
            if buffer is None:
                buffer = momentum_buffers[i] = grad.clone()
            else:
                buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
        param.add_(grad, alpha=-lr)


def _multi_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    """The same update as :func:`_single_tensor_sgd` with ``torch._foreach_*`` ops, one set per device and dtype."""
    by_device_and_dtype: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        by_device_and_dtype.setdefault((param.device, param.dtype), []).append(i)

    for indices in by_device_and_dtype.values():
        group_params = [params[i] for i in indices]
        group_grads = [grads[i] for i in indices]
        if weight_decay != 0:
            group_grads = torch._foreach_add(group_grads, group_params, alpha=weight_decay)
        if momentum != 0:
            buffers = [momentum_buffers[i] for i in indices]
            started = [k for k, buffer in enumerate(buffers) if buffer is not None]
            if started:
                started_buffers = [buffers[k] for k in started]
                torch._foreach_mul_(started_buffers, momentum)
                torch._foreach_add_(started_buffers, [group_grads[k] for k in started], alpha=1 - dampening)
            for k, i in enumerate(indices):
                if buffers[k] is None:
                    buffers[k] = momentum_buffers[i] = group_grads[k].clone()
            if nesterov:
                group_grads = torch._foreach_add(group_grads, buffers, alpha=momentum)
            else:
                group_grads = buffers
        torch._foreach_add_(group_params, group_grads, alpha=-lr)
