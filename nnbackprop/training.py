"""Training: fit a model with mini-batch gradient descent, evaluate it, stop early, and keep checkpoints.

:func:`train` runs one experiment described by a :class:`~nnbackprop.config.TrainConfig`. It loads the data, builds
the model, the loss, the optimizer and the learning-rate schedule (:mod:`nnbackprop.build`), takes the step
:func:`~nnbackprop.step.make_step` gives, then, for each epoch:

1. takes one step per mini-batch of the shuffled training split, after the optional augmentation of the batch
   (:func:`~nnbackprop.augment.augment_batch`), and steps the schedule (:func:`train_epoch`);
2. evaluates the model on the validation split and keeps the weights with the lowest validation loss (or the highest
   accuracy, ``monitor``; :class:`~nnbackprop.early_stopping.EarlyStopping`); stops when that has not improved for
   ``patience`` epochs;
3. writes a checkpoint (:mod:`nnbackprop.checkpoint`) and the metrics so far.

At the end the best weights are put back into the model and evaluated on the test split, once.

Losses and correct-prediction counts are summed on the device and read once per ``log_every`` steps: that read is
also the guard against divergence, which raises :class:`~nnbackprop.errors.NonFiniteLossError` (naming the epoch and
the steps) as soon as the summed loss is NaN or infinite, before anything is written, so the last checkpoint stays the
last good one.

The library never prints: it reports through a :class:`~nnbackprop.callbacks.TrainCallback` (the command line passes
one that prints a line per epoch and draws progress bars).

Files in the output folder: ``checkpoint.pt`` (written every epoch; resuming continues from it exactly, bit for bit on
the CPU with the same number of threads), ``metrics.jsonl`` (one JSON object per epoch, see
:class:`~nnbackprop.metrics.EpochMetrics`), ``summary.json`` (test result, best epoch, wall time, configuration, data)
and ``config.toml`` (the resolved configuration, which ``--config`` reads back).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from nnbackprop.augment import augment_batch
from nnbackprop.build import (EVAL_BATCH_SIZE, build_loss, build_model, build_optimizer, build_scheduler, check_fits,
                              dtypes, resolved)
from nnbackprop.callbacks import Callbacks, RunInfo, TrainCallback, TrainResult
from nnbackprop.checkpoint import (CHECKPOINT_FILE, check_same_run, checkpoint_to_resume, make_checkpoint,
                                   model_source, restore, save_checkpoint, saved_config)
from nnbackprop.config import TrainConfig, to_toml
from nnbackprop.datasets import DataSplits, load_dataset
from nnbackprop.device import make_current, resolve_device, torch_threads
from nnbackprop.diagnostics import LAYERS_FILE, Diagnostics, read_layer_records, write_layer_records
from nnbackprop.distributed import (DistContext, all_reduce_mean_hook, broadcast_module, eval_shard, gather_objects,
                                    local_batch_size, rank_seed, reduce_metrics)
from nnbackprop.early_stopping import EarlyStopping
from nnbackprop.errors import ConfigError, NonFiniteLossError, OutputExistsError
from nnbackprop.evaluation import evaluate
from nnbackprop.files import lock_output_dir, remove_stale_temp_files, write_text
from nnbackprop.loaders import Loader, make_loader
from nnbackprop.losses import Loss
from nnbackprop.metrics import METRICS_FILE, EpochMetrics, write_metrics
from nnbackprop.module import Module
from nnbackprop.step import FastStep, SimpleStep, make_step

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.toml"
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, CONFIG_FILE, LAYERS_FILE)


@dataclass
class Run:
    """What :func:`train_epoch` works with: the run's step and loss, its training batches and schedule, the generator
    of its augmentation, who is told, the data-parallel context, the diagnostics (and their records so far), and the
    last good checkpoint (for the divergence message)."""

    config: TrainConfig
    step: SimpleStep | FastStep
    loss_fn: Loss
    loader: Loader
    scheduler: LRScheduler
    generator: torch.Generator
    callback: TrainCallback
    dist: DistContext
    diagnostics: Diagnostics | None
    records: list[dict[str, Any]]
    checkpoint_path: Path | None
    epochs_done: int = 0


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
            except those :meth:`~nnbackprop.config.TrainConfig.resumable` lists; those ``config`` leaves open take
            the checkpoint's.
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
        Subclasses of :class:`~nnbackprop.errors.NNBackpropError`, each with a one-line message: ConfigError (bad
        settings, or a model or data that does not fit them), CheckpointError (an unreadable checkpoint, or one
        written with other settings), OutputExistsError (the output folder holds a run and neither ``resume`` nor
        ``overwrite`` is set), WriteError (a file cannot be written; OutputLockedError: another run writes to the
        output folder), DatasetNotFoundError, NonFiniteLossError (the training diverged).
    """
    with contextlib.ExitStack() as held:  # what the run holds until it returns: its threads, its folder's lock
        held.enter_context(torch_threads(config.threads))
        started = time.perf_counter()
        if resume and overwrite:
            raise ConfigError("resume continues the run in the output folder and overwrite starts it afresh: choose "
                              "one")
        dist = dist or DistContext()
        device = dist.device if dist.distributed else resolve_device(config.device)
        make_current(device)  # cuda:N: the step's streams, graphs and allocations on it
        local_batch_size(config.batch_size, dist.world_size)
        out = Path(out_dir) if out_dir is not None else Path(config.out) if config.out is not None else None
        checkpoint_path = out / CHECKPOINT_FILE if out is not None else None
        writes = out is not None and dist.is_main
        callbacks = [] if callback is None else [callback] if isinstance(callback, TrainCallback) else list(callback)
        if config.tensorboard and dist.is_main:
            if out is None:
                raise ConfigError("tensorboard needs an output folder (--out) to write its logs into")
            from nnbackprop.tensorboard import TensorBoardLogger  # an optional extra: imported only when asked for

            callbacks.append(TensorBoardLogger(out))
        callback = Callbacks(callbacks) if dist.is_main else TrainCallback()
        if writes:
            held.enter_context(lock_output_dir(out))  # creates the folder, proves it writable, holds it for this run
            remove_stale_temp_files(out, RUN_FILES)
        saved = checkpoint_to_resume(checkpoint_path, device, dist.world_size) if resume else None
        if not resume and checkpoint_path is not None and checkpoint_path.exists() and not overwrite:
            raise OutputExistsError(f"{checkpoint_path} already exists: resume that run (--resume), start over "
                                    "(--overwrite), or write to another directory (--out)")
        if data is None:
            data = load_dataset(config.dataset, config.data_dir, config.download, config.val_size, config.seed,
                                config.image_size, grayscale=config.grayscale)
        config = resolved(config, data, saved_config(saved, checkpoint_path) if saved is not None else None)
        if saved is not None:
            check_same_run(saved, checkpoint_path, config, data.info())
        check_fits(config, data)
        if writes and not resume:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)

        torch.manual_seed(config.seed)
        compute_dtype, _ = dtypes(config)
        # Dropout masks and augmentation: a stream of their own per rank (rank 0's is a single process's).
        generator = torch.Generator(device).manual_seed(rank_seed(config.seed + 1, dist.rank))
        passed = model
        model = build_model(config, data.input_shape, data.num_classes, device, generator, model=passed)
        broadcast_module(dist, model)
        loss_fn = build_loss(config)
        optimizer = build_optimizer(config, model)
        batches = dict(mean=data.mean, std=data.std, device=device, dtype=compute_dtype)
        train_loader = make_loader(data.train, config.batch_size, shuffle=True, seed=config.seed, rank=dist.rank,
                                   world_size=dist.world_size, drop_last=len(data.train) % config.batch_size == 1,
                                   **batches)
        val_loader = make_loader(eval_shard(data.val, dist), EVAL_BATCH_SIZE, **batches) if len(data.val) else None
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise ConfigError(f"the training split of {data.name} is empty")
        scheduler = build_scheduler(config, optimizer, steps_per_epoch)
        early = EarlyStopping(config.patience, config.monitor)
        history: list[EpochMetrics] = []
        elapsed_before = 0.0
        if saved is not None:
            history, elapsed_before = restore(saved, checkpoint_path, model=model, optimizer=optimizer,
                                              scheduler=scheduler, early_stopping=early, generator=generator,
                                              rank=dist.rank)
            if writes:
                write_metrics(out, history)
        step = make_step(model, loss_fn, optimizer, fast=config.fast, grad_hook=all_reduce_mean_hook(dist),
                         dtype=compute_dtype, tf32=config.tf32, cuda_graph=config.cuda_graph)
        reduce = functools.partial(reduce_metrics, dist) if dist.distributed else None
        num_parameters = sum(p.numel() for p in model.parameters())
        diagnostics = None if config.diagnostics == "off" else Diagnostics(model, optimizer, config.diagnostics,
                                                                           callback.wants_activations)
        records = read_layer_records(out / LAYERS_FILE, up_to_epoch=len(history)) if saved is not None and out else []
        if writes:
            write_text(out / CONFIG_FILE, to_toml(config))
        run = Run(config, step, loss_fn, train_loader, scheduler, generator, callback, dist, diagnostics, records,
                  checkpoint_path, len(history))

        callback.on_train_begin(RunInfo(config, data, model, num_parameters, device, type(step).__name__,
                                        step.fallback_reason, steps_per_epoch, len(history), out, diagnostics))
        for epoch in range(len(history) + 1, config.epochs + 1):
            if early.should_stop:
                break
            epoch_start = time.perf_counter()
            loss, accuracy, lr = train_epoch(run, epoch)
            train_seconds = time.perf_counter() - epoch_start
            if not all(bool(p.isfinite().all()) for p in model.parameters()):
                raise NonFiniteLossError("the weights", epoch, steps_per_epoch, steps_per_epoch, steps_per_epoch,
                                         checkpoint_path, len(history))
            val_loss = val_accuracy = None
            broadcast_module(dist, model)  # batch-norm running averages are per rank: take rank 0's
            if val_loader is not None:
                val = evaluate(model, loss_fn, val_loader, reduce=reduce)
                val_loss, val_accuracy = val.loss, val.accuracy
                if not math.isfinite(val_loss):
                    raise NonFiniteLossError("the validation loss", epoch, steps_per_epoch, steps_per_epoch,
                                             steps_per_epoch, checkpoint_path, len(history))
                early.update(epoch, val_loss, val_accuracy, step.model_state_dict)
            history.append(EpochMetrics(epoch, loss, accuracy, val_loss, val_accuracy, lr,
                                        time.perf_counter() - epoch_start,
                                        train_loader.num_samples * dist.world_size / train_seconds))
            run.epochs_done = len(history)
            generators = gather_objects(dist, generator.get_state()) if out is not None else []
            if writes:
                save_checkpoint(checkpoint_path, make_checkpoint(
                    config=config, data=data.info(), model=step.model_state_dict(), best_model=early.best_state,
                    optimizer=optimizer, scheduler=scheduler, early_stopping=early, generators=generators,
                    history=history, run={"device": device.type, "world_size": dist.world_size,
                                          "elapsed_s": elapsed_before + time.perf_counter() - started,
                                          "model": model_source(config, passed)}))
                write_metrics(out, history)
                if diagnostics is not None:
                    write_layer_records(out, records)
            callback.on_epoch_end(history[-1])

        if early.best_state is not None:
            step.load_model_state_dict(early.best_state)
        test_loader = make_loader(eval_shard(data.test, dist), EVAL_BATCH_SIZE, **batches)
        test = evaluate(model, loss_fn, test_loader, reduce=reduce)
        wall_time = elapsed_before + time.perf_counter() - started
        stopped_early = early.should_stop and len(history) < config.epochs
        summary = {
            "test_loss": test.loss, "test_accuracy": test.accuracy, "best_epoch": early.best_epoch,
            "epochs_trained": len(history), "stopped_early": stopped_early,
            "best_val_loss": history[early.best_epoch - 1].val_loss if early.best_epoch is not None else None,
            "wall_time_s": wall_time,
            "step": type(step).__name__, "device": str(device), "world_size": dist.world_size,
            "threads": torch.get_num_threads(), "num_parameters": num_parameters, "torch": str(torch.__version__),
            "model": model_source(config, passed), "data": data.info(), "config": config.to_dict(),
        }
        if writes:
            write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        result = TrainResult(model, history, early.best_epoch, stopped_early, test.loss, test.accuracy, wall_time,
                             summary)
        callback.on_train_end(result)
        return result


def train_epoch(run: Run, epoch: int) -> tuple[float, float, float]:
    """One epoch of :func:`train`: a step per batch of ``run.loader`` (augmented as the config says), the schedule
    stepped after each; returns the epoch's mean training loss, accuracy and last learning rate, over all ranks.

    The running loss is read (and reduced over the ranks) every ``log_every`` steps and at the last: that read is the
    divergence check (:class:`~nnbackprop.errors.NonFiniteLossError`) and carries the interval's diagnostics (when
    on), whose record is appended to ``run.records`` and told to the callback."""
    config, loader, diagnostics = run.config, run.loader, run.diagnostics
    loader.set_epoch(epoch)
    num_steps = len(loader)
    run.callback.on_epoch_begin(epoch, num_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=loader.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    seen = torch.zeros((), dtype=torch.int64, device=loader.device)
    checked = 0
    lr = run.scheduler.get_last_lr()[0]
    try:
        for i, (x, y) in enumerate(loader, start=1):
            if config.shift or config.flip or config.crop_scale < 1:
                x = augment_batch(x, shift=config.shift, flip=config.flip, crop_scale=config.crop_scale,
                                  generator=run.generator)
            lr = run.scheduler.get_last_lr()[0]
            if diagnostics is not None and diagnostics.due(i, config.log_every, num_steps):
                diagnostics.arm()
            batch_loss, batch_correct = run.step(x, y)
            run.scheduler.step()
            loss_sum += batch_loss
            correct += batch_correct
            seen += len(y)
            running = None
            if i % config.log_every == 0 or i == num_steps:
                total, count = reduce_metrics(run.dist, loss_sum, seen)
                pending = diagnostics.pending() if diagnostics is not None else None
                values = torch.cat([torch.stack([total, count.double()]), pending]) if pending is not None else None
                numbers = values.tolist() if values is not None else [total.item(), count.item()]  # the one read
                running = numbers[0] / numbers[1]
                if not math.isfinite(running):
                    label_error = run.loss_fn.label_error()
                    if label_error is not None:
                        raise ConfigError(label_error)
                    raise NonFiniteLossError("the training loss", epoch, checked + 1, i, num_steps,
                                             run.checkpoint_path, run.epochs_done)
                checked = i
                if diagnostics is not None:
                    run.records.append(diagnostics.read(epoch, i, (epoch - 1) * num_steps + i, numbers[2:]))
                    run.callback.on_interval(run.records[-1])
            run.callback.on_step(epoch, i, running)
    finally:
        if diagnostics is not None:
            diagnostics.close()
    loss_sum, correct, seen = reduce_metrics(run.dist, loss_sum, correct, seen)
    return loss_sum.item() / seen.item(), correct.item() / seen.item(), lr
