"""The fast layout: where the tensors of a training step live, so that a step neither allocates nor syncs.

The math is :mod:`nnbackprop.functional`'s, run by the same layers; this module only decides *where* their results go:

* :class:`Workspace` — buffers the layers (and the loss) write their outputs and input gradients into, via
  :meth:`~nnbackprop.module.Module.scratch`. Each buffer is allocated for the largest batch seen and handed out as its
  first ``N`` rows, so a smaller last batch costs nothing.
* :class:`FlatParameters` — every parameter of the model rebound to a view into one flat tensor ``(P,)``, its gradient
  to a view into another (:meth:`~nnbackprop.module.Parameter.grad_out`), and the optimizer's per-parameter state
  (momentum, Adam's moments) to views into flat tensors too. A gradient hook then sees the whole gradient as one tensor
  (one ``all_reduce`` in data-parallel training), and the optimizer's rule runs once over each flat tensor
  (:meth:`nnbackprop.optim.Optimizer.step`). The model, its ``state_dict``, the optimizer's ``state_dict`` and
  checkpoints keep working on the views.

:class:`FastLayout` binds both to a model (and its loss and optimizer); :class:`~nnbackprop.step.FastStep` uses it, and
:func:`~nnbackprop.gradcheck.check_gradients` works on a model bound to it as on a plain one.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from nnbackprop.module import Module, Parameter


class Workspace:
    """Buffers that modules write results into instead of allocating, held from step to step.

    Attributes:
        generation: incremented whenever a buffer is (re)allocated; views handed out before, and CUDA graphs that
            captured them, are stale from then on.
    """

    def __init__(self) -> None:
        self._full: dict[tuple[int, str], Tensor] = {}
        self.generation = 0

    def bind(self, module: Module) -> None:
        """Make ``module`` write into this workspace (see :meth:`~nnbackprop.module.Module.scratch`)."""
        module.__dict__.update(_workspace=self, _scratch={})

    def get(self, owner: Module, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """``owner``'s buffer ``name`` as a tensor of ``shape`` with ``like``'s dtype and device (contents undefined),
        channels-last when ``like`` is a channels-last image batch (as the fast layout's convolutions make them).

        The buffer is allocated with the batch dimension (the first) of the largest ``shape`` asked for, and other
        sizes are its leading rows. The view is remembered in ``owner``'s scratch table, which
        :meth:`~nnbackprop.module.Module.scratch` reads first."""
        views = owner.__dict__["_scratch"]
        full = self._full.get((id(owner), name))
        layout = _memory_format(shape, like)
        if (full is None or full.shape[1:] != shape[1:] or full.shape[0] < shape[0] or full.dtype != like.dtype
                or full.device != like.device or not full.is_contiguous(memory_format=layout)):
            full = self._full[(id(owner), name)] = torch.empty(shape, dtype=like.dtype, device=like.device,
                                                               memory_format=layout)
            for key in [key for key in views if key[0] == name]:
                del views[key]
            self.generation += 1
        view = views[(name, shape)] = full if full.shape[0] == shape[0] else full[: shape[0]]
        return view


def _memory_format(shape: tuple[int, ...], like: Tensor) -> torch.memory_format:
    """Channels-last for an image-shaped buffer asked for like a channels-last image batch, else contiguous."""
    if len(shape) == 4 and like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_flat(params: list[Parameter]) -> None:
    if not params:
        raise ValueError("the fast layout needs a model with parameters")
    first = params[0]
    if any(p.device != first.device or p.dtype != first.dtype for p in params):
        found = sorted({f"{p.dtype} on {p.device}" for p in params})
        raise ValueError(f"the fast layout keeps all parameters in one flat tensor, so they need one device and dtype; "
                         f"found {', '.join(found)}. Call model.to(device, dtype)")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("the fast layout needs each parameter once; this model shares a parameter between layers")


class FlatParameters:
    """The parameters, their gradients and their optimizer state as views into flat tensors ``(P,)``.

    Args:
        params: the parameters, in the order of the optimizer group that updates them (if any).
        group_index: the index of that group in ``optimizer.param_groups``, or ``None``.

    Attributes:
        data: ``(P,)`` all parameter values; each parameter's storage is a view of it.
        grad: ``(P,)`` all gradients; each parameter's gradient, once written, is a view of it.
    """

    def __init__(self, params: Iterable[Parameter], group_index: int | None = None) -> None:
        self.params = list(params)
        _check_flat(self.params)
        first = self.params[0]
        self.group_index = group_index
        self.data = torch.empty(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        self.data_views = self.views(self.data)
        self.grad_views = self.views(self.grad)
        self._addresses = [view.data_ptr() for view in self.data_views]
        self.grads_in_place = False  # set by the fast step when it has seen every gradient land in its view
        self._state: dict[str, Tensor] = {}  # flat optimizer state: (P,) tensors, or 0-dim shared ones (Adam's step)
        self._state_views: dict[str, list[Tensor]] = {}
        self._shared_with: Any = None  # the optimizer's state dict that holds views of self._state
        self.bind()

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` ``(P,)`` cut into one view per parameter, shaped like it."""
        return [view.view(p.shape) for view, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    @torch.no_grad()
    def bind(self) -> None:
        """Make every parameter a view of :attr:`data` (keeping its value) with its gradient's home in :attr:`grad`."""
        for p, data, grad in zip(self.params, self.data_views, self.grad_views):
            if p.data_ptr() != data.data_ptr():
                data.copy_(p)
                p.data = data
            if p.grad is not None and p.grad is not grad:
                grad.copy_(p.grad)
                p.grad = grad
            p._grad_view = grad

    def is_bound(self) -> bool:
        """Whether every parameter still lives in :attr:`data` (``model.to()`` moves them out)."""
        return all(p.data_ptr() == address and p._grad_view is grad
                   for p, address, grad in zip(self.params, self._addresses, self.grad_views))

    @torch.no_grad()
    def unbind(self) -> None:
        """Give every parameter (and gradient) storage of its own again."""
        for p in self.params:
            grad = None if p.grad is None else p.grad.clone()
            p.grad, p._grad_view = None, None
            p.data = p.data.clone()
            p.grad = grad

    # ------------------------------------------------------------------ the optimizer's view
    def holds_group(self, index: int) -> bool:
        return index == self.group_index

    def holds(self, index: int, params: list[Tensor]) -> bool:
        """Whether optimizer group ``index`` (its ``params``) is this layout's, with every gradient in its flat view
        (the fast step vouches for that with :attr:`grads_in_place` after its backward; else each is looked at)."""
        if index != self.group_index:
            return False
        if self.grads_in_place:
            self.grads_in_place = False
            return True
        return all(p.grad is grad for p, grad in zip(params, self.grad_views))

    @torch.no_grad()
    def adopt_state(self, state: dict[Any, dict[str, Any]]) -> dict[str, Tensor]:
        """The flat state for the optimizer's rule: as left by the last step, or gathered from ``state`` (the
        optimizer's per-parameter state) when that was replaced, e.g. by ``optimizer.load_state_dict``."""
        if state is self._shared_with:
            return self._state  # as the last step left it (load_state_dict replaces the whole state dict)
        first = self.params[0]
        names = set(state[first]) if first in state else set()
        if not names and not self._state:
            return self._state
        per_param = [state.get(p, {}) for p in self.params]
        if any(set(s) != names for s in per_param):
            raise RuntimeError("the optimizer holds state for some parameters of the fast layout and not others "
                               f"({sorted(names)}); it updates all of them together. Load a state dict from the same "
                               "model and optimizer, or start without state")
        flat: dict[str, Tensor] = {}
        for name in names:
            values = [s[name] for s in per_param]
            if all(v.dim() == 0 for v in values):
                if any(not torch.equal(v.cpu(), values[0].cpu()) for v in values):
                    raise RuntimeError(f"the optimizer's '{name}' differs between parameters; the fast layout steps "
                                       "them together")
                flat[name] = values[0].to(self.data.device).clone()
            else:
                flat[name] = torch.cat([v.reshape(-1).to(self.data) for v in values])
        self._state = flat
        self._state_views = {}
        self._shared_with = None
        return flat

    def share_state(self, state: dict[Any, dict[str, Any]]) -> None:
        """Put views of the flat state into the optimizer's per-parameter state (after a step created or adopted it),
        so its ``state_dict`` sees each parameter's part."""
        if state is self._shared_with and len(self._state_views) == len(self._state):
            return
        for name, flat in self._state.items():
            views = [flat] * len(self.params) if flat.dim() == 0 else self.views(flat)
            self._state_views[name] = views
            for p, view in zip(self.params, views):
                state[p][name] = view
        self._shared_with = state


class FastLayout:
    """Binds the fast layout to a model: a :class:`Workspace` for it (and for ``extra`` modules, e.g. its loss) and
    its parameters, if any, in :class:`FlatParameters` — in the order of the ``optimizer`` group holding exactly them,
    whose updates then run on the flat tensors.

    Raises:
        ValueError: when the parameters cannot share one flat tensor (see :meth:`why_not`).
    """

    def __init__(self, model: Module, *extra: Module, optimizer: Any = None) -> None:
        params = list(model.parameters())
        group_index = None
        for index, group in enumerate(getattr(optimizer, "param_groups", [])):
            if len(group["params"]) == len(params) and {id(p) for p in group["params"]} == {id(p) for p in params}:
                params, group_index = list(group["params"]), index
        self.flat = FlatParameters(params, group_index) if params else None
        self.optimizer = optimizer if group_index is not None and hasattr(optimizer, "flat") else None
        if self.optimizer is not None:
            self.optimizer.flat = self.flat
        self.workspace = Workspace()
        self.modules = [m for root in (model, *extra) for m in root.modules()]
        for m in self.modules:
            self.workspace.bind(m)

    @staticmethod
    def why_not(model: Module) -> str | None:
        """Why ``model``'s parameters cannot share one flat tensor, or ``None``."""
        try:
            _check_flat(list(model.parameters()))
        except ValueError as error:
            return str(error)
        return None

    def is_bound(self) -> bool:
        """Whether the parameters still live in this layout (``model.to()`` moves them out)."""
        return self.flat is None or self.flat.is_bound()

    def unbind(self) -> None:
        """Leave the layout: the modules allocate again, the parameters get storage of their own, the optimizer updates
        them one by one."""
        for m in self.modules:
            m.__dict__.update(_workspace=None, _scratch={})
        if self.flat is not None:
            self.flat.unbind()
        if self.optimizer is not None:
            self.optimizer.flat = None
