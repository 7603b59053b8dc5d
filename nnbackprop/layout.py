"""The fast layout: where the tensors of a training step live, so that a step neither allocates nor syncs.

The math is :mod:`nnbackprop.functional`'s, run by the same layers; this module only decides *where* their results go,
through methods the modules, parameters and optimizers own (nothing here writes another object's private state):

* :class:`Workspace` — buffers the layers (and the loss) write their outputs and input gradients into. A module bound
  to it (:meth:`~nnbackprop.module.Module.bind_workspace`) gets them from
  :meth:`~nnbackprop.module.Module.scratch`. Each buffer is allocated for the largest batch seen and handed out as its
  first ``N`` rows, so a smaller last batch costs nothing.
* :class:`FlatParameters` — every parameter of the model rebound to a view into one flat tensor ``(P,)``, and given a
  view into another as its gradient home (:meth:`~nnbackprop.module.Parameter.bind_grad_home`). A gradient hook then
  sees the whole gradient as one tensor (one ``all_reduce`` in data-parallel training), and an nnbackprop optimizer
  attached to it (:meth:`~nnbackprop.optim.Optimizer.attach_flat`) runs its rule once over the flat tensors, its state
  in flat tensors too. With a 16-bit compute dtype the flat tensors also hold a float32 *master* copy of the
  parameters, which the update works on (mixed precision).

:class:`FastLayout` binds both to a model (and its loss and optimizer); :class:`~nnbackprop.step.FastStep` uses it, and
:func:`~nnbackprop.gradcheck.check_gradients` works on a model bound to it as on a plain one.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

from nnbackprop.module import Module, Parameter
from nnbackprop.optim import Optimizer

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
"""The dtypes a model trains in, by the names ``nnbackprop train --dtype`` takes; ``bfloat16`` is mixed precision
(the layers compute in it, the update works on float32 master weights). float16 would need loss scaling, which
nnbackprop does not do."""

LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Compute dtypes whose parameters get a float32 master copy in the fast layout."""


class Workspace:
    """Buffers that modules write results into instead of allocating, held from step to step.

    Attributes:
        generation: incremented whenever a buffer is (re)allocated; views handed out before, and CUDA graphs that
            captured them, are stale from then on (modules ask again, graphs are recaptured).
    """

    def __init__(self) -> None:
        self._full: dict[tuple[int, str], Tensor] = {}
        self.generation = 0

    def buffer(self, owner: Module, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """``owner``'s buffer ``name`` as a tensor of ``shape`` with ``like``'s dtype and device (contents undefined),
        channels-last when ``like`` is a channels-last image batch (as the fast layout's convolutions make them).

        The buffer is allocated with the batch dimension (the first) of the largest ``shape`` asked for; smaller
        batches get its leading rows."""
        key = (id(owner), name)
        full = self._full.get(key)
        layout = _memory_format(shape, like)
        if (full is None or full.shape[1:] != shape[1:] or full.shape[0] < shape[0] or full.dtype != like.dtype
                or full.device != like.device or not full.is_contiguous(memory_format=layout)):
            full = self._full[key] = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)
            self.generation += 1
        return full if full.shape[0] == shape[0] else full[: shape[0]]


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
    """The parameters and their gradients as views into flat tensors ``(P,)``; a float32 master copy for a 16-bit
    compute dtype.

    Args:
        params: the parameters, in the order of the optimizer group that updates them (if any).
        compute_dtype: the dtype the layers compute in (default: the parameters'). A 16-bit one for wider parameters
            keeps their current values as the float32 :attr:`master` and makes the parameters 16-bit views of
            :attr:`data`.

    Attributes:
        data: ``(P,)`` all parameter values, in the compute dtype; each parameter's storage is a view of it.
        grad: ``(P,)`` all gradients, in the compute dtype; each parameter's gradient home is a view of it.
        master: ``(P,)`` float32 master values (``None`` unless the compute dtype is 16-bit); the optimizer updates
            them, then :attr:`data` is rounded from them.
        master_grad: ``(P,)`` float32 gradient the update reads (``None`` unless there is a master copy).
    """

    def __init__(self, params: Iterable[Parameter], compute_dtype: torch.dtype | None = None) -> None:
        self.params = list(params)
        _check_flat(self.params)
        first = self.params[0]
        dtype = compute_dtype or first.dtype
        self.master: Tensor | None = None
        self.master_grad: Tensor | None = None
        if dtype in LOW_PRECISION and dtype != first.dtype:
            self.master = torch.cat([p.detach().reshape(-1).float() for p in self.params])
            self.master_grad = torch.zeros_like(self.master)
        self.data = torch.empty(sum(p.numel() for p in self.params), dtype=dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        self.data_views = self.views(self.data)
        self.grad_views = self.views(self.grad)
        self._addresses = [view.data_ptr() for view in self.data_views]
        self.bind()

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` ``(P,)`` cut into one view per parameter, shaped like it."""
        return [view.view(p.shape) for view, p in zip(flat.split([p.numel() for p in self.params]), self.params)]

    def gather(self, tensors: list[Tensor], like: Tensor) -> Tensor:
        """One tensor per parameter (shaped like it) concatenated into a flat ``(P,)`` tensor of ``like``'s dtype and
        device."""
        return torch.cat([t.reshape(-1).to(like) for t in tensors])

    @torch.no_grad()
    def bind(self) -> None:
        """Make every parameter a view of :attr:`data` (keeping its value) with its gradient home in :attr:`grad`."""
        for p, data, grad in zip(self.params, self.data_views, self.grad_views):
            if p.data_ptr() != data.data_ptr():
                data.copy_(p)
                p.data = data
            if p.grad is not None and p.grad is not grad:
                grad.copy_(p.grad)
                p.grad = grad
            p.bind_grad_home(grad)

    def is_bound(self) -> bool:
        """Whether every parameter still lives in :attr:`data` (``model.to()`` moves them out)."""
        return all(p.data_ptr() == address and p.grad_home is grad
                   for p, address, grad in zip(self.params, self._addresses, self.grad_views))

    @torch.no_grad()
    def unbind(self) -> None:
        """Give every parameter (and gradient) storage of its own again, in float32 if there was a master copy."""
        masters = self.views(self.master) if self.master is not None else [None] * len(self.params)
        for p, master in zip(self.params, masters):
            grad = None if p.grad is None else p.grad.clone()
            p.grad = None
            p.bind_grad_home(None)
            p.data = master.clone() if master is not None else p.data.clone()
            p.grad = None if grad is None else grad.to(p.dtype)

    def collect_grads(self) -> None:
        """Bring every gradient home: one a layer assigned (``p.grad = g``) is copied into :attr:`grad`; one that is
        missing becomes zeros there (the update then treats it as a zero gradient)."""
        for p, home in zip(self.params, self.grad_views):
            if p.grad is home:
                continue
            if p.grad is None:
                home.zero_()
            else:
                home.copy_(p.grad)
            p.grad = home

    # ------------------------------------------------------------------ the update
    @property
    def values(self) -> Tensor:
        """``(P,)`` the values the optimizer's rule updates: :attr:`master` if there is one, else :attr:`data`."""
        return self.master if self.master is not None else self.data

    def update_grad(self) -> Tensor:
        """``(P,)`` the gradient the rule reads: :attr:`master_grad`, filled from :attr:`grad`, with a master copy;
        else :attr:`grad` itself."""
        if self.master_grad is None:
            return self.grad
        return self.master_grad.copy_(self.grad)

    @torch.no_grad()
    def after_update(self) -> None:
        """Round the updated master copy into :attr:`data`, which the layers compute with (no-op without one)."""
        if self.master is not None:
            self.data.copy_(self.master)

    @torch.no_grad()
    def master_state(self, state: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
        """``state`` (a model's ``state_dict``) with the entries ``names`` of the parameters (in order) replaced by
        copies of their float32 master values; ``state`` itself without a master copy."""
        if self.master is None:
            return dict(state)
        return {**state, **{name: view.clone() for name, view in zip(names, self.views(self.master))}}

    @torch.no_grad()
    def load_master(self, state: Mapping[str, Tensor], names: list[str]) -> None:
        """Set the master copy (and :attr:`data`) from the parameter entries ``names`` of ``state``, e.g. a checkpoint
        written with :meth:`master_state`; a no-op without a master copy."""
        if self.master is not None:
            self.master.copy_(self.gather([state[name] for name in names], self.master))
            self.after_update()


class FastLayout:
    """Binds the fast layout to a model: a :class:`Workspace` for it (and for ``extra`` modules, e.g. its loss) and
    its parameters, if any, in :class:`FlatParameters` — in the order of the ``optimizer`` group holding exactly them,
    which is then attached to them (:meth:`~nnbackprop.optim.Optimizer.attach_flat`) if it is one of nnbackprop's.

    Args:
        compute_dtype: the layers' dtype; a 16-bit one keeps float32 master weights (see :class:`FlatParameters`).

    Raises:
        ValueError: when the parameters cannot share one flat tensor (see :meth:`why_not`).
    """

    def __init__(self, model: Module, *extra: Module, optimizer: torch.optim.Optimizer | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        params = list(model.parameters())
        group_index = None
        for index, group in enumerate(optimizer.param_groups if optimizer is not None else []):
            if len(group["params"]) == len(params) and {id(p) for p in group["params"]} == {id(p) for p in params}:
                params, group_index = list(group["params"]), index
        self.names = [name for p in params for name, q in model.named_parameters() if q is p]
        self.flat = FlatParameters(params, compute_dtype) if params else None
        self.optimizer = optimizer if group_index is not None and isinstance(optimizer, Optimizer) else None
        if self.optimizer is not None:
            self.optimizer.attach_flat(self.flat, group_index)
        elif self.flat is not None and self.flat.master is not None:
            raise ValueError(f"mixed precision ({compute_dtype}) needs one of nnbackprop's optimizers over exactly the "
                             "model's parameters: it updates the float32 master weights")
        self.workspace = Workspace()
        self.modules = [m for root in (model, *extra) for m in root.modules()]
        for m in self.modules:
            m.bind_workspace(self.workspace)

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
            m.bind_workspace(None)
        if self.optimizer is not None:
            self.optimizer.detach_flat()
        if self.flat is not None:
            self.flat.unbind()
