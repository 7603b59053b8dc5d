"""Training: fit an MLP with mini-batch SGD, evaluate it, stop early, and keep checkpoints.

:func:`train` runs one experiment described by a :class:`TrainConfig`. It loads the data, builds the model, the loss,
the optimizer and the learning-rate schedule, then, for each epoch:

1. takes one optimisation step per mini-batch of the shuffled training split (a :class:`TrainStep`), after the
   optional augmentation of the batch (:func:`~nnbackprop.augment.augment_batch`), and steps the schedule;
2. evaluates the model on the validation split and keeps the weights with the lowest validation loss
   (:class:`EarlyStopping`); stops when it has not improved for ``patience`` epochs;
3. writes a checkpoint (:mod:`nnbackprop.checkpoint`) and the metrics so far.

At the end the best weights are put back into the model and evaluated on the test split, once.

Losses and correct-prediction counts are summed on the device and read once per ``log_every`` steps: that read is
also the guard against divergence, which raises :class:`NonFiniteLossError` (naming the epoch and the steps) as soon as
the summed loss is NaN or infinite, before anything is written, so the last checkpoint stays the last good one.

The library never prints: it reports through a :class:`TrainCallback` (the command line passes one that prints a line
per epoch and draws progress bars).

Files in ``out_dir``: ``checkpoint.pt`` (written every epoch; ``resume=True`` continues from it exactly, bit for bit on
the CPU), ``metrics.jsonl`` (one JSON object per epoch, see :class:`EpochMetrics`) and ``summary.json`` (test result,
best epoch, wall time, configuration, data source).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor

from nnbackprop.augment import augment_batch
from nnbackprop.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from nnbackprop.data import DataSplits, Loader, SplitData, load_dataset, make_loader
from nnbackprop.distributed import (DistContext, all_reduce_mean_hook, broadcast_module, gather_objects,
                                    local_batch_size, rank_seed, reduce_metrics, resolve_device)
from nnbackprop.fast import FastStep
from nnbackprop.layers import LINEAR_INITS, Dropout
from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from nnbackprop.lr_scheduler import SCHEDULES, LRScheduler, make_scheduler
from nnbackprop.model import ACTIVATIONS, Sequential, mlp
from nnbackprop.module import Module
from nnbackprop.optim import SGD

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_BATCH_SIZE = 1000
LOSSES: dict[str, type[Loss]] = {"ce": CrossEntropyLoss, "mse": MSELoss, "bce": BCEWithLogitsLoss}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
RESUMABLE_CHANGES = ("epochs", "patience", "fast", "log_every", "data_dir", "download", "device")
"""Settings a resumed run may change; every other one must equal the checkpoint's."""

GradHook = Callable[[Tensor], None]


# ------------------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved in each checkpoint and in ``summary.json``.

    Data:
        dataset: a name for :func:`~nnbackprop.data.load_dataset` (``fashion-mnist``, ``mnist``, ``cifar10-catdog``,
            ``imagefolder:PATH``). data_dir, download, val_size, image_size: passed to it (``val_size`` examples of
            the training data are held out for validation and early stopping; 0 for none).

    Model: ``mlp(prod(input_shape), hidden, classes)`` with ``activation``, ``dropout``, ``batchnorm`` and ``init``
        (see :func:`~nnbackprop.model.mlp`). ``loss``: ``ce`` (softmax cross-entropy), ``mse`` (squared error to
        one-hot targets) or ``bce`` (one logit, binary cross-entropy; two-class data only).

    Optimisation: SGD with ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` for ``epochs`` epochs of mini-batches
        of ``batch_size``; the learning rate follows ``schedule`` (``constant``, ``step``: times ``gamma`` every
        ``step_epochs`` epochs, default a third of the run; ``cosine``: down to 0 at the end), after a linear warm-up
        of ``warmup_epochs`` epochs, all stepped once per batch. ``patience``: stop after that many epochs without a
        lower validation loss (``None``: never stop early; the best epoch's weights are still the ones kept).
        ``shift``, ``flip``: augment each training batch with random shifts of up to ``shift`` pixels and random
        horizontal flips.

    Run: ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``), ``dtype`` (``float32`` or ``float64``), ``seed`` (initial
        weights from a CPU generator seeded with it, so they are the same on every device; shuffling from ``seed``
        and the epoch; dropout masks and augmentation from a generator on the device seeded with ``seed + 1``),
        ``fast`` (use :class:`~nnbackprop.fast.FastStep` when it supports the model), ``log_every`` (steps between
        reads of the running loss: progress reports and the divergence check).
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    val_size: int = 5000
    image_size: int = 32
    hidden: tuple[int, ...] = (512, 512)
    activation: str = "relu"
    dropout: float = 0.0
    batchnorm: bool = False
    init: str = "default"
    loss: str = "ce"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    step_epochs: int | None = None
    gamma: float = 0.1
    patience: int | None = None
    shift: int = 0
    flip: bool = False
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    fast: bool = True
    log_every: int = 50

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def integer(value: Any, minimum: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

        def real(value: Any, minimum: float, strict: bool = False) -> bool:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            return ok and (value > minimum if strict else value >= minimum)

        need(isinstance(self.dataset, str) and bool(self.dataset), f"dataset must be a name, got {self.dataset!r}")
        need(integer(self.val_size, 0), f"val_size must be an integer >= 0, got {self.val_size!r}")
        need(integer(self.image_size, 1), f"image_size must be an integer >= 1, got {self.image_size!r}")
        need(all(integer(h, 1) for h in self.hidden), f"hidden sizes must be integers >= 1, got {list(self.hidden)}")
        need(self.activation in ACTIVATIONS,
             f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        need(real(self.dropout, 0.0) and self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        need(self.init in LINEAR_INITS, f"unknown init {self.init!r}; choose one of {', '.join(LINEAR_INITS)}")
        need(self.loss in LOSSES, f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        need(integer(self.epochs, 1), f"epochs must be an integer >= 1, got {self.epochs!r}")
        need(integer(self.batch_size, 1), f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        need(real(self.lr, 0.0, strict=True), f"lr must be a finite number > 0, got {self.lr!r}")
        need(real(self.momentum, 0.0), f"momentum must be a finite number >= 0, got {self.momentum!r}")
        need(not self.nesterov or (real(self.momentum, 0.0, strict=True)),
             "nesterov needs a momentum > 0")
        need(real(self.weight_decay, 0.0), f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        need(real(self.warmup_epochs, 0.0), f"warmup_epochs must be a number >= 0, got {self.warmup_epochs!r}")
        need(self.step_epochs is None or integer(self.step_epochs, 1),
             f"step_epochs must be an integer >= 1, got {self.step_epochs!r}")
        need(real(self.gamma, 0.0, strict=True), f"gamma must be a finite number > 0, got {self.gamma!r}")
        need(self.patience is None or integer(self.patience, 1),
             f"patience must be an integer >= 1 (or None), got {self.patience!r}")
        need(integer(self.shift, 0), f"shift must be an integer >= 0 (pixels), got {self.shift!r}")
        need(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        need(integer(self.seed, 0), f"seed must be an integer >= 0, got {self.seed!r}")
        need(integer(self.log_every, 1), f"log_every must be an integer >= 1, got {self.log_every!r}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some settings changed (and checked again)."""
        return dataclasses.replace(self, **changes)


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                device: torch.device | str = "cpu", dropout_generator: torch.Generator | None = None) -> Sequential:
    """The MLP of ``config`` for inputs of ``input_shape`` ``(C, H, W)`` and ``num_classes`` classes.

    The initial weights are drawn on the CPU from a generator seeded with ``config.seed`` (so they do not depend on
    the device), then moved to ``device``. The dropout masks are drawn from ``dropout_generator`` (``None``: torch's
    global generator).
    """
    if config.loss == "bce" and num_classes != 2:
        raise ValueError(f"loss 'bce' (one logit) needs a two-class data set, this one has {num_classes} classes; "
                         "use loss 'ce'")
    model = mlp(math.prod(input_shape), config.hidden, 1 if config.loss == "bce" else num_classes,
                activation=config.activation, dropout=config.dropout, batchnorm=config.batchnorm, init=config.init,
                dtype=DTYPES[config.dtype], generator=torch.Generator().manual_seed(config.seed))
    for m in model.modules():
        if isinstance(m, Dropout):
            m.generator = dropout_generator
    return model.to(device)


def build_loss(config: TrainConfig) -> Loss:
    """The loss of ``config`` with mean reduction."""
    return LOSSES[config.loss]()


# ------------------------------------------------------------------------------------------------------ one step


class TrainStep(Protocol):
    """One optimisation step; :class:`SimpleStep` is the readable reference, :class:`~nnbackprop.fast.FastStep` the
    fast one (flat parameters, preallocated buffers, no host sync)."""

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimisation step on ``(x (N, ...), y (N,) int64)``: forward, loss, backward, ``grad_hook`` (if any),
        optimizer update. Returns ``(loss_sum, n_correct)`` as 0-dim tensors on the device, without a host sync:
        the mean loss times ``N``, and the number of correct predictions (see :func:`num_correct`)."""
        ...


def num_correct(output: Tensor, target: Tensor) -> Tensor:
    """How many predictions are right, as a 0-dim int64 tensor on the device.

    ``output (N, C)``: the class with the largest output (argmax); ``output (N,)`` or ``(N, 1)``, one logit of a
    binary task: class 1 when the logit is positive.
    """
    if output.dim() == 2 and output.shape[1] > 1:
        predicted = output.argmax(1)
    else:
        predicted = (output.reshape(-1) > 0).long()
    return (predicted == target).sum()


class SimpleStep:
    """The training step written out: ``zero_grad``, forward, loss, hand-written backward, ``grad_hook``, update.

    Args:
        model: the network; its ``backward`` fills ``param.grad``.
        loss_fn: a :class:`~nnbackprop.losses.Loss` with mean reduction.
        optimizer: updates ``model.parameters()`` from their gradients.
        grad_hook: called with ONE flat tensor ``(P,)`` of all parameter gradients in ``model.parameters()`` order,
            which it may change in place (data-parallel training averages it over the ranks); the result is copied
            back into ``param.grad`` before the update.
    """

    def __init__(self, model: Module, loss_fn: Loss, optimizer: SGD, grad_hook: GradHook | None = None) -> None:
        self.model, self.loss_fn, self.optimizer, self.grad_hook = model, loss_fn, optimizer, grad_hook
        self.params = list(model.parameters())

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad()
        output = self.model(x)
        loss = self.loss_fn(output, y)
        self.model.backward(self.loss_fn.backward())
        if self.grad_hook is not None:
            grads = [p.grad for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
            self.grad_hook(flat)
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))
        self.optimizer.step()
        return loss * x.shape[0], num_correct(output, y)


def make_step(model: Module, loss_fn: Loss, optimizer: SGD, *, fast: bool = True,
              grad_hook: GradHook | None = None) -> TrainStep:
    """``FastStep`` when ``fast`` and it supports ``model`` and ``loss_fn``, otherwise :class:`SimpleStep`."""
    if fast and FastStep.supports(model, loss_fn):
        return FastStep(model, loss_fn, optimizer, grad_hook)
    return SimpleStep(model, loss_fn, optimizer, grad_hook)


# ------------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(model: Module, loss_fn: Loss, loader: Loader, dist: DistContext | None = None) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` over every batch of ``loader``, in evaluation mode (dropout off, batch
    norm on running statistics); the model's previous mode is restored. One host sync, at the end.

    In a data-parallel run (``dist``) each rank evaluates its own shard of the split (:func:`eval_shard`) and the sums
    are reduced over the ranks, so every rank gets the metrics of the whole split."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    for x, y in loader:
        output = model(x)
        loss_sum += loss_fn(output, y).double() * len(y)
        correct += num_correct(output, y)
    model.train(was_training)
    count = torch.tensor(loader.num_samples, dtype=torch.int64, device=loader.device)
    if dist is not None:
        loss_sum, correct, count = reduce_metrics(dist, loss_sum, correct, count)
    n = int(count)
    if n == 0:
        raise ValueError("evaluate: the loader has no examples")
    return loss_sum.item() / n, correct.item() / n


def eval_shard(split: SplitData, dist: DistContext | None) -> SplitData:
    """Rank ``r``'s examples ``r, r + R, r + 2R, …`` of an evaluation split (all of them for a single process), so the
    ranks together see every example exactly once."""
    if dist is None or dist.world_size == 1:
        return split
    return split.subset(torch.arange(dist.rank, len(split), dist.world_size))


class EarlyStopping:
    """Keeps the weights of the epoch with the lowest validation loss, and says when to stop.

    Args:
        patience: stop once the validation loss has not gone below its best for ``patience`` epochs in a row
            (``None``: never).

    Attributes:
        best_loss, best_epoch, best_state: the lowest validation loss so far, its epoch and a copy of the model's
            ``state_dict`` then (``inf``, ``None``, ``None`` before the first epoch).
        bad_epochs: epochs since ``best_epoch``.
    """

    def __init__(self, patience: int | None = None) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, val_loss: float, model: Module) -> bool:
        """Record epoch ``epoch``'s validation loss; return whether it is a new best (its weights are then kept)."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.best_state, self.bad_epochs = val_loss, epoch, model.state_dict(), 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights (which a checkpoint keeps as ``best_model``)."""
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any], best_state: dict[str, Tensor] | None) -> None:
        self.best_loss, self.best_epoch, self.bad_epochs = state["best_loss"], state["best_epoch"], state["bad_epochs"]
        self.best_state = best_state


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss (or the weights) became NaN or infinite.

    Attributes:
        epoch: the epoch it happened in; first_step, last_step: the range of steps (1-based, of ``num_steps`` in the
            epoch) it happened in; checkpoint: the last good checkpoint, untouched (``None`` if none was written);
            last_good_epoch: the epoch that checkpoint holds (0: none).
    """

    def __init__(self, what: str, epoch: int, first_step: int, last_step: int, num_steps: int,
                 checkpoint: Path | None, last_good_epoch: int) -> None:
        self.epoch, self.first_step, self.last_step = epoch, first_step, last_step
        self.checkpoint, self.last_good_epoch = checkpoint, last_good_epoch
        steps = f"step {last_step}" if first_step == last_step else f"steps {first_step}-{last_step}"
        kept = (f"the last good checkpoint, {checkpoint} (epoch {last_good_epoch}), was kept" if checkpoint and
                last_good_epoch else "no checkpoint was written")
        super().__init__(f"{what} became non-finite in epoch {epoch}, {steps} of {num_steps}; training stopped and "
                         f"{kept}")


# ------------------------------------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class EpochMetrics:
    """One line of ``metrics.jsonl``. Accuracies are fractions in ``[0, 1]``; ``val_*`` are ``None`` without a
    validation split; ``lr`` is the learning rate of the epoch's last step; ``seconds`` covers training and
    validation, ``samples_per_s`` the training alone."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    lr: float
    seconds: float
    samples_per_s: float


@dataclass(frozen=True)
class RunInfo:
    """What :meth:`TrainCallback.on_train_begin` is told about the run."""

    config: TrainConfig
    data: DataSplits
    model: Module
    num_parameters: int
    device: torch.device
    step: str
    steps_per_epoch: int
    start_epoch: int
    checkpoint: Path | None


@dataclass
class TrainResult:
    """What :func:`train` returns. ``model`` holds the best weights (lowest validation loss; the last epoch's without
    a validation split); ``history`` has one :class:`EpochMetrics` per epoch trained, resumed runs included."""

    model: Module
    history: list[EpochMetrics]
    best_epoch: int | None
    stopped_early: bool
    test_loss: float
    test_accuracy: float
    wall_time: float
    summary: dict[str, Any] = field(repr=False)


class TrainCallback:
    """Hooks through which :func:`train` reports; each does nothing here. Subclass to print, plot or record."""

    def on_train_begin(self, info: RunInfo) -> None:
        """Before the first epoch (also when resuming; ``info.start_epoch`` epochs are already done)."""

    def on_epoch_begin(self, epoch: int, num_steps: int) -> None:
        """Before the ``num_steps`` steps of epoch ``epoch`` (1-based)."""

    def on_step(self, epoch: int, step: int, running_loss: float | None) -> None:
        """After each step; ``running_loss`` (the mean training loss of the epoch so far) every ``log_every`` steps
        and at the last step of the epoch, ``None`` in between."""

    def on_epoch_end(self, metrics: EpochMetrics) -> None:
        """After an epoch's validation, once its checkpoint is written."""

    def on_train_end(self, result: TrainResult) -> None:
        """After the test evaluation."""


# ------------------------------------------------------------------------------------------------------ the loop


def train(config: TrainConfig, data: DataSplits | None = None, *, out_dir: str | Path | None = None,
          resume: bool = False, overwrite: bool = False, callback: TrainCallback | None = None,
          dist: DistContext | None = None) -> TrainResult:
    """Train the model described by ``config``; see the module docstring for the procedure.

    Args:
        config: the run's settings.
        data: the splits to train on; by default loaded with :func:`~nnbackprop.data.load_dataset` from ``config``.
        out_dir: where ``checkpoint.pt``, ``metrics.jsonl`` and ``summary.json`` go (created if needed); ``None``
            writes nothing.
        resume: continue the run whose checkpoint is in ``out_dir``. The settings must be the checkpoint's, except
            those in :data:`RESUMABLE_CHANGES` (``epochs`` may grow unless the schedule depends on it).
        overwrite: start afresh even though ``out_dir`` holds a checkpoint (otherwise an error).
        callback: receives progress and metrics.
        dist: the data-parallel context from :func:`~nnbackprop.distributed.init_distributed` when launched by
            ``torchrun``. ``batch_size`` is then the global batch, each rank training on its shard of every batch
            with the gradients averaged over the ranks (one ``all_reduce`` per step), dropout masks drawn per rank,
            and validation and test metrics reduced over the ranks. Only rank 0 reports to ``callback`` and writes
            files; a checkpoint resumes on the same number of ranks.

    Raises:
        ValueError: bad settings, or data that does not fit them. CheckpointError (a ValueError): an unreadable
            checkpoint, or one written with other settings. FileExistsError: ``out_dir`` holds a checkpoint and
            neither ``resume`` nor ``overwrite`` is set. DatasetNotFoundError: no data. NonFiniteLossError: the
            training diverged.
    """
    started = time.perf_counter()
    dist = dist or DistContext()
    callback = callback if callback is not None and dist.is_main else TrainCallback()
    device = dist.device if dist.distributed else resolve_device(config.device)
    local_batch_size(config.batch_size, dist.world_size)
    out = Path(out_dir) if out_dir is not None else None
    checkpoint_path = out / CHECKPOINT_FILE if out is not None else None
    writes = out is not None and dist.is_main
    saved = _checkpoint_to_resume(checkpoint_path, config, device, dist.world_size) if resume else None
    if not resume and checkpoint_path is not None and checkpoint_path.exists() and not overwrite:
        raise FileExistsError(f"{checkpoint_path} already exists: resume that run (--resume), start over "
                              "(--overwrite), or write to another directory (--out)")
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.download, config.val_size, config.seed,
                            config.image_size)
    if saved is not None:
        _check_same_data(saved["data"], _data_info(data), checkpoint_path)
    if len(data.val) == 0 and config.patience is not None:
        raise ValueError("early stopping (patience) needs a validation split; set val_size > 0")
    if writes:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in (CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE):
                (out / name).unlink(missing_ok=True)

    torch.manual_seed(config.seed)
    dtype = DTYPES[config.dtype]
    # Dropout masks and augmentation: a stream of their own per rank (rank 0's is a single process's).
    generator = torch.Generator(device).manual_seed(rank_seed(config.seed + 1, dist.rank))
    model = build_model(config, data.input_shape, data.num_classes, device, generator)
    broadcast_module(dist, model)
    loss_fn = build_loss(config)
    optimizer = SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                    weight_decay=config.weight_decay)
    train_loader = make_loader(data.train, config.batch_size, mean=data.mean, std=data.std, device=device,
                               dtype=dtype, shuffle=True, seed=config.seed, rank=dist.rank, world_size=dist.world_size,
                               drop_last=config.batchnorm and len(data.train) % config.batch_size == 1)
    val_loader = (make_loader(eval_shard(data.val, dist), EVAL_BATCH_SIZE, mean=data.mean, std=data.std,
                              device=device, dtype=dtype) if len(data.val) else None)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training split of {data.name} is empty")
    scheduler = _make_scheduler(config, optimizer, steps_per_epoch)
    early = EarlyStopping(config.patience)
    history: list[EpochMetrics] = []
    elapsed_before = 0.0
    if saved is not None:
        elapsed_before = _restore(saved, checkpoint_path, model, optimizer, scheduler, early, generator, history,
                                  dist.rank)
    step = make_step(model, loss_fn, optimizer, fast=config.fast, grad_hook=all_reduce_mean_hook(dist))
    start_epoch = len(history)
    num_parameters = sum(p.data.numel() for p in model.parameters())

    callback.on_train_begin(RunInfo(config, data, model, num_parameters, device, type(step).__name__, steps_per_epoch,
                                    start_epoch, checkpoint_path))
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if early.should_stop:
            break
        epoch_start = time.perf_counter()
        loss, accuracy, lr = _train_epoch(step, train_loader, epoch, config, scheduler, generator, callback,
                                          checkpoint_path, len(history), dist)
        train_seconds = time.perf_counter() - epoch_start
        if not all(bool(p.data.isfinite().all()) for p in model.parameters()):
            raise NonFiniteLossError("the weights", epoch, steps_per_epoch, steps_per_epoch, steps_per_epoch,
                                     checkpoint_path, len(history))
        val_loss = val_accuracy = None
        broadcast_module(dist, model)  # batch-norm running averages are per rank: take rank 0's
        if val_loader is not None:
            val_loss, val_accuracy = evaluate(model, loss_fn, val_loader, dist)
            if not math.isfinite(val_loss):
                raise NonFiniteLossError("the validation loss", epoch, steps_per_epoch, steps_per_epoch,
                                         steps_per_epoch, checkpoint_path, len(history))
            early.update(epoch, val_loss, model)
        history.append(EpochMetrics(epoch, loss, accuracy, val_loss, val_accuracy, lr,
                                    time.perf_counter() - epoch_start, train_loader.num_samples * dist.world_size / train_seconds))
        generators = gather_objects(dist, generator.get_state()) if out is not None else []
        if writes:
            elapsed = elapsed_before + time.perf_counter() - started
            save_checkpoint(checkpoint_path, _checkpoint(config, data, model, optimizer, scheduler, early, generators,
                                                         history, device, elapsed, dist.world_size))
            _write_text(out / METRICS_FILE, "".join(json.dumps(asdict(m)) + "\n" for m in history))
        callback.on_epoch_end(history[-1])

    if early.best_state is not None:
        model.load_state_dict(early.best_state)
    test_loader = make_loader(eval_shard(data.test, dist), EVAL_BATCH_SIZE, mean=data.mean, std=data.std,
                              device=device, dtype=dtype)
    test_loss, test_accuracy = evaluate(model, loss_fn, test_loader, dist)
    wall_time = elapsed_before + time.perf_counter() - started
    stopped_early = early.should_stop and len(history) < config.epochs
    summary = {
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "best_epoch": early.best_epoch,
        "epochs_trained": len(history),
        "stopped_early": stopped_early,
        "best_val_loss": early.best_loss if early.best_epoch is not None else None,
        "wall_time_s": wall_time,
        "step": type(step).__name__,
        "device": str(device),
        "world_size": dist.world_size,
        "num_parameters": num_parameters,
        "torch": str(torch.__version__),
        "data": _data_info(data),
        "config": asdict(config),
    }
    if writes:
        _write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    result = TrainResult(model, history, early.best_epoch, stopped_early, test_loss, test_accuracy, wall_time, summary)
    callback.on_train_end(result)
    return result


def _train_epoch(step: TrainStep, loader: Loader, epoch: int, config: TrainConfig, scheduler: LRScheduler,
                 generator: torch.Generator, callback: TrainCallback, checkpoint_path: Path | None,
                 last_good_epoch: int, dist: DistContext) -> tuple[float, float, float]:
    """One pass over ``loader``; returns the epoch's mean training loss, accuracy and last learning rate, over all
    ranks (the running loss is reduced at each ``log_every`` read, so all ranks stop together on divergence)."""
    loader.set_epoch(epoch)
    num_steps = len(loader)
    callback.on_epoch_begin(epoch, num_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    seen = torch.zeros((), dtype=torch.int64, device=loader.device)
    checked = 0
    lr = scheduler.get_last_lr()[0]
    for i, (x, y) in enumerate(loader, start=1):
        if config.shift or config.flip:
            x = augment_batch(x, shift=config.shift, flip=config.flip, generator=generator)
        lr = scheduler.get_last_lr()[0]
        batch_loss, batch_correct = step(x, y)
        scheduler.step()
        loss_sum += batch_loss
        correct += batch_correct
        seen += len(y)
        running = None
        if i % config.log_every == 0 or i == num_steps:
            total, count = reduce_metrics(dist, loss_sum, seen)
            running = total.item() / count.item()
            if not math.isfinite(running):
                raise NonFiniteLossError("the training loss", epoch, checked + 1, i, num_steps, checkpoint_path,
                                         last_good_epoch)
            checked = i
        callback.on_step(epoch, i, running)
    loss_sum, correct, seen = reduce_metrics(dist, loss_sum, correct, seen)
    return loss_sum.item() / seen.item(), correct.item() / seen.item(), lr


def _make_scheduler(config: TrainConfig, optimizer: SGD, steps_per_epoch: int) -> LRScheduler:
    step_epochs = config.step_epochs or max(1, config.epochs // 3)
    return make_scheduler(config.schedule, optimizer, total_steps=config.epochs * steps_per_epoch,
                          warmup_steps=round(config.warmup_epochs * steps_per_epoch),
                          step_size=step_epochs * steps_per_epoch, gamma=config.gamma)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


# ------------------------------------------------------------------------------------------------------ checkpoints


def _data_info(data: DataSplits) -> dict[str, Any]:
    """What a checkpoint records about the data: enough to rebuild the model and normalise new inputs alike."""
    return {"name": data.name, "source": data.source, "classes": list(data.classes),
            "input_shape": list(data.input_shape), "mean": list(data.mean), "std": list(data.std),
            "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}}


def _rng_states(generators: list[Tensor]) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "generators": generators}


def _checkpoint(config: TrainConfig, data: DataSplits, model: Module, optimizer: SGD, scheduler: LRScheduler,
                early: EarlyStopping, generators: list[Tensor], history: list[EpochMetrics], device: torch.device,
                elapsed: float, world_size: int) -> dict[str, Any]:
    """The checkpoint after ``len(history)`` epochs. The shuffling needs no state: epoch ``e``'s order is drawn from
    ``config.seed`` and ``e``. ``generators`` holds each rank's dropout/augmentation generator state, by rank."""
    return {
        "config": asdict(config),
        "data": _data_info(data),
        "epoch": len(history),
        "model": model.state_dict(),
        "best_model": early.best_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "early_stopping": early.state_dict(),
        "rng": _rng_states(generators),
        "history": [asdict(m) for m in history],
        "run": {"device": device.type, "world_size": world_size, "elapsed_s": elapsed,
                "torch": str(torch.__version__)},
    }


def _saved_config(checkpoint: Mapping[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig(**checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its configuration is not one this version understands ({error})") from error


def _checkpoint_to_resume(path: Path | None, config: TrainConfig, device: torch.device,
                          world_size: int) -> dict[str, Any]:
    """The checkpoint in ``path``, after checking that ``config`` may continue it."""
    if path is None:
        raise ValueError("resume needs out_dir, the directory of the run to continue")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: there is no run to resume in {path.parent}; start one without "
                                "resume (--resume)")
    checkpoint = load_checkpoint(path)
    saved = _saved_config(checkpoint, path)
    differences = [f"{f.name} {getattr(saved, f.name)!r} there, {getattr(config, f.name)!r} here"
                   for f in dataclasses.fields(TrainConfig)
                   if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name)]
    if differences:
        raise CheckpointError(f"{path} was written by a run with other settings: {'; '.join(differences)}. Resume with "
                              "the checkpoint's settings, or start a new run in another directory")
    if checkpoint["run"]["device"] != device.type:
        raise CheckpointError(f"{path} was written on {checkpoint['run']['device']}; resume it on the same kind of "
                              f"device (--device {checkpoint['run']['device']}), not {device.type}")
    if checkpoint["run"]["world_size"] != world_size:
        raise CheckpointError(f"{path} was written by {checkpoint['run']['world_size']} process(es); resume it with "
                              f"as many (torchrun --nproc_per_node={checkpoint['run']['world_size']}), not {world_size}")
    return checkpoint


def _check_same_data(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path | None) -> None:
    differences = [f"{k} {saved.get(k)!r} there, {current[k]!r} here" for k in current
                   if k != "source" and saved.get(k) != current[k]]
    if differences:
        raise CheckpointError(f"{path} was trained on other data: {'; '.join(differences)}")


def _load_into(target: Any, state: Any, path: Path, what: str, *args: Any) -> None:
    """``target.load_state_dict(state, *args)``, its failures reported as the checkpoint's."""
    try:
        target.load_state_dict(state, *args)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its {what} do not fit this run ({error})") from error


def _check_fits(state: Mapping[str, Tensor], model: Module, path: Path) -> None:
    own = model.state_dict()
    if list(state) != list(own) or any(state[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{path}: its best weights do not fit the model (keys or shapes differ)")


def _restore(checkpoint: Mapping[str, Any], path: Path, model: Module, optimizer: SGD, scheduler: LRScheduler,
             early: EarlyStopping, generator: torch.Generator, history: list[EpochMetrics], rank: int) -> float:
    """Put the state of ``checkpoint`` into the run's objects; returns the seconds the run had taken so far."""
    _load_into(model, checkpoint["model"], path, "model weights")
    _load_into(optimizer, checkpoint["optimizer"], path, "optimizer state")
    try:
        scheduler.load_state_dict(checkpoint["scheduler"])
    except ValueError as error:
        raise CheckpointError(f"{path}: the learning-rate schedule cannot continue with these settings; a schedule "
                              f"that depends on the number of epochs needs the checkpoint's epochs "
                              f"({checkpoint['config']['epochs']}) ({error})") from error
    if checkpoint["best_model"] is not None:
        _check_fits(checkpoint["best_model"], model, path)
    early.load_state_dict(checkpoint["early_stopping"], checkpoint["best_model"])
    rng = checkpoint["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["generators"][rank])
    history.extend(EpochMetrics(**m) for m in checkpoint["history"])
    if len(history) != checkpoint["epoch"]:
        raise CheckpointError(f"{path}: its history has {len(history)} epochs but it claims {checkpoint['epoch']}")
    return float(checkpoint["run"]["elapsed_s"])


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Module, Loss, dict[str, Any]]:
    """Rebuild the model of a checkpoint with its best weights (its last ones if it has no best), in eval mode.

    Returns:
        ``(model, loss_fn, checkpoint)``: the loss the model was trained with, and the whole checkpoint dict.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`~nnbackprop.checkpoint.load_checkpoint`; also when the weights
            do not fit the architecture its configuration describes.
    """
    path = Path(path)
    checkpoint = load_checkpoint(path)
    config = _saved_config(checkpoint, path)
    info = checkpoint["data"]
    model = build_model(config, tuple(info["input_shape"]), len(info["classes"]), device)
    weights = checkpoint["best_model"] if checkpoint["best_model"] is not None else checkpoint["model"]
    _load_into(model, weights, path, "model weights")
    return model.eval(), build_loss(config), checkpoint


def evaluate_checkpoint(path: str | Path, *, data_dir: str | None = None, device: str = "auto",
                        batch_size: int = EVAL_BATCH_SIZE) -> dict[str, Any]:
    """Evaluate a checkpoint's model on the test split of the data set it was trained on.

    The data set is found as in training (``data_dir`` overrides the checkpoint's) and normalised with the statistics
    saved in the checkpoint.

    Returns:
        ``{"test_loss", "test_accuracy", "num_examples", "epoch", "dataset", "source"}``.
    """
    torch_device = resolve_device(device)
    model, loss_fn, checkpoint = load_model(path, torch_device)
    config = _saved_config(checkpoint, Path(path))
    info = checkpoint["data"]
    data = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir, False,
                        config.val_size, config.seed, config.image_size)
    if list(data.classes) != info["classes"] or list(data.input_shape) != info["input_shape"]:
        raise CheckpointError(f"{path}: trained on {info['name']} with classes {info['classes']} and input shape "
                              f"{info['input_shape']}, but {data.source} has {data.classes} and {data.input_shape}")
    loader = make_loader(data.test, batch_size, mean=info["mean"], std=info["std"], device=torch_device,
                         dtype=DTYPES[config.dtype])
    loss, accuracy = evaluate(model, loss_fn, loader)
    return {"test_loss": loss, "test_accuracy": accuracy, "num_examples": len(data.test),
            "epoch": checkpoint["epoch"], "dataset": config.dataset, "source": data.source}
