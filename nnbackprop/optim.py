r"""Optimizers written by hand — SGD (momentum, Nesterov, weight decay), Adam and AdamW — as ``torch.optim`` ones.

Each optimizer reads ``param.grad`` (filled by the hand-written backward passes) and updates the parameters in place
with plain tensor ops; no autograd graph is involved. Being ``torch.optim.Optimizer`` subclasses, they work with every
``torch.optim.lr_scheduler``, step hooks, and ``state_dict``/``load_state_dict`` in torch's format, interchangeable
with ``torch.optim.SGD``/``Adam``/``AdamW``'s (the same state names).

Each update rule is written once, as a function of one parameter tensor, its gradient and its state (``_sgd``,
``_adam``), with the hyperparameters as 0-dim tensors on the parameter's device. :meth:`Optimizer.step` applies it to
each parameter in turn or, when the fast layout has put a group's parameters, gradients and state into flat tensors
(:mod:`nnbackprop.layout`), once to those flat tensors: the same rule, one pass over memory, and — the hyperparameters
being device tensors — capturable in a CUDA graph, where a schedule's new learning rate needs no recapture.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
import torch.optim.optimizer as torch_optimizer
from torch import Tensor



class FlatTensors(Protocol):
    """What an optimizer attached to the fast layout uses of its flat tensors
    (:class:`nnbackprop.layout.FlatParameters` is the one there is)."""

    params: list[Tensor]  # the parameters, in the flat order

    @property
    def values(self) -> Tensor: ...  # (P,) the values the update changes (float32 master weights under bfloat16)

    def views(self, flat: Tensor) -> list[Tensor]: ...  # a (P,) tensor as one view per parameter

    def gather(self, tensors: list[Tensor], like: Tensor) -> Tensor: ...  # per-parameter tensors as one (P,) tensor

    def collect_grads(self) -> None: ...  # every gradient into the flat gradient

    def update_grad(self) -> Tensor: ...  # (P,) the gradient the update reads

    def after_update(self) -> None: ...  # the parameters made to follow ``values``

# hooks registered with torch.optim.optimizer.register_optimizer_step_{pre,post}_hook, which step() runs for every
# optimizer
_GLOBAL_PRE_HOOKS = getattr(torch_optimizer, "_global_optimizer_pre_hooks", {})
_GLOBAL_POST_HOOKS = getattr(torch_optimizer, "_global_optimizer_post_hooks", {})


def _check_number(name: str, value: Any, *, minimum: float | None = 0.0, below: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (minimum is not None and value < minimum) or (below is not None and value >= below):
        bounds = [f">= {minimum:g}" for _ in range(minimum is not None)] + [f"< {below:g}" for _ in range(
            below is not None)]
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number"
                         + (" " + " and ".join(bounds) if bounds else ""))


class Optimizer(torch.optim.Optimizer):
    """Base of the hand-written optimizers: applies a subclass's rule (:meth:`_update`) per parameter, or once to the
    flat tensors of the fast layout.

    Subclasses implement ``_scalars(group)`` (the floats the rule needs, which become 0-dim device tensors refreshed
    when they change), ``_update(group, param, grad, state, scalars)`` (the rule, in place) and ``_structure(group)``
    (which branches the rule takes: a CUDA graph holds one).

    The fast layout attaches a group to its flat tensors with :meth:`attach_flat`: from then on the rule runs once over
    the group's flat parameters (its float32 master copy under mixed precision) and flat gradient, the group's state
    lives in flat tensors of which each parameter's ``state[p]`` holds views (so ``state_dict`` is torch's, per
    parameter), and :meth:`load_state_dict` copies into those flat tensors in place (so a captured CUDA graph sees it).
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._flat: FlatTensors | None = None
        self._flat_group: int | None = None
        self._flat_state: dict[str, Tensor] = {}  # (P,) tensors, or 0-dim ones shared by the group (Adam's step)
        self._scalar_tensors: dict[tuple, tuple[tuple[float, ...], tuple[Tensor, ...]]] = {}

    def _scalars(self, group: dict[str, Any]) -> tuple[float, ...]:
        raise NotImplementedError

    def _update(self, group: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any],
                scalars: tuple[Tensor, ...]) -> None:
        raise NotImplementedError

    def _structure(self, group: dict[str, Any]) -> tuple:
        raise NotImplementedError

    # ------------------------------------------------------------------ the fast layout
    def attach_flat(self, flat: FlatTensors, group_index: int) -> None:
        """Update group ``group_index`` (whose parameters are ``flat.params``, in order) on ``flat``'s tensors from now
        on; the state the group already has moves into flat tensors."""
        if [id(p) for p in self.param_groups[group_index]["params"]] != [id(p) for p in flat.params]:
            raise ValueError(f"attach_flat: group {group_index} does not hold the flat parameters, in their order")
        self._flat, self._flat_group, self._flat_state = flat, group_index, {}
        self._gather_state(self.state)

    def detach_flat(self) -> None:
        """Update the group parameter by parameter again, each with a state of its own (copies of its views)."""
        if self._flat is None:
            return
        for p in self._flat.params:
            if p in self.state:
                self.state[p] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state[p].items()}
        self._flat, self._flat_group, self._flat_state = None, None, {}

    @torch.no_grad()
    def _gather_state(self, state: Mapping[Any, Mapping[str, Any]]) -> None:
        """The flat group's state from ``state`` (per parameter, e.g. just loaded) into the flat tensors — in place
        where they exist — and each parameter's ``self.state[p]`` made views of them."""
        flat = self._flat
        per_param = [state.get(p, {}) for p in flat.params]
        names = set(per_param[0])
        if any(set(s) != names for s in per_param):
            raise ValueError("the optimizer state has entries for some parameters of the fast layout and not others; "
                             "it updates all of them together. Load a state dict of the same model and optimizer")
        like = flat.values
        gathered: dict[str, Tensor] = {}
        for name in sorted(names):
            values = [s[name] for s in per_param]
            if not all(isinstance(v, Tensor) for v in values):
                raise ValueError(f"the optimizer's '{name}' is not a tensor for every parameter; load a state dict "
                                 "of the same model and optimizer")
            if all(v.dim() == 0 for v in values):
                if any(not torch.equal(v.cpu(), values[0].cpu()) for v in values):
                    raise ValueError(f"the optimizer's '{name}' differs between parameters; the fast layout steps "
                                     "them together")
                gathered[name] = values[0].to(device=like.device, dtype=torch.promote_types(values[0].dtype,
                                                                                            torch.float32))
            else:
                gathered[name] = flat.gather(values, like)
        for name, value in gathered.items():
            current = self._flat_state.get(name)
            if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)
            else:
                self._flat_state[name] = value
        for name in set(self._flat_state) - names:
            del self._flat_state[name]
        self._publish_state()

    def _publish_state(self) -> None:
        """Each flat-group parameter's ``self.state[p]``: views of the flat state."""
        params = self._flat.params
        for p in params:
            self.state.pop(p, None)
        for name, flat in self._flat_state.items():
            views = [flat] * len(params) if flat.dim() == 0 else self._flat.views(flat)
            for p, view in zip(params, views):
                self.state[p][name] = view

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient by one step of the rule, in place; returns ``closure()``."""
        loss = closure() if closure is not None else None
        self.update()
        return loss

    def update(self) -> None:
        """The update of :meth:`step` alone: without torch's profiler annotation, step hooks and grad-mode switch
        around it (the fast step calls it when no hooks are registered)."""
        self._opt_called = True  # what torch.optim.lr_scheduler checks to know the optimizer stepped
        for index, group in enumerate(self.param_groups):
            if index == self._flat_group:
                self._flat.collect_grads()
                param, grad = self._flat.values, self._flat.update_grad()
                created = not self._flat_state
                self._update(group, param, grad, self._flat_state, self._scalar_tensors_for(index, param))
                self._flat.after_update()
                if created and self._flat_state:
                    self._publish_state()
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
                    raise RuntimeError(f"{type(self).__name__}.step: a parameter of shape {tuple(p.shape)} ({p.dtype}, "
                                       f"{p.device}) has a gradient of shape {tuple(p.grad.shape)} ({p.grad.dtype}, "
                                       f"{p.grad.device}); was the model moved (.to) after backward?")
                state = self.state.get(p)
                fresh = state is None
                state = {} if fresh else state
                self._update(group, p, p.grad, state, self._scalar_tensors_for(index, p))
                if fresh and state:  # as torch: a parameter has state once its rule keeps some
                    self.state[p] = state

    def has_hooks(self) -> bool:
        """Whether step hooks (this optimizer's or global ones) must run around the update."""
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks or _GLOBAL_PRE_HOOKS
                    or _GLOBAL_POST_HOOKS)

    def _scalar_tensors_for(self, index: int, like: Tensor) -> tuple[Tensor, ...]:
        """Group ``index``'s scalars as 0-dim tensors on ``like``'s device, in at least float32 (a 16-bit β2 = 0.999
        would round to 1), refreshed in place (``fill_``, no sync) when the hyperparameters change — except while a
        CUDA graph is being captured, which must read whatever they hold at replay. Keyed by the group's index, so a
        ``load_state_dict`` that replaces the group dicts keeps the tensors a captured graph reads."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        key = (index, dtype, like.device)
        values = self._scalars(self.param_groups[index])
        entry = self._scalar_tensors.get(key)
        if entry is None:
            tensors = tuple(torch.tensor(values, dtype=dtype, device=like.device).unbind())
            self._scalar_tensors[key] = (values, tensors)
            return tensors
        old, tensors = entry
        if values != old and not (like.is_cuda and torch.cuda.is_current_stream_capturing()):
            for tensor, value, before in zip(tensors, values, old):
                if value != before:
                    tensor.fill_(value)
            self._scalar_tensors[key] = (values, tensors)
        return tensors

    def _state_names(self, group: dict[str, Any]) -> tuple[set[str], set[str]]:
        """``(required, allowed)``: the state a parameter of ``group`` has once it has any, and all it may have."""
        raise NotImplementedError

    def _state_problem(self, state_dict: Any) -> str | None:
        """What in ``state_dict``'s per-parameter state does not fit this optimizer and its parameters, or ``None``
        (also when its groups do not match these, which torch's ``load_state_dict`` reports)."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or not isinstance(
                state_dict.get("param_groups"), list):
            return "it is not an optimizer's state dict (a dict with 'state' and 'param_groups')"
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                not isinstance(saved, dict) or len(saved.get("params", ())) != len(own["params"])
                for saved, own in zip(saved_groups, self.param_groups)):
            return None
        params = {index: (param, saved) for saved, own in zip(saved_groups, self.param_groups)
                  for index, param in zip(saved["params"], own["params"])}
        for index, entry in state_dict["state"].items():
            if index not in params:
                return f"it has state for parameter {index!r}, which none of its parameter groups lists"
            if not isinstance(entry, dict):
                return f"the state of parameter {index} is a {type(entry).__name__}, not a dict"
            param, group = params[index]
            required, allowed = self._state_names(group)

            def shape(value: Any) -> str:
                return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"

            for name, value in entry.items():
                if name not in allowed:
                    return (f"parameter {index} (shape {tuple(param.shape)}) has state {name!r} ({shape(value)}), "
                            f"which {type(self).__name__} does not keep (it keeps {', '.join(sorted(allowed))})")
                if value is None and name not in required:
                    continue
                if name == "step" and not (isinstance(value, Tensor) and value.dim() == 0):
                    return f"parameter {index} has state 'step' of {shape(value)}, where a 0-dim tensor belongs"
                if name != "step" and not (isinstance(value, Tensor) and value.shape == param.shape):
                    return (f"parameter {index} has state {name!r} of {shape(value)}, but the parameter has shape "
                            f"{tuple(param.shape)}")
            missing = sorted(required - set(entry)) if entry else []
            if missing:
                return f"parameter {index} (shape {tuple(param.shape)}) lacks the state {', '.join(map(repr, missing))}"
        for i, saved in enumerate(saved_groups):
            missing = sorted(set(self.defaults) - set(saved))
            if missing:
                return (f"its parameter group {i} lacks the settings {', '.join(missing)} of {type(self).__name__} (it "
                        "was saved by another optimizer)")
        return None

    def refresh_scalars(self) -> None:
        """Bring the device copies of the flat group's hyperparameters up to date without a step (before a CUDA graph
        replay)."""
        if self._flat is not None:
            self._scalar_tensors_for(self._flat_group, self._flat.values)

    def structure(self) -> tuple:
        """Which branches the rule takes for each group, and whether the state exists yet: one CUDA graph each."""
        return tuple(self._structure(group) for group in self.param_groups) + (len(self.state),)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch's format, each parameter's state its own: a 0-dim state tensor the fast layout shares between
        parameters (Adam's ``step``) is given to each as a copy, as torch's optimizers keep it. The live state is
        left as it is."""
        state_dict = super().state_dict()
        state_dict["state"] = {index: {name: value.clone() if isinstance(value, Tensor) and value.dim() == 0 else value
                                       for name, value in entry.items()}
                               for index, entry in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after checking that ``state_dict`` holds this optimizer's kind of state
        (:meth:`_state_names`) for parameters of these shapes; the fast layout's group then takes the loaded values
        into its flat tensors in place, at full precision (torch would round them to a 16-bit parameter dtype).

        Raises:
            ValueError: a parameter's state holds a name this optimizer does not keep (another optimizer's state),
                lacks one it needs, or has a tensor of another shape than the parameter (another model's state);
                the message names the parameter index, the state and the shapes. torch's own checks (the number of
                parameter groups and of parameters in each) follow.
        """
        problem = self._state_problem(state_dict)
        if problem:
            raise ValueError(f"{type(self).__name__}.load_state_dict: {problem}; load a state dict that this optimizer "
                             "class saved for the same model")
        originals = {index: dict(entry) for index, entry in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        if self._flat is not None:
            ids = [i for group in state_dict["param_groups"] for i in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            by_param = {p: originals[i] for i, p in zip(ids, params) if i in originals}
            self._gather_state({p: by_param.get(p, {}) for p in self._flat.params})


# --------------------------------------------------------------------------------------------------------------- SGD


def _sgd(param: Tensor, grad: Tensor, state: dict[str, Any], scalars: tuple[Tensor, ...], *, momentum: float,
         dampening: float, weight_decay: float, nesterov: bool) -> None:
    """One SGD step of one tensor, in place (see :class:`SGD`); ``scalars`` are ``(−γ, μ, 1 − τ, λ)``."""
    neg_lr, mu, keep, decay = scalars
    if weight_decay != 0:
        grad = torch.addcmul(grad, param, decay)  # g + λ θ
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.clone(memory_format=torch.contiguous_format)
        elif dampening == 0:
            torch.addcmul(grad, buf, mu, out=buf)  # μ b + g, one pass
        else:
            buf.mul_(mu).addcmul_(grad, keep)  # μ b + (1 − τ) g
        grad = torch.addcmul(grad, buf, mu) if nesterov else buf
    param.addcmul_(grad, neg_lr)  # θ − γ g


class SGD(Optimizer):
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

    Args:
        params: the parameters to optimize (e.g. ``model.parameters()``), or parameter groups (dicts), as in torch.
        lr: learning rate :math:`\gamma` (>= 0). Read at every step, so a ``torch.optim.lr_scheduler`` can change it.
        momentum: momentum factor :math:`\mu` (>= 0, default 0).
        dampening: dampening :math:`\tau` for momentum (default 0).
        weight_decay: L2 penalty :math:`\lambda` (>= 0, default 0).
        nesterov: use Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0`` (default False).

    State: ``state[p]['momentum_buffer']`` once ``p`` has taken a step with momentum (torch's name).

    Example:
        >>> optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> optimizer.zero_grad()
        >>> model.backward(loss_fn.backward())
        >>> optimizer.step()
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        _check_number("lr", lr)
        _check_number("momentum", momentum)
        _check_number("dampening", dampening, minimum=None)
        _check_number("weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise ValueError(f"Invalid nesterov: {nesterov!r}; pass True or False")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum requires a momentum > 0 and zero dampening (got momentum={momentum}, "
                             f"dampening={dampening}); set momentum > 0 and dampening=0, or nesterov=False")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _scalars(self, group: dict[str, Any]) -> tuple[float, ...]:
        return (-float(group["lr"]), float(group["momentum"]), 1.0 - group["dampening"], float(group["weight_decay"]))

    def _structure(self, group: dict[str, Any]) -> tuple:
        return (group["momentum"] != 0, group["dampening"] != 0, group["weight_decay"] != 0, group["nesterov"])

    def _state_names(self, group: dict[str, Any]) -> tuple[set[str], set[str]]:
        return ({"momentum_buffer"} if group.get("momentum", 0) != 0 else set()), {"momentum_buffer"}

    def _update(self, group: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any],
                scalars: tuple[Tensor, ...]) -> None:
        _sgd(param, grad, state, scalars, momentum=group["momentum"], dampening=group["dampening"],
             weight_decay=group["weight_decay"], nesterov=group["nesterov"])


# -------------------------------------------------------------------------------------------------------------- Adam


def _adam(param: Tensor, grad: Tensor, state: dict[str, Any], scalars: tuple[Tensor, ...], *, weight_decay: float,
          decoupled: bool, amsgrad: bool) -> None:
    """One Adam (or AdamW, ``decoupled``) step of one tensor, in place (see :class:`Adam`); ``scalars`` are
    ``(γ, β1, β2, ε, λ)``."""
    lr, beta1, beta2, eps, decay = scalars
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)  # torch's: float32 whatever the param
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
    step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
    step.add_(1)  # t
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * decay)  # θ ← θ (1 − γ λ)
        else:
            grad = torch.addcmul(grad, param, decay)  # g + λ θ
    m.lerp_(grad, (1 - beta1).to(m.dtype))  # m ← β1 m + (1 − β1) g; 1 − β in float32, then the state's dtype
    v.lerp_(grad * grad, (1 - beta2).to(v.dtype))  # v ← β2 v + (1 − β2) g²
    if amsgrad:
        v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])  # v̂max ← max(v̂max, v)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (v.sqrt() / bias_correction2.sqrt()).add_(eps)  # √(v / (1 − β2^t)) + ε
    param.addcdiv_(m * (-lr / bias_correction1), denom)  # θ − γ m / ((1 − β1^t) denom)


class Adam(Optimizer):
    r"""Implements Adam, exactly as ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \beta_1, \beta_2 \text{ (betas)},\ \theta_0 \text{ (params)},
                \ \lambda \text{ (weight decay)},\ \epsilon,\ \textit{amsgrad} \\
            &m_0 \leftarrow 0,\ v_0 \leftarrow 0,\ \hat v^{max}_0 \leftarrow 0 \\
            &\textbf{for}\ t = 1, 2, \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1}) \\
            &\quad \textbf{if}\ \lambda \neq 0:\ g_t \leftarrow g_t + \lambda \theta_{t-1} \\
            &\quad m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
            &\quad v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
            &\quad \hat m_t \leftarrow m_t / (1 - \beta_1^t) \\
            &\quad \textbf{if amsgrad}:\ \hat v^{max}_t \leftarrow \max(\hat v^{max}_{t-1}, v_t),
                \ \hat v_t \leftarrow \hat v^{max}_t / (1 - \beta_2^t)
                \quad \textbf{else}:\ \hat v_t \leftarrow v_t / (1 - \beta_2^t) \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \gamma \hat m_t / (\sqrt{\hat v_t} + \epsilon)
        \end{aligned}

    Args:
        params: the parameters to optimize, or parameter groups (dicts), as in torch.
        lr: learning rate :math:`\gamma` (default 1e-3).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default (0.9, 0.999)).
        eps: :math:`\epsilon`, added to the denominator for stability (default 1e-8).
        weight_decay: L2 penalty :math:`\lambda` (default 0).
        amsgrad: use the maximum of the second-moment estimates (AMSGrad, default False).

    State: ``state[p]`` holds ``step``, ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`) and, with ``amsgrad``,
    ``max_exp_avg_sq``: torch's names.
    """

    decoupled_weight_decay = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        _check_number("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; pass two numbers (beta1, beta2), each in [0, 1)")
        _check_number("beta1", betas[0], below=1.0)
        _check_number("beta2", betas[1], below=1.0)
        _check_number("eps", eps)
        _check_number("weight_decay", weight_decay)
        if not isinstance(amsgrad, bool):
            raise ValueError(f"Invalid amsgrad: {amsgrad!r}; pass True or False")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad))

    def _scalars(self, group: dict[str, Any]) -> tuple[float, ...]:
        beta1, beta2 = group["betas"]
        return (float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))

    def _structure(self, group: dict[str, Any]) -> tuple:
        return (group["weight_decay"] != 0, group["amsgrad"])

    def _state_names(self, group: dict[str, Any]) -> tuple[set[str], set[str]]:
        required = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
        return required, required | {"max_exp_avg_sq"}

    def _update(self, group: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any],
                scalars: tuple[Tensor, ...]) -> None:
        _adam(param, grad, state, scalars, weight_decay=group["weight_decay"],
              decoupled=self.decoupled_weight_decay, amsgrad=group["amsgrad"])


class AdamW(Adam):
    r"""Implements AdamW, exactly as ``torch.optim.AdamW``: Adam with *decoupled* weight decay — the parameters shrink
    by :math:`\theta_{t-1} \leftarrow \theta_{t-1} (1 - \gamma \lambda)` before the update, instead of :math:`\lambda
    \theta` joining the gradient (and so the moment estimates). Arguments and state as :class:`Adam`, with
    ``weight_decay`` defaulting to 1e-2 as in torch."""

    decoupled_weight_decay = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
"""The optimizers by the names ``nnbackprop train --optimizer`` takes."""

DEFAULT_LR: dict[str, float] = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
"""The learning rate ``nnbackprop train`` uses for each optimizer when ``lr`` is left open (the classes' own defaults
are torch's)."""
