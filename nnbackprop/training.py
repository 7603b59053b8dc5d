"""Training: fit a model with mini-batch gradient descent, evaluate it, stop early, and keep checkpoints.

:func:`train` runs one experiment described by a :class:`~nnbackprop.config.TrainConfig`. It loads the data, builds
the model (the configured MLP, a user's model from ``config.model``, or the ``model`` passed in), the loss, the
optimizer and the learning-rate schedule, takes the step :func:`~nnbackprop.step.make_step` gives, then, for each epoch:

1. takes one step per mini-batch of the shuffled training split, after the optional augmentation of the batch
   (:func:`~nnbackprop.augment.augment_batch`), and steps the schedule;
2. evaluates the model on the validation split and keeps the weights with the lowest validation loss
   (:class:`EarlyStopping`); stops when it has not improved for ``patience`` epochs;
3. writes a checkpoint (:mod:`nnbackprop.checkpoint`) and the metrics so far.

At the end the best weights are put back into the model and evaluated on the test split, once.

Losses and correct-prediction counts are summed on the device and read once per ``log_every`` steps: that read is
also the guard against divergence, which raises :class:`NonFiniteLossError` (naming the epoch and the steps) as soon as
the summed loss is NaN or infinite, before anything is written, so the last checkpoint stays the last good one.

The library never prints: it reports through a :class:`TrainCallback` (the command line passes one that prints a line
per epoch and draws progress bars).

Files in the output folder: ``checkpoint.pt`` (written every epoch; resuming continues from it exactly, bit for bit on
the CPU with the same number of threads), ``metrics.jsonl`` (one JSON object per epoch, see
:class:`~nnbackprop.metrics.EpochMetrics`), ``summary.json`` (test result, best epoch, wall time, configuration, data)
and ``config.toml`` (the resolved configuration, which ``--config`` reads back).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from nnbackprop.augment import augment_batch
from nnbackprop.callbacks import Callbacks, RunInfo, TrainCallback, TrainResult
from nnbackprop.checkpoint import (CHECKPOINT_FILE, CheckpointError, load_checkpoint, load_into, save_checkpoint,
                                   saved_config)
from nnbackprop.config import TrainConfig, to_toml
from nnbackprop.datasets import DataSplits, SplitData, load_dataset
from nnbackprop.diagnostics import LAYERS_FILE, Diagnostics, read_layer_records, write_layer_records
from nnbackprop.distributed import (DistContext, all_reduce_mean_hook, broadcast_module, gather_objects,
                                    local_batch_size, rank_seed, reduce_metrics, resolve_device)
from nnbackprop.files import lock_output_dir, remove_stale_temp_files, write_text
from nnbackprop.layers import Dropout
from nnbackprop.loaders import Loader, make_loader
from nnbackprop.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss, MSELoss
from nnbackprop.metrics import METRICS_FILE, EpochMetrics, write_metrics
from nnbackprop.model import mlp, model_from_file
from nnbackprop.module import Module
from nnbackprop.optim import OPTIMIZERS
from nnbackprop.schedule import make_scheduler
from nnbackprop.step import TrainStep, make_step, num_correct

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE, LAYERS_FILE)
EVAL_BATCH_SIZE = 1000
LOSSES: dict[str, type[Loss]] = {"ce": CrossEntropyLoss, "mse": MSELoss, "bce": BCEWithLogitsLoss}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
"""The learning rate of each optimizer when ``lr`` is left open."""


# ------------------------------------------------------------------------------------------------------ building


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int,
                device: torch.device | str = "cpu", dropout_generator: torch.Generator | None = None) -> Module:
    """The model of ``config`` for inputs of ``input_shape`` ``(C, H, W)`` and ``num_classes`` classes: the MLP its
    settings describe, or the one ``config.model`` (``PATH.py:FUNCTION``) returns.

    The initial weights are drawn on the CPU from a generator seeded with ``config.seed`` (so they do not depend on
    the device; a user's function gets it as ``generator``), then moved to ``device`` in ``config.dtype``. Dropout
    layers draw their masks from ``dropout_generator`` (``None``: torch's global generator).
    """
    if config.loss == "bce" and num_classes != 2:
        raise ValueError(f"loss 'bce' (one logit) needs a two-class data set, this one has {num_classes} classes; "
                         "use loss 'ce'")
    outputs = 1 if config.loss == "bce" else num_classes
    generator = torch.Generator().manual_seed(config.seed)
    if config.model is not None:
        model = model_from_file(config.model, in_features=math.prod(input_shape), input_shape=tuple(input_shape),
                                num_classes=outputs, generator=generator)
    else:
        model = mlp(math.prod(input_shape), config.hidden, outputs, activation=config.activation,
                    dropout=config.dropout, batchnorm=config.batchnorm, init=config.init, generator=generator)
    _draw_dropout_from(model, dropout_generator)
    return model.to(device, DTYPES[config.dtype])


def _draw_dropout_from(model: Module, generator: torch.Generator | None) -> None:
    for m in model.modules():
        if isinstance(m, Dropout):
            m.generator = generator


def build_loss(config: TrainConfig) -> Loss:
    """The loss of ``config``, with mean reduction."""
    return LOSSES[config.loss]()


def build_optimizer(config: TrainConfig, model: Module) -> torch.optim.Optimizer:
    """The optimizer of ``config`` over ``model``'s parameters."""
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters to train")
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
    if config.optimizer == "sgd":
        return OPTIMIZERS["sgd"](params, lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                                 weight_decay=config.weight_decay)
    return OPTIMIZERS[config.optimizer](params, lr=lr, betas=config.betas, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> LRScheduler:
    """The learning-rate schedule of ``config``, in optimizer steps."""
    step_epochs = config.step_epochs or max(1, config.epochs // 3)
    return make_scheduler(config.schedule, optimizer, total_steps=config.epochs * steps_per_epoch,
                          warmup_steps=round((config.warmup_epochs or 0) * steps_per_epoch),
                          step_size=step_epochs * steps_per_epoch, gamma=config.gamma)


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
    try:
        for x, y in loader:
            output = model(x)
            loss_sum += loss_fn(output, y).double() * len(y)
            correct += num_correct(output, y)
    finally:
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


# ------------------------------------------------------------------------------------------------------ the loop


def train(config: TrainConfig, model: Module | None = None, data: DataSplits | None = None, *,
          out_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
          callback: TrainCallback | Sequence[TrainCallback] | None = None,
          dist: DistContext | None = None) -> TrainResult:
    """Train the model described by ``config`` (or ``model``); see the module docstring for the procedure.

    Args:
        config: the run's settings.
        model: a model of your own (e.g. with your own layers), trained instead of the one ``config`` describes; it
            is moved to the run's device and dtype, and its dropout layers draw from the run's generator. A checkpoint
            of it can be resumed by passing an equal model again.
        data: the splits to train on; by default loaded with :func:`~nnbackprop.datasets.load_dataset` from ``config``.
        out_dir: where the run's files go (default ``config.out``; ``None`` for both writes nothing). It is created
            and checked for writability before any data is loaded.
        resume: continue the run whose checkpoint is in the output folder. The settings must be the checkpoint's,
            except those :meth:`~nnbackprop.config.TrainConfig.resumable` lists.
        overwrite: start afresh even though the output folder holds a checkpoint (otherwise an error).
        callback: receives progress and metrics (one callback or several). With ``config.tensorboard`` a
            :class:`~nnbackprop.tensorboard.TensorBoardLogger` joins them.
        dist: the data-parallel context from :func:`~nnbackprop.distributed.init_distributed` when launched by
            ``torchrun``. ``batch_size`` is then the global batch, each rank training on its shard of every batch
            with the gradients averaged over the ranks (one ``all_reduce`` per step), dropout masks drawn per rank,
            and validation and test metrics reduced over the ranks. Only rank 0 reports to ``callback`` and writes
            files; a checkpoint resumes on the same number of ranks.

    The output folder is held for the run (:func:`~nnbackprop.files.lock_output_dir`): a second run on it, while this
    one goes on, is refused. ``config.threads`` sets torch's CPU threads for the run (restored afterwards).

    Raises:
        ValueError: bad settings, or data that does not fit them. CheckpointError (a ValueError): an unreadable
            checkpoint, or one written with other settings. FileExistsError: the output folder holds a checkpoint and
            neither ``resume`` nor ``overwrite`` is set. WriteError (an OSError): the output folder or a file in it
            cannot be written. OutputLockedError (a WriteError): another run writes to the output folder.
            DatasetNotFoundError: no data. NonFiniteLossError: the training diverged.
    """
    with contextlib.ExitStack() as held, _threads(config.threads):
        return _train(config, model, data, out_dir=out_dir, resume=resume, overwrite=overwrite, callback=callback,
                      dist=dist, held=held)


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` (``None``: left as they are) for the ``with`` block."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(config: TrainConfig, model: Module | None, data: DataSplits | None, *, out_dir: str | Path | None,
           resume: bool, overwrite: bool, callback: TrainCallback | Sequence[TrainCallback] | None,
           dist: DistContext | None, held: contextlib.ExitStack) -> TrainResult:
    """:func:`train`; the output folder's lock goes into ``held``, which :func:`train` releases when it returns."""
    started = time.perf_counter()
    dist = dist or DistContext()
    device = dist.device if dist.distributed else resolve_device(config.device)
    local_batch_size(config.batch_size, dist.world_size)
    out = Path(out_dir) if out_dir is not None else Path(config.out) if config.out is not None else None
    checkpoint_path = out / CHECKPOINT_FILE if out is not None else None
    writes = out is not None and dist.is_main
    callbacks = [] if callback is None else [callback] if isinstance(callback, TrainCallback) else list(callback)
    if config.tensorboard and dist.is_main:
        if out is None:
            raise ValueError("tensorboard needs an output folder (--out) to write its logs into")
        from nnbackprop.tensorboard import TensorBoardLogger  # an optional extra: imported only when asked for

        callbacks.append(TensorBoardLogger(out))
    callback = Callbacks(callbacks) if dist.is_main else TrainCallback()
    if writes:
        held.enter_context(lock_output_dir(out))  # creates the folder, proves it writable, holds it for this run
        remove_stale_temp_files(out, RUN_FILES)
    saved = _checkpoint_to_resume(checkpoint_path, device, dist.world_size) if resume else None
    if not resume and checkpoint_path is not None and checkpoint_path.exists() and not overwrite:
        raise FileExistsError(f"{checkpoint_path} already exists: resume that run (--resume), start over "
                              "(--overwrite), or write to another directory (--out)")
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, config.download, config.val_size, config.seed,
                            config.image_size, grayscale=config.grayscale)
    if saved is not None:  # what this run leaves open, it continues as the checkpoint had it
        before = saved_config(saved, checkpoint_path)
        config = config.replace(**{name: getattr(before, name) for name, value in config.to_dict().items()
                                   if value is None and getattr(before, name) is not None})
    config = resolved(config, data)
    if saved is not None:
        _check_same_run(saved, checkpoint_path, config, data)
    check_fits(config, data)
    if writes and not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)

    torch.manual_seed(config.seed)
    dtype = DTYPES[config.dtype]
    # Dropout masks and augmentation: a stream of their own per rank (rank 0's is a single process's).
    generator = torch.Generator(device).manual_seed(rank_seed(config.seed + 1, dist.rank))
    passed = model
    if model is None:
        model = build_model(config, data.input_shape, data.num_classes, device, generator)
    else:
        _draw_dropout_from(model.to(device, dtype), generator)
    broadcast_module(dist, model)
    loss_fn = build_loss(config)
    optimizer = build_optimizer(config, model)
    train_loader = make_loader(data.train, config.batch_size, mean=data.mean, std=data.std, device=device,
                               dtype=dtype, shuffle=True, seed=config.seed, rank=dist.rank, world_size=dist.world_size,
                               drop_last=len(data.train) % config.batch_size == 1)
    val_loader = (make_loader(eval_shard(data.val, dist), EVAL_BATCH_SIZE, mean=data.mean, std=data.std,
                              device=device, dtype=dtype) if len(data.val) else None)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training split of {data.name} is empty")
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    early = EarlyStopping(config.patience)
    history: list[EpochMetrics] = []
    elapsed_before = 0.0
    if saved is not None:
        elapsed_before = _restore(saved, checkpoint_path, model, optimizer, scheduler, early, generator, history,
                                  dist.rank)
        if writes:
            write_metrics(out, history)
    step = make_step(model, loss_fn, optimizer, fast=config.fast, grad_hook=all_reduce_mean_hook(dist),
                     **({"cuda_graph": True} if config.cuda_graph else {}))
    start_epoch = len(history)
    num_parameters = sum(p.numel() for p in model.parameters())
    diagnostics = None if config.diagnostics == "off" else Diagnostics(model, optimizer, config.diagnostics,
                                                                       callback.wants_activations)
    records = read_layer_records(out / LAYERS_FILE, up_to_epoch=start_epoch) if saved is not None and out else []
    if writes:
        write_text(out / CONFIG_FILE, to_toml(config))

    callback.on_train_begin(RunInfo(config, data, model, num_parameters, device, type(step).__name__,
                                    step.fallback_reason, steps_per_epoch, start_epoch, out, diagnostics))
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if early.should_stop:
            break
        epoch_start = time.perf_counter()
        loss, accuracy, lr = train_epoch(step, loss_fn, train_loader, epoch, config, scheduler, generator, callback,
                                          checkpoint_path, len(history), dist, diagnostics, records)
        train_seconds = time.perf_counter() - epoch_start
        if not all(bool(p.isfinite().all()) for p in model.parameters()):
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
                                    time.perf_counter() - epoch_start,
                                    train_loader.num_samples * dist.world_size / train_seconds))
        generators = gather_objects(dist, generator.get_state()) if out is not None else []
        if writes:
            elapsed = elapsed_before + time.perf_counter() - started
            save_checkpoint(checkpoint_path, _checkpoint(config, data, model, passed, optimizer, scheduler, early,
                                                         generators, history, device, elapsed, dist.world_size))
            write_metrics(out, history)
            if diagnostics is not None:
                write_layer_records(out, records)
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
        "threads": torch.get_num_threads(),
        "num_parameters": num_parameters,
        "torch": str(torch.__version__),
        "model": _model_source(config, passed),
        "data": data.info(),
        "config": config.to_dict(),
    }
    if writes:
        write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    result = TrainResult(model, history, early.best_epoch, stopped_early, test_loss, test_accuracy, wall_time, summary)
    callback.on_train_end(result)
    return result


def resolved(config: TrainConfig, data: DataSplits) -> TrainConfig:
    """``config`` with the settings it leaves open (``None``) filled in: the augmentation that suits ``data``
    (``data.augmentation``), the optimizer's usual learning rate (:data:`DEFAULT_LR`), and a warm-up of one epoch,
    or a tenth of a run shorter than ten."""
    chosen: dict[str, Any] = {name: data.augmentation.get(name, default)
                              for name, default in (("shift", 0), ("flip", False)) if getattr(config, name) is None}
    if config.lr is None:
        chosen["lr"] = DEFAULT_LR[config.optimizer]
    if config.warmup_epochs is None:
        chosen["warmup_epochs"] = min(1.0, config.epochs / 10)
    return config.replace(**chosen) if chosen else config


def check_fits(config: TrainConfig, data: DataSplits) -> None:
    """Raise a ``ValueError`` naming the limit when ``config`` cannot make sense for ``data``, before any training:
    empty splits, fewer than two classes, labels out of range, augmentation shifts as large as the images."""
    if len(data.train) == 0:
        raise ValueError(f"{data.name}: the training split is empty")
    if len(data.test) == 0:
        raise ValueError(f"{data.name} has no test split: give an image folder a test/ folder beside train/, or let "
                         "one be carved from the images with --val-size > 0")
    if data.num_classes < 2:
        raise ValueError(f"{data.name} has {data.num_classes} class; a classifier needs at least two")
    if len(data.val) == 0 and config.patience is not None:
        raise ValueError("early stopping (patience) needs a validation split; set val_size > 0")
    height, width = data.input_shape[1:]
    if (config.shift or 0) >= min(height, width):
        raise ValueError(f"shift {config.shift} px does not fit {data.name}'s {height}x{width} images: random shifts "
                         f"must stay below {min(height, width)} px (2 to 4 suit 28-32 px images)")
    for split, part in (("train", data.train), ("val", data.val), ("test", data.test)):
        if len(part):
            low, high = (int(v) for v in torch.aminmax(part.labels))
            if low < 0 or high >= data.num_classes:
                raise ValueError(f"{data.name}: the {split} split has label {low if low < 0 else high}, outside "
                                 f"[0, {data.num_classes - 1}] for its {data.num_classes} classes")


def train_epoch(step: TrainStep, loss_fn: Loss, loader: Loader, epoch: int, config: TrainConfig,
                 scheduler: LRScheduler, generator: torch.Generator, callback: TrainCallback,
                 checkpoint_path: Path | None, last_good_epoch: int, dist: DistContext,
                 diagnostics: Diagnostics | None, records: list[dict[str, Any]]) -> tuple[float, float, float]:
    """One epoch of :func:`train`: a step per batch of ``loader`` (augmented as ``config`` says), the schedule
    stepped after each; returns the epoch's mean training loss, accuracy and last learning rate, over all ranks.

    The running loss is read (and reduced over the ranks) every ``config.log_every`` steps and at the last: that read
    is the divergence check (:class:`NonFiniteLossError`, ``checkpoint_path`` and ``last_good_epoch`` for its
    message) and carries the interval's ``diagnostics`` (when given), whose record is appended to ``records`` and
    told to ``callback``."""
    loader.set_epoch(epoch)
    num_steps = len(loader)
    callback.on_epoch_begin(epoch, num_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    seen = torch.zeros((), dtype=torch.int64, device=loader.device)
    checked = 0
    lr = scheduler.get_last_lr()[0]
    try:
        for i, (x, y) in enumerate(loader, start=1):
            if config.shift or config.flip:
                x = augment_batch(x, shift=config.shift, flip=config.flip, generator=generator)
            lr = scheduler.get_last_lr()[0]
            if diagnostics is not None and diagnostics.due(i, config.log_every, num_steps):
                diagnostics.arm()
            batch_loss, batch_correct = step(x, y)
            scheduler.step()
            loss_sum += batch_loss
            correct += batch_correct
            seen += len(y)
            running = None
            if i % config.log_every == 0 or i == num_steps:
                total, count = reduce_metrics(dist, loss_sum, seen)
                pending = diagnostics.pending() if diagnostics is not None else None
                values = torch.cat([torch.stack([total, count.double()]), pending]) if pending is not None else None
                numbers = values.tolist() if values is not None else [total.item(), count.item()]  # the one read
                running = numbers[0] / numbers[1]
                if not math.isfinite(running):
                    label_error = loss_fn.label_error()
                    if label_error is not None:
                        raise ValueError(label_error)
                    raise NonFiniteLossError("the training loss", epoch, checked + 1, i, num_steps, checkpoint_path,
                                             last_good_epoch)
                checked = i
                if diagnostics is not None:
                    records.append(diagnostics.read(epoch, i, (epoch - 1) * num_steps + i, numbers[2:]))
                    callback.on_interval(records[-1])
            callback.on_step(epoch, i, running)
    finally:
        if diagnostics is not None:
            diagnostics.close()
    loss_sum, correct, seen = reduce_metrics(dist, loss_sum, correct, seen)
    return loss_sum.item() / seen.item(), correct.item() / seen.item(), lr


# ------------------------------------------------------------------------------------------------------ checkpoints


def _model_source(config: TrainConfig, passed: Module | None) -> dict[str, Any]:
    """Where the model came from, for the checkpoint and the summary: the MLP of the settings, ``config.model``
    (``PATH.py:FUNCTION``), or a model passed to :func:`train` (only its structure is recorded: the checkpoint alone
    cannot rebuild it)."""
    if passed is not None:
        return {"kind": "python", "repr": repr(passed)}
    if config.model is not None:
        return {"kind": "file", "spec": config.model, "path": str(Path(config.model.rpartition(":")[0]).resolve())}
    return {"kind": "mlp"}


def _rng_states(generators: list[Tensor]) -> dict[str, Any]:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "generators": generators}


def _checkpoint(config: TrainConfig, data: DataSplits, model: Module, passed: Module | None,
                optimizer: torch.optim.Optimizer, scheduler: LRScheduler, early: EarlyStopping,
                generators: list[Tensor], history: list[EpochMetrics], device: torch.device, elapsed: float,
                world_size: int) -> dict[str, Any]:
    """The checkpoint after ``len(history)`` epochs. The shuffling needs no state: epoch ``e``'s order is drawn from
    ``config.seed`` and ``e``. ``generators`` holds each rank's dropout/augmentation generator state, by rank."""
    return {
        "config": config.to_dict(),
        "data": data.info(),
        "epoch": len(history),
        "model": model.state_dict(),
        "best_model": early.best_state,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "early_stopping": early.state_dict(),
        "rng": _rng_states(generators),
        "history": [asdict(m) for m in history],
        "run": {"device": device.type, "world_size": world_size, "elapsed_s": elapsed, "torch": str(torch.__version__),
                "threads": torch.get_num_threads(), "model": _model_source(config, passed)},
    }


def _checkpoint_to_resume(path: Path | None, device: torch.device, world_size: int) -> dict[str, Any]:
    """The checkpoint in ``path``, after checking that this device and number of ranks may continue it."""
    if path is None:
        raise ValueError("resume needs an output folder (--out), the folder of the run to continue")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: there is no run to resume in {path.parent}; start one without "
                                "--resume")
    checkpoint = load_checkpoint(path)
    run = checkpoint["run"]
    if run["device"] != device.type:
        raise CheckpointError(f"{path} was written on {run['device']}; resume it on the same kind of device "
                              f"(--device {run['device']}), not {device.type}")
    if run["world_size"] != world_size:
        raise CheckpointError(f"{path} was written by {run['world_size']} process(es); resume it with as many "
                              f"(torchrun --nproc_per_node={run['world_size']}), not {world_size}")
    return checkpoint


def _check_same_run(checkpoint: Mapping[str, Any], path: Path, config: TrainConfig, data: DataSplits) -> None:
    """Refuse to continue ``checkpoint`` with other settings (but those :meth:`TrainConfig.resumable` lists) or on
    other data."""
    saved = saved_config(checkpoint, path)
    resumable = TrainConfig.resumable()
    differences = [f"{name} {getattr(saved, name)!r} there, {getattr(config, name)!r} here"
                   for name in config.to_dict()
                   if name not in resumable and getattr(saved, name) != getattr(config, name)]
    if differences:
        raise CheckpointError(f"{path} was written by a run with other settings: {'; '.join(differences)}. Resume with "
                              "the checkpoint's settings, or start a new run in another directory")
    if saved.epochs != config.epochs and (config.schedule == "cosine" or
                                          (config.schedule == "step" and config.step_epochs is None)):
        raise CheckpointError(f"{path}: its {config.schedule} schedule was laid out for {saved.epochs} epochs; resume "
                              f"with --epochs {saved.epochs} (only a constant schedule or a step schedule with "
                              "--step-epochs can be stretched)")
    current = data.info()
    differences = [f"{k} {checkpoint['data'].get(k)!r} there, {current[k]!r} here" for k in current
                   if k != "source" and checkpoint["data"].get(k) != current[k]]
    if differences:
        raise CheckpointError(f"{path} was trained on other data: {'; '.join(differences)}")


def _restore(checkpoint: Mapping[str, Any], path: Path, model: Module, optimizer: torch.optim.Optimizer,
             scheduler: LRScheduler, early: EarlyStopping, generator: torch.Generator, history: list[EpochMetrics],
             rank: int) -> float:
    """Put the state of ``checkpoint`` into the run's objects; returns the seconds the run had taken so far."""
    load_into(model, checkpoint["model"], path, "model weights")
    load_into(optimizer, checkpoint["optimizer"], path, "optimizer state")
    load_into(scheduler, checkpoint["scheduler"], path, "learning-rate schedule")
    best = checkpoint["best_model"]
    if best is not None:
        own = model.state_dict()
        if list(best) != list(own) or any(best[k].shape != own[k].shape for k in own):
            raise CheckpointError(f"{path}: its best weights do not fit the model (keys or shapes differ)")
    early.load_state_dict(checkpoint["early_stopping"], best)
    rng = checkpoint["rng"]
    try:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        generator.set_state(rng["generators"][rank])
    except (RuntimeError, IndexError, TypeError) as error:
        raise CheckpointError(f"{path}: its random generator states do not fit this run ({error})") from error
    history.extend(EpochMetrics(**m) for m in checkpoint["history"])
    return float(checkpoint["run"]["elapsed_s"])
