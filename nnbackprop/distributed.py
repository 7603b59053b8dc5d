r"""Data-parallel training over ``torch.distributed``: every rank holds the whole model and a shard of each batch.

With :math:`R` ranks and a global batch of :math:`B = R b` examples, rank :math:`r` computes the gradient
:math:`g_r = \frac{1}{b} \sum_{n \in \text{shard}_r} \nabla \ell_n` of the mean loss over its own :math:`b` examples.
The gradient hook replaces every :math:`g_r` by

.. math::
    \bar g = \frac{1}{R} \sum_{r} g_r = \frac{1}{B} \sum_{n \in \text{batch}} \nabla \ell_n,

the gradient of the mean loss over the global batch, with one ``all_reduce`` (sum) of the flat gradient and a
division. Every rank then applies the same optimizer update to the same weights, so the ranks stay identical and the
run equals a single process taking the same global batches (to rounding; except batch norm, whose batch statistics
stay per rank as in ``DistributedDataParallel`` without ``SyncBatchNorm``).

Launch with ``torchrun --nproc_per_node=R ...``: it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``, which :func:`init_distributed` reads. Without them it returns a single-process context and every
helper here becomes the identity.

Failures: the process group is created with a bounded ``timeout_s``. A rank that never joins makes the others' start-up
fail after ``timeout_s``; on CPU (gloo) a rank that exits makes the others' next collective fail at once, and one
that stops calling collectives makes them fail after ``timeout_s``. Both surface as a ``RuntimeError`` naming the rank,
the world size and the timeout. On CUDA (NCCL) collectives run asynchronously, so a stuck collective is caught by
NCCL's watchdog after ``timeout_s``, which aborts the process; torchrun then stops the other ranks.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from nnbackprop.device import make_current, resolve_device
from nnbackprop.errors import DistributedError, gist
from nnbackprop.module import Module

DEFAULT_TIMEOUT_S = 1800.0
"""How long a rank waits for the others, at start-up and at each collective, before it fails: generous (torch's own
default for gloo), because a busy machine can take minutes to start a rank, load and decode its data set, or let
rank 0 alone write a large checkpoint, and none of that is a hang. A rank that dies is noticed at once on the CPU."""

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run.

    Attributes:
        rank: this process's index in ``[0, world_size)``.
        world_size: number of processes.
        local_rank: index among the processes on this machine; a CUDA rank uses ``cuda:local_rank``.
        device: where this rank keeps its model and batches.
        backend: ``"nccl"`` (CUDA) or ``"gloo"`` (CPU); ``None`` for a single process not started by torchrun.
        timeout_s: how long a collective waits for the other ranks before failing.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (the process was started by torchrun)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that logs and writes checkpoints and results."""
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer; launch with torchrun") from None


def _device(device_arg: str, local_rank: int, distributed: bool) -> torch.device:
    """:func:`resolve_device`, except that a distributed CUDA rank uses ``cuda:local_rank``."""
    device = resolve_device(device_arg)
    if device.type == "cpu" or not distributed:
        return device
    if device_arg not in ("auto", "cuda"):
        raise ValueError(
            f"device '{device_arg}': under torchrun each rank uses cuda:LOCAL_RANK; pass 'cuda' (or 'auto') and choose "
            "the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if local_rank >= torch.cuda.device_count():
        raise DistributedError(
            f"LOCAL_RANK {local_rank} needs GPU cuda:{local_rank} but only {torch.cuda.device_count()} are visible; "
            f"start at most {torch.cuda.device_count()} processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device_arg: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group described by torchrun's environment, or return a single-process context.

    Under torchrun, the backend follows the device: ``nccl`` with each rank on ``cuda:LOCAL_RANK`` (made the current
    device), ``gloo`` on CPU. Call :func:`cleanup` at the end, also on failure.

    Args:
        device_arg: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` only for a single process).
        timeout_s: how long start-up and each collective wait for the other ranks before raising.

    Raises:
        ValueError: incomplete or invalid torchrun environment, or an unsupported device.
        RuntimeError: CUDA requested but unavailable, or the group could not be formed within ``timeout_s``
            (a rank never started, died, or cannot reach ``MASTER_ADDR:MASTER_PORT``).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return DistContext(device=_device(device_arg, 0, distributed=False), timeout_s=timeout_s)
    present = [name for name in _ENV if name in os.environ]
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"incomplete distributed environment: {', '.join(present)} set but {', '.join(missing)} missing. "
            "Launch with torchrun --nproc_per_node=N, or unset these variables for a single process."
        )
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}")
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed support; run one process, without torchrun")
    if dist.is_initialized():
        raise DistributedError("the torch.distributed process group is already initialised; call cleanup() first")
    device = _device(device_arg, local_rank, distributed=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        make_current(device)
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    # torch._dynamo (which torch.optim imports on first use) keeps references to a process group that exists when it
    # is imported, and the group then outlives destroy_process_group: its threads live on until the interpreter exits,
    # where tearing them down aborts the process now and then ("terminate called without an active exception", 1 run
    # in 22 here). Imported first, it never sees the group.
    importlib.import_module("torch._dynamo")
    try:
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
        # Every rank finishes joining before any goes on: a rank that went on and failed at once (a checkpoint it
        # refuses) would close its connections under a rank still joining, which then reports a broken group.
        dist.barrier()
    except RuntimeError as err:
        raise DistributedError(
            f"rank {rank} of {world_size}: the process group at {address} did not form within the {timeout_s:g} s "
            f"timeout: {gist(err)}. All {world_size} ranks must be started (torchrun) and reach the master "
            "address; look for an earlier error in the other ranks' output."
        ) from err
    return DistContext(rank, world_size, local_rank, device, backend, timeout_s)


GLOO_DESTRUCTOR_HOLDS_GIL = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 8)
"""Before torch 2.8 (pytorch#154976) a gloo group's destructor holds the GIL while it joins its worker threads, and a
worker still freeing a collective's tensor that only it holds needs the GIL to do so: a deadlock."""


def cleanup(wait: bool = False) -> None:
    """Leave the process group, if one was initialised; safe to call more than once.

    With ``wait`` (when this rank has finished its work) the ranks first wait for each other: gloo aborts a process
    ("terminate called without an active exception") that tears down its group while a peer's is already gone. On
    gloo the last collective before that barrier is on a tensor held here until the group is gone, so that no worker
    frees a tensor while the group is destroyed (:data:`GLOO_DESTRUCTOR_HOLDS_GIL`; seen on torch 2.4.1: a rank stuck
    in ``destroy_process_group`` for good, after its run was written). Without ``wait`` (after a failure, when a
    collective may still hold its tensor) such a torch leaves the gloo group to the process's exit."""
    if dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        if wait:
            if gloo:
                held = torch.zeros(1)  # alive until this function returns, after the group is destroyed
                dist.all_reduce(held)
            dist.barrier()
        elif gloo and GLOO_DESTRUCTOR_HOLDS_GIL:
            return
        dist.destroy_process_group()


@contextlib.contextmanager
def _collective(ctx: DistContext, what: str) -> Iterator[None]:
    """Turn a failed collective into a ``RuntimeError`` that says which rank waited for what, and for how long."""
    try:
        yield
    except RuntimeError as err:
        raise DistributedError(
            f"rank {ctx.rank} of {ctx.world_size}: {what} failed: another rank exited or did not reach it within the "
            f"{ctx.timeout_s:g} s timeout ({gist(err)}). Look for the first error in the other ranks' output."
        ) from err


def all_reduce_mean_hook(ctx: DistContext) -> Callable[[Tensor], None] | None:
    """The gradient hook of data-parallel training: average the flat gradient over the ranks, in place.

    The hook takes ``flat_grads`` ``(P,)``, all parameter gradients of this rank concatenated, and leaves
    :math:`\\frac{1}{R} \\sum_r` ``flat_grads_r`` in it on every rank (one ``all_reduce``). Returns ``None`` for a
    single process, where there is nothing to average (pass it on as ``grad_hook``).
    """
    if not ctx.distributed:
        return None

    def hook(flat_grads: Tensor) -> None:
        with _collective(ctx, "the gradient all_reduce"):
            dist.all_reduce(flat_grads, op=dist.ReduceOp.SUM)
        flat_grads.div_(ctx.world_size)

    return hook


def reduce_metrics(ctx: DistContext, *metrics: Tensor) -> tuple[Tensor, ...]:
    """Sum scalar metrics over the ranks with one ``all_reduce``, e.g. ``(loss_sum, n_correct, n_samples)``.

    Each metric is a 0-dim (or one-element) tensor; the sums come back as 0-dim tensors with each input's dtype on
    ``ctx.device``, the same on every rank. They are summed in float64, exact for counts below :math:`2^{53}`.
    Single process: the metrics, unchanged.
    """
    if not ctx.distributed:
        return metrics
    for m in metrics:
        if m.numel() != 1:
            raise ValueError(f"reduce_metrics takes scalar tensors, got one of shape {tuple(m.shape)}")
    packed = torch.stack([m.detach().reshape(()).to(ctx.device, torch.float64) for m in metrics])  # (M,)
    with _collective(ctx, "the metrics all_reduce"):
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return tuple(total.to(m.dtype) for total, m in zip(packed.unbind(), metrics))


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a picklable value, e.g. a generator state), by rank, on every rank: ``[obj]`` for a
    single process."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    with _collective(ctx, "gathering per-rank state"):
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_module(ctx: DistContext, model: Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers into every rank's ``model``, in place.

    Call it once after building the model (so all ranks start from the same weights whatever their random state), and
    before evaluating or saving a model with batch norm, whose running statistics drift apart per rank.
    """
    if not ctx.distributed:
        return
    tensors = [p.data for p in model.parameters()] + [b for _, b in model.named_buffers()]
    with _collective(ctx, f"broadcasting the model from rank {src}"):
        for t in tensors:
            dist.broadcast(t, src)


def eval_shard(split: Any, ctx: DistContext) -> Any:
    """Rank ``r``'s examples ``r, r + R, r + 2R, …`` of an evaluation split (all of them for a single process), so the
    ranks together see every example exactly once."""
    if ctx.world_size == 1:
        return split
    return split.subset(torch.arange(ctx.rank, len(split), ctx.world_size))


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Each rank's share ``b = B / R`` of the global batch ``B``.

    Raises:
        ValueError: when ``B`` is not a positive multiple of ``R``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if global_batch < 1:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    if global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} does not divide among {world_size} ranks; use a multiple of {world_size}"
        )
    return global_batch // world_size


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream (dropout masks), derived from the run's ``seed``.

    Rank 0 keeps ``seed`` (for ``seed`` in :math:`[0, 2^{63})`), so a single process draws the same masks as before;
    rank ``r`` adds ``r`` times :math:`\\lfloor 2^{64} / \\varphi \\rfloor` modulo :math:`2^{63}`, which spreads the
    ranks' seeds far apart. Model weights must *not* use it: every rank builds the model from ``seed`` (and
    :func:`broadcast_module` makes sure).
    """
    if rank < 0:
        raise ValueError(f"rank must be non-negative, got {rank}")
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**63
