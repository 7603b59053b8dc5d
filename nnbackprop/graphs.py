"""A training step replayed as a CUDA graph: each kind of step captured once, then one replay per batch.

A graph holds one batch shape, one train/eval mode per layer and one branch structure of the optimizer's rule (e.g.
with or without weight decay; before and after its state exists): the *key* of a step. The first ``warmup`` steps of
each key run eagerly on a side stream, the next is captured, and every later step of that key is a copy of ``x``/``y``
into static buffers and one replay. The optimizer's hyperparameters live in device tensors that are refreshed before
each replay, so a learning-rate schedule needs no recapture; ``load_state_dict`` of the model or the optimizer copies
into the tensors the graph reads. A batch larger than any before reallocates the workspace and drops every graph.

What a capture needs, and gets here: it runs on a stream of the step's own device (``cuda:N`` included), with
``capture_error_mode="thread_local"`` (a ``DataLoader``'s pin-memory thread may allocate meanwhile), after an eager
warm-up. A capture that fails (an op of a user's layer that a graph cannot hold) is abandoned at this boundary: the
capture is ended, the allocator is told so (torch before 2.12 forgot, pytorch#180395), the graph is reset and CUDA is
checked; the step then runs eagerly for good, with the reason in :attr:`GraphedStep.failure`. If CUDA is unusable after
it, :class:`~nnbackprop.errors.CudaGraphError` stops the run with one line.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from nnbackprop.errors import CudaGraphError, gist
from nnbackprop.layers import Dropout
from nnbackprop.module import Module
from nnbackprop.optim import Optimizer

StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

FIXED_IN = (2, 12)
"""The torch release whose ``capture_end`` ends the allocator's capture even when it fails."""


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


class CudaApi:
    """The ``torch.cuda`` calls a capture makes, on one device. Tests give :class:`GraphedStep` a stand-in to drive
    its logic on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def device_context(self) -> Any:
        return torch.cuda.device(self.device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device)

    def current_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def stream(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def end_allocation(self, graph: Any) -> None:
        """Tell the caching allocator that ``graph``'s capture is over (what a failed ``capture_end`` skips)."""
        torch._C._cuda_endAllocateToPool(self.device.index or 0, graph.pool())

    def check_usable(self) -> None:
        """Raise unless CUDA still works: a sync, an ``empty_cache`` (which asserts when a capture is thought to be
        under way) and a small kernel."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.ones(1, device=self.device).add_(1).item()


class _CaptureFailed(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(gist(cause))


class GraphedStep:
    """``run(x, y)`` (a step: the :class:`~nnbackprop.step.FastStep`'s eager one) replayed as CUDA graphs.

    Args:
        run: the eager step; it must allocate nothing new once warmed up (the fast layout's workspace).
        model: the model ``run`` trains (its train/eval modes, dropout generators and hooks matter).
        optimizer: the step's optimizer (nnbackprop's: its :meth:`~nnbackprop.optim.Optimizer.structure` is part of
            the key, and :meth:`~nnbackprop.optim.Optimizer.refresh_scalars` runs before each replay).
        workspace: the fast layout's workspace; a reallocation (its ``generation``) drops every graph.
        device: the CUDA device of the step.
        warmup: eager steps of each key before it is captured (at least 1).
        cuda: the ``torch.cuda`` calls to make (default :class:`CudaApi` on ``device``).

    Attributes:
        failure: why capturing failed (the step then runs eagerly), or ``None``.
    """

    def __init__(self, run: StepFn, model: Module, optimizer: Optimizer, workspace: Any, device: torch.device, *,
                 warmup: int = 3, cuda: CudaApi | None = None) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"graph_warmup must be an integer >= 1, got {warmup!r}")
        self.run, self.model, self.optimizer, self.workspace = run, model, optimizer, workspace
        self.warmup = warmup
        self.cuda = cuda or CudaApi(device)
        self.failure: str | None = None
        self.generators = [m.generator for m in model.modules() if isinstance(m, Dropout) and m.generator is not None]
        self._graphs: dict[tuple, tuple[Any, Tensor, Tensor, tuple[Tensor, Tensor]]] = {}
        self._eager_runs: dict[tuple, int] = {}
        self._generation = workspace.generation

    @property
    def num_graphs(self) -> int:
        """How many graphs are held (one per key seen since the last workspace reallocation)."""
        return len(self._graphs)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.failure is not None:
            return self.run(x, y)
        with self.cuda.device_context():
            if self.workspace.generation != self._generation:
                self._graphs.clear()
                self._generation = self.workspace.generation
            if self.optimizer.has_hooks() or any(m.hooked for m in self.model.modules()):
                return self._on_side_stream(x, y)  # a step someone watches (diagnostics) runs its hooks: eagerly
            key = (tuple(x.shape), tuple(m.training for m in self.model.modules()), self.optimizer.structure())
            entry = self._graphs.get(key)
            if entry is None:
                runs = self._eager_runs.get(key, 0)
                if runs < self.warmup:
                    self._eager_runs[key] = runs + 1
                    return self._on_side_stream(x, y)
                try:
                    entry = self._graphs[key] = self._capture(x, y)
                except _CaptureFailed as error:
                    self.failure = str(error)
                    return self.run(x, y)
            graph, static_x, static_y, (loss_sum, n_correct) = entry
            self.optimizer.refresh_scalars()
            static_x.copy_(x)
            static_y.copy_(y)
            graph.replay()
            return loss_sum.clone(), n_correct.clone()

    def _on_side_stream(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        side = self.cuda.new_stream()
        side.wait_stream(self.cuda.current_stream())
        with self.cuda.stream(side):
            result = self.run(x, y)
        self.cuda.current_stream().wait_stream(side)
        return result

    def _capture(self, x: Tensor, y: Tensor) -> tuple[Any, Tensor, Tensor, tuple[Tensor, Tensor]]:
        cuda = self.cuda
        static_x, static_y = x.clone(), y.clone()
        graph = cuda.new_graph()
        if self.generators and not hasattr(graph, "register_generator_state"):
            raise _CaptureFailed(RuntimeError(f"torch {torch.__version__} cannot capture a dropout layer's own "
                                              "generator; give Dropout generator=None"))
        for generator in self.generators:
            graph.register_generator_state(generator)
        cuda.synchronize()
        stream = cuda.new_stream()
        stream.wait_stream(cuda.current_stream())
        with cuda.stream(stream):  # restores the current stream whatever happens inside
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = self.run(static_x, static_y)
            except Exception as error:
                self._abandon(graph, ended=False)
                raise _CaptureFailed(error) from error
            try:
                graph.capture_end()
            except Exception as error:
                self._abandon(graph, ended=True)
                raise _CaptureFailed(error) from error
        cuda.current_stream().wait_stream(stream)
        return graph, static_x, static_y, outputs

    def _abandon(self, graph: Any, *, ended: bool) -> None:
        """End a failed capture so that the stream, the allocator and the graph leave capture mode; raise
        :class:`~nnbackprop.errors.CudaGraphError` if CUDA is unusable afterwards."""
        if not ended:
            try:
                graph.capture_end()  # ends the stream's capture; it raises, the capture being invalid
            except Exception:
                pass
        if _torch_version() < FIXED_IN:
            try:
                self.cuda.end_allocation(graph)
            except Exception:
                pass
        try:
            graph.reset()
        except Exception:
            pass
        try:
            self.cuda.check_usable()
        except Exception as error:
            raise CudaGraphError(f"capturing the training step as a CUDA graph failed and left CUDA unusable in this "
                                 f"process ({gist(error)}); run again without --cuda-graph") from error
